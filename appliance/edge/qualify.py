"""Qualify: an OPTIONS to every binding each `qualify_interval`, over the device's flow.

A device that stops answering is marked unreachable (it is skipped for ringing and may be
replaced by a new device), and removed after three misses in a row. The rounds and the
OPTIONS transactions are deadlines in the edge's one timer wheel.

A TCP device whose connection is gone (the box restarted, or the connection was lost) is
reached again over a new connection to its Contact (RFC 3261 §18.1.1), opened by the
transports: in the round, and at once when its connection closes; at most one attempt per
device per round, so nothing loops. That connection becomes the binding's flow, for the
OPTIONS and for ringing it. Where it cannot connect (refused, a private address behind
NAT, no answer) the device is unreachable with the reason `tcp_connect_failed`. A device
registered with RFC 5626 outbound keeps its own flow: it reconnects and registers again
itself, and the box must not connect to it (§5.3); it is unreachable until it does.
"""

from __future__ import annotations

import logging

from appliance.config import LiveConfig
from appliance.edge.seams import Network, PublishDeviceEvents
from appliance.edge.timers import Deadline, Timed, TimerWheel
from appliance.edge.transport import format_host_port
from appliance.logs import fields
from appliance.sip.message import Request, Response, new_tag
from appliance.sip.registrar import Binding, Flow, Registrar
from appliance.sip.transaction import ClientTransactions, Retransmit, TimedOut

log = logging.getLogger("homepbx.qualify")


class Qualifier:
    def __init__(self, settings: LiveConfig, network: Network, registrar: Registrar, timers: TimerWheel,
                 publish: PublishDeviceEvents) -> None:
        self.settings = settings
        self.network = network
        self.registrar = registrar
        self.timers = timers
        self.publish = publish
        self.transactions: ClientTransactions[Flow] = ClientTransactions()
        self._pending: dict[str, str] = {}  # transaction key -> binding id
        self._connecting: set[str] = set()  # binding ids with a connect under way
        self._attempted: set[str] = set()  # binding ids a connect was tried for this round
        self._round: Deadline | None = None
        self._interval = 0
        self._running = False

    def start(self) -> None:
        """First round now, then every `qualify_interval` seconds (0: none, but the TCP
        devices restored from the state file are still reached again, once)."""
        self._running = True
        self._interval = self.settings.current.registration.qualify_interval
        if self._interval:
            self._round = self.timers.call_at(self.timers.now(), self._probe_round)
        else:
            for binding in list(self.registrar.all_bindings()):
                if not self.network.flow_open(binding.flow):
                    self._reach_again(binding)

    def reschedule(self) -> None:
        """The config changed: a new interval takes effect at once, with a round now."""
        interval = self.settings.current.registration.qualify_interval
        if interval == self._interval:
            return
        self.stop()
        self.start()

    def stop(self) -> None:
        self._running = False
        if self._round is not None:
            self._round.cancel()
            self._round = None

    def _probe_round(self, now: float) -> None:
        self._attempted.clear()
        busy = set(self._pending.values()) | self._connecting
        for binding in list(self.registrar.all_bindings()):
            if binding.id not in busy:
                self._probe(binding, now)
        self._round = self.timers.call_at(now + self._interval, self._probe_round)

    def _probe(self, binding: Binding, now: float) -> None:
        if self.network.flow_open(binding.flow):
            self._options(binding, now)
        else:
            self._reach_again(binding)

    # -- a TCP device whose connection is gone ------------------------------------------------
    def flow_lost(self, flow: Flow) -> None:
        """A TCP connection closed: reach the devices that lived on it again, now."""
        if not self._running or flow.transport != "tcp":
            return
        for binding in [b for b in self.registrar.all_bindings() if b.flow == flow]:
            self._reach_again(binding)

    def _reach_again(self, binding: Binding) -> None:
        """Open a new connection to the device's Contact, at most once per round."""
        if binding.id in self._connecting or binding.id in self._attempted:
            return
        target = None if binding.outbound else binding.contact_flow()
        if target is None:  # UDP is always open; here an outbound device, or no usable Contact
            reason = "outbound_flow_lost" if binding.outbound else "tcp_flow_lost"
            self.publish(self.registrar.qualified(binding.id, answered=False, reason=reason))
            return
        self._attempted.add(binding.id)
        self._connecting.add(binding.id)
        self.network.connect(target, lambda flow, why: self._connected(binding.id, target, flow, why))

    def _connected(self, binding_id: str, target: Flow, flow: Flow | None, why: str) -> None:
        self._connecting.discard(binding_id)
        binding = self.registrar.get(binding_id)
        if not self._running or binding is None:
            return
        if self.network.flow_open(binding.flow):
            return  # it registered again meanwhile, over its own connection: that one serves
        if flow is None:
            log.debug("event=tcp_reconnect_failed %s", fields(
                number=binding.number, device=binding.id, peer=format_host_port(target.host, target.port),
                error=why))
            self.publish(self.registrar.qualified(binding_id, answered=False, reason="tcp_connect_failed"))
            return
        self.registrar.reflow(binding_id, flow)
        self._options(binding, self.timers.now())

    # -- OPTIONS --------------------------------------------------------------------------------
    def _options(self, binding: Binding, now: float) -> None:
        flow = binding.flow
        host, port = self.network.local_address(flow)
        branch = "z9hG4bK" + new_tag()
        config = self.settings.current
        uri = str(binding.name_addr.uri)
        request = Request("OPTIONS", uri, [
            ("Via", f"SIP/2.0/{flow.transport.upper()} {format_host_port(host, port)};branch={branch};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:homepbx@{config.server.realm}>;tag={new_tag()}"),
            ("To", f"<{uri}>"),
            ("Call-ID", new_tag() + new_tag()),
            ("CSeq", "1 OPTIONS"),
        ])
        data = request.to_bytes()
        timeout = float(config.registration.qualify_timeout)
        key = self.transactions.start(branch, "OPTIONS", data, flow, flow.transport == "tcp", now, timeout=timeout)
        self._pending[key] = binding.id
        self.network.send(data, flow)
        self.timers.arm(self.transactions, self._on_timer)

    def _on_timer(self, _obj: Timed, now: float) -> None:
        for action in self.transactions.on_timer(now):
            if isinstance(action, Retransmit):
                self.network.send(action.data, action.dest)
            elif isinstance(action, TimedOut):
                self._outcome(action.key, answered=False)

    def on_response(self, response: Response) -> None:
        key = self.transactions.receive(response)
        if key is not None:
            self._outcome(key, answered=True)

    def _outcome(self, key: str, *, answered: bool) -> None:
        binding_id = self._pending.pop(key, None)
        if binding_id is not None:
            self.publish(self.registrar.qualified(binding_id, answered, reason="no_answer"))
