"""Call slots: a media worker hosting several calls at once (issue 15).

The pure parts (which worker a call goes to, what a worker has free, how the RTP range is
cut for N calls a worker) and the pool against fake workers that take several calls, as
our own pjsua2 build allows (FAKE_BUILD_CALLS; the PyPI wheel's is 1)."""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

import pytest

from appliance.media import protocol as P
from appliance.media.pool import CallSlot, Worker, WorkerPool, WorkerState, pick_worker

from .test_pool import FAKE_WORKER, Recorder, run_pool, until

pytestmark = pytest.mark.timeout(30)


def running(capacity: int, held: int = 0, cooling: int = 0, wid: int = 1) -> Worker:
    async def make() -> Worker:
        worker = Worker(wid, wid, (10000, 10999), capacity)
        worker.life = WorkerState.IDLE
        worker.held = [CallSlot(f"w{wid}-{i}") for i in range(held)]
        worker.cooling = cooling
        return worker

    return asyncio.run(make())


def test_a_worker_counts_its_free_slots_and_says_its_state() -> None:
    w = running(4)
    assert (w.free, w.state) == (4, WorkerState.IDLE)
    w = running(4, held=3)
    assert (w.free, w.state, w.token) == (1, WorkerState.BUSY, "w1-0")
    w = running(4, held=0, cooling=2)
    assert (w.free, w.state) == (2, WorkerState.COOLING)
    w = running(4, held=3, cooling=1)
    assert w.free == 0
    w.draining = True  # recycle_after reached: no new call however many slots are free
    w.held.pop()
    assert w.free == 0
    one = running(1, held=1)
    assert (one.free, one.state) == (0, WorkerState.BUSY)  # today's one call per worker
    starting = running(4)
    starting.life = WorkerState.STARTING
    assert starting.free == 0 and starting.state is WorkerState.STARTING


def test_slot_for_a_token_and_for_none() -> None:
    w = running(4, held=2)
    assert w.slot_for("w1-1") is w.held[1]
    assert w.slot_for("nope") is None
    assert w.slot_for(None) is None  # two calls: None names neither
    w.held.pop()
    assert w.slot_for(None) is w.held[0]  # one call: None names it (release(worker))
    assert w.tokens == ["w1-0"]


def test_a_new_call_goes_to_the_busiest_worker_with_a_free_slot() -> None:
    a, b, c = running(4, held=1, wid=1), running(4, held=3, wid=2), running(4, held=4, wid=3)
    assert pick_worker([a, b, c]) is b  # packed: c is full, b is the busiest with room
    b.cooling = 1
    assert pick_worker([a, b, c]) is a  # b's last slot rests after a call
    idle1, idle2 = running(4, wid=4), running(4, wid=5)
    assert pick_worker([idle1, idle2]) is idle1  # a tie: the first (as with one call a worker)
    assert pick_worker([c]) is None
    assert pick_worker([]) is None


def test_a_burst_spreads_new_calls_over_the_busiest_workers_one_a_core() -> None:
    a, b, c = running(4, held=1, wid=1), running(4, held=3, wid=2), running(4, held=4, wid=3)
    assert pick_worker([a, b, c], spread=2) is a  # of the two busiest with room, the less held
    a.held += [CallSlot("x"), CallSlot("y")]
    assert pick_worker([a, b, c], spread=2) is a  # a tie: the first in the list
    idle1, idle2, idle3 = running(4, wid=4), running(4, wid=5), running(4, wid=6)
    workers = [idle1, idle2, idle3]
    taken = []
    for n in range(4):
        worker = pick_worker(workers, spread=2)
        assert worker is not None
        worker.held.append(CallSlot(f"c{n}"))
        taken.append(worker.id)
    assert taken == [4, 5, 4, 5]  # two workers share the burst, the third stays idle
    assert pick_worker([c], spread=2) is None


def test_port_slices_are_sized_by_calls_per_worker() -> None:
    # One call a worker: max_calls + 2 slices (today's cut).
    assert P.workers_needed(64, 1, 2) == 66
    assert P.split_port_range((10000, 10999), 66) == P.split_port_range((10000, 10999), 66, 1)
    # Sixteen: 4 workers + 2 spare, each slice with room for 16 calls' ports.
    assert P.workers_needed(64, 16, 2) == 6
    slices = P.split_port_range((10000, 10999), 6, 16)
    assert all(high - low + 1 >= 16 * P.PORTS_PER_CALL for low, high in slices)
    for (_, high), (low, _) in itertools.pairwise(slices):
        assert high < low
    with pytest.raises(ValueError, match="128 ports each"):
        P.split_port_range((10000, 10299), 6, 16)
    # The range decides: as many calls a worker as its slices hold, at most those asked.
    assert P.fit_calls((10000, 10999), 64, 16, 2) == 16
    # 600 ports for 64 calls: 13 + 2 slices of 40 ports hold 5 calls each, not 6.
    assert P.fit_calls((10000, 10599), 64, 16, 2) == 5
    low, high = 10000, 10599
    calls = P.fit_calls((low, high), 64, 16, 2)
    P.split_port_range((low, high), P.workers_needed(64, calls, 2), calls)  # fits
    with pytest.raises(ValueError):
        P.split_port_range((low, high), P.workers_needed(64, calls + 1, 2), calls + 1)
    assert P.fit_calls((10000, 10050), 8, 16, 2) == 1  # nothing fits: the caller says why


