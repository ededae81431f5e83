"""Registration to the telephone provider(s): the asyncio side of `sip/trunk_registration.py`.

One `TrunkRegistration` state machine per `[[trunks]]` entry with `register = true`. This
module does what the machines cannot: looks the provider up (RFC 3263: SRV, then A/AAAA;
dnspython for SRV, the system resolver for addresses), sends through the `Network` seam,
arms each machine's `next_deadline()` in the one timer wheel, and takes the responses the
edge hands it. It tells the log and the live state (`TrunkEvents`) what each trunk is
doing. A reload restarts only the trunks whose settings changed.

It also answers which provider a request comes from (`trunk_at`, the `TrunkLookup` seam):
only by the request's source address matching an address resolved for the trunk's server
(and its port, for UDP), never by anything the request says about itself. A trunk that
does not register is resolved all the same, so its calls are recognised.

Over TCP it keeps one connection to the provider (`Network.connect`, opened when the
registration first has something to send, and again after it is lost, on the
registration's backoff). That connection carries the registration, the keep-alive pings
and the calls both ways; `holds(flow)` tells the transports not to reap it when quiet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from appliance.config import LiveConfig, TrunkConfig
from appliance.edge.seams import Network
from appliance.edge.timers import Timed, TimerWheel
from appliance.edge.transport import format_host_port
from appliance.logs import fields
from appliance.sip.message import Response
from appliance.sip.registrar import Flow
from appliance.sip.trunk_registration import (
    Action,
    AddressLearned,
    Resolve,
    Send,
    Status,
    StatusChanged,
    Target,
    TrunkAccount,
    TrunkRegistration,
)

log = logging.getLogger("homepbx.trunks")

DNS_TIMEOUT = 10.0
DEFAULT_PORT = 5060

Resolver = Callable[[TrunkConfig], Awaitable[list[tuple[str, int]]]]
"""A trunk's server -> its addresses (host, port), best first; raises OSError."""


class LookupFailed(OSError):
    """The provider's SRV lookup failed (dnspython's DNSException, as the OSError a Resolver raises)."""


class TrunkEvents(Protocol):
    """What the live state (hence the TUI) is told about trunks."""

    def trunk_changed(self, view: dict[str, Any]) -> None: ...

    def trunk_removed(self, name: str) -> None: ...


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _canonical(host: str) -> str:
    """An IP address in one spelling (IPv6 compressed, no brackets), to compare source addresses."""
    host = host.strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


async def _addresses(host: str, port: int) -> list[tuple[str, int]]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    out: list[tuple[str, int]] = []
    for family, _, _, _, sockaddr in sorted(infos, key=lambda i: i[0] != socket.AF_INET):  # IPv4 first
        address = (str(sockaddr[0]), int(sockaddr[1]))
        if family in (socket.AF_INET, socket.AF_INET6) and address not in out:
            out.append(address)
    return out


async def resolve_rfc3263(trunk: TrunkConfig) -> list[tuple[str, int]]:
    """An IP literal as it is; a port given: A/AAAA; else SRV (`_sip._udp`/`_sip._tcp`) by
    priority and weight, falling back to A/AAAA on 5060 when there is none."""
    if _is_ip(trunk.host):
        return [(trunk.host, trunk.port or DEFAULT_PORT)]
    if trunk.port is not None:
        return await _addresses(trunk.host, trunk.port)
    # Imported here, not with the module: dnspython is 5.5 MB of the edge's memory, and
    # only a provider named by its domain, without a port, needs it.
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    try:
        answer = await dns.asyncresolver.resolve(f"_sip._{trunk.transport}.{trunk.host}", "SRV",
                                                 lifetime=DNS_TIMEOUT)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return await _addresses(trunk.host, DEFAULT_PORT)
    except dns.exception.DNSException as err:
        raise LookupFailed(str(err) or type(err).__name__) from err
    records = sorted(answer, key=lambda r: (r.priority, -r.weight))
    out: list[tuple[str, int]] = []
    for record in records:
        target = record.target.to_text(omit_final_dot=True)
        if target in ("", "."):
            continue
        try:
            out += [a for a in await _addresses(target, record.port) if a not in out]
        except OSError:
            continue
    return out


