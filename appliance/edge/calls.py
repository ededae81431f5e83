"""Call routing in the edge: INVITE in, forks out, dialogs relayed, live state told.

Initial INVITEs are challenged (407), except a provider's: a request whose source address
is one the box resolved for a trunk (`TrunkLookup`) is a call from outside, routed by its
called number (`decide_incoming`) and never challenged. Who may call whom and where the call goes is asked
of the call policy (`appliance.call_policy`, pure code) with the request's facts, and this
module carries the decision out: a refusal, a ring-all `Fork` (sans-I/O) to the dialled
number's devices, a media worker that anchors the call, a device joining a call. Requests
inside a dialog follow our Record-Route back here and are relayed statelessly (§16.11) to
the other party over the flow that party uses, so a handset behind NAT or on its own TCP
connection is always reached.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from appliance.call_policy import (
    DIVERSION_REASONS,
    CallInProgress,
    ChangeSettings,
    Forward,
    JoinCall,
    OpenMailbox,
    PickupCall,
    Refuse,
    RingNumber,
    RouteToTrunk,
    ToProvider,
    ToVoicemail,
    decide_forward,
    decide_incoming,
    decide_mailbox,
    decide_new_call,
    decide_pickup,
    decide_transfer,
    decide_worker_leg,
    forward_condition_of,
    pickup_request,
)
from appliance.config import LiveConfig, TrunkConfig, device_id
from appliance.edge.auth_gate import AuthGate
from appliance.edge.relay import STATELESS_PREFIX, StatelessRelay
from appliance.edge.seams import Bindings, CallEvents, MediaAnchor, Network, TrunkLookup, UserSettings
from appliance.edge.timers import Deadline, Timed, TimerWheel
from appliance.edge.transport import format_host_port
from appliance.logs import fields
from appliance.media.protocol import (
    HDR_CALLER,
    HDR_JOIN,
    HDR_MAILBOX,
    HDR_PICKUP,
    HDR_PLAY,
    HDR_TARGET,
    HDR_TOKEN,
    HDR_TRANSFER,
    HDR_VOICEMAIL,
    HDR_VOICEMAIL_MAX,
    LOOPBACK,
    PLAY_CONFIRM,
)
from appliance.sip.authenticator import Outcome
from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_name_addr, parse_via
from appliance.sip.invite_transaction import Send
from appliance.sip.message import Request, Response, make_response, new_tag
from appliance.sip.proxy import Authorize, Fork, ForkEvent, ForkSettings, RelayBody, SendRequest, Target
from appliance.sip.registrar import Flow
from appliance.sip.sdp import is_sdp
from appliance.sip.transaction import ClientTransactions, Retransmit, server_key
from appliance.sip.trunk_call import credentials, g711_only
from appliance.sip.uri import parse_uri

log = logging.getLogger("homepbx.calls")

DIALOG_LINGER = 32.0
CALL_OUT_TIMEOUT = 180.0
"""How long a call out may ring at the far end before we give up (the provider usually decides first)."""


class Role(Enum):
    """What a dialog through the edge is in its call: the caller to its worker (A), the
    worker to the ringing devices (B), a joining device to the worker (JOIN), a device
    picking the ringing call up (PICKUP), or the caller straight to the devices when no
    media worker anchors calls (DIRECT)."""

    A = "a"
    B = "b"
    JOIN = "join"
    PICKUP = "pickup"
    DIRECT = "direct"


@dataclass
class Dialog:
    """One dialog as the edge follows it, from INVITE to BYE; the dialogs of one call
    (A and B legs, a joining device) share a token, the call's id."""

    token: str
    role: Role
    invite: Request
    caller: str
    callee: str
    caller_flow: Flow
    caller_device: str | None
    counts_outgoing: bool = False
    trunk: str | None = None
    """The trunk a call from outside came in on; `caller` is then the outside number."""
    outgoing_trunk: str | None = None
    """The trunk a call out leaves by; `callee` is then the outside number."""
    cseq_delta: int = 0
    """The provider's leg re-sent with credentials: what its CSeq is ahead of the worker's."""
    worker_port: int | None = None
    fork: Fork[Flow] | None = None
    callee_flow: Flow | None = None
    answer: Response | None = None
    answered_by: str | None = None
    ended: bool = False
    joined: int = 0
    """On a call's first dialog: devices that joined it (`*74`) and are talking now."""
    counted_as_joined: bool = False
    """On a JOIN dialog: it is counted in its call's `joined`."""
    hops: tuple[tuple[str, str], ...] = ()
    """On a call's first dialog: the diversions the call took (number, condition), first first."""
    charged: list[str] = field(default_factory=list)
    """On a call's first dialog: numbers whose outgoing count a forward out through a trunk holds."""
    transferring: bool = False
    """On a call's first dialog: a transfer (or Replaces) has run in it, so a party may leave
    while the call goes on in its worker; the worker's `call_ended` ends the call."""
    caller_tag: str = field(init=False)
    """The From tag of the INVITE: which way an in-dialog request goes (read once, not per request)."""

    def __post_init__(self) -> None:
        self.caller_tag = _tag(self.invite.get("From")) or ""

    @property
    def call_id(self) -> str:
        return self.invite.call_id