@pytest.fixture
def fake(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return [sys.executable, str(script)]


def test_calls_are_packed_and_released_per_token(fake: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_BUILD_CALLS", "4")

    async def body(pool: WorkerPool, rec: Recorder) -> None:
        assert pool.capacity == 4 and len(pool.workers) == 1  # probed, min_idle 1 = one worker
        got = [await pool.acquire(f"c{i}") for i in range(6)]
        first = got[0]
        assert first is not None and all(w is first for w in got[:4])  # packed into one
        assert got[4] is not None and got[4] is got[5] and got[4] is not first
        assert pool.busy_count == 6 and pool.worker_for("c2") is first and pool.worker_for("c5") is got[4]
        assert await pool.acquire("over") is None  # max_calls (6) calls in all: 503
        # A call that never reached its worker: only its slot comes back.
        pool.release(first, "c1")
        pool.release(first, "c1")  # idempotent
        pool.release(first, "nope")  # not its call: ignored
        assert [s.token for s in first.held] == ["c0", "c2", "c3"] and first.cooling == 1
        await until(lambda: first.cooling == 0)
        assert await pool.acquire("c6") is first
        # A call in progress released: told to end that call only (end), after END_GRACE.
        for token in ("c0", "c2"):
            first.send("fake_call", token=token)
        await until(lambda: first.slot_for("c2") is not None and first.slot_for("c2").in_call)  # type: ignore[union-attr]
        pool.release(first, "c2")
        await until(lambda: first.slot_for("c2") is None, timeout=3)
        ended = [e for w, e in rec.events if e["event"] == "call_ended"]
        assert [(e["token"], e["reason"]) for e in ended] == [("c2", "end_all")]
        assert first.slot_for("c0") is not None and first.slot_for("c0").in_call  # type: ignore[union-attr]
        # The worker's own call_ended frees a slot; max_calls counts calls, not workers.
        first.send("fake_end", token="c0")
        await until(lambda: first.slot_for("c0") is None)
        assert pool.busy_count == 4

    run_pool(fake, body, min_idle=1, max_calls=6, cooldown=0.2, calls_per_worker=0)


def test_a_shared_worker_dying_ends_its_calls_only(fake: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_BUILD_CALLS", "3")

    async def body(pool: WorkerPool, rec: Recorder) -> None:
        got = [await pool.acquire(f"k{i}") for i in range(5)]
        shared, other = got[0], got[3]
        assert shared is not None and other is not None and shared is not other
        for worker, tokens in ((shared, ("k0", "k1", "k2")), (other, ("k3", "k4"))):
            for token in tokens:
                worker.send("fake_call", token=token)
        await until(lambda: len(shared.held) == 3 and shared.in_call and other.in_call)
        shared.kill()  # kill -9
        await until(lambda: bool(rec.died))
        assert rec.died == [(shared, ["k0", "k1", "k2"])]
        assert other.state is WorkerState.BUSY and sorted(other.tokens) == ["k3", "k4"]
        assert pool.busy_count == 2 and pool.worker_for("k0") is None and pool.worker_for("k4") is other
        # Replaced: a new call finds room again (other's last slot first: packed).
        assert await pool.acquire("k5") is other
        nxt = await pool.acquire("k6")
        assert nxt is not None and nxt is not shared and nxt is not other

    run_pool(fake, body, min_idle=1, max_calls=9, calls_per_worker=0)


def test_the_build_and_the_setting_cap_the_calls_per_worker(fake: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The PyPI wheel (1 a process) gives today's pool whatever is asked; an explicit
    calls_per_worker caps what the build allows; 1 is today's isolation without a probe."""
    seen: dict[str, tuple[int, list[str]]] = {}

    async def record(name: str, pool: WorkerPool) -> None:
        await until(lambda: all(w.running for w in pool.workers))
        seen[name] = (pool.capacity, pool._argv(pool.workers[0]))

    for build, asked, name in (("1", 0, "pypi"), ("8", 2, "asked2"), ("8", 0, "auto"), ("8", 1, "one")):
        monkeypatch.setenv("FAKE_BUILD_CALLS", build)
        run_pool(fake, lambda pool, rec, n=name: record(n, pool), calls_per_worker=asked, max_calls=6)  # type: ignore[misc]
    assert seen["pypi"][0] == 1 and "--calls" not in seen["pypi"][1]
    assert seen["asked2"][0] == 2 and seen["asked2"][1][seen["asked2"][1].index("--calls") + 1] == "2"
    assert seen["auto"][0] == 6  # the build's 8, cut to max_calls
    assert seen["one"][0] == 1


def test_idle_workers_retire_while_packed_calls_go_on(fake: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_BUILD_CALLS", "2")

    async def body(pool: WorkerPool, rec: Recorder) -> None:
        got = [await pool.acquire(t) for t in ("a", "b", "c", "d", "e")]
        assert len({w.id for w in got if w}) == 3
        busy, spare, last = got[0], got[2], got[4]
        assert busy is not None and spare is not None and last is not None
        for token in ("c", "d"):
            pool.release(spare, token)
        await asyncio.sleep(0.1)
        pool.release(last, "e")
        # Idle beyond the warm target (one free slot for the recent rate): the oldest idle
        # worker retires, the busy one's calls go on, none of it is a death.
        await until(lambda: spare.state is WorkerState.DEAD, timeout=5)
        assert last.state is WorkerState.IDLE
        assert busy.state is WorkerState.BUSY and sorted(busy.tokens) == ["a", "b"] and not rec.died

    run_pool(fake, body, min_idle=0, max_calls=6, cooldown=0.0, health_interval=0.2, idle_retire_after=0.3,
             calls_per_worker=0)
