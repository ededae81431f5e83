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

from appliance.config import Config, TrunkConfig, UserConfig

MAX_PARTIES = 3
"""A call has at most three parties: the two ends and one joining device (`*74`)."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the INVITE with `status reason` and do nothing else; `why` goes to the log."""

    status: int
    reason: str
    why: str


@dataclass(frozen=True, slots=True)
class RingNumber:
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


Decision = Refuse | RingNumber | JoinCall | RouteToTrunk

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


def decide_new_call(caller: UserConfig, caller_device: str | None, dialled: str, config: Config,
                    reachable: ReachableDevices, outgoing_in_use: Mapping[str, int],
                    calls: Sequence[CallInProgress], anchored: bool) -> Decision:
    """An authenticated handset of `caller` dialled `dialled` (a number or a feature code)."""
    if config.feature_codes.get(dialled) == "join":
        return decide_join(caller, caller_device, calls, anchored)
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
    return _ring(callee, caller_device, reachable, counts_outgoing=True)


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
                     reachable: ReachableDevices) -> Refuse | RingNumber:
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
    return _ring(callee, None, reachable, counts_outgoing=False)


def _route(incoming: Mapping[str, str], number: str) -> str | None:
    if number == "*":
        return None  # "*" is the fallback, never a number someone dialled
    for candidate in (number, number.removeprefix("+"), "+" + number):
        if candidate in incoming:
            return incoming[candidate]
    return None


def decide_worker_leg(anchoring: CallInProgress | None, worker_port: int, dialled: str, config: Config,
                      reachable: ReachableDevices) -> Refuse | RingNumber | ToProvider:
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
    return _ring(callee, anchoring.caller_device, reachable, counts_outgoing=False)


def _ring(callee: UserConfig, caller_device: str | None, reachable: ReachableDevices, *,
          counts_outgoing: bool) -> Refuse | RingNumber:
    devices = tuple(d for d in reachable(callee.number) if d != caller_device)  # never ring the caller itself
    if not devices:
        return Refuse(480, "Temporarily Unavailable", "no_reachable_device")
    return RingNumber(callee.number, devices, float(callee.ring_timeout), callee.decline == "all_devices",
                      counts_outgoing)


def decide_transfer(transferor: UserConfig, device: str | None, dialled: str, config: Config,
                    reachable: ReachableDevices, outgoing_in_use: Mapping[str, int],
                    calls: Sequence[CallInProgress], *, counted_call: bool) -> Refuse | RingNumber | RouteToTrunk:
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
    decision = decide_new_call(transferor, device, dialled, config, reachable, in_use, calls, anchored=True)
    if isinstance(decision, JoinCall):  # not reachable: feature codes are refused above
        return Refuse(404, "Not Found", "transfer_to_feature_code")
    return decision