class CallRouter:
    """Carries out the call policy's decisions, and follows every dialog to its end."""

    def __init__(self, settings: LiveConfig, network: Network, bindings: Bindings, auth: AuthGate,
                 live: CallEvents, timers: TimerWheel, media: MediaAnchor | None,
                 trunks: TrunkLookup | None = None, user_settings: UserSettings | None = None) -> None:
        self.settings = settings
        self.user_settings = user_settings
        self.trunks = trunks
        self.network = network
        self.bindings = bindings
        self.auth = auth
        self.live = live
        self.timers = timers
        self.media = media
        self.client_tx: ClientTransactions[Flow] = ClientTransactions()
        self._forks: dict[str, Dialog] = {}  # server transaction key of the INVITE -> its dialog
        self._branches: dict[str, Dialog] = {}  # our branch id -> dialog
        self._dialogs: dict[str, Dialog] = {}  # Call-ID -> dialog
        self._by_fork: dict[int, Dialog] = {}  # id(fork) -> dialog, for its timers
        self._calls: dict[str, Dialog] = {}  # token -> the call's first dialog (A, or DIRECT)
        self.outgoing: dict[str, int] = {}  # number -> calls placed now
        self.relay = StatelessRelay(network, self._is_worker, address_for=self._address_for)
        # Finished dialogs, in the order they ended (every linger is as long): one timer for
        # the first, not a timer and a closure each (thousands linger under a burst).
        self._lingering: deque[tuple[float, Dialog]] = deque()
        self._linger_timer: Deadline | None = None

    # -- requests ----------------------------------------------------------------------------
    def on_request(self, request: Request, flow: Flow, dest: Flow, now: float) -> bool:
        """Handle call-related requests; False if this is not ours to handle."""
        method = request.method
        to_tag = _tag(request.get("To"))
        key = server_key(request)
        invite_key = key.rsplit("|", 1)[0] + "|INVITE" if key else None
        if method == "INVITE" and to_tag is None:
            dialog = self._forks.get(key) if key else None
            if dialog is not None:
                if dialog.fork is not None:
                    self._apply(dialog, dialog.fork.on_request_retransmission())
                return True  # still finding a worker: our 100 Trying already went out
            self._new_call(request, flow, dest, key, now)
            return True
        if method == "ACK":
            # An ACK with the INVITE's branch acknowledges our non-2xx final (hop by hop);
            # the ACK of a 2xx is a new transaction that belongs to the dialog.
            dialog = self._forks.get(invite_key) if invite_key else None
            if dialog is not None and dialog.fork is not None:
                self._apply(dialog, dialog.fork.on_ack(now))
                return True
            self._relay_in_dialog(request, flow, dest, now)
            return True
        if method == "CANCEL":
            dialog = self._forks.get(invite_key) if invite_key else None
            if dialog is None:
                self._reply(request, dest, 481, "Call/Transaction Does Not Exist")
                return True
            self._reply(request, dest, 200, "OK")
            if dialog.fork is not None:
                self._apply(dialog, dialog.fork.cancel(now, request.get("Reason")))
            else:  # cancelled while a worker was being found
                self._reply(dialog.invite, dest, 487, "Request Terminated")
                self._end(dialog, "status_487")
            return True
        if to_tag is not None and method in ("BYE", "INVITE", "UPDATE", "INFO", "PRACK", "NOTIFY", "REFER",
                                             "MESSAGE", "OPTIONS"):
            if request.call_id not in self._dialogs:
                self._reply(request, dest, 481, "Call/Transaction Does Not Exist")
                return True
            self._relay_in_dialog(request, flow, dest, now)
            return True
        return False

    def _reply(self, request: Request, dest: Flow, status: int, reason: str,
               headers: list[tuple[str, str]] | None = None) -> None:
        self.network.send(make_response(request, status, reason, headers=headers or []).to_bytes(), dest)

    def _new_call(self, request: Request, flow: Flow, dest: Flow, key: str | None, now: float) -> None:
        if self._looped(request):
            self._reply(request, dest, 482, "Loop Detected")
            return
        try:
            from_addr = parse_name_addr(request.get("From") or "")
            dialled = _dialled_number(request.uri)
        except SipSyntaxError:
            self._reply(request, dest, 400, "Malformed From or Request-URI")
            return
        if self.media is not None and self.media.is_worker(flow):
            if request.get(HDR_TRANSFER) is not None:
                self._transfer_leg(request, flow, dest, key, dialled, now)
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
            self._reply(request, dest, 483, "Too Many Hops")
            return
        caller_device = self._device_of(caller, flow)
        replaces = request.get("Replaces")
        if replaces is not None and self.media is not None:
            self._replaces_from_handset(request, flow, dest, key, replaces, caller, caller_device, now)
            return
        pickup = pickup_request(dialled, config)
        if pickup is not None:
            decided = decide_pickup(user, caller_device, pickup[0], config, self._ringing(), self.media is not None)
            self._pickup(request, flow, dest, key, decided, caller, caller_device, now)
            return
        mailbox = decide_mailbox(user, caller_device, dialled, config, self.media is not None)
        if mailbox is not None:
            self._mailbox(request, flow, dest, key, mailbox, caller)
            return
        decision = decide_new_call(user, caller_device, dialled, config, self._reachable, self.outgoing,
                                   self._in_progress(), anchored=self.media is not None,
                                   device_ids=self._device_id)
        if isinstance(decision, ChangeSettings):
            self._change_settings(request, flow, dest, key, decision, caller_device, dialled)
        elif isinstance(decision, Refuse):
            self._refuse(request, dest, decision, caller, dialled)
        elif isinstance(decision, JoinCall):
            self._join(request, flow, dest, key, decision, caller, now)
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
            self._reply(request, dest, 404, "Not Found")
            return
        max_forwards = request.get("Max-Forwards")
        if max_forwards is not None and int(max_forwards) <= 0:
            self._reply(request, dest, 483, "Too Many Hops")
            return
        try:
            to_user = parse_name_addr(request.get("To") or "").uri.user or ""
        except SipSyntaxError:
            to_user = ""
        number = _outside_number(request)
        did = dialled or to_user
        decision = decide_incoming(trunk, dialled, to_user, config, self._reachable, self._device_id,
                                   anchored=self.media is not None)
        if isinstance(decision, Refuse):
            log.info("event=trunk_call_refused %s", fields(number=number, did=did, trunk=trunk_name,
                                                           status=decision.status, reason=decision.why))
            self._reply(request, dest, decision.status, decision.reason)
            return
        log.info("event=trunk_call %s", fields(number=number, did=did, trunk=trunk_name, callee=decision.number))
        self._ring(request, flow, dest, key, decision, number, None, now, trunk=trunk_name)

    def _identity(self, caller: str, trunk: str | None) -> str:
        """Who the callee's display shows: an extension by its name, an outside caller by its number."""
        config = self.settings.current
        user = config.user(caller) if trunk is None else None
        return f'"{(user.name if user else "") or caller}" <sip:{caller}@{config.server.realm}>'

    def _refuse(self, request: Request, dest: Flow, decision: Refuse, caller: str, dialled: str) -> None:
        if decision.why == "outgoing_limit":
            log.info("event=call_refused %s", fields(caller=caller, callee=dialled, reason=decision.why))
        self._reply(request, dest, decision.status, decision.reason)

    def _ring(self, request: Request, flow: Flow, dest: Flow, key: str | None, decision: RingNumber,
              caller: str, caller_device: str | None, now: float, *, trunk: str | None = None) -> None:
        """A new call from a handset or the provider: straight to the devices, or anchored in a media worker."""
        dialog = Dialog(new_tag(), Role.A if self.media else Role.DIRECT, request, caller, decision.number, flow,
                        caller_device, counts_outgoing=decision.counts_outgoing, trunk=trunk)
        if decision.counts_outgoing:
            self.outgoing[caller] = self.outgoing.get(caller, 0) + 1
        self._calls[dialog.token] = dialog
        self.live.call_started(dialog.token, caller, decision.number, caller_device, trunk=trunk,
                               caller_name=_display_name(request) if trunk is not None else "")
        log.info("event=call_started %s", fields(call=dialog.token, caller=caller, callee=decision.number,
                                                 devices=len(decision.devices)))
        identity = self._identity(caller, trunk)
        media = self.media
        if media is None:
            settings = ForkSettings(decision.ring_timeout, decline_all=decision.decline_all)
            self._start_fork(dialog, dest, key, self._targets(decision), settings,
                             [("P-Asserted-Identity", identity)], now)
            return
        # Anchor the call in a media worker: the INVITE goes there, the worker's B-leg
        # comes back to us and is forked to the devices.
        if key:
            self._forks[key] = dialog  # retransmissions are absorbed while a worker is found
        self._reply(request, dest, 100, "Trying")
        headers = [(HDR_TARGET, f"<sip:{decision.number}@{media.edge_address}>"), (HDR_CALLER, identity)]
        # The A-leg's own timer only backs up the B-leg's ring timeout, which decides.
        settings = ForkSettings(self._backup_timeout(decision))
        media.anchor(dialog.token, lambda port: self._to_worker(dialog, dest, key, port, settings, headers))

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
            self._reply(request, dest, 503, "Service Unavailable (calls out need media workers)")
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
        self._reply(request, dest, 100, "Trying")
        headers = [(HDR_TARGET, f"<sip:{decision.number}@{media.edge_address}>"),
                   (HDR_CALLER, f"<sip:{decision.caller_id}@{trunk.server}>")]
        settings = ForkSettings(CALL_OUT_TIMEOUT + 15.0)
        media.anchor(dialog.token, lambda port: self._to_worker(dialog, dest, key, port, settings, headers))

    def _to_worker(self, dialog: Dialog, dest: Flow, key: str | None, port: int | None, settings: ForkSettings,
                   headers: list[tuple[str, str]]) -> None:
        """Relay an INVITE to the worker on `port` (None: every worker is busy)."""
        now = self.timers.now()
        if dialog.ended:
            return
        if port is None:
            self._reply(dialog.invite, dest, 503, "Service Unavailable (all lines busy)",
                        headers=[("Retry-After", "5")])
            if key and self._forks.get(key) is dialog:
                del self._forks[key]
            self._end(dialog, "no_media_worker")
            return
        dialog.worker_port = port
        target = Target("", f"sip:{dialog.callee}@{LOOPBACK}:{port}", self._worker_flow(port), False)
        self._start_fork(dialog, dest, key, [target], settings, [(HDR_TOKEN, dialog.token), *headers], now,
                         record_route=True)

    def _worker_flow(self, port: int) -> Flow:
        addresses = self.network.addresses
        return Flow("udp", LOOPBACK, port, addresses[0] if addresses else "")

    def _worker_leg(self, request: Request, flow: Flow, dest: Flow, key: str | None, dialled: str,
                    now: float) -> None:
        """A worker's B-leg INVITE: trusted by its source and token, forked to the devices."""
        token = request.get(HDR_TOKEN) or ""
        a_leg = self._calls.get(token)
        config = self.settings.current
        decision = decide_worker_leg(self._progress_of(a_leg) if a_leg else None, flow.port, dialled, config,
                                     self._reachable, device_ids=self._device_id, outgoing_in_use=self.outgoing,
                                     calls=self._in_progress())
        if isinstance(decision, Forward):
            assert a_leg is not None
            self._forward_leg(request, flow, dest, key, a_leg, decision, now)
            return
        if isinstance(decision, ToProvider):
            assert a_leg is not None
            self._to_provider(request, flow, dest, key, a_leg, decision, now)
            return
        if isinstance(decision, ToVoicemail):
            assert a_leg is not None
            self._reply(request, dest, *self._to_voicemail(a_leg, decision))
            return
        if not isinstance(decision, RingNumber):
            assert isinstance(decision, Refuse)
            self._reply(request, dest, decision.status, decision.reason)
            return
        assert a_leg is not None
        dialog = Dialog(token, Role.B, request, a_leg.caller, decision.number, flow, None, trunk=a_leg.trunk)
        settings = self._ring_settings(decision)
        identity = self._identity(a_leg.caller, a_leg.trunk)
        self._start_fork(dialog, dest, key, self._targets(decision), settings, [("P-Asserted-Identity", identity)],
                         now)

    def _to_provider(self, request: Request, flow: Flow, dest: Flow, key: str | None, a_leg: Dialog,
                     decision: ToProvider, now: float, extra_headers: list[tuple[str, str]] | None = None) -> None:
        """The worker's leg of a call out, to the provider: Request-URI sip:<number>@<server>,
        the INVITE re-sent with the trunk's credentials when challenged (the worker never
        sees the challenge), the offer cut to G.711."""
        trunk = decision.trunk
        branch = self._provider_branch(trunk, decision.number, a_leg.token)
        if branch is None:
            self._reply(request, dest, 503, "Service Unavailable (provider not reachable)")
            return
        target, authorize, offer = branch
        dialog = Dialog(a_leg.token, Role.B, request, a_leg.caller, decision.number, flow, None,
                        outgoing_trunk=trunk.name)
        self._start_fork(dialog, dest, key, [target], ForkSettings(CALL_OUT_TIMEOUT), extra_headers or [], now,
                         authorize=authorize, relay_body=offer)

    def _provider_branch(self, trunk: TrunkConfig, number: str,
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

    def _join(self, request: Request, flow: Flow, dest: Flow, key: str | None, decision: JoinCall, number: str,
              now: float) -> None:
        """*74: a device of a one-number user joins that number's call in progress."""
        dialog = Dialog(decision.token, Role.JOIN, request, number, number, flow, decision.device)
        worker = self._worker_flow(decision.worker_port)
        target = Target("", f"sip:join@{LOOPBACK}:{decision.worker_port}", worker, False)
        log.info("event=join_requested %s", fields(call=decision.token, number=number, device=decision.device))
        self._start_fork(dialog, dest, key, [target], ForkSettings(30.0),
                         [(HDR_TOKEN, decision.token), (HDR_JOIN, "1")], now, record_route=True)

    def _replaces_from_handset(self, request: Request, flow: Flow, dest: Flow, key: str | None, replaces: str,
                               caller: str, caller_device: str | None, now: float) -> None:
        """A handset's INVITE with Replaces (RFC 3891). A call-id our dialog-info NOTIFY named
        for a ringing call (a BLF key's pickup, usually `;early-only`) picks that call up; any
        other names a dialog through the box (`_replaces`: attended transfer, taking a call over)."""
        call_id = replaces.split(";", 1)[0].strip()
        if not any(c.token == call_id for c in self._ringing()):
            self._replaces(request, flow, dest, key, caller, None, now)
            return
        config = self.settings.current
        user = config.user(caller)
        assert user is not None
        decided = decide_pickup(user, caller_device, None, config, self._ringing(), self.media is not None,
                                token=call_id)
        request.remove("Replaces")  # it names our call, not a dialog of the worker's (whose pjsua would 481 it)
        self._pickup(request, flow, dest, key, decided, caller, caller_device, now)

    def _pickup(self, request: Request, flow: Flow, dest: Flow, key: str | None, decision: Refuse | PickupCall,
                caller: str, caller_device: str | None, now: float) -> None:
        """`*8`, `**<number>` or a BLF key: the picker's INVITE goes to the worker that
        anchors the ringing call (`X-Homepbx-Pickup`); it answers the picker, bridges it
        with the caller and CANCELs its leg to the ringing devices."""
        if isinstance(decision, Refuse):
            log.info("event=pickup_refused %s", fields(number=caller, device=caller_device, status=decision.status,
                                                       reason=decision.why))
            self._reply(request, dest, decision.status, decision.reason)
            return
        dialog = Dialog(decision.token, Role.PICKUP, request, caller, decision.number, flow, caller_device)
        worker = self._worker_flow(decision.worker_port)
        target = Target("", f"sip:pickup@{LOOPBACK}:{decision.worker_port}", worker, False)
        log.info("event=pickup_requested %s", fields(call=decision.token, number=caller, device=caller_device,
                                                     ringing=decision.number))
        self._start_fork(dialog, dest, key, [target], ForkSettings(30.0),
                         [(HDR_TOKEN, decision.token), (HDR_PICKUP, "1")], now, record_route=True)

    def _ringing(self) -> list[CallInProgress]:
        """Calls whose devices ring now: the worker's leg to them is still being forked."""
        tokens = {d.token for d in self._by_fork.values()
                  if d.role is Role.B and d.fork is not None and d.fork.answered is None and not d.ended}
        return [self._progress_of(d) for t in tokens if (d := self._calls.get(t)) is not None and not d.ended
                and d.answer is None]
    # -- call forwarding, DND and their feature codes ------------------------------------------
    def _device_id(self, number: str, binding_id: str) -> str:
        """A device's stable id (what `dnd_devices` names), from its binding."""
        for b in self.bindings.bindings(number):
            if b.id == binding_id:
                return device_id(b.instance, b.contact)
        return binding_id

    def _ring_settings(self, decision: RingNumber) -> ForkSettings:
        """Ring settings of a B-leg: a callee that forwards on busy or no answer holds the
        fork's final answer, so the same transaction can ring the target (`_exhausted`)."""
        user = self.settings.current.user(decision.number)
        hold = user is not None and bool(user.forward_busy or user.forward_no_answer or user.voicemail)
        return ForkSettings(decision.ring_timeout, decline_all=decision.decline_all, hold_final=hold)

    def _backup_timeout(self, decision: RingNumber) -> float:
        """The A-leg's backup timer: past the B-leg's ring timeout, and for a callee that
        forwards, past a forward's own ringing too (the B-leg decides either way)."""
        user = self.settings.current.user(decision.number)
        if user is not None and any((user.forward_always, user.forward_busy, user.forward_no_answer,
                                     user.forward_unreachable, user.dnd)):
            return CALL_OUT_TIMEOUT + 30.0
        return decision.ring_timeout + 15.0

    def _to_voicemail(self, a_leg: Dialog, decision: ToVoicemail) -> tuple[int, str, list[tuple[str, str]]]:
        """The worker's leg goes to the answering machine: the final answer that tells the
        worker so (it answers the caller and records; see the protocol's "Answering machine")."""
        self.live.call_to_voicemail(a_leg.token, decision.number)
        log.info("event=call_to_voicemail %s", fields(call=a_leg.token, caller=a_leg.caller, number=decision.number,
                                                      condition=decision.condition))
        return 480, "Temporarily Unavailable (answering machine)", [
            (HDR_VOICEMAIL, decision.number), (HDR_VOICEMAIL_MAX, str(decision.max_seconds))]

    def _mailbox(self, request: Request, flow: Flow, dest: Flow, key: str | None, decision: OpenMailbox | Refuse,
                 caller: str) -> None:
        """The mailbox code: a media worker answers and runs the number's mailbox menu
        (`X-Homepbx-Mailbox`); only a registered device of the number gets there."""
        media = self.media
        if isinstance(decision, Refuse) or media is None:
            refused = decision if isinstance(decision, Refuse) else Refuse(503, "Service Unavailable", "no_media")
            log.info("event=mailbox_refused %s", fields(number=caller, status=refused.status, reason=refused.why))
            self._reply(request, dest, refused.status, refused.reason)
            return
        dialog = Dialog(new_tag(), Role.A, request, caller, decision.number, flow, decision.device)
        if key:
            self._forks[key] = dialog
        self._calls[dialog.token] = dialog
        self._reply(request, dest, 100, "Trying")
        log.info("event=mailbox_opened %s", fields(call=dialog.token, number=decision.number, device=decision.device))
        media.anchor(dialog.token, lambda port: self._to_worker(dialog, dest, key, port, ForkSettings(30.0),
                                                                [(HDR_MAILBOX, decision.number)]))

    def _diversion(self, hops: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        """RFC 5806 Diversion headers, the latest diversion first."""
        realm = self.settings.current.server.realm
        return [("Diversion", f"<sip:{number}@{realm}>;reason={DIVERSION_REASONS[condition]};counter=1")
                for number, condition in reversed(hops)]

    def _note_forward(self, a_leg: Dialog, forward: Forward) -> None:
        a_leg.hops = forward.hops
        to = forward.to
        self.live.call_forwarded(a_leg.token, forward.number, to.number, forward.hops[-1][1])
        log.info("event=call_forwarded %s", fields(
            call=a_leg.token, caller=a_leg.caller, number=forward.number, condition=forward.hops[-1][1],
            to=to.number, trunk=to.trunk if isinstance(to, RouteToTrunk) else "-",
            chain=">".join(forward.chain)))
        if isinstance(to, RouteToTrunk):  # counts on the forwarding number's outgoing limit
            self._charge(a_leg, forward.number)

    def _charge(self, first: Dialog, number: str) -> None:
        """A call out that `number` caused (a forward, a transfer) counts on its outgoing
        limit until the call ends."""
        self.outgoing[number] = self.outgoing.get(number, 0) + 1
        first.charged.append(number)

    def _release_charges(self, first: Dialog) -> None:
        for number in first.charged:
            left = self.outgoing.get(number, 1) - 1
            if left > 0:
                self.outgoing[number] = left
            else:
                self.outgoing.pop(number, None)
        first.charged.clear()

    def _forward_leg(self, request: Request, flow: Flow, dest: Flow, key: str | None, a_leg: Dialog,
                     forward: Forward, now: float) -> None:
        """The worker's leg of a call forwarded before ringing (always, DND, unreachable):
        to the target's devices, or out through a trunk; the worker never knows."""
        self._note_forward(a_leg, forward)
        headers = self._diversion(forward.hops)
        to = forward.to
        if isinstance(to, RouteToTrunk):
            trunk = next(t for t in self.settings.current.trunks if t.name == to.trunk)
            _as_trunk_caller(request, to, trunk)
            self._to_provider(request, flow, dest, key, a_leg, ToProvider(trunk, to.number), now, headers)
            return
        dialog = Dialog(a_leg.token, Role.B, request, a_leg.caller, to.number, flow, None, trunk=a_leg.trunk)
        identity = self._identity(a_leg.caller, a_leg.trunk)
        self._start_fork(dialog, dest, key, self._targets(to), self._ring_settings(to),
                         [("P-Asserted-Identity", identity), *headers], now)

    def _exhausted(self, dialog: Dialog, status: int) -> None:
        """Every device of a B-leg failed, or nobody answered in time: forward on busy or
        no answer within the same transaction (`Fork.retarget`), else the held answer."""
        fork = dialog.fork
        if fork is None:
            return
        now = self.timers.now()
        a_leg = self._calls.get(dialog.token)
        condition = forward_condition_of(status)
        config = self.settings.current
        user = config.user(dialog.callee) if a_leg is not None and condition and dialog.role is Role.B else None
        decision = None
        if user is not None and a_leg is not None and condition is not None:
            decision = decide_forward(user, condition, a_leg.hops, config, self._reachable, self._device_id,
                                      self.outgoing, self._in_progress(), a_leg.caller_device)
        if decision is None:
            self._apply(dialog, fork.finish(now))
            return
        if isinstance(decision, ToVoicemail):
            assert a_leg is not None
            status, reason, headers = self._to_voicemail(a_leg, decision)
            self._apply(dialog, fork.finish(now, make_response(fork.request, status, reason, headers=headers)))
            return
        if isinstance(decision, Refuse):
            log.info("event=forward_refused %s", fields(call=dialog.token, number=dialog.callee,
                                                        status=decision.status, reason=decision.why))
            self._apply(dialog, fork.finish(now, make_response(fork.request, decision.status, decision.reason)))
            return
        assert a_leg is not None
        self._note_forward(a_leg, decision)
        headers = self._diversion(decision.hops)
        to = decision.to
        if isinstance(to, RingNumber):
            dialog.callee = to.number
            self._apply(dialog, fork.retarget(self._targets(to), now, self._ring_settings(to), headers))
            return
        trunk = next(t for t in config.trunks if t.name == to.trunk)
        branch = self._provider_branch(trunk, to.number, a_leg.token)
        if branch is None:
            self._apply(dialog, fork.finish(now, make_response(
                fork.request, 503, "Service Unavailable (provider not reachable)")))
            return
        target, authorize, offer = branch
        dialog.callee, dialog.outgoing_trunk = to.number, trunk.name
        _as_trunk_caller(fork.request, to, trunk)
        self._apply(dialog, fork.retarget([target], now, ForkSettings(CALL_OUT_TIMEOUT), headers,
                                          authorize=authorize, relay_body=offer))

    def _change_settings(self, request: Request, flow: Flow, dest: Flow, key: str | None,
                         decision: ChangeSettings, caller_device: str | None, dialled: str) -> None:
        """A forwarding or DND code from a handset: saved and put in force, then confirmed
        (`_confirm`). Retransmissions of the INVITE meanwhile are absorbed (a toggle is
        applied once)."""
        changes = dict(decision.changes)
        said = ",".join(f"{k}={v}" for k, v in changes.items())
        if self.user_settings is None:
            self._reply(request, dest, 503, "Service Unavailable (settings cannot be saved)")
            return
        dialog = Dialog(new_tag(), Role.A, request, decision.number, dialled, flow, caller_device)
        if key:
            self._forks[key] = dialog
        self._reply(request, dest, 100, "Trying")

        def done(error: str | None) -> None:
            if error is not None:
                log.warning("event=feature_code_failed %s", fields(number=decision.number, code=decision.service,
                                                                   changes=said, error=error))
                self._reply(request, dest, 500, "Server Internal Error (settings not saved)")
                self._forget_confirm(dialog, key)
                return
            log.info("event=feature_code %s", fields(number=decision.number, device=caller_device or "-",
                                                     code=decision.service, changes=said))
            self._confirm(dialog, dest, key, decision)

        self.user_settings.change_user(decision.number, changes, done)

    def _confirm(self, dialog: Dialog, dest: Flow, key: str | None, decision: ChangeSettings) -> None:
        """Tell the handset its code was applied: a media worker answers, beeps and hangs up
        (`X-Homepbx-Play: confirm`); without a worker, a final answer whose phrase says what
        is now set."""
        text = ", ".join(f"{k.replace('_', ' ')} {'on' if v is True else 'off' if v in (False, '') else v}"
                         for k, v in decision.changes.items())
        media = self.media
        if media is None:
            self._reply(dialog.invite, dest, 480, f"Temporarily Unavailable (done: {text})")
            self._forget_confirm(dialog, key)
            return

        def anchored(port: int | None) -> None:
            if port is None:  # every worker busy: the change is made all the same
                self._reply(dialog.invite, dest, 480, f"Temporarily Unavailable (done: {text})")
                self._forget_confirm(dialog, key)
                self._end(dialog, "no_media_worker")
                return
            self._to_worker(dialog, dest, key, port, ForkSettings(30.0), [(HDR_PLAY, PLAY_CONFIRM)])

        self._calls[dialog.token] = dialog
        media.anchor(dialog.token, anchored)

    def _forget_confirm(self, dialog: Dialog, key: str | None) -> None:
        if key and self._forks.get(key) is dialog:
            del self._forks[key]

    # -- facts for the policy -----------------------------------------------------------------
    def _reachable(self, number: str) -> list[str]:
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

    def _in_progress(self) -> list[CallInProgress]:
        return [self._progress_of(d) for d in self._calls.values() if d.role is Role.A and not d.ended]

    def _targets(self, decision: RingNumber) -> list[Target[Flow]]:
        chosen = set(decision.devices)
        return [Target(b.id, b.target_uri, b.flow, b.flow.transport == "tcp")
                for b in self.bindings.bindings(decision.number) if b.id in chosen]

    def _start_fork(self, dialog: Dialog, dest: Flow, key: str | None, targets: list[Target[Flow]],
                    settings: ForkSettings, extra_headers: list[tuple[str, str]], now: float,
                    *, record_route: bool = True, authorize: Authorize | None = None,
                    relay_body: RelayBody[Flow] | None = None) -> None:
        caller_flow = dialog.caller_flow
        fork: Fork[Flow] = Fork(
            dialog.invite, dest, caller_flow.transport == "tcp", settings, now,
            via_for=self._via_for,
            record_route=(lambda t: self._record_route(caller_flow, t)) if record_route else None,
            extra_headers=extra_headers,
            relay_body=relay_body or self.relay.body_between,
            authorize=authorize,
        )
        dialog.fork = fork
        self._by_fork[id(fork)] = dialog
        if key:
            self._forks[key] = dialog
        self._dialogs[dialog.call_id] = dialog
        actions = fork.start(targets, now)
        for branch_id in fork.branches:
            self._branches[branch_id] = dialog
        self._apply(dialog, actions)

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

    def _device_of(self, number: str, flow: Flow) -> str | None:
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
            self._apply(dialog, dialog.fork.on_response(branch, response, now))
            return True
        if branch.startswith(STATELESS_PREFIX):
            dialog = self._dialogs.get(response.call_id)
            if dialog is not None and dialog.cseq_delta and not self._is_worker(flow):
                _shift_cseq(response, -dialog.cseq_delta)  # the provider's answer to the worker's request
            self.relay.backward(response, branch, flow, now)
            return True
        return False

    # -- fork actions -------------------------------------------------------------------------
    def _apply(self, dialog: Dialog, actions: list[Send[Flow] | SendRequest[Flow] | ForkEvent]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.network.send(action.data, action.dest)
            elif isinstance(action, SendRequest):
                self._send_request(action.request, action.dest, action.reliable)
            else:
                self._fork_event(dialog, action)
        if dialog.fork is not None:
            if dialog.fork.done:
                self._forget_fork(dialog)
            else:
                for branch_id in dialog.fork.branches:  # a branch re-sent with credentials is new
                    self._branches.setdefault(branch_id, dialog)
                self.timers.arm(dialog.fork, self._fire)

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
            self._end(dialog, f"status_{event.status}")
        elif event.kind == "exhausted":
            self._exhausted(dialog, event.status or 480)

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
            self._apply(dialog, dialog.fork.on_timer(now))

    def _forget_fork(self, dialog: Dialog) -> None:
        fork = dialog.fork
        if fork is None:
            return
        for branch_id in fork.branches:
            self._branches.pop(branch_id, None)
        for key, other in list(self._forks.items()):
            if other is dialog:
                del self._forks[key]
        self._by_fork.pop(id(fork), None)
        dialog.fork = None

    def _end(self, dialog: Dialog, reason: str) -> None:
        """A dialog is over; what that means for the call depends on its leg."""
        if dialog.ended or self._left_after_transfer(dialog, reason):
            return
        dialog.ended = True
        dialog.invite = dialog.invite.skeleton()  # lingers with what a late BYE needs, not its SDP
        if dialog.answer is not None:
            dialog.answer = dialog.answer.skeleton()
        # Keep the dialog a while (64*T1) so a retransmitted BYE still finds its way.
        self._lingering.append((self.timers.now() + DIALOG_LINGER, dialog))
        if self._linger_timer is None:
            self._linger_timer = self.timers.call_at(self._lingering[0][0], self._forget_lingering)
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
            left = self.outgoing.get(dialog.caller, 1) - 1
            if left > 0:
                self.outgoing[dialog.caller] = left
            else:
                self.outgoing.pop(dialog.caller, None)
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
            self._end(dialog, reason)

    def worker_died(self, token: str) -> None:
        """A worker vanished mid-call: BYE every party we still can, end the call, and
        forget its dialogs at once, so their in-dialog requests get 481 and are not relayed
        to a dead port."""
        for dialog in [c for c in self._dialogs.values() if c.token == token and not c.ended]:
            self._bye_party(dialog)
            self._end(dialog, "media_worker_died")
        a_leg = self._calls.get(token)
        if a_leg is not None:
            a_leg.transferring = False
            self._end(a_leg, "media_worker_died")
        for dialog in [c for c in self._dialogs.values() if c.token == token]:
            self._forget_dialog(dialog)

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
        return len(self._dialogs)

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

    def _forget_lingering(self, now: float) -> None:
        queue = self._lingering
        while queue and queue[0][0] <= now:
            self._forget_dialog(queue.popleft()[1])
        self._linger_timer = self.timers.call_at(queue[0][0], self._forget_lingering) if queue else None

    def _forget_dialog(self, dialog: Dialog) -> None:
        if self._dialogs.get(dialog.call_id) is dialog:
            del self._dialogs[dialog.call_id]

    # -- in-dialog relay (stateless, §16.11) -----------------------------------------------------
    def _relay_in_dialog(self, request: Request, flow: Flow, reply_to: Flow, now: float) -> None:
        """Send a request inside a known dialog to the other party, over its flow.

        `reply_to` is where the edge sends this request's responses: the relay remembers
        it, and sends the responses there and nowhere else.  `flow` is where it came from.
        """
        dialog = self._dialogs.get(request.call_id)
        if dialog is None or dialog.callee_flow is None or (dialog.ended and request.method not in ("BYE", "ACK")):
            if request.method != "ACK":
                self._reply(request, reply_to, 481, "Call/Transaction Does Not Exist")
            return
        towards_callee = _tag(request.get("From")) == dialog.caller_tag
        dest = dialog.callee_flow if towards_callee else dialog.caller_flow
        if towards_callee and dialog.cseq_delta:
            _shift_cseq(request, dialog.cseq_delta)  # the worker's request, in the provider's CSeq space
        if request.method == "REFER" and self._is_worker(dest) and not self._refer_to_worker(
                request, dialog, towards_callee, reply_to):
            return
        if not self.relay.forward(request, dest, None if request.method == "ACK" else reply_to, now, flow):
            if request.method != "ACK":
                self._reply(request, reply_to, 483, "Too Many Hops")
            return
        if request.method == "BYE":
            self._end(dialog, "bye_from_caller" if towards_callee else "bye_from_callee")

    def _is_worker(self, flow: Flow) -> bool:
        return self.media is not None and self.media.is_worker(flow)

    # -- transfer (REFER) and Replaces ----------------------------------------------------------
    def _refer_to_worker(self, request: Request, dialog: Dialog, towards_callee: bool, reply_to: Flow) -> bool:
        """A REFER from a party X to the worker: its Refer-To becomes the edge, with the call's
        token and X's number (`HDR_TRANSFER`) as URI headers, which pjsua puts on the INVITE
        it sends for it; a `Replaces` is kept, nothing else. So the transfer leg always
        comes back here, whatever host the handset named, and is authorised as X. False:
        answered here (not an extension's REFER, or a Refer-To we cannot use)."""
        media = self.media
        assert media is not None
        number = dialog.caller if towards_callee else dialog.callee
        config = self.settings.current
        if (towards_callee and dialog.trunk is not None) or config.user(number) is None:
            self._reply(request, reply_to, 403, "Forbidden (only an extension can transfer)")
            return False
        value = request.get("Refer-To")
        if value is None:
            return True  # the worker answers 400 itself
        inner = value[value.find("<") + 1:value.rfind(">")] if "<" in value else value.split(";", 1)[0]
        match = _REFER_TARGET.match(inner.strip())
        if match is None:
            self._reply(request, reply_to, 400, "Bad Refer-To (a number at this box expected)")
            return False
        uri_headers = [h for h in (match.group(2) or "").split("&") if h.split("=", 1)[0].lower() == "replaces"]
        uri_headers += [f"{HDR_TOKEN}={dialog.token}", f"{HDR_TRANSFER}={number}"]
        request.set("Refer-To", f"<sip:{match.group(1)}@{media.edge_address}?{'&'.join(uri_headers)}>")
        log.info("event=transfer_requested %s", fields(call=dialog.token, by=number, target=match.group(1)))
        return True

    def _transfer_leg(self, request: Request, flow: Flow, dest: Flow, key: str | None, dialled: str,
                      now: float) -> None:
        """A worker's leg for a REFER it took: authorised as the transferring extension
        (`decide_transfer`) and rung like a call of that extension's, or, with Replaces,
        relayed to the worker holding the named dialog."""
        token = request.get(HDR_TOKEN) or ""
        number = (request.get(HDR_TRANSFER) or "").strip()
        first = self._calls.get(token)
        config = self.settings.current
        user = config.user(number)
        if (first is None or first.ended or first.worker_port != flow.port or user is None
                or not self._party_of(token, number) or (first.trunk is not None and number == first.caller)):
            self._reply(request, dest, 403, "Forbidden")
            return
        if request.get("Replaces") is not None:
            self._replaces(request, flow, dest, key, number, first, now)
            return
        by_caller = number == first.caller
        decision = decide_transfer(user, first.caller_device if by_caller else None, dialled, config,
                                   self._reachable, self.outgoing, self._in_progress(),
                                   counted_call=by_caller and first.counts_outgoing, device_ids=self._device_id)
        if isinstance(decision, Refuse):
            log.info("event=transfer_refused %s", fields(call=token, by=number, target=dialled,
                                                         status=decision.status, reason=decision.why))
            self._reply(request, dest, decision.status, decision.reason)
            return
        first.transferring = True
        log.info("event=transfer %s", fields(call=token, by=number, target=dialled))
        if isinstance(decision, RouteToTrunk):
            trunk = next(t for t in config.trunks if t.name == decision.trunk)
            # pjsua sends a transfer's INVITE as the worker's account: the provider is given
            # the caller ID a call of the extension's would carry (the tag, the dialog's, kept).
            tag = _tag(request.get("From"))
            request.set("From", f"<sip:{decision.caller_id}@{trunk.server}>" + (f";tag={tag}" if tag else ""))
            if not (by_caller and first.counts_outgoing):  # the transferor places this call out
                self._charge(first, number)
            self._to_provider(request, flow, dest, key, first, ToProvider(trunk, decision.number), now)
            return
        other, trunk_name = (first.callee, None) if by_caller else (first.caller, first.trunk)
        # The target sees who it is being put through to (as a B-leg's From shows the caller),
        # not the worker's account that pjsua sends a transfer as; the tag is kept.
        tag = _tag(request.get("From"))
        request.set("From", self._identity(other, trunk_name) + (f";tag={tag}" if tag else ""))
        dialog = Dialog(token, Role.B, request, other, decision.number, flow, None, trunk=trunk_name)
        settings = ForkSettings(decision.ring_timeout, decline_all=decision.decline_all)
        self._start_fork(dialog, dest, key, self._targets(decision), settings,
                         [("P-Asserted-Identity", self._identity(other, trunk_name))], now)

    def _party_of(self, token: str, number: str) -> bool:
        """Is `number` one of the parties of call `token` now (a transfer's target too)?"""
        return any(number in (d.caller, d.callee) for d in self._dialogs.values() if d.token == token and not d.ended)

    def _replaces(self, request: Request, flow: Flow, dest: Flow, key: str | None, number: str,
                  origin: Dialog | None, now: float) -> None:
        """An INVITE with Replaces (RFC 3891), from a worker's transfer leg (`origin`: the
        call it belongs to) or straight from a handset of `number`: relayed to the worker
        holding the confirmed dialog it names; 481 when there is none."""
        named = self._named_dialog(request.get("Replaces") or "")
        if named is None or named.ended:
            self._reply(request, dest, 481, "Call/Transaction Does Not Exist")
            return
        if named.answer is None:
            self._replaces_early(request, dest, named, number)
            return
        if number not in (named.caller, named.callee):
            # A REFER's Replaces joins two calls of the transferring extension, and a handset
            # takes over only a call of its own number: no one else's.
            self._reply(request, dest, 403, "Forbidden (not a call of this extension)")
            return
        worker = next((f for f in (named.callee_flow, named.caller_flow) if f is not None and self._is_worker(f)), None)
        if worker is None:
            self._reply(request, dest, 481, "Call/Transaction Does Not Exist")
            return
        replaced_call = self._calls.get(named.token)
        if replaced_call is not None:
            replaced_call.transferring = True
        if origin is not None:
            origin.transferring = True
        token = origin.token if origin is not None else named.token
        device = None if origin is not None else self._device_of(number, flow)
        dialog = Dialog(token, Role.B, request, number, named.callee, flow, device)
        log.info("event=replaces %s", fields(call=token, by=number, replaced_call=named.token, worker=worker.port))
        target = Target("", f"sip:{_dialled_number(request.uri) or 'replaces'}@{LOOPBACK}:{worker.port}", worker,
                        False)
        self._start_fork(dialog, dest, key, [target], ForkSettings(30.0), [], now)

    def _replaces_early(self, request: Request, dest: Flow, named: Dialog, number: str) -> None:
        """An INVITE with Replaces naming a dialog still ringing (early): that is pickup
        of the ringing call. Not served yet: 481."""
        log.info("event=replaces_early %s", fields(call=named.token, by=number))
        self._reply(request, dest, 481, "Call/Transaction Does Not Exist")

    def _named_dialog(self, replaces: str) -> Dialog | None:
        """The dialog a Replaces header value names (Call-ID and both tags), or None."""
        call_id, *params = [p.strip() for p in replaces.split(";")]
        tags = {}
        for param in params:
            name, _, value = param.partition("=")
            tags[name.strip().lower()] = value.strip()
        dialog = self._dialogs.get(call_id)
        if dialog is None or "to-tag" not in tags or "from-tag" not in tags:
            return None
        callee_tag = _tag(dialog.answer.get("To")) if dialog.answer is not None else None
        if dialog.answer is None:
            return dialog if dialog.caller_tag in (tags["to-tag"], tags["from-tag"]) else None
        if {tags["to-tag"], tags["from-tag"]} != {dialog.caller_tag, callee_tag}:
            return None
        return dialog

    def _left_after_transfer(self, dialog: Dialog, reason: str) -> bool:
        """A party of a call with a transfer left (its BYE): the call goes on in its worker,
        which ends it (`worker_call_ended`)."""
        return dialog.role is Role.A and dialog.transferring and reason.startswith("bye_from")



_REFER_TARGET = re.compile(r"sips?:([0-9A-Za-z*#+._%-]{1,64})@[^?]*(?:\?(.*))?$")
"""A Refer-To URI we act on: a user part (the target number), headers (only Replaces kept)."""


def _tag(value: str | None) -> str | None:
    if not value or ";tag=" not in value.replace(" ", ""):
        return None
    try:
        return parse_name_addr(value).tag
    except SipSyntaxError:
        return None


def _display_name(request: Request) -> str:
    """The display name in From (an outside caller's name as the provider gives it), "" if none
    or withheld."""
    if "id" in (request.get("Privacy") or "").replace(" ", "").lower().split(";"):
        return ""
    try:
        return parse_name_addr(request.get("From") or "").display[:64]
    except SipSyntaxError:
        return ""


def _outside_number(request: Request) -> str:
    """The outside caller's number as the provider asserts it (P-Asserted-Identity, else From);
    "anonymous" when it is withheld (Privacy: id) or not a number."""
    if "id" in (request.get("Privacy") or "").replace(" ", "").lower().split(";"):
        return "anonymous"
    for value in (request.get("P-Asserted-Identity"), request.get("From")):
        if not value:
            continue
        try:
            user = parse_name_addr(value.split(",", 1)[0]).uri.user or ""
        except SipSyntaxError:
            continue
        if re.fullmatch(r"\+?[0-9*#]{1,32}", user):
            return user
    return "anonymous"


def _as_trunk_caller(request: Request, to: RouteToTrunk, trunk: TrunkConfig) -> None:
    """A call forwarded out: the provider is told the caller is the family's line (its
    caller ID, as on a call out; a provider accepts no other From), the tag kept so the
    worker's dialog stays the same; who forwarded it is in the Diversion header."""
    try:
        tag = parse_name_addr(request.get("From") or "").tag
    except SipSyntaxError:
        tag = None
    request.set("From", f"<sip:{to.caller_id}@{trunk.server}>" + (f";tag={tag}" if tag else ""))


def _shift_cseq(message: Request | Response, delta: int) -> None:
    try:
        number, method = message.cseq
    except SipSyntaxError:
        return
    message.set("CSeq", f"{number + delta} {method}")


def _dialled_number(uri: str) -> str:
    return parse_uri(uri).user or ""
