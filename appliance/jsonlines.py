"""JSON-lines stdout for the pjsua2 child processes (media workers, simulated handsets).

Their parent reads one JSON event per line on stdout, but native code (pjlib's banner,
stray prints) also writes to fd 1. `private_stdout()` keeps a private copy of fd 1 for
JSON and points fd 1 and `sys.stdout` at stderr, so nothing else can corrupt the stream.
`EventReader` is the parent's side.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, TextIO


class Emitter:
    """JSON events on the private stdout descriptor, one per line (thread-safe).

    A batched emitter holds what its owning thread emits until :meth:`flush` (a media
    worker flushes once per pass of its loop): the few events of a pass go out in one
    write, and its parent wakes once for them.  Other threads' events go out at once."""

    def __init__(self, stream: TextIO, *, batched: bool = False) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._owner = threading.get_ident() if batched else None
        self._held: list[str] = []

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, default=str)
        if self._owner is not None and threading.get_ident() == self._owner:
            self._held.append(line)
        else:
            self._write(line + "\n")

    def flush(self) -> None:
        """Write what the owning thread held back (a no-op when nothing is)."""
        if self._held:
            text = "\n".join(self._held) + "\n"
            self._held.clear()
            self._write(text)

    def _write(self, text: str) -> None:
        with self._lock:
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # parent gone: stdin EOF ends us shortly


def private_stdout(*, batched: bool = False) -> Emitter:
    """Keep fd 1 for JSON only; anything else printed goes to stderr."""
    json_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return Emitter(os.fdopen(json_fd, "w", encoding="utf-8", buffering=1), batched=batched)


Event = dict[str, Any]
RECENT = 25  # events quoted when a wait fails


class StreamEnded(Exception):
    """The child's stdout closed while an event was awaited (the child is gone)."""


def matches(event: Mapping[str, Any], kind: str | None, match: Mapping[str, object]) -> bool:
    """`event` is of `kind` (None: any) and each field equals, or satisfies, `match`."""
    if kind is not None and event.get("event") != kind:
        return False
    for key, want in match.items():
        have = event.get(key)
        if callable(want):
            if not want(have):
                return False
        elif have != want:
            return False
    return True


class EventReader:
    """The parent's side: a thread reads a child's JSON events; waits take the next
    matching one (others stay queued for other waits), and every event stays listed."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.events: list[Event] = []
        self._pending: list[Event] = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._read, args=(stream,), name=name, daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the reading thread (it ends when the child's stdout closes)."""
        self._thread.join(timeout)

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError
            except ValueError:
                event = {"event": "garbage", "line": line}
            event["t"] = time.monotonic()
            with self._cond:
                self.events.append(event)
                self._pending.append(event)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def take(self, pred: Callable[[Event], bool], timeout: float, what: str) -> Event:
        """Next queued event satisfying `pred`; TimeoutError (quoting the recent events) or
        StreamEnded when none comes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, event in enumerate(self._pending):
                    if pred(event):
                        del self._pending[i]
                        return event
                if self._eof:
                    raise StreamEnded(f"output ended while waiting for {what}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {what} within {timeout:.1f}s; recent events:\n  " + self._recent_locked())
                self._cond.wait(remaining)

    def wait_for(self, kind: str, timeout: float = 5.0, **match: object) -> Event:
        """Next not-yet-consumed event of `kind` whose fields match."""
        return self.take(lambda e: matches(e, kind, match), timeout, kind + (f" {match}" if match else ""))

    def events_of(self, kind: str, **match: object) -> list[Event]:
        """All events of that kind seen so far (consumed or not)."""
        with self._cond:
            return [e for e in self.events if matches(e, kind, match)]

    def drain(self) -> list[Event]:
        """Drop and return every queued (unconsumed) event."""
        with self._cond:
            pending, self._pending = self._pending, []
        return pending

    def recent(self) -> str:
        with self._cond:
            return self._recent_locked()

    def _recent_locked(self) -> str:
        return "\n  ".join(
            json.dumps({k: v for k, v in e.items() if k != "t"})[:400] for e in self.events[-RECENT:]
        )
