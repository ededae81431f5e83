"""WorkerPool logic against a fake worker: a tiny script that speaks the JSON-lines
protocol without pjsua2, so spawning, exhaustion, crashes, hangs, recycling and stop are
tested in a second, not in a call.  The real worker is covered in tests/e2e."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.media import protocol as P
from appliance.media.pool import Worker, WorkerPool, WorkerState, arrival_rate, warm_target

pytestmark = pytest.mark.timeout(30)

FAKE_WORKER = r'''
import json, os, sys
args = sys.argv[1:]
def emit(**ev):
    sys.stdout.write(json.dumps(ev) + "\n"); sys.stdout.flush()
built = int(os.environ.get("FAKE_BUILD_CALLS", "1"))  # calls per process "the build" holds
if os.environ.get("FAKE_NO_ENGINE"):  # what worker.py says when pjsua2 does not import
    emit(event="unavailable", error="libpjsua2.so.2: cannot open shared object file"); os._exit(3)
if args[:1] == ["--probe-calls"]:
    emit(event="capacity", calls=min(built, int(args[1]))); sys.exit(0)
rtp = args[args.index("--rtp-ports") + 1]
wanted = int(args[args.index("--calls") + 1]) if "--calls" in args else 1
if os.environ.get("FAKE_CRASH_AT_START"):
    sys.exit(3)
if os.path.exists(os.environ.get("FAKE_DELAY_FLAG", "/nonexistent")):
    import time; time.sleep(float(os.environ["FAKE_START_DELAY"]))
emit(event="ready", sip_port=40000 + os.getpid() % 1000, pid=os.getpid(), rtp_ports=rtp, calls=min(wanted, built))
tokens, hang = [], False
for line in sys.stdin:
    cmd = json.loads(line)
    name = cmd["cmd"]
    if name == "ping" and not hang:
        emit(event="pong", seq=cmd["seq"], busy=bool(tokens), active=len(tokens))
    elif name == "fake_call":
        tokens.append(cmd["token"]); emit(event="call_started", token=cmd["token"])
    elif name in ("fake_end", "end") and cmd.get("token") in tokens:
        tokens.remove(cmd["token"])
        emit(event="call_ended", token=cmd["token"], reason="end_all" if name == "end" else "caller_hangup")
    elif name == "end_all":
        for token in tokens:
            emit(event="call_ended", token=token, reason="end_all")
        tokens = []
    elif name == "hang":
        hang = True
    elif name == "crash":
        os._exit(7)
    elif name == "quit":
        break
emit(event="bye", reason="quit")
'''


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Worker, dict[str, Any]]] = []
        self.died: list[tuple[Worker, list[str]]] = []

    def on_event(self, worker: Worker, event: dict[str, Any]) -> None:
        self.events.append((worker, event))

    def worker_died(self, worker: Worker, tokens: list[str]) -> None:
        self.died.append((worker, tokens))


@pytest.fixture
def fake(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return [sys.executable, str(script)]


def state(worker: Worker) -> WorkerState:
    """Read afresh (mypy would otherwise keep an earlier narrowing)."""
    return worker.state


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def run_pool(fake: list[str], body: Callable[[WorkerPool, Recorder], Awaitable[None]], **kw: Any) -> Recorder:
    """Start a pool of fake workers, run `body`, always stop it and check no process is left."""
    rec = Recorder()

    async def main() -> None:
        pool = WorkerPool(
            rtp_ports=kw.pop("rtp_ports", "10000-10999"), edge_address=("127.0.0.1", 5060),
            on_event=rec.on_event, worker_died=rec.worker_died, worker_command=fake, **kw,
        )  # fmt: skip
        pids: set[int] = set()
        try:
            await pool.start()
            await body(pool, rec)
        finally:
            pids = {w.pid for w in pool.workers if w.pid}
            await pool.stop()
        assert not pool.workers or all(w.state is WorkerState.DEAD for w in pool.workers)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)

    asyncio.run(main())
    return rec


def test_acquire_until_exhausted_then_calls_end_and_release(fake: list[str]) -> None:
    async def body(pool: WorkerPool, rec: Recorder) -> None:
        assert pool.idle_count == 2
        first = await pool.acquire("t1")
        second = await pool.acquire("t2")
        third = await pool.acquire("t3")  # no idle one left: spawned on demand
        assert first and second and third and len({first.pid, second.pid, third.pid}) == 3
        assert await pool.acquire("t4") is None  # max_calls busy: the edge answers 503
        assert pool.busy_count == 3 and pool.idle_count == 0
        assert pool.worker_for("t2") is second
        # The worker reports its call's end: back to idle without the edge's help.
        first.send("fake_call", token="t1")
        first.send("fake_end", token="t1")
        await until(lambda: first.state is WorkerState.COOLING)  # pjlib frees sockets late
        # A slot is free: the next call waits for the resting worker instead of a 503.
        assert await pool.acquire("t4") is first and first.token == "t4"
        assert [e["event"] for w, e in rec.events if w is first] == ["call_started", "call_ended"]
        pool.release(first, "t4")
        await until(lambda: first.state is WorkerState.IDLE)
        # A release naming another call is ignored; a plain one frees the worker.
        pool.release(second, "t-other")
        assert state(second) is WorkerState.BUSY
        pool.release(second, "t2")
        pool.release(second, "t2")  # idempotent
        assert state(second) is WorkerState.COOLING
        # Releasing a worker in a call ends the call first.
        third.send("fake_call", token="t3")
        await until(lambda: third.in_call)
        pool.release(third)
        await asyncio.sleep(0.2)  # first it may end the call itself (the BYE on its way to it)
        assert third.in_call and state(third) is WorkerState.BUSY
        await until(lambda: third.state is WorkerState.IDLE)
        assert rec.events[-1][1]["reason"] == "end_all"

    run_pool(fake, body, min_idle=2, max_calls=3, cooldown=0.3)


def test_workers_get_disjoint_rtp_ranges(fake: list[str]) -> None:
    async def body(pool: WorkerPool, rec: Recorder) -> None:
        busy = [await pool.acquire(f"t{i}") for i in range(4)]
        ranges = sorted(w.rtp_ports for w in busy if w is not None)
        assert len(ranges) == 4
        for (_, high), (low, _) in itertools.pairwise(ranges):
            assert high < low
        assert all(low % 2 == 0 and (high - low + 1) >= P.MIN_PORTS_PER_WORKER for low, high in ranges)

    run_pool(fake, body, min_idle=1, max_calls=4, rtp_ports="10001-10120")
    with pytest.raises(ValueError, match="too small"):
        WorkerPool(max_calls=8, rtp_ports="10000-10050")


def test_crash_of_a_busy_worker_is_reported_and_replaced(fake: list[str]) -> None:
    async def body(pool: WorkerPool, rec: Recorder) -> None:
        worker = await pool.acquire("t-crash")
        assert worker is not None
        worker.send("fake_call", token="t-crash")
        await until(lambda: worker.in_call)
        worker.send("crash")
        await until(lambda: bool(rec.died))
        assert rec.died == [(worker, ["t-crash"])]
        assert worker.returncode == 7 and worker.state is WorkerState.DEAD
        await until(lambda: pool.idle_count == 1)
        # An idle worker dying is replaced too (reported with no tokens).
        idle = next(w for w in pool.workers if w.state is WorkerState.IDLE)
        idle.kill()
        await until(lambda: len(rec.died) == 2)
        assert rec.died[1] == (idle, [])
        await until(lambda: pool.idle_count == 1, timeout=8)

    run_pool(fake, body, min_idle=1, max_calls=2)


def test_unresponsive_worker_is_killed_and_replaced(fake: list[str]) -> None:
    async def body(pool: WorkerPool, rec: Recorder) -> None:
        worker = await pool.acquire("t-hang")
        assert worker is not None
        await asyncio.sleep(0.5)
        assert worker.last_pong > 0  # pings answered so far
        worker.send("hang")
        await until(lambda: bool(rec.died), timeout=3)
        assert rec.died == [(worker, ["t-hang"])]
        assert worker.exit_reason.startswith("no pong")
        await until(lambda: pool.idle_count == 1)

    run_pool(fake, body, min_idle=1, max_calls=2, health_interval=0.2)


def test_workers_are_recycled_after_n_calls(fake: list[str]) -> None:
    async def body(pool: WorkerPool, rec: Recorder) -> None:
        first = await pool.acquire("a")
        assert first is not None
        for token in ("a", "b"):
            if token != "a":
                again = await pool.acquire(token)
                assert again is first
            first.send("fake_call", token=token)
            first.send("fake_end", token=token)
            await until(lambda: first.state is not WorkerState.BUSY)
        await until(lambda: first.state is WorkerState.DEAD)
        assert not rec.died  # a planned exit is not a death
        await until(lambda: pool.idle_count == 1)
        assert (await pool.acquire("c")) is not first

    run_pool(fake, body, min_idle=1, max_calls=2, recycle_after=2, cooldown=0.0)


def test_idle_workers_beyond_min_idle_retire(fake: list[str]) -> None:
    async def body(pool: WorkerPool, rec: Recorder) -> None:
        burst = [await pool.acquire(t) for t in ("a", "b", "c")]
        assert all(burst) and pool.busy_count == 3
        for worker, token in zip(burst, ("a", "b", "c"), strict=True):
            assert worker is not None
            worker.send("fake_call", token=token)
            worker.send("fake_end", token=token)
        await until(lambda: pool.idle_count == 3)
        # After the idle time, only min_idle stay warm; none of it counts as a death.
        await until(lambda: pool.idle_count == 1 and len(pool.workers) == 1, timeout=5.0)
        assert not rec.died

    run_pool(fake, body, min_idle=1, max_calls=3, cooldown=0.0, health_interval=0.2, idle_retire_after=0.5)


def test_crash_loop_backs_off_and_stop_refuses_new_calls(fake: list[str], monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("FAKE_CRASH_AT_START", "1")
    async def body(pool: WorkerPool, rec: Recorder) -> None:
        assert await pool.acquire("x") is None  # waited acquire_timeout for a worker, then 503
        await asyncio.sleep(1.0)
        assert pool.spawned <= 4  # backed off, not a fork loop

    with caplog.at_level(logging.DEBUG, logger="homepbx.media"):
        run_pool(fake, body, min_idle=1, max_calls=2, acquire_timeout=0.5)
    failures = [r for r in caplog.records if "media_worker_start_failed" in r.getMessage()]
    assert len(failures) >= 2 and [r.levelno for r in failures].count(logging.WARNING) == 1  # reported once

    async def stopped() -> None:
        pool = WorkerPool(worker_command=fake, rtp_ports="10000-10999")
        await pool.stop()
        assert await pool.acquire("late") is None

    monkeypatch.delenv("FAKE_CRASH_AT_START")
    asyncio.run(stopped())


@pytest.mark.parametrize("calls_per_worker", [1, 0])  # exec'd worker says it / the capacity probe says it
def test_an_engine_that_does_not_load_is_said_once_and_not_retried(
        fake: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        calls_per_worker: int) -> None:
    monkeypatch.setenv("FAKE_NO_ENGINE", "1")
    monkeypatch.setenv("FAKE_BUILD_CALLS", "4")

    async def body(pool: WorkerPool, rec: Recorder) -> None:
        await until(lambda: pool.unavailable is not None)
        started = time.monotonic()
        assert await pool.acquire("x") is None
        assert time.monotonic() - started < 0.1  # answered at once, not after acquire_timeout
        await asyncio.sleep(1.5)  # a retry loop would spawn (and log) again meanwhile
        assert not pool.workers

    with caplog.at_level(logging.DEBUG, logger="homepbx.media"):
        run_pool(fake, body, min_idle=1, max_calls=4, calls_per_worker=calls_per_worker, acquire_timeout=2.0)
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split()[0] for r in said] == ["event=media_engine_unavailable"]
    assert "cannot open shared object file" in said[0].getMessage()


def test_warm_target_covers_the_arrivals_while_workers_start() -> None:
    # Quiet: min_idle.  A trickle still rounds up to a worker ahead.
    assert warm_target(0.0, 0.2, 1, 64) == 1
    assert warm_target(0.5, 0.2, 0, 64) == 1
    # 100 calls/s while a start takes 0.15 s: 15 arrive per start, twice over.
    assert warm_target(100.0, 0.15, 1, 64) == 30
    # Never beyond the room left under max_calls, never negative.
    assert warm_target(1000.0, 0.3, 1, 10) == 10
    assert warm_target(50.0, 0.2, 2, 0) == 0
    assert warm_target(50.0, 0.2, 2, -3) == 0


def test_arrival_rate_sees_a_burst_at_once_and_keeps_a_trickle() -> None:
    assert arrival_rate([], 100.0) == 0.0
    burst = [99.8 + i * 0.01 for i in range(20)]  # 20 calls in the last fifth of a second
    assert arrival_rate(burst, 100.0) == 80.0  # the quarter second holds them all
    assert arrival_rate(burst, 100.5) == 20.0  # half a second later: the last second's
    family = [99.9 + i * 0.01 for i in range(8)]  # a few calls at once are not a burst
    assert arrival_rate(family, 100.0) == 8.0
    trickle = [91.0, 93.0, 95.0, 97.0, 99.0]  # one every two seconds
    assert arrival_rate(trickle, 100.0) == 1.0  # the last second holds one: max(1/1, 5/10)
    assert arrival_rate(trickle, 100.5) == 0.5  # none in the last second: the 10-s window
    assert arrival_rate(trickle, 200.0) == 0.0


def test_new_calls_spread_over_one_worker_a_core_only_under_a_burst() -> None:
    async def spread() -> tuple[int, int]:
        pool = WorkerPool(rtp_ports="10000-10999")
        pool.cores = 2
        quiet = pool.spread()  # a household's calls: packed, so idle workers retire
        now = time.monotonic()
        pool._arrivals.extend(now - 0.5 + i * 0.02 for i in range(20))  # 20 calls in the last second
        return quiet, pool.spread()

    assert asyncio.run(spread()) == (1, 2)


def test_a_burst_waits_for_workers_instead_of_being_refused(fake: list[str]) -> None:
    """Twelve calls at once with one warm worker: each waits for a worker to start (at
    most max_starting at once), none is refused; a thirteenth beyond max_calls is."""
    most_starting = [0]

    async def watch(pool: WorkerPool) -> None:
        while True:  # a start takes tens of ms: a look every 2 ms sees each one
            most_starting[0] = max(most_starting[0], pool.stats()["starting"])
            await asyncio.sleep(0.002)

    async def body(pool: WorkerPool, rec: Recorder) -> None:
        watcher = asyncio.get_running_loop().create_task(watch(pool))
        got = await asyncio.gather(*(pool.acquire(f"b{i}") for i in range(12)))
        watcher.cancel()
        assert all(got) and len({w.pid for w in got if w}) == 12
        t0 = time.monotonic()
        assert await pool.acquire("over") is None  # max_calls in progress: 503 after a short grace
        assert time.monotonic() - t0 < 1.5
        assert 2 <= most_starting[0] <= 3

    run_pool(fake, body, min_idle=1, max_calls=12, max_starting=3)


def test_a_cancelled_wait_gives_its_worker_back(fake: list[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    flag = tmp_path / "slow"
    monkeypatch.setenv("FAKE_START_DELAY", "0.8")
    monkeypatch.setenv("FAKE_DELAY_FLAG", str(flag))

    async def body(pool: WorkerPool, rec: Recorder) -> None:
        flag.touch()  # workers started from now on take 0.8 s
        held = await pool.acquire("held")
        assert held is not None and pool.idle_count == 0
        waiting = asyncio.get_running_loop().create_task(pool.acquire("gone"))
        await until(lambda: pool.stats()["waiting"] == 1)
        waiting.cancel()  # the caller's CANCEL
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.stats()["waiting"] == 0
        await until(lambda: pool.idle_count >= 1)  # the worker started for it stays warm
        assert not any(w.token == "gone" for w in pool.workers) and pool.busy_count == 1
        assert await pool.acquire("next") is not None

    run_pool(fake, body, min_idle=1, max_calls=3)


def test_a_wait_is_bounded(fake: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = tmp_path / "slow"
    monkeypatch.setenv("FAKE_START_DELAY", "2")
    monkeypatch.setenv("FAKE_DELAY_FLAG", str(flag))

    async def body(pool: WorkerPool, rec: Recorder) -> None:
        flag.touch()
        assert await pool.acquire("first") is not None
        t0 = time.monotonic()
        assert await pool.acquire("late") is None  # no worker ready within acquire_timeout: 503
        assert 0.25 <= time.monotonic() - t0 < 1.5

    run_pool(fake, body, min_idle=1, max_calls=3, acquire_timeout=0.3)


def test_protocol_helpers() -> None:
    assert P.parse_port_range("10000-10999") == (10000, 10999)
    for bad in ("10000", "5-1", "0-10", "a-b"):
        with pytest.raises(ValueError):
            P.parse_port_range(bad)
    assert P.split_port_range((10001, 10040), 2) == [(10002, 10019), (10020, 10037)]
    slices = P.split_port_range((10000, 10999), 10)
    assert slices[0] == (10000, 10099) and slices[-1] == (10900, 10999)
    assert P.parse_hostport("[::1]:5060") == ("::1", 5060)
    assert P.decode(P.encode("cmd", "ping", seq=3)) == {"cmd": "ping", "seq": 3}
    with pytest.raises(ValueError):
        P.decode("[1]")


def test_workers_take_rtp_where_the_edge_listens_never_wider() -> None:
    assert P.rtp_address("0.0.0.0") == P.rtp_address("::") == P.rtp_address("[::]") == "0.0.0.0"
    assert P.rtp_address("192.168.1.2") == "192.168.1.2"
    assert P.rtp_address("127.0.0.1") == "127.0.0.1"
    # Media are IPv4: an IPv6 or named listener keeps them on loopback.
    assert P.rtp_address("::1") == P.rtp_address("fd00::2") == P.rtp_address("localhost") == "127.0.0.1"

    async def argv() -> list[str]:
        pool = WorkerPool(rtp_ports="10000-10999", rtp_address="192.168.1.2")
        return pool._argv(Worker(1, 0, (10000, 10009)))

    args = asyncio.run(argv())
    assert args[args.index("--rtp-address") + 1] == "192.168.1.2"
