"""Call attempts per second through the forking proxy, and INVITE-to-all-ringing latency.

Starts the real daemon on a loopback port, then raw-socket load generators play both sides
(pjsua2 handsets cannot place 1,000 calls a second):

* callee processes register `--devices` UDP devices for each of `--numbers` numbers
  (one_number on) and auto-answer: 180 at once, then 200 from one device per call (the
  others get the answered-elsewhere CANCEL and answer it 200 + 487; `--answer all` makes
  every device answer, so the proxy ACKs and BYEs the losers); BYE gets 200.
* caller processes keep `--window` calls in flight each: INVITE -> 407 -> ACK (same branch,
  §17.1.1.3) -> INVITE with Proxy-Authorization -> 100/180s -> 200 -> ACK and BYE through
  the proxy (it Record-Routes) -> 200.

Figures: completed calls per second, and the latency from the authenticated INVITE sent to
the moment every device of the number has received its INVITE (both sides stamp with
time.monotonic(), one machine clock), first under light load (one call in flight: no
queueing), then under throughput load; daemon CPU per call; how many CANCELs the devices
saw again (retransmissions) and how many late 200s the proxy hung up. Prints figures; it
is not a test and asserts nothing. On a 2-core box the load generators compete with the
daemon for CPU, so calls/s is a floor of what the daemon can do; `daemon CPU per call`
gives its own ceiling (1 s / that).

    .venv/bin/python bench/calls.py [--seconds 10] [--light-seconds 3] [--callers 1] [--callees 1]
                                    [--window 4] [--numbers 20] [--devices 3] [--answer one|all]
                                    [--profile out.txt] [--calls N] [--linger S]

RSS after 10,000 calls at full rate (idle, right after, and once the finished calls'
32 s linger is over):

    .venv/bin/python bench/calls.py --calls 10000 --light-seconds 0 --linger 35
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import cast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.ports import free_port  # noqa: E402
from bench.register import (  # noqa: E402
    PASSWORD,
    REALM,
    cpu_seconds,
    md5,
    md5_nonce,
    rss_kib,
    start_daemon,
    write_config,
)

HOST = "127.0.0.1"
CALLEE_BASE = 10000  # numbers rung: 10000 .. 10000+numbers-1
CALLER_BASE = 11000  # numbers calling: 11000 .. (never registered: callers need no binding)
STUCK_AFTER = 5.0  # a call without progress this long counts as failed

Headers = dict[str, list[str]]


# -- wire helpers (plain text: the load generator must stay cheaper than the daemon) ---------


def parse(data: bytes) -> tuple[str, Headers]:
    """Start line and headers (lower-case names, every value kept in order)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    lines = head.split("\r\n")
    headers: Headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return lines[0], headers


def uri_of(value: str) -> str:
    return value.split("<", 1)[1].split(">", 1)[0] if "<" in value else value.split(";", 1)[0]


def response(h: Headers, status: int, reason: str, to_tag: str = "", extra: str = "") -> bytes:
    """A UAS response to the request with headers `h` (§8.2.6)."""
    to = h["to"][0]
    if to_tag and ";tag=" not in to:
        to = f"{to};tag={to_tag}"
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for v in h["via"]]
    lines += [f"From: {h['from'][0]}", f"To: {to}", f"Call-ID: {h['call-id'][0]}", f"CSeq: {h['cseq'][0]}"]
    if 100 < status < 300:
        lines += [f"Record-Route: {r}" for r in h.get("record-route", [])]
    return ("\r\n".join(lines) + f"\r\n{extra}Content-Length: 0\r\n\r\n").encode()


def register_device(sock: socket.socket, server: tuple[str, int], number: str, device: int) -> None:
    """REGISTER -> 401 -> REGISTER with Authorization -> 200, blocking (set-up only)."""
    me = sock.getsockname()[1]
    call_id = f"reg-{number}-{device}-{me}"
    auth = ""
    for cseq in (1, 2):
        msg = (
            f"REGISTER sip:{REALM} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{me};branch=z9hG4bKr{cseq}x{me};rport\r\nMax-Forwards: 70\r\n"
            f"From: <sip:{number}@{REALM}>;tag=r{me}\r\nTo: <sip:{number}@{REALM}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n"
            f"Contact: <sip:{number}@{HOST}:{me}>;+sip.instance=\"<urn:uuid:00000000-0000-0000-0000-{me:012d}>\"\r\n"
            f"Expires: 600\r\n{auth}Content-Length: 0\r\n\r\n"
        )
        sock.sendto(msg.encode(), server)
        sock.settimeout(3.0)
        data = sock.recv(65535)
        sock.settimeout(None)
        if data.startswith(b"SIP/2.0 200"):
            return
        nonce = md5_nonce(data)
        if nonce is None:
            raise RuntimeError(f"registration of {number} failed: {data[:60]!r}")
        auth = digest("Authorization", number, "REGISTER", f"sip:{REALM}", nonce)
    raise RuntimeError(f"registration of {number} not accepted")


