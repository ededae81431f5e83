"""Stateful forking proxy core (RFC 3261 §16), sans-I/O: one `Fork` per incoming INVITE.

A Fork rings every target at once (one INVITE client transaction per device), relays
provisional responses, forwards the first 2xx and CANCELs the other branches with
`Reason: SIP;cause=200;text="Call completed elsewhere"` so their handsets log no missed
call. A second 2xx that loses the race is ACKed and BYEd here, so no handset is left in
a ghost call. Without an answer it sends the best final response (§16.7) upstream.
Timers are data: `next_deadline()` / `on_timer(now)`. Once the final is sent and its
transactions only wait out their timers (Timer L, D), `finished()` hands over a
`FinishedFork`: the few values that answer what may still come, for the 32 s a burst of
calls would otherwise keep every fork whole.

A body crosses the fork in two ways: the INVITE's to every target, and each answer's
upstream.  `relay_body(message, source, dest)`, when given, decides what body leaves
(the edge gives a media worker's SDP the box's address as the outside party reaches it);
without it bodies pass untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, NamedTuple, TypeVar

from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_name_addr
from appliance.sip.invite_transaction import InviteClient, InviteServer, PassUp, Send, State, TimedOut, build_ack
from appliance.sip.message import Request, Response, make_response, new_tag

Dest = TypeVar("Dest")

ANSWERED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'
DECLINE_CODES = frozenset({486, 600, 603})
INTERNAL_PREFIX = "X-Homepbx-"
"""Headers between the edge and its media workers; stripped from all that leaves the box."""


class Target(NamedTuple, Generic[Dest]):
    """One device to ring: its registered binding, Contact URI and the flow to reach it."""

    binding_id: str
    uri: str
    dest: Dest
    reliable: bool


class BranchState(Enum):
    TRYING = "trying"
    RINGING = "ringing"
    ANSWERED = "answered"
    FAILED = "failed"


class Branch(Generic[Dest]):
    """One forked INVITE: the device it rings and how far it got."""

    __slots__ = ("answer", "authorized", "cancel_wanted", "cancelled", "loser_ack", "state", "target", "tx")

    def __init__(self, target: Target[Dest], tx: InviteClient[Dest]) -> None:
        self.target = target
        self.tx = tx
        self.state = BranchState.TRYING
        self.cancel_wanted: str | None = None  # Reason to send once a provisional arrives
        self.cancelled = False
        self.answer: Response | None = None  # the 2xx that won: its Contact and To-tag name the dialog
        self.loser_ack: bytes | None = None  # the ACK of a 2xx that lost the race, resent per retransmission
        self.authorized = False  # this INVITE already carries credentials: a new challenge is a refusal


class SendRequest(NamedTuple, Generic[Dest]):
    """A new non-INVITE request (CANCEL, BYE) for the edge's client transactions."""

    request: Request
    dest: Dest
    reliable: bool


class ForkEvent(NamedTuple):
    """What a person would see: a device rings, stops, answers; the call fails."""

    kind: str  # "ringing" | "stopped" | "answered" | "failed" | "exhausted" (hold_final: no final sent yet)
    binding_id: str | None = None
    status: int | None = None


ForkAction = Send[Dest] | SendRequest[Dest] | ForkEvent
RelayBody = Callable[[Request | Response, Dest, Dest], bytes]
"""(message, where it came from, where it goes) -> the body it is sent with."""
Authorize = Callable[[Request, Response], tuple[str, str] | None]
"""(a branch's INVITE, the 401/407 it got) -> the credentials header to re-send it with, or None."""


@dataclass(init=False)
class ForkSettings:
    ring_timeout: float
    decline_all: bool
    hold_final: bool
    """Every branch failed or the ring timeout passed: keep the final response and say
    "exhausted"; the owner then `retarget`s the fork (call forwarding) or `finish`es it."""

    def __init__(self, ring_timeout: float, decline_all: bool = False, hold_final: bool = False) -> None:
        # Written out (one per call): mypyc compiles this one, not the dataclass's.
        self.ring_timeout = ring_timeout
        self.decline_all = decline_all
        self.hold_final = hold_final


