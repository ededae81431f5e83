"""Media workers driven directly by real pjsua2 handsets, without the edge.

A handset plays the edge's part for the A-leg: it calls the worker's SIP port with the
internal X-Homepbx headers.  The B-leg target is a second handset's own address, so
the worker's B-leg INVITE reaches it straight.  Audio is checked by ear: each phone
plays its own tone and records what it hears (Goertzel levels from tones.py).
The pool tests run the asyncio pool on a background thread, so the blocking handset
API and the pool's event loop can be used side by side.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance.jsonlines import Event, EventReader
from appliance.media import protocol as P
from appliance.media.pool import Worker, WorkerPool
from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.support.ports import rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
EDGE = "127.0.0.1:5999"  # no edge runs in these tests; only its host is checked
CALLER = '"Grandpa" <sip:100@home.arpa>'
T = TypeVar("T")
HandsetFactory = Callable[..., Handset]


class WorkerProc:
    """One `python -m appliance.media.worker` child with its JSON events collected."""

    def __init__(self, rtp_ports: str = "", log_path: Path | None = None,
                 extra: Sequence[str] = ()) -> None:
        rtp_ports = rtp_ports or rtp_range(100)
        self._log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.media.worker", "--sip-port", "0",
             "--rtp-ports", rtp_ports, "--edge", EDGE, "--log-level", "3", *extra],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log if self._log is not None else subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.reader = EventReader(self.proc.stdout, "worker")
        ready = self.wait_for(P.EV_READY, timeout=10)
        self.port = int(ready["sip_port"])
        self.calls = int(ready.get("calls", 1))
        self.pid = self.proc.pid

    @property
    def events(self) -> list[Event]:
        return self.reader.events

    def wait_for(self, kind: str, timeout: float = 5.0, **match: object) -> Event:
        """Next unconsumed event of that kind whose fields equal `match`."""
        return self.reader.wait_for(kind, timeout, **match)

    def send(self, cmd: str, **fields: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(P.encode("cmd", cmd, **fields))
        self.proc.stdin.flush()

    def uri(self, user: str = "200") -> str:
        return f"sip:{user}@127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[WorkerProc]:
    proc = WorkerProc(log_path=tmp_path / "worker.log")
    yield proc
    proc.close()


def a_headers(token: str, callee: Handset) -> dict[str, str]:
    return {
        P.HDR_TOKEN: token,
        P.HDR_TARGET: f"sip:200@127.0.0.1:{callee.port}",
        P.HDR_CALLER: CALLER,
    }


def place_call(worker_uri: str, a: Handset, b: Handset, token: str = "tok-1") -> tuple[str, str]:
    """A calls through the worker, B answers; returns both call ids once audio flows."""
    b.auto_answer("answer")
    call_a = a.call(worker_uri, headers=a_headers(token, b))
    call_b = str(b.wait_incoming()["call"])
    a.wait_state(call_a, "CONFIRMED")
    a.wait_for("media", call=call_a, status="active")
    b.wait_for("media", call=call_b, status="active")
    return call_a, call_b


def join(worker: WorkerProc, phone: Handset, token: str) -> str:
    return phone.call(worker.uri("*74"), headers={P.HDR_TOKEN: token, P.HDR_JOIN: "1"})


def level(sig: tones.Signal, freq: float) -> float:
    """Median level of `freq` over 100 ms windows, in dBFS.  Robust to the phase jumps
    that jitter buffers make when they drop or repeat a frame to follow clock drift
    between processes (a whole-signal Goertzel sees those as a weaker tone)."""
    env = sorted(tones.tone_envelope(sig, freq, window=0.1))
    return env[len(env) // 2] if env else tones.SILENCE_DB


HEARD = -20.0
"""dBFS: a handset's test tone arrives at about -13 dBFS."""
SILENT = -40.0


