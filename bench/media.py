"""Media worker figures: idle CPU, CPU per bridged PCMA call at 1/4/8 calls, PSS, setup latency.

Two modes:

``--through-edge`` (the default): the real daemon (edge + media workers) with pjsua2
handsets calling each other through it; figures for the whole PBX.  See
`bench/media_edge.py` for what is measured and how.

``--pool-only``: drives the worker pool directly, without the edge: calls go from a
handset (or a raw-socket caller) to a worker's SIP port with the edge's internal
headers, and the worker's B-leg goes straight to a second handset.  Figures are for
the workers only; the edge's own CPU and memory are not included.  In this mode:

- idle: CPU of one warm worker over --seconds, pool health pings included.
- per call: CPU of all busy workers over --seconds with N bridged PCMA calls, tones
  playing both ways (so RTP flows both ways), divided by N.  Handset CPU not counted.
- PSS: /proc/PID/smaps_rollup of every worker process with the largest N.
- latency: a raw-socket caller sends INVITE to an idle worker; a raw-socket callee
  answers the B-leg INVITE with 180 at once.  INVITE -> B-leg INVITE and
  INVITE -> 180 at the caller, against a direct INVITE -> 180 baseline.

    .venv/bin/python bench/media.py [--through-edge | --pool-only] [--calls 1,4,8] [--seconds 10]
        [--latency-trials N] [--settle 3] [--slices 5]          (through the edge)
        [--clock-rate 16000] [--quality N] [--no-zygote]         (pool only)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.media import protocol as P  # noqa: E402
from appliance.media.pool import Worker, WorkerPool  # noqa: E402
from appliance.simulator.handset import Handset, close_all  # noqa: E402
from bench.media_edge import memory_kib  # noqa: E402

T = TypeVar("T")
EDGE = "127.0.0.1:5999"


# -- measuring ---------------------------------------------------------------------------
def cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds of every live thread of `pid` (schedstat is ns-precise; the
    tick-based /proc/PID/stat is too coarse for an idle worker)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return total


def cpu_percent(pids: list[int], seconds: float) -> float:
    """Percent of one core used by `pids` together over `seconds`."""
    before = sum(cpu_ns(p) for p in pids)
    time.sleep(seconds)
    after = sum(cpu_ns(p) for p in pids)
    return 100.0 * (after - before) / 1e9 / seconds


# -- the pool on its own loop thread -----------------------------------------------------
class PoolThread:
    def __init__(self, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.ended: list[str] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> WorkerPool:
            return WorkerPool(on_event=self._on_event, **kw)

        self.pool = self.run(make())

    def _on_event(self, worker: Worker, event: dict[str, Any]) -> None:
        if event.get("event") == P.EV_CALL_ENDED:
            self.ended.append(str(event.get("token")))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def acquire(self, token: str, timeout: float = 5.0) -> Worker:
        """A worker, waiting out cool-downs when every worker is taken."""
        deadline = time.monotonic() + timeout
        while True:
            worker = self.run(self.pool.acquire(token))
            if worker is not None:
                return worker
            if time.monotonic() > deadline:
                raise RuntimeError("pool exhausted")
            time.sleep(0.01)

    def wait_ended(self, token: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while token not in self.ended:
            if time.monotonic() > deadline:
                raise TimeoutError(f"call {token} did not end")
            time.sleep(0.01)

    def worker_pids(self) -> list[int]:
        async def pids() -> list[int]:
            return [w.pid for w in self.pool.workers if w.pid]

        return self.run(pids())

    def zygote_pid(self) -> int | None:
        zygote = self.pool._zygote
        return zygote.pid if zygote is not None else None

    def close(self) -> None:
        self.run(self.pool.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


# -- bridged calls with handsets ------------------------------------------------------------
def bridged_calls(pt: PoolThread, pairs: list[tuple[Handset, Handset]], n: int) -> list[tuple[Worker, str]]:
    """Set up n PCMA calls A -> worker -> B with tones both ways; returns (worker, token)."""
    calls = []
    for i, (a, b) in enumerate(pairs[:n]):
        token = f"bench-{n}-{i}-{uuid.uuid4().hex[:6]}"
        worker = pt.acquire(token)
        b.drain()
        call_a = a.call(
            f"sip:200@127.0.0.1:{worker.sip_port}",
            headers={P.HDR_TOKEN: token, P.HDR_TARGET: f"sip:200@127.0.0.1:{b.port}",
                     P.HDR_CALLER: '"Bench" <sip:100@home.arpa>'},
        )  # fmt: skip
        call_b = str(b.wait_incoming()["call"])
        a.wait_state(call_a, "CONFIRMED")
        a.wait_for("media", call=call_a, status="active")
        b.wait_for("media", call=call_b, status="active")
        a.play_tone(call_a, 440)
        b.play_tone(call_b, 1000)
        calls.append((worker, token, a, call_a))
    return [(w, t) for w, t, _, _ in calls]


def hangup_all(pt: PoolThread, pairs: list[tuple[Handset, Handset]], calls: list[tuple[Worker, str]]) -> None:
    for a, _ in pairs:
        a.send("hangup_all")
    for _, token in calls:
        pt.wait_ended(token)


# -- latency with raw sockets ------------------------------------------------------------
class RawCallee:
    """Answers every INVITE with 180 at once; CANCEL -> 200 + 487.  Records arrival times."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.invites: dict[str, float] = {}
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            now = time.monotonic()
            text = data.decode(errors="replace")
            if not text.strip():
                continue
            start, headers = split_headers(text)
            method = start.split(" ")[0]
            token = headers.get(P.HDR_TOKEN.lower(), "")
            if method == "INVITE":
                self.invites[token] = now
                self.sock.sendto(reply(headers, "180 Ringing", self.port), addr)
            elif method == "CANCEL":
                self.sock.sendto(reply(headers, "200 OK", self.port), addr)
                headers["cseq"] = headers["cseq"].replace("CANCEL", "INVITE")
                self.sock.sendto(reply(headers, "487 Request Terminated", self.port), addr)

    def close(self) -> None:
        self._stop = True


