"""What the TUI knows about the PBX: the daemon's snapshot, kept current by its events.

Pure data and rules, no Textual: the widgets draw from it, tests drive it directly. Events
carry the whole object they are about (a device, a call) as it is after the change, so the
model replaces its copy: the latest event applied twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class ProtocolError(ValueError):
    """The daemon sent something this client cannot understand."""


class DeviceState(Enum):
    IDLE = "idle"
    RINGING = "ringing"
    TALKING = "talking"
    CONFERENCE = "conference"


@dataclass(frozen=True)
class Number:
    number: str
    name: str
    one_number: bool
    max_devices: int
    device_limit: int
    max_outgoing_calls: int  # 0 = unlimited
    forward_always: str = ""
    forward_busy: str = ""
    forward_no_answer: str = ""
    forward_unreachable: str = ""
    no_answer_after: int = 20
    dnd: bool = False
    dnd_devices: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        return f"{self.number} {self.name}".strip()

    @property
    def forwards(self) -> list[str]:
        """Each forwarding set, as a person reads it: "busy → 300"."""
        rules = [("always", self.forward_always), ("busy", self.forward_busy),
                 (f"no answer {self.no_answer_after} s", self.forward_no_answer),
                 ("unreachable", self.forward_unreachable)]
        return [f"{when} → {target}" for when, target in rules if target]

    @property
    def mark(self) -> str:
        """One character after the number in the table: ⊘ do not disturb, ↪ forwarding set."""
        return "⊘" if self.dnd else "↪" if self.forwards else ""


@dataclass(frozen=True)
class Device:
    id: str
    number: str
    user_agent: str
    transport: str
    address: str
    registered_at: float
    expires_at: float
    reachable: bool
    unreachable_reason: str = ""
    device_id: str = ""
    """Its stable id (`dnd_devices` names devices by it)."""
    dnd: bool = False

    @property
    def label(self) -> str:
        return self.user_agent or f"device {self.id}"


@dataclass(frozen=True)
class Call:
    id: str
    caller: str
    callee: str
    caller_device: str | None
    phase: str  # ringing | answered | ended
    ringing: tuple[str, ...]
    answered_by: str | None
    joined: tuple[str, ...]
    started_at: float
    answered_at: float | None


@dataclass(frozen=True)
class Trunk:
    """A line to the provider, as the daemon last reported it."""

    name: str
    server: str
    status: str  # registered | registering | failing | rejected | not_registering
    reason: str
    since: float
    next_attempt: float | None


@dataclass
class PbxModel:
    """The client-side mirror of the daemon's live state."""

    realm: str = ""
    listen: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    """The box's real addresses (HOST:PORT) as the daemon found them; empty from an older daemon."""
    started_at: float = 0.0
    config_path: str = ""
    numbers: dict[str, Number] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)
    calls: dict[str, Call] = field(default_factory=dict)
    blocked: dict[str, float] = field(default_factory=dict)
    """Addresses the daemon ignores (auth failures), with when each block ends (wall clock)."""
    trunks: dict[str, Trunk] = field(default_factory=dict)
    """Lines to the provider, in config order; empty from an older daemon or with none configured."""
    loaded: bool = False

    # -- applying what the daemon says -----------------------------------------------------
    def load_snapshot(self, data: Mapping[str, Any]) -> None:
        numbers = _list(data, "numbers")
        calls = _list(data, "calls")
        self.realm = _str(data, "realm")
        self.listen = tuple(str(a) for a in _list(data, "listen"))
        self.addresses = _strs(data, "addresses")
        self.started_at = _float(data, "started_at")
        self.config_path = _str(data, "config")
        self._load_numbers(numbers)
        self.calls = {}
        for raw in calls:
            call = _call(raw)
            self.calls[call.id] = call
        blocked = data.get("blocked", [])
        self.blocked = {_str(b, "address"): _float(b, "until") for b in blocked if isinstance(b, Mapping)}
        self.trunks = {}
        for raw in _list(data, "trunks"):
            trunk = _trunk(raw)
            self.trunks[trunk.name] = trunk
        self.loaded = True

    def _load_numbers(self, numbers: list[Any]) -> None:
        self.numbers = {}
        self.devices = {}
        for raw in numbers:
            number = _number(raw)
            self.numbers[number.number] = number
            for dev in _list(raw, "devices"):
                device = _device(dev)
                self.devices[device.id] = device

    def apply(self, event: Mapping[str, Any]) -> str:
        """Apply one event; returns its kind. ProtocolError if it is malformed."""
        kind = _str(event, "event")
        if kind == "snapshot":
            self.load_snapshot(event)
        elif kind in ("device_registered", "device_refreshed", "device_unreachable", "device_reachable"):
            device = _device(_map(event, "device"))
            self.devices[device.id] = device
        elif kind == "device_removed":
            self.devices.pop(_str(_map(event, "device"), "id"), None)
        elif kind == "call_ended":
            self.calls.pop(_str(_map(event, "call"), "id"), None)
        elif kind.startswith(("call_", "device_")) and "call" in event:
            call = _call(_map(event, "call"))
            self.calls[call.id] = call
        elif kind == "address_blocked":
            self.blocked[_str(event, "address")] = _float(event, "until")
        elif kind == "trunk_changed":
            trunk = _trunk(_map(event, "trunk"))
            self.trunks[trunk.name] = trunk
        elif kind == "trunk_removed":
            self.trunks.pop(_str(event, "name"), None)
        elif kind == "config_changed" and "numbers" in event:
            self._load_numbers(_list(event, "numbers"))
        return kind

    # -- questions the screen asks ---------------------------------------------------------
    @property
    def reachable_at(self) -> tuple[str, ...]:
        """Where handsets reach the box: its real addresses, else (older daemon) the config's."""
        return self.addresses or self.listen

    def blocked_now(self, now: float) -> list[tuple[str, float]]:
        """Addresses blocked at `now`, the block ending soonest last; expired ones forgotten."""
        self.blocked = {a: u for a, u in self.blocked.items() if u > now}
        return sorted(self.blocked.items(), key=lambda item: -item[1])

    def devices_of(self, number: str) -> list[Device]:
        return sorted((d for d in self.devices.values() if d.number == number), key=lambda d: (d.registered_at, d.id))

    def device_state(self, device_id: str) -> DeviceState:
        """Same rule as the daemon's: ringing, talking (answered it, or placed it and it
        was answered), in conference (joined, or talking in a call someone joined)."""
        for call in self.calls.values():
            if call.phase == "ended":
                continue
            if device_id in call.joined:
                return DeviceState.CONFERENCE
            if device_id == call.answered_by or (device_id == call.caller_device and call.phase == "answered"):
                return DeviceState.CONFERENCE if call.joined else DeviceState.TALKING
            if device_id in call.ringing:
                return DeviceState.RINGING
        return DeviceState.IDLE

    def call_of(self, device_id: str) -> Call | None:
        for call in self.calls.values():
            if device_id in (call.answered_by, call.caller_device) or device_id in call.joined or (
                device_id in call.ringing
            ):
                return call
        return None

    def outgoing_in_use(self, number: str) -> int:
        return sum(1 for c in self.calls.values() if c.caller == number and c.caller_device)

    def device_label(self, device_id: str | None) -> str:
        if device_id is None:
            return "?"
        device = self.devices.get(device_id)
        return device.label if device is not None else device_id

    def party(self, number: str) -> str:
        """A number as a person reads it: "100 Grandpa"."""
        known = self.numbers.get(number)
        return known.title if known is not None else number