def listen(phones: list[tuple[Handset, str, float]], tmp_path: Path, seconds: float = 1.6) -> list[tones.Signal]:
    """Each (phone, call, freq) plays freq and records; returns what each one heard."""
    for phone, call, freq in phones:
        phone.play_tone(call, freq)
        phone.record(call, tmp_path / f"{phone.name}-{time.monotonic_ns()}.wav")
    time.sleep(seconds)
    heard = []
    for phone, call, _ in phones:
        rec = phone.stop_media(call)
        assert rec["complete"], rec
        heard.append(tones.load_wav(str(rec["path"])))
    return heard


def test_bridged_call_transcodes_and_relays_dtmf(worker: WorkerProc, handset_factory: HandsetFactory,
                                                 tmp_path: Path) -> None:
    a = handset_factory("a", codecs=["PCMU"], trace=True)
    b = handset_factory("b", codecs=["G722"])
    b.auto_answer("answer", delay_ms=300)
    started = time.monotonic()
    call_a = a.call(worker.uri(), headers=a_headers("tok-1", b))
    incoming = b.wait_incoming()
    setup = time.monotonic() - started
    call_b = str(incoming["call"])
    # The callee sees the original caller, and the edge can tell the B-leg's call.
    assert incoming["from"] == CALLER
    assert incoming["headers"][P.HDR_TOKEN] == "tok-1"
    assert incoming["request_uri"] == f"sip:200@127.0.0.1:{b.port}"
    assert worker.wait_for(P.EV_CALL_STARTED)["token"] == "tok-1"
    # Ringing is relayed, then the answer; A learns who answered.
    assert a.wait_state(call_a, "EARLY")["code"] == 180
    a.wait_state(call_a, "CONFIRMED")
    answered = worker.wait_for(P.EV_CALL_ANSWERED, token="tok-1")
    assert answered["codecs"] == {"a": "PCMU/8000", "b": "G722/16000"}
    ok = a.wait_sip("rx", "SIP/2.0 200 OK")
    assert f"\r\n{P.HDR_PAI}: {answered['answered_by']}\r\n" in ok
    assert "sip:200@127.0.0.1" in answered["answered_by"]
    a.wait_for("media", call=call_a, status="active")
    b.wait_for("media", call=call_b, status="active")

    heard_a, heard_b = listen([(a, call_a, 440), (b, call_b, 1000)], tmp_path)
    assert level(heard_b, 440) > HEARD and level(heard_b, 1000) < SILENT
    assert level(heard_a, 1000) > HEARD and level(heard_a, 440) < SILENT

    a.dtmf(call_a, "12#")
    assert [b.wait_for("dtmf", call=call_b)["digit"] for _ in range(3)] == ["1", "2", "#"]
    b.dtmf(call_b, "9*")
    assert [a.wait_for("dtmf", call=call_a)["digit"] for _ in range(2)] == ["9", "*"]

    a.hangup(call_a)
    assert b.wait_state(call_b, "DISCONNECTED")["end_request"] == "BYE"
    ended = worker.wait_for(P.EV_CALL_ENDED, token="tok-1")
    assert ended["reason"] == P.REASON_CALLER_HANGUP
    assert setup < 1.0

    # The same worker, after its null sound device (the bridge's clock) closed when idle:
    # the next call is bridged again.
    time.sleep(1.5)
    b.drain()
    call_a, call_b = place_call(worker.uri(), a, b, token="tok-2")
    heard_a, heard_b = listen([(a, call_a, 440), (b, call_b, 1000)], tmp_path, 1.5)
    assert level(heard_b, 440) > HEARD and level(heard_a, 1000) > HEARD
    b.hangup(call_b)
    assert worker.wait_for(P.EV_CALL_ENDED, token="tok-2")["reason"] == P.REASON_CALLEE_HANGUP


