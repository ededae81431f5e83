"""TCP cannot be exhausted: resets leak nothing, caps and deadlines hold against a slowloris.

The daemon listens on every interface; each TCP connection costs it a descriptor. These
tests count the daemon's descriptors (/proc/PID/fd) while a stranger connects and resets,
or holds connections open trickling header lines, and check that a handset still gets
through.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import time
from collections.abc import Callable

import pytest

from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import Daemon, user_block
from tests.support.rawsip import RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

NO_MEDIA = "[media]\nmax_calls = 0\n\n"  # no worker processes: only the edge's descriptors count
ATTACKER = "127.0.0.9"
PER_ADDRESS = 20
HEADER_TIMEOUT = 1
IDLE_TIMEOUT = 2


def limits(total: int = 100, per_address: int = PER_ADDRESS, header: int = HEADER_TIMEOUT,
           idle: int = IDLE_TIMEOUT) -> str:
    return (f"tcp_max_connections = {total}\ntcp_max_per_address = {per_address}\n"
            f"tcp_header_timeout = {header}\ntcp_idle_timeout = {idle}\n")


def fds(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def options(client: RawClient) -> int:
    client.send(client.request("OPTIONS", "sip:home.arpa", "200"))
    return client.recv().status


def tcp_options_status(port: int) -> int:
    client = RawClient(port, "tcp")
    try:
        return options(client)
    finally:
        client.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """The daemon closed (or reset) this connection; anything still unread is skipped."""
    sock.setblocking(False)
    try:
        while True:
            if sock.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def ensure_fd_room(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def test_send_then_reset_connections_leave_no_descriptor(pbx_factory: DaemonFactory) -> None:
    # A long header timeout: what closes these must be the reset itself, not a deadline.
    pbx = pbx_factory([user_block("200")], extra=NO_MEDIA, server_extra=limits(header=30, idle=60))
    assert tcp_options_status(pbx.port) == 200
    time.sleep(0.2)
    baseline = fds(pbx)
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", pbx.port))
        sock.sendall(b"OPTIONS sip:x SIP/2.0\r\nVia: SIP")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
    assert wait_until(lambda: fds(pbx) <= baseline, 3.0), f"{fds(pbx)} descriptors, baseline {baseline}"
    assert tcp_options_status(pbx.port) == 200
    assert pbx.alive()
    assert not pbx.log_matches("Traceback")


def test_slowloris_is_capped_and_reaped_while_a_handset_registers(pbx_factory: DaemonFactory) -> None:
    ensure_fd_room(4096)
    pbx = pbx_factory([user_block("200")], extra=NO_MEDIA, server_extra=limits())
    time.sleep(0.2)
    baseline = fds(pbx)

    attackers: list[socket.socket] = []
    peak = baseline
    try:
        for i in range(1000):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((ATTACKER, 0))
            sock.settimeout(3.0)
            attackers.append(sock)
            try:
                sock.connect(("127.0.0.1", pbx.port))
                sock.sendall(b"OPTIONS sip:home.arpa SIP/2.0\r\n")
            except OSError:
                pass  # refused over the cap: that is the point
            if i % 100 == 0:
                peak = max(peak, fds(pbx))

        # While the attacker's 1,000 sockets trickle header lines, a handset on another
        # address registers over TCP with digest.
        handset = RawClient(pbx.port, "tcp")
        started = time.perf_counter()
        response = handset.register("200", "secret")
        took_ms = (time.perf_counter() - started) * 1000
        assert response.status == 200, response.status
        print(f"\nhandset registered over TCP in {took_ms:.1f} ms while 1,000 slowloris connections were open")

        def trickle() -> None:
            for sock in attackers:
                try:
                    sock.send(b"X-Slow: 1\r\n")
                except OSError:
                    pass

        end = time.monotonic() + HEADER_TIMEOUT + 1.5
        while time.monotonic() < end:
            trickle()
            peak = max(peak, fds(pbx))
            time.sleep(0.2)
        # The caps held: the attacker never had more than its per-address share.
        assert peak <= baseline + PER_ADDRESS + 3, (peak, baseline)
        # The header timeout reaped the attacker's connections (the handset's stays).
        assert all(closed_by_peer(sock) for sock in attackers)
        assert wait_until(lambda: fds(pbx) <= baseline + 1, 2.0), (fds(pbx), baseline)
        assert pbx.log_matches(f"event=tcp_refused .*peer={ATTACKER}.*over=max_per_address")
        assert pbx.log_matches(f"event=tcp_timeout .*peer={ATTACKER}.*reason=header_timeout")

        # Idle: an unregistered connection goes after the idle timeout, the registered
        # handset's stays as long as its binding.
        prober = RawClient(pbx.port, "tcp")
        assert options(prober) == 200
        time.sleep(IDLE_TIMEOUT + 1.0)
        assert wait_until(lambda: closed_by_peer(prober.sock), 1.0)
        assert options(handset) == 200
        handset.close()
        prober.close()
    finally:
        for sock in attackers:
            sock.close()
    assert pbx.alive()
    assert not pbx.log_matches("Traceback")
