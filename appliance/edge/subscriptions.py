"""Busy lamps: SUBSCRIBE answered, NOTIFYs sent (dialog, presence, message-summary).

A handset's BLF key subscribes to a family member's number (`Event: dialog`, RFC 4235;
some use `presence`, RFC 3856); its voicemail lamp subscribes to its own number
(`message-summary`, RFC 3842). Here the SUBSCRIBE is challenged like an INVITE (the auth
gate, 407), answered 200 with the granted expiry (`sip/subscription.py`, sans-I/O), and
followed at once by a NOTIFY of the current state; then a NOTIFY goes out on every change
of the watched number: idle, ringing, in a call.

The facts come from the call router: this object is one of the `CallEvents` sinks the
composition root fans the router's events out to (`seams.CallEventsFanOut`), the live
state being the other. NOTIFYs are non-INVITE client transactions armed in the one timer
wheel and sent along the subscriber's flow; a 481, any other failure or a timeout ends the
subscription, as does its expiry (a last NOTIFY `terminated;reason=timeout`). Subscriptions
are capped per device and overall.

Message waiting (RFC 3842): the answering machine (`edge.voicemail.Voicemail`) hands its
counts in as `mailbox` (number -> (new, old), kept in memory there) and calls
`mailbox_changed(number)` when they change: every message-summary subscriber of the
number then gets a NOTIFY.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from appliance.config import LiveConfig
from appliance.edge.auth_gate import AuthGate
from appliance.edge.seams import DeviceLookup, Network
from appliance.edge.timers import Timed, TimerWheel
from appliance.edge.transport import format_host_port
from appliance.logs import fields
from appliance.sip.authenticator import Outcome
from appliance.sip.errors import SipSyntaxError
from appliance.sip.event_bodies import (
    DIALOG_INFO,
    MESSAGE_SUMMARY,
    PIDF,
    DialogView,
    dialog_info,
    message_summary,
    pidf,
)
from appliance.sip.headers import parse_name_addr
from appliance.sip.message import Request, Response, make_response, new_tag
from appliance.sip.registrar import Flow
from appliance.sip.subscription import (
    EVENT_PACKAGES,
    SubscribeRefused,
    Subscription,
    event_package,
    granted_expires,
)
from appliance.sip.transaction import ClientTransactions, Retransmit, TimedOut, client_key
from appliance.sip.uri import parse_uri

log = logging.getLogger("homepbx.subscriptions")

MAX_PER_DEVICE = 100
"""A handset with an expansion module has up to ~100 BLF keys."""
MAX_TOTAL = 2000
ON_THE_PHONE = "On the phone"

Mailbox = Callable[[str], tuple[int, int]]
"""A number -> (new, old) voice messages: the answering machine's hook."""


def no_mailbox(_number: str) -> tuple[int, int]:
    return 0, 0


@dataclass(init=False)
class _Call:
    """A call as the lamps see it (told by the router through CallEvents)."""

    token: str
    caller: str
    callee: str
    caller_is_extension: bool
    rang: bool
    answered: bool
    answerer: str | None
    """The number whose device answered: the callee, or whoever picked it up."""
    joined: set[str]

    def __init__(self, token: str, caller: str, callee: str, caller_is_extension: bool) -> None:
        # Written out (one per call): mypyc compiles this one, not the dataclass's.
        self.token = token
        self.caller = caller
        self.callee = callee
        self.caller_is_extension = caller_is_extension
        self.rang = False
        self.answered = False
        self.answerer = None
        self.joined = set()