def test_rejected_cancelled_and_next_call(worker: WorkerProc, handset_factory: HandsetFactory) -> None:
    a = handset_factory("a")
    b = handset_factory("b")
    # B busy: A gets B's code and phrase.
    b.auto_answer("reject", code=486, reason="Busy Here")
    call = a.call(worker.uri(), headers=a_headers("tok-r", b))
    ended = a.wait_state(call, "DISCONNECTED")
    assert (ended["last_status"], ended["last_reason"]) == (486, "Busy Here")
    assert worker.wait_for(P.EV_CALL_ENDED, token="tok-r")["reason"] == P.REASON_REJECTED
    # A gives up while B rings: B's leg is cancelled.
    b.drain()
    b.auto_answer("ring")
    call = a.call(worker.uri(), headers=a_headers("tok-c", b))
    call_b = str(b.wait_incoming()["call"])
    a.wait_state(call, "EARLY")
    a.hangup(call)
    ended_b = b.wait_state(call_b, "DISCONNECTED")
    # Cancelled while ringing: never answered. (Which request ended it, CANCEL, is not always
    # known: pjsua may report the end before the CANCEL's own transaction.)
    assert ended_b["end_request"] in ("CANCEL", None), ended_b
    assert b.events_of("call_state", call=call_b, state="CONFIRMED") == []
    assert worker.wait_for(P.EV_CALL_ENDED, token="tok-c")["reason"] == P.REASON_CANCELLED
    # The worker is idle again: the next call works, and a second call at once is refused.
    b.drain()
    call_a, call_b = place_call(worker.uri(), a, b, token="tok-n")
    intruder = handset_factory("x")
    busy = intruder.call(worker.uri(), headers=a_headers("tok-other", b))
    assert intruder.wait_state(busy, "DISCONNECTED")["last_status"] == 486
    b.hangup(call_b)
    assert a.wait_state(call_a, "DISCONNECTED")["end_request"] == "BYE"
    assert worker.wait_for(P.EV_CALL_ENDED, token="tok-n")["reason"] == P.REASON_CALLEE_HANGUP


def test_join_three_way_and_joiner_leaves(worker: WorkerProc, handset_factory: HandsetFactory,
                                          tmp_path: Path) -> None:
    a, b, j, k = (handset_factory(n) for n in ("a", "b", "j", "k"))
    call_a, call_b = place_call(worker.uri(), a, b, token="tok-j")
    # Joining an unanswered or unknown call is refused.
    wrong = join(worker, k, "not-this-call")
    assert k.wait_state(wrong, "DISCONNECTED")["last_status"] == 481
    call_j = join(worker, j, "tok-j")
    j.wait_state(call_j, "CONFIRMED")
    j.wait_for("media", call=call_j, status="active")
    assert worker.wait_for(P.EV_LEG_JOINED, token="tok-j")["leg"] == "j1"
    # A fourth party is refused by the worker too.
    fourth = join(worker, k, "tok-j")
    assert k.wait_state(fourth, "DISCONNECTED")["last_status"] == 486

    heard = listen([(a, call_a, 440), (b, call_b, 1000), (j, call_j, 620)], tmp_path, 2.0)
    for sig, own, others in zip(heard, (440, 1000, 620), ((1000, 620), (440, 620), (440, 1000)), strict=True):
        levels = {f: round(level(sig, f), 1) for f in (440, 620, 1000)}
        assert all(levels[f] > HEARD for f in others), levels
        assert levels[own] < SILENT, levels

    # The joiner leaves: A and B keep talking.
    j.hangup(call_j)
    assert worker.wait_for(P.EV_LEG_LEFT, token="tok-j")["leg"] == "j1"
    heard_a, heard_b = listen([(a, call_a, 440), (b, call_b, 1000)], tmp_path, 1.5)
    assert level(heard_a, 1000) > HEARD and level(heard_a, 620) < SILENT
    assert level(heard_b, 440) > HEARD and level(heard_b, 620) < SILENT
    a.hangup(call_a)
    b.wait_state(call_b, "DISCONNECTED")
    assert worker.wait_for(P.EV_CALL_ENDED, token="tok-j")["reason"] == P.REASON_CALLER_HANGUP