def digest(header: str, number: str, method: str, uri: str, nonce: str) -> str:
    cnonce = os.urandom(4).hex()
    ha1 = md5(f"{number}:{REALM}:{PASSWORD}")
    answer = md5(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{md5(f'{method}:{uri}')}")
    return (
        f'{header}: Digest username="{number}", realm="{REALM}", nonce="{nonce}", uri="{uri}", '
        f'response="{answer}", algorithm=MD5, qop=auth, nc=00000001, cnonce="{cnonce}"\r\n'
    )


# -- callee side: auto-answering devices ---------------------------------------------------------


@dataclass
class Leg:
    """One INVITE received by one device."""

    invite: Headers
    tag: str
    last: bytes = b""
    final: bool = False


def callee(port: int, numbers: list[str], devices: int, answer_all: bool, ready: mp.Queue,  # type: ignore[type-arg]
           stop: MpEvent, out: mp.Queue) -> None:  # type: ignore[type-arg]
    server = (HOST, port)
    selector = selectors.DefaultSelector()
    for number in numbers:
        for device in range(devices):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((HOST, 0))
            register_device(sock, server, number, device)
            sock.setblocking(False)
            contact = f"Contact: <sip:{number}@{HOST}:{sock.getsockname()[1]}>\r\n"
            selector.register(sock, selectors.EVENT_READ, (device, contact))
    ready.put(len(numbers) * devices)
    arrivals: dict[str, list[float]] = {}  # Call-ID -> when each device got its INVITE
    legs: dict[tuple[str, int], Leg] = {}
    answered = 0
    cleaned = 0  # BYEs from the proxy itself: a 200 that lost the race was hung up
    cancels = [0, 0]  # CANCELs received: first ones, repeats (retransmissions)

    def on_request(sock: socket.socket, device: int, contact: str, start: str, h: Headers,
                   addr: tuple[str, int], now: float) -> None:
        nonlocal answered, cleaned
        method = start.split(" ", 1)[0]
        call_id = h["call-id"][0]
        key = (call_id, device)
        if method == "INVITE":
            leg = legs.get(key)
            if leg is not None:  # retransmission
                sock.sendto(leg.last, addr)
                return
            arrivals.setdefault(call_id, []).append(now)
            leg = legs[key] = Leg(h, os.urandom(4).hex())
            leg.last = response(h, 180, "Ringing", leg.tag, contact)
            sock.sendto(leg.last, addr)
            if answer_all or zlib.crc32(call_id.encode()) % devices == device:
                leg.last = response(h, 200, "OK", leg.tag, contact)
                leg.final = True
                answered += 1
                sock.sendto(leg.last, addr)
        elif method == "CANCEL":
            sock.sendto(response(h, 200, "OK"), addr)
            leg = legs.get(key)
            cancels[leg is None or leg.final] += 1
            if leg is not None and not leg.final:
                leg.final = True
                leg.last = response(leg.invite, 487, "Request Terminated", leg.tag)
                sock.sendto(leg.last, addr)
        elif method == "ACK":
            leg = legs.get(key)
            if leg is not None and leg.final and not leg.last.startswith(b"SIP/2.0 200"):
                del legs[key]  # the proxy's ACK of our 487; a 2xx ACK keeps the leg until BYE
        else:  # BYE (a dialog's end), OPTIONS
            sock.sendto(response(h, 200, "OK"), addr)
            if method == "BYE":
                legs.pop(key, None)
                if "cause=200" in (h.get("reason") or [""])[0]:
                    cleaned += 1

    while not stop.is_set():
        for key, _ in selector.select(0.05):
            sock = cast(socket.socket, key.fileobj)
            device, contact = key.data
            for _ in range(64):
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                now = time.monotonic()
                if data.startswith(b"SIP/2.0 "):
                    continue  # no response is expected once registered
                start, h = parse(data)
                on_request(sock, device, contact, start, h, addr, now)
    out.put(("callee", arrivals, answered, cleaned, cancels))


# -- caller side -------------------------------------------------------------------------------


@dataclass
class Call:
    number: str
    target: str
    uri: str
    started: float
    stage: str = "challenge"  # challenge -> invite -> bye
    sent: float = 0.0  # when the authenticated INVITE left
    answered: float = 0.0
    progress: float = 0.0
    dialog: list[str] = field(default_factory=list)  # header lines for ACK/BYE


def caller(port: int, numbers: list[str], targets: list[str], seconds: float, window: int, phase: str,
           out: mp.Queue, limit: int = 0) -> None:  # type: ignore[type-arg]
    """`limit` > 0: start that many calls, then stop once they are all over (`seconds` caps it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    me = sock.getsockname()[1]
    server = (HOST, port)
    calls: dict[str, Call] = {}
    sent_at: dict[str, float] = {}  # Call-ID -> authenticated INVITE sent (completed calls)
    setup: list[float] = []  # authenticated INVITE -> 200 received
    done = failed = seq = 0
    via = f"Via: SIP/2.0/UDP {HOST}:{me};branch=z9hG4bK"
    tail = ";rport\r\nMax-Forwards: 70\r\n"

    def invite(call_id: str, call: Call, cseq: int, auth: str = "") -> None:
        msg = (
            f"INVITE {call.uri} SIP/2.0\r\n{via}{call_id}i{cseq}{tail}"
            f"From: <sip:{call.number}@{REALM}>;tag=c{call_id}\r\nTo: <{call.uri}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:{call.number}@{HOST}:{me}>\r\n"
            f"{auth}Content-Length: 0\r\n\r\n"
        )
        sock.sendto(msg.encode(), server)

    def new_call(now: float) -> None:
        nonlocal seq
        if limit and seq >= limit:
            return
        seq += 1
        number = numbers[seq % len(numbers)]
        target = targets[seq % len(targets)]
        call_id = f"{phase}{me}x{seq}"
        call = calls[call_id] = Call(number, target, f"sip:{target}@{REALM}", now, progress=now)
        invite(call_id, call, 1)

    def in_dialog(call_id: str, call: Call, method: str, cseq: int, branch: str) -> None:
        ruri, lines = call.dialog[0], call.dialog[1:]
        msg = (f"{method} {ruri} SIP/2.0\r\n{via}{call_id}{branch}{tail}" + "".join(lines)
               + f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n")
        sock.sendto(msg.encode(), server)

    def on_response(data: bytes, now: float) -> None:
        nonlocal done, failed
        start, h = parse(data)
        status = int(start[8:11])
        call_id = h["call-id"][0]
        call = calls.get(call_id)
        if call is None:
            return
        call.progress = now
        cseq, method = h["cseq"][0].split(" ", 1)
        if method == "INVITE" and status >= 300:
            # Hop-by-hop ACK of a non-2xx final: same branch as the INVITE (§17.1.1.3).
            ack = (f"ACK {call.uri} SIP/2.0\r\n{via}{call_id}i{cseq}{tail}From: {h['from'][0]}\r\n"
                   f"To: {h['to'][0]}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n")
            sock.sendto(ack.encode(), server)
            if status == 407 and call.stage == "challenge":
                nonce = md5_nonce(data)
                if nonce is not None:
                    auth = digest("Proxy-Authorization", call.number, "INVITE", call.uri, nonce)
                    call.stage = "invite"
                    call.sent = time.monotonic()
                    invite(call_id, call, 2, auth)
                    return
            failed += 1
            del calls[call_id]
            new_call(now)
        elif method == "INVITE" and 200 <= status < 300 and cseq == "2":
            if call.stage == "invite":
                call.stage = "bye"
                call.answered = now
                routes = [f"Route: {r}\r\n" for r in reversed(h.get("record-route", []))]
                call.dialog = [uri_of(h["contact"][0]), *routes, f"From: {h['from'][0]}\r\n",
                               f"To: {h['to'][0]}\r\n"]
                in_dialog(call_id, call, "ACK", 2, "a")
                in_dialog(call_id, call, "BYE", 3, "b")
            elif call.stage == "bye":
                in_dialog(call_id, call, "ACK", 2, "a")  # retransmitted 2xx: ACK again
        elif method == "BYE" and status >= 200:
            if status < 300:
                done += 1
                sent_at[call_id] = call.sent
                setup.append(call.answered - call.sent)
            else:
                failed += 1
            del calls[call_id]
            new_call(now)

    start = time.monotonic()
    end = start + seconds
    last_sweep = start
    for _ in range(window):
        new_call(start)
    while True:
        now = time.monotonic()
        if now >= end or (limit and not calls):
            break
        if now - last_sweep > 0.5:
            last_sweep = now
            for call_id, call in list(calls.items()):
                if now - call.progress > STUCK_AFTER:
                    del calls[call_id]
                    failed += 1
                    new_call(now)
        ready, _, _ = select.select([sock], [], [], 0.05)
        if not ready:
            continue
        for _ in range(128):
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                break
            if data.startswith(b"SIP/2.0 "):
                on_response(data, time.monotonic())
    out.put(("caller", sent_at, setup, done, failed, time.monotonic() - start))


# -- driver ----------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@dataclass
class Phase:
    """What the caller processes of one load phase report."""

    sent_at: dict[str, float] = field(default_factory=dict)
    setup: list[float] = field(default_factory=list)
    done: int = 0
    failed: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0  # daemon CPU seconds
    wall: float = 0.0


def run_phase(port: int, callers: list[str], numbers: list[str], processes: int, seconds: float, window: int,
              phase: str, daemon: int, profile: str | None = None, calls: int = 0) -> Phase:
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    cpu_before = cpu_seconds(daemon)
    wall = time.monotonic()
    shares = [calls // processes + (i < calls % processes) for i in range(processes)]
    procs = [mp.Process(target=caller, args=(port, callers[i::processes], numbers, seconds, window, phase, out,
                                             shares[i]))
             for i in range(processes)]
    for p in procs:
        p.start()
    spy = None
    if profile:
        time.sleep(min(1.0, seconds / 4))
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(daemon), "-f", "raw", "-o", profile,
             "-d", str(max(1, int(min(5, seconds - 2))))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
    result = Phase()
    for _ in procs:
        _, sent_at, setup, done, failed, elapsed = out.get(timeout=seconds + 30)
        result.sent_at.update(sent_at)
        result.setup += setup
        result.done += done
        result.failed += failed
        result.elapsed = max(result.elapsed, elapsed)
    result.wall = time.monotonic() - wall
    result.cpu = cpu_seconds(daemon) - cpu_before
    for p in procs:
        p.join(10)
    if spy is not None:
        _, err = spy.communicate(timeout=30)
        if spy.returncode != 0:
            print(f"py-spy failed: {err.decode().strip()[-300:]}")
    return result


def report(name: str, result: Phase, arrivals: dict[str, list[float]], devices: int, window: int,
           processes: int) -> None:
    rate = result.done / result.elapsed if result.elapsed else 0.0
    print(f"{name}: {result.done} calls completed in {result.elapsed:.1f} s = {rate:,.0f} calls/s "
          f"({processes} caller process(es) x {window} calls in flight; failed/stuck {result.failed}); "
          f"daemon CPU {result.cpu / result.wall * 100:.0f}% of one core, "
          f"{result.cpu / max(result.done, 1) * 1e6:,.0f} µs per call")
    ringing = [max(arrivals[c]) - t for c, t in result.sent_at.items()
               if c in arrivals and len(arrivals[c]) == devices]
    if ringing:
        print(f"    authenticated INVITE -> all {devices} devices have it: "
              f"p50 {percentile(ringing, 50) * 1e3:.2f} ms, p99 {percentile(ringing, 99) * 1e3:.2f} ms, "
              f"max {max(ringing) * 1e3:.1f} ms (n={len(ringing)}, mean {statistics.fmean(ringing) * 1e3:.2f} ms)")
    if result.setup:
        print(f"    authenticated INVITE -> 200 at the caller: p50 {percentile(result.setup, 50) * 1e3:.2f} ms, "
              f"p99 {percentile(result.setup, 99) * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0, help="the throughput phase")
    parser.add_argument("--calls", type=int, default=0, metavar="N",
                        help="the throughput phase places N calls (as fast as they go), then ends; "
                             "--seconds then only caps it. With --linger: the RSS after 10,000 calls")
    parser.add_argument("--light-seconds", type=float, default=3.0,
                        help="first a light phase (one call in flight) for latency without queueing; 0: skip")
    parser.add_argument("--callers", type=int, default=1, help="caller processes")
    parser.add_argument("--callees", type=int, default=1, help="callee processes")
    parser.add_argument("--window", type=int, default=4, help="calls in flight per caller process")
    parser.add_argument("--numbers", type=int, default=20, help="numbers rung, one_number on")
    parser.add_argument("--devices", type=int, default=3, help="devices per number")
    parser.add_argument("--answer", choices=("one", "all"), default="one",
                        help="one device answers per call, or all at once (the proxy BYEs the losers)")
    parser.add_argument("--profile", metavar="FILE", help="py-spy the daemon for 5 s under load (raw format)")
    parser.add_argument("--linger", type=float, default=0.0, metavar="S",
                        help="also print the daemon's RSS this many seconds after the load (finished calls "
                             "linger 32 s: 35 shows what stays)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        # users 10000.. : the numbers rung first, the callers from 11000
        config = write_config(Path(tmp), port, max(args.numbers, CALLER_BASE - CALLEE_BASE + 100))
        text = config.read_text().replace("one_number = true", f"one_number = true\nmax_devices = {args.devices}")
        config.write_text(text)
        proc, ready_after = start_daemon(config)
        stop = mp.Event()
        callee_procs: list[mp.Process] = []
        try:
            print(f"daemon ready in {ready_after * 1000:.0f} ms; RSS {rss_kib(proc.pid) / 1024:.1f} MB")
            numbers = [str(CALLEE_BASE + i) for i in range(args.numbers)]
            callers = [str(CALLER_BASE + i) for i in range(100)]
            ready: mp.Queue = mp.Queue()  # type: ignore[type-arg]
            out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
            callee_procs = [
                mp.Process(target=callee, args=(port, numbers[i :: args.callees], args.devices,
                                                args.answer == "all", ready, stop, out))
                for i in range(args.callees)
            ]
            for p in callee_procs:
                p.start()
            registered = sum(ready.get(timeout=30) for _ in callee_procs)
            print(f"{registered} devices registered ({args.numbers} numbers x {args.devices}, one_number), "
                  f"answer={args.answer}")
            idle_kib = rss_kib(proc.pid)
            print(f"daemon RSS idle (devices registered): {idle_kib / 1024:.1f} MB")
            light = None
            if args.light_seconds > 0:
                light = run_phase(port, callers, numbers, 1, args.light_seconds, 1, "L", proc.pid)
            seconds = args.seconds if not args.calls or "--seconds" in sys.argv else 300.0
            load = run_phase(port, callers, numbers, args.callers, seconds, args.window, "T", proc.pid,
                             args.profile, args.calls)
            after_kib = rss_kib(proc.pid)
            print(f"daemon RSS after load: {after_kib / 1024:.1f} MB ({after_kib / idle_kib:.2f}x idle; "
                  f"{load.done + load.failed} calls)")
            if args.linger > 0:
                time.sleep(args.linger)
                later_kib = rss_kib(proc.pid)
                print(f"daemon RSS {args.linger:.0f} s after the load: {later_kib / 1024:.1f} MB "
                      f"({later_kib / idle_kib:.2f}x idle)")
            stop.set()
            arrivals: dict[str, list[float]] = {}
            answered = cleaned = cancelled = repeated = 0
            for _ in callee_procs:
                _, got, n, c, (first, again) = out.get(timeout=30)
                arrivals.update(got)
                answered += n
                cleaned += c
                cancelled += first
                repeated += again
        finally:
            stop.set()
            for p in callee_procs:
                p.join(10)
            proc.terminate()
            proc.wait(10)

    if light is not None:
        report("light load", light, arrivals, args.devices, 1, 1)
    report("throughput", load, arrivals, args.devices, args.window, args.callers)
    print(f"devices that answered: {answered}; late 200s ACKed and BYEd by the proxy: {cleaned}; "
          f"devices CANCELled: {cancelled} (+{repeated} CANCELs for a finished INVITE: retransmissions)")


if __name__ == "__main__":
    main()
