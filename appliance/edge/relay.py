"""Stateless relay (RFC 3261 §16.11) of requests inside a dialog and of their responses.

In-dialog requests follow our Record-Route back to the edge; the call router decides
where each one goes, and this module does the forwarding itself: our own Route entries
popped, Max-Forwards decremented, a Via whose branch is derived from the incoming one
(so a retransmission gets the same branch), internal headers stripped when the message
leaves the box.

A response is only ever sent where the box itself decided, when it relayed the request,
that the answer belongs: the flow the request came from, remembered under our branch for
as long as a transaction lives (64*T1). The next Via of a response is never trusted as a
destination: anyone can send a response with our branch prefix and a victim's address
there, and trusting it would make the box reflect traffic wherever a stranger chose.

A media worker bound to every address names 127.0.0.1 in its SDP: right on the edge's
own hop to it, wrong for a handset on the LAN, which would send its audio to its own
loopback.  So a body from a worker to an outside party is given the box's address as
that party reaches it (`body_between`, also used by the forks), the Kamailio
fix_nated_sdp / rtpproxy idea: the edge already knows that address for every flow (the
one in its own Via), and rewriting at the one place every message leaves through keeps
the worker simple and every path covered (initial INVITEs, their answers, re-INVITEs,
UPDATEs, ACKs and their answers), where telling each worker per call which address to
advertise would not cover a call whose parties reach the box at different addresses.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable

from appliance.edge.seams import Network
from appliance.edge.transport import format_host_port
from appliance.logs import PerSourceLimit, log_limited
from appliance.media.protocol import LOOPBACK
from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_name_addr, parse_via
from appliance.sip.message import Request, Response
from appliance.sip.proxy import INTERNAL_PREFIX
from appliance.sip.registrar import Flow
from appliance.sip.sdp import is_sdp, rewrite_address

STATELESS_PREFIX = "z9hG4bKsl"
"""Branch prefix of statelessly relayed requests: their responses are relayed the same way."""

RECORD_LIFETIME = 64 * 0.5
"""Seconds a relayed request's return flow is kept: 64*T1, the life of a transaction (RFC 3261 §17)."""

MAX_RECORDS = 16384
"""Return flows kept at most (oldest dropped first): memory stays bounded under a flood."""

log = logging.getLogger("homepbx.relay")


def strip_internal(message: Request | Response) -> None:
    message.headers = [(n, v) for n, v in message.headers if not n.startswith(INTERNAL_PREFIX)]


