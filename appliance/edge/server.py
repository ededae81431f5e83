"""The SIP edge: receives every message, answers what the box answers itself.

The transports' `Receiver`: bytes and flows in; parsed here, then a response goes to the
call router or the qualifier, a call-related request to the call router, and the rest
(REGISTER, OPTIONS, refusals) is answered here through the sans-I/O core (parser, digest
gate, registrar, server transactions). It builds nothing and owns no time: everything it
uses is handed to it by the composition root (`appliance.daemon`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from typing import Protocol

from appliance.config import LiveConfig, UserConfig
from appliance.edge.auth_gate import AuthGate
from appliance.edge.seams import Network, PublishDeviceEvents
from appliance.logs import PerSourceLimit, fields, log_limited
from appliance.sip.authenticator import Outcome
from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_name_addr, parse_via
from appliance.sip.message import Request, Response, SipParseError, make_response, parse_message
from appliance.sip.registrar import DevicePolicy, Flow, Registrar
from appliance.sip.throttle import FailureThrottle
from appliance.sip.transaction import ServerTransactions, server_key

log = logging.getLogger("homepbx.edge")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, UPDATE, INFO, PRACK, REFER, NOTIFY, MESSAGE, SUBSCRIBE"
"""What the box accepts: REFER, NOTIFY and MESSAGE inside a call (relayed to the other party);
SUBSCRIBE for busy lamps and the message-waiting lamp (edge.subscriptions)."""
# Methods we know but do not serve get 405 with Allow; anything else 501 (§21.4.6, §21.5.2).
KNOWN_UNSERVED = frozenset({"SUBSCRIBE", "PUBLISH"})
IN_DIALOG = frozenset({"BYE", "UPDATE", "INFO", "PRACK", "CANCEL", "REFER", "NOTIFY", "MESSAGE"})
"""Accepted only inside a call: outside one there is no dialog they could belong to (481)."""
CALL_METHODS = frozenset({"INVITE", "ACK", "CANCEL"})


@lru_cache(maxsize=1024)  # a device sends the same To on every REGISTER, and twice per challenge
def _to_number(to: str) -> str:
    """The user part of a To header value's URI ("" if none); SipSyntaxError if malformed."""
    return parse_name_addr(to).uri.user or ""


def _max_forwards_zero(request: Request) -> bool:
    value = request.get("Max-Forwards")
    return value is not None and int(value) == 0


def policy_for(user: UserConfig) -> DevicePolicy:
    return DevicePolicy(limit=user.device_limit, one_number=user.one_number)


class CallHandler(Protocol):
    """The call router, as the edge hands it messages."""

    def on_request(self, request: Request, flow: Flow, dest: Flow, now: float) -> bool: ...

    def on_response(self, response: Response, flow: Flow, now: float) -> bool: ...


class ResponseSink(Protocol):
    """Whoever sent requests of its own outside calls (the qualifier's OPTIONS)."""

    def on_response(self, response: Response) -> None: ...


class SubscriptionHandler(Protocol):
    """The busy lamps (edge.subscriptions): SUBSCRIBEs in, responses to its NOTIFYs."""

    def on_subscribe(self, request: Request, flow: Flow, dest: Flow, now: float) -> Response: ...

    def on_response(self, response: Response, flow: Flow, now: float) -> bool: ...


class TrunkResponses(Protocol):
    """The trunk registrar (edge.trunks): responses to its REGISTERs and keep-alives."""

    def on_response(self, response: Response, flow: Flow, now: float) -> bool: ...


