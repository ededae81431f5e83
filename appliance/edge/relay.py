"""Stateless relay (RFC 3261 §16.11) of requests inside a dialog and of their responses.

In-dialog requests follow our Record-Route back to the edge; the call router decides
where each one goes, and this module does the forwarding itself: our own Route entries
popped, Max-Forwards decremented, a Via whose branch is derived from the incoming one
(so a retransmission gets the same branch), internal headers stripped when the message
leaves the box. Responses come back on that Via and go to the next one's address.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.edge.transport import format_host_port
from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_name_addr, parse_via
from appliance.sip.message import Request, Response
from appliance.sip.proxy import INTERNAL_PREFIX
from appliance.sip.registrar import Flow

if TYPE_CHECKING:
    from appliance.edge.server import Edge

STATELESS_PREFIX = "z9hG4bKsl"
"""Branch prefix of statelessly relayed requests: their responses are relayed the same way."""


def strip_internal(message: Request | Response) -> None:
    message.headers = [(n, v) for n, v in message.headers if not n.startswith(INTERNAL_PREFIX)]


class StatelessRelay:
    def __init__(self, edge: Edge, is_internal: Callable[[Flow], bool]) -> None:
        self.edge = edge
        self.is_internal = is_internal

    def forward(self, request: Request, dest: Flow) -> bool:
        """Relay `request` to `dest`; False when Max-Forwards is used up (answer 483)."""
        self.pop_own_routes(request)
        max_forwards = int(request.get("Max-Forwards") or "70")
        if max_forwards <= 0:
            return False
        request.set("Max-Forwards", str(max_forwards - 1))
        top = request.get("Via")
        incoming_branch = (parse_via(top).branch or "") if top is not None else ""
        digest = hashlib.sha1(f"{incoming_branch}|{request.call_id}|{request.method}".encode()).hexdigest()[:20]
        host, port = self.edge.transports.local_address(dest)
        request.add("Via", f"SIP/2.0/{dest.transport.upper()} {format_host_port(host, port)};"
                           f"branch={STATELESS_PREFIX}{digest};rport", first=True)
        if not self.is_internal(dest):
            strip_internal(request)
        self.edge.send(request.to_bytes(), dest)
        return True

    def backward(self, response: Response) -> None:
        """Drop our Via and send the response to the address in the next one."""
        response.pop_first("Via")
        top = response.get("Via")
        if top is None:
            return
        try:
            via = parse_via(top)
        except SipSyntaxError:
            return
        host = via.params.get("received") or via.host
        rport = via.params.get("rport")
        port = int(rport) if rport and rport.isdigit() else (via.port or 5060)
        dest = Flow("tcp" if via.transport == "TCP" else "udp", host.strip("[]"), port)
        if not self.is_internal(dest):
            strip_internal(response)
        self.edge.send(response.to_bytes(), dest)

    def pop_own_routes(self, request: Request) -> None:
        """Loose routing (§16.4): the Route entries that name us are consumed here."""
        while True:
            route = request.get("Route")
            if route is None:
                return
            try:
                uri = parse_name_addr(route).uri
            except SipSyntaxError:
                return
            if not self.is_ours(uri.host, uri.port):
                return
            request.pop_first("Route")

    def is_ours(self, host: str, port: int | None) -> bool:
        addresses = self.edge.addresses
        if (port or 5060) not in {int(a.rsplit(":", 1)[1]) for a in addresses}:
            return False
        host = host.strip("[]")
        listening = {a.rsplit(":", 1)[0].strip("[]") for a in addresses}
        return host in listening or host in self.edge.transports.local_ips() or "0.0.0.0" in listening
