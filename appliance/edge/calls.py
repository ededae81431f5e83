"""Call routing in the edge: INVITE in, forks out, dialogs relayed, live state told.

Initial INVITEs are challenged (407), except a provider's: a request whose source address
is one the box resolved for a trunk (`TrunkLookup`) is a call from outside, routed by its
called number (`decide_incoming`) and never challenged. Who may call whom and where the call goes is asked
of the call policy (`appliance.call_policy`, pure code) with the request's facts, and this
module carries the decision out: a refusal, a ring-all `Fork` (sans-I/O) to the dialled
number's devices, a media worker that anchors the call. Requests inside a dialog follow our
Record-Route back here and are relayed statelessly (§16.11) to the other party over the
flow that party uses, so a handset behind NAT or on its own TCP connection is always reached.

The phone's features are modules of their own that the router hands their requests to and
that act through it (`routing.Routing`): `transfers` (REFER, Replaces), `forwarding`
(forwarding, DND, the answering machine), `pickup` (join and pickup), `feature_codes`
(settings codes, the mailbox). The router keeps every table: dialogs, forks, calls,
outgoing counts.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from appliance.call_policy import (
    CallInProgress,
    ChangeSettings,
    Forward,
    JoinCall,
    Refuse,
    RingNumber,
    RouteToTrunk,
    ToProvider,
    ToVoicemail,
    decide_incoming,
    decide_mailbox,
    decide_new_call,
    decide_pickup,
    decide_worker_leg,
    pickup_request,
)
from appliance.config import LiveConfig, TrunkConfig, device_id
from appliance.edge.auth_gate import AuthGate
from appliance.edge.dialogs import (
    Dialog,
    EndedDialog,
    Role,
    dialled_number,
    display_name,
    outside_number,
    shift_cseq,
    tag_of,
)
from appliance.edge.feature_codes import FeatureCodes
from appliance.edge.forwarding import Forwarding
from appliance.edge.pickup import JoinAndPickup
from appliance.edge.relay import STATELESS_PREFIX, StatelessRelay
from appliance.edge.routing import CALL_OUT_TIMEOUT
from appliance.edge.seams import Bindings, CallEvents, MediaAnchor, Network, TrunkLookup, UserSettings
from appliance.edge.timers import Deadline, Timed, TimerWheel
from appliance.edge.transfers import Transfers, left_after_transfer
from appliance.edge.transport import format_host_port
from appliance.logs import fields
from appliance.media.protocol import (
    HDR_CALLER,
    HDR_TARGET,
    HDR_TOKEN,
    HDR_TRANSFER,
    LOOPBACK,
)
from appliance.sip.authenticator import Outcome
from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_name_addr, parse_via
from appliance.sip.invite_transaction import Send
from appliance.sip.message import Request, Response, make_response, new_tag
from appliance.sip.proxy import (
    Authorize,
    FinishedFork,
    Fork,
    ForkEvent,
    ForkSettings,
    RelayBody,
    SendRequest,
    Target,
)
from appliance.sip.registrar import Flow
from appliance.sip.sdp import is_sdp
from appliance.sip.transaction import ClientTransactions, Retransmit, server_key
from appliance.sip.trunk_call import credentials, g711_only

log = logging.getLogger("homepbx.calls")

DIALOG_LINGER = 32.0
class CallRouter:
    """Carries out the call policy's decisions, and follows every dialog to its end."""

    def __init__(self, settings: LiveConfig, network: Network, bindings: Bindings, auth: AuthGate,
                 live: CallEvents, timers: TimerWheel, media: MediaAnchor | None,
                 trunks: TrunkLookup | None = None, user_settings: UserSettings | None = None) -> None:
        self.settings = settings
        self.trunks = trunks
        self.network = network
        self.bindings = bindings
        self.auth = auth
        self.live = live
        self.timers = timers
        self._media = media
        self.client_tx: ClientTransactions[Flow] = ClientTransactions()
        self._forks: dict[str, Dialog] = {}  # server transaction key of the INVITE -> its dialog
        self._branches: dict[str, Dialog] = {}  # our branch id -> dialog
        self._dialogs: dict[str, Dialog] = {}  # Call-ID -> dialog
        self._by_fork: dict[int, Dialog] = {}  # id(fork) -> dialog, for its timers
        self._calls: dict[str, Dialog] = {}  # token -> the call's first dialog (A, or DIRECT)
        self.outgoing: dict[str, int] = {}  # number -> calls placed now
        self.relay = StatelessRelay(network, self.is_worker, address_for=self._address_for)
        # Each fork is handed these: one bound method each for all, not two per call.
        self._via = self._via_for
        self._body_between = self.relay.body_between
        # What a finished call keeps for its 32 s of retransmissions, as compact records:
        # a fork whose transactions only linger (`FinishedFork`, by its branches' prefix
        # and by the INVITE's key) and a dialog after its BYE (`EndedDialog`, by Call-ID);
        # each queue in the order they were made (their lingers are as long: 64*T1), one
        # timer for the first of both, not a timer and a closure each (thousands linger
        # under a burst).
        self._finished: dict[str, FinishedFork[Flow]] = {}
        self._finished_invites: dict[str, FinishedFork[Flow]] = {}
        self._ended: dict[str, EndedDialog] = {}
        self._buried: deque[FinishedFork[Flow]] = deque()
        self._lingering: deque[EndedDialog] = deque()
        self._linger_timer: Deadline | None = None
        self.transfers = Transfers(self)
        self.forwarding = Forwarding(self)
        self.feature_codes = FeatureCodes(self, user_settings)
        self.pickup = JoinAndPickup(self)

    # -- what the features read and ask (`routing.Routing`) ------------------------------------

    @property
    def media(self) -> MediaAnchor | None:
        """The media workers, or None when calls are not anchored: `[media] max_calls = 0`,
        or a media engine that does not load here (then calls go straight to the devices)."""
        media = self._media
        return media if media is not None and media.available else None

    def now(self) -> float:
        return self.timers.now()

    def call(self, token: str) -> Dialog | None:
        return self._calls.get(token)

    def dialog(self, call_id: str) -> Dialog | None:
        return self._dialogs.get(call_id)

    def dialogs(self) -> Iterable[Dialog]:
        return self._dialogs.values()

    def add_call(self, dialog: Dialog) -> None:
        self._calls[dialog.token] = dialog

    def hold_invite(self, key: str | None, dialog: Dialog) -> None:
        if key:
            self._forks[key] = dialog

    def release_invite(self, key: str | None, dialog: Dialog) -> None:
        if key and self._forks.get(key) is dialog:
            del self._forks[key]

    # -- requests ----------------------------------------------------------------------------
    def on_request(self, request: Request, flow: Flow, dest: Flow, now: float) -> bool:
        """Handle call-related requests; False if this is not ours to handle."""
        method = request.method
        # ACK and CANCEL are matched by their transaction, never by the To tag: not parsed.
        to_tag = tag_of(request.get("To")) if method != "ACK" and method != "CANCEL" else None
        key = server_key(request)
        invite_key = key.rsplit("|", 1)[0] + "|INVITE" if key else None
        if method == "INVITE" and to_tag is None:
            dialog = self._forks.get(key) if key else None
            if dialog is not None:
                if dialog.fork is not None:
                    self.apply(dialog, dialog.fork.on_request_retransmission())
                return True  # still finding a worker: our 100 Trying already went out
            if key and key in self._finished_invites:
                return True  # its fork is finished: Accepted or Confirmed answer no retransmission
            self._new_call(request, flow, dest, key, now)
            return True
        if method == "ACK":
            # An ACK with the INVITE's branch acknowledges our non-2xx final (hop by hop);
            # the ACK of a 2xx is a new transaction that belongs to the dialog.
            dialog = self._forks.get(invite_key) if invite_key else None
            if dialog is not None and dialog.fork is not None:
                self.apply(dialog, dialog.fork.on_ack(now))
                return True
            if invite_key and invite_key in self._finished_invites:
                return True  # for a finished fork's final (Confirmed already, or Accepted): nothing to do
            self._relay_in_dialog(request, flow, dest, now)
            return True
        if method == "CANCEL":
            dialog = self._forks.get(invite_key) if invite_key else None
            if dialog is None:
                if invite_key and invite_key in self._finished_invites:
                    self.reply(request, dest, 200, "OK")  # too late to cancel: the final is sent
                else:
                    self.reply(request, dest, 481, "Call/Transaction Does Not Exist")
                return True
            self.reply(request, dest, 200, "OK")
            if dialog.fork is not None:
                self.apply(dialog, dialog.fork.cancel(now, request.get("Reason")))
            else:  # cancelled while a worker was being found
                self.reply(dialog.invite, dest, 487, "Request Terminated")
                self.end(dialog, "status_487")
            return True
        if to_tag is not None and method in ("BYE", "INVITE", "UPDATE", "INFO", "PRACK", "NOTIFY", "REFER",
                                             "MESSAGE", "OPTIONS"):
            if request.call_id not in self._dialogs and request.call_id not in self._ended:
                self.reply(request, dest, 481, "Call/Transaction Does Not Exist")
                return True
            self._relay_in_dialog(request, flow, dest, now)
            return True
        return False

    def reply(self, request: Request, dest: Flow, status: int, reason: str,
               headers: list[tuple[str, str]] | None = None) -> None:
        self.network.send(make_response(request, status, reason, headers=headers or []).to_bytes(), dest)

    def _new_call(self, request: Request, flow: Flow, dest: Flow, key: str | None, now: float) -> None:
        if self._looped(request):
            self.reply(request, dest, 482, "Loop Detected")
            return
        try:
            from_addr = parse_name_addr(request.get("From") or "")
            dialled = dialled_number(request.uri)
        except SipSyntaxError:
            self.reply(request, dest, 400, "Malformed From or Request-URI")
            return
        if self.media is not None and self.media.is_worker(flow):
            if request.get(HDR_TRANSFER) is not None:
                self.transfers.transfer_leg(request, flow, dest, key, dialled, now)
                return
            self._worker_leg(request, flow, dest, key, dialled, now)
            return
        trunk = self.trunks.trunk_at(flow) if self.trunks is not None else None
        if trunk is not None:
            self._incoming(request, flow, dest, key, trunk, dialled, now)
            return
        caller = from_addr.uri.user or ""
        result = self.auth.check(request, caller, flow, now, proxy=True)
        if result.outcome is not Outcome.ACCEPTED:
            assert result.response is not None
            self.network.send(result.response.to_bytes(), dest)
            return
        config = self.settings.current
        user = config.user(caller)
        assert user is not None
        max_forwards = request.get("Max-Forwards")
        if max_forwards is not None and int(max_forwards) <= 0:
            self.reply(request, dest, 483, "Too Many Hops")
            return
        caller_device = self.device_of(caller, flow)
        replaces = request.get("Replaces")
        if replaces is not None and self.media is not None:
            self._replaces_from_handset(request, flow, dest, key, replaces, caller, caller_device, now)
            return
        pickup = pickup_request(dialled, config)
        if pickup is not None:
            decided = decide_pickup(user, caller_device, pickup[0], config, self.ringing(), self.media is not None)
            self.pickup.pickup(request, flow, dest, key, decided, caller, caller_device, now)
            return
        mailbox = decide_mailbox(user, caller_device, dialled, config, self.media is not None)
        if mailbox is not None:
            self.feature_codes.mailbox(request, flow, dest, key, mailbox, caller)
            return
        decision = decide_new_call(user, caller_device, dialled, config, self.reachable, self.outgoing,
                                   self.in_progress(), anchored=self.media is not None,
                                   device_ids=self.device_id)
        if isinstance(decision, ChangeSettings):
            self.feature_codes.change_settings(request, flow, dest, key, decision, caller_device, dialled)
        elif isinstance(decision, Refuse):
            self._refuse(request, dest, decision, caller, dialled)
        elif isinstance(decision, JoinCall):
            self.pickup.join(request, flow, dest, key, decision, caller, now)
        elif isinstance(decision, RouteToTrunk):
            self._call_out(request, flow, dest, key, decision, caller, caller_device)
        else:
            self._ring(request, flow, dest, key, decision, caller, caller_device, now)

    def _incoming(self, request: Request, flow: Flow, dest: Flow, key: str | None, trunk_name: str, dialled: str,
                  now: float) -> None:
        """A call from the provider: trusted by its source address, routed by the called number."""
        config = self.settings.current
        trunk = next((t for t in config.trunks if t.name == trunk_name), None)
        if trunk is None:  # removed by a reload a moment ago
            self.reply(request, dest, 404, "Not Found")
            return
        max_forwards = request.get("Max-Forwards")
        if max_forwards is not None and int(max_forwards) <= 0:
            self.reply(request, dest, 483, "Too Many Hops")
            return
        try:
            to_user = parse_name_addr(request.get("To") or "").uri.user or ""
        except SipSyntaxError:
            to_user = ""
        number = outside_number(request)
        did = dialled or to_user
        decision = decide_incoming(trunk, dialled, to_user, config, self.reachable, self.device_id,
                                   anchored=self.media is not None)
        if isinstance(decision, Refuse):
            log.info("event=trunk_call_refused %s", fields(number=number, did=did, trunk=trunk_name,
                                                           status=decision.status, reason=decision.why))
            self.reply(request, dest, decision.status, decision.reason)
            return
        log.info("event=trunk_call %s", fields(number=number, did=did, trunk=trunk_name, callee=decision.number))
        self._ring(request, flow, dest, key, decision, number, None, now, trunk=trunk_name)

    def identity(self, caller: str, trunk: str | None) -> str:
        """Who the callee's display shows: an extension by its name, an outside caller by its number."""
        config = self.settings.current
        user = config.user(caller) if trunk is None else None
        return f'"{(user.name if user else "") or caller}" <sip:{caller}@{config.server.realm}>'

    def _refuse(self, request: Request, dest: Flow, decision: Refuse, caller: str, dialled: str) -> None:
        if decision.why == "outgoing_limit":
            log.info("event=call_refused %s", fields(caller=caller, callee=dialled, reason=decision.why))
        self.reply(request, dest, decision.status, decision.reason)

    def _ring(self, request: Request, flow: Flow, dest: Flow, key: str | None, decision: RingNumber,
              caller: str, caller_device: str | None, now: float, *, trunk: str | None = None) -> None:
        """A new call from a handset or the provider: straight to the devices, or anchored in a media worker."""
        dialog = Dialog(new_tag(), Role.A if self.media else Role.DIRECT, request, caller, decision.number, flow,
                        caller_device, counts_outgoing=decision.counts_outgoing, trunk=trunk)
        if decision.counts_outgoing:
            self.outgoing[caller] = self.outgoing.get(caller, 0) + 1
        self._calls[dialog.token] = dialog
        self.live.call_started(dialog.token, caller, decision.number, caller_device, trunk=trunk,
                               caller_name=display_name(request) if trunk is not None else "")
        log.info("event=call_started %s", fields(call=dialog.token, caller=caller, callee=decision.number,
                                                 devices=len(decision.devices)))
        identity = self.identity(caller, trunk)
        media = self.media
        if media is None:
            settings = ForkSettings(decision.ring_timeout, decline_all=decision.decline_all)
            self.start_fork(dialog, dest, key, self.targets(decision), settings,
                             [("P-Asserted-Identity", identity)], now)
            return
        # Anchor the call in a media worker: the INVITE goes there, the worker's B-leg
        # comes back to us and is forked to the devices.
        if key:
            self._forks[key] = dialog  # retransmissions are absorbed while a worker is found
        self.reply(request, dest, 100, "Trying")
        headers = [(HDR_TARGET, f"<sip:{decision.number}@{media.edge_address}>"), (HDR_CALLER, identity)]
        # The A-leg's own timer only backs up the B-leg's ring timeout, which decides.
        settings = ForkSettings(self.forwarding.backup_timeout(decision))
        media.anchor(dialog.token, lambda port: self.to_worker(dialog, dest, key, port, settings, headers))

    def _call_out(self, request: Request, flow: Flow, dest: Flow, key: str | None, decision: RouteToTrunk,
                  caller: str, caller_device: str | None) -> None:
        """A call out through a trunk: anchored in a media worker, whose leg comes back here
        and goes on to the provider (`_to_provider`)."""
        config = self.settings.current
        trunk = next(t for t in config.trunks if t.name == decision.trunk)  # the policy chose it from this config
        media = self.media
        if media is None:
            log.warning("event=call_out_refused %s", fields(caller=caller, number=decision.number, trunk=trunk.name,
                                                            reason="no_media_workers"))
            self.reply(request, dest, 503, "Service Unavailable (calls out need media workers)")
            return
        dialog = Dialog(new_tag(), Role.A, request, caller, decision.number, flow, caller_device,
                        counts_outgoing=decision.counts_outgoing, outgoing_trunk=trunk.name)
        if decision.counts_outgoing:
            self.outgoing[caller] = self.outgoing.get(caller, 0) + 1
        self._calls[dialog.token] = dialog
        self.live.call_started(dialog.token, caller, decision.number, caller_device, trunk=trunk.name)
        log.info("event=call_out %s", fields(call=dialog.token, caller=caller, number=decision.number,
                                             trunk=trunk.name, caller_id=decision.caller_id,
                                             emergency=decision.emergency))
        if key:
            self._forks[key] = dialog
        self.reply(request, dest, 100, "Trying")
        headers = [(HDR_TARGET, f"<sip:{decision.number}@{media.edge_address}>"),
                   (HDR_CALLER, f"<sip:{decision.caller_id}@{trunk.server}>")]
        settings = ForkSettings(CALL_OUT_TIMEOUT + 15.0)
        media.anchor(dialog.token, lambda port: self.to_worker(dialog, dest, key, port, settings, headers))

    def to_worker(self, dialog: Dialog, dest: Flow, key: str | None, port: int | None, settings: ForkSettings,
                   headers: list[tuple[str, str]]) -> None:
        """Relay an INVITE to the worker on `port` (None: every worker is busy)."""
        now = self.timers.now()
        if dialog.ended:
            return
        if port is None:
            self.reply(dialog.invite, dest, 503, "Service Unavailable (all lines busy)",
                        headers=[("Retry-After", "5")])
            if key and self._forks.get(key) is dialog:
                del self._forks[key]
            self.end(dialog, "no_media_worker")
            return
        dialog.worker_port = port
        target = Target("", f"sip:{dialog.callee}@{LOOPBACK}:{port}", self.worker_flow(port), False)
        self.start_fork(dialog, dest, key, [target], settings, [(HDR_TOKEN, dialog.token), *headers], now,
                         record_route=True, trying_sent=True)  # every way here answered 100 first

    def worker_flow(self, port: int) -> Flow:
        addresses = self.network.addresses
        return Flow("udp", LOOPBACK, port, addresses[0] if addresses else "")

    def _worker_leg(self, request: Request, flow: Flow, dest: Flow, key: str | None, dialled: str,
                    now: float) -> None:
        """A worker's B-leg INVITE: trusted by its source and token, forked to the devices."""
        token = request.get(HDR_TOKEN) or ""
        a_leg = self._calls.get(token)
        config = self.settings.current
        decision = decide_worker_leg(self._progress_of(a_leg) if a_leg else None, flow.port, dialled, config,
                                     self.reachable, device_ids=self.device_id, outgoing_in_use=self.outgoing,
                                     calls=self.in_progress())
        if isinstance(decision, Forward):
            assert a_leg is not None
            self.forwarding.forward_leg(request, flow, dest, key, a_leg, decision, now)
            return
        if isinstance(decision, ToProvider):
            assert a_leg is not None
            self.to_provider(request, flow, dest, key, a_leg, decision, now)
            return
        if isinstance(decision, ToVoicemail):
            assert a_leg is not None
            self.reply(request, dest, *self.forwarding.to_voicemail(a_leg, decision))
            return
        if not isinstance(decision, RingNumber):
            assert isinstance(decision, Refuse)
            self.reply(request, dest, decision.status, decision.reason)
            return
        assert a_leg is not None
        dialog = Dialog(token, Role.B, request, a_leg.caller, decision.number, flow, None, trunk=a_leg.trunk)
        settings = self.forwarding.ring_settings(decision)
        identity = self.identity(a_leg.caller, a_leg.trunk)
        self.start_fork(dialog, dest, key, self.targets(decision), settings, [("P-Asserted-Identity", identity)],
                         now)

    def to_provider(self, request: Request, flow: Flow, dest: Flow, key: str | None, a_leg: Dialog,
                     decision: ToProvider, now: float, extra_headers: list[tuple[str, str]] | None = None) -> None:
        """The worker's leg of a call out, to the provider: Request-URI sip:<number>@<server>,
        the INVITE re-sent with the trunk's credentials when challenged (the worker never
        sees the challenge), the offer cut to G.711."""
        trunk = decision.trunk
        branch = self.provider_branch(trunk, decision.number, a_leg.token)
        if branch is None:
            self.reply(request, dest, 503, "Service Unavailable (provider not reachable)")
            return
        target, authorize, offer = branch
        dialog = Dialog(a_leg.token, Role.B, request, a_leg.caller, decision.number, flow, None,
                        outgoing_trunk=trunk.name)
        self.start_fork(dialog, dest, key, [target], ForkSettings(CALL_OUT_TIMEOUT), extra_headers or [], now,
                         authorize=authorize, relay_body=offer)

    def provider_branch(self, trunk: TrunkConfig, number: str,
                         token: str) -> tuple[Target[Flow], Authorize, RelayBody[Flow]] | None:
        """What a fork needs to ring `number` at the provider of `trunk`: the target
        (sip:<number>@<server> over the provider's flow), the trunk's credentials for its
        challenge (the worker never sees it) and the offer cut to G.711. None (logged):
        the provider is not resolved."""
        provider = self.trunks.provider_flow(trunk.name) if self.trunks is not None else None
        if provider is None:
            log.warning("event=call_out_failed %s", fields(call=token, trunk=trunk.name,
                                                           reason="provider_not_resolved"))
            return None
        target = Target("", f"sip:{number}@{trunk.server}", provider, provider.transport == "tcp")

        def authorize(invite: Request, challenge: Response) -> tuple[str, str] | None:
            return credentials(invite, challenge, username=trunk.auth_user, password=trunk.password,
                               cnonce=new_tag())

        between = self.relay.body_between

        def offer(message: Request | Response, source: Flow, to: Flow) -> bytes:
            body = between(message, source, to)
            if isinstance(message, Request) and is_sdp(message.get("Content-Type")):
                return g711_only(body)
            return body

        return target, authorize, offer

    def _replaces_from_handset(self, request: Request, flow: Flow, dest: Flow, key: str | None, replaces: str,
                               caller: str, caller_device: str | None, now: float) -> None:
        """A handset's INVITE with Replaces (RFC 3891). A call-id our dialog-info NOTIFY named
        for a ringing call (a BLF key's pickup, usually `;early-only`) picks that call up; any
        other names a dialog through the box (`_replaces`: attended transfer, taking a call over)."""
        call_id = replaces.split(";", 1)[0].strip()
        if not any(c.token == call_id for c in self.ringing()):
            self.transfers.replaces(request, flow, dest, key, caller, None, now)
            return
        config = self.settings.current
        user = config.user(caller)
        assert user is not None
        decided = decide_pickup(user, caller_device, None, config, self.ringing(), self.media is not None,
                                token=call_id)
        request.remove("Replaces")  # it names our call, not a dialog of the worker's (whose pjsua would 481 it)
        self.pickup.pickup(request, flow, dest, key, decided, caller, caller_device, now)

    def ringing(self) -> list[CallInProgress]:
        """Calls whose devices ring now: the worker's leg to them is still being forked."""
        tokens = {d.token for d in self._by_fork.values()
                  if d.role is Role.B and d.fork is not None and d.fork.answered is None and not d.ended}
        return [self._progress_of(d) for t in tokens if (d := self._calls.get(t)) is not None and not d.ended
                and d.answer is None]

    # -- outgoing counts -----------------------------------------------------------------------
    def charge(self, first: Dialog, number: str) -> None:
        """A call out that `number` caused (a forward, a transfer) counts on its outgoing
        limit until the call ends."""
        self.outgoing[number] = self.outgoing.get(number, 0) + 1
        first.charged.append(number)

    def _release_charges(self, first: Dialog) -> None:
        for number in first.charged:
            self._uncount(number)
        first.charged.clear()

    def _uncount(self, number: str) -> None:
        left = self.outgoing.get(number, 1) - 1
        if left > 0:
            self.outgoing[number] = left
        else:
            self.outgoing.pop(number, None)

    # -- facts for the policy -----------------------------------------------------------------
    def device_id(self, number: str, binding_id: str) -> str:
        """A device's stable id (what `dnd_devices` names), from its binding."""
        for b in self.bindings.bindings(number):
            if b.id == binding_id:
                return device_id(b.instance, b.contact)
        return binding_id

    def reachable(self, number: str) -> list[str]:
        """Binding ids of `number`'s devices that can be rung now."""
        return [b.id for b in self.bindings.bindings(number) if b.reachable and self.network.flow_open(b.flow)]

    def _count_join(self, join: Dialog, step: int) -> None:
        """Keep the call's count of joined devices (kept, not counted over every dialog on
        each new INVITE: finished dialogs linger 32 s, thousands of them under load)."""
        if join.counted_as_joined == (step > 0):
            return
        join.counted_as_joined = step > 0
        first = self._calls.get(join.token)
        if first is not None:
            first.joined += step

    def _progress_of(self, first: Dialog) -> CallInProgress:
        return CallInProgress(first.token, first.caller, first.callee, first.caller_device,
                              first.answer is not None and not first.ended, first.worker_port, 2 + first.joined,
                              first.trunk, first.outgoing_trunk)

    def in_progress(self) -> list[CallInProgress]:
        return [self._progress_of(d) for d in self._calls.values() if d.role is Role.A and not d.ended]

    def targets(self, decision: RingNumber) -> list[Target[Flow]]:
        chosen = set(decision.devices)
        return [Target(b.id, b.target_uri, b.flow, b.flow.transport == "tcp")
                for b in self.bindings.bindings(decision.number) if b.id in chosen]

    def start_fork(self, dialog: Dialog, dest: Flow, key: str | None, targets: list[Target[Flow]],
                    settings: ForkSettings, extra_headers: list[tuple[str, str]], now: float,
                    *, record_route: bool = True, authorize: Authorize | None = None,
                    relay_body: RelayBody[Flow] | None = None, trying_sent: bool = False) -> None:
        caller_flow = dialog.caller_flow
        fork: Fork[Flow] = Fork(
            dialog.invite, dest, caller_flow.transport == "tcp", settings, now,
            via_for=self._via,
            record_route=(lambda t: self._record_route(caller_flow, t)) if record_route else None,
            extra_headers=extra_headers,
            relay_body=relay_body or self._body_between,
            authorize=authorize,
        )
        dialog.fork = fork
        self._by_fork[id(fork)] = dialog
        if key:
            self._forks[key] = dialog
        self._dialogs[dialog.call_id] = dialog
        actions = fork.start(targets, now, trying_sent=trying_sent)
        for branch_id in fork.branches:
            self._branches[branch_id] = dialog
        self.apply(dialog, actions)

    def _looped(self, request: Request) -> bool:
        """§16.3 step 4: one of our own branches in the Via list means this came back to us."""
        for value in request.get_all("Via")[1:]:
            try:
                branch = parse_via(value).branch
            except SipSyntaxError:
                continue
            if branch and (branch in self._branches or branch.startswith(STATELESS_PREFIX)):
                return True
        return False

    def device_of(self, number: str, flow: Flow) -> str | None:
        for b in self.bindings.bindings(number):
            if b.flow.host == flow.host and b.flow.port == flow.port and b.flow.transport == flow.transport:
                return b.id
        return None

    def _address_for(self, flow: Flow) -> tuple[str, int]:
        """Our address as we name it along `flow` (Via, Record-Route, SDP): the one the flow
        reaches us at; to a provider whose trunk has an `external_address` (the box behind a
        router that forwards the SIP and RTP ports to it), that address with our port."""
        host, port = self.network.local_address(flow)
        name = self.trunks.trunk_at(flow) if self.trunks is not None else None
        if name is not None:
            for trunk in self.settings.current.trunks:
                if trunk.name == name and trunk.external_address:
                    return trunk.external_address, port
        return host, port

    def _via_for(self, target: Target[Flow], branch: str) -> str:
        host, port = self._address_for(target.dest)
        proto = target.dest.transport.upper()
        return f"SIP/2.0/{proto} {format_host_port(host, port)};branch={branch};rport"

    def _record_route(self, caller_flow: Flow, target: Target[Flow]) -> str:
        """Record-Route so in-dialog requests come back here; doubled (RFC 5658) when the
        two sides reach us differently: another transport, or another address (a handset
        on the LAN reaches a wildcard listener at the box's LAN address, a media worker at
        127.0.0.1), so each side is given the address it can reach."""
        out = self._rr_uri(target.dest)
        back = self._rr_uri(caller_flow)
        return out if back == out else f"{out}, {back}"

    def _rr_uri(self, flow: Flow) -> str:
        host, port = self._address_for(flow)
        transport = ";transport=tcp" if flow.transport == "tcp" else ""
        return f"<sip:{format_host_port(host, port)}{transport};lr>"

    # -- responses ---------------------------------------------------------------------------
    def on_response(self, response: Response, flow: Flow, now: float) -> bool:
        top = response.get("Via")
        if top is None:
            return False
        try:
            via = parse_via(top)
        except SipSyntaxError:
            return False
        branch = via.branch or ""
        # First our CANCELs and BYEs: a CANCEL shares its INVITE's branch, and its key
        # (branch and method) tells the two apart.
        if self.client_tx.receive(response) is not None:
            return True
        dialog = self._branches.get(branch)
        if dialog is not None and dialog.fork is not None:
            self.apply(dialog, dialog.fork.on_response(branch, response, now))
            return True
        finished = self._finished.get(branch.rpartition(".")[0])
        if finished is not None and finished.index(branch) is not None:
            for send in finished.on_response(branch, response):
                self.network.send(send.data, send.dest)
            return True
        if branch.startswith(STATELESS_PREFIX):
            call_id = response.call_id
            live = self._dialogs.get(call_id)
            delta = live.cseq_delta if live is not None else (e.cseq_delta if (e := self._ended.get(call_id)) else 0)
            if delta and not self.is_worker(flow):
                shift_cseq(response, -delta)  # the provider's answer to the worker's request
            self.relay.backward(response, branch, flow, now)
            return True
        return False

    # -- fork actions -------------------------------------------------------------------------
    def apply(self, dialog: Dialog, actions: list[Send[Flow] | SendRequest[Flow] | ForkEvent]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.network.send(action.data, action.dest)
            elif isinstance(action, SendRequest):
                self._send_request(action.request, action.dest, action.reliable)
            else:
                self._fork_event(dialog, action)
        fork = dialog.fork
        if fork is not None:
            if fork.done:
                self._forget_fork(dialog)
            elif (finished := fork.finished()) is not None:
                self._bury(dialog, fork, finished)
            else:
                for branch_id in fork.branches:  # a branch re-sent with credentials is new
                    self._branches.setdefault(branch_id, dialog)
                self.timers.arm(fork, self._fire)

    def _fork_event(self, dialog: Dialog, event: ForkEvent) -> None:
        """Turn what the fork saw into live state, by leg: devices ring on the B-leg (or a
        direct call); the A-leg and join legs ring the worker, which nobody sees."""
        live = self.live
        shows_devices = dialog.role in (Role.B, Role.DIRECT)
        if event.kind == "ringing" and shows_devices and event.binding_id:
            live.device_ringing(dialog.token, event.binding_id)
        elif event.kind == "stopped" and shows_devices and event.binding_id:
            live.device_stopped(dialog.token, event.binding_id)
        elif event.kind == "answered":
            fork = dialog.fork
            if fork is not None and fork.answered is not None:
                dialog.callee_flow = fork.answered.target.dest
                dialog.answer = fork.take_answer()
                dialog.cseq_delta = fork.answered.tx.request.cseq[0] - dialog.invite.cseq[0]
            if dialog.role is Role.JOIN and dialog.answer is not None:
                self._count_join(dialog, +1)
            first = self._calls.get(dialog.token)
            if shows_devices and first is not None and first.transferring and first.answer is not None:
                # A transfer's leg: the call already talks; a new party takes a place in it.
                dialog.answered_by = event.binding_id
                live.call_transferred(dialog.token, dialog.caller, dialog.callee, event.binding_id or None)
                log.info("event=call_transferred %s", fields(call=dialog.token, caller=dialog.caller,
                                                             callee=dialog.callee, device=event.binding_id))
            elif shows_devices:
                dialog.answered_by = event.binding_id
                live.call_answered(dialog.token, event.binding_id or None)
                log.info("event=call_answered %s", fields(call=dialog.token, device=event.binding_id))
            elif dialog.role is Role.JOIN and dialog.caller_device:
                live.call_joined(dialog.token, dialog.caller_device)
                log.info("event=call_joined %s", fields(call=dialog.token, device=dialog.caller_device))
            elif dialog.role is Role.PICKUP:
                live.call_answered(dialog.token, dialog.caller_device)
                log.info("event=call_picked_up %s", fields(call=dialog.token, number=dialog.caller,
                                                           device=dialog.caller_device, ringing=dialog.callee))
        elif event.kind == "failed":
            self.end(dialog, f"status_{event.status}")
        elif event.kind == "exhausted":
            self.forwarding.exhausted(dialog, event.status or 480)

    def _send_request(self, request: Request, dest: Flow, reliable: bool) -> None:
        via = parse_via(request.get("Via") or "")
        data = request.to_bytes()
        self.client_tx.start(via.branch or new_tag(), request.method, data, dest, reliable, self.timers.now())
        self.network.send(data, dest)
        self.timers.arm(self.client_tx, self._fire)

    def _fire(self, obj: Timed, now: float) -> None:
        if obj is self.client_tx:
            for action in self.client_tx.on_timer(now):
                if isinstance(action, Retransmit):
                    self.network.send(action.data, action.dest)
            return
        dialog = self._by_fork.get(id(obj))
        if dialog is not None and dialog.fork is obj:
            self.apply(dialog, dialog.fork.on_timer(now))

    def _forget_fork(self, dialog: Dialog) -> str | None:
        """The fork's tables go; the INVITE's key, if it was held, is returned."""
        fork = dialog.fork
        if fork is None:
            return None
        for branch_id in fork.branches:
            self._branches.pop(branch_id, None)
        key = server_key(dialog.invite)  # the key it was held by (a skeleton keeps the Vias)
        if key is not None and self._forks.get(key) is dialog:
            del self._forks[key]
        else:
            key = None
        self._by_fork.pop(id(fork), None)
        dialog.fork = None
        return key

    def _bury(self, dialog: Dialog, fork: Fork[Flow], finished: FinishedFork[Flow]) -> None:
        """A fork that only lingers: its `FinishedFork` answers for it until its end."""
        for index in range(len(finished.branches)):
            self._branches.pop(f"{finished.prefix}.{index}", None)
        finished.key = self._forget_fork(dialog)  # `finished()` emptied its branches: those are ours to drop
        self._finished[finished.prefix] = finished
        if finished.key is not None:
            self._finished_invites[finished.key] = finished
        self._buried.append(finished)
        self._arm_linger()

    def end(self, dialog: Dialog, reason: str) -> None:
        """A dialog is over; what that means for the call depends on its leg."""
        if dialog.ended or left_after_transfer(dialog, reason):
            return
        dialog.ended = True
        dialog.invite = dialog.invite.skeleton()  # its fork may still run a while: not with its SDP
        if dialog.answer is not None:
            dialog.answer = dialog.answer.skeleton()
        call_id = dialog.call_id
        if self._dialogs.get(call_id) is dialog:
            del self._dialogs[call_id]
            if dialog.callee_flow is not None:  # never answered: nothing could follow it (481 either way)
                # Keep what a retransmitted BYE needs a while (64*T1), not the dialog.
                ended = EndedDialog(dialog, dialog.callee_flow, self.timers.now() + DIALOG_LINGER)
                self._ended[call_id] = ended
                self._lingering.append(ended)
                self._arm_linger()
        if dialog.role is Role.B:
            a_leg = self._calls.get(dialog.token)
            if a_leg is not None and not a_leg.ended and dialog.answered_by:
                self.live.call_left(dialog.token, dialog.answered_by)  # the others talk on
            return
        if dialog.role is Role.PICKUP:
            return  # the call ends by its A-leg (the worker hangs the caller up once alone)
        if dialog.role is Role.JOIN:
            self._count_join(dialog, -1)
            if dialog.answer is not None and dialog.caller_device:
                self.live.call_left(dialog.token, dialog.caller_device)
                log.info("event=call_left %s", fields(call=dialog.token, device=dialog.caller_device))
            return
        self._calls.pop(dialog.token, None)
        self._release_charges(dialog)
        if dialog.counts_outgoing:
            self._uncount(dialog.caller)
        if self.media is not None:
            self.media.call_over(dialog.token)
        self.live.call_ended(dialog.token, reason)
        log.info("event=call_ended %s", fields(call=dialog.token, caller=dialog.caller, callee=dialog.callee,
                                               reason=reason, outgoing=self.outgoing.get(dialog.caller, 0)))

    # -- media workers' word ----------------------------------------------------------------------
    def worker_call_ended(self, token: str, reason: str) -> None:
        """The worker says the call is over: whatever BYE we did not see, it is over."""
        dialog = self._calls.get(token)
        if dialog is not None:
            self.end(dialog, reason)

    def worker_died(self, token: str) -> None:
        """A worker vanished mid-call: BYE every party we still can, end the call, and
        forget its dialogs at once, so their in-dialog requests get 481 and are not relayed
        to a dead port."""
        for dialog in [c for c in self._dialogs.values() if c.token == token and not c.ended]:
            self._bye_party(dialog)
            self.end(dialog, "media_worker_died")
        a_leg = self._calls.get(token)
        if a_leg is not None:
            a_leg.transferring = False
            self.end(a_leg, "media_worker_died")
        for dialog in [c for c in self._dialogs.values() if c.token == token]:
            self._forget_dialog(dialog)
        for ended in [e for e in self._ended.values() if e.token == token]:
            del self._ended[ended.call_id]

    def _bye_party(self, dialog: Dialog) -> None:
        """BYE, in the worker's place, to the device or caller on the far side of a dialog."""
        answer = dialog.answer
        if answer is None:
            return  # never answered: the fork's own failure ends it
        if dialog.role is Role.B:
            # We stand for the worker, the UAC: From ours, To and target the device's.
            dest = dialog.callee_flow
            try:
                target = str(parse_name_addr(answer.get("Contact") or "").uri)
            except SipSyntaxError:
                return
            from_value, to_value = dialog.invite.get("From") or "", answer.get("To") or ""
        else:
            # We stand for the worker, the UAS: From is its To, the caller is the target.
            dest = dialog.caller_flow
            try:
                target = str(parse_name_addr(dialog.invite.get("Contact") or "").uri)
            except SipSyntaxError:
                return
            from_value, to_value = answer.get("To") or "", dialog.invite.get("From") or ""
        if dest is None:
            return
        host, port = self._address_for(dest)
        bye = Request("BYE", target, [
            ("Via", f"SIP/2.0/{dest.transport.upper()} {format_host_port(host, port)};"
                    f"branch=z9hG4bK{new_tag()}{new_tag()};rport"),
            ("Max-Forwards", "70"), ("From", from_value), ("To", to_value), ("Call-ID", dialog.call_id),
            ("CSeq", f"{dialog.invite.cseq[0] + 100000} BYE"),
            ("Reason", 'SIP;cause=500;text="Media server failure"'),
        ])
        self._send_request(bye, dest, dest.transport == "tcp")

    @property
    def dialog_count(self) -> int:
        """Dialogs the router follows, the lingering ones too (what its memory grows with)."""
        return len(self._dialogs) + len(self._ended)

    def compact(self, now: float) -> None:
        """After a burst: a dict keeps the table it grew to when its entries leave; copies
        of the per-call tables are the size of what is left (the housekeeping calls this).
        The relay's expired records go now, not when the next call comes."""
        self.relay.expire(now)
        self.client_tx.compact()
        self._forks = dict(self._forks)
        self._branches = dict(self._branches)
        self._dialogs = dict(self._dialogs)
        self._by_fork = dict(self._by_fork)
        self._calls = dict(self._calls)
        self._finished = dict(self._finished)
        self._finished_invites = dict(self._finished_invites)
        self._ended = dict(self._ended)

    def _arm_linger(self) -> None:
        following = self._next_linger()
        if self._linger_timer is None and following is not None:
            self._linger_timer = self.timers.call_at(following, self._forget_lingering)

    def _next_linger(self) -> float | None:
        """When the first linger of either queue is over."""
        ended = self._lingering[0].until if self._lingering else None
        buried = self._buried[0].until if self._buried else None
        if ended is None or buried is None:
            return buried if ended is None else ended
        return min(ended, buried)

    def _forget_lingering(self, now: float) -> None:
        """The lingers that are over. Each queue is in the order its records were made, and
        a record waits for those before it: a fork whose transactions ended sooner than
        64*T1 after its burial (Confirmed over TCP: at once) is forgotten with them."""
        ended, dialogs = self._lingering, self._ended
        while ended and ended[0].until <= now:
            record = ended.popleft()
            if dialogs.get(record.call_id) is record:
                del dialogs[record.call_id]
        buried, finished, invites = self._buried, self._finished, self._finished_invites
        while buried and buried[0].until <= now:
            fork = buried.popleft()
            if finished.get(fork.prefix) is fork:
                del finished[fork.prefix]
            if fork.key is not None and invites.get(fork.key) is fork:
                del invites[fork.key]
        following = self._next_linger()
        self._linger_timer = self.timers.call_at(following, self._forget_lingering) if following is not None else None

    def _forget_dialog(self, dialog: Dialog) -> None:
        if self._dialogs.get(dialog.call_id) is dialog:
            del self._dialogs[dialog.call_id]

    # -- in-dialog relay (stateless, §16.11) -----------------------------------------------------
    def _relay_in_dialog(self, request: Request, flow: Flow, reply_to: Flow, now: float) -> None:
        """Send a request inside a known dialog to the other party, over its flow.

        `reply_to` is where the edge sends this request's responses: the relay remembers
        it, and sends the responses there and nowhere else.  `flow` is where it came from.
        """
        method = request.method
        dialog = self._dialogs.get(request.call_id)
        if dialog is None or dialog.callee_flow is None or (dialog.ended and method not in ("BYE", "ACK")):
            ended = self._ended.get(request.call_id) if dialog is None else None
            if ended is not None and method in ("BYE", "ACK"):
                # After the call: a retransmitted BYE, or the ACK of a retransmitted 2xx.
                towards_callee = tag_of(request.get("From")) == ended.caller_tag
                if towards_callee and ended.cseq_delta:
                    shift_cseq(request, ended.cseq_delta)
                self._relay(request, flow, reply_to, now, ended.callee_flow if towards_callee else ended.caller_flow,
                            ended.caller_flow, ended.callee_flow)
            elif method != "ACK":
                self.reply(request, reply_to, 481, "Call/Transaction Does Not Exist")
            return
        towards_callee = dialog.sent_by_caller(request)
        dest = dialog.callee_flow if towards_callee else dialog.caller_flow
        if towards_callee and dialog.cseq_delta:
            shift_cseq(request, dialog.cseq_delta)  # the worker's request, in the provider's CSeq space
        if method == "REFER" and self.is_worker(dest) and not self.transfers.refer_to_worker(
                request, dialog, towards_callee, reply_to):
            return
        if not self._relay(request, flow, reply_to, now, dest, dialog.caller_flow, dialog.callee_flow):
            return
        if method == "BYE":
            self.end(dialog, "bye_from_caller" if towards_callee else "bye_from_callee")

    def _relay(self, request: Request, flow: Flow, reply_to: Flow, now: float, dest: Flow, caller_flow: Flow,
               callee_flow: Flow) -> bool:
        """Relay a request of a dialog (live or ended) to `dest`; False (answered 483) if not."""
        # Where its answers go is kept 64*T1: as the dialog's own flow when it is that one
        # (the same value), not as one more copy made for this datagram.
        if reply_to == caller_flow:
            reply_to = caller_flow
        elif reply_to == callee_flow:
            reply_to = callee_flow
        if not self.relay.forward(request, dest, None if request.method == "ACK" else reply_to, now, flow):
            if request.method != "ACK":
                self.reply(request, reply_to, 483, "Too Many Hops")
            return False
        return True

    def is_worker(self, flow: Flow) -> bool:
        return self.media is not None and self.media.is_worker(flow)
