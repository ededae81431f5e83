"""The box's own addresses, as a family must type them into a handset.

The config usually says `0.0.0.0:5060` (every interface), which tells a person nothing.
The daemon runs on the box (the TUI may be far away over SSH), so it looks up its
interfaces and puts the real addresses into the snapshot. Python has no getifaddrs:
`ip -j addr` (iproute2, on every Debian, and netlink is allowed by the unit) is parsed,
and when it cannot be run the kernel is asked which source address the default route
would use (a UDP connect sends no packet).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from appliance.config import ListenAddress
from appliance.logs import fields

log = logging.getLogger("homepbx.netaddr")

WILDCARDS = {"0.0.0.0": 4, "::": 6}
"""Wildcard listen hosts and the address family each one serves. `::` counts as IPv6
only: asyncio binds TCP on it with IPV6_V6ONLY, so IPv4 handsets could not use TCP."""
CACHE_SECONDS = 5.0
"""`ip -j addr` costs ~4 ms of the event loop (a process); snapshots may come in bursts."""
IP_COMMAND = ("ip", "-j", "addr", "show")
PROBES = (("192.0.2.1", socket.AF_INET), ("2001:db8::1", socket.AF_INET6))
"""Documentation addresses (RFC 5737, RFC 3849): only routed, never sent to."""


@dataclass(frozen=True)
class InterfaceAddress:
    interface: str
    address: str  # an IP literal, no scope id


def parse_ip_json(text: str) -> list[InterfaceAddress]:
    """The addresses of interfaces that are up, from `ip -j addr`; ValueError if it is not that."""
    try:
        links = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(links, list):
        raise ValueError("expected a list of interfaces")
    found = []
    for link in links:
        if not isinstance(link, dict) or "UP" not in link.get("flags", []):
            continue
        for info in link.get("addr_info", []):
            local = info.get("local") if isinstance(info, dict) else None
            if isinstance(local, str) and "dadfailed" not in info:
                found.append(InterfaceAddress(str(link.get("ifname", "")), local))
    return found


def select(listen: Iterable[ListenAddress], interfaces: Sequence[InterfaceAddress]) -> list[str]:
    """What a handset can reach, as HOST:PORT (IPv6 bracketed), IPv4 first.

    An explicit listen host is kept as it is. A wildcard becomes the interfaces' addresses
    of its family, without link-local IPv6 (it needs a scope a handset cannot know) and
    without loopback unless nothing else is there. A wildcard with no address at all stays
    as configured: better than nothing on screen.
    """
    chosen: list[ListenAddress] = []
    for entry in listen:
        family = WILDCARDS.get(entry.host)
        if family is None:
            chosen.append(entry)
            continue
        ips = [ip for ip in _ips(interfaces) if ip.version == family and not ip.is_link_local]
        usable = [ip for ip in ips if not ip.is_loopback] or ips
        chosen += [ListenAddress(str(ip), entry.port) for ip in usable] or [entry]
    ordered = sorted(chosen, key=lambda a: ":" in a.host)  # stable: IPv4 (and names) first
    return list(dict.fromkeys(str(a) for a in ordered))


def _ips(interfaces: Sequence[InterfaceAddress]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for item in interfaces:
        try:
            out.append(ipaddress.ip_address(item.address.partition("%")[0]))
        except ValueError:
            continue
    return out


def interface_addresses() -> list[InterfaceAddress]:
    """The machine's addresses now (I/O): `ip -j addr`, else the default route's source."""
    try:
        done = subprocess.run(IP_COMMAND, capture_output=True, text=True, timeout=2.0, check=True)
        return parse_ip_json(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        log.warning("event=interfaces_unlisted %s", fields(command=" ".join(IP_COMMAND), error=err,
                                                           fallback="default_route"))
    found = []
    for target, family in PROBES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))  # a route lookup: UDP connect sends nothing
                found.append(InterfaceAddress("default", str(probe.getsockname()[0])))
        except OSError:
            continue  # no route of this family
    return found


class AddressCache:
    """`select` over the interfaces, looked up at most every CACHE_SECONDS, and only when a
    listen host is a wildcard (explicit hosts need no lookup)."""

    def __init__(self, lookup: Callable[[], list[InterfaceAddress]] = interface_addresses,
                 ttl: float = CACHE_SECONDS) -> None:
        self.lookup = lookup
        self.ttl = ttl
        self._interfaces: list[InterfaceAddress] = []
        self._looked_at: float | None = None

    def addresses(self, listen: Sequence[ListenAddress], now: float) -> list[str]:
        if any(entry.host in WILDCARDS for entry in listen) and (
            self._looked_at is None or not 0 <= now - self._looked_at < self.ttl
        ):
            self._interfaces = self.lookup()
            self._looked_at = now
        return select(listen, self._interfaces)
