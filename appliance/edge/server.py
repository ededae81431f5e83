"""The SIP edge: receives every message, answers what the box answers, keeps the bindings.

This is the wiring between the transports (bytes and flows) and the sans-I/O core
(parser, digest gate, registrar, transactions). It owns the clocks and the timers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from appliance.config import Config, UserConfig
from appliance.control import ControlServer
from appliance.edge.calls import CallRouter
from appliance.edge.media_link import MediaLink
from appliance.edge.persistence import BindingStore, load_secret
from appliance.edge.qualify import Qualifier
from appliance.edge.tcp_limits import TcpLimits
from appliance.edge.transport import Transports
from appliance.logs import PerSourceLimit, fields, log_limited
from appliance.sip.auth import NonceManager
from appliance.sip.authenticator import Authenticator, AuthResult, Outcome
from appliance.sip.errors import SipParseError, SipSyntaxError
from appliance.sip.headers import parse_name_addr, parse_via
from appliance.sip.message import Request, Response, make_response, parse_message
from appliance.sip.registrar import DevicePolicy, EventKind, Flow, Registrar, RegistrarEvent
from appliance.sip.throttle import FailureThrottle
from appliance.sip.transaction import ServerTransactions, server_key
from appliance.state import LiveState

log = logging.getLogger("homepbx.edge")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, UPDATE, INFO, PRACK"
# Methods we know but do not serve get 405 with Allow; anything else 501 (§21.4.6, §21.5.2).
KNOWN_UNSERVED = frozenset({"SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER"})
IN_DIALOG = frozenset({"BYE", "UPDATE", "INFO", "PRACK", "CANCEL"})
CALL_METHODS = frozenset({"INVITE", "ACK", "CANCEL"})
HOUSEKEEPING_INTERVAL = 1.0
# The nonce table drops expired entries as it goes; the full O(n) sweep is only a backstop.
NONCE_SWEEP_INTERVAL = 60.0


@lru_cache(maxsize=1024)  # a device sends the same To on every REGISTER, and twice per challenge
def _to_number(to: str) -> str:
    """The user part of a To header value's URI ("" if none); SipSyntaxError if malformed."""
    return parse_name_addr(to).uri.user or ""


def policy_for(user: UserConfig) -> DevicePolicy:
    return DevicePolicy(limit=user.device_limit, one_number=user.one_number)


