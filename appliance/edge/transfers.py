"""Transfer (REFER, RFC 3515) and Replaces (RFC 3891) through the edge.

A handset's REFER to its media worker is rewritten so the worker's transfer leg comes back
to the edge, named as the transferring extension; that leg is authorised as a call of that
extension (`call_policy.decide_transfer`) and rung like one. An INVITE with Replaces, from a
worker's transfer leg or straight from a handset, goes to the worker that holds the dialog
it names, and only a call of the sender's own number may be replaced.
"""

from __future__ import annotations

import logging
import re

from appliance.call_policy import Refuse, RouteToTrunk, ToProvider, decide_transfer
from appliance.edge.dialogs import Dialog, Role, dialled_number, tag_of
from appliance.edge.routing import Routing
from appliance.logs import fields
from appliance.media.protocol import HDR_TOKEN, HDR_TRANSFER, LOOPBACK
from appliance.sip.message import Request
from appliance.sip.proxy import ForkSettings, Target
from appliance.sip.registrar import Flow

log = logging.getLogger("homepbx.calls")

_REFER_TARGET = re.compile(r"sips?:([0-9A-Za-z*#+._%-]{1,64})@[^?]*(?:\?(.*))?$")
"""A Refer-To URI we act on: a user part (the target number), headers (only Replaces kept)."""


