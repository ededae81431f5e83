"""Turns the call router's events (`CallEvents`) into one history row per call.

Nothing is written while a call goes on: its row is made when it ends and handed to the
store (`CallHistory.add`), which commits it off the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from appliance.config import LiveConfig
from appliance.history.store import CallRecord
from appliance.sip.registrar import Binding


class RowSink(Protocol):
    def add(self, record: CallRecord) -> None: ...


class Devices(Protocol):
    def get(self, binding_id: str) -> Binding | None: ...


@dataclass(init=False)
class _Call:
    call_id: str
    caller: str
    callee: str
    caller_device: str | None
    trunk: str
    caller_name: str
    started: float
    rang: bool
    answered: float | None
    answered_by: str
    answered_number: str
    forwarded_to: str
    condition: str
    voicemail: bool

    def __init__(self, call_id: str, caller: str, callee: str, caller_device: str | None, trunk: str,
                 caller_name: str, started: float) -> None:
        # Written out (one per call): mypyc compiles this one, not the dataclass's.
        self.call_id = call_id
        self.caller = caller
        self.callee = callee
        self.caller_device = caller_device
        self.trunk = trunk
        self.caller_name = caller_name
        self.started = started
        self.rang = False
        self.answered = None
        self.answered_by = ""
        self.answered_number = ""
        self.forwarded_to = ""
        self.condition = ""
        self.voicemail = False


def status_of(reason: str) -> int | None:
    """The SIP status a `status_NNN` end reason carries."""
    if reason.startswith("status_") and reason[7:].isdigit():
        return int(reason[7:])
    return None


def outcome_of(direction: str, *, answered: bool, rang: bool, forwarded: bool, voicemail: bool,
               reason: str) -> str:
    """What became of a call, from what was seen of it and why it ended.

    A call that reached the answering machine or was forwarded says so (answered by the
    target or not: `answered_by` tells). One not answered: busy (486, 600), declined (603),
    given up by the caller (487) -- missed when a device of ours rang for it, else
    cancelled --, nobody answered in time or nobody reachable (480, 408): missed for a call
    to one of ours, failed for a call out; anything else failed.
    """
    if voicemail:
        return "voicemail"
    if forwarded:
        return "forwarded"
    if answered:
        return "answered"
    status = status_of(reason)
    to_us = direction != "outgoing"
    if status in (486, 600):
        return "busy"
    if status == 603:
        return "declined"
    if status == 487 or reason in ("cancelled", "bye_from_caller", "caller_hangup"):
        return "missed" if to_us and rang else "cancelled"
    if status in (480, 408) or reason == "rejected":
        return "missed" if to_us else "failed"
    return "failed"


class HistoryRecorder:
    """A `CallEvents` sink (fed by `CallEventsFanOut`): one `CallRecord` per call, at its end."""

    def __init__(self, settings: LiveConfig, devices: Devices, sink: RowSink, *,
                 wall: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.devices = devices
        self.sink = sink
        self.wall = wall
        self._calls: dict[str, _Call] = {}

    def call_started(self, call_id: str, caller: str, callee: str, caller_device: str | None, *,
                     trunk: str | None = None, caller_name: str = "") -> None:
        self._calls[call_id] = _Call(call_id, caller, callee, caller_device, trunk or "", caller_name, self.wall())

    def device_ringing(self, call_id: str, binding_id: str) -> None:
        call = self._calls.get(call_id)
        if call is not None:
            call.rang = True

    def device_stopped(self, call_id: str, binding_id: str) -> None:
        pass

    def call_answered(self, call_id: str, binding_id: str | None) -> None:
        call = self._calls.get(call_id)
        if call is None or call.answered is not None:
            return
        call.answered = self.wall()
        binding = self.devices.get(binding_id) if binding_id else None
        if binding is not None:
            call.answered_by = binding.user_agent or f"{binding.flow.host}:{binding.flow.port}"
            call.answered_number = binding.number
        elif call.trunk and self.settings.current.user(call.callee) is None:
            call.answered_by, call.answered_number = call.trunk, call.callee  # a call out: the far end
        else:
            call.answered_number = call.forwarded_to or call.callee

    def call_joined(self, call_id: str, binding_id: str) -> None:
        pass

    def call_left(self, call_id: str, binding_id: str) -> None:
        pass

    def call_forwarded(self, call_id: str, number: str, to: str, condition: str) -> None:
        call = self._calls.get(call_id)
        if call is not None:
            call.forwarded_to, call.condition = to, condition

    def call_transferred(self, call_id: str, caller: str, callee: str, binding_id: str | None) -> None:
        pass  # the row keeps who called whom and who answered first

    def call_to_voicemail(self, call_id: str, number: str) -> None:
        call = self._calls.get(call_id)
        if call is not None:
            call.voicemail = True

    def call_ended(self, call_id: str, reason: str) -> None:
        call = self._calls.pop(call_id, None)
        if call is None:
            return
        self.sink.add(self.record(call, reason, self.wall()))

    def record(self, call: _Call, reason: str, ended: float) -> CallRecord:
        config = self.settings.current
        caller_user = config.user(call.caller)
        callee_user = config.user(call.callee)
        if call.caller_device is None and caller_user is None:
            direction = "incoming"
        elif callee_user is None and call.trunk:
            direction = "outgoing"
        else:
            direction = "internal"
        outcome = outcome_of(direction, answered=call.answered is not None, rang=call.rang,
                             forwarded=bool(call.forwarded_to), voicemail=call.voicemail, reason=reason)
        return CallRecord(
            call_id=call.call_id, started=call.started, ended=ended, caller=call.caller, callee=call.callee,
            direction=direction, outcome=outcome, answered=call.answered,
            caller_name=caller_user.name if caller_user is not None else call.caller_name,
            callee_name=callee_user.name if callee_user is not None else "",
            answered_by=call.answered_by, answered_number=call.answered_number,
            forwarded_to=call.forwarded_to, condition=call.condition, trunk=call.trunk,
            duration=round(ended - call.answered, 1) if call.answered is not None else 0.0, reason=reason,
        )