class Fork(Generic[Dest]):
    """One INVITE from a caller, forked in parallel to every target."""

    __slots__ = ("_authorize", "_buried", "_extra", "_made", "_record_route", "_relay_body", "_responses",
                 "_via_for", "answered", "branches", "final_sent", "held", "prefix", "request", "ring_deadline",
                 "server", "settings", "upstream")

    def __init__(
        self,
        request: Request,
        upstream: Dest,
        upstream_reliable: bool,
        settings: ForkSettings,
        now: float,
        *,
        via_for: Callable[[Target[Dest], str], str],
        record_route: Callable[[Target[Dest]], str] | None = None,
        extra_headers: list[tuple[str, str]] | None = None,
        relay_body: RelayBody[Dest] | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        self.request = request
        self.upstream = upstream
        self.settings = settings
        self.server: InviteServer[Dest] = InviteServer(upstream, upstream_reliable)
        self.branches: dict[str, Branch[Dest]] = {}
        self._via_for = via_for
        self._record_route = record_route
        self._extra = extra_headers or []
        self._relay_body = relay_body
        self._authorize = authorize
        self.ring_deadline: float | None = now + settings.ring_timeout
        self.answered: Branch[Dest] | None = None
        self.final_sent = False
        self._responses: list[Response] = []
        self.held: Response | None = None
        self._buried = False
        # Every branch id is this prefix, a dot and the branch's number in the order they
        # were made: a finished fork is found by its prefix, its branches by their number.
        self.prefix = "z9hG4bK" + new_tag()
        self._made = 0

    # -- start --------------------------------------------------------------------------------
    def start(self, targets: list[Target[Dest]], now: float, *, trying_sent: bool = False) -> list[ForkAction[Dest]]:
        """Our 100 Trying and the branches' INVITEs.  `trying_sent`: the caller already
        had a 100 (while a media worker was found), so the transaction only keeps it for
        the INVITE's retransmissions and it is not sent twice."""
        actions: list[ForkAction[Dest]] = []
        trying = make_response(self.request, 100, "Trying")
        sent = self._up(self.server.respond(trying, now))
        if not trying_sent:
            actions += sent
        for target in targets:
            branch_id = self._new_branch_id()
            outgoing = self._branch_request(target, branch_id)
            tx: InviteClient[Dest] = InviteClient(outgoing, target.dest, target.reliable, now)
            self.branches[branch_id] = Branch(target, tx)
            actions += self._up(tx.start())
        return actions

    def _new_branch_id(self) -> str:
        branch_id = f"{self.prefix}.{self._made}"
        self._made += 1
        return branch_id

    def _branch_request(self, target: Target[Dest], branch_id: str) -> Request:
        """§16.6: a copy with the device's Contact as Request-URI, our Via, Record-Route."""
        src = self.request
        headers: list[tuple[str, str]] = [("Via", self._via_for(target, branch_id))]
        for entry in src.headers:
            name = entry[0]
            if name in ("Proxy-Authorization", "Route") or name.startswith(INTERNAL_PREFIX):
                # Our credentials are consumed here, the Route pointed at us, and internal
                # headers are ours to set: never relayed from outside.
                continue
            if name == "Max-Forwards":
                entry = (name, str(max(0, int(entry[1]) - 1)))
            headers.append(entry)  # the caller's own tuple: the branches' skeletons share them
        if src.get("Max-Forwards") is None:
            headers.append(("Max-Forwards", "69"))
        if self._record_route is not None:
            headers.insert(1, ("Record-Route", self._record_route(target)))
        headers.extend(self._extra)
        body = src.body if self._relay_body is None else self._relay_body(src, self.upstream, target.dest)
        return Request("INVITE", target.uri, headers, body)

    # -- events ------------------------------------------------------------------------------
    def on_response(self, branch_id: str, response: Response, now: float) -> list[ForkAction[Dest]]:
        branch = self.branches.get(branch_id)
        if branch is None:
            return []
        try:
            method = response.cseq[1]
        except SipSyntaxError:
            return []
        if method != "INVITE":
            return []  # the 200 to our CANCEL shares the INVITE's branch; it is not the INVITE's (§17.1.3)
        actions: list[ForkAction[Dest]] = []
        for action in branch.tx.on_response(response, now):
            if isinstance(action, PassUp):
                actions += self._handle(branch, action.response, now)
            elif isinstance(action, Send):
                actions.append(action)
        return actions

    def _handle(self, branch: Branch[Dest], response: Response, now: float) -> list[ForkAction[Dest]]:
        status = response.status
        binding = branch.target.binding_id
        actions: list[ForkAction[Dest]] = []
        if status < 200:
            if branch.state is BranchState.TRYING:
                if branch.cancel_wanted is not None:
                    actions += self._send_cancel(branch, branch.cancel_wanted, now)
                    return actions
                if status > 100 and not branch.cancelled:
                    branch.state = BranchState.RINGING
                    actions.append(ForkEvent("ringing", binding))
            if status > 100 and not self.final_sent and not branch.cancelled:
                actions += self._up(self.server.respond(self._relayed(branch, response), now))
            return actions
        if status < 300:
            if self.answered is None and not self.final_sent:
                branch.state = BranchState.ANSWERED
                self.answered = branch
                branch.answer = response
                self.final_sent = True
                self.ring_deadline = None
                actions.append(ForkEvent("answered", binding))
                actions += self._up(self.server.respond(self._relayed(branch, response), now))
                actions += self._cancel_others(branch, ANSWERED_ELSEWHERE, now)
                self._slim()
            elif self.answered is branch:
                actions += self._up(self.server.respond(self._relayed(branch, response), now))  # 2xx again
            elif branch.state is not BranchState.ANSWERED:
                branch.state = BranchState.ANSWERED
                actions += self._hang_up_loser(branch, response)
                actions.append(ForkEvent("stopped", binding))
            elif branch.loser_ack is not None:
                actions.append(Send(branch.loser_ack, branch.target.dest))  # §13.2.2.4: ACK each 2xx
            return actions
        # 3xx-6xx: this branch is over.
        if status in (401, 407) and self._authorize is not None:
            retry = self._retry_authorized(branch, response, now)
            if retry is not None:
                return retry
            # A second challenge: the credentials were refused; no 401/407 goes upstream,
            # where nobody has them (a caller would only answer it with its own).
            response = Response(403, "Forbidden (the provider refused the credentials)",
                                [(n, v) for n, v in response.headers
                                 if n not in ("WWW-Authenticate", "Proxy-Authenticate")], b"")
        was_ringing = branch.state is BranchState.RINGING
        branch.state = BranchState.FAILED
        if was_ringing or not branch.cancelled:
            actions.append(ForkEvent("stopped", binding))
        if branch.cancelled and status == 487:
            pass
        else:
            self._responses.append(response)
        if (self.settings.decline_all and status in DECLINE_CODES and not self.final_sent
                and self.answered is None):
            actions += self._cancel_others(branch, f"SIP;cause={status}", now)
            actions += self._final(make_upstream_failure(self.request, response), now)
            return actions
        actions += self._maybe_finish(now)
        return actions

    def _retry_authorized(self, branch: Branch[Dest], challenge: Response,
                          now: float) -> list[ForkAction[Dest]] | None:
        """A challenge to a branch's INVITE: the same INVITE again with credentials, as a
        new branch (new Via branch, CSeq one up, same Call-ID and From tag; the challenge
        itself was ACKed by the branch's transaction). None when it cannot be answered."""
        if branch.authorized or branch.cancelled or self.final_sent or self._authorize is None:
            return None
        old = branch.tx.request
        credentials = self._authorize(old, challenge)
        if credentials is None:
            return None
        branch.state = BranchState.FAILED
        branch_id = self._new_branch_id()
        headers: list[tuple[str, str]] = []
        via_done = False
        for name, value in old.headers:
            if name in ("Authorization", "Proxy-Authorization"):
                continue
            if name == "Via" and not via_done:
                value, via_done = self._via_for(branch.target, branch_id), True
            elif name == "CSeq":
                value = f"{old.cseq[0] + 1} INVITE"
            headers.append((name, value))
        headers.append(credentials)
        request = Request("INVITE", old.uri, headers, old.body)
        tx: InviteClient[Dest] = InviteClient(request, branch.target.dest, branch.target.reliable, now)
        retry = Branch(branch.target, tx)
        retry.authorized = True
        self.branches[branch_id] = retry
        return self._up(tx.start())

    def finish(self, now: float, response: Response | None = None) -> list[ForkAction[Dest]]:
        """After "exhausted": send the held final response (or `response`) upstream."""
        if self.final_sent:
            return []
        final = response or self.held or make_response(self.request, 480, "Temporarily Unavailable")
        self.settings.hold_final = False
        return self._final(final, now)

    def retarget(self, targets: list[Target[Dest]], now: float, settings: ForkSettings,
                 extra_headers: list[tuple[str, str]], *, authorize: Authorize | None = None,
                 relay_body: RelayBody[Dest] | None = None) -> list[ForkAction[Dest]]:
        """After "exhausted": ring new targets for the same upstream transaction (call
        forwarding); the old branches are cancelled, their answers forgotten."""
        if self.final_sent:
            return []
        actions = self._cancel_others(None, None, now)
        self.held = None
        self._responses = []
        self.settings = settings
        self.ring_deadline = now + settings.ring_timeout
        self._extra = [*self._extra, *extra_headers]
        if authorize is not None:
            self._authorize = authorize
        if relay_body is not None:
            self._relay_body = relay_body
        for target in targets:
            branch_id = self._new_branch_id()
            tx: InviteClient[Dest] = InviteClient(self._branch_request(target, branch_id), target.dest,
                                                  target.reliable, now)
            self.branches[branch_id] = Branch(target, tx)
            actions += self._up(tx.start())
        if not targets:
            actions += self.finish(now)
        return actions

    def cancel(self, now: float, reason: str | None = None) -> list[ForkAction[Dest]]:
        """The caller CANCELled: cancel every branch and answer the INVITE with 487."""
        if self.final_sent:
            return []
        self.settings.hold_final = False
        actions = self._cancel_others(None, reason, now)
        actions += self._final(make_response(self.request, 487, "Request Terminated"), now)
        return actions

    def on_ack(self, now: float) -> list[ForkAction[Dest]]:
        return self._up(self.server.on_ack(now))

    def on_request_retransmission(self) -> list[ForkAction[Dest]]:
        return self._up(self.server.on_retransmission())

    # -- timers ---------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        if self._buried:
            return None  # a `FinishedFork` took over: nothing of this one runs again
        times = [t for t in (self.ring_deadline, self.server.next_deadline()) if t is not None]
        times += [t for b in self.branches.values() if (t := b.tx.next_deadline()) is not None]
        return min(times) if times else None

    def on_timer(self, now: float) -> list[ForkAction[Dest]]:
        actions: list[ForkAction[Dest]] = []
        if self.ring_deadline is not None and now >= self.ring_deadline:
            self.ring_deadline = None
            if not self.final_sent:
                actions += self._cancel_others(None, None, now)
                actions += self._final(make_response(self.request, 480, "Temporarily Unavailable (no answer)"), now)
        for branch in list(self.branches.values()):
            if (deadline := branch.tx.next_deadline()) is not None and now >= deadline:
                for action in branch.tx.on_timer(now):
                    if isinstance(action, TimedOut):
                        actions += self._branch_timed_out(branch, now)
                    elif isinstance(action, Send):
                        actions.append(action)
        if (deadline := self.server.next_deadline()) is not None and now >= deadline:
            actions += self._up([a for a in self.server.on_timer(now) if isinstance(a, Send)])
        return actions

    def _branch_timed_out(self, branch: Branch[Dest], now: float) -> list[ForkAction[Dest]]:
        if branch.state in (BranchState.FAILED, BranchState.ANSWERED):
            return []
        branch.state = BranchState.FAILED
        actions: list[ForkAction[Dest]] = [ForkEvent("stopped", branch.target.binding_id)]
        if not branch.cancelled:
            self._responses.append(make_response(self.request, 408, "Request Timeout"))
        return actions + self._maybe_finish(now)

    def take_answer(self) -> Response | None:
        """The 2xx that won, handed over once: the fork itself never needs it again."""
        branch = self.answered
        if branch is None:
            return None
        answer, branch.answer = branch.answer, None
        return answer

    @property
    def done(self) -> bool:
        """Nothing left to do: final sent and every transaction has ended."""
        return self._buried or (self.final_sent and self.server.done and self.ring_deadline is None
                                and all(b.tx.done for b in self.branches.values()))

    def finished(self) -> FinishedFork[Dest] | None:
        """The final is sent and no transaction has anything left to send by itself (the
        server transaction Accepted or Confirmed, each branch's Accepted or Completed): the
        few values the rest of their linger needs, as a `FinishedFork`, and this fork lets
        go of everything. None while anything still runs (a retransmitted final upstream,
        a branch that has not answered its CANCEL, a held final)."""
        if self._buried or not self.final_sent or self.ring_deadline is not None:
            return None
        server = self.server
        if server.state not in _SERVER_LINGERING:
            return None
        until = server.next_deadline()
        request = self.request
        from_, call_id, cseq = request.get("From"), request.get("Call-ID"), request.cseq[0]
        remains: list[Remains[Dest]] = []
        for number, (branch_id, branch) in enumerate(self.branches.items()):
            tx = branch.tx
            state = tx.state
            if state not in _CLIENT_LINGERING or branch_id != f"{self.prefix}.{number}":
                return None
            deadline = tx.next_deadline()
            if deadline is not None and (until is None or deadline > until):
                until = deadline
            remains.append(self._remains(branch_id, branch, from_, call_id))
        if until is None:
            return None  # everything is over: `done`
        # What is left of this one waits in the timer wheel only until its next entry there
        # falls due (a retransmission time, <= 0.5 s): empty.
        self._buried = True
        self.branches = {}
        self.answered = None
        self.request = _NOTHING
        relay_body, self._relay_body = self._relay_body, None
        return FinishedFork(self.prefix, self.upstream, relay_body, cseq, from_, call_id, tuple(remains), until)

    def _remains(self, branch_id: str, branch: Branch[Dest], from_: str | None,
                 call_id: str | None) -> Remains[Dest]:
        tx = branch.tx
        dest = branch.target.dest
        req = tx.request
        if tx.state is State.TERMINATED:
            return Remains(dest, OVER, 0)
        seq = req.cseq[0]
        if tx.state is State.ACCEPTED:
            if branch is self.answered:
                return Remains(dest, WON, seq)
            return Remains(dest, LOST, seq, ack=branch.loser_ack or b"")
        # Completed: each retransmission of its final is ACKed again (Timer D), with the
        # ACK `ack_for` built; from its values (our Via as a pattern the branch id goes
        # into: one string for every branch sent the same way), or whole when they are
        # not the fork's.
        to = tx.final_to or req.get("To") or ""
        via, routes = req.get("Via"), req.get_all("Route")
        head, found, tail = (via or "").partition(branch_id)
        if (not found or "\0" in head or "\0" in tail or routes or req.get("From") != from_
                or req.get("Call-ID") != call_id):
            return Remains(dest, FAILED, seq, ack=build_ack(
                req.uri, via, req.get("From"), req.get("Call-ID"), to, seq, routes).to_bytes())
        return Remains(dest, FAILED, seq, req.uri, sys.intern(f"{head}\0{tail}"), to)

    # -- helpers ---------------------------------------------------------------------------------
    def _relayed(self, branch: Branch[Dest], response: Response) -> Response:
        return relay_upstream(response, branch.tx.request.cseq[0], self.request.cseq[0], self._relay_body,
                        branch.target.dest, self.upstream)

    def _maybe_finish(self, now: float) -> list[ForkAction[Dest]]:
        if self.final_sent or any(
            b.state in (BranchState.TRYING, BranchState.RINGING) for b in self.branches.values()
        ):
            return []
        best = best_response(self._responses)
        if best is None:
            final = make_response(self.request, 480, "Temporarily Unavailable")
        else:
            final = make_upstream_failure(self.request, best)
        return self._final(final, now)

    def _final(self, response: Response, now: float) -> list[ForkAction[Dest]]:
        if self.settings.hold_final:
            if self.held is not None:
                return []  # exhausted already: the owner decides
            self.held = response
            self.ring_deadline = None
            return [ForkEvent("exhausted", status=response.status)]
        self.held = None
        self.final_sent = True
        self.ring_deadline = None
        actions = [ForkEvent("failed", status=response.status), *self._up(self.server.respond(response, now))]
        self._slim()
        return actions

    def _slim(self) -> None:
        """The final is sent: keep only what the rest needs until `finished()` (answer
        retransmissions, ACK or CANCEL a branch, BYE a late 2xx), not each branch's whole
        INVITE and every failure response."""
        self.request = self.request.skeleton()
        self._responses.clear()
        self._extra = []
        self._record_route = None  # no branch starts after the final: these only made them
        self._authorize = None
        for branch in self.branches.values():
            branch.tx.request = branch.tx.request.skeleton()

    def _cancel_others(self, keep: Branch[Dest] | None, reason: str | None, now: float) -> list[ForkAction[Dest]]:
        actions: list[ForkAction[Dest]] = []
        for branch in self.branches.values():
            if branch is keep or branch.cancelled:
                continue
            if branch.state is BranchState.RINGING:
                actions += self._send_cancel(branch, reason, now)
                actions.append(ForkEvent("stopped", branch.target.binding_id))
            elif branch.state is BranchState.TRYING:
                # §9.1: no CANCEL before a provisional response; send it when one comes.
                branch.cancel_wanted = reason or ""
                branch.cancelled = True
        return actions

    def _send_cancel(self, branch: Branch[Dest], reason: str | None, now: float) -> list[ForkAction[Dest]]:
        branch.cancelled = True
        branch.cancel_wanted = None
        branch.tx.cancel_sent(now)  # a device that never answers the CANCEL must not keep the fork alive
        req = branch.tx.request
        headers = [(n, req.get(n) or "") for n in ("Via", "From", "To", "Call-ID")]
        headers.append(("CSeq", f"{req.cseq[0]} CANCEL"))
        headers.extend(("Route", r) for r in req.get_all("Route"))
        headers.append(("Max-Forwards", "70"))
        if reason:
            headers.append(("Reason", reason))
        cancel = Request("CANCEL", req.uri, headers)
        return [SendRequest(cancel, branch.target.dest, branch.target.reliable)]

    def _hang_up_loser(self, branch: Branch[Dest], response: Response) -> list[ForkAction[Dest]]:
        """A 2xx that lost the race: ACK it and BYE it ourselves."""
        req = branch.tx.request
        try:
            target = str(parse_name_addr(response.get("Contact") or "").uri)
        except ValueError:
            target = req.uri
        seq = req.cseq[0]
        base = [("From", req.get("From") or ""), ("To", response.get("To") or ""),
                ("Call-ID", req.call_id), ("Max-Forwards", "70")]
        via = self._via_for(branch.target, "z9hG4bK" + new_tag() + new_tag())
        ack = Request("ACK", target, [("Via", via), *base, ("CSeq", f"{seq} ACK")])
        bye_via = self._via_for(branch.target, "z9hG4bK" + new_tag() + new_tag())
        bye = Request("BYE", target, [("Via", bye_via), *base, ("CSeq", f"{seq + 1} BYE"),
                                      ("Reason", ANSWERED_ELSEWHERE)])
        dest, reliable = branch.target.dest, branch.target.reliable
        branch.loser_ack = ack.to_bytes()
        return [Send(branch.loser_ack, dest), SendRequest(bye, dest, reliable)]

    def _up(self, actions: list[Send[Dest] | PassUp | TimedOut]) -> list[ForkAction[Dest]]:
        return [a for a in actions if isinstance(a, Send)]


_NOTHING = Request("INVITE", "", [])
WON, LOST, FAILED, OVER = 0, 1, 2, 3
"""What a branch of a finished fork was: the answer (its 2xx again goes upstream), a 2xx
that lost the race (ACKed again), a failure (its final ACKed again), or over."""
_SERVER_LINGERING = frozenset({State.ACCEPTED, State.CONFIRMED, State.TERMINATED})  # Completed retransmits
_CLIENT_LINGERING = frozenset({State.ACCEPTED, State.COMPLETED, State.TERMINATED})


class Remains(NamedTuple, Generic[Dest]):
    """What one branch's transaction still needs for the rest of its linger (RFC 6026's
    Timer L after a 2xx, Timer D after a non-2xx): no request, no response."""

    dest: Dest
    kind: int
    cseq: int
    uri: str = ""  # FAILED: the ACK's Request-URI, Via and To (From and Call-ID are the fork's)
    via: str = ""  # our Via with NUL where the branch id goes
    to: str = ""
    ack: bytes = b""  # LOST: the ACK of its 2xx; FAILED: the whole ACK when its values are not the fork's


class FinishedFork(Generic[Dest]):
    """A fork whose final answer is sent and whose transactions only linger (until
    `until`, 64*T1 after the last of them ended): it answers what may still come exactly as
    the `Fork` would have, from a few values. A retransmitted 2xx of the answering branch
    goes upstream again (RFC 6026 Accepted); a retransmitted final of a cancelled or failed
    branch is ACKed again, and a 2xx that lost the race too (§13.2.2.4). A retransmitted
    INVITE, its ACK or a CANCEL are absorbed by its owner, who keeps its key until then."""

    __slots__ = ("branches", "call_id", "cseq", "from_", "key", "prefix", "relay_body", "until", "upstream")

    def __init__(self, prefix: str, upstream: Dest, relay_body: RelayBody[Dest] | None, cseq: int,
                 from_: str | None, call_id: str | None, branches: tuple[Remains[Dest], ...], until: float) -> None:
        self.prefix = prefix
        """What every branch id of the fork starts with; a dot and the branch's number follow."""
        self.key: str | None = None
        """The owner's: the INVITE's server transaction key, while it absorbs retransmissions."""
        self.upstream = upstream
        self.relay_body = relay_body
        self.cseq = cseq
        self.from_ = from_
        self.call_id = call_id
        self.branches = branches
        self.until = until

    def index(self, branch_id: str) -> int | None:
        """The number of one of its branches from its id; None if it is not one of them."""
        prefix, _, number = branch_id.rpartition(".")
        if prefix != self.prefix or not number.isascii() or not number.isdigit() or len(number) > 4:
            return None
        index = int(number)
        return index if index < len(self.branches) and str(index) == number else None

    def on_response(self, branch_id: str, response: Response) -> list[Send[Dest]]:
        index = self.index(branch_id)
        if index is None:
            return []
        remains = self.branches[index]
        try:
            method = response.cseq[1]
        except SipSyntaxError:
            return []
        if method != "INVITE":
            return []  # the 200 to our CANCEL shares the INVITE's branch
        status = response.status
        kind = remains.kind
        if 200 <= status < 300:
            if kind == WON:
                upstream = self.upstream
                relayed = relay_upstream(response, remains.cseq, self.cseq, self.relay_body, remains.dest, upstream)
                return [Send(relayed.to_bytes(), upstream)]
            if kind == LOST and remains.ack:
                return [Send(remains.ack, remains.dest)]
            return []
        if status >= 300 and kind == FAILED:
            data = remains.ack or build_ack(remains.uri, remains.via.replace("\0", branch_id), self.from_,
                                            self.call_id, remains.to, remains.cseq).to_bytes()
            return [Send(data, remains.dest)]
        return []


def relay_upstream(response: Response, sent_cseq: int, caller_cseq: int, relay_body: RelayBody[Dest] | None,
                   source: Dest, upstream: Dest) -> Response:
    """A branch's provisional or 2xx response as it goes upstream (§16.7 step 9), from a
    live fork or a finished one: a branch re-sent with credentials had its own CSeq, and
    the caller gets its own back."""
    relayed = _upstream(response)
    if sent_cseq != caller_cseq:
        relayed.set("CSeq", f"{caller_cseq} INVITE")
    if relay_body is not None:
        relayed.body = relay_body(response, source, upstream)
    return relayed


def _upstream(response: Response) -> Response:
    """A downstream response as relayed upstream: our Via removed (§16.7 step 9), and no
    internal header."""
    headers = [(n, v) for n, v in response.headers if not n.startswith(INTERNAL_PREFIX)]
    for i, (name, _) in enumerate(headers):
        if name == "Via":
            del headers[i]
            break
    return Response(response.status, response.reason, headers, response.body)


def make_upstream_failure(request: Request, chosen: Response) -> Response:
    """The chosen final response, re-based on the caller's request (its Vias and To)."""
    relayed = _upstream(chosen)
    keep = [(n, v) for n, v in relayed.headers if n not in ("Via", "From", "Call-ID", "CSeq")]
    to_value = chosen.get("To") or ""
    tag = None
    if ";tag=" in to_value:
        tag = to_value.split(";tag=", 1)[1].split(";", 1)[0]
    response = make_response(request, chosen.status, chosen.reason, to_tag=tag,
                             headers=[(n, v) for n, v in keep if n != "To"])
    return response


def best_response(responses: list[Response]) -> Response | None:
    """§16.7 step 6: any 6xx wins; else the lowest class; a real answer beats a timeout.

    Within a class, 408 (a device that never answered) and 487 rank last, so a 486 from a
    busy device beats a silent one.
    """
    if not responses:
        return None
    six = [r for r in responses if r.status >= 600]
    if six:
        return six[0]

    def rank(r: Response) -> tuple[int, int]:
        weak = 1 if r.status in (408, 487, 480) else 0
        return (r.status // 100, weak)

    best = min(responses, key=rank)
    if best.status == 503:
        return Response(500, "Server Internal Error", best.headers, b"")  # §16.7 step 6
    return best

