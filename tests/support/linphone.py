"""linphone (Debian's linphone-cli: `linphonec`) as a softphone in a child process, and its fixture.

Each instance has a HOME of its own (config, call database), SIP on a loopback port of its
own (UDP, or TCP), RTP in a private port range, and no sound card: `soundcard use files`
makes it send a WAV file as its microphone (`play`) and write what it hears to another
(`record`). Its console is driven on stdin; it prints one line per call event
("Call 1 with sip:201@127.0.0.1 connected.").

linphonec exits its start-up silently, without ever opening a socket, if it cannot create
its call database: `~/.local/share/linphone/` must exist.
"""

from __future__ import annotations

import math
import shutil
import time
import wave
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.console import ConsoleProcess, started
from tests.support.pbx import Daemon
from tests.support.ports import free_port

RATE = 8000


def write_tone(path: Path, freq: float, seconds: float = 30.0, amplitude: float = 0.4) -> Path:
    """A 16-bit mono 8 kHz WAV of one sine, for a phone to send as its microphone."""
    samples = array("h", (int(amplitude * 32767 * math.sin(2 * math.pi * freq * i / RATE))
                          for i in range(int(seconds * RATE))))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(samples.tobytes())
    return path


class Linphone(ConsoleProcess):
    """One linphonec process, registered as `number`, sending a `tone_hz` sine."""

    quit_command = "quit"

    def __init__(self, home: Path, pbx: Daemon, number: str, password: str, tone_hz: int,
                 rtp_ports: str, *, transport: str = "udp") -> None:
        if not shutil.which("linphonec"):
            pytest.skip("linphonec is not installed (`make test` installs Debian's linphone-cli)")
        self.home = home
        (home / ".local/share/linphone").mkdir(parents=True)
        self.sip_port = free_port()
        udp, tcp = (self.sip_port, 0) if transport == "udp" else (0, self.sip_port)
        self.config = home / "linphonerc"
        self.config.write_text(
            f"[sip]\nsip_port={udp}\nsip_tcp_port={tcp}\nsip_tls_port=0\n"
            f"[rtp]\naudio_rtp_port={rtp_ports}\n"
            "[video]\ncapture=0\ndisplay=0\n"
        )
        self.recording = home / "heard.wav"
        self.log = home / "linphonec.log"  # every SIP message, for a failing test
        super().__init__(["linphonec", "-c", str(self.config), "-d", "6", "-l", str(self.log)],
                         env={"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        self.command("soundcard use files")
        self.command(f"play {write_tone(home / f'tone-{tone_hz}.wav', tone_hz)}")
        self.command(f"record {self.recording}")
        proxy = f"sip:127.0.0.1:{pbx.port}" + (";transport=tcp" if transport == "tcp" else "")
        self.command(f"register sip:{number}@127.0.0.1 {proxy} {password}")

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first console line (from index `start`) matching the regex `pattern`."""
        return self.output.wait_for(pattern, timeout, start)

    def wait_registered(self, timeout: float = 10.0) -> None:
        """Ask until linphonec says it is registered (it prints nothing by itself)."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.command("status register")
            if self.wait_for(r"^registered", 5.0, at).startswith("registered,"):  # not "registered=-1"
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"linphonec did not register; its log: {self.log}")
            time.sleep(0.3)

    def sip_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def linphone() -> Iterator[Callable[..., Linphone]]:
    """Start linphonec instances (arguments of `Linphone`); each is stopped at teardown."""
    yield from started(Linphone)