class StatelessRelay:
    def __init__(self, network: Network, is_internal: Callable[[Flow], bool], *,
                 lifetime: float = RECORD_LIFETIME, max_records: int = MAX_RECORDS,
                 address_for: Callable[[Flow], tuple[str, int]] | None = None) -> None:
        self.network = network
        self.is_internal = is_internal
        self.address_for = address_for or network.local_address
        """Our address as named to `dest` (Via, SDP): the listener's, or a trunk's `external_address`."""
        self.lifetime = lifetime
        self.max_records = max_records
        # our branch -> (where its responses go, when the record expires); oldest first
        self._returns: OrderedDict[str, tuple[Flow, float]] = OrderedDict()
        self._log_limit = PerSourceLimit()
        # The listeners as last seen, and their ports and hosts: built again only when they
        # change, not for every Route of every request.
        self._listeners: list[str] = []
        self._ports: frozenset[int] = frozenset()
        self._hosts: frozenset[str] = frozenset()

    def forward(self, request: Request, dest: Flow, reply_to: Flow | None, now: float,
                source: Flow | None = None) -> bool:
        """Relay `request` to `dest`; False when Max-Forwards is used up (answer 483).

        `reply_to` is where its responses go (the flow it came from, as the edge worked it
        out); None for an ACK, which has none.  `source` is the flow it came on (for its
        body: see `body_between`).
        """
        self.pop_own_routes(request)
        max_forwards = int(request.get("Max-Forwards") or "70")
        if max_forwards <= 0:
            return False
        request.set("Max-Forwards", str(max_forwards - 1))
        top = request.get("Via")
        incoming_branch = (parse_via(top).branch or "") if top is not None else ""
        digest = hashlib.sha1(f"{incoming_branch}|{request.call_id}|{request.method}".encode()).hexdigest()[:20]
        branch = f"{STATELESS_PREFIX}{digest}"
        if reply_to is not None:
            self._remember(branch, reply_to, now)
        host, port = self.address_for(dest)
        request.add("Via", f"SIP/2.0/{dest.transport.upper()} {format_host_port(host, port)};"
                           f"branch={branch};rport", first=True)
        if not self.is_internal(dest):
            strip_internal(request)
        if source is not None:
            request.body = self.body_between(request, source, dest)
        self.network.send(request.to_bytes(), dest)
        return True

    def backward(self, response: Response, branch: str, source: Flow, now: float) -> None:
        """Drop our Via and send the response where its request came from; unknown: dropped."""
        self._expire(now)
        record = self._returns.get(branch)
        if record is None:
            self._drop(source, now, "unknown_branch", response)
            return
        response.pop_first("Via")
        if response.get("Via") is None:
            self._drop(source, now, "no_via", response)
            return
        dest = record[0]
        self._remember(branch, dest, now)  # the transaction is alive: keep its way back
        if not self.is_internal(dest):
            strip_internal(response)
        response.body = self.body_between(response, source, dest)
        if not self.network.send(response.to_bytes(), dest):
            self._drop(source, now, "unroutable", response, dest)

    def body_between(self, message: Request | Response, source: Flow, dest: Flow) -> bytes:
        """The body `message` leaves with from `source` to `dest`: a media worker's SDP sent
        to an outside party names the box's address as that party reaches it instead of
        127.0.0.1 (Content-Length follows, `to_bytes` counts it); any other body as it is.
        To a provider whose trunk has an `external_address`, that address (`address_for`).

        Media are IPv4 (`protocol.rtp_address`): a party reached over IPv6 is left as is.
        """
        body = message.body
        if not body or not self.is_internal(source) or self.is_internal(dest):
            return body
        if not is_sdp(message.get("Content-Type")):
            return body
        host, _ = self.address_for(dest)
        if host == LOOPBACK or ":" in host:
            return body
        return rewrite_address(body, LOOPBACK, host)

    def _remember(self, branch: str, reply_to: Flow, now: float) -> None:
        """Note (or refresh, for a retransmission) where the responses on `branch` go."""
        self._expire(now)
        self._returns[branch] = (reply_to, now + self.lifetime)
        self._returns.move_to_end(branch)
        while len(self._returns) > self.max_records:
            self._returns.popitem(last=False)

    def expire(self, now: float) -> None:
        """Drop the records whose time is over (also done on each relayed message)."""
        self._expire(now)
        self._returns = OrderedDict(self._returns)  # the table it grew to goes too

    def _expire(self, now: float) -> None:
        # Every record lives equally long and is moved to the end when written: the
        # oldest is first, so expiry stops at the first one still alive.
        while self._returns:
            branch, (_, expires) = next(iter(self._returns.items()))
            if expires > now:
                return
            del self._returns[branch]

    def _drop(self, source: Flow, now: float, reason: str, response: Response, to: Flow | None = None) -> None:
        """One short line per source per interval: a flood of forged responses cannot flood the log."""
        peer = f"{source.host}:{source.port}"
        if to is None:
            log_limited(log, self._log_limit, source.host, now, "relay_dropped", peer=peer, reason=reason,
                        status=response.status)
        else:
            log_limited(log, self._log_limit, source.host, now, "relay_dropped", peer=peer, reason=reason,
                        status=response.status, to=f"{to.transport}:{to.host}:{to.port}")

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
        addresses = self.network.addresses
        if addresses != self._listeners:
            self._listeners = list(addresses)
            self._ports = frozenset(int(a.rsplit(":", 1)[1]) for a in addresses)
            self._hosts = frozenset(a.rsplit(":", 1)[0].strip("[]") for a in addresses)
        if (port or 5060) not in self._ports:
            return False
        host = host.strip("[]")
        return host in self._hosts or host in self.network.local_ips() or "0.0.0.0" in self._hosts