def test_callee_leaves_joiner_stays_then_caller_ends_all(worker: WorkerProc, handset_factory: HandsetFactory,
                                                         tmp_path: Path) -> None:
    a, b, j = (handset_factory(n) for n in ("a", "b", "j"))
    call_a, call_b = place_call(worker.uri(), a, b, token="tok-k")
    call_j = join(worker, j, "tok-k")
    j.wait_state(call_j, "CONFIRMED")
    j.wait_for("media", call=call_j, status="active")
    b.hangup(call_b)
    assert worker.wait_for(P.EV_LEG_LEFT, token="tok-k")["leg"] == "b"
    heard_a, heard_j = listen([(a, call_a, 440), (j, call_j, 620)], tmp_path, 1.5)
    assert level(heard_a, 620) > HEARD and level(heard_a, 1000) < SILENT
    assert level(heard_j, 440) > HEARD and level(heard_j, 1000) < SILENT
    a.hangup(call_a)
    assert j.wait_state(call_j, "DISCONNECTED")["end_request"] == "BYE"
    assert worker.wait_for(P.EV_CALL_ENDED, token="tok-k")["reason"] == P.REASON_CALLER_HANGUP


def test_end_all_hangs_up_both_legs(worker: WorkerProc, handset_factory: HandsetFactory) -> None:
    a, b = handset_factory("a"), handset_factory("b")
    call_a, call_b = place_call(worker.uri(), a, b, token="tok-e")
    worker.send(P.CMD_END_ALL)
    assert a.wait_state(call_a, "DISCONNECTED")["end_request"] == "BYE"
    assert b.wait_state(call_b, "DISCONNECTED")["end_request"] == "BYE"
    assert worker.wait_for(P.EV_CALL_ENDED, token="tok-e")["reason"] == P.REASON_END_ALL
    worker.send(P.CMD_PING, seq=1)
    assert worker.wait_for(P.EV_PONG, seq=1)["busy"] is False


def test_sigterm_ends_calls_with_bye_and_exits(worker: WorkerProc, handset_factory: HandsetFactory) -> None:
    a, b = handset_factory("a"), handset_factory("b")
    call_a, call_b = place_call(worker.uri(), a, b, token="tok-t")
    worker.send(P.CMD_PING, seq=41)
    assert worker.wait_for(P.EV_PONG, seq=41)["busy"] is True
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(5) == 0
    assert time.monotonic() - started < 2
    assert a.wait_state(call_a, "DISCONNECTED")["end_request"] == "BYE"
    assert b.wait_state(call_b, "DISCONNECTED")["end_request"] == "BYE"
    assert worker.wait_for(P.EV_CALL_ENDED, token="tok-t")["reason"] == P.REASON_SHUTDOWN
    assert worker.wait_for(P.EV_BYE)["reason"] == "SIGTERM"
    with pytest.raises(ProcessLookupError):
        os.kill(worker.pid, 0)


# ---------------------------------------------------------------------------------------
# the pool, with real workers


