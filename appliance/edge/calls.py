"""Call routing in the edge: INVITE in, forks out, dialogs relayed, limits and live state.

Initial INVITEs are challenged (407), checked against the caller's outgoing limit and
routed to the dialled number's reachable devices through a `Fork` (sans-I/O). Requests
inside a dialog follow our Record-Route back here and are relayed statelessly (§16.11) to
the other party over the flow that party uses, so a handset behind NAT or on its own TCP
connection is always reached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from appliance.config import UserConfig
from appliance.edge.relay import STATELESS_PREFIX, StatelessRelay
from appliance.edge.timers import Timed, TimerWheel
from appliance.edge.transport import format_host_port
from appliance.logs import fields
from appliance.media.protocol import HDR_CALLER, HDR_JOIN, HDR_TARGET, HDR_TOKEN, LOOPBACK
from appliance.sip.authenticator import Outcome
from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_name_addr, parse_via
from appliance.sip.invite_transaction import Send
from appliance.sip.message import Request, Response, make_response, new_tag
from appliance.sip.proxy import Fork, ForkEvent, ForkSettings, SendRequest, Target
from appliance.sip.registrar import Binding, Flow
from appliance.sip.transaction import ClientTransactions, Retransmit, server_key

if TYPE_CHECKING:
    from appliance.edge.media_link import MediaLink
    from appliance.edge.server import Edge

log = logging.getLogger("homepbx.calls")

DIALOG_LINGER = 32.0


class Leg(Enum):
    """What a dialog through the edge is: the caller to its worker (A), the worker to the
    ringing devices (B), a joining device to the worker (JOIN), or a call not anchored."""

    A = "a"
    B = "b"
    JOIN = "join"
    DIRECT = "direct"


@dataclass
class Call:
    """One dialog as the edge follows it, from INVITE to BYE; legs of one call share a token."""

    token: str
    leg: Leg
    invite: Request
    caller: str
    callee: str
    caller_flow: Flow
    caller_device: str | None
    counts_outgoing: bool = False
    worker_port: int | None = None
    fork: Fork[Flow] | None = None
    callee_flow: Flow | None = None
    answer: Response | None = None
    answered_by: str | None = None
    ended: bool = False
    caller_tag: str = field(init=False)
    """The From tag of the INVITE: which way an in-dialog request goes (read once, not per request)."""

    def __post_init__(self) -> None:
        self.caller_tag = _tag(self.invite.get("From")) or ""

    @property
    def call_id(self) -> str:
        return self.invite.call_id


class CallRouter:
    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.timers = TimerWheel(edge.monotonic, self._fire)
        self.client_tx: ClientTransactions[Flow] = ClientTransactions()
        self._forks: dict[str, Call] = {}  # server transaction key of the INVITE -> call
        self._branches: dict[str, Call] = {}  # our branch id -> call
        self._dialogs: dict[str, Call] = {}  # Call-ID -> call
        self._by_fork: dict[int, Call] = {}  # id(fork) -> call, for its timers
        self._calls: dict[str, Call] = {}  # token -> the call's first leg (A, or DIRECT)
        self.outgoing: dict[str, int] = {}  # number -> calls placed now
        self.media: MediaLink | None = None  # set by the edge when media workers run
        self.relay = StatelessRelay(edge, self._is_worker)

    # -- requests ----------------------------------------------------------------------------
    def on_request(self, request: Request, flow: Flow, dest: Flow, now: float) -> bool:
        """Handle call-related requests; False if this is not ours to handle."""
        method = request.method
        to_tag = _tag(request.get("To"))
        key = server_key(request)
        invite_key = key.rsplit("|", 1)[0] + "|INVITE" if key else None
        if method == "INVITE" and to_tag is None:
            call = self._forks.get(key) if key else None
            if call is not None:
                if call.fork is not None:
                    self._apply(call, call.fork.on_request_retransmission())
                return True  # still finding a worker: our 100 Trying already went out
            self._new_call(request, flow, dest, key, now)
            return True
        if method == "ACK":
            # An ACK with the INVITE's branch acknowledges our non-2xx final (hop by hop);
            # the ACK of a 2xx is a new transaction that belongs to the dialog.
            call = self._forks.get(invite_key) if invite_key else None
            if call is not None and call.fork is not None:
                self._apply(call, call.fork.on_ack(now))
                return True
            self._relay_in_dialog(request, dest, now)
            return True
        if method == "CANCEL":
            call = self._forks.get(invite_key) if invite_key else None
            if call is None:
                self._reply(request, dest, 481, "Call/Transaction Does Not Exist")
                return True
            self._reply(request, dest, 200, "OK")
            if call.fork is not None:
                self._apply(call, call.fork.cancel(now, request.get("Reason")))
            else:  # cancelled while a worker was being found
                self._reply(call.invite, dest, 487, "Request Terminated")
                self._end(call, "status_487")
            return True
        if to_tag is not None and method in ("BYE", "INVITE", "UPDATE", "INFO", "PRACK", "NOTIFY", "REFER",
                                             "MESSAGE", "OPTIONS"):
            if request.call_id not in self._dialogs:
                self._reply(request, dest, 481, "Call/Transaction Does Not Exist")
                return True
            self._relay_in_dialog(request, dest, now)
            return True
        return False

    def _reply(self, request: Request, dest: Flow, status: int, reason: str,
               headers: list[tuple[str, str]] | None = None) -> None:
        self.edge.send(make_response(request, status, reason, headers=headers or []).to_bytes(), dest)

    def _new_call(self, request: Request, flow: Flow, dest: Flow, key: str | None, now: float) -> None:
        edge = self.edge
        if self._looped(request):
            self._reply(request, dest, 482, "Loop Detected")
            return
        try:
            from_addr = parse_name_addr(request.get("From") or "")
            dialled = _dialled_number(request.uri)
        except SipSyntaxError:
            self._reply(request, dest, 400, "Malformed From or Request-URI")
            return
        if self.media is not None and self.media.worker_at(flow) is not None:
            self._b_leg(request, flow, dest, key, dialled, now)
            return
        caller = from_addr.uri.user or ""
        user = edge.config.user(caller)
        result = edge.auth.check(request, caller, user.password if user else None, flow.host, now, proxy=True)
        if result.outcome is not Outcome.ACCEPTED:
            edge.note_refusal(result, caller, flow, "INVITE")
            assert result.response is not None
            edge.send(result.response.to_bytes(), dest)
            return
        assert user is not None
        max_forwards = request.get("Max-Forwards")
        if max_forwards is not None and int(max_forwards) <= 0:
            self._reply(request, dest, 483, "Too Many Hops")
            return
        if edge.config.feature_codes.get(dialled) == "join":
            self._join(request, flow, dest, key, user, now)
            return
        callee = edge.config.user(dialled) if dialled else None
        if callee is None:
            self._reply(request, dest, 404, "Not Found")
            return
        limit = user.max_outgoing_calls
        in_use = self.outgoing.get(caller, 0)
        if limit and in_use >= limit:
            log.info("event=call_refused %s", fields(caller=caller, callee=dialled, reason="outgoing_limit"))
            self._reply(request, dest, 403, f"Outgoing call limit reached ({in_use} of {limit})")
            return
        caller_device = self._device_of(caller, flow)
        targets = self._targets(callee.number, caller_device)
        if not targets:
            self._reply(request, dest, 480, "Temporarily Unavailable")
            return
        call = Call(new_tag(), Leg.A if self.media else Leg.DIRECT, request, caller, callee.number, flow,
                    caller_device, counts_outgoing=True)
        self.outgoing[caller] = in_use + 1
        self._calls[call.token] = call
        edge.state.call_started(call.token, caller, callee.number, caller_device)
        log.info("event=call_started %s", fields(call=call.token, caller=caller, callee=callee.number,
                                                 devices=len(targets)))
        identity = f'"{user.name or caller}" <sip:{caller}@{edge.config.server.realm}>'
        if self.media is None:
            settings = ForkSettings(float(callee.ring_timeout), decline_all=callee.decline == "all_devices")
            self._start_fork(call, dest, key, targets, settings, [("P-Asserted-Identity", identity)], now)
            return
        # Anchor the call in a media worker: the INVITE goes there, the worker's B-leg
        # comes back to us and is forked to the devices.
        if key:
            self._forks[key] = call  # retransmissions are absorbed while a worker is found
        self._reply(request, dest, 100, "Trying")
        headers = [(HDR_TARGET, f"<sip:{callee.number}@{self.media.edge_address}>"), (HDR_CALLER, identity)]
        # The A-leg's own timer only backs up the B-leg's ring timeout, which decides.
        settings = ForkSettings(float(callee.ring_timeout) + 15.0)
        self.media.anchor(call, lambda port: self._to_worker(call, dest, key, port, settings, headers))

    def _to_worker(self, call: Call, dest: Flow, key: str | None, port: int | None, settings: ForkSettings,
                   headers: list[tuple[str, str]]) -> None:
        """Relay an INVITE to the worker on `port` (None: every worker is busy)."""
        now = self.edge.monotonic()
        if call.ended:
            return
        if port is None:
            self._reply(call.invite, dest, 503, "Service Unavailable (all lines busy)",
                        headers=[("Retry-After", "5")])
            if key and self._forks.get(key) is call:
                del self._forks[key]
            self._end(call, "no_media_worker")
            return
        call.worker_port = port
        worker = Flow("udp", LOOPBACK, port, self.edge.addresses[0] if self.edge.addresses else "")
        target = Target("", f"sip:{call.callee}@{LOOPBACK}:{port}", worker, False)
        self._start_fork(call, dest, key, [target], settings, [(HDR_TOKEN, call.token), *headers], now,
                         record_route=True)

    def _b_leg(self, request: Request, flow: Flow, dest: Flow, key: str | None, dialled: str, now: float) -> None:
        """A worker's B-leg INVITE: trusted by its source and token, forked to the devices."""
        token = request.get(HDR_TOKEN) or ""
        a_leg = self._calls.get(token)
        if a_leg is None or a_leg.worker_port != flow.port:
            self._reply(request, dest, 403, "Forbidden")
            return
        callee = self.edge.config.user(dialled)
        if callee is None:
            self._reply(request, dest, 404, "Not Found")
            return
        targets = self._targets(callee.number, a_leg.caller_device)
        if not targets:
            self._reply(request, dest, 480, "Temporarily Unavailable")
            return
        call = Call(token, Leg.B, request, a_leg.caller, callee.number, flow, None)
        settings = ForkSettings(float(callee.ring_timeout), decline_all=callee.decline == "all_devices")
        caller_user = self.edge.config.user(a_leg.caller)
        name = caller_user.name if caller_user and caller_user.name else a_leg.caller
        identity = f'"{name}" <sip:{a_leg.caller}@{self.edge.config.server.realm}>'
        self._start_fork(call, dest, key, targets, settings, [("P-Asserted-Identity", identity)], now)

    def _join(self, request: Request, flow: Flow, dest: Flow, key: str | None, user: UserConfig,
              now: float) -> None:
        """*74: a device of a one-number user joins that number's call in progress."""
        number = user.number
        device = self._device_of(number, flow)
        if not user.one_number:
            self._reply(request, dest, 403, "Join needs one-number on")
            return
        if device is None:
            self._reply(request, dest, 403, f"Not a registered device of {number}")
            return
        active = [c for c in self._calls.values()
                  if c.leg is Leg.A and not c.ended and c.answer is not None and c.worker_port
                  and number in (c.callee, c.caller) and c.caller_device != device]
        if self.media is None or not active:
            self._reply(request, dest, 404, "No active call to join")
            return
        a_leg = next((c for c in active if c.callee == number), active[0])
        parties = 2 + sum(1 for c in self._dialogs.values()
                          if c.leg is Leg.JOIN and c.token == a_leg.token and c.answer and not c.ended)
        if parties >= 3:
            self._reply(request, dest, 486, "Busy Here (call already has three parties)")
            return
        call = Call(a_leg.token, Leg.JOIN, request, number, number, flow, device)
        port = a_leg.worker_port
        assert port is not None
        worker = Flow("udp", LOOPBACK, port, self.edge.addresses[0] if self.edge.addresses else "")
        target = Target("", f"sip:join@{LOOPBACK}:{port}", worker, False)
        log.info("event=join_requested %s", fields(call=a_leg.token, number=number, device=device))
        self._start_fork(call, dest, key, [target], ForkSettings(30.0),
                         [(HDR_TOKEN, a_leg.token), (HDR_JOIN, "1")], now, record_route=True)

    def _targets(self, number: str, exclude: str | None) -> list[Target[Flow]]:
        """Every reachable device of `number` (the calling device itself left out)."""
        return [
            Target(b.id, str(b.name_addr.uri), b.flow, b.flow.transport == "tcp")
            for b in self.edge.registrar.bindings(number)
            if b.reachable and b.id != exclude and self._flow_usable(b)
        ]

    def _start_fork(self, call: Call, dest: Flow, key: str | None, targets: list[Target[Flow]],
                    settings: ForkSettings, extra_headers: list[tuple[str, str]], now: float,
                    *, record_route: bool = True) -> None:
        caller_flow = call.caller_flow
        fork: Fork[Flow] = Fork(
            call.invite, dest, caller_flow.transport == "tcp", settings, now,
            via_for=self._via_for,
            record_route=(lambda t: self._record_route(caller_flow, t)) if record_route else None,
            extra_headers=extra_headers,
        )
        call.fork = fork
        self._by_fork[id(fork)] = call
        if key:
            self._forks[key] = call
        self._dialogs[call.call_id] = call
        actions = fork.start(targets, now)
        for branch_id in fork.branches:
            self._branches[branch_id] = call
        self._apply(call, actions)

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
        for b in self.edge.registrar.bindings(number):
            if b.flow.host == flow.host and b.flow.port == flow.port and b.flow.transport == flow.transport:
                return b.id
        return None

    def _flow_usable(self, binding: Binding) -> bool:
        flow = binding.flow
        return flow.transport != "tcp" or self.edge.transports.tcp.get(flow.host, flow.port) is not None

    def _via_for(self, target: Target[Flow], branch: str) -> str:
        host, port = self.edge.transports.local_address(target.dest)
        proto = target.dest.transport.upper()
        return f"SIP/2.0/{proto} {format_host_port(host, port)};branch={branch};rport"

    def _record_route(self, caller_flow: Flow, target: Target[Flow]) -> str:
        """Record-Route so in-dialog requests come back here; doubled when transports differ."""
        out = self._rr_uri(target.dest)
        if caller_flow.transport != target.dest.transport:
            return f"{out}, {self._rr_uri(caller_flow)}"  # RFC 5658 double record-routing
        return out

    def _rr_uri(self, flow: Flow) -> str:
        host, port = self.edge.transports.local_address(flow)
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
        call = self._branches.get(branch)
        if call is not None and call.fork is not None:
            self._apply(call, call.fork.on_response(branch, response, now))
            return True
        if branch.startswith(STATELESS_PREFIX):
            self.relay.backward(response, branch, flow, now)
            return True
        return False

    # -- fork actions -------------------------------------------------------------------------
    def _apply(self, call: Call, actions: list[Send[Flow] | SendRequest[Flow] | ForkEvent]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.edge.send(action.data, action.dest)
            elif isinstance(action, SendRequest):
                self._send_request(action.request, action.dest, action.reliable)
            else:
                self._fork_event(call, action)
        if call.fork is not None:
            if call.fork.done:
                self._forget_fork(call)
            else:
                self.timers.arm(call.fork)

    def _fork_event(self, call: Call, event: ForkEvent) -> None:
        """Turn what the fork saw into live state, by leg: devices ring on the B-leg (or a
        direct call); the A-leg and join legs ring the worker, which nobody sees."""
        state = self.edge.state
        shows_devices = call.leg in (Leg.B, Leg.DIRECT)
        if event.kind == "ringing" and shows_devices and event.binding_id:
            state.device_ringing(call.token, event.binding_id)
        elif event.kind == "stopped" and shows_devices and event.binding_id:
            state.device_stopped(call.token, event.binding_id)
        elif event.kind == "answered":
            fork = call.fork
            if fork is not None and fork.answered is not None:
                call.callee_flow = fork.answered.target.dest
                call.answer = fork.answered.answer
            if shows_devices:
                call.answered_by = event.binding_id
                state.call_answered(call.token, event.binding_id)
                log.info("event=call_answered %s", fields(call=call.token, device=event.binding_id))
            elif call.leg is Leg.JOIN and call.caller_device:
                state.call_joined(call.token, call.caller_device)
                log.info("event=call_joined %s", fields(call=call.token, device=call.caller_device))
        elif event.kind == "failed":
            self._end(call, f"status_{event.status}")

    def _send_request(self, request: Request, dest: Flow, reliable: bool) -> None:
        via = parse_via(request.get("Via") or "")
        data = request.to_bytes()
        self.client_tx.start(via.branch or new_tag(), request.method, data, dest, reliable, self.edge.monotonic())
        self.edge.send(data, dest)
        self.timers.arm(self.client_tx)

    def _fire(self, obj: Timed, now: float) -> None:
        if obj is self.client_tx:
            for action in self.client_tx.on_timer(now):
                if isinstance(action, Retransmit):
                    self.edge.send(action.data, action.dest)
            return
        call = self._by_fork.get(id(obj))
        if call is not None and call.fork is obj:
            self._apply(call, call.fork.on_timer(now))

    def _forget_fork(self, call: Call) -> None:
        fork = call.fork
        if fork is None:
            return
        for branch_id in fork.branches:
            self._branches.pop(branch_id, None)
        for key, other in list(self._forks.items()):
            if other is call:
                del self._forks[key]
        self._by_fork.pop(id(fork), None)
        call.fork = None

    def _end(self, call: Call, reason: str) -> None:
        """A dialog is over; what that means for the call depends on its leg."""
        if call.ended:
            return
        call.ended = True
        # Keep the dialog a while (64*T1) so a retransmitted BYE still finds its way.
        self.edge.call_later(DIALOG_LINGER, self._forget_dialog, call)
        if call.leg is Leg.B:
            a_leg = self._calls.get(call.token)
            if a_leg is not None and not a_leg.ended and call.answered_by:
                self.edge.state.call_left(call.token, call.answered_by)  # the others talk on
            return
        if call.leg is Leg.JOIN:
            if call.answer is not None and call.caller_device:
                self.edge.state.call_left(call.token, call.caller_device)
                log.info("event=call_left %s", fields(call=call.token, device=call.caller_device))
            return
        self._calls.pop(call.token, None)
        if call.counts_outgoing:
            left = self.outgoing.get(call.caller, 1) - 1
            if left > 0:
                self.outgoing[call.caller] = left
            else:
                self.outgoing.pop(call.caller, None)
        if self.media is not None:
            self.media.call_over(call.token)
        self.edge.state.call_ended(call.token, reason)
        log.info("event=call_ended %s", fields(call=call.token, caller=call.caller, callee=call.callee,
                                               reason=reason, outgoing=self.outgoing.get(call.caller, 0)))

    # -- media workers' word ----------------------------------------------------------------------
    def worker_call_ended(self, token: str, reason: str) -> None:
        """The worker says the call is over: whatever BYE we did not see, it is over."""
        call = self._calls.get(token)
        if call is not None:
            self._end(call, reason)

    def worker_died(self, token: str) -> None:
        """A worker vanished mid-call: BYE every party we still can, end the call."""
        for call in [c for c in self._dialogs.values() if c.token == token and not c.ended]:
            self._bye_party(call)
            self._end(call, "media_worker_died")
        a_leg = self._calls.get(token)
        if a_leg is not None:
            self._end(a_leg, "media_worker_died")

    def _bye_party(self, call: Call) -> None:
        """BYE, in the worker's place, to the device or caller on the far side of a dialog."""
        answer = call.answer
        if answer is None:
            return  # never answered: the fork's own failure ends it
        if call.leg is Leg.B:
            # We stand for the worker, the UAC: From ours, To and target the device's.
            dest = call.callee_flow
            try:
                target = str(parse_name_addr(answer.get("Contact") or "").uri)
            except SipSyntaxError:
                return
            from_value, to_value = call.invite.get("From") or "", answer.get("To") or ""
        else:
            # We stand for the worker, the UAS: From is its To, the caller is the target.
            dest = call.caller_flow
            try:
                target = str(parse_name_addr(call.invite.get("Contact") or "").uri)
            except SipSyntaxError:
                return
            from_value, to_value = answer.get("To") or "", call.invite.get("From") or ""
        if dest is None:
            return
        host, port = self.edge.transports.local_address(dest)
        bye = Request("BYE", target, [
            ("Via", f"SIP/2.0/{dest.transport.upper()} {format_host_port(host, port)};"
                    f"branch=z9hG4bK{new_tag()}{new_tag()};rport"),
            ("Max-Forwards", "70"), ("From", from_value), ("To", to_value), ("Call-ID", call.call_id),
            ("CSeq", f"{call.invite.cseq[0] + 100000} BYE"),
            ("Reason", 'SIP;cause=500;text="Media server failure"'),
        ])
        self._send_request(bye, dest, dest.transport == "tcp")

    def _forget_dialog(self, call: Call) -> None:
        if self._dialogs.get(call.call_id) is call:
            del self._dialogs[call.call_id]

    # -- in-dialog relay (stateless, §16.11) -----------------------------------------------------
    def _relay_in_dialog(self, request: Request, reply_to: Flow, now: float) -> None:
        """Send a request inside a known dialog to the other party, over its flow.

        `reply_to` is where the edge sends this request's responses: the relay remembers
        it, and sends the responses there and nowhere else.
        """
        call = self._dialogs.get(request.call_id)
        if call is None or call.callee_flow is None or (call.ended and request.method not in ("BYE", "ACK")):
            if request.method != "ACK":
                self._reply(request, reply_to, 481, "Call/Transaction Does Not Exist")
            return
        towards_callee = _tag(request.get("From")) == call.caller_tag
        dest = call.callee_flow if towards_callee else call.caller_flow
        if not self.relay.forward(request, dest, None if request.method == "ACK" else reply_to, now):
            if request.method != "ACK":
                self._reply(request, reply_to, 483, "Too Many Hops")
            return
        if request.method == "BYE":
            self._end(call, "bye_from_caller" if towards_callee else "bye_from_callee")

    def _is_worker(self, flow: Flow) -> bool:
        return self.media is not None and self.media.worker_at(flow) is not None

    def close(self) -> None:
        self.timers.cancel()


def _tag(value: str | None) -> str | None:
    if not value or ";tag=" not in value.replace(" ", ""):
        return None
    try:
        return parse_name_addr(value).tag
    except SipSyntaxError:
        return None


def _dialled_number(uri: str) -> str:
    from appliance.sip.uri import parse_uri

    return parse_uri(uri).user or ""
