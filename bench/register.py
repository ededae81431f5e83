"""Authenticated registrations per second, daemon RSS with 300 bindings, start-to-ready.

Starts the real daemon on a loopback port with many users, then load-generator processes
(raw UDP, several transactions in flight each) do the full digest round trip per
registration: REGISTER -> 401 -> REGISTER with Authorization -> 200. Prints figures; it
is not a test and asserts nothing.

    .venv/bin/python bench/register.py [--seconds 10] [--clients 2] [--users 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.ports import free_port  # noqa: E402

REALM = "home.arpa"
PASSWORD = "benchpw"


def write_config(directory: Path, port: int, users: int, *, media_calls: int = 0) -> Path:
    """A config with `users` numbers; media workers off unless `media_calls` is given."""
    lines = [
        "[server]", f'listen = ["127.0.0.1:{port}"]', f'realm = "{REALM}"', 'state_dir = "state"',
        "[registration]", "qualify_interval = 0", "max_expires = 3600",
        "[media]", f"max_calls = {media_calls}", f"min_idle = {min(media_calls, 1)}", "",
    ]
    for i in range(users):
        lines += ["[[users]]", f'number = "{10000 + i}"', f'password = "{PASSWORD}"',
                  "one_number = true", ""]
    path = directory / "config.toml"
    path.write_text("\n".join(lines))
    return path


def start_daemon(config: Path) -> tuple[subprocess.Popen[bytes], float]:
    env = dict(os.environ, HOMEPBX_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO))
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "run", "--config", str(config)],
        cwd=REPO, env=env, stderr=subprocess.PIPE,
    )
    # Ready = answering OPTIONS (WARNING level hides the ready line).
    port = int(re.findall(r"127\.0\.0\.1:(\d+)", config.read_text())[0])
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.settimeout(0.02)
    options = (
        f"OPTIONS sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKready;rport\r\n"
        f"From: <sip:b@{REALM}>;tag=1\r\nTo: <sip:{REALM}>\r\nCall-ID: ready\r\nCSeq: 1 OPTIONS\r\n"
        "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    while True:
        probe.sendto(options, ("127.0.0.1", port))
        try:
            probe.recv(4096)
            break
        except (TimeoutError, ConnectionRefusedError):
            if proc.poll() is not None:
                raise RuntimeError("daemon exited") from None
    return proc, time.monotonic() - started


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def md5_nonce(data: bytes) -> str | None:
    """The nonce of the MD5 challenge in a 401/407 (the SHA-256 one comes first, same nonce).

    Cut with find() rather than a regular expression: the load generators share the machine
    with the daemon they measure.
    """
    md5_at = data.find(b'", algorithm=MD5')
    if md5_at < 0:
        return None
    return data[data.rfind(b'nonce="', 0, md5_at) + 7 : md5_at].decode()


def client(port: int, numbers: list[str], seconds: float, window: int, out: mp.Queue,  # type: ignore[type-arg]
           once: bool = False, rate: float | None = None) -> None:
    """One load generator: `window` registrations in flight, each the full digest exchange.

    With `once`, each number registers exactly once and the generator stops when all have
    an answer (or `seconds` ran out). With `rate`, registrations start at that many per
    second at most (bench/soak.py), rather than as fast as the window allows.

    It shares the machine with the daemon it measures, so it is kept cheap: responses are
    cut with find() rather than a regular expression and split(), and a cnonce costs no
    system call.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    me = sock.getsockname()[1]
    server = ("127.0.0.1", port)
    ha1 = {n: md5(f"{n}:{REALM}:{PASSWORD}") for n in numbers}
    ha2 = md5("REGISTER:sip:home.arpa")
    cseq = dict.fromkeys(numbers, 0)
    call_ids = {n: f"{n}-{me}" for n in numbers}
    number_of = {call_id.encode(): n for n, call_id in call_ids.items()}
    inflight: dict[str, float] = {}  # number -> sent at
    done = 0
    failed = 0
    next_user = 0
    started = 0
    pause = 0.05 if rate is None else min(0.05, 1 / rate)
    cnonces = random.Random()  # a fresh cnonce per answer; no need for the OS's entropy here

    def send(number: str, auth: str = "") -> None:
        cseq[number] += 1
        msg = (
            f"REGISTER sip:{REALM} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{number}x{cseq[number]}x{me};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{number}@{REALM}>;tag={me}\r\n"
            f"To: <sip:{number}@{REALM}>\r\nCall-ID: {call_ids[number]}\r\nCSeq: {cseq[number]} REGISTER\r\n"
            f"Contact: <sip:{number}@127.0.0.1:{me}>\r\nExpires: 600\r\n{auth}Content-Length: 0\r\n\r\n"
        )
        sock.sendto(msg.encode(), server)
        inflight[number] = time.monotonic()

    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if once and done + failed == len(numbers):
            break
        while len(inflight) < window and not (once and next_user == len(numbers)):
            if rate is not None and started >= rate * (now - start):
                break
            number = numbers[next_user % len(numbers)]
            next_user += 1
            if number in inflight:
                break
            send(number)
            started += 1
        ready, _, _ = select.select([sock], [], [], pause)
        if not ready:
            for number, sent in list(inflight.items()):
                if now - sent > 1.0:
                    del inflight[number]
                    failed += 1
            continue
        for _ in range(64):
            try:
                data = sock.recv(8192)
            except BlockingIOError:
                break
            at = data.find(b"Call-ID: ") + 9
            number = number_of.get(data[at : data.find(b"\r\n", at)])
            if number is None or inflight.pop(number, None) is None:
                continue
            status = data[8:11]
            if status == b"401":
                nonce = md5_nonce(data)
                if nonce is None:
                    failed += 1
                    continue
                cnonce = f"{cnonces.getrandbits(32):08x}"
                response = md5(f"{ha1[number]}:{nonce}:00000001:{cnonce}:auth:{ha2}")
                auth = (
                    f'Authorization: Digest username="{number}", realm="{REALM}", nonce="{nonce}", '
                    f'uri="sip:home.arpa", response="{response}", algorithm=MD5, qop=auth, '
                    f'nc=00000001, cnonce="{cnonce}"\r\n'
                )
                send(number, auth)
            elif status == b"200":
                done += 1
            else:
                failed += 1
    out.put((done, failed, time.monotonic() - start))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = write_config(Path(tmp), port, args.users)
        proc, ready_after = start_daemon(config)
        try:
            print(f"start to ready: {ready_after * 1000:.0f} ms ({args.users} users in config)")
            print(f"RSS idle, no bindings: {rss_kib(proc.pid) / 1024:.1f} MB")
            # 300 bindings, then RSS.
            queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
            warm = mp.Process(target=client, args=(port, [str(10000 + i) for i in range(300)], 10.0, 16, queue, True))
            warm.start()
            warm.join()
            bound, refused, _ = queue.get()
            time.sleep(0.5)
            print(f"RSS with {bound} bindings (each registered once; {refused} failed): "
                  f"{rss_kib(proc.pid) / 1024:.1f} MB")

            numbers = [str(10000 + i) for i in range(args.users)]
            slices = [numbers[i :: args.clients] for i in range(args.clients)]
            cpu_before = cpu_seconds(proc.pid)
            workers = [
                mp.Process(target=client, args=(port, s, args.seconds, args.window, queue)) for s in slices
            ]
            wall = time.monotonic()
            for w in workers:
                w.start()
            results = [queue.get() for _ in workers]
            for w in workers:
                w.join()
            wall = time.monotonic() - wall
            cpu = cpu_seconds(proc.pid) - cpu_before
            done = sum(r[0] for r in results)
            failed = sum(r[1] for r in results)
            elapsed = max(r[2] for r in results)
            print(
                f"authenticated registrations: {done} in {elapsed:.1f} s = {done / elapsed:,.0f}/s "
                f"({args.clients} client processes, window {args.window}, {args.users} users, "
                f"failed/timed out {failed})"
            )
            print(f"daemon CPU during load: {cpu / wall * 100:.0f}% of one core; "
                  f"{cpu / max(done, 1) * 1e6:.0f} µs per registration (2 messages)")
            print(f"RSS after load: {rss_kib(proc.pid) / 1024:.1f} MB")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