class Edge:
    """One process, one event loop: the registrar and (later) the proxy of homepbx."""

    def __init__(self, config: Config, *, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.monotonic = monotonic
        self.wall = wall
        state_dir = config.server.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.nonces = NonceManager(load_secret(state_dir / "nonce.key"))
        self.throttle = FailureThrottle()
        self.auth = Authenticator(config.server.realm, self.nonces, self.throttle, config.server.digest_algorithms)
        reg = config.registration
        self.registrar = Registrar(reg.min_expires, reg.max_expires, reg.default_expires)
        self.store = BindingStore(state_dir / "bindings.json", self.registrar)
        self.transports = Transports(self, TcpLimits.of(config.server), has_binding=self._tcp_bound)
        self.server_tx = ServerTransactions()
        self.malformed_log = PerSourceLimit()  # a stranger's junk: a line per source per interval
        self.qualifier = Qualifier(self)
        self.state = LiveState(self.registrar, config)
        self.calls = CallRouter(self)
        self.addresses: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.control: ControlServer | None = None

    def _tcp_bound(self, flow: Flow) -> bool:
        """A binding lives on this TCP flow: its connection stays however quiet it is.

        Asked only of a connection idle for tcp_idle_timeout, so a scan of the (few) bindings
        of a home box is cheaper than an index kept up to date on every REGISTER.
        """
        return any(binding.flow == flow for binding in self.registrar.all_bindings())

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        kept = self.store.load(self.wall())
        if kept:
            log.info("event=bindings_restored %s", fields(count=kept))
        self._enforce_users()  # a user removed (or limited) while the daemon was down
        for address in self.config.server.listen:
            self.addresses.append(await self.transports.listen(address.host, address.port))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self._tasks.append(asyncio.create_task(self.qualifier.run()))
        if self.config.media.max_calls:
            host, _, port = self.addresses[0].rpartition(":")
            self.calls.media = MediaLink(self.calls, self.config.media, host.strip("[]"), int(port))
            await self.calls.media.start()
        if self.config_path is not None:  # the control socket edits this file
            self.control = ControlServer(self, self.config_path)
            await self.control.start()

    def call_later(self, delay: float, callback: Callable[..., object], *args: object) -> None:
        asyncio.get_running_loop().call_later(delay, callback, *args)

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.stop()
        if self.calls.media is not None:
            await self.calls.media.stop()  # workers BYE their calls and exit
        self.calls.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.flush_now()
        await self.transports.close()

    def apply_config(self, config: Config) -> None:
        """Take a new, already validated config live (SIGHUP or a control command)."""
        old = self.config
        if [str(a) for a in old.server.listen] != [str(a) for a in config.server.listen]:
            log.warning("event=listen_changed action=restart_needed")
        self.config = config
        self.state.config = config
        self.auth.realm = config.server.realm
        self.auth.algorithms = config.server.digest_algorithms
        reg = config.registration
        self.registrar.min_expires = reg.min_expires
        self.registrar.max_expires = reg.max_expires
        self.registrar.default_expires = reg.default_expires
        self._enforce_users()
        self.qualifier.reschedule()
        self.state.emit({"event": "config_changed"})

    def _enforce_users(self) -> None:
        """Bindings follow the config: a number no longer configured loses its devices, and
        a lowered device limit is applied."""
        for number in self.registrar.numbers():
            user = self.config.user(number)
            for event in self.registrar.enforce(number, policy_for(user) if user else None):
                self.publish(event)

    async def _housekeeping(self) -> None:
        next_nonce_sweep = self.monotonic() + NONCE_SWEEP_INTERVAL
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            now = self.monotonic()
            for event in self.registrar.expire(self.wall()):
                self.publish(event)
            self.server_tx.expire(now)
            self.throttle.sweep(now)
            if now >= next_nonce_sweep:
                self.nonces.sweep(now)
                next_nonce_sweep = now + NONCE_SWEEP_INTERVAL

    def publish_all(self, events: list[RegistrarEvent]) -> None:
        for event in events:
            self.publish(event)

    def publish(self, event: RegistrarEvent) -> None:
        # Refreshes are routine (every device, every few minutes): debug, not info.
        level = logging.DEBUG if event.kind is EventKind.REFRESHED else logging.INFO
        if log.isEnabledFor(level):
            b = event.binding
            log.log(level, "event=device_%s %s", event.kind.value, fields(
                number=b.number, device=b.id, contact=b.contact,
                flow=f"{b.flow.transport}:{b.flow.host}:{b.flow.port}", ua=b.user_agent,
                reason=event.reason or "-",
            ))
        self.store.mark_dirty()
        self.state.device_event(event)

    # -- receiving -------------------------------------------------------------------------
    def on_message(self, data: bytes, flow: Flow) -> None:
        now = self.monotonic()
        if self.throttle.is_blocked(flow.host, now):
            return
        try:
            message = parse_message(data)
        except SipParseError as err:
            self._reject_malformed(err, flow, err.status, err.reason)
            return
        if isinstance(message, Response):
            if not self.calls.on_response(message, flow, now):
                self.qualifier.on_response(message)
            return
        self.on_request(message, flow, now)

    def on_oversize(self, head: bytes, flow: Flow) -> None:
        if self.throttle.is_blocked(flow.host, self.monotonic()):
            return
        try:
            parse_message(head + b"\r\n\r\n")
        except SipParseError as err:
            self._reject_malformed(err, flow, 513, "Message Too Large")
            return
        self._reject_malformed(SipParseError("too large"), flow, 513, "Message Too Large")

    def _reject_malformed(self, err: SipParseError, flow: Flow, status: int, reason: str) -> None:
        """Answer what can be answered, every time; log it once per source per interval."""
        log_limited(log, self.malformed_log, flow.host, self.monotonic(), "malformed",
                    peer=f"{flow.host}:{flow.port}", transport=flow.transport, reason=err.reason,
                    answered=err.request is not None)
        request = err.request
        if request is None or request.method == "ACK":
            return
        try:
            dest = self._stamp_via(request, flow)
        except SipSyntaxError:
            return
        self.transports.send(make_response(request, status, reason).to_bytes(), dest)

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
                    self.transports.send(previous, dest)
                return
        response = self._answer(request, flow, now)
        data = response.to_bytes()
        if key is not None:
            self.server_tx.respond(key, data, response.status >= 200, flow.transport == "tcp", now)
        self.transports.send(data, dest)

    def _reply_unkeyed(self, request: Request, flow: Flow, status: int, reason: str) -> None:
        self.transports.send(make_response(request, status, reason).to_bytes(), flow)

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
        user = self.config.user(number)
        result = self.auth.check(request, number, user.password if user else None, flow.host, now)
        if result.outcome is not Outcome.ACCEPTED:
            self.note_refusal(result, number, flow, request.method)
            assert result.response is not None
            return result.response
        assert user is not None
        response, events = self.registrar.register(request, number, policy_for(user), flow, self.wall())
        if response.status >= 300:
            log.info("event=register_refused %s", fields(
                number=number, peer=f"{flow.host}:{flow.port}", status=response.status,
                reason=response.reason))
        for event in events:
            self.publish(event)
        return response

    def note_refusal(self, result: AuthResult, number: str, flow: Flow, method: str) -> None:
        """Log a refused digest answer, and the block it started (whatever the method): the
        one place both REGISTER and INVITE failures are reported, so no block goes unlogged."""
        if result.outcome is Outcome.REFUSED:
            log.warning("event=auth_failed %s", fields(number=number, peer=f"{flow.host}:{flow.port}", method=method))
        if result.blocked_for is not None:
            log.warning("event=address_blocked %s", fields(
                peer=flow.host, seconds=int(result.blocked_for), reason="auth_failures", method=method))
            self.state.address_blocked(flow.host, result.blocked_for, "auth_failures")

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

    # -- sending requests (qualify) ---------------------------------------------------------
    def send(self, data: bytes, flow: Flow) -> bool:
        return self.transports.send(data, flow)

