"""Registrar (RFC 3261 §10.3) with the device rules of "one number, many devices".

A device is recognised across refreshes by `+sip.instance` (RFC 5626), else by Call-ID,
else by its Contact URI compared by §19.1.4, so a refresh never counts as a new device.
Each binding remembers the flow it arrived on: that is how the device is reached again,
behind NAT or over its own TCP connection. When that TCP connection is gone (the box
restarted), the edge may open a new one to the Contact (`Binding.contact_flow`) and make
it the binding's flow (`reflow`), unless the device keeps its own flow (RFC 5626 outbound:
`Binding.outbound`, it reconnects and registers again itself). Time (wall clock, seconds)
is passed in.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import NameAddr, parse_cseq, parse_name_addr, unquote
from appliance.sip.message import Request, Response, make_response
from appliance.sip.uri import uri_equal

QUALIFY_MISSES_TO_REMOVE = 3


class Flow(NamedTuple):
    """Where a device's requests came from, and so where to reach it.

    A tuple: compared on every relayed request and a dict key, and a dataclass's generated
    __eq__ and __hash__ stay interpreted under mypyc."""

    transport: str  # "udp" | "tcp"
    host: str
    port: int
    local: str = ""  # the listening address it arrived on, "host:port"


@dataclass(frozen=True, slots=True)
class DevicePolicy:
    """What the configuration allows a number: how many devices, and what a new one does."""

    limit: int
    one_number: bool


@dataclass(slots=True, eq=False)
class Binding:
    id: str
    number: str
    contact: str
    instance: str | None
    call_id: str
    cseq: int
    expires_at: float
    registered_at: float
    flow: Flow
    user_agent: str = ""
    q: str | None = None
    reachable: bool = True
    missed: int = 0
    outbound: bool = False
    """RFC 5626: registered with `+sip.instance`, `reg-id` and `Supported: outbound`; the
    device keeps its flow up itself, and the edge must not open one to it (§5.3)."""
    unreachable_reason: str = ""
    """Why the last qualify of an unreachable device failed (`no_answer`, `tcp_connect_failed`)."""
    _uri: NameAddr | None = field(default=None, repr=False, compare=False)
    _uri_text: str | None = field(default=None, repr=False, compare=False)

    @property
    def device_key(self) -> str:
        return self.instance or f"call-id:{self.call_id}"

    @property
    def name_addr(self) -> NameAddr:
        if self._uri is None:
            self._uri = parse_name_addr(self.contact)
        return self._uri

    @property
    def target_uri(self) -> str:
        """The Contact's URI as the Request-URI of an INVITE to the device: made once, the
        same string for every call (a finished call's branches keep it 32 s)."""
        if self._uri_text is None:
            self._uri_text = str(self.name_addr.uri)
        return self._uri_text

    def expires_in(self, now: float) -> int:
        return max(0, round(self.expires_at - now))

    def contact_flow(self) -> Flow | None:
        """Where a new TCP connection to this device goes (RFC 3261 §18.1.1): its Contact's
        address and port (5060 if none), from the listener it registered on. None for a UDP
        device, a `sips:` or non-TCP Contact, or a malformed one."""
        if self.flow.transport != "tcp":
            return None
        try:
            uri = self.name_addr.uri
        except SipSyntaxError:
            return None
        transport = (uri.params.get("transport") or "tcp").lower()
        if uri.scheme.lower() != "sip" or transport != "tcp":
            return None
        return Flow("tcp", uri.host.strip("[]"), uri.port or 5060, self.flow.local)


class EventKind(Enum):
    REGISTERED = "registered"
    REFRESHED = "refreshed"
    REMOVED = "removed"
    UNREACHABLE = "unreachable"
    REACHABLE = "reachable"


@dataclass(frozen=True, slots=True)
class RegistrarEvent:
    kind: EventKind
    binding: Binding
    reason: str = ""  # REMOVED: unregistered, expired, replaced, unreachable, deleted; UNREACHABLE: why


class RegisterRefused(Exception):
    def __init__(self, status: int, reason: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers)


class _Change(NamedTuple):  # a tuple: built once per Contact, and cheaper than a frozen dataclass
    contact: NameAddr
    contact_text: str
    expires: int
    existing: Binding | None


class Registrar:
    """Bindings per number."""

    def __init__(self, min_expires: int, max_expires: int, default_expires: int) -> None:
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.default_expires = default_expires
        self._by_number: dict[str, list[Binding]] = {}
        self._by_id: dict[str, Binding] = {}
        self._ids = itertools.count(1)

    # -- queries -------------------------------------------------------------------------
    def bindings(self, number: str) -> list[Binding]:
        return list(self._by_number.get(number, ()))

    def all_bindings(self) -> Iterator[Binding]:
        for bindings in self._by_number.values():
            yield from bindings

    def get(self, binding_id: str) -> Binding | None:
        return self._by_id.get(binding_id)

    def __len__(self) -> int:
        return len(self._by_id)

    # -- REGISTER ------------------------------------------------------------------------
    def register(
        self, request: Request, number: str, policy: DevicePolicy, flow: Flow, now: float
    ) -> tuple[Response, list[RegistrarEvent]]:
        """Apply one authenticated REGISTER; returns the response and what changed."""
        try:
            events = self._apply(request, number, policy, flow, now)
        except RegisterRefused as refused:
            return make_response(request, refused.status, refused.reason, headers=refused.headers), []
        return self._ok(request, number, now), events

    def _apply(
        self, request: Request, number: str, policy: DevicePolicy, flow: Flow, now: float
    ) -> list[RegistrarEvent]:
        contacts = request.get_all("Contact")
        if not contacts:
            return []  # a query (§10.3 step 6): answer with the current bindings
        first = request.first_values()
        call_id = first.get("Call-ID", "")
        cseq, _ = parse_cseq(first.get("CSeq", ""))
        header_expires = _parse_expires(first.get("Expires"))
        if any(c.strip() == "*" for c in contacts):
            if len(contacts) != 1 or header_expires != 0:
                raise RegisterRefused(400, "Contact * needs Expires: 0 and no other Contact")
            return self._remove_all(number, call_id, cseq)
        changes = [self._plan(text, number, call_id, cseq, header_expires) for text in contacts]
        removing: list[Binding] = []
        adding: list[_Change] = []
        for change in changes:
            if change.existing is None:
                if change.expires:
                    adding.append(change)
            elif not change.expires:
                removing.append(change.existing)
        # Decide on room first: a refused request must change nothing at all.
        victims = self._victims(number, policy, call_id, adding, removing)
        events: list[RegistrarEvent] = []
        for reason, gone in (("unregistered", removing), ("replaced", victims)):
            for b in gone:
                events.append(RegistrarEvent(EventKind.REMOVED, b, reason))
                self._drop(b)
        user_agent = first.get("User-Agent", "")
        supports_outbound = _supports_outbound(request)
        for change in changes:
            if not change.expires:
                continue
            binding = change.existing
            if binding is not None:
                binding.contact = change.contact_text
                binding._uri = change.contact
                binding._uri_text = None
                binding.instance = _instance(change.contact) or binding.instance
                binding.call_id, binding.cseq = call_id, cseq
                binding.expires_at = now + change.expires
                binding.flow, binding.user_agent = flow, user_agent or binding.user_agent
                binding.q = change.contact.params.get("q")
                binding.outbound = _outbound(change.contact, supports_outbound)
                was_unreachable = not binding.reachable
                binding.reachable, binding.missed, binding.unreachable_reason = True, 0, ""
                events.append(RegistrarEvent(EventKind.REFRESHED, binding))
                if was_unreachable:
                    events.append(RegistrarEvent(EventKind.REACHABLE, binding))
            else:
                binding = Binding(
                    id=f"d{next(self._ids)}", number=number, contact=change.contact_text,
                    instance=_instance(change.contact), call_id=call_id, cseq=cseq,
                    expires_at=now + change.expires, registered_at=now, flow=flow,
                    user_agent=user_agent, q=change.contact.params.get("q"), _uri=change.contact,
                    outbound=_outbound(change.contact, supports_outbound),
                )
                self._add(binding)
                events.append(RegistrarEvent(EventKind.REGISTERED, binding))
        return events

    def _plan(
        self, text: str, number: str, call_id: str, cseq: int, header_expires: int | None
    ) -> _Change:
        try:
            contact = parse_name_addr(text)
        except SipSyntaxError:
            raise RegisterRefused(400, "Malformed Contact") from None
        param = contact.params.get("expires")
        expires = _parse_expires(param) if param is not None else header_expires
        if expires is None:
            expires = self.default_expires
        if 0 < expires < self.min_expires:
            raise RegisterRefused(423, "Interval Too Brief", [("Min-Expires", str(self.min_expires))])
        expires = min(expires, self.max_expires)
        existing = self._match(number, contact, call_id)
        if existing is not None and existing.call_id == call_id and cseq <= existing.cseq:
            raise RegisterRefused(400, "Out-of-order CSeq")
        contact.params.pop("expires", None)
        return _Change(contact, str(contact), expires, existing)

    def _match(self, number: str, contact: NameAddr, call_id: str) -> Binding | None:
        bindings = self._by_number.get(number, ())
        instance = _instance(contact)
        if instance:
            for b in bindings:
                if b.instance == instance:
                    return b
        # RFC 5626: a different instance is a different device, whatever its Contact says.
        same_uri = [b for b in bindings if uri_equal(b.name_addr.uri, contact.uri)
                    and not (instance and b.instance and b.instance != instance)]
        same_call = [b for b in bindings if b.call_id == call_id and not (instance and b.instance)]
        for b in same_uri:
            if b in same_call:
                return b
        if len(same_call) == 1:
            return same_call[0]
        return same_uri[0] if same_uri else None

    def _victims(
        self, number: str, policy: DevicePolicy, call_id: str, adding: list[_Change], removing: list[Binding]
    ) -> list[Binding]:
        """Bindings a new device replaces under the device limit; 403 when none may go."""
        if not adding:
            return []
        current = [b for b in self._by_number.get(number, []) if b not in removing]
        new_keys = {_instance(c.contact) or f"call-id:{call_id}" for c in adding}
        kept_keys = {b.device_key for b in current} - new_keys
        if len(new_keys) > policy.limit:
            raise RegisterRefused(403, f"Device limit reached ({policy.limit} of {policy.limit})")
        excess = len(kept_keys) + len(new_keys) - policy.limit
        if excess <= 0:
            return []
        if not policy.one_number:
            victims = [b for b in current if b.device_key not in new_keys]
        else:
            stale = sorted((b for b in current if not b.reachable), key=lambda b: -b.missed)
            victim_keys: list[str] = []
            for b in stale:
                if b.device_key not in victim_keys and b.device_key not in new_keys:
                    victim_keys.append(b.device_key)
            if len(victim_keys) < excess:
                raise RegisterRefused(
                    403, f"Device limit reached ({policy.limit} of {policy.limit})"
                )
            chosen = set(victim_keys[:excess])
            victims = [b for b in current if b.device_key in chosen]
        return victims

    def _remove_all(self, number: str, call_id: str, cseq: int) -> list[RegistrarEvent]:
        events = []
        for b in list(self._by_number.get(number, ())):
            if b.call_id == call_id and cseq <= b.cseq:
                continue  # §10.3 step 6: an older request must not undo a newer one
            self._drop(b)
            events.append(RegistrarEvent(EventKind.REMOVED, b, "unregistered"))
        return events

    def _ok(self, request: Request, number: str, now: float) -> Response:
        headers = [
            ("Contact", f"{b.contact};expires={b.expires_in(now)}")
            for b in self._by_number.get(number, ())
        ]
        return make_response(request, 200, "OK", headers=headers)

    # -- time, qualify, configuration ----------------------------------------------------
    def expire(self, now: float) -> list[RegistrarEvent]:
        gone = [b for b in self._by_id.values() if b.expires_at <= now]
        for b in gone:
            self._drop(b)
        return [RegistrarEvent(EventKind.REMOVED, b, "expired") for b in gone]

    def qualified(self, binding_id: str, answered: bool, reason: str = "") -> list[RegistrarEvent]:
        """Record a qualify probe's outcome (`reason`: why it failed); 3 misses in a row
        remove the binding."""
        b = self._by_id.get(binding_id)
        if b is None:
            return []
        if answered:
            b.missed, b.unreachable_reason = 0, ""
            if not b.reachable:
                b.reachable = True
                return [RegistrarEvent(EventKind.REACHABLE, b)]
            return []
        b.missed += 1
        b.unreachable_reason = reason
        events = []
        if b.reachable:
            b.reachable = False
            events.append(RegistrarEvent(EventKind.UNREACHABLE, b, reason))
        if b.missed >= QUALIFY_MISSES_TO_REMOVE:
            self._drop(b)
            events.append(RegistrarEvent(EventKind.REMOVED, b, "unreachable"))
        return events

    def reflow(self, binding_id: str, flow: Flow) -> Binding | None:
        """The edge reached the device over a new connection: it is the binding's flow now."""
        b = self._by_id.get(binding_id)
        if b is not None:
            b.flow = flow
        return b

    def enforce(self, number: str, policy: DevicePolicy | None) -> list[RegistrarEvent]:
        """After a config change: drop a deleted user's bindings, or those over a lower limit."""
        current = self._by_number.get(number, [])
        if policy is None:
            victims = list(current)
        else:
            keys: list[str] = []
            for b in sorted(current, key=lambda b: b.registered_at, reverse=True):
                if b.device_key not in keys:
                    keys.append(b.device_key)
            allowed = set(keys[: policy.limit])
            victims = [b for b in current if b.device_key not in allowed]
        for b in victims:
            self._drop(b)
        return [RegistrarEvent(EventKind.REMOVED, b, "deleted") for b in victims]

    def numbers(self) -> list[str]:
        return list(self._by_number)

    # -- persistence (data only; the edge writes the file) --------------------------------
    def dump(self) -> list[dict[str, Any]]:
        # Hand-built rather than dataclasses.asdict: this runs for every binding on every
        # state write, and asdict's deep copies cost 10x more.
        return [
            {
                "id": b.id, "number": b.number, "contact": b.contact, "instance": b.instance,
                "call_id": b.call_id, "cseq": b.cseq, "expires_at": b.expires_at,
                "registered_at": b.registered_at,
                "flow": {"transport": b.flow.transport, "host": b.flow.host, "port": b.flow.port,
                         "local": b.flow.local},
                "user_agent": b.user_agent, "q": b.q, "reachable": b.reachable, "missed": b.missed,
                "outbound": b.outbound,
            }
            for b in self._by_id.values()
        ]

    def load(self, items: Iterable[object], now: float) -> int:
        """Restore bindings, dropping expired and malformed ones; returns how many were kept."""
        kept = 0
        for raw in items:
            if not isinstance(raw, dict):
                continue
            try:
                item = dict(raw)  # a copy: the caller's data stays as it was
                flow = Flow(**item.pop("flow"))
                binding = Binding(flow=flow, **item)
                parse_name_addr(binding.contact)
            except (TypeError, KeyError, ValueError):
                continue
            if binding.expires_at <= now or binding.id in self._by_id:
                continue
            self._add(binding)
            kept += 1
        ids = [int(b.id[1:]) for b in self._by_id.values() if b.id[1:].isdigit()]
        self._ids = itertools.count(max(ids, default=0) + 1)
        return kept

    # -- internals ------------------------------------------------------------------------
    def _add(self, binding: Binding) -> None:
        self._by_number.setdefault(binding.number, []).append(binding)
        self._by_id[binding.id] = binding

    def _drop(self, binding: Binding) -> None:
        self._by_id.pop(binding.id, None)
        bindings = self._by_number.get(binding.number)
        if bindings is not None:
            if binding in bindings:
                bindings.remove(binding)
            if not bindings:
                del self._by_number[binding.number]


def _parse_expires(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        raise RegisterRefused(400, "Bad Expires value")
    return min(int(value), 2**32 - 1)


def _supports_outbound(request: Request) -> bool:
    """`outbound` among the option tags of Supported (or Require), RFC 5626 §4.2.1."""
    for name in ("Supported", "Require"):
        for value in request.get_all(name):
            if any(tag.strip().lower() == "outbound" for tag in value.split(",")):
                return True
    return False


def _outbound(contact: NameAddr, supported: bool) -> bool:
    """RFC 5626 §5.2: a registration with an instance, a reg-id and `Supported: outbound`."""
    return supported and "reg-id" in contact.params and _instance(contact) is not None


def _instance(contact: NameAddr) -> str | None:
    value = contact.params.get("+sip.instance")
    return unquote(value) if value else None
