"""The one owner of time in the edge: every deadline is armed here.

Two kinds of things wait for time. Sans-I/O state machines (client transactions, forks)
say when they next need to run through `next_deadline()`, and are re-armed from what they
say after each firing. One-shot callbacks (`call_at`, `call_later`: a dialog's linger, the
coalesced state write) and repeating ones (`every`: housekeeping, the qualify round) are
`Deadline`s, the same shape. Stale heap entries are harmless: an object is only fired when
its own `next_deadline()` says it is due.

The wheel itself does no I/O: `run_due(now)` fires what is due at `now`, so a test drives
the whole edge with a fake clock (`manual=True`). In the daemon it keeps one `loop.call_at`
armed for the earliest deadline of all.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol

TIMER_SLACK = 0.002
"""After a run, the next is at least this much later: under load the heap's entries fall
due one after the other (stale ones too), and each used to wake the loop on its own.
SIP's shortest timer is T1 = 500 ms; 2 ms late changes nothing."""


class Timed(Protocol):
    def next_deadline(self) -> float | None: ...


Fire = Callable[[Timed, float], None]


class Deadline:
    """A callback at a time (once, or every `interval` seconds); `cancel()` and it never runs."""

    __slots__ = ("fn", "interval", "when")

    def __init__(self, when: float, fn: Callable[[float], None], interval: float = 0.0) -> None:
        self.when: float | None = when
        self.fn = fn
        self.interval = interval

    def next_deadline(self) -> float | None:
        return self.when

    def cancel(self) -> None:
        self.when = None

    def run(self, now: float) -> None:
        self.when = now + self.interval if self.interval > 0 else None
        self.fn(now)


def _run_deadline(obj: Timed, now: float) -> None:
    assert isinstance(obj, Deadline)
    obj.run(now)


class TimerWheel:
    def __init__(self, clock: Callable[[], float], fire: Fire | None = None, *, manual: bool = False) -> None:
        self._clock = clock
        self._default_fire = fire
        self._manual = manual
        self._heap: list[tuple[float, int, Timed, Fire]] = []
        # id(obj) -> the earliest time it has an entry in the heap: re-arming an object that
        # is already due as early adds nothing (a fork is re-armed after every message it
        # sees, and each entry used to stay in the heap, holding it, until its time came).
        self._armed: dict[int, float] = {}
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at: float | None = None
        self._running = False  # inside `_run`: what is armed meanwhile is scheduled once, after

    def now(self) -> float:
        return self._clock()

    def arm(self, obj: Timed, fire: Fire | None = None) -> None:
        """(Re-)arm a state machine for its `next_deadline()`; `fire(obj, now)` runs it then."""
        deadline = obj.next_deadline()
        if deadline is None:
            return
        armed = self._armed.get(id(obj))
        if armed is not None and armed <= deadline:
            return  # its entry fires first; then it is re-armed for what it says next
        action = fire or self._default_fire
        assert action is not None, "arm() needs a fire callback (none given to the wheel)"
        self._push(deadline, obj, action)
        if not self._manual and not self._running and (self._handle_at is None or deadline < self._handle_at):
            self._schedule(deadline)

    def _push(self, deadline: float, obj: Timed, fire: Fire) -> None:
        heapq.heappush(self._heap, (deadline, next(self._seq), obj, fire))
        self._armed[id(obj)] = deadline

    def call_at(self, when: float, fn: Callable[[float], None]) -> Deadline:
        """Run `fn(now)` once at `when` (our clock)."""
        deadline = Deadline(when, fn)
        self.arm(deadline, _run_deadline)
        return deadline

    def call_later(self, delay: float, fn: Callable[[float], None]) -> Deadline:
        return self.call_at(self._clock() + delay, fn)

    def every(self, interval: float, fn: Callable[[float], None], *, first: float | None = None) -> Deadline:
        """Run `fn(now)` every `interval` seconds (first at `first`, else one interval from now)."""
        deadline = Deadline(self._clock() + interval if first is None else first, fn, interval)
        self.arm(deadline, _run_deadline)
        return deadline

    def next_deadline(self) -> float | None:
        """The earliest armed time (possibly of a stale entry): for tests and drivers."""
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float) -> None:
        """Fire every object due at `now`, once each, and re-arm each for what it says next."""
        due: list[tuple[Timed, Fire]] = []
        seen: set[int] = set()
        heap = self._heap
        armed = self._armed
        while heap and heap[0][0] <= now:
            when, _, obj, fire = heapq.heappop(heap)
            key = id(obj)
            if armed.get(key) == when:
                del armed[key]  # no entry of it is left in the heap as early
            if key not in seen:
                seen.add(key)
                due.append((obj, fire))
        for obj, fire in due:
            deadline = obj.next_deadline()
            if deadline is not None and deadline <= now:
                fire(obj, now)
            deadline = obj.next_deadline()
            if deadline is not None:
                previous = self._armed.get(id(obj))  # not `armed`: a callback may compact the wheel
                if previous is None or deadline < previous:
                    self._push(deadline, obj, fire)

    def advance_to(self, now: float) -> None:
        """Manual mode (tests): fire everything due up to `now`, earliest first."""
        while self._heap and self._heap[0][0] <= now:
            self.run_due(self._heap[0][0])

    def compact(self) -> None:
        """After a burst: the tables again at the size of what is armed now (a dict and a
        list keep the room they grew to)."""
        self._armed = dict(self._armed)
        self._heap = list(self._heap)  # a copy of a heap is a heap

    # -- the asyncio driver ------------------------------------------------------------------
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
        self._running = True
        try:
            self.run_due(self._clock())
        finally:
            self._running = False
        self._rearm()

    def _rearm(self) -> None:
        """Re-arm for the earliest entry of all, not for whichever object fired last.

        A method of its own on purpose: inside `_run`, mypy narrows `_handle_at` to None
        after the assignment at the top, although a fired callback may have armed a
        deadline since; mypyc compiled that narrowing into a check that raised
        `TypeError: None object expected; got float` whenever a ringing call ended.
        """
        if self._heap and (self._handle_at is None or self._heap[0][0] < self._handle_at):
            self._schedule(max(self._heap[0][0], self._clock() + TIMER_SLACK))

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._handle_at = None
        self._heap.clear()
        self._armed.clear()
