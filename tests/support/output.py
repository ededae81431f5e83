"""What a child process prints, line by line, collected by a thread: wait for a line."""

from __future__ import annotations

import re
import subprocess
import threading
import time


class OutputLines:
    """Lines of `proc`'s stdout (text mode) as they come; `wait_for` blocks until one matches."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 5.0, start: int = 0) -> str:
        """The first line (from index `start`) matching the regex `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self.lines[-30:])
                    raise TimeoutError(f"no line matching {pattern!r}; last lines:\n{tail}")
                self._cond.wait(min(left, 0.2))

    def close(self, timeout: float = 2.0) -> None:
        """Wait (a little) for the last lines of a process that has exited."""
        self._reader.join(timeout)

    def matches(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        with self._cond:
            return [line for line in self.lines if rx.search(line)]