def split_headers(text: str) -> tuple[str, dict[str, str]]:
    head = text.split("\r\n\r\n", 1)[0].split("\r\n")
    headers: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    return head[0], headers


def reply(h: dict[str, str], status: str, port: int) -> bytes:
    to = h["to"] if ";tag=" in h["to"] else h["to"] + ";tag=callee1"
    return (
        f"SIP/2.0 {status}\r\nVia: {h['via']}\r\nFrom: {h['from']}\r\nTo: {to}\r\n"
        f"Call-ID: {h['call-id']}\r\nCSeq: {h['cseq']}\r\nContact: <sip:200@127.0.0.1:{port}>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def invite(target_port: int, local_port: int, token: str, callee_port: int) -> tuple[bytes, dict[str, str]]:
    call_id = uuid.uuid4().hex
    branch = "z9hG4bK" + uuid.uuid4().hex[:12]
    sdp = (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio 4000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    )
    h = {
        "via": f"SIP/2.0/UDP 127.0.0.1:{local_port};branch={branch};rport",
        "from": f"<sip:100@home.arpa>;tag={uuid.uuid4().hex[:8]}",
        "to": f"<sip:200@127.0.0.1:{target_port}>",
        "call-id": call_id,
        "uri": f"sip:200@127.0.0.1:{target_port}",
    }
    msg = (
        f"INVITE {h['uri']} SIP/2.0\r\nVia: {h['via']}\r\nMax-Forwards: 70\r\nFrom: {h['from']}\r\n"
        f"To: {h['to']}\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:100@127.0.0.1:{local_port}>\r\n"
        f"{P.HDR_TOKEN}: {token}\r\n{P.HDR_TARGET}: sip:200@127.0.0.1:{callee_port}\r\n"
        f'{P.HDR_CALLER}: "Bench" <sip:100@home.arpa>\r\n'
        f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}"
    )
    return msg.encode(), h


