"""Call forwarding, do not disturb and the answering machine, as the edge carries them out.

Where a call goes is the call policy's word (`decide_worker_leg`, `decide_forward`); this
module acts on it for the worker's leg to the callee: forwarded before ringing (always,
DND, unreachable), or re-targeted within the same transaction when every device failed or
nobody answered (`Fork.retarget`), with RFC 5806 Diversion headers; or answered with the
final response that sends the worker to the answering machine. The worker never knows.
"""

from __future__ import annotations

import logging

from appliance.call_policy import (
    DIVERSION_REASONS,
    Forward,
    Refuse,
    RingNumber,
    RouteToTrunk,
    ToProvider,
    ToVoicemail,
    decide_forward,
    forward_condition_of,
)
from appliance.edge.dialogs import Dialog, Role, as_trunk_caller
from appliance.edge.routing import CALL_OUT_TIMEOUT, Routing
from appliance.logs import fields
from appliance.media.protocol import HDR_VOICEMAIL, HDR_VOICEMAIL_MAX
from appliance.sip.message import Request, make_response
from appliance.sip.proxy import ForkSettings
from appliance.sip.registrar import Flow

log = logging.getLogger("homepbx.calls")

class Forwarding:
    """Forwarding and the answering machine for the router's B-legs."""

    def __init__(self, routing: Routing) -> None:
        self.routing = routing

    def ring_settings(self, decision: RingNumber) -> ForkSettings:
        """Ring settings of a B-leg: a callee that forwards on busy or no answer holds the
        fork's final answer, so the same transaction can ring the target (`exhausted`)."""
        user = self.routing.settings.current.user(decision.number)
        hold = user is not None and bool(user.forward_busy or user.forward_no_answer or user.voicemail)
        return ForkSettings(decision.ring_timeout, decline_all=decision.decline_all, hold_final=hold)

    def backup_timeout(self, decision: RingNumber) -> float:
        """The A-leg's backup timer: past the B-leg's ring timeout, and for a callee that
        forwards, past a forward's own ringing too (the B-leg decides either way)."""
        user = self.routing.settings.current.user(decision.number)
        if user is not None and any((user.forward_always, user.forward_busy, user.forward_no_answer,
                                     user.forward_unreachable, user.dnd)):
            return CALL_OUT_TIMEOUT + 30.0
        return decision.ring_timeout + 15.0

    def to_voicemail(self, a_leg: Dialog, decision: ToVoicemail) -> tuple[int, str, list[tuple[str, str]]]:
        """The worker's leg goes to the answering machine: the final answer that tells the
        worker so (it answers the caller and records; see the protocol's "Answering machine")."""
        self.routing.live.call_to_voicemail(a_leg.token, decision.number)
        log.info("event=call_to_voicemail %s", fields(call=a_leg.token, caller=a_leg.caller, number=decision.number,
                                                      condition=decision.condition))
        return 480, "Temporarily Unavailable (answering machine)", [
            (HDR_VOICEMAIL, decision.number), (HDR_VOICEMAIL_MAX, str(decision.max_seconds))]

    def forward_leg(self, request: Request, flow: Flow, dest: Flow, key: str | None, a_leg: Dialog,
                    forward: Forward, now: float) -> None:
        """The worker's leg of a call forwarded before ringing (always, DND, unreachable):
        to the target's devices, or out through a trunk."""
        routing = self.routing
        self._note_forward(a_leg, forward)
        headers = self._diversion(forward.hops)
        to = forward.to
        if isinstance(to, RouteToTrunk):
            trunk = next(t for t in routing.settings.current.trunks if t.name == to.trunk)
            as_trunk_caller(request, to, trunk)
            routing.to_provider(request, flow, dest, key, a_leg, ToProvider(trunk, to.number), now, headers)
            return
        dialog = Dialog(a_leg.token, Role.B, request, a_leg.caller, to.number, flow, None, trunk=a_leg.trunk)
        identity = routing.identity(a_leg.caller, a_leg.trunk)
        routing.start_fork(dialog, dest, key, routing.targets(to), self.ring_settings(to),
                           [("P-Asserted-Identity", identity), *headers], now)

    def exhausted(self, dialog: Dialog, status: int) -> None:
        """Every device of a B-leg failed, or nobody answered in time: forward on busy or
        no answer within the same transaction (`Fork.retarget`), else the held answer."""
        routing = self.routing
        fork = dialog.fork
        if fork is None:
            return
        now = routing.now()
        a_leg = routing.call(dialog.token)
        condition = forward_condition_of(status)
        config = routing.settings.current
        user = config.user(dialog.callee) if a_leg is not None and condition and dialog.role is Role.B else None
        decision = None
        if user is not None and a_leg is not None and condition is not None:
            decision = decide_forward(user, condition, a_leg.hops, config, routing.reachable, routing.device_id,
                                      routing.outgoing, routing.in_progress(), a_leg.caller_device)
        if decision is None:
            routing.apply(dialog, fork.finish(now))
            return
        if isinstance(decision, ToVoicemail):
            assert a_leg is not None
            status, reason, headers = self.to_voicemail(a_leg, decision)
            routing.apply(dialog, fork.finish(now, make_response(fork.request, status, reason, headers=headers)))
            return
        if isinstance(decision, Refuse):
            log.info("event=forward_refused %s", fields(call=dialog.token, number=dialog.callee,
                                                        status=decision.status, reason=decision.why))
            routing.apply(dialog, fork.finish(now, make_response(fork.request, decision.status, decision.reason)))
            return
        assert a_leg is not None
        self._note_forward(a_leg, decision)
        headers = self._diversion(decision.hops)
        to = decision.to
        if isinstance(to, RingNumber):
            dialog.callee = to.number
            routing.apply(dialog, fork.retarget(routing.targets(to), now, self.ring_settings(to), headers))
            return
        trunk = next(t for t in config.trunks if t.name == to.trunk)
        branch = routing.provider_branch(trunk, to.number, a_leg.token)
        if branch is None:
            routing.apply(dialog, fork.finish(now, make_response(
                fork.request, 503, "Service Unavailable (provider not reachable)")))
            return
        target, authorize, offer = branch
        dialog.callee, dialog.outgoing_trunk = to.number, trunk.name
        as_trunk_caller(fork.request, to, trunk)
        routing.apply(dialog, fork.retarget([target], now, ForkSettings(CALL_OUT_TIMEOUT), headers,
                                            authorize=authorize, relay_body=offer))

    def _diversion(self, hops: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        """RFC 5806 Diversion headers, the latest diversion first."""
        realm = self.routing.settings.current.server.realm
        return [("Diversion", f"<sip:{number}@{realm}>;reason={DIVERSION_REASONS[condition]};counter=1")
                for number, condition in reversed(hops)]

    def _note_forward(self, a_leg: Dialog, forward: Forward) -> None:
        a_leg.hops = forward.hops
        to = forward.to
        self.routing.live.call_forwarded(a_leg.token, forward.number, to.number, forward.hops[-1][1])
        log.info("event=call_forwarded %s", fields(
            call=a_leg.token, caller=a_leg.caller, number=forward.number, condition=forward.hops[-1][1],
            to=to.number, trunk=to.trunk if isinstance(to, RouteToTrunk) else "-",
            chain=">".join(forward.chain)))
        if isinstance(to, RouteToTrunk):  # counts on the forwarding number's outgoing limit
            self.routing.charge(a_leg, forward.number)
