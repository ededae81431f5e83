"""Who may call whom, and where a call goes: decisions as pure functions (sans-I/O).

The call router in the edge gathers a request's facts (who the authenticated caller is,
from which of its devices, what was dialled, which devices are reachable, which calls are
in progress) and asks here; it only carries out the answer. Every refusal and every route
is therefore decided in one place and unit-tested without sockets, processes or clocks
(tests/unit/test_call_policy.py). Calls from the provider are decided by `decide_incoming`;
calls out through a trunk (`RouteToTrunk`, and `ToProvider` for the worker's leg of
one) are decided here too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from appliance.config import Config, TrunkConfig, UserConfig

MAX_PARTIES = 3
"""A call has at most three parties: the two ends and one joining device (`*74`)."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the INVITE with `status reason` and do nothing else; `why` goes to the log."""

    status: int
    reason: str
    why: str


class RingNumber(NamedTuple):
    """Ring these devices of `number` at once (ring-all); the first to answer takes the call."""

    number: str
    devices: tuple[str, ...]
    """Binding ids, in registration order."""
    ring_timeout: float
    decline_all: bool
    """One device declining stops them all (`decline = "all_devices"`)."""
    counts_outgoing: bool
    """The call counts against the caller's `max_outgoing_calls` while it lasts."""


@dataclass(frozen=True, slots=True)
class JoinCall:
    """Add `device` to the call `token`, anchored in the media worker on `worker_port`."""

    token: str
    worker_port: int
    device: str


@dataclass(frozen=True, slots=True)
class RouteToTrunk:
    """Send the call out through the provider of `trunk`, to `number` (prefix stripped)."""

    trunk: str
    number: str
    caller_id: str
    """The number the provider is asked to show: the extension's `caller_id`, else the trunk's username."""
    emergency: bool
    """An emergency number: no limit of ours refused it."""
    counts_outgoing: bool = True
    """Counts against the caller's `max_outgoing_calls` while it lasts (emergency calls too)."""


@dataclass(frozen=True, slots=True)
class ToProvider:
    """The media worker's leg of a call out: to the provider of `trunk`, as `number`."""

    trunk: TrunkConfig
    number: str


@dataclass(frozen=True, slots=True)
class PickupCall:
    """Answer the call `token`, ringing at `number`, on the picker's device instead: the
    media worker on `worker_port` answers the picker, bridges it with the caller and
    cancels its ringing leg."""

    token: str
    worker_port: int
    number: str


@dataclass(frozen=True, slots=True)
class Forward:
    """The call to `hops[-1][0]` goes on to `to` instead (RFC 5806 diversion)."""

    to: RingNumber | RouteToTrunk
    hops: tuple[tuple[str, str], ...]
    """(forwarding number, condition) for every diversion on the way, first first."""

    @property
    def number(self) -> str:
        """The number that forwarded last: a call out counts on its outgoing limit."""
        return self.hops[-1][0]

    @property
    def chain(self) -> tuple[str, ...]:
        return tuple(number for number, _ in self.hops)


@dataclass(frozen=True, slots=True)
class ToVoicemail:
    """The call goes to `number`'s answering machine (`condition`: why), which takes a
    message of at most `max_seconds`."""

    number: str
    condition: str
    max_seconds: int


@dataclass(frozen=True, slots=True)
class OpenMailbox:
    """The mailbox code from a device of `number`: a media worker plays its messages."""

    number: str
    device: str


@dataclass(frozen=True, slots=True)
class ChangeSettings:
    """A feature code from a handset: change `number`'s settings (saved in config.toml)."""

    number: str
    service: str
    changes: Mapping[str, object]


Decision = Refuse | RingNumber | JoinCall | RouteToTrunk | ChangeSettings

OUTSIDE_NUMBER = re.compile(r"\+?[0-9*#]{1,32}")
"""What may be dialled out through a trunk once the prefix is stripped."""


@dataclass(frozen=True, slots=True)
class CallInProgress:
    """What the policy needs to know of a call the edge is carrying."""

    token: str
    caller: str
    callee: str
    caller_device: str | None
    answered: bool
    worker_port: int | None
    parties: int
    """Devices talking: two, three with a joined device."""
    trunk: str | None = None
    """The trunk an outside call came in on: `caller` is then an outside number, never an extension."""
    outgoing_trunk: str | None = None
    """The trunk a call out leaves by: `callee` is then an outside number."""


