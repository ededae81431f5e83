"""TimerWheel: one asyncio timer drives many state machines, earliest deadline first."""

from __future__ import annotations

import asyncio
import time

from appliance.edge.timers import TimerWheel


class Machine:
    def __init__(self, deadlines: list[float]) -> None:
        self.deadlines = deadlines
        self.fired: list[float] = []

    def next_deadline(self) -> float | None:
        return self.deadlines[0] if self.deadlines else None


def test_a_later_rearm_never_hides_an_earlier_deadline() -> None:
    async def main() -> tuple[Machine, Machine]:
        start = time.monotonic()
        # `fast` fires soon and then wants a late deadline; `slow` waits in between.
        fast = Machine([start + 0.02, start + 5.0])
        slow = Machine([start + 0.1])

        def fire(obj: object, now: float) -> None:
            assert isinstance(obj, Machine)
            obj.fired.append(now - start)
            obj.deadlines.pop(0)

        wheel = TimerWheel(time.monotonic, fire)
        wheel.arm(slow)
        wheel.arm(fast)
        await asyncio.sleep(0.3)
        wheel.cancel()
        return fast, slow

    fast, slow = asyncio.run(main())
    assert len(fast.fired) == 1 and fast.fired[0] < 0.1
    assert len(slow.fired) == 1 and 0.09 < slow.fired[0] < 0.25


def test_a_callback_that_arms_while_firing_is_kept() -> None:
    """A fired object arms another (a fork ending starts a CANCEL's transaction): the wheel
    must keep both deadlines (the compiled build once raised TypeError here)."""
    errors: list[object] = []

    async def main() -> tuple[Machine, Machine]:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
        start = time.monotonic()
        first = Machine([start + 0.01])
        second = Machine([start + 0.05, start + 0.08])
        wheel: TimerWheel

        def fire(obj: object, now: float) -> None:
            assert isinstance(obj, Machine)
            obj.fired.append(now - start)
            obj.deadlines.pop(0)
            if obj is first:
                wheel.arm(second)

        wheel = TimerWheel(time.monotonic, fire)
        wheel.arm(first)
        await asyncio.sleep(0.3)
        wheel.cancel()
        return first, second

    first, second = asyncio.run(main())
    assert errors == []
    assert len(first.fired) == 1
    assert len(second.fired) == 2 and second.fired[0] < second.fired[1] < 0.25


def test_rearming_for_a_deadline_already_armed_adds_no_entry_and_still_fires_each_deadline() -> None:
    """A fork is re-armed after every message it sees; each re-arm used to leave an entry
    (holding the fork) in the heap until its time: 20 entries per finished call."""
    now = [0.0]
    fired: list[float] = []
    machine = Machine([32.0, 40.0])

    def fire(obj: object, at: float) -> None:
        fired.append(at)
        machine.deadlines.pop(0)

    wheel = TimerWheel(lambda: now[0], fire, manual=True)
    for _ in range(10):
        wheel.arm(machine)
    assert len(wheel._heap) == 1
    machine.deadlines.insert(0, 5.0)  # an earlier deadline is armed at once
    wheel.arm(machine)
    assert len(wheel._heap) == 2
    wheel.advance_to(100.0)
    assert fired == [5.0, 32.0, 40.0]
    assert not wheel._heap and not wheel._armed


def test_a_callback_that_compacts_the_wheel_keeps_every_timer_running() -> None:
    """The daemon's housekeeping (itself a timer) compacts the wheel after a burst."""
    now = [0.0]
    wheel = TimerWheel(lambda: now[0], manual=True)
    ticks: list[float] = []
    other: list[float] = []

    def housekeep(at: float) -> None:
        ticks.append(at)
        wheel.compact()

    wheel.every(1.0, housekeep)
    wheel.call_at(2.5, other.append)
    wheel.advance_to(5.0)
    assert ticks == [1.0, 2.0, 3.0, 4.0, 5.0] and other == [2.5]
