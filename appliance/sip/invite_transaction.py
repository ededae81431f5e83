"""RFC 3261 §17 INVITE transactions (with RFC 6026's Accepted state), sans-I/O.

Each transaction is a small state machine fed with messages and `now`; it returns actions
(bytes to send, responses to pass up) and exposes `next_deadline()` so one timer in the
edge can drive thousands of them. Over TCP nothing is retransmitted and the linger timers
(D, I) are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Generic, NamedTuple, TypeVar

from appliance.sip.message import Request, Response
from appliance.sip.transaction import T1, T2, T4

Dest = TypeVar("Dest")

TIMER_B = 64 * T1  # INVITE client: give up
TIMER_D_UDP = 32.0  # INVITE client: absorb retransmitted final responses
TIMER_H = 64 * T1  # INVITE server: wait for ACK of a non-2xx final
TIMER_L = 64 * T1  # RFC 6026: linger after 2xx


class State(Enum):
    CALLING = "calling"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


class Send(NamedTuple, Generic[Dest]):
    # A NamedTuple: see transaction.Retransmit.
    data: bytes
    dest: Dest


class PassUp(NamedTuple):
    """A response the transaction user must see (provisional, 2xx, first final non-2xx)."""

    response: Response


@dataclass(frozen=True, slots=True)
class TimedOut:
    """Timer B fired (client) or Timer H fired without ACK (server)."""


Action = Send[Dest] | PassUp | TimedOut


def ack_for(request: Request, response: Response | str) -> Request:
    """The ACK a client transaction sends for a non-2xx final response (§17.1.1.3);
    `response` may be given as just its To value, the one thing the ACK takes from it."""
    to = response if isinstance(response, str) else response.get("To")
    return build_ack(request.uri, request.get("Via"), request.get("From"), request.get("Call-ID"),  # top Via: ours
                     to or request.get("To") or "", request.cseq[0], request.get_all("Route"))


def build_ack(uri: str, via: str | None, from_: str | None, call_id: str | None, to: str, seq: int,
              routes: list[str] | tuple[str, ...] = ()) -> Request:
    """`ack_for` from the few values it takes: what a finished fork keeps of a branch to
    ACK its retransmitted final response (`proxy.FinishedFork`), byte for byte the same."""
    headers: list[tuple[str, str]] = []
    for name, value in (("Via", via), ("From", from_), ("Call-ID", call_id)):
        if value is not None:
            headers.append((name, value))
    headers.append(("To", to))
    headers.append(("CSeq", f"{seq} ACK"))
    headers.extend(("Route", r) for r in routes)
    headers.append(("Max-Forwards", "70"))
    return Request("ACK", uri, headers)


class InviteClient(Generic[Dest]):
    """An INVITE sent by us (a forked branch), retransmitted over UDP until answered."""

    __slots__ = ("_ack_to", "_deadline", "_interval", "_retransmit_at", "data", "dest", "reliable", "request",
                 "state")

    def __init__(self, request: Request, dest: Dest, reliable: bool, now: float) -> None:
        self.request = request
        self.data = request.to_bytes()
        self.dest = dest
        self.reliable = reliable
        self.state = State.CALLING
        self._interval = T1
        self._retransmit_at: float | None = None if reliable else now + T1
        self._deadline: float | None = now + TIMER_B
        # The To of the non-2xx final (with its tag): the ACK is rebuilt from it for each
        # retransmitted final (rare), not kept as bytes for the 32 s of Timer D.
        self._ack_to: str | None = None

    def start(self) -> list[Action[Dest]]:
        return [Send(self.data, self.dest)]

    def on_response(self, response: Response, now: float) -> list[Action[Dest]]:
        status = response.status
        if self.state in (State.CALLING, State.PROCEEDING):
            self.data = b""  # never retransmitted once answered (§17.1.1.2): not kept while it rings
            if status < 200:
                self.state = State.PROCEEDING
                self._retransmit_at = None
                self._deadline = None  # Timer C (the proxy's ring timeout) takes over
                return [PassUp(response)]
            if status < 300:
                self.state = State.ACCEPTED
                self._retransmit_at = None
                self._deadline = now + TIMER_L
                return [PassUp(response)]
            self.state = State.COMPLETED
            self._retransmit_at = None
            self._ack_to = response.get("To") or ""
            self._deadline = now + (0.0 if self.reliable else TIMER_D_UDP)
            return [Send(ack_for(self.request, self._ack_to).to_bytes(), self.dest), PassUp(response)]
        if self.state is State.ACCEPTED and 200 <= status < 300:
            return [PassUp(response)]  # retransmitted 2xx: the proxy forwards it again
        if self.state is State.COMPLETED and status >= 300 and self._ack_to is not None:
            return [Send(ack_for(self.request, self._ack_to).to_bytes(), self.dest)]
        return []

    @property
    def final_to(self) -> str | None:
        """The To (with its tag) of the non-2xx final this transaction ACKed (Completed)."""
        return self._ack_to

    def cancel_sent(self, now: float) -> None:
        """A CANCEL went out for this INVITE: end it if no final response comes in 64*T1 (§9.1)."""
        if self.state is State.PROCEEDING:
            self._deadline = now + TIMER_B

    def next_deadline(self) -> float | None:
        candidates = [t for t in (self._retransmit_at, self._deadline) if t is not None]
        return min(candidates) if candidates else None

    def on_timer(self, now: float) -> list[Action[Dest]]:
        actions: list[Action[Dest]] = []
        if self._deadline is not None and now >= self._deadline:
            previous = self.state
            self.state = State.TERMINATED
            self._deadline = self._retransmit_at = None
            if previous in (State.CALLING, State.PROCEEDING):
                actions.append(TimedOut())
            return actions
        if self._retransmit_at is not None and now >= self._retransmit_at:
            self._interval *= 2  # Timer A doubles without the T2 cap (§17.1.1.2)
            self._retransmit_at = now + self._interval
            actions.append(Send(self.data, self.dest))
        return actions

    @property
    def done(self) -> bool:
        return self.state is State.TERMINATED


class InviteServer(Generic[Dest]):
    """An INVITE received by us: answers retransmissions, retransmits non-2xx finals."""

    __slots__ = ("_deadline", "_interval", "_retransmit_at", "dest", "final_status", "last_response", "reliable",
                 "state")

    def __init__(self, dest: Dest, reliable: bool) -> None:
        self.dest = dest
        self.reliable = reliable
        self.state = State.PROCEEDING
        self.last_response: bytes | None = None
        self.final_status: int | None = None
        self._interval = T1
        self._retransmit_at: float | None = None
        self._deadline: float | None = None

    def respond(self, response: Response, now: float) -> list[Action[Dest]]:
        if self.state not in (State.PROCEEDING, State.ACCEPTED):
            return []
        data = response.to_bytes()
        status = response.status
        if self.state is State.ACCEPTED:
            # Only further 2xx (other To-tags, or retransmissions) pass in Accepted.
            return [Send(data, self.dest)] if 200 <= status < 300 else []
        self.last_response = data
        if status >= 200:
            self.final_status = status
        if 200 <= status < 300:
            self.state = State.ACCEPTED
            self._deadline = now + TIMER_L
            self.last_response = None  # Accepted answers no retransmission (RFC 6026): not kept 32 s
        elif status >= 300:
            self.state = State.COMPLETED
            self._deadline = now + TIMER_H
            if not self.reliable:
                self._retransmit_at = now + T1
        return [Send(data, self.dest)]

    def on_retransmission(self) -> list[Action[Dest]]:
        if self.state in (State.PROCEEDING, State.COMPLETED) and self.last_response is not None:
            return [Send(self.last_response, self.dest)]
        return []

    def on_ack(self, now: float) -> list[Action[Dest]]:
        if self.state is State.COMPLETED:
            self.state = State.CONFIRMED
            self._retransmit_at = None
            self._deadline = now + (0.0 if self.reliable else T4)
        return []

    def next_deadline(self) -> float | None:
        candidates = [t for t in (self._retransmit_at, self._deadline) if t is not None]
        return min(candidates) if candidates else None

    def on_timer(self, now: float) -> list[Action[Dest]]:
        if self._deadline is not None and now >= self._deadline:
            timed_out = self.state is State.COMPLETED
            self.state = State.TERMINATED
            self._deadline = self._retransmit_at = None
            return [TimedOut()] if timed_out else []
        if self._retransmit_at is not None and now >= self._retransmit_at and self.last_response:
            self._interval = min(self._interval * 2, T2)
            self._retransmit_at = now + self._interval
            return [Send(self.last_response, self.dest)]
        return []

    @property
    def done(self) -> bool:
        return self.state is State.TERMINATED
