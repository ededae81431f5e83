"""A softphone in a child process driven on its console (stdin), its output collected,
and the fixture that starts such phones and stops each at teardown."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import TypeVar

from tests.support.output import OutputLines


class ConsoleProcess:
    """A child process typed at on stdin, whose stdout lines are collected in `output`."""

    quit_command = "q"

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.output = OutputLines(self.proc)

    def command(self, text: str) -> int:
        """Type a console line; returns the index of the next output line (for `wait_for`)."""
        start = len(self.output.lines)
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return start

    def stop(self) -> None:
        """Quit (its files are complete once it has exited); killed if it does not."""
        if self.proc.poll() is None:
            try:
                self.command(self.quit_command)
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc.wait()
        self.output.close()


P = TypeVar("P", bound=ConsoleProcess)


def started(cls: Callable[..., P]) -> Iterator[Callable[..., P]]:
    """Body of a fixture: start phones (arguments of `cls`); each is stopped at teardown."""
    phones: list[P] = []

    def start(*args: object, **kwargs: object) -> P:
        phone = cls(*args, **kwargs)
        phones.append(phone)
        return phone

    yield start
    for phone in phones:
        phone.stop()
