"""TCP caps and deadlines (tcp_limits, fake clock), their config keys, and the transport's
error paths: every socket closed, no traceback per packet, send never raises."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from pathlib import Path

import pytest

from appliance.config import ConfigError, parse_config
from appliance.edge import transport as transport_module
from appliance.edge.tcp_limits import (
    FD_RESERVE,
    HEADER,
    IDLE,
    OVER_ADDRESS,
    OVER_TOTAL,
    TcpGuard,
    TcpLimits,
    address_key,
)
from appliance.edge.timers import TimerWheel
from appliance.edge.transport import TcpConnection, TcpRegistry, Transports, raise_fd_limit
from appliance.logs import PerSourceLimit
from appliance.sip.registrar import Flow

LIMITS = TcpLimits(max_connections=4, max_per_address=2, header_timeout=10, idle_timeout=120)


def never(_conn: str) -> bool:
    return False


# -- caps ------------------------------------------------------------------------------------


def test_caps_per_address_and_overall() -> None:
    guard: TcpGuard[str] = TcpGuard(LIMITS)
    assert guard.admit("a1", "10.0.0.1", 0) is None
    assert guard.admit("a2", "10.0.0.1", 0) is None
    assert guard.admit("a3", "10.0.0.1", 0) == OVER_ADDRESS
    assert guard.admit("b1", "10.0.0.2", 0) is None
    assert guard.admit("c1", "10.0.0.3", 0) is None
    assert guard.admit("d1", "10.0.0.4", 0) == OVER_TOTAL
    assert len(guard) == 4 and guard.count("10.0.0.1") == 2
    guard.release("a1")
    guard.release("a1")  # twice, or never admitted: harmless
    guard.release("a3")
    assert len(guard) == 3 and guard.count("10.0.0.1") == 1
    assert guard.admit("a3", "10.0.0.1", 0) is None
    for conn in ("a2", "a3", "b1", "c1"):
        guard.release(conn)
    assert len(guard) == 0 and guard.count("10.0.0.1") == 0


def test_ipv6_is_counted_per_64() -> None:
    assert address_key("2001:db8:1:2::5") == address_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::5") != address_key("2001:db8:1:2::5")
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("192.0.2.1") == "192.0.2.1"
    guard: TcpGuard[str] = TcpGuard(LIMITS)
    assert guard.admit("x", "2001:db8::1", 0) is None
    assert guard.admit("y", "2001:db8::2", 0) is None
    assert guard.admit("z", "2001:db8::3", 0) == OVER_ADDRESS


def test_overall_cap_leaves_a_descriptor_reserve() -> None:
    limits = TcpLimits(max_connections=1024, max_per_address=32)
    assert limits.capped(8192).max_connections == 1024
    assert limits.capped(1024).max_connections == 1024 - FD_RESERVE
    tiny = limits.capped(FD_RESERVE + 10)
    assert (tiny.max_connections, tiny.max_per_address) == (10, 10)
    assert limits.capped(FD_RESERVE).max_connections == 1


def test_sweep_interval_follows_the_shortest_deadline() -> None:
    assert TcpLimits(header_timeout=10, idle_timeout=120).sweep_interval() == 1.0
    assert TcpLimits(header_timeout=1, idle_timeout=2).sweep_interval() == 0.25


# -- deadlines -------------------------------------------------------------------------------


def test_new_connection_must_send_a_whole_message_within_the_header_timeout() -> None:
    guard: TcpGuard[str] = TcpGuard(LIMITS)
    guard.admit("c", "10.0.0.1", 100.0)
    assert guard.due(109.9, never) == []
    assert guard.due(110.0, never) == [("c", HEADER)]


def test_trickled_header_lines_do_not_extend_the_deadline() -> None:
    guard: TcpGuard[str] = TcpGuard(LIMITS)
    guard.admit("c", "10.0.0.1", 0.0)
    for t in range(1, 10):
        guard.received("c", float(t), delivered=False, pending=True)
    assert guard.due(10.0, never) == [("c", HEADER)]


def test_header_clock_runs_from_the_start_of_each_message() -> None:
    guard: TcpGuard[str] = TcpGuard(LIMITS)
    guard.admit("c", "10.0.0.1", 0.0)
    guard.received("c", 5.0, delivered=True, pending=False)  # first message whole
    assert guard.due(50.0, never) == []  # between messages: no header deadline
    guard.received("c", 50.0, delivered=False, pending=True)  # the next one starts
    guard.received("c", 55.0, delivered=False, pending=True)
    assert guard.due(59.9, never) == []
    assert guard.due(60.0, never) == [("c", HEADER)]
    guard.received("c", 58.0, delivered=True, pending=True)  # one done, another begun
    assert guard.due(60.0, never) == []
    assert guard.due(68.0, never) == [("c", HEADER)]


def test_idle_without_binding_is_closed_with_binding_kept() -> None:
    guard: TcpGuard[str] = TcpGuard(LIMITS)
    guard.admit("guest", "10.0.0.1", 0.0)
    guard.admit("phone", "10.0.0.2", 0.0)
    guard.received("guest", 1.0, delivered=True, pending=False)
    guard.received("phone", 1.0, delivered=True, pending=False)
    asked: list[str] = []

    def bound(conn: str) -> bool:
        asked.append(conn)
        return conn == "phone"

    assert guard.due(120.9, bound) == []
    assert asked == []  # the registrar is only asked once a connection is idle
    assert guard.due(121.0, bound) == [("guest", IDLE)]
    assert sorted(asked) == ["guest", "phone"]
    asked.clear()
    guard.release("guest")
    assert guard.due(200.0, bound) == [] and asked == []  # the phone is asked again later
    assert guard.due(241.0, bound) == [] and asked == ["phone"]


def test_deadlines_of_released_connections_are_forgotten() -> None:
    guard: TcpGuard[str] = TcpGuard(LIMITS)
    guard.admit("c", "10.0.0.1", 0.0)
    guard.release("c")
    guard.received("c", 1.0, delivered=False, pending=True)
    assert guard.due(1000.0, never) == [] and len(guard) == 0


# -- config ----------------------------------------------------------------------------------


def test_config_defaults_and_values() -> None:
    defaults = parse_config("", Path("/etc/homepbx.toml")).server
    assert TcpLimits.of(defaults) == TcpLimits(1024, 32, 10, 120) == TcpLimits()
    server = parse_config(
        "[server]\ntcp_max_connections = 50\ntcp_max_per_address = 5\n"
        "tcp_header_timeout = 1\ntcp_idle_timeout = 2\n", Path("/etc/homepbx.toml"),
    ).server
    assert TcpLimits.of(server) == TcpLimits(50, 5, 1, 2)


@pytest.mark.parametrize(("text", "line", "key", "fragment"), [
    ("[server]\ntcp_max_connections = 0\n", 2, "server.tcp_max_connections", "between 1 and 65536"),
    ('[server]\n\ntcp_header_timeout = "10"\n', 3, "server.tcp_header_timeout", "must be an integer"),
    ("[server]\ntcp_idle_timeout = 0\n", 2, "server.tcp_idle_timeout", "between 1 and 86400"),
    ("[server]\ntcp_header_timeout = 301\n", 2, "server.tcp_header_timeout", "between 1 and 300"),
    ("[server]\ntcp_max_connections = 10\ntcp_max_per_address = 11\n", 3, "server.tcp_max_per_address",
     "must not be greater than tcp_max_connections"),
    ("[server]\ntcp_max_connections = 10\n", 2, "server.tcp_max_connections", "must not be greater"),
    ("[server]\ntcp_timeout = 5\n", 2, "server.tcp_timeout", "unknown key (did you mean"),
])
def test_config_errors_name_line_and_key(text: str, line: int, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path("/etc/homepbx.toml"))
    err = info.value
    assert (err.line, err.key) == (line, key), str(err)
    assert fragment in err.message


# -- the transport's error paths -------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int] | None) -> None:
        super().__init__()
        self.peer = peer
        self.aborted = False
        self.closed = False
        self.written = b""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.aborted or self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)


class Receiver:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.messages: list[bytes] = []

    def on_message(self, data: bytes, flow: Flow) -> None:
        if self.fail:
            raise RuntimeError("boom")
        self.messages.append(data)

    def on_oversize(self, head: bytes, flow: Flow) -> None:
        pass


OPTIONS = b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/TCP h\r\nContent-Length: 0\r\n\r\n"


def registry(limits: TcpLimits = LIMITS, now: list[float] | None = None) -> TcpRegistry:
    clock = now if now is not None else [0.0]
    return TcpRegistry(TcpGuard(limits), lambda: clock[0])


def connect(reg: TcpRegistry, peer: tuple[str, int] | None, receiver: Receiver | None = None,
            ) -> tuple[TcpConnection, FakeTransport]:
    conn = TcpConnection(receiver or Receiver(), reg, "127.0.0.1:5060")
    transport = FakeTransport(peer)
    conn.connection_made(transport)
    return conn, transport


def test_peer_gone_before_connection_made_is_aborted() -> None:
    reg = registry()
    conn, transport = connect(reg, None)  # uvloop: reset before connection_made
    assert transport.aborted and conn.flow is None and len(reg.guard) == 0
    conn.data_received(OPTIONS)  # nothing is served on it
    conn.connection_lost(None)
    assert reg.connections == {}


def test_over_a_cap_is_aborted_at_once_with_one_line_per_source(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "_refused_limit", PerSourceLimit())
    reg = registry()
    kept = [connect(reg, ("10.0.0.1", 1000 + i)) for i in range(2)]
    with caplog.at_level(logging.WARNING, "homepbx.transport"):
        refused = [connect(reg, ("10.0.0.1", 2000 + i)) for i in range(5)]
    assert all(t.aborted for _, t in refused) and not any(t.aborted for _, t in kept)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "event=tcp_refused" in lines[0] and "over=max_per_address" in lines[0]
    for conn, _ in refused:
        conn.connection_lost(None)
    assert len(reg.guard) == 2 and len(reg.connections) == 2


def test_handler_error_aborts_and_logs_one_warning_without_traceback(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "_errors_limit", PerSourceLimit())
    reg = registry()
    with caplog.at_level(logging.DEBUG, "homepbx.transport"):
        for i in range(2):
            conn, transport = connect(reg, ("10.0.0.1", 3000 + i), Receiver(fail=True))
            conn.data_received(OPTIONS)
            assert transport.aborted
            conn.connection_lost(None)
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "event=handler_error" in record.getMessage() and "error=RuntimeError" in record.getMessage()
    assert len(reg.guard) == 0 and reg.connections == {}


def test_sweep_aborts_a_stalled_message_and_closes_an_idle_connection() -> None:
    now = [0.0]
    reg = registry(now=now)
    slow, slow_t = connect(reg, ("10.0.0.1", 1))
    idle, idle_t = connect(reg, ("10.0.0.2", 1))
    phone, phone_t = connect(reg, ("10.0.0.3", 1))
    slow.data_received(b"OPTIONS sip:x SIP/2.0\r\n")
    idle.data_received(OPTIONS)
    phone.data_received(OPTIONS)
    now[0] = 10.0
    assert reg.sweep(lambda flow: False) == 1
    assert slow_t.aborted and not idle_t.is_closing()
    slow.connection_lost(None)
    now[0] = 120.0
    assert reg.sweep(lambda flow: flow.host == "10.0.0.3") == 1
    assert idle_t.closed and not idle_t.aborted and not phone_t.is_closing()
    now[0] = 121.0  # still there (the peer does not read): aborted this time
    assert reg.sweep(lambda flow: flow.host == "10.0.0.3") == 1
    assert idle_t.aborted


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_send_never_raises_for_a_bad_destination(loop: str) -> None:
    async def run() -> list[bool]:
        transports = Transports(TimerWheel(time.monotonic), fd_limit=4096)
        await transports.listen("127.0.0.1", 0, Receiver())
        try:
            bad = [Flow("udp", "example.invalid", 5060), Flow("udp", "h\u00f6st", 5060),
                   Flow("udp", "127.0.0.1", 70000), Flow("udp", "127.0.0.1", -1),
                   Flow("udp", "", 5060), Flow("udp", "1.2.3.4\x00", 5060),
                   Flow("tcp", "h\u00f6st", 5060), Flow("tcp", "127.0.0.1", 99999)]
            results = [transports.send(b"x", flow) for flow in bad]
            transports.send(b"x", Flow("udp", "::1", 5060))  # IPv6 on an IPv4 socket: no raise
            results.append(transports.send(b"x", Flow("udp", "127.0.0.1", 9)))
            return results
        finally:
            await transports.close()

    if loop == "uvloop":  # what the daemon runs on
        uvloop = pytest.importorskip("uvloop")
        *bad, good = uvloop.run(run())
    else:
        *bad, good = asyncio.run(run())
    assert bad == [False] * len(bad)
    assert good is True


def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(soft, 512)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        got = raise_fd_limit()
        now_soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert got == now_soft
        assert now_soft == (hard if hard != resource.RLIM_INFINITY else max(lower, 65536))
        transports = Transports(TimerWheel(time.monotonic), TcpLimits(max_connections=5000), fd_limit=1024)
        assert transports.limits.max_connections == 1024 - FD_RESERVE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
