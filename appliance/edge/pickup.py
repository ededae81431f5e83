"""A device enters a call its media worker anchors: `*74` joins a call in progress of the
device's own number; `*8`, `**<number>` or a BLF key picks up a call ringing elsewhere.

Who may is the call policy's word (`decide_new_call`'s `JoinCall`, `decide_pickup`); the
device's INVITE then goes to the worker with the call's token and what it is for
(`X-Homepbx-Join`, `X-Homepbx-Pickup`): the worker answers it and bridges it into the call
(for a pickup, it also CANCELs its leg to the devices that were ringing).
"""

from __future__ import annotations

import logging

from appliance.call_policy import JoinCall, PickupCall, Refuse
from appliance.edge.dialogs import Dialog, Role
from appliance.edge.routing import Routing
from appliance.logs import fields
from appliance.media.protocol import HDR_JOIN, HDR_PICKUP, HDR_TOKEN, LOOPBACK
from appliance.sip.message import Request
from appliance.sip.proxy import ForkSettings, Target
from appliance.sip.registrar import Flow

log = logging.getLogger("homepbx.calls")


class JoinAndPickup:
    """Join and pickup INVITEs, sent on to the worker of the call they name."""

    def __init__(self, routing: Routing) -> None:
        self.routing = routing

    def join(self, request: Request, flow: Flow, dest: Flow, key: str | None, decision: JoinCall, number: str,
             now: float) -> None:
        """*74: a device of a one-number user joins that number's call in progress."""
        dialog = Dialog(decision.token, Role.JOIN, request, number, number, flow, decision.device)
        log.info("event=join_requested %s", fields(call=decision.token, number=number, device=decision.device))
        self._to_call(dialog, dest, key, "join", decision.worker_port, HDR_JOIN, now)

    def pickup(self, request: Request, flow: Flow, dest: Flow, key: str | None, decision: Refuse | PickupCall,
               caller: str, caller_device: str | None, now: float) -> None:
        """`*8`, `**<number>` or a BLF key: the picker's INVITE goes to the worker that
        anchors the ringing call (`X-Homepbx-Pickup`); it answers the picker, bridges it
        with the caller and CANCELs its leg to the ringing devices."""
        if isinstance(decision, Refuse):
            log.info("event=pickup_refused %s", fields(number=caller, device=caller_device, status=decision.status,
                                                       reason=decision.why))
            self.routing.reply(request, dest, decision.status, decision.reason)
            return
        dialog = Dialog(decision.token, Role.PICKUP, request, caller, decision.number, flow, caller_device)
        log.info("event=pickup_requested %s", fields(call=decision.token, number=caller, device=caller_device,
                                                     ringing=decision.number))
        self._to_call(dialog, dest, key, "pickup", decision.worker_port, HDR_PICKUP, now)

    def _to_call(self, dialog: Dialog, dest: Flow, key: str | None, user: str, worker_port: int, header: str,
                 now: float) -> None:
        routing = self.routing
        target = Target("", f"sip:{user}@{LOOPBACK}:{worker_port}", routing.worker_flow(worker_port), False)
        routing.start_fork(dialog, dest, key, [target], ForkSettings(30.0), [(HDR_TOKEN, dialog.token), (header, "1")],
                           now, record_route=True)
