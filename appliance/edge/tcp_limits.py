"""Admission and deadlines of TCP connections, sans-I/O (time passed in).

The box listens on every interface, and every TCP connection costs a descriptor until it is
closed: without limits a stranger holds them all (a slowloris trickling header lines, or
connect-send-reset loops) and the box can no longer save state, answer its control socket
or start a media worker. So connections are capped per source address and overall, a
message must arrive whole within `header_timeout`, and a connection that carries no
registration binding is dropped after `idle_timeout` without a message. A registered
handset's connection stays as long as its binding: that is how the box reaches it.

The transport owns the sockets and asks this piece which to refuse and which are due; a
periodic sweep (one for all connections) is cheaper than a timer per connection re-armed
on every message.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from appliance.config import ServerConfig

K = TypeVar("K", bound=Hashable)

FD_RESERVE = 256
"""Descriptors TCP never takes: state saves, the control socket, media workers, logs."""

HEADER = "header_timeout"
IDLE = "idle_timeout"
OVER_TOTAL = "max_connections"
OVER_ADDRESS = "max_per_address"


@dataclass(frozen=True)
class TcpLimits:
    """The limits: config keys `server.tcp_*`, whose defaults (and why) are in ServerConfig."""

    max_connections: int = ServerConfig.tcp_max_connections
    max_per_address: int = ServerConfig.tcp_max_per_address
    header_timeout: float = ServerConfig.tcp_header_timeout
    idle_timeout: float = ServerConfig.tcp_idle_timeout

    @staticmethod
    def of(server: ServerConfig) -> TcpLimits:
        return TcpLimits(server.tcp_max_connections, server.tcp_max_per_address,
                         server.tcp_header_timeout, server.tcp_idle_timeout)

    def capped(self, fd_limit: int) -> TcpLimits:
        """These limits with the overall cap leaving FD_RESERVE descriptors of `fd_limit`."""
        total = max(1, min(self.max_connections, fd_limit - FD_RESERVE))
        return TcpLimits(total, min(self.max_per_address, total), self.header_timeout, self.idle_timeout)

    def sweep_interval(self) -> float:
        """How often deadlines are checked: a quarter of the shortest, between 0.25 and 1 s."""
        return min(1.0, max(0.25, min(self.header_timeout, self.idle_timeout) / 4))


def address_key(host: str) -> str:
    """What the per-address cap counts: the IPv4 address, or the IPv6 /64 (one home's LAN)."""
    if ":" not in host:
        return host
    try:
        return str(ipaddress.IPv6Network((host.partition("%")[0], 64), strict=False))
    except ValueError:
        return host


class _Entry:
    __slots__ = ("address", "last_message", "partial_since")

    def __init__(self, address: str, now: float) -> None:
        self.address = address
        self.partial_since: float | None = now  # a new connection owes us a first message
        self.last_message = now


class TcpGuard(Generic[K]):
    """Counts connections by source, and says which are over a cap or past a deadline."""

    def __init__(self, limits: TcpLimits) -> None:
        self.limits = limits
        self._entries: dict[K, _Entry] = {}
        self._per_address: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def count(self, host: str) -> int:
        return self._per_address.get(address_key(host), 0)

    def admit(self, conn: K, host: str, now: float) -> str | None:
        """None: `conn` is counted from now on. Else the cap it is over (close it at once)."""
        if len(self._entries) >= self.limits.max_connections:
            return OVER_TOTAL
        address = address_key(host)
        count = self._per_address.get(address, 0)
        if count >= self.limits.max_per_address:
            return OVER_ADDRESS
        self._per_address[address] = count + 1
        self._entries[conn] = _Entry(address, now)
        return None

    def release(self, conn: K) -> None:
        """`conn` is gone (harmless if it was never admitted, or already released)."""
        entry = self._entries.pop(conn, None)
        if entry is None:
            return
        left = self._per_address[entry.address] - 1
        if left:
            self._per_address[entry.address] = left
        else:
            del self._per_address[entry.address]

    def received(self, conn: K, now: float, delivered: bool, pending: bool) -> None:
        """Bytes came in: `delivered` whole messages were cut, `pending` bytes of one wait."""
        entry = self._entries.get(conn)
        if entry is None:
            return
        if delivered:
            entry.last_message = now
        if not pending:
            entry.partial_since = None
        elif delivered or entry.partial_since is None:
            entry.partial_since = now  # the clock runs from the start of this message

    def due(self, now: float, has_binding: Callable[[K], bool]) -> list[tuple[K, str]]:
        """Connections to close now, with why. A bound idle one is checked again later."""
        header, idle = self.limits.header_timeout, self.limits.idle_timeout
        out: list[tuple[K, str]] = []
        for conn, entry in self._entries.items():
            if entry.partial_since is not None and now - entry.partial_since >= header:
                out.append((conn, HEADER))
            elif now - entry.last_message >= idle:
                if has_binding(conn):
                    entry.last_message = now  # its binding keeps it; look again in `idle`
                else:
                    out.append((conn, IDLE))
        return out