class Transfers:
    """The router's transfer requests: REFERs on their way to a worker, the worker's
    transfer legs, INVITEs with Replaces."""

    def __init__(self, routing: Routing) -> None:
        self.routing = routing

    def refer_to_worker(self, request: Request, dialog: Dialog, towards_callee: bool, reply_to: Flow) -> bool:
        """A REFER from a party X to the worker: its Refer-To becomes the edge, with the call's
        token and X's number (`HDR_TRANSFER`) as URI headers, which pjsua puts on the INVITE
        it sends for it; a `Replaces` is kept, nothing else. So the transfer leg always
        comes back here, whatever host the handset named, and is authorised as X. False:
        answered here (not an extension's REFER, or a Refer-To we cannot use)."""
        routing = self.routing
        media = routing.media
        assert media is not None
        number = dialog.caller if towards_callee else dialog.callee
        config = routing.settings.current
        if (towards_callee and dialog.trunk is not None) or config.user(number) is None:
            routing.reply(request, reply_to, 403, "Forbidden (only an extension can transfer)")
            return False
        value = request.get("Refer-To")
        if value is None:
            return True  # the worker answers 400 itself
        inner = value[value.find("<") + 1:value.rfind(">")] if "<" in value else value.split(";", 1)[0]
        match = _REFER_TARGET.match(inner.strip())
        if match is None:
            routing.reply(request, reply_to, 400, "Bad Refer-To (a number at this box expected)")
            return False
        uri_headers = [h for h in (match.group(2) or "").split("&") if h.split("=", 1)[0].lower() == "replaces"]
        uri_headers += [f"{HDR_TOKEN}={dialog.token}", f"{HDR_TRANSFER}={number}"]
        request.set("Refer-To", f"<sip:{match.group(1)}@{media.edge_address}?{'&'.join(uri_headers)}>")
        log.info("event=transfer_requested %s", fields(call=dialog.token, by=number, target=match.group(1)))
        return True

    def transfer_leg(self, request: Request, flow: Flow, dest: Flow, key: str | None, dialled: str,
                     now: float) -> None:
        """A worker's leg for a REFER it took: authorised as the transferring extension
        (`decide_transfer`) and rung like a call of that extension's, or, with Replaces,
        relayed to the worker holding the named dialog."""
        routing = self.routing
        token = request.get(HDR_TOKEN) or ""
        number = (request.get(HDR_TRANSFER) or "").strip()
        first = routing.call(token)
        config = routing.settings.current
        user = config.user(number)
        if (first is None or first.ended or first.worker_port != flow.port or user is None
                or not self._party_of(token, number) or (first.trunk is not None and number == first.caller)):
            routing.reply(request, dest, 403, "Forbidden")
            return
        if request.get("Replaces") is not None:
            self.replaces(request, flow, dest, key, number, first, now)
            return
        by_caller = number == first.caller
        decision = decide_transfer(user, first.caller_device if by_caller else None, dialled, config,
                                   routing.reachable, routing.outgoing, routing.in_progress(),
                                   counted_call=by_caller and first.counts_outgoing, device_ids=routing.device_id)
        if isinstance(decision, Refuse):
            log.info("event=transfer_refused %s", fields(call=token, by=number, target=dialled,
                                                         status=decision.status, reason=decision.why))
            routing.reply(request, dest, decision.status, decision.reason)
            return
        first.transferring = True
        log.info("event=transfer %s", fields(call=token, by=number, target=dialled))
        if isinstance(decision, RouteToTrunk):
            trunk = next(t for t in config.trunks if t.name == decision.trunk)
            # pjsua sends a transfer's INVITE as the worker's account: the provider is given
            # the caller ID a call of the extension's would carry (the tag, the dialog's, kept).
            tag = tag_of(request.get("From"))
            request.set("From", f"<sip:{decision.caller_id}@{trunk.server}>" + (f";tag={tag}" if tag else ""))
            if not (by_caller and first.counts_outgoing):  # the transferor places this call out
                routing.charge(first, number)
            routing.to_provider(request, flow, dest, key, first, ToProvider(trunk, decision.number), now)
            return
        other, trunk_name = (first.callee, None) if by_caller else (first.caller, first.trunk)
        # The target sees who it is being put through to (as a B-leg's From shows the caller),
        # not the worker's account that pjsua sends a transfer as; the tag is kept.
        tag = tag_of(request.get("From"))
        request.set("From", routing.identity(other, trunk_name) + (f";tag={tag}" if tag else ""))
        dialog = Dialog(token, Role.B, request, other, decision.number, flow, None, trunk=trunk_name)
        settings = ForkSettings(decision.ring_timeout, decline_all=decision.decline_all)
        routing.start_fork(dialog, dest, key, routing.targets(decision), settings,
                           [("P-Asserted-Identity", routing.identity(other, trunk_name))], now)

    def _party_of(self, token: str, number: str) -> bool:
        """Is `number` one of the parties of call `token` now (a transfer's target too)?"""
        return any(number in (d.caller, d.callee) for d in self.routing.dialogs() if d.token == token and not d.ended)

    def replaces(self, request: Request, flow: Flow, dest: Flow, key: str | None, number: str,
                 origin: Dialog | None, now: float) -> None:
        """An INVITE with Replaces (RFC 3891), from a worker's transfer leg (`origin`: the
        call it belongs to) or straight from a handset of `number`: relayed to the worker
        holding the confirmed dialog it names; 481 when there is none."""
        routing = self.routing
        named = self._named_dialog(request.get("Replaces") or "")
        if named is None or named.ended:
            routing.reply(request, dest, 481, "Call/Transaction Does Not Exist")
            return
        if named.answer is None:
            # Naming a dialog still ringing (early) is pickup of the ringing call; a handset's
            # BLF key does that with our dialog-info's call-id (`pickup`), not a dialog's.
            log.info("event=replaces_early %s", fields(call=named.token, by=number))
            routing.reply(request, dest, 481, "Call/Transaction Does Not Exist")
            return
        if number not in (named.caller, named.callee):
            # A REFER's Replaces joins two calls of the transferring extension, and a handset
            # takes over only a call of its own number: no one else's.
            routing.reply(request, dest, 403, "Forbidden (not a call of this extension)")
            return
        worker = next((f for f in (named.callee_flow, named.caller_flow) if f is not None and routing.is_worker(f)),
                      None)
        if worker is None:
            routing.reply(request, dest, 481, "Call/Transaction Does Not Exist")
            return
        replaced_call = routing.call(named.token)
        if replaced_call is not None:
            replaced_call.transferring = True
        if origin is not None:
            origin.transferring = True
        token = origin.token if origin is not None else named.token
        device = None if origin is not None else routing.device_of(number, flow)
        dialog = Dialog(token, Role.B, request, number, named.callee, flow, device)
        log.info("event=replaces %s", fields(call=token, by=number, replaced_call=named.token, worker=worker.port))
        target = Target("", f"sip:{dialled_number(request.uri) or 'replaces'}@{LOOPBACK}:{worker.port}", worker,
                        False)
        routing.start_fork(dialog, dest, key, [target], ForkSettings(30.0), [], now)

    def _named_dialog(self, replaces: str) -> Dialog | None:
        """The dialog a Replaces header value names (Call-ID and both tags), or None."""
        call_id, *params = [p.strip() for p in replaces.split(";")]
        tags = {}
        for param in params:
            name, _, value = param.partition("=")
            tags[name.strip().lower()] = value.strip()
        dialog = self.routing.dialog(call_id)
        if dialog is None or "to-tag" not in tags or "from-tag" not in tags:
            return None
        callee_tag = tag_of(dialog.answer.get("To")) if dialog.answer is not None else None
        if dialog.answer is None:
            return dialog if dialog.caller_tag in (tags["to-tag"], tags["from-tag"]) else None
        if {tags["to-tag"], tags["from-tag"]} != {dialog.caller_tag, callee_tag}:
            return None
        return dialog


def left_after_transfer(dialog: Dialog, reason: str) -> bool:
    """A party of a call with a transfer left (its BYE): the call goes on in its worker,
    which ends it (`worker_call_ended`)."""
    return dialog.role is Role.A and dialog.transferring and reason.startswith("bye_from")