def same_transaction(h: dict[str, str], method: str, to: str) -> bytes:
    """CANCEL, or ACK of a non-2xx final: the INVITE's Via branch and CSeq number (§9.1, §17.1.1.3)."""
    return (
        f"{method} {h['uri']} SIP/2.0\r\nVia: {h['via']}\r\nMax-Forwards: 70\r\nFrom: {h['from']}\r\n"
        f"To: {to}\r\nCall-ID: {h['call-id']}\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def invite_to_ringing(sock: socket.socket, target_port: int, token: str, callee: RawCallee) -> tuple[float, float]:
    """(INVITE -> 180 at the caller, INVITE -> B-leg INVITE at the callee) in ms, then cancel."""
    local_port = int(sock.getsockname()[1])
    data, h = invite(target_port, local_port, token, callee.port)
    sent = time.monotonic()
    sock.sendto(data, ("127.0.0.1", target_port))
    while True:
        text = sock.recv(65535).decode(errors="replace")
        if text.startswith("SIP/2.0 180"):
            ringing = time.monotonic()
            break
    sock.sendto(same_transaction(h, "CANCEL", h["to"]), ("127.0.0.1", target_port))  # To as in the INVITE
    while True:
        text = sock.recv(65535).decode(errors="replace")
        if re.match(r"SIP/2\.0 [3-6]\d\d", text):
            to = split_headers(text)[1]["to"]
            break
    sock.sendto(same_transaction(h, "ACK", to), ("127.0.0.1", target_port))  # To with the final's tag
    b_leg = callee.invites.get(token, 0.0)
    return 1000 * (ringing - sent), 1000 * (b_leg - sent) if b_leg else float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--through-edge", dest="pool_only", action="store_false",
                      help="the real daemon, edge and workers, with handsets (default)")
    mode.add_argument("--pool-only", dest="pool_only", action="store_true",
                      help="drive the worker pool directly, without the edge")
    parser.set_defaults(pool_only=False)
    parser.add_argument("--calls", default="1,4,8", help="concurrent call counts to measure")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--latency-trials", type=int, default=None, help="default 30 through the edge, 50 pool only")
    parser.add_argument("--clock-rate", type=int, default=None, help="worker conference clock rate (pool only)")
    parser.add_argument("--quality", type=int, default=None, help="worker pjmedia quality (pool only)")
    parser.add_argument("--no-zygote", action="store_true", help="exec every worker instead of forking (pool only)")
    from bench import media_edge

    media_edge.add_arguments(parser)
    args = parser.parse_args()
    if not args.pool_only:
        media_edge.run(args)
        return
    args.latency_trials = args.latency_trials or 50
    counts = [int(x) for x in args.calls.split(",")]
    worker_args: list[str] = []
    if args.clock_rate:
        worker_args += ["--clock-rate", str(args.clock_rate)]
    if args.quality:
        worker_args += ["--quality", str(args.quality)]

    print("media workers driven directly (--pool-only, no edge); figures are for the workers only")
    print(f"worker args: {' '.join(worker_args) or '(defaults)'}; {os.cpu_count()} CPUs")
    started = time.monotonic()
    pt = PoolThread(min_idle=1, max_calls=max(counts), rtp_ports="30000-30999", edge_address=EDGE,
                    worker_args=worker_args, zygote=not args.no_zygote)  # fmt: skip
    pt.run(pt.pool.start())
    print(f"pool start (1 warm worker ready):      {1000 * (time.monotonic() - started):7.1f} ms"
          f"  ({'exec' if args.no_zygote else 'zygote started, then worker forked'})")  # fmt: skip
    time.sleep(1.5)  # let the null sound device close, as in a real idle worker
    idle_pid = pt.worker_pids()[0]
    print(f"idle worker CPU:                        {cpu_percent([idle_pid], args.seconds):7.3f} % of a core")
    pss, rss = memory_kib(idle_pid)
    print(f"idle worker memory:                     {pss / 1024:7.1f} MB PSS, {rss / 1024:.1f} MB RSS")

    # latency, one warm worker at a time
    callee = RawCallee()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    direct: list[float] = []
    ring: list[float] = []
    b_leg: list[float] = []
    acquire_ms: list[float] = []
    for i in range(args.latency_trials):
        token = f"lat-{i}-{uuid.uuid4().hex[:6]}"
        direct.append(invite_to_ringing(sock, callee.port, f"direct-{i}", callee)[0])
        t0 = time.monotonic()
        worker = pt.acquire(token)
        acquire_ms.append(1000 * (time.monotonic() - t0))
        r, b = invite_to_ringing(sock, worker.sip_port, token, callee)
        ring.append(r)
        b_leg.append(b)
        pt.wait_ended(token)
    callee.close()
    for label, values in (("INVITE -> 180, direct (baseline):     ", direct),
                          ("INVITE -> B-leg INVITE through worker:", b_leg)):
        print(f"{label}  p50 {statistics.median(values):6.2f} ms  p95 {pct(values, .95):6.2f}")
    then = ", ".join(f"{r:.1f}" for r in ring[1:6])
    print(f"first INVITE -> 180 of a new worker:    {ring[0]:6.2f} ms  (then {then} ...)")
    print(f"INVITE -> 180 through worker:           p50 {statistics.median(ring):6.2f} ms  p95 {pct(ring, .95):6.2f}"
          f"  max {max(ring):6.2f}")  # fmt: skip
    print(f"acquire() incl. waits for cool-down:    p50 {statistics.median(acquire_ms):6.3f} ms")

    # bridged calls with handsets
    n_max = max(counts)
    phones = [Handset(name=f"{s}{i}", codecs=["PCMA"]) for i in range(n_max) for s in "ab"]
    pairs = [(phones[2 * i], phones[2 * i + 1]) for i in range(n_max)]
    for _, callee_phone in pairs:
        callee_phone.auto_answer("answer")
    try:
        for n in counts:
            calls = bridged_calls(pt, pairs, n)
            time.sleep(2.0)
            busy = [w.pid for w, _ in calls]
            total = cpu_percent(busy, args.seconds)
            print(f"{n} bridged PCMA call(s):                 {total / n:7.3f} % of a core per call"
                  f"  ({total:.2f} % for all {n} workers)")  # fmt: skip
            if n == n_max:
                pids = pt.worker_pids()
                zygote = pt.zygote_pid()
                mem = [memory_kib(p) for p in pids]
                zmem = memory_kib(zygote)[0] if zygote else 0
                print(f"PSS of all {len(pids)} workers with {n} calls:   {sum(m[0] for m in mem) / 1024:7.1f} MB"
                      f"  + zygote {zmem / 1024:.1f} MB = {(sum(m[0] for m in mem) + zmem) / 1024:.1f} MB"
                      f"  (per busy worker {statistics.mean(memory_kib(p)[0] for p in busy) / 1024:.1f} MB;"
                      f" RSS sum {sum(m[1] for m in mem) / 1024:.1f} MB)")  # fmt: skip
            hangup_all(pt, pairs, calls)
    finally:
        close_all(phones)
        pt.close()


if __name__ == "__main__":
    main()