class TrunkRegistrar:
    """Every trunk's registration, wired to the network, the timer wheel and the live state."""

    def __init__(self, settings: LiveConfig, network: Network, timers: TimerWheel, events: TrunkEvents, *,
                 wall: Callable[[], float], resolve: Resolver = resolve_rfc3263) -> None:
        self.settings = settings
        self.network = network
        self.timers = timers
        self.events = events
        self.wall = wall
        self.resolve = resolve
        self.trunks: dict[str, tuple[TrunkConfig, TrunkRegistration]] = {}
        self._resolved: dict[str, set[tuple[str, str, int]]] = {}  # trunk -> (transport, host, port)
        self._first: dict[str, Target] = {}  # trunk -> its best resolved address, for calls out
        self._waiting: dict[str, list[tuple[bytes, Target]]] = {}  # TCP trunk -> sends while it connects
        self._tasks: set[asyncio.Task[None]] = set()

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        for trunk in self.settings.current.trunks:
            self._add(trunk)

    def stop(self) -> None:
        """Unregister at every provider (one datagram each, not waited for)."""
        for name in list(self.trunks):
            self._remove(name, publish=False)
        for task in self._tasks:
            task.cancel()

    def reconfigure(self) -> None:
        """The config changed: trunks removed, added or changed are stopped and (re)started."""
        wanted = {t.name: t for t in self.settings.current.trunks}
        for name, (config, _) in list(self.trunks.items()):
            if wanted.get(name) != config:
                self._remove(name, publish=name not in wanted)
        for trunk in self.settings.current.trunks:
            if trunk.name not in self.trunks:
                self._add(trunk)

    def _add(self, trunk: TrunkConfig) -> None:
        account = TrunkAccount(
            name=trunk.name, domain=trunk.server, username=trunk.username, auth_username=trunk.auth_user,
            password=trunk.password, expires=trunk.expires, keepalive_interval=trunk.keepalive_interval)
        machine = TrunkRegistration(account)
        self.trunks[trunk.name] = (trunk, machine)
        now = self.timers.now()
        if not trunk.register:
            self._apply(trunk.name, machine.disabled(now))
            self._start_resolve(trunk, machine)  # its calls are still recognised by address
        else:
            self._apply(trunk.name, machine.start(now))

    def _remove(self, name: str, *, publish: bool) -> None:
        _, machine = self.trunks.pop(name)
        self._resolved.pop(name, None)
        self._first.pop(name, None)
        self._waiting.pop(name, None)
        self._send_all(machine.stop(self.timers.now()))
        if publish:
            self.events.trunk_removed(name)
            log.info("event=trunk_removed %s", fields(trunk=name))

    # -- from the edge -----------------------------------------------------------------------
    def on_response(self, response: Response, flow: Flow, now: float) -> bool:
        for name, (_, machine) in list(self.trunks.items()):
            actions = machine.on_response(response, now)
            if actions is not None:
                self._apply(name, actions)
                return True
        return False

    def trunk_at(self, flow: Flow) -> str | None:
        """The trunk whose provider sent what came on `flow`: its source address is one the
        box resolved for that trunk's server (host and port for UDP; host for TCP, whose
        source port is the provider's ephemeral one). None for anyone else."""
        if not self._resolved:
            return None  # no provider (asked for every call and every Via we write)
        host = _canonical(flow.host)
        for name, addresses in self._resolved.items():
            for transport, address, port in addresses:
                if transport == flow.transport and address == host and (transport != "udp" or port == flow.port):
                    return name
        return None

    def provider_flow(self, name: str) -> Flow | None:
        """Where a call out through trunk `name` is sent: the address its registration
        uses, else the best one resolved for its server; None before any is known, and
        over TCP while there is no connection to it."""
        entry = self.trunks.get(name)
        if entry is None:
            return None
        target = entry[1].target or self._first.get(name)
        if target is None:
            return None
        flow = self._flow(target)
        return flow if self.network.flow_open(flow) else None

    def holds(self, flow: Flow) -> bool:
        """`flow` is a TCP trunk's connection to its provider: kept however quiet it is."""
        return flow.transport == "tcp" and any(
            self._is_provider(machine.target, flow) for _, machine in self.trunks.values())

    def flow_lost(self, flow: Flow) -> None:
        """A TCP connection closed: a trunk registered over it registers again, on its backoff."""
        if flow.transport != "tcp":
            return
        for name, (_, machine) in list(self.trunks.items()):
            if self._is_provider(machine.target, flow) and name not in self._waiting:
                log.info("event=trunk_connection_lost %s", fields(
                    trunk=name, server=format_host_port(flow.host, flow.port)))
                self._apply(name, machine.connection_lost("connection to the provider lost", self.timers.now()))

    @staticmethod
    def _is_provider(target: Target | None, flow: Flow) -> bool:
        return (target is not None and target.transport == "tcp" and target.port == flow.port
                and _canonical(target.host) == _canonical(flow.host))

    # -- driving a machine --------------------------------------------------------------------
    def _fire(self, obj: Timed, now: float) -> None:
        for name, (_, machine) in list(self.trunks.items()):
            if machine is obj:
                self._apply(name, machine.on_timer(now))
                return

    def _apply(self, name: str, actions: list[Action]) -> None:
        entry = self.trunks.get(name)
        if entry is None:
            return
        trunk, machine = entry
        changed = False
        for action in actions:
            if isinstance(action, Send):
                self._send(name, action)
            elif isinstance(action, Resolve):
                self._start_resolve(trunk, machine)
            elif isinstance(action, StatusChanged):
                changed = True
                self._log_status(trunk, machine, action)
            elif isinstance(action, AddressLearned):
                log.info("event=trunk_address_learned %s", fields(
                    trunk=name, public=f"{action.host}:{action.port}"))
        if changed:
            self.events.trunk_changed(self.view(trunk, machine))
        self.timers.arm(machine, self._fire)

    def _send(self, name: str, action: Send) -> None:
        """Send to the provider; over TCP, open the connection first (what is sent
        meanwhile waits for it, in order)."""
        flow = self._flow(action.target)
        if flow.transport != "tcp" or self.network.flow_open(flow):
            self.network.send(action.data, flow)
            return
        waiting = self._waiting.get(name)
        if waiting is not None:
            waiting.append((action.data, action.target))
            return
        self._waiting[name] = [(action.data, action.target)]
        machine = self.trunks[name][1]
        self.network.connect(flow, lambda opened, why: self._connected(name, machine, opened, why))

    def _connected(self, name: str, machine: TrunkRegistration, flow: Flow | None, why: str) -> None:
        waiting = self._waiting.pop(name, [])
        if self._current(name) is not machine:
            return  # removed or reconfigured meanwhile
        if flow is None:
            target = machine.target
            log.info("event=trunk_connect_failed %s", fields(
                trunk=name, server=format_host_port(target.host, target.port) if target else "-", error=why))
            self._apply(name, machine.connection_lost(f"TCP connect failed: {why}", self.timers.now()))
            return
        for data, target in waiting:
            self.network.send(data, self._flow(target))

    def _send_all(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.network.send(action.data, self._flow(action.target))

    def _flow(self, target: Target) -> Flow:
        return Flow(target.transport, target.host, target.port, self._listener(target.host))

    def _listener(self, host: str) -> str:
        """Our listener of the provider's address family (the first one)."""
        v6 = ":" in host
        for local in self.network.addresses:
            if local.startswith("[") == v6:
                return local
        return self.network.addresses[0] if self.network.addresses else ""

    def _start_resolve(self, trunk: TrunkConfig, machine: TrunkRegistration) -> None:
        task = asyncio.get_running_loop().create_task(self._resolve(trunk, machine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, trunk: TrunkConfig, machine: TrunkRegistration) -> None:
        try:
            found = await asyncio.wait_for(self.resolve(trunk), DNS_TIMEOUT)
        except (OSError, TimeoutError) as err:
            reason = str(err) or type(err).__name__
            if self._current(trunk.name) is machine:
                self._apply(trunk.name, machine.resolve_failed(reason[:200], self.timers.now()))
            return
        if self._current(trunk.name) is not machine:
            return  # reconfigured meanwhile
        self._resolved[trunk.name] = {(trunk.transport, _canonical(host), port) for host, port in found}
        if found:
            self._first[trunk.name] = Target(trunk.transport, found[0][0], found[0][1])
        targets = []
        for host, port in found:
            flow = self._flow(Target(trunk.transport, host, port))
            if flow.local:
                targets.append((Target(trunk.transport, host, port), self.network.local_address(flow)))
        self._apply(trunk.name, machine.resolved(targets, self.timers.now()))

    def _current(self, name: str) -> TrunkRegistration | None:
        entry = self.trunks.get(name)
        return entry[1] if entry is not None else None

    # -- what people see ------------------------------------------------------------------------
    def _log_status(self, trunk: TrunkConfig, machine: TrunkRegistration, change: StatusChanged) -> None:
        now = self.timers.now()
        target = machine.target
        server = f"{target.host}:{target.port}" if target is not None else trunk.server
        retry = round(machine.next_attempt - now, 1) if machine.next_attempt is not None else None
        if change.status is Status.REGISTERED:
            expires = round(machine.expires_at - now) if machine.expires_at is not None else None
            log.info("event=trunk_registered %s", fields(trunk=trunk.name, server=server, expires=expires))
        elif change.status is Status.REJECTED:
            log.warning("event=trunk_rejected %s", fields(
                trunk=trunk.name, server=server, reason=change.reason, retry_in=retry,
                hint="check username and password"))
        elif change.status is Status.FAILING:
            log.warning("event=trunk_failing %s", fields(
                trunk=trunk.name, server=server, reason=change.reason, retry_in=retry))
        elif change.status is Status.REGISTERING:
            log.info("event=trunk_registering %s", fields(trunk=trunk.name, server=trunk.server))
        else:
            log.info("event=trunk_not_registering %s", fields(trunk=trunk.name, reason=change.reason or "stopped"))

    def view(self, trunk: TrunkConfig, machine: TrunkRegistration) -> dict[str, Any]:
        now, wall = self.timers.now(), self.wall()

        def as_wall(t: float | None) -> float | None:
            return None if t is None else round(wall + (t - now), 3)

        target = machine.target
        return {
            "name": trunk.name, "server": trunk.server, "username": trunk.username,
            "transport": trunk.transport, "status": machine.status.value, "reason": machine.reason,
            "since": as_wall(machine.since), "next_attempt": as_wall(machine.next_attempt),
            "expires_at": as_wall(machine.expires_at),
            "address": f"{target.host}:{target.port}" if target is not None else None,
            "public_address": f"{machine.public[0]}:{machine.public[1]}" if machine.public is not None else None,
        }