ReachableDevices = Callable[[str], Sequence[str]]
"""A number -> the binding ids of its devices that can be rung now."""
DeviceIds = Callable[[str, str], str]
"""(number, binding id) -> the device's stable id (what `dnd_devices` names)."""
FORWARD_CONDITIONS = ("always", "busy", "no_answer", "unreachable", "dnd")
MAX_FORWARDS = 5
"""Diversions one call may take; more is treated as a loop."""
DIVERSION_REASONS = {"always": "unconditional", "busy": "user-busy", "no_answer": "no-answer",
                     "unreachable": "unavailable", "dnd": "do-not-disturb"}
"""RFC 5806 reasons, by condition."""


def decide_new_call(caller: UserConfig, caller_device: str | None, dialled: str, config: Config,
                    reachable: ReachableDevices, outgoing_in_use: Mapping[str, int],
                    calls: Sequence[CallInProgress], anchored: bool, device_ids: DeviceIds | None = None) -> Decision:
    """An authenticated handset of `caller` dialled `dialled` (a number or a feature code)."""
    if config.feature_codes.get(dialled) == "join":
        return decide_join(caller, caller_device, calls, anchored)
    feature = decide_feature_code(caller, dialled, config)
    if feature is not None:
        return feature
    callee = config.user(dialled) if dialled else None
    route = _trunk_route(dialled, config) if callee is None else None
    if route is not None and route[1] in config.emergency_numbers:
        # Emergency: dialled as it is, with or without the prefix; no limit of ours refuses it.
        trunk, number = route
        return RouteToTrunk(trunk.name, number, caller.caller_id or trunk.username, emergency=True)
    if callee is None and route is None:
        return Refuse(404, "Not Found", "unknown_number")
    limit = caller.max_outgoing_calls
    in_use = outgoing_in_use.get(caller.number, 0)
    if limit and in_use >= limit:
        return Refuse(403, f"Outgoing call limit reached ({in_use} of {limit})", "outgoing_limit")
    if route is not None:
        trunk, number = route
        channels = sum(1 for c in calls if trunk.name in (c.trunk, c.outgoing_trunk))
        if channels >= trunk.max_channels:
            return Refuse(503, f"Service Unavailable (all {trunk.max_channels} lines to the provider busy)",
                          "trunk_channels_full")
        return RouteToTrunk(trunk.name, number, caller.caller_id or trunk.username, emergency=False)
    assert callee is not None
    return _ring(callee, caller_device, reachable, counts_outgoing=True, forwarding=config if anchored else None,
                 device_ids=device_ids, outgoing_in_use=outgoing_in_use, calls=calls)


def pickup_request(dialled: str, config: Config) -> tuple[str | None] | None:
    """Is `dialled` a pickup code? `(None,)` for "pickup" (`*8`: any call ringing at another
    number), `(number,)` for "pickup_directed" (`**200`: the code is a prefix), else None."""
    service = config.feature_codes.get(dialled)
    if service == "pickup":
        return (None,)
    for code, service in config.feature_codes.items():
        if service == "pickup_directed" and dialled.startswith(code) and len(dialled) > len(code):
            return (dialled[len(code):],)
    return None


