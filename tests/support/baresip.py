"""baresip (Debian's baresip-core) as a softphone in a child process, and its fixture.

Each phone sends a sine (ausine) and dumps what it decodes to a WAV file (sndfile), which
is measured with the same Goertzel code as the pjsua2 handsets. Its console is driven on
stdin (`d 201` dials, `b` hangs up, `/hold` and `/resume` during a call, `q` quits); a key
typed alone during a call (`keys`) is a DTMF digit, sent as RFC 4733 events, and the events
it receives are printed (`received event: '5' (end=1)`, `received_dtmf`).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.console import ConsoleProcess, started
from tests.support.pbx import Daemon
from tests.support.ports import free_port


class Baresip(ConsoleProcess):
    """One baresip process: its config directory, its console on stdin, its output collected.
    With `codec` (baresip's name, e.g. "G722/16000/1") it offers that codec only."""

    def __init__(self, workdir: Path, pbx: Daemon, number: str, password: str, tone_hz: int,
                 rtp_ports: str, *, auto_answer: bool = False, transport: str = "udp",
                 codec: str | None = None, registrar: str | None = None, watch: tuple[str, ...] = (),
                 mwi: bool = False) -> None:
        """`registrar` (host:port): register there instead of at `pbx` (an outside phone at the provider);
        `watch`: numbers whose presence it subscribes to (its contact and presence modules);
        `mwi`: subscribe to its own message-summary (the mwi module; each NOTIFY body is printed)."""
        if not shutil.which("baresip"):
            pytest.skip("baresip is not installed (`make test` installs Debian's baresip-core)")
        self.dumps = workdir / "dump"
        self.dumps.mkdir(parents=True)
        (workdir / "config").write_text(
            f"sip_listen 127.0.0.1:{free_port()}\n"
            f"rtp_ports {rtp_ports}\n"
            "module_path /usr/lib/baresip/modules\n"
            "module g711.so\n" + ("module g722.so\n" if codec else "")
            + "module ausine.so\nmodule sndfile.so\nmodule stdio.so\n"
            "module_app account.so\nmodule_app menu.so\n"
            + ("module_app contact.so\nmodule_app presence.so\n" if watch else "")
            + ("module_app mwi.so\n" if mwi else "")
            + f"audio_source ausine,{tone_hz}\n"
            # ausine makes 48 kHz stereo only; baresip resamples to G.711.
            "ausrc_srate 48000\nausrc_channels 2\n"
            f"snd_path {self.dumps}\n"
        )
        params = f";transport={transport}" if transport != "udp" else ""
        codecs = f";audio_codecs={codec}" if codec else ""
        answer = ";answermode=auto" if auto_answer else ""
        (workdir / "accounts").write_text(
            f"<sip:{number}@{registrar or f'127.0.0.1:{pbx.port}'}{params}>;auth_pass={password};regint=300"
            f"{codecs}{answer}\n"
        )
        (workdir / "contacts").write_text("".join(
            f'"{n}" <sip:{n}@127.0.0.1:{pbx.port}>;presence=p2p\n' for n in watch))
        super().__init__(["baresip", "-f", str(workdir)])

    def wait_for(self, text: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first output line (from index `start`) containing `text`."""
        return self.output.wait_for(re.escape(text), timeout, start)

    def keys(self, digits: str, gap: float = 0.3) -> None:
        """Type `digits` one key at a time, no Enter: during a call each is a DTMF digit
        (baresip ends the event when it sees no key for a moment, hence the gap)."""
        assert self.proc.stdin is not None
        for key in digits:
            self.proc.stdin.write(key)
            self.proc.stdin.flush()
            time.sleep(gap)

    def received_dtmf(self, count: int, timeout: float = 10.0, start: int = 0) -> list[str]:
        """The DTMF digits received (RFC 4733 events that ended) from output line `start` on,
        once `count` of them have come or `timeout` has passed."""
        ended = re.compile(r"^received event: '(.)' \(end=1\)")
        deadline = time.monotonic() + timeout
        while True:
            digits = [m.group(1) for line in self.output.lines[start:] if (m := ended.match(line))]
            if len(digits) >= count or time.monotonic() > deadline:
                return digits
            time.sleep(0.1)

    def heard(self) -> Path:
        """The WAV of what this phone decoded during its call."""
        (dump,) = self.dumps.glob("*-dec.wav")
        return dump


@pytest.fixture
def baresip() -> Iterator[Callable[..., Baresip]]:
    """Start baresip phones (arguments of `Baresip`); each is stopped at teardown."""
    yield from started(Baresip)
