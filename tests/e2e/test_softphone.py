"""A softphone nobody here wrote: two baresip instances (Debian's baresip-core) call each
other through homepbx, and each hears the other's tone.

baresip 1.0 (Debian 12) answers MD5 digest challenges only, and gives up on a SHA-256
challenge instead of taking the MD5 one after it: with the shipped digest settings homepbx
knows it by its User-Agent and offers it MD5 alone (appliance/sip/digest_fallback.py).
Each phone sends a sine (ausine) and dumps what it decodes to a
WAV file (sndfile), which is measured with the same Goertzel code as the pjsua2 handsets.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.ports import free_port
from appliance.simulator import tones
from tests.e2e.conftest import DaemonFactory
from tests.support.output import OutputLines
from tests.support.pbx import Daemon, user_block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


class Baresip:
    """One baresip process: its config directory, its console on stdin, its output collected."""

    def __init__(self, workdir: Path, pbx: Daemon, number: str, password: str, tone_hz: int,
                 rtp_ports: str, *, auto_answer: bool = False) -> None:
        assert shutil.which("baresip"), "baresip is not installed: `make deps` installs Debian's baresip-core"
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
        answer = ";answermode=auto" if auto_answer else ""
        (workdir / "accounts").write_text(
            f"<sip:{number}@127.0.0.1:{pbx.port}>;auth_pass={password};regint=300{answer}\n"
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
    phones: list[Baresip] = []

    def start(*args: object, **kwargs: object) -> Baresip:
        phone = Baresip(*args, **kwargs)
        phones.append(phone)
        return phone

    yield start
    for phone in phones:
        phone.stop()


def test_baresip_calls_baresip_and_both_hear_the_other(
    pbx_factory: DaemonFactory, baresip: Callable[..., Baresip], tmp_path: Path
) -> None:
    pbx = pbx_factory([user_block("200", "pw-200"), user_block("201", "pw-201")])  # shipped digest settings
    callee = baresip(tmp_path / "callee", pbx, "201", "pw-201", 1000, "40000-40999", auto_answer=True)
    caller = baresip(tmp_path / "caller", pbx, "200", "pw-200", 440, "41000-41999")
    for phone in (callee, caller):
        phone.wait_for("registered successfully")
    caller.command("d 201")
    callee.wait_for("Call established")
    caller.wait_for("Call established")
    time.sleep(2.0)  # two seconds of both tones
    caller.command("b")  # hang up
    callee.wait_for("terminated")
    pbx.wait_log(r"event=call_ended .*caller=200 callee=201 reason=bye_from_caller")
    caller.stop()
    callee.stop()
    assert tones.tone_level_db(callee.heard(), 440) > -6
    assert tones.tone_level_db(caller.heard(), 1000) > -6
    assert tones.tone_level_db(callee.heard(), 1000) < -20  # its own tone does not come back