class Subscriptions:
    def __init__(self, settings: LiveConfig, network: Network, auth: AuthGate, devices: DeviceLookup,
                 timers: TimerWheel, *, mailbox: Mailbox = no_mailbox, max_per_device: int = MAX_PER_DEVICE,
                 max_total: int = MAX_TOTAL) -> None:
        self.settings = settings
        self.network = network
        self.auth = auth
        self.devices = devices
        self.timers = timers
        self.mailbox = mailbox
        self.max_per_device = max_per_device
        self.max_total = max_total
        self.client_tx: ClientTransactions[Flow] = ClientTransactions()
        self._pending: dict[str, Subscription] = {}  # NOTIFY transaction key -> its subscription
        self._subs: dict[tuple[str, str], Subscription] = {}  # (Call-ID, our tag) -> subscription
        self._by_number: dict[str, set[Subscription]] = {}
        self._shown: dict[Subscription, dict[str, DialogView]] = {}  # dialogs in the last NOTIFY
        self._calls: dict[str, _Call] = {}

    def __len__(self) -> int:
        return len(self._subs)

    # -- SUBSCRIBE -------------------------------------------------------------------------
    def on_subscribe(self, request: Request, flow: Flow, dest: Flow, now: float) -> Response:
        """The answer to a SUBSCRIBE; the NOTIFY it calls for follows right after it."""
        try:
            to_tag = parse_name_addr(request.get("To") or "").tag
        except SipSyntaxError:
            return make_response(request, 400, "Malformed To header")
        try:
            if to_tag:
                return self._refresh(request, to_tag, flow, now)
            return self._new(request, flow, dest, now)
        except SubscribeRefused as refused:
            return refused.response(request)

    def _new(self, request: Request, flow: Flow, dest: Flow, now: float) -> Response:
        event = event_package(request)
        if event not in EVENT_PACKAGES:
            return make_response(request, 489, "Bad Event", headers=[("Allow-Events", ", ".join(EVENT_PACKAGES))])
        try:
            subscriber = parse_name_addr(request.get("From") or "").uri.user or ""
            resource = parse_uri(request.uri).user or ""
        except SipSyntaxError:
            return make_response(request, 400, "Malformed From or Request-URI")
        result = self.auth.check(request, subscriber, flow, now, proxy=True)
        if result.outcome is not Outcome.ACCEPTED:
            assert result.response is not None
            return result.response
        config = self.settings.current
        if event == "message-summary" and resource != subscriber:
            if config.user(resource) is not None:
                return make_response(request, 403, "Forbidden (only your own mailbox)")
            resource = subscriber  # a voicemail code or the bare domain: the subscriber's own mailbox
        if config.user(resource) is None:
            return make_response(request, 404, "Not Found")
        expires = granted_expires(request.get("Expires"))
        if len(self._subs) >= self.max_total or self._count_from(dest) >= self.max_per_device:
            log.warning("event=subscribe_refused %s", fields(number=subscriber, resource=resource, event=event,
                                                             reason="too_many_subscriptions"))
            return make_response(request, 503, "Service Unavailable (too many subscriptions)",
                                 headers=[("Retry-After", "300")])
        sub = Subscription.from_subscribe(request, resource, subscriber, dest, expires, now)
        response = sub.accept(request, expires, self._contact(sub))
        if expires == 0:  # a fetch: one NOTIFY, then nothing
            self.timers.call_at(now, lambda _now: self._notify(sub, reason="timeout"))
            return response
        self._subs[(sub.call_id, sub.local_tag)] = sub
        self._by_number.setdefault(resource, set()).add(sub)
        self.timers.arm(sub, self._expire)
        log.info("event=subscribed %s", fields(number=subscriber, resource=resource, event=event, expires=expires,
                                               peer=f"{dest.host}:{dest.port}"))
        self.timers.call_at(now, lambda _now: self._notify(sub))  # after our 200 has gone out
        return response

    def _refresh(self, request: Request, to_tag: str, flow: Flow, now: float) -> Response:
        sub = self._subs.get((request.call_id, to_tag))
        if sub is None or not sub.matches(request) or sub.flow.host != flow.host:
            return make_response(request, 481, "Subscription Does Not Exist")
        expires = sub.refresh(request, now)
        response = sub.accept(request, expires, self._contact(sub))
        if expires == 0:
            self._forget(sub)
            self.timers.call_at(now, lambda _now: self._notify(sub, reason="timeout"))
            log.info("event=unsubscribed %s", fields(number=sub.subscriber, resource=sub.resource, event=sub.event))
        else:
            self.timers.arm(sub, self._expire)
            self.timers.call_at(now, lambda _now: self._notify(sub, force=True))  # RFC 6665 §4.2.1.2
        return response

    def _count_from(self, dest: Flow) -> int:
        return sum(1 for s in self._subs.values()
                   if s.flow.host == dest.host and s.flow.port == dest.port and s.flow.transport == dest.transport)

    def _contact(self, sub: Subscription) -> str:
        host, port = self.network.local_address(sub.flow)
        transport = ";transport=tcp" if sub.flow.transport == "tcp" else ""
        return f"<sip:{sub.resource}@{format_host_port(host, port)}{transport}>"

    def _expire(self, obj: Timed, now: float) -> None:
        assert isinstance(obj, Subscription)
        if obj.expired(now) and self._subs.get((obj.call_id, obj.local_tag)) is obj:
            self._forget(obj)
            self._notify(obj, reason="timeout")

    def _forget(self, sub: Subscription) -> None:
        self._subs.pop((sub.call_id, sub.local_tag), None)
        watchers = self._by_number.get(sub.resource)
        if watchers is not None:
            watchers.discard(sub)
            if not watchers:
                del self._by_number[sub.resource]
        self._shown.pop(sub, None)

    # -- NOTIFY ----------------------------------------------------------------------------
    def _notify(self, sub: Subscription, *, reason: str | None = None, force: bool = True) -> None:
        """Send the subscription's state now (`force`), or only if it changed."""
        if sub.terminated:
            return
        content_type, body = self._body(sub, not force)
        if not force and body is None:
            return
        assert body is not None
        now = self.timers.now()
        flow = sub.flow
        host, port = self.network.local_address(flow)
        branch = f"z9hG4bK{new_tag()}{new_tag()}"
        via = f"SIP/2.0/{flow.transport.upper()} {format_host_port(host, port)};branch={branch};rport"
        request = sub.notify(via, self._contact(sub), content_type, body, now, reason=reason)
        if sub.terminated:
            self._forget(sub)
        data = request.to_bytes()
        if not self.network.send(data, flow):  # the subscriber's TCP connection is gone
            self._ended(sub, "flow_closed")
            return
        key = self.client_tx.start(branch, "NOTIFY", data, flow, flow.transport == "tcp", now)
        self._pending[key] = sub
        self.timers.arm(self.client_tx, self._fire)

    def _body(self, sub: Subscription, only_if_changed: bool) -> tuple[str, bytes | None]:
        config = self.settings.current
        entity = f"sip:{sub.resource}@{config.server.realm}"
        if sub.event == "message-summary":
            new, old = self.mailbox(sub.resource)
            return MESSAGE_SUMMARY, message_summary(entity, waiting=new > 0, new=new, old=old)
        views = self._views(sub.resource)
        if sub.event == "presence":
            note, basic_open = self._presence(sub.resource, views)
            body = pidf(entity, basic_open, note, on_the_phone=note == ON_THE_PHONE)
            if only_if_changed and body == sub.last_body:
                return PIDF, None
            return PIDF, body
        shown = self._shown.get(sub, {})
        current = {v.id: v for v in views}
        if only_if_changed and current == shown:
            return DIALOG_INFO, None
        gone = [replace(v, state="terminated") for key, v in shown.items() if key not in current]
        self._shown[sub] = current
        return DIALOG_INFO, dialog_info(entity, sub.next_version(), [*views, *gone])

    def _presence(self, number: str, views: list[DialogView]) -> tuple[str, bool]:
        """(note, open): in a call, ringing, idle; closed while no device of the number is
        registered (read whenever a NOTIFY goes out: at the subscription, its refresh and
        each call change)."""
        if any(v.state == "confirmed" for v in views):
            return ON_THE_PHONE, True
        if any(v.state == "early" for v in views):
            return "Ringing", True
        if not self.devices.bindings(number):
            return "Offline", False
        return "Available", True

    def _views(self, number: str) -> list[DialogView]:
        """The number's dialogs now: ringing here (early, recipient), talking (confirmed),
        or calling out (shown as confirmed: busy, and nothing a lamp could pick up)."""
        realm = self.settings.current.server.realm
        me = f"sip:{number}@{realm}"
        views: list[DialogView] = []
        for call in self._calls.values():
            if call.caller_is_extension and call.caller == number:
                views.append(DialogView(call.token, call.token, f"{call.token}-i", f"{call.token}-r", "initiator",
                                        "confirmed", me, f"sip:{call.callee}@{realm}"))
            elif call.callee == number and not call.answered and call.rang:
                views.append(DialogView(call.token, call.token, f"{call.token}-l", f"{call.token}-r", "recipient",
                                        "early", me, f"sip:{call.caller}@{realm}"))
            elif call.answered and (call.answerer == number or number in call.joined):
                views.append(DialogView(call.token, call.token, f"{call.token}-l", f"{call.token}-r", "recipient",
                                        "confirmed", me, f"sip:{call.caller}@{realm}"))
        return views

    def _changed(self, *numbers: str | None) -> None:
        if not self._by_number:  # nobody watches a lamp (a call's four changes need no work)
            return
        for number in {n for n in numbers if n}:
            for sub in list(self._by_number.get(number, ())):
                if sub.event != "message-summary":
                    self._notify(sub, force=False)

    def mailbox_changed(self, number: str) -> None:
        """The answering machine's hook: the number's message counts changed."""
        for sub in list(self._by_number.get(number, ())):
            if sub.event == "message-summary":
                self._notify(sub)

    # -- responses to our NOTIFYs -------------------------------------------------------------
    def on_response(self, response: Response, flow: Flow, now: float) -> bool:
        key = client_key(response)
        if key is None or key not in self._pending:
            return False
        self.client_tx.receive(response)
        if response.status < 200:
            return True
        sub = self._pending.pop(key)
        if response.status >= 300:
            self._ended(sub, f"notify_{response.status}")
        return True

    def _fire(self, obj: Timed, now: float) -> None:
        for action in self.client_tx.on_timer(now):
            if isinstance(action, Retransmit):
                self.network.send(action.data, action.dest)
            elif isinstance(action, TimedOut):
                sub = self._pending.pop(action.key, None)
                if sub is not None:
                    self._ended(sub, "notify_timeout")

    def _ended(self, sub: Subscription, reason: str) -> None:
        """The subscriber refused or never answered a NOTIFY: the subscription is over."""
        if self._subs.get((sub.call_id, sub.local_tag)) is not sub:
            return
        sub.terminated = True
        self._forget(sub)
        log.info("event=subscription_ended %s", fields(number=sub.subscriber, resource=sub.resource,
                                                       event=sub.event, reason=reason))

    # -- CallEvents ----------------------------------------------------------------------------
    def call_started(self, call_id: str, caller: str, callee: str, caller_device: str | None, *,
                     trunk: str | None = None, caller_name: str = "") -> None:
        is_extension = caller_device is not None or self.settings.current.user(caller) is not None
        self._calls[call_id] = _Call(call_id, caller, callee, is_extension)
        self._changed(caller if is_extension else None)

    def device_ringing(self, call_id: str, binding_id: str) -> None:
        call = self._calls.get(call_id)
        if call is not None and not call.rang:
            call.rang = True
            self._changed(call.callee)

    def device_stopped(self, call_id: str, binding_id: str) -> None:
        pass  # ringing goes on at the other devices, or the call is answered or ends (told apart)

    def call_answered(self, call_id: str, binding_id: str | None) -> None:
        call = self._calls.get(call_id)
        if call is None or call.answered:
            return
        call.answered = True
        call.answerer = self._number_of(binding_id) or call.callee
        self._changed(call.callee, call.answerer)

    def call_joined(self, call_id: str, binding_id: str) -> None:
        call = self._calls.get(call_id)
        number = self._number_of(binding_id)
        if call is not None and number:
            call.joined.add(number)
            self._changed(number)

    def call_left(self, call_id: str, binding_id: str) -> None:
        call = self._calls.get(call_id)
        number = self._number_of(binding_id)
        if call is not None and number and number in call.joined:
            call.joined.discard(number)
            self._changed(number)

    def call_ended(self, call_id: str, reason: str) -> None:
        call = self._calls.pop(call_id, None)
        if call is not None:
            self._changed(call.caller if call.caller_is_extension else None, call.callee, call.answerer,
                          *call.joined)

    def call_forwarded(self, call_id: str, number: str, to: str, condition: str) -> None:
        pass  # the lamps follow the devices that ring and answer, wherever the call went

    def call_to_voicemail(self, call_id: str, number: str) -> None:
        pass

    def call_transferred(self, call_id: str, caller: str, callee: str, binding_id: str | None) -> None:
        call = self._calls.get(call_id)
        if call is None:
            return
        before = (call.caller if call.caller_is_extension else None, call.callee, call.answerer)
        call.caller_is_extension = call.caller_is_extension if caller == call.caller else \
            self.settings.current.user(caller) is not None
        call.caller, call.callee = caller, callee
        call.answerer = self._number_of(binding_id) or callee
        self._changed(*before, call.caller if call.caller_is_extension else None, call.callee, call.answerer)

    def _number_of(self, binding_id: str | None) -> str | None:
        if not binding_id:
            return None
        binding = self.devices.get(binding_id)
        return binding.number if binding is not None else None