def decide_pickup(picker: UserConfig, device: str | None, target: str | None, config: Config,
                  ringing: Sequence[CallInProgress], anchored: bool, *,
                  token: str | None = None) -> Refuse | PickupCall:
    """A device of `picker` picks up a call ringing elsewhere: the one ringing at `target`
    (directed), the call `token` (a BLF key's INVITE with Replaces), or else any call
    ringing at another number (`*8`; "another number" is the group, any extension for now).

    `ringing` are the calls whose devices ring now (not answered, anchored in a worker).
    The oldest matching call is taken. Nothing to pick up: 404 (a code) or 481 (Replaces).
    """
    missing = (481, "Call/Transaction Does Not Exist") if token is not None else (404, "No call to pick up")
    if device is None:
        return Refuse(403, f"Not a registered device of {picker.number}", "pickup_unregistered_device")
    if target is not None and config.user(target) is None:
        return Refuse(404, "Not Found", "pickup_unknown_number")
    candidates = [c for c in ringing
                  if not c.answered and c.worker_port and c.outgoing_trunk is None
                  and config.user(c.callee) is not None and c.caller_device != device]
    if token is not None:
        candidates = [c for c in candidates if c.token == token]
    elif target is not None:
        candidates = [c for c in candidates if c.callee == target]
    else:
        candidates = [c for c in candidates if c.callee != picker.number]
    if not anchored or not candidates:
        return Refuse(*missing, "pickup_no_call")
    call = candidates[0]
    assert call.worker_port is not None
    return PickupCall(call.token, call.worker_port, call.callee)


def _trunk_route(dialled: str, config: Config) -> tuple[TrunkConfig, str] | None:
    """The trunk a dialled number that is no extension leaves by, and the number the
    provider is given: a trunk's `outgoing_prefix` stripped (`""` takes any number no other
    prefix claims); an emergency number as it is, on the first trunk."""
    if not config.trunks:
        return None
    if dialled in config.emergency_numbers:
        return config.trunks[0], dialled
    prefixed = [t for t in config.trunks if t.outgoing_prefix and dialled.startswith(t.outgoing_prefix)]
    trunk = prefixed[0] if prefixed else next((t for t in config.trunks if not t.outgoing_prefix), None)
    if trunk is None:
        return None
    number = dialled[len(trunk.outgoing_prefix):]
    if not OUTSIDE_NUMBER.fullmatch(number):
        return None
    return trunk, number


def decide_join(user: UserConfig, device: str | None, calls: Sequence[CallInProgress], anchored: bool) -> Decision:
    """`*74`: a device of a one-number user joins that number's call in progress."""
    number = user.number
    if not user.one_number:
        return Refuse(403, "Join needs one-number on", "join_needs_one_number")
    if device is None:
        return Refuse(403, f"Not a registered device of {number}", "join_unregistered_device")
    # An outside caller's number is not an extension, even when its digits are the same.
    active = [c for c in calls
              if c.answered and c.worker_port and c.caller_device != device
              and (c.callee == number or (c.caller == number and c.trunk is None))]
    if not anchored or not active:
        return Refuse(404, "No active call to join", "join_no_call")
    target = next((c for c in active if c.callee == number), active[0])
    if target.parties >= MAX_PARTIES:
        return Refuse(486, "Busy Here (call already has three parties)", "join_full")
    assert target.worker_port is not None
    return JoinCall(target.token, target.worker_port, device)


def decide_incoming(trunk: TrunkConfig, uri_user: str, to_user: str, config: Config,
                     reachable: ReachableDevices, device_ids: DeviceIds | None = None,
                     anchored: bool = True) -> Refuse | RingNumber:
    """A call the provider of `trunk` sends in (recognised by its source address, not challenged).

    The called number (DID) is the Request-URI's user; a provider that puts the account's
    user name there and the DID only in To is served by the To user (an explicit route for
    either wins over `"*"`). A number matches with or without its leading `+`. The call
    rings the extension's devices like an internal call, and counts against no one's
    outgoing limit.
    """
    called = [n for n in (uri_user, to_user) if n]
    extension = next((ext for n in called if (ext := _route(trunk.incoming, n)) is not None), None)
    if extension is None:
        extension = trunk.incoming.get("*")
    callee = config.user(extension) if extension is not None else None
    if callee is None:
        return Refuse(404, "Not Found", "unknown_did")
    return _ring(callee, None, reachable, counts_outgoing=False, forwarding=config if anchored else None,
                 device_ids=device_ids)


def _route(incoming: Mapping[str, str], number: str) -> str | None:
    if number == "*":
        return None  # "*" is the fallback, never a number someone dialled
    for candidate in (number, number.removeprefix("+"), "+" + number):
        if candidate in incoming:
            return incoming[candidate]
    return None


