"""UDP and TCP transports for SIP (RFC 3261 §18), thin asyncio adapters.

They turn bytes on sockets into whole messages plus the Flow they came on, and send bytes
back along a Flow. TCP is framed by Content-Length; CRLF keep-alives (RFC 5626 §4.4.1)
are answered. Everything else is the edge's business.

The box also opens a TCP connection itself (RFC 3261 §18.1.1), to a registered handset's
Contact when the connection its binding named is gone (a restart of the box, a lost
connection): `Transports.connect`, bounded by a deadline in the timer wheel and the same
caps as accepted connections. When to try is the qualifier's business.

Every accepted socket is closed on every path (a peer that reset before we saw it, a cap,
a deadline, an exception in a callback): a leaked descriptor is one a stranger keeps.
Limits and deadlines are decided by `tcp_limits` (sans-I/O); one sweep applies them.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

from appliance.edge.tcp_limits import HEADER, OVER_ADDRESS, OVER_TOTAL, TcpGuard, TcpLimits
from appliance.edge.timers import Deadline, TimerWheel
from appliance.logs import PerSourceLimit, fields, log_limited
from appliance.sip.message import MAX_MESSAGE_SIZE
from appliance.sip.registrar import Flow

log = logging.getLogger("homepbx.transport")

# Whatever a stranger triggers per packet or per connection: a line per source per 10 s,
# for each kind of line.
_errors_limit = PerSourceLimit()
_refused_limit = PerSourceLimit()
_timeout_limit = PerSourceLimit()


class Receiver(Protocol):
    """What the transports deliver to: whole messages, or the head of an oversize one."""

    def on_message(self, data: bytes, flow: Flow) -> None: ...

    def on_oversize(self, head: bytes, flow: Flow) -> None: ...


_MAX_TCP_BUFFER = MAX_MESSAGE_SIZE * 4
CONNECT_TIMEOUT = 3.0
"""An outbound TCP connect gives up after this long (a LAN handset answers in milliseconds)."""

Connected = Callable[[Flow | None, str], None]
"""Told how an outbound connect ended: the new connection's Flow and "", or None and why."""
_MAX_CACHED_FLOWS = 4096


def _host_port(sockname: tuple[object, ...]) -> tuple[str, int]:
    host, port = sockname[0], sockname[1]
    return str(host), int(str(port))


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self.transport: asyncio.DatagramTransport | None = None
        self.local = ""
        # Peer address -> its Flow. A Flow is an immutable value, so one per peer does for
        # all its datagrams instead of a new one each; cleared when it grows too big.
        self._flows: dict[tuple[str | object, ...], Flow] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.local = format_host_port(*_host_port(transport.get_extra_info("sockname")))

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        # Only a datagram that starts with CR or LF (or is empty) may be all CRLF: a SIP
        # message is never copied just to check.
        if data[:1] in b"\r\n" and data.strip(b"\r\n") == b"":
            return  # keep-alive
        flow = self._flows.get(addr)
        if flow is None:
            host, port = _host_port(addr)
            flow = Flow("udp", host, port, self.local)
            if len(self._flows) >= _MAX_CACHED_FLOWS:
                self._flows.clear()
            self._flows[addr] = flow
        try:
            if len(data) > MAX_MESSAGE_SIZE:
                self._receiver.on_oversize(_head(data), flow)
            else:
                self._receiver.on_message(data, flow)
        except Exception as exc:  # one bad message must never take the listener down
            _handler_error("udp", flow, exc)

    def error_received(self, exc: Exception) -> None:
        log.debug("event=udp_error error=%s", exc)


