"""Qualify: an OPTIONS to every binding each `qualify_interval`, over the device's flow.

A device that stops answering is marked unreachable (it is skipped for ringing and may be
replaced by a new device), and removed after three misses in a row. The rounds and the
OPTIONS transactions are deadlines in the edge's one timer wheel.
"""

from __future__ import annotations

import logging

from appliance.config import LiveConfig
from appliance.edge.seams import Network, PublishDeviceEvents
from appliance.edge.timers import Deadline, Timed, TimerWheel
from appliance.edge.transport import format_host_port
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
        self._round: Deadline | None = None
        self._interval = 0

    def start(self) -> None:
        """First round now, then every `qualify_interval` seconds (0: none)."""
        self._interval = self.settings.current.registration.qualify_interval
        if self._interval:
            self._round = self.timers.call_at(self.timers.now(), self._probe_round)

    def reschedule(self) -> None:
        """The config changed: a new interval takes effect at once, with a round now."""
        interval = self.settings.current.registration.qualify_interval
        if interval == self._interval:
            return
        self.stop()
        self.start()

    def stop(self) -> None:
        if self._round is not None:
            self._round.cancel()
            self._round = None

    def _probe_round(self, now: float) -> None:
        busy = set(self._pending.values())
        for binding in list(self.registrar.all_bindings()):
            if binding.id not in busy:
                self._probe(binding, now)
        self._round = self.timers.call_at(now + self._interval, self._probe_round)

    def _probe(self, binding: Binding, now: float) -> None:
        flow = binding.flow
        if not self.network.flow_open(flow):
            self.publish(self.registrar.qualified(binding.id, answered=False))
            return
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
            self.publish(self.registrar.qualified(binding_id, answered))