def decide_worker_leg(anchoring: CallInProgress | None, worker_port: int, dialled: str, config: Config,
                      reachable: ReachableDevices, *, device_ids: DeviceIds | None = None,
                      outgoing_in_use: Mapping[str, int] | None = None,
                      calls: Sequence[CallInProgress] = ()) -> Refuse | RingNumber | ToProvider | Forward | ToVoicemail:
    """A media worker's outgoing leg of an anchored call: trusted only for the call it anchors."""
    if anchoring is None or anchoring.worker_port != worker_port:
        return Refuse(403, "Forbidden", "worker_not_anchoring")
    if anchoring.outgoing_trunk is not None:
        trunk = next((t for t in config.trunks if t.name == anchoring.outgoing_trunk), None)
        if trunk is None:  # removed by a reload a moment ago
            return Refuse(404, "Not Found", "trunk_removed")
        return ToProvider(trunk, dialled)
    callee = config.user(dialled)
    if callee is None:
        return Refuse(404, "Not Found", "unknown_number")
    forward = forward_before_ringing(callee, anchoring.caller_device, (), config, reachable, device_ids,
                                     outgoing_in_use or {}, calls)
    if forward is not None:
        return forward
    return _ring(callee, anchoring.caller_device, reachable, counts_outgoing=False, device_ids=device_ids)


def _ring(callee: UserConfig, caller_device: str | None, reachable: ReachableDevices, *,
          counts_outgoing: bool, forwarding: Config | None = None, device_ids: DeviceIds | None = None,
          outgoing_in_use: Mapping[str, int] | None = None,
          calls: Sequence[CallInProgress] = ()) -> Refuse | RingNumber:
    """Ring `callee`'s devices; with `forwarding` (the config; the call is anchored in a
    media worker), a forward that applies before ringing (always, DND, unreachable) leaves
    the devices out: the worker's leg is forwarded (`decide_worker_leg`), or a refusal
    (DND without forwarding, a loop) answers at once."""
    devices = tuple(d for d in reachable(callee.number) if d != caller_device)  # never ring the caller itself
    if forwarding is not None:
        forward = forward_before_ringing(callee, caller_device, (), forwarding, reachable, device_ids,
                                         outgoing_in_use or {}, calls)
        if isinstance(forward, Refuse):
            return forward
        if forward is not None:
            return RingNumber(callee.number, (), float(callee.ring_seconds), callee.decline == "all_devices",
                              counts_outgoing)
    devices = ring_targets(callee, devices, device_ids)
    if not devices:
        return Refuse(480, "Temporarily Unavailable", "no_reachable_device")
    return RingNumber(callee.number, devices, float(callee.ring_seconds), callee.decline == "all_devices",
                      counts_outgoing)


# -- forwarding and do-not-disturb ------------------------------------------------------------

def ring_targets(user: UserConfig, devices: Sequence[str], device_ids: DeviceIds | None) -> tuple[str, ...]:
    """The devices that ring: a device in DND (`dnd_devices`) is left out."""
    if device_ids is None or not user.dnd_devices:
        return tuple(devices)
    return tuple(d for d in devices if device_ids(user.number, d) not in user.dnd_devices)


def ringing_condition(user: UserConfig, devices: Sequence[str], device_ids: DeviceIds | None) -> str | None:
    """Why `user` is not simply rung (before any device rings): "always", "dnd" (the number,
    or every reachable device, in DND), "unreachable" (no device); None: ring it."""
    if user.forward_always:
        return "always"
    if user.dnd:
        return "dnd"
    if not devices:
        return "unreachable"
    if not ring_targets(user, devices, device_ids):
        return "dnd"
    return None


def forward_target(user: UserConfig, condition: str) -> str:
    """Where `user` forwards a call under `condition` ("" = nowhere); DND forwards as busy does."""
    field = {"always": "forward_always", "busy": "forward_busy", "dnd": "forward_busy",
             "no_answer": "forward_no_answer", "unreachable": "forward_unreachable"}[condition]
    target: str = getattr(user, field)
    return target