class PoolThread:
    """A WorkerPool on its own event loop thread; `run` calls into it synchronously."""

    def __init__(self, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.events: list[tuple[int, Event]] = []
        self.died: list[tuple[Worker, list[str]]] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> WorkerPool:
            return WorkerPool(on_event=lambda w, e: self.events.append((w.pid, e)),
                              worker_died=lambda w, t: self.died.append((w, t)), **kw)

        self.pool = self.run(make())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return fn()

        return self.run(wrapped())

    def wait(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.call(pred):
            assert time.monotonic() < deadline, "condition not reached"
            time.sleep(0.05)

    def close(self) -> None:
        self.run(self.pool.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def pool_thread() -> Iterator[Callable[..., PoolThread]]:
    made: list[PoolThread] = []

    def make(**kw: Any) -> PoolThread:
        kw.setdefault("edge_address", EDGE)
        kw.setdefault("rtp_ports", rtp_range(500))
        made.append(PoolThread(**kw))
        return made[-1]

    yield make
    for pt in made:
        pids = [w.pid for w in pt.pool.workers]
        zygote = pt.pool._zygote
        if zygote is not None:
            pids.append(zygote.pid)
        pt.close()
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_pool_kill9_is_reported_and_replaced(pool_thread: Callable[..., PoolThread],
                                             handset_factory: HandsetFactory) -> None:
    pt = pool_thread(min_idle=1, max_calls=3, health_interval=0.5)
    pt.run(pt.pool.start())
    worker = pt.run(pt.pool.acquire("tok-9"))
    assert worker is not None and worker.sip_port
    a, b = handset_factory("a"), handset_factory("b")
    place_call(f"sip:200@127.0.0.1:{worker.sip_port}", a, b, token="tok-9")
    pt.wait(lambda: any(e.get("event") == P.EV_CALL_ANSWERED for _, e in pt.events))
    os.kill(worker.pid, signal.SIGKILL)
    pt.wait(lambda: bool(pt.died))
    dead, tokens = pt.died[0]
    assert dead is worker and tokens == ["tok-9"]
    # Replaced: one warm worker again, and new calls get a worker.
    pt.wait(lambda: pt.pool.idle_count >= 1)
    again = pt.run(pt.pool.acquire("tok-10"))
    assert again is not None and again.pid != worker.pid
    assert pid_gone(worker.pid)


def test_pool_exhaustion_release_and_unresponsive_worker(pool_thread: Callable[..., PoolThread]) -> None:
    pt = pool_thread(min_idle=1, max_calls=2, health_interval=0.3)
    pt.run(pt.pool.start())
    first = pt.run(pt.pool.acquire("t1"))
    second = pt.run(pt.pool.acquire("t2"))
    assert first is not None and second is not None and first is not second
    assert pt.run(pt.pool.acquire("t3")) is None  # all busy: the edge answers 503
    pt.call(lambda: pt.pool.release(second, "t2"))
    pt.wait(lambda: pt.pool.idle_count == 1)  # after its cool-down
    third = pt.run(pt.pool.acquire("t3"))
    assert third is second
    # A worker that stops answering pings is killed, reported and replaced.
    os.kill(first.pid, signal.SIGSTOP)
    pt.wait(lambda: bool(pt.died), timeout=5)
    assert pt.died[0][0] is first and pt.died[0][1] == ["t1"]
    assert "no pong" in first.exit_reason
    pt.wait(lambda: pt.pool.idle_count == 1)
    assert pid_gone(first.pid)


EDGE_CRASH_SCRIPT = """
import asyncio, os, sys
from appliance.media.pool import WorkerPool

async def main():
    pool = WorkerPool(min_idle=2, max_calls=3, rtp_ports="{rtp_ports}", edge_address="127.0.0.1:5999")
    await pool.start()
    await pool.acquire("t")
    print(" ".join(str(p) for p in [pool._zygote.pid, *(w.pid for w in pool.workers)]), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_edge_killed_leaves_no_worker_behind() -> None:
    """kill -9 of the process running the pool: every worker sees EOF on its channel and
    exits cleanly, and the zygote sees EOF on its spawn socket and exits too."""
    script = EDGE_CRASH_SCRIPT.replace("{rtp_ports}", rtp_range(500))
    edge = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip
    assert edge.stdout is not None
    pids = [int(p) for p in edge.stdout.readline().split()]
    assert len(pids) == 4  # zygote, busy worker, two warm ones
    edge.kill()
    edge.wait()
    deadline = time.monotonic() + 5
    while not all(pid_gone(p) or is_zombie(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if not pid_gone(p)]
        time.sleep(0.05)


def is_zombie(pid: int) -> bool:
    """An exited child not yet reaped by init (in a container, init may be slow)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