class TcpConnection(asyncio.Protocol):
    """One TCP connection: a byte stream cut into messages by Content-Length."""

    def __init__(self, receiver: Receiver, registry: TcpRegistry, local: str, *, outbound: bool = False) -> None:
        self._receiver = receiver
        self._registry = registry
        self._local = local
        self._outbound = outbound
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None  # set once admitted: None means closed or never served

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        try:
            peer = transport.get_extra_info("peername")
            if peer is None:  # reset before we got here (uvloop): nothing to serve
                self.abort()
                return
            host, port = _host_port(peer)
            if self._registry.admit(self, host):
                self.flow = Flow("tcp", host, port, self._local)
                self._registry.add(self)
                if self._outbound:  # we called it: it owes us no first message
                    self._registry.received(self, 1, False)
            else:
                self.abort()
        except Exception as exc:
            _handler_error("tcp", self.flow, exc)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.remove(self)
        flow, self.flow = self.flow, None
        if flow is not None:
            self._registry.lost(flow)

    def data_received(self, data: bytes) -> None:
        if self.flow is None:
            return  # refused, aborting
        self._buffer += data
        try:
            delivered = self._drain()
        except Exception as exc:
            _handler_error("tcp", self.flow, exc)
            self.abort()
            return
        self._registry.received(self, delivered, bool(self._buffer))

    def _drain(self) -> int:
        """Deliver every whole message in the buffer; returns how many."""
        buf = self._buffer
        delivered = 0
        while buf:
            if buf[:2] == b"\r\n":
                if buf[:4] == b"\r\n\r\n":
                    self.send(b"\r\n")  # RFC 5626 pong
                    del buf[:4]
                else:
                    del buf[:2]
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_MESSAGE_SIZE:
                    self._oversize(bytes(buf))
                return delivered
            length = _content_length(bytes(buf[:end]))
            if length is None:
                # No usable length on a stream: hand it over (the parser answers 400), then
                # the framing is lost and the connection must go.
                message = bytes(buf[: end + 4])
                buf.clear()
                self._deliver(message)
                self.close()
                return delivered + 1
            total = end + 4 + length
            if total > MAX_MESSAGE_SIZE:
                self._oversize(bytes(buf[:end]))
                return delivered
            if len(buf) < total:
                return delivered
            message = bytes(buf[:total])
            del buf[:total]
            delivered += 1
            self._deliver(message)
        return delivered

    def _deliver(self, message: bytes) -> None:
        assert self.flow is not None
        self._receiver.on_message(message, self.flow)

    def _oversize(self, head: bytes) -> None:
        """Answer 513 if we can, then drop the connection: its framing cannot be trusted."""
        assert self.flow is not None
        self._receiver.on_oversize(_head(head), self.flow)
        self._buffer.clear()
        self.close()

    def send(self, data: bytes) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        if self.transport.get_write_buffer_size() > _MAX_TCP_BUFFER:
            log.warning("event=tcp_backlog peer=%s action=close", self.flow)
            self.close()
            return False
        self.transport.write(data)
        return True

    def close(self) -> None:
        """Close after what is queued is written (an answer, a 513); abort if already closing."""
        if self.transport is not None:
            if self.transport.is_closing():
                self.transport.abort()  # a peer that never reads must not hold it open
            else:
                self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping whatever is queued."""
        if self.transport is not None:
            self.transport.abort()


def _handler_error(transport: str, flow: Flow | None, exc: Exception) -> None:
    """A callback failed on one message or connection: one line per source, no traceback."""
    host = flow.host if flow is not None else "?"
    log_limited(log, _errors_limit, host, time.monotonic(), "handler_error", transport=transport,
                peer=f"{host}:{flow.port if flow is not None else '?'}", error=type(exc).__name__,
                detail=str(exc)[:200])


def _head(data: bytes) -> bytes:
    """The header block of a message (what a 513 needs), bounded in size."""
    end = data.find(b"\r\n\r\n")
    return data[: end if 0 <= end <= MAX_MESSAGE_SIZE else MAX_MESSAGE_SIZE]


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"content-length", b"l"):
            value = value.strip()
            return int(value) if value.isdigit() else None
    return None


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one (once, at start); returns the soft limit.

    The soft limit is often 1024 while the hard one is far higher: TCP connections, state
    saves, the control socket and media workers all share it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    target = max(soft, 65536) if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return int(soft)


@dataclass
class TcpRegistry:
    """Live TCP connections by remote address, so a device is reached on its own connection.

    It also admits them (caps) and closes those past a deadline (`sweep`), by `guard`.
    """

    guard: TcpGuard[TcpConnection] = field(default_factory=lambda: TcpGuard(TcpLimits()))
    clock: Callable[[], float] = time.monotonic
    connections: dict[tuple[str, int], TcpConnection] = field(default_factory=dict)
    on_lost: Callable[[Flow], None] = field(default=lambda flow: None)
    """Told of every admitted connection that closed (the edge reaches its binding again)."""

    def admit(self, conn: TcpConnection, host: str) -> bool:
        """Count `conn` in, or log (one line per source) why it must be closed at once."""
        now = self.clock()
        refused = self.guard.admit(conn, host, now)
        if refused is None:
            return True
        limits = self.guard.limits
        cap = limits.max_connections if refused == OVER_TOTAL else limits.max_per_address
        log_limited(log, _refused_limit, host, now, "tcp_refused", peer=host, over=refused, cap=cap,
                    open=len(self.guard), from_peer=self.guard.count(host))
        return False

    def add(self, conn: TcpConnection) -> None:
        assert conn.flow is not None
        self.connections[(conn.flow.host, conn.flow.port)] = conn

    def remove(self, conn: TcpConnection) -> None:
        self.guard.release(conn)
        if conn.flow is not None and self.connections.get((conn.flow.host, conn.flow.port)) is conn:
            del self.connections[(conn.flow.host, conn.flow.port)]

    def lost(self, flow: Flow) -> None:
        try:
            self.on_lost(flow)
        except Exception as exc:  # the socket is gone either way
            _handler_error("tcp", flow, exc)

    def room_for(self, host: str) -> str | None:
        """None if one more connection with `host` is within the caps, else the cap it is over."""
        limits = self.guard.limits
        if len(self.guard) >= limits.max_connections:
            return OVER_TOTAL
        if self.guard.count(host) >= limits.max_per_address:
            return OVER_ADDRESS
        return None

    def received(self, conn: TcpConnection, delivered: int, pending: bool) -> None:
        self.guard.received(conn, self.clock(), delivered > 0, pending)

    def get(self, host: str, port: int) -> TcpConnection | None:
        return self.connections.get((host, port))

    def sweep(self, has_binding: Callable[[Flow], bool]) -> int:
        """Close connections past a deadline; returns how many."""
        now = self.clock()

        def bound(conn: TcpConnection) -> bool:
            return conn.flow is not None and has_binding(conn.flow)

        due = self.guard.due(now, bound)
        for conn, reason in due:
            flow = conn.flow
            host = flow.host if flow is not None else "?"
            if reason == HEADER:  # a stalled or trickled message: a slowloris, or a broken client
                log_limited(log, _timeout_limit, host, now, "tcp_timeout", peer=host, reason=reason)
                conn.abort()
            else:  # routine: a connection nobody registered on went quiet
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("event=tcp_timeout %s", fields(peer=f"{host}:{flow.port if flow else '?'}",
                                                            reason=reason))
                conn.close()
        return len(due)

    def close_all(self) -> None:
        for conn in list(self.connections.values()):
            conn.close()


class Transports:
    """All listeners of the edge: UDP and TCP on each configured address.

    `has_binding(flow)` tells whether a registration binding lives on a TCP flow: such a
    connection is kept however quiet it is (the edge passes in a registrar lookup).
    `on_lost(flow)` is told when a TCP connection closes (the qualifier reaches its binding
    again).
    """

    def __init__(self, timers: TimerWheel, limits: TcpLimits | None = None,
                 has_binding: Callable[[Flow], bool] | None = None,
                 fd_limit: int | None = None, on_lost: Callable[[Flow], None] | None = None) -> None:
        self.timers = timers
        self.fd_limit = raise_fd_limit() if fd_limit is None else fd_limit
        self.limits = (limits or TcpLimits()).capped(self.fd_limit)
        self._has_binding = has_binding or _no_binding
        self.udp: dict[str, UdpEndpoint] = {}
        self.tcp = TcpRegistry(TcpGuard(self.limits), timers.now, on_lost=on_lost or _not_told)
        self._receiver: Receiver | None = None
        self._connects: set[asyncio.Task[None]] = set()
        self._closing = False
        self._servers: list[asyncio.Server] = []
        self._local_ip_cache: dict[str, str] = {}
        self._sweeper: Deadline | None = None

    @property
    def addresses(self) -> list[str]:
        """The listeners, `host:port`, in the order they were opened."""
        return list(self.udp)

    def flow_open(self, flow: Flow) -> bool:
        """Can `flow` be reached now: always over UDP; over TCP while its connection lasts."""
        return flow.transport != "tcp" or self.tcp.get(flow.host, flow.port) is not None

    def _sweep(self, _now: float) -> None:
        try:
            self.tcp.sweep(self._has_binding)
        except Exception as exc:  # the sweep must go on, or nothing is ever reaped again
            log.warning("event=tcp_sweep_failed %s", fields(error=repr(exc)[:200]))

    async def listen(self, host: str, port: int, receiver: Receiver) -> str:
        """Bind UDP and TCP on host:port (port 0 picks one free for both), delivering what
        arrives to `receiver`; returns host:port."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._receiver = receiver
        for _attempt in range(20):
            transport, endpoint = await loop.create_datagram_endpoint(
                lambda: UdpEndpoint(receiver), local_addr=(host, port), family=family
            )
            real_port = _host_port(transport.get_extra_info("sockname"))[1]
            local = format_host_port(host, real_port)
            try:
                server = await loop.create_server(
                    lambda local=local: TcpConnection(receiver, self.tcp, local),  # type: ignore[misc]
                    host=host, port=real_port, family=family, reuse_address=True,
                )
            except OSError:
                transport.close()
                if port:
                    raise
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None:
                for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
                    except OSError:
                        pass
            self.udp[local] = endpoint
            self._servers.append(server)
            if self._sweeper is None:
                lim = self.limits
                log.info("event=tcp_limits %s", fields(
                    max_connections=lim.max_connections, max_per_address=lim.max_per_address,
                    header_timeout=lim.header_timeout, idle_timeout=lim.idle_timeout, fd_limit=self.fd_limit))
                self._sweeper = self.timers.every(lim.sweep_interval(), self._sweep)
            return local
        raise OSError(f"no free port pair for {host}")

    def send(self, data: bytes, flow: Flow) -> bool:
        """Send along a flow: the listener it came in on (UDP) or its own connection (TCP).

        Never raises: a destination taken off the wire (a host name, which would block the
        loop on DNS, non-ASCII, a port out of range) gives False.
        """
        if flow.transport == "tcp":
            conn = self.tcp.get(flow.host, flow.port)
            return conn.send(data) if conn is not None else False
        endpoint = self.udp.get(flow.local) or next(iter(self.udp.values()), None)
        if endpoint is None or endpoint.transport is None:
            return False
        try:
            port = flow.port
            if not 0 < port < 65536:
                raise ValueError("port out of range")
            socket.inet_pton(socket.AF_INET6 if ":" in flow.host else socket.AF_INET, flow.host)
            endpoint.transport.sendto(data, (flow.host, port))
        except (OSError, ValueError, TypeError, OverflowError) as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("event=send_failed %s", fields(peer=f"{flow.host}:{flow.port}", error=exc))
            return False
        return True

    def connect(self, flow: Flow, then: Connected) -> None:
        """Open a TCP connection to `flow`'s host and port (RFC 3261 §18.1.1), to be served
        like an accepted one and reached as `Flow("tcp", host, port, local)`; then `then`.

        `flow.local` names the listener we speak for (our Via and Record-Route). Never
        raises, never blocks: an address that is not an IP literal, a cap reached or a
        connection already open answer at once; the attempt gives up after CONNECT_TIMEOUT.
        """
        open_conn = self.tcp.get(flow.host, flow.port)
        if open_conn is not None and open_conn.flow is not None:
            then(open_conn.flow, "")
            return
        why = self._cannot_connect(flow)
        if why:
            then(None, why)
            return
        task = asyncio.get_running_loop().create_task(self._connect(flow, then))
        self._connects.add(task)
        task.add_done_callback(self._connects.discard)

        def give_up(_now: float) -> None:
            task.cancel()

        deadline = self.timers.call_later(CONNECT_TIMEOUT, give_up)
        task.add_done_callback(lambda _task: deadline.cancel())

    def _cannot_connect(self, flow: Flow) -> str:
        if self._closing or self._receiver is None:
            return "not_listening"
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in flow.host else socket.AF_INET, flow.host)
            if not 0 < flow.port < 65536:
                raise ValueError("port out of range")
        except (OSError, ValueError, TypeError):
            return "not_an_address"  # a host name would block the loop on DNS
        over = self.tcp.room_for(flow.host)
        return f"cap_{over}" if over else ""

    async def _connect(self, flow: Flow, then: Connected) -> None:
        assert self._receiver is not None
        local = flow.local if flow.local in self.udp else next(iter(self.udp), "")
        conn = TcpConnection(self._receiver, self.tcp, local, outbound=True)
        bind_host = local.rpartition(":")[0].strip("[]")
        source = (bind_host, 0) if bind_host and bind_host not in ("0.0.0.0", "::") else None
        why = ""
        try:
            await asyncio.get_running_loop().create_connection(lambda: conn, flow.host, flow.port,
                                                               local_addr=source)
        except asyncio.CancelledError:
            why = "timeout"
        except ConnectionRefusedError:
            why = "refused"
        except OSError as exc:
            why = (exc.strerror or type(exc).__name__).lower().replace(" ", "_")
        if self._closing:
            conn.abort()
            return  # the box is stopping: nobody to tell
        if not why and conn.flow is None:
            why = "refused_by_cap"  # admitted no more (caps) or reset at once
        if why:
            conn.abort()
            log.debug("event=tcp_connect_failed %s", fields(peer=format_host_port(flow.host, flow.port),
                                                           error=why))
        else:
            log.info("event=tcp_connected %s", fields(peer=format_host_port(flow.host, flow.port), local=local))
        try:
            then(None if why else conn.flow, why)
        except Exception as exc:
            _handler_error("tcp", flow, exc)

    def local_address(self, flow: Flow) -> tuple[str, int]:
        """The address to put in our own Via/Contact when talking along `flow`.

        A wildcard listener does not know its own address; ask the routing table which
        source address reaches the peer (a connect() on a UDP socket sends nothing).
        """
        local = flow.local or (next(iter(self.udp)) if self.udp else "127.0.0.1:5060")
        host, _, port = local.rpartition(":")
        host = host.strip("[]")
        if host in ("0.0.0.0", "::"):
            cached = self._local_ip_cache.get(flow.host)
            if cached is None:
                family = socket.AF_INET6 if ":" in flow.host else socket.AF_INET
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    try:
                        probe.connect((flow.host, flow.port or 5060))
                        cached = str(probe.getsockname()[0])
                    except OSError:
                        cached = "127.0.0.1"
                self._local_ip_cache[flow.host] = cached
            host = cached
        return host, int(port)

    def local_ips(self) -> set[str]:
        """Addresses we answer to: the listeners' and those the routing table gave us."""
        hosts = {local.rpartition(":")[0].strip("[]") for local in self.udp}
        return hosts | set(self._local_ip_cache.values())

    async def close(self) -> None:
        self._closing = True
        self.tcp.on_lost = _not_told  # the box closes them: nothing to reach again
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._connects):
            task.cancel()
        for server in self._servers:
            server.close()
        self.tcp.close_all()
        for endpoint in self.udp.values():
            if endpoint.transport is not None:
                endpoint.transport.close()
        for server in self._servers:
            await server.wait_closed()


def _no_binding(flow: Flow) -> bool:
    return False


def _not_told(flow: Flow) -> None:
    pass
