"""TCP under attack, with the shipped TCP limits: figures, not a test.

Two attacks on a real daemon on a loopback port (media off, so only the edge's
descriptors count): `--resets` connections that send half a request and reset at once
(the leak of issue 10), then `--slowloris` connections from another loopback address
that trickle header lines, while a handset on 127.0.0.1 registers over TCP with digest.
Prints the daemon's descriptors before, at the peak and after, and the handset's
registration time.

    .venv/bin/python bench/tcp_attack.py [--resets 1100] [--slowloris 1000]
"""

from __future__ import annotations

import argparse
import resource
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.ports import free_port  # noqa: E402
from tests.support.pbx import Daemon, user_block, write_config  # noqa: E402
from tests.support.rawsip import RawClient  # noqa: E402

ATTACKER = "127.0.0.9"


def descriptors(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(list(Path(f"/proc/{daemon.proc.pid}/fd").iterdir()))


def tcp_options(port: int) -> int:
    client = RawClient(port, "tcp")
    try:
        client.send(client.request("OPTIONS", "sip:home.arpa", "200"))
        return client.recv().status
    finally:
        client.close()


def resets(daemon: Daemon, count: int) -> None:
    before = descriptors(daemon)
    started = time.perf_counter()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", daemon.port))
        sock.sendall(b"OPTIONS sip:x SIP/2.0\r\nVia: SIP")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    took = time.perf_counter() - started
    time.sleep(3.0)
    print(f"resets: {count} send-then-RST connections in {took:.1f} s; daemon descriptors {before} before, "
          f"{descriptors(daemon)} 3 s after; TCP OPTIONS afterwards: {tcp_options(daemon.port)}")


def slowloris(daemon: Daemon, count: int, header_timeout: float) -> None:
    before = peak = descriptors(daemon)
    attackers = []
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((ATTACKER, 0))
        sock.settimeout(3.0)
        attackers.append(sock)
        try:
            sock.connect(("127.0.0.1", daemon.port))
            sock.sendall(b"OPTIONS sip:home.arpa SIP/2.0\r\n")
        except OSError:
            pass  # refused over the cap
        if i % 50 == 0:
            peak = max(peak, descriptors(daemon))
    handset = RawClient(daemon.port, "tcp")
    started = time.perf_counter()
    status = handset.register("200", "secret").status
    took_ms = (time.perf_counter() - started) * 1000
    end = time.monotonic() + header_timeout + 2.0
    while time.monotonic() < end:
        for sock in attackers:
            try:
                sock.send(b"X-Slow: 1\r\n")
            except OSError:
                pass
        peak = max(peak, descriptors(daemon))
        time.sleep(0.5)
    print(f"slowloris: {count} connections from {ATTACKER} trickling header lines; daemon descriptors "
          f"{before} before, peak {peak}, {descriptors(daemon)} after the header timeout ({header_timeout:.0f} s); "
          f"a handset on 127.0.0.1 registered over TCP with digest: {status} in {took_ms:.1f} ms")
    handset.close()
    for sock in attackers:
        sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resets", type=int, default=1100)
    parser.add_argument("--slowloris", type=int, default=1000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, args.slowloris + 256), hard), hard))
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = write_config(Path(tmp), port, [user_block("200")], extra="[media]\nmax_calls = 0\n\n")
        daemon = Daemon(config, port).start()
        try:
            print(f"daemon on 127.0.0.1:{port}, shipped TCP limits (1024 in all, 32 per address, 10 s header, "
                  "120 s idle), media off")
            resets(daemon, args.resets)
            slowloris(daemon, args.slowloris, 10.0)
            print(f"daemon alive: {daemon.alive()}; tracebacks in its log: "
                  f"{len(daemon.log_matches('Traceback'))}")
        finally:
            daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
