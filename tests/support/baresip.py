"""baresip (Debian's baresip-core) as a softphone in a child process, and its fixture.

Each phone sends a sine (ausine) and dumps what it decodes to a WAV file (sndfile), which
is measured with the same Goertzel code as the pjsua2 handsets. Its console is driven on
stdin (`d 201` dials, `b` hangs up, `q` quits).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.ports import free_port
from tests.support.output import OutputLines
from tests.support.pbx import Daemon


class Baresip:
    """One baresip process: its config directory, its console on stdin, its output collected."""

    def __init__(self, workdir: Path, pbx: Daemon, number: str, password: str, tone_hz: int,
                 rtp_ports: str, *, auto_answer: bool = False, transport: str = "udp") -> None:
        if not shutil.which("baresip"):
            pytest.skip("baresip is not installed (`make test` installs Debian's baresip-core)")
        self.dumps = workdir / "dump"
        self.dumps.mkdir(parents=True)
        (workdir / "config").write_text(
            f"sip_listen 127.0.0.1:{free_port()}\n"
            f"rtp_ports {rtp_ports}\n"
            "module_path /usr/lib/baresip/modules\n"
            "module g711.so\nmodule ausine.so\nmodule sndfile.so\nmodule stdio.so\n"
            "module_app account.so\nmodule_app menu.so\n"
            f"audio_source ausine,{tone_hz}\n"
            # ausine makes 48 kHz stereo only; baresip resamples to G.711.
            "ausrc_srate 48000\nausrc_channels 2\n"
            f"snd_path {self.dumps}\n"
        )
        params = f";transport={transport}" if transport != "udp" else ""
        answer = ";answermode=auto" if auto_answer else ""
        (workdir / "accounts").write_text(
            f"<sip:{number}@127.0.0.1:{pbx.port}{params}>;auth_pass={password};regint=300{answer}\n"
        )
        self.proc = subprocess.Popen(["baresip", "-f", str(workdir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = OutputLines(self.proc)

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        self.output.wait_for(re.escape(text), timeout)

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def heard(self) -> Path:
        """The WAV of what this phone decoded during its call."""
        (dump,) = self.dumps.glob("*-dec.wav")
        return dump

    def stop(self) -> None:
        """Quit (dumps are complete once baresip has exited); killed if it does not."""
        if self.proc.poll() is None:
            try:
                self.command("q")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc.wait()


@pytest.fixture
def baresip() -> Iterator[Callable[..., Baresip]]:
    """Start baresip phones (arguments of `Baresip`); each is stopped at teardown."""
    phones: list[Baresip] = []

    def start(*args: object, **kwargs: object) -> Baresip:
        phone = Baresip(*args, **kwargs)  # type: ignore[arg-type]
        phones.append(phone)
        return phone

    yield start
    for phone in phones:
        phone.stop()
