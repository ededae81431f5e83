"""The feature codes a handset dials that are not calls: a forwarding or DND setting
(`*72<n>`, `*78`, ...) and the mailbox (`*97`).

A setting is saved and put in force through `UserSettings` (the daemon edits `config.toml`
atomically), then confirmed to the handset: a media worker answers, beeps and hangs up; with
no worker, a final answer whose phrase says what is now set. The mailbox code has a worker
answer and run the number's mailbox menu.
"""

from __future__ import annotations

import logging

from appliance.call_policy import ChangeSettings, OpenMailbox, Refuse
from appliance.edge.dialogs import Dialog, Role
from appliance.edge.routing import Routing
from appliance.edge.seams import UserSettings
from appliance.logs import fields
from appliance.media.protocol import HDR_MAILBOX, HDR_PLAY, PLAY_CONFIRM
from appliance.sip.message import Request, new_tag
from appliance.sip.proxy import ForkSettings
from appliance.sip.registrar import Flow

log = logging.getLogger("homepbx.calls")


class FeatureCodes:
    """Settings codes and the mailbox code, for the router's new INVITEs."""

    def __init__(self, routing: Routing, user_settings: UserSettings | None) -> None:
        self.routing = routing
        self.user_settings = user_settings

    def change_settings(self, request: Request, flow: Flow, dest: Flow, key: str | None,
                        decision: ChangeSettings, caller_device: str | None, dialled: str) -> None:
        """A forwarding or DND code from a handset: saved and put in force, then confirmed
        (`_confirm`). Retransmissions of the INVITE meanwhile are absorbed (a toggle is
        applied once)."""
        routing = self.routing
        changes = dict(decision.changes)
        said = ",".join(f"{k}={v}" for k, v in changes.items())
        if self.user_settings is None:
            routing.reply(request, dest, 503, "Service Unavailable (settings cannot be saved)")
            return
        dialog = Dialog(new_tag(), Role.A, request, decision.number, dialled, flow, caller_device)
        routing.hold_invite(key, dialog)
        routing.reply(request, dest, 100, "Trying")

        def done(error: str | None) -> None:
            if error is not None:
                log.warning("event=feature_code_failed %s", fields(number=decision.number, code=decision.service,
                                                                   changes=said, error=error))
                routing.reply(request, dest, 500, "Server Internal Error (settings not saved)")
                routing.release_invite(key, dialog)
                return
            log.info("event=feature_code %s", fields(number=decision.number, device=caller_device or "-",
                                                     code=decision.service, changes=said))
            self._confirm(dialog, dest, key, decision)

        self.user_settings.change_user(decision.number, changes, done)

    def _confirm(self, dialog: Dialog, dest: Flow, key: str | None, decision: ChangeSettings) -> None:
        """Tell the handset its code was applied: a media worker answers, beeps and hangs up
        (`X-Homepbx-Play: confirm`); without a worker, a final answer whose phrase says what
        is now set."""
        routing = self.routing
        text = ", ".join(f"{k.replace('_', ' ')} {'on' if v is True else 'off' if v in (False, '') else v}"
                         for k, v in decision.changes.items())
        media = routing.media
        if media is None:
            routing.reply(dialog.invite, dest, 480, f"Temporarily Unavailable (done: {text})")
            routing.release_invite(key, dialog)
            return

        def anchored(port: int | None) -> None:
            if port is None:  # every worker busy: the change is made all the same
                routing.reply(dialog.invite, dest, 480, f"Temporarily Unavailable (done: {text})")
                routing.release_invite(key, dialog)
                routing.end(dialog, "no_media_worker")
                return
            routing.to_worker(dialog, dest, key, port, ForkSettings(30.0), [(HDR_PLAY, PLAY_CONFIRM)])

        routing.add_call(dialog)
        media.anchor(dialog.token, anchored)

    def mailbox(self, request: Request, flow: Flow, dest: Flow, key: str | None, decision: OpenMailbox | Refuse,
                caller: str) -> None:
        """The mailbox code: a media worker answers and runs the number's mailbox menu
        (`X-Homepbx-Mailbox`); only a registered device of the number gets there."""
        routing = self.routing
        media = routing.media
        if isinstance(decision, Refuse) or media is None:
            refused = decision if isinstance(decision, Refuse) else Refuse(503, "Service Unavailable", "no_media")
            log.info("event=mailbox_refused %s", fields(number=caller, status=refused.status, reason=refused.why))
            routing.reply(request, dest, refused.status, refused.reason)
            return
        dialog = Dialog(new_tag(), Role.A, request, caller, decision.number, flow, decision.device)
        routing.hold_invite(key, dialog)
        routing.add_call(dialog)
        routing.reply(request, dest, 100, "Trying")
        log.info("event=mailbox_opened %s", fields(call=dialog.token, number=decision.number, device=decision.device))
        media.anchor(dialog.token, lambda port: routing.to_worker(dialog, dest, key, port, ForkSettings(30.0),
                                                                   [(HDR_MAILBOX, decision.number)]))