class Edge:
    """One process, one event loop: every SIP message of the box comes through here."""

    def __init__(self, settings: LiveConfig, network: Network, auth: AuthGate, registrar: Registrar,
                 throttle: FailureThrottle, server_tx: ServerTransactions, calls: CallHandler,
                 own_requests: ResponseSink, publish: PublishDeviceEvents, *,
                 clock: Callable[[], float], wall: Callable[[], float], trunks: TrunkResponses | None = None,
                 subscriptions: SubscriptionHandler | None = None) -> None:
        self.settings = settings
        self.network = network
        self.auth = auth
        self.registrar = registrar
        self.throttle = throttle
        self.server_tx = server_tx
        self.calls = calls
        self.own_requests = own_requests
        self.trunks = trunks
        self.subscriptions = subscriptions
        self.publish = publish
        self.clock = clock
        self.wall = wall
        self.malformed_log = PerSourceLimit()  # a stranger's junk: a line per source per interval

    # -- receiving -------------------------------------------------------------------------
    def on_message(self, data: bytes, flow: Flow) -> None:
        now = self.clock()
        if self.throttle.is_blocked(flow.host, now):
            return
        try:
            message = parse_message(data)
        except SipParseError as err:
            self._reject_malformed(err, flow, err.status, err.reason)
            return
        if isinstance(message, Response):
            if self.calls.on_response(message, flow, now):
                return
            if self.subscriptions is not None and self.subscriptions.on_response(message, flow, now):
                return
            if self.trunks is None or not self.trunks.on_response(message, flow, now):
                self.own_requests.on_response(message)
            return
        self.on_request(message, flow, now)

    def on_oversize(self, head: bytes, flow: Flow) -> None:
        if self.throttle.is_blocked(flow.host, self.clock()):
            return
        try:
            parse_message(head + b"\r\n\r\n")
        except SipParseError as err:
            self._reject_malformed(err, flow, 513, "Message Too Large")
            return
        self._reject_malformed(SipParseError("too large"), flow, 513, "Message Too Large")

    def _reject_malformed(self, err: SipParseError, flow: Flow, status: int, reason: str) -> None:
        """Answer what can be answered, every time; log it once per source per interval."""
        log_limited(log, self.malformed_log, flow.host, self.clock(), "malformed",
                    peer=f"{flow.host}:{flow.port}", transport=flow.transport, reason=err.reason,
                    answered=err.request is not None)
        request = err.request
        if request is None or request.method == "ACK":
            return
        try:
            dest = self._stamp_via(request, flow)
        except SipSyntaxError:
            return
        self.network.send(make_response(request, status, reason).to_bytes(), dest)

    def on_request(self, request: Request, flow: Flow, now: float) -> None:
        try:
            dest = self._stamp_via(request, flow)
        except SipSyntaxError:
            self._reply_unkeyed(request, flow, 400, "Malformed Via header")
            return
        in_dialog = ";tag=" in (request.get("To") or "").replace(" ", "")
        if (request.method in CALL_METHODS or in_dialog) and self.calls.on_request(request, flow, dest, now):
            return
        if request.method == "ACK":
            return  # ACK to one of our own non-2xx answers ends nothing we keep
        key = server_key(request)
        if key is not None:
            retransmission, previous = self.server_tx.receive(key, now)
            if retransmission:
                if previous is not None:
                    self.network.send(previous, dest)
                return
        if request.method == "SUBSCRIBE" and self.subscriptions is not None and not _max_forwards_zero(request):
            response = self.subscriptions.on_subscribe(request, flow, dest, now)
        else:
            response = self._answer(request, flow, now)
        data = response.to_bytes()
        if key is not None:
            self.server_tx.respond(key, data, response.status >= 200, flow.transport == "tcp", now)
        self.network.send(data, dest)

    def _reply_unkeyed(self, request: Request, flow: Flow, status: int, reason: str) -> None:
        self.network.send(make_response(request, status, reason).to_bytes(), flow)

    def _answer(self, request: Request, flow: Flow, now: float) -> Response:
        method = request.method
        max_forwards = request.get("Max-Forwards")
        if max_forwards is not None and int(max_forwards) == 0:
            return make_response(request, 483, "Too Many Hops")
        if method == "REGISTER":
            return self._register(request, flow, now)
        if method == "OPTIONS":
            return make_response(request, 200, "OK", headers=[
                ("Allow", ALLOW), ("Accept", "application/sdp"), ("Supported", "path, outbound"),
            ])
        if method in IN_DIALOG:
            return make_response(request, 481, "Call/Transaction Does Not Exist")
        if method in KNOWN_UNSERVED:
            return make_response(request, 405, "Method Not Allowed", headers=[("Allow", ALLOW)])
        return make_response(request, 501, "Not Implemented", headers=[("Allow", ALLOW)])

    def _register(self, request: Request, flow: Flow, now: float) -> Response:
        try:
            number = _to_number(request.get("To") or "")
        except SipSyntaxError:
            return make_response(request, 400, "Malformed To header")
        result = self.auth.check(request, number, flow, now)
        if result.outcome is not Outcome.ACCEPTED:
            assert result.response is not None
            return result.response
        user = self.settings.current.user(number)
        assert user is not None
        response, events = self.registrar.register(request, number, policy_for(user), flow, self.wall())
        if response.status >= 300:
            log.info("event=register_refused %s", fields(
                number=number, peer=f"{flow.host}:{flow.port}", status=response.status,
                reason=response.reason))
        self.publish(events)
        return response

    def _stamp_via(self, request: Request, flow: Flow) -> Flow:
        """RFC 3261 §18.2.1 and RFC 3581: note received/rport; return where responses go."""
        top = request.get("Via")
        if top is None:
            raise SipSyntaxError("no Via")
        via = parse_via(top)
        changed = False
        if via.host.strip("[]") != flow.host:
            via.params["received"] = flow.host
            changed = True
        if "rport" in via.params:
            via.params["rport"] = str(flow.port)
            via.params["received"] = flow.host
            changed = True
        if changed:
            self._replace_top_via(request, str(via))
        if flow.transport == "tcp":
            # Always note where a TCP request came from: a response relayed statelessly
            # later finds its connection by these two values.
            via.params["received"] = flow.host
            via.params["rport"] = str(flow.port)
            self._replace_top_via(request, str(via))
            return flow
        port = flow.port if "rport" in via.params else (via.port or 5060)
        if port == flow.port and flow.transport == "udp":
            return flow  # the same value: a Flow is immutable
        return Flow("udp", flow.host, port, flow.local)

    @staticmethod
    def _replace_top_via(request: Request, value: str) -> None:
        for i, (name, _) in enumerate(request.headers):
            if name == "Via":
                request.headers[i] = ("Via", value)
                return
