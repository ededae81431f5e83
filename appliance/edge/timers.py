"""One asyncio timer for many sans-I/O state machines.

Anything with `next_deadline()` is armed here; the earliest deadline sets a single
`loop.call_at`. Stale heap entries are harmless: an object is only fired when its own
`next_deadline()` says it is due.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol


class Timed(Protocol):
    def next_deadline(self) -> float | None: ...


class TimerWheel:
    def __init__(self, clock: Callable[[], float], fire: Callable[[Timed, float], None]) -> None:
        self._clock = clock
        self._fire = fire
        self._heap: list[tuple[float, int, Timed]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at: float | None = None

    def arm(self, obj: Timed) -> None:
        deadline = obj.next_deadline()
        if deadline is None:
            return
        heapq.heappush(self._heap, (deadline, next(self._seq), obj))
        if self._handle_at is None or deadline < self._handle_at:
            self._schedule(deadline)

    def _schedule(self, deadline: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        # The loop's clock is monotonic like ours; convert by offset to be safe.
        delay = max(0.0, deadline - self._clock())
        self._handle = loop.call_at(loop.time() + delay, self._run)
        self._handle_at = deadline

    def _run(self) -> None:
        self._handle = None
        self._handle_at = None
        now = self._clock()
        due: list[Timed] = []
        seen: set[int] = set()
        while self._heap and self._heap[0][0] <= now:
            _, _, obj = heapq.heappop(self._heap)
            if id(obj) not in seen:
                seen.add(id(obj))
                due.append(obj)
        for obj in due:
            deadline = obj.next_deadline()
            if deadline is not None and deadline <= now:
                self._fire(obj, now)
            deadline = obj.next_deadline()
            if deadline is not None:
                heapq.heappush(self._heap, (deadline, next(self._seq), obj))
        self._rearm()

    def _rearm(self) -> None:
        """Re-arm for the earliest entry of all, not for whichever object fired last.

        A method of its own on purpose: inside `_run`, mypy narrows `_handle_at` to None
        after the assignment at the top, although a fired callback may have armed a
        deadline since; mypyc compiled that narrowing into a check that raised
        `TypeError: None object expected; got float` whenever a ringing call ended.
        """
        if self._heap and (self._handle_at is None or self._heap[0][0] < self._handle_at):
            self._schedule(self._heap[0][0])

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._heap.clear()