def forward_before_ringing(user: UserConfig, caller_device: str | None, hops: tuple[tuple[str, str], ...],
                           config: Config, reachable: ReachableDevices, device_ids: DeviceIds | None,
                           outgoing_in_use: Mapping[str, int],
                           calls: Sequence[CallInProgress]) -> Forward | Refuse | ToVoicemail | None:
    """A call for `user` before anything rings: forwarded (always, DND, unreachable),
    to the answering machine (DND, unreachable, without forwarding), refused (DND without
    either: 486; a loop: 482), or None (ring it as usual)."""
    devices = [d for d in reachable(user.number) if d != caller_device]
    condition = ringing_condition(user, devices, device_ids)
    if condition is None:
        return None
    return decide_forward(user, condition, hops, config, reachable, device_ids, outgoing_in_use, calls,
                          caller_device)


def decide_forward(user: UserConfig, condition: str, hops: tuple[tuple[str, str], ...], config: Config,
                   reachable: ReachableDevices, device_ids: DeviceIds | None, outgoing_in_use: Mapping[str, int],
                   calls: Sequence[CallInProgress], caller_device: str | None = None,
                   ) -> Forward | Refuse | ToVoicemail | None:
    """A call for `user` meets `condition` (always / busy / no_answer / unreachable / dnd),
    after the diversions `hops` already taken: where it goes, or why not.

    Without forwarding for it, the answering machine of `user` when it takes the call
    (`decide_voicemail`), else None (the call fails as it would have). A target that
    is itself forwarded before ringing is followed (its own condition, the chain grown); a
    number met twice, or more than MAX_FORWARDS diversions, is a loop (482). A call
    forwarded out through a trunk counts on the forwarding number's `max_outgoing_calls`.
    """
    target = forward_target(user, condition)
    if not target:
        voicemail = decide_voicemail(user, condition)
        if voicemail is not None:
            return voicemail
        if condition == "dnd":
            return Refuse(486, "Busy Here (do not disturb)", "dnd")
        return None
    hops = (*hops, (user.number, condition))
    if target in {number for number, _ in hops} or len(hops) > MAX_FORWARDS:
        return Refuse(482, "Loop Detected (call forwarding)", "forward_loop")
    callee = config.user(target)
    if callee is not None:
        onward = forward_before_ringing(callee, caller_device, hops, config, reachable, device_ids,
                                        outgoing_in_use, calls)
        if onward is not None:
            return onward
        devices = ring_targets(callee, [d for d in reachable(target) if d != caller_device], device_ids)
        if not devices:
            return decide_voicemail(callee, "unreachable") or Refuse(480, "Temporarily Unavailable",
                                                                     "no_reachable_device")
        ring = RingNumber(target, devices, float(callee.ring_seconds), callee.decline == "all_devices", False)
        return Forward(ring, hops)
    route = _trunk_route(target, config)
    if route is None or route[1] in config.emergency_numbers:
        return Refuse(404, "Not Found (forwarding target)", "forward_target_unknown")
    trunk, number = route
    limit = user.max_outgoing_calls
    in_use = outgoing_in_use.get(user.number, 0)
    if limit and in_use >= limit:
        return Refuse(403, f"Outgoing call limit reached ({in_use} of {limit})", "outgoing_limit")
    channels = sum(1 for c in calls if trunk.name in (c.trunk, c.outgoing_trunk))
    if channels >= trunk.max_channels:
        return Refuse(503, f"Service Unavailable (all {trunk.max_channels} lines to the provider busy)",
                      "trunk_channels_full")
    return Forward(RouteToTrunk(trunk.name, number, user.caller_id or trunk.username, emergency=False), hops)


VOICEMAIL_CONDITIONS = ("busy", "no_answer", "unreachable", "dnd")


def decide_voicemail(user: UserConfig, condition: str) -> ToVoicemail | None:
    """Does `user`'s answering machine take a call that meets `condition`? Never for
    "always" (that is forwarding); busy and DND only with `voicemail_on_busy` and
    `voicemail_on_dnd`. Forwarding, where set for the condition, is asked first and wins."""
    if not user.voicemail or condition not in VOICEMAIL_CONDITIONS:
        return None
    if (condition == "busy" and not user.voicemail_on_busy) or (condition == "dnd" and not user.voicemail_on_dnd):
        return None
    return ToVoicemail(user.number, condition, user.voicemail_max_seconds)


