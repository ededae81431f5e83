"""Qualify: an OPTIONS to every binding each `qualify_interval`, over the device's flow.

A device that stops answering is marked unreachable (it is skipped for ringing and may be
replaced by a new device), and removed after three misses in a row.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from appliance.edge.transport import format_host_port
from appliance.sip.message import Request, Response, new_tag
from appliance.sip.registrar import Binding, Flow
from appliance.sip.transaction import ClientTransactions, Retransmit, TimedOut

if TYPE_CHECKING:
    from appliance.edge.server import Edge

log = logging.getLogger("homepbx.qualify")


class Qualifier:
    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.transactions: ClientTransactions[Flow] = ClientTransactions()
        self._pending: dict[str, str] = {}  # transaction key -> binding id
        self._wake = asyncio.Event()

    def reschedule(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        next_round = self.edge.monotonic()
        while True:
            interval = self.edge.config.registration.qualify_interval
            now = self.edge.monotonic()
            if interval and now >= next_round:
                self._probe_all(now)
                next_round = now + interval
            for action in self.transactions.on_timer(now):
                if isinstance(action, Retransmit):
                    self.edge.send(action.data, action.dest)
                elif isinstance(action, TimedOut):
                    self._outcome(action.key, answered=False)
            deadline = self.transactions.next_deadline()
            wake_at = next_round if interval else now + 3600
            if deadline is not None:
                wake_at = min(wake_at, deadline)
            self._wake.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            # that races with the event being set, and then stop() would hang.
            try:
                async with asyncio.timeout(max(0.01, wake_at - self.edge.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if self._wake.is_set() and interval != self.edge.config.registration.qualify_interval:
                next_round = self.edge.monotonic()

    def _probe_all(self, now: float) -> None:
        busy = set(self._pending.values())
        for binding in list(self.edge.registrar.all_bindings()):
            if binding.id in busy:
                continue
            self._probe(binding, now)

    def _probe(self, binding: Binding, now: float) -> None:
        flow = binding.flow
        if flow.transport == "tcp" and self.edge.transports.tcp.get(flow.host, flow.port) is None:
            self.edge.publish_all(self.edge.registrar.qualified(binding.id, answered=False))
            return
        host, port = self.edge.transports.local_address(flow)
        branch = "z9hG4bK" + new_tag()
        realm = self.edge.config.server.realm
        uri = str(binding.name_addr.uri)
        request = Request("OPTIONS", uri, [
            ("Via", f"SIP/2.0/{flow.transport.upper()} {format_host_port(host, port)};branch={branch};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:homepbx@{realm}>;tag={new_tag()}"),
            ("To", f"<{uri}>"),
            ("Call-ID", new_tag() + new_tag()),
            ("CSeq", "1 OPTIONS"),
        ])
        data = request.to_bytes()
        timeout = float(self.edge.config.registration.qualify_timeout)
        key = self.transactions.start(
            branch, "OPTIONS", data, flow, flow.transport == "tcp", now, timeout=timeout
        )
        self._pending[key] = binding.id
        self.edge.send(data, flow)

    def on_response(self, response: Response) -> None:
        key = self.transactions.receive(response)
        if key is not None:
            self._outcome(key, answered=True)
        self._wake.set()

    def _outcome(self, key: str, *, answered: bool) -> None:
        binding_id = self._pending.pop(key, None)
        if binding_id is not None:
            self.edge.publish_all(self.edge.registrar.qualified(binding_id, answered))
