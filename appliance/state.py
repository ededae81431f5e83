"""Live state of the exchange (devices, calls) and the event bus that reports its changes.

The edge sees every message, so it is the single source of truth; the proxy and the
registrar tell this model what happened, and listeners (the control socket, hence the TUI)
get one event per change. Events are plain dicts ready for JSON.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from appliance.config import Config, LiveConfig, UserConfig, device_id
from appliance.netaddr import AddressCache
from appliance.sip.registrar import Binding, EventKind, Registrar, RegistrarEvent

log = logging.getLogger("homepbx.state")

Event = dict[str, Any]
Listener = Callable[[Event], None]
MAX_BLOCKED_SHOWN = 1000
"""Blocked addresses kept for display; the throttle itself tracks up to 50,000."""


class DeviceState(Enum):
    IDLE = "idle"
    RINGING = "ringing"
    TALKING = "talking"
    CONFERENCE = "conference"


class CallPhase(Enum):
    RINGING = "ringing"
    ANSWERED = "answered"
    ENDED = "ended"


@dataclass(init=False)
class CallView:
    """What a person wants to know about one call."""

    id: str
    caller: str  # number of the caller
    callee: str  # dialled number
    caller_device: str | None  # binding id of the calling handset, if one of ours
    phase: CallPhase
    ringing: set[str]
    answered_by: str | None
    joined: list[str]
    started_at: float
    answered_at: float | None

    def __init__(self, id: str, caller: str, callee: str, caller_device: str | None, *,
                 started_at: float = 0.0) -> None:
        # Written out (one per call): mypyc compiles this one, not the dataclass's.
        self.id = id
        self.caller = caller
        self.callee = callee
        self.caller_device = caller_device
        self.phase = CallPhase.RINGING
        self.ringing = set()
        self.answered_by = None
        self.joined = []
        self.started_at = started_at
        self.answered_at = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "caller": self.caller, "callee": self.callee,
            "caller_device": self.caller_device, "phase": self.phase.value,
            "ringing": sorted(self.ringing), "answered_by": self.answered_by,
            "joined": list(self.joined), "started_at": self.started_at,
            "answered_at": self.answered_at,
        }


_DEVICE_EVENTS = {
    EventKind.REGISTERED: "device_registered", EventKind.REFRESHED: "device_refreshed",
    EventKind.REMOVED: "device_removed", EventKind.UNREACHABLE: "device_unreachable",
    EventKind.REACHABLE: "device_reachable",
}


class LiveState:
    def __init__(self, registrar: Registrar, settings: LiveConfig, *, wall: Callable[[], float] = time.time,
                 box_addresses: AddressCache | None = None) -> None:
        self.registrar = registrar
        self.settings = settings
        self.wall = wall
        self.calls: dict[str, CallView] = {}
        self.blocked: dict[str, tuple[float, str]] = {}  # address -> (blocked until, wall clock; reason)
        self.trunks: dict[str, dict[str, Any]] = {}  # trunk name -> its view (edge.trunks)
        self._listeners: list[Listener] = []
        self.started_at = wall()
        self.box_addresses = box_addresses or AddressCache()

    @property
    def config(self) -> Config:
        return self.settings.current

    # -- listeners ----------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def emit(self, event: Event) -> None:
        event.setdefault("time", self.wall())
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener's bug must not break call handling
                log.exception("event=listener_failed")

    # -- devices ------------------------------------------------------------------------
    def device_event(self, event: RegistrarEvent) -> None:
        if not self._listeners:
            return  # nobody watching: don't build the event (refreshes come by thousands)
        payload: Event = {"event": _DEVICE_EVENTS[event.kind], "device": self.device_json(event.binding)}
        if event.reason:
            payload["reason"] = event.reason
        self.emit(payload)

    def device_state(self, binding_id: str) -> DeviceState:
        for call in self.calls.values():
            if call.phase is CallPhase.ENDED:
                continue
            if binding_id in call.joined:
                return DeviceState.CONFERENCE
            if binding_id == call.answered_by or (
                binding_id == call.caller_device and call.phase is CallPhase.ANSWERED
            ):
                return DeviceState.CONFERENCE if call.joined else DeviceState.TALKING
            if binding_id in call.ringing:
                return DeviceState.RINGING
        return DeviceState.IDLE

    def device_json(self, b: Binding) -> dict[str, Any]:
        return {
            "id": b.id, "number": b.number, "contact": b.contact, "user_agent": b.user_agent,
            "transport": b.flow.transport, "address": f"{b.flow.host}:{b.flow.port}",
            "registered_at": b.registered_at, "expires_at": b.expires_at,
            "reachable": b.reachable, "unreachable_reason": b.unreachable_reason,
            "state": self.device_state(b.id).value,
            "device_id": (dev := device_id(b.instance, b.contact)),
            "dnd": self._device_dnd(b.number, dev),
        }

    def _device_dnd(self, number: str, dev: str) -> bool:
        user = self.config.user(number)
        return user is not None and dev in user.dnd_devices

    # -- calls (told by the proxy) --------------------------------------------------------
    def call_started(self, call_id: str, caller: str, callee: str, caller_device: str | None, *,
                     trunk: str | None = None, caller_name: str = "") -> None:
        call = CallView(call_id, caller, callee, caller_device, started_at=self.wall())
        self.calls[call_id] = call
        self._call_changed("call_started", call)

    def device_ringing(self, call_id: str, binding_id: str) -> None:
        call = self.calls.get(call_id)
        if call is None or binding_id in call.ringing or call.phase is not CallPhase.RINGING:
            return
        call.ringing.add(binding_id)
        self._call_changed("device_ringing", call, device=binding_id)

    def device_stopped(self, call_id: str, binding_id: str) -> None:
        call = self.calls.get(call_id)
        if call is None or binding_id not in call.ringing:
            return
        call.ringing.discard(binding_id)
        self._call_changed("device_stopped", call, device=binding_id)

    def call_answered(self, call_id: str, binding_id: str | None) -> None:
        call = self.calls.get(call_id)
        if call is None or call.phase is not CallPhase.RINGING:
            return
        call.phase = CallPhase.ANSWERED
        call.answered_by = binding_id
        call.answered_at = self.wall()
        call.ringing.clear()
        self._call_changed("call_answered", call, device=binding_id)

    def call_joined(self, call_id: str, binding_id: str) -> None:
        call = self.calls.get(call_id)
        if call is None:
            return
        call.joined.append(binding_id)
        self._call_changed("call_joined", call, device=binding_id)

    def call_left(self, call_id: str, binding_id: str) -> None:
        """A device left a call that goes on: a joiner, or the device that answered."""
        call = self.calls.get(call_id)
        if call is None:
            return
        if binding_id in call.joined:
            call.joined.remove(binding_id)
        elif binding_id == call.answered_by:
            call.answered_by = None
        else:
            return
        self._call_changed("call_left", call, device=binding_id)

    def call_ended(self, call_id: str, reason: str) -> None:
        call = self.calls.pop(call_id, None)
        if call is None:
            return
        call.phase = CallPhase.ENDED
        call.ringing.clear()
        self._call_changed("call_ended", call, reason=reason)

    def call_forwarded(self, call_id: str, number: str, to: str, condition: str) -> None:
        pass  # the devices of the target ring as any (device_ringing)

    def call_to_voicemail(self, call_id: str, number: str) -> None:
        pass  # the worker answers: nothing a person sees in the live view

    def call_transferred(self, call_id: str, caller: str, callee: str, binding_id: str | None) -> None:
        call = self.calls.get(call_id)
        if call is None:
            return
        if caller != call.caller:
            call.caller_device = None  # the calling handset transferred the call and left it
        call.caller, call.callee, call.answered_by = caller, callee, binding_id
        self._call_changed("call_transferred", call, device=binding_id)

    def _call_changed(self, kind: str, call: CallView, **extra: Any) -> None:
        if not self._listeners:
            return  # nobody watching: don't build the event (a few per call)
        event: Event = {"event": kind, "call": call.to_json(), **extra}
        self.emit(event)

    # -- security ---------------------------------------------------------------------------
    def address_blocked(self, address: str, seconds: float, reason: str) -> None:
        """An address is ignored for `seconds`: shown until then (clients drop it at `until`)."""
        now = self.wall()
        self.blocked = {a: v for a, v in self.blocked.items() if v[0] > now}  # bounded by the throttle's own cap
        until = now + seconds
        self.blocked.pop(address, None)  # re-inserted: newest last
        self.blocked[address] = (until, reason)
        while len(self.blocked) > MAX_BLOCKED_SHOWN:  # a storm of addresses: keep the newest
            del self.blocked[next(iter(self.blocked))]
        self.emit({"event": "address_blocked", "address": address, "until": until, "reason": reason})

    def auth_abandoned(self, number: str, address: str, user_agent: str) -> None:
        """A handset gave up on the SHA-256 challenge: the TUI says so (it is offered MD5 now)."""
        self.emit({"event": "auth_abandoned", "number": number, "address": address, "user_agent": user_agent})

    def blocked_json(self) -> list[dict[str, Any]]:
        now = self.wall()
        return [{"address": a, "until": u, "reason": r} for a, (u, r) in sorted(self.blocked.items()) if u > now]

    # -- trunks (told by edge.trunks) ----------------------------------------------------------
    def trunk_changed(self, view: dict[str, Any]) -> None:
        """A trunk's registration changed (registered, failing, refused, not registering)."""
        self.trunks[view["name"]] = view
        self.emit({"event": "trunk_changed", "trunk": dict(view)})

    def trunk_removed(self, name: str) -> None:
        if self.trunks.pop(name, None) is not None:
            self.emit({"event": "trunk_removed", "name": name})

    def trunks_json(self) -> list[dict[str, Any]]:
        """In config order; a trunk not heard of yet is not shown."""
        return [dict(self.trunks[t.name]) for t in self.config.trunks if t.name in self.trunks]

    # -- snapshot ---------------------------------------------------------------------------
    def outgoing_in_use(self, number: str) -> int:
        return sum(1 for c in self.calls.values() if c.caller == number and c.caller_device)

    def snapshot(self) -> dict[str, Any]:
        """Everything a freshly connected client needs to draw the screen."""
        numbers = []
        for user in self.config.users:
            devices = [self.device_json(b) for b in self.registrar.bindings(user.number)]
            numbers.append({
                "number": user.number, "name": user.name, "one_number": user.one_number,
                "max_devices": user.max_devices, "device_limit": user.device_limit,
                "max_outgoing_calls": user.max_outgoing_calls,
                "outgoing_in_use": self.outgoing_in_use(user.number),
                "decline": user.decline, "ring_timeout": user.ring_timeout,
                **forwarding_json(user),
                "devices": devices,
            })
        server = self.config.server
        return {
            "event": "snapshot", "time": self.wall(), "started_at": self.started_at,
            "realm": server.realm, "listen": [str(a) for a in server.listen],
            "addresses": self.box_addresses.addresses(server.listen, self.wall()),
            "numbers": numbers, "calls": [c.to_json() for c in self.calls.values()],
            "blocked": self.blocked_json(), "trunks": self.trunks_json(),
        }


def forwarding_json(user: UserConfig) -> dict[str, Any]:
    """A user's forwarding and DND settings, as the TUI shows them."""
    return {
        "forward_always": user.forward_always, "forward_busy": user.forward_busy,
        "forward_no_answer": user.forward_no_answer, "forward_unreachable": user.forward_unreachable,
        "no_answer_after": user.no_answer_after, "dnd": user.dnd, "dnd_devices": list(user.dnd_devices),
    }