def decide_mailbox(caller: UserConfig, device: str | None, dialled: str, config: Config,
                   anchored: bool) -> OpenMailbox | Refuse | None:
    """The mailbox code (service "voicemail"): a registered device of `caller` opens its own
    number's mailbox (403 for anything else, 503 without media workers); None: not that code."""
    if config.feature_codes.get(dialled) != "voicemail":
        return None
    if device is None:
        return Refuse(403, f"Not a registered device of {caller.number}", "mailbox_unregistered_device")
    if not anchored:
        return Refuse(503, "Service Unavailable (the mailbox needs media workers)", "mailbox_no_media")
    return OpenMailbox(caller.number, device)


def forward_condition_of(status: int) -> str | None:
    """What a B-leg's failure means for forwarding: every device busy (486/600) is "busy",
    no answer in time (480, 408) is "no_answer"; anything else forwards nowhere."""
    if status in (486, 600):
        return "busy"
    if status in (480, 408):
        return "no_answer"
    return None


_SWITCHES: Mapping[str, tuple[str, object]] = {
    "forward_always_off": ("forward_always", ""), "forward_busy_off": ("forward_busy", ""),
    "forward_no_answer_off": ("forward_no_answer", ""), "dnd_on": ("dnd", True), "dnd_off": ("dnd", False),
}
_SETTING_SERVICES = frozenset({*_SWITCHES, "dnd_toggle", "forward_always", "forward_busy", "forward_no_answer"})


def decide_feature_code(caller: UserConfig, dialled: str, config: Config) -> ChangeSettings | Refuse | None:
    """A forwarding or DND code (`*72300`, `*78`): the change to `caller`'s settings, a
    refusal (no number after a prefix code: 484; forwarding to itself: 403; to a number
    that is no extension and no trunk routes: 404), or None (not such a code)."""
    for code in sorted(config.feature_codes, key=len, reverse=True):
        service = config.feature_codes[code]
        if service not in _SETTING_SERVICES or not dialled.startswith(code):
            continue
        if service in ("forward_always", "forward_busy", "forward_no_answer"):
            target = dialled[len(code):]
            if not target:
                return Refuse(484, "Address Incomplete (dial the code, then the number)", "feature_no_number")
            if target == caller.number:
                return Refuse(403, "Forbidden (a number cannot forward to itself)", "forward_to_self")
            if config.user(target) is None:
                route = _trunk_route(target, config)
                if route is None or target in config.emergency_numbers:
                    return Refuse(404, "Not Found (no such number to forward to)", "forward_target_unknown")
            return ChangeSettings(caller.number, service, {service: target})
        if dialled != code:
            continue
        if service == "dnd_toggle":
            return ChangeSettings(caller.number, service, {"dnd": not caller.dnd})
        field, value = _SWITCHES[service]
        return ChangeSettings(caller.number, service, {field: value})
    return None
def decide_transfer(transferor: UserConfig, device: str | None, dialled: str, config: Config,
                    reachable: ReachableDevices, outgoing_in_use: Mapping[str, int],
                    calls: Sequence[CallInProgress], *, counted_call: bool,
                    device_ids: DeviceIds | None = None) -> Refuse | RingNumber | RouteToTrunk:
    """A transfer (REFER) by an extension: its call's other party is sent to `dialled`.

    Authorised exactly as a call `transferor` places itself from `device` (unknown number
    404, its outgoing limit 403, an outside number through a trunk's prefix `RouteToTrunk`),
    except that the call being transferred, when it is counted on the transferor's
    limit (`counted_call`), is not counted twice: the transferor leaves it. Feature codes
    are no transfer targets (404).
    """
    if any(dialled.startswith(code) for code in config.feature_codes):
        return Refuse(404, "Not Found", "transfer_to_feature_code")
    in_use = dict(outgoing_in_use)
    if counted_call and in_use.get(transferor.number, 0) > 0:
        in_use[transferor.number] -= 1
    decision = decide_new_call(transferor, device, dialled, config, reachable, in_use, calls, anchored=True,
                               device_ids=device_ids)
    if isinstance(decision, (JoinCall, ChangeSettings)):  # not reachable: feature codes are refused above
        return Refuse(404, "Not Found", "transfer_to_feature_code")
    return decision