# -- tolerant readers: wrong types become ProtocolError, never a crash -------------------------
def _map(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{key}: expected an object")
    return value


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ProtocolError(f"{key}: expected a list")
    return value


def _str(data: Mapping[str, Any], key: str, default: str = "") -> str:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ProtocolError(f"{key}: expected a string")
    return value


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else _str(data, key)


def _float(data: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{key}: expected a number")
    return float(value)


def _int(data: Mapping[str, Any], key: str, default: int = 0) -> int:
    return int(_float(data, key, default))


def _bool(data: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key}: expected true or false")
    return value


def _strs(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    items = _list(data, key)
    if not all(isinstance(i, str) for i in items):
        raise ProtocolError(f"{key}: expected strings")
    return tuple(items)


def _number(raw: object) -> Number:
    if not isinstance(raw, Mapping):
        raise ProtocolError("numbers: expected objects")
    max_devices = _int(raw, "max_devices", 1)
    one_number = _bool(raw, "one_number")
    return Number(
        number=_str(raw, "number"), name=_str(raw, "name"), one_number=one_number,
        max_devices=max_devices, device_limit=_int(raw, "device_limit", max_devices if one_number else 1),
        max_outgoing_calls=_int(raw, "max_outgoing_calls"),
        forward_always=_str(raw, "forward_always"), forward_busy=_str(raw, "forward_busy"),
        forward_no_answer=_str(raw, "forward_no_answer"), forward_unreachable=_str(raw, "forward_unreachable"),
        no_answer_after=_int(raw, "no_answer_after", 20), dnd=_bool(raw, "dnd"), dnd_devices=_strs(raw, "dnd_devices"),
    )


def _device(raw: object) -> Device:
    if not isinstance(raw, Mapping):
        raise ProtocolError("device: expected an object")
    return Device(
        id=_str(raw, "id"), number=_str(raw, "number"), user_agent=_str(raw, "user_agent"),
        transport=_str(raw, "transport"), address=_str(raw, "address"),
        registered_at=_float(raw, "registered_at"), expires_at=_float(raw, "expires_at"),
        reachable=_bool(raw, "reachable", True),
        unreachable_reason=_str(raw, "unreachable_reason"),
        device_id=_str(raw, "device_id"), dnd=_bool(raw, "dnd"),
    )


def _trunk(raw: object) -> Trunk:
    if not isinstance(raw, Mapping):
        raise ProtocolError("trunk: expected an object")
    next_attempt = raw.get("next_attempt")
    return Trunk(
        name=_str(raw, "name"), server=_str(raw, "server"), status=_str(raw, "status"),
        reason=_str(raw, "reason"), since=_float(raw, "since"),
        next_attempt=None if next_attempt is None else _float(raw, "next_attempt"),
    )


def _call(raw: object) -> Call:
    if not isinstance(raw, Mapping):
        raise ProtocolError("call: expected an object")
    answered_at = raw.get("answered_at")
    return Call(
        id=_str(raw, "id"), caller=_str(raw, "caller"), callee=_str(raw, "callee"),
        caller_device=_opt_str(raw, "caller_device"), phase=_str(raw, "phase", "ringing"),
        ringing=_strs(raw, "ringing"), answered_by=_opt_str(raw, "answered_by"), joined=_strs(raw, "joined"),
        started_at=_float(raw, "started_at"),
        answered_at=None if answered_at is None else _float(raw, "answered_at"),
    )
