"""Start the real homepbx daemon as a process on loopback ports, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from tests.support.output import OutputLines
from tests.support.ports import media_ports

REPO = Path(__file__).resolve().parents[2]


def user_block(number: str, password: str = "secret", **fields: object) -> str:
    lines = ["[[users]]", f'number = "{number}"', f'password = "{password}"']
    for key, value in fields.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


def write_config(
    directory: Path, port: int, users: Iterable[str], *, qualify_interval: int = 30,
    qualify_timeout: int = 2, min_expires: int = 60, extra: str = "", server_extra: str = "",
    listen: Iterable[str] | None = None,
) -> Path:
    """A daemon's config.toml in `directory`. Its media workers take RTP ports from this
    pytest-xdist worker's own range (tests/support/ports.py) unless `extra` names rtp_ports."""
    path = directory / "config.toml"
    listeners = ", ".join(f'"{a}"' for a in (listen or [f"127.0.0.1:{port}"]))
    rtp = f'rtp_ports = "{media_ports()}"\n'
    if "[media]\n" in extra:
        if "rtp_ports" not in extra:
            extra = extra.replace("[media]\n", "[media]\n" + rtp, 1)
    else:
        extra = "[media]\n" + rtp + "\n" + extra
    path.write_text(
        "# test config\n"
        "[server]\n"
        f"listen = [{listeners}]\n"
        'realm = "home.arpa"\n'
        'state_dir = "state"\n'
        + server_extra
        + "\n"
        "[registration]\n"
        f"min_expires = {min_expires}\n"
        f"qualify_interval = {qualify_interval}\n"
        f"qualify_timeout = {qualify_timeout}\n\n"
        + extra
        + "\n".join(users)
    )
    return path


class Daemon:
    """`homepbx run` in a child process; its log is collected for assertions."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.output: OutputLines | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.allowed_errors: list[str] = []
        """Regexes of ERROR lines the test provokes on purpose (`allow_errors`)."""

    @property
    def lines(self) -> list[str]:
        """The log so far (empty before `start`)."""
        return self.output.lines if self.output is not None else []

    @property
    def registrar(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0, env: dict[str, str] | None = None) -> Daemon:
        """`env`: variables for the daemon alone (its media workers inherit them)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", HOMEPBX_LOG_LEVEL="DEBUG", **(env or {}))
        # Without [control] socket the socket goes to the state dir, never to one shared by
        # every daemon of the suite ($RUNTIME_DIRECTORY or $XDG_RUNTIME_DIR/homepbx).
        env.pop("RUNTIME_DIRECTORY", None)
        env.pop("XDG_RUNTIME_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "--config", str(self.config)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output = OutputLines(self.proc)
        self.wait_log("event=ready", timeout=timeout)
        return self

    def wait_log(self, pattern: str, timeout: float = 5.0, start: int = 0) -> str:
        """The first log line (from index `start`) matching the regex `pattern`."""
        assert self.output is not None, "the daemon was not started"
        return self.output.wait_for(pattern, timeout, start)

    def log_matches(self, pattern: str) -> list[str]:
        return self.output.matches(pattern) if self.output is not None else []

    def allow_errors(self, *patterns: str) -> None:
        """ERROR lines matching these regexes are what the test provokes, not a fault."""
        self.allowed_errors.extend(patterns)

    def unexpected_errors(self) -> list[str]:
        """ERROR/CRITICAL lines and tracebacks in the log that no `allow_errors` pattern covers."""
        bad = [line for line in self.lines
               if (" ERROR " in line or " CRITICAL " in line or "Traceback (most recent call last)" in line)
               and not any(re.search(p, line) for p in self.allowed_errors)]
        return bad

    def assert_clean_log(self) -> None:
        """A daemon that logged an unexpected ERROR or traceback fails the test that caused it."""
        bad = self.unexpected_errors()
        if bad:
            at = self.lines.index(bad[0])
            raise AssertionError("the daemon logged unexpected errors:\n" + "\n".join(self.lines[at:at + 40]))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGUSR1)  # stack dump into the log, then kill
                time.sleep(0.5)
                self.proc.kill()
                self.proc.wait()
        if self.output is not None:
            self.output.close()  # every line read before the log is judged
        self.assert_clean_log()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.assert_clean_log()
