"""RFC 3261 §17 non-INVITE transactions, as data and timers (sans-I/O).

The server side absorbs retransmitted requests and answers them with the response already
sent, so a REGISTER retransmitted over UDP is never processed twice. The client side
retransmits a request over UDP (Timer E) until a response or Timer F, and never over TCP.
Time is passed in; `next_deadline()` and `on_timer(now)` drive the timers.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from appliance.sip.headers import MAGIC_COOKIE, parse_via
from appliance.sip.message import Request, Response

T1 = 0.5
T2 = 4.0
T4 = 5.0
TIMER_J_UDP = 64 * T1

Dest = TypeVar("Dest")


def server_key(request: Request) -> str | None:
    """Transaction key of a request (§17.2.3): branch, sent-by and method (ACK as INVITE)."""
    via = request.get("Via")
    if via is None:
        return None
    idx = via.lower().find(";branch=")  # parameter names are case-insensitive
    if idx < 0:
        return None
    branch = via[idx + 8 :].partition(";")[0].strip()
    if not branch.startswith(MAGIC_COOKIE):
        return None  # RFC 2543 peer: no reliable key, treat each request as new
    method = "INVITE" if request.method == "ACK" else request.method
    sent_by = via.partition(";")[0].rpartition(" ")[2]
    return f"{branch}|{sent_by}|{method}"


def client_key(response: Response) -> str | None:
    """Key matching a response to the client transaction that sent its top Via (§17.1.3)."""
    via = response.get("Via")
    if via is None:
        return None
    try:
        branch = parse_via(via).branch
        _, method = response.cseq
    except ValueError:
        return None
    if not branch:
        return None
    return f"{branch}|{method}"


class ServerTransactions:
    """Non-INVITE server transactions: which requests were seen, and the answer given.

    Bounded: past `capacity` entries the oldest are forgotten early, so a flood costs at
    most that much memory; a forgotten retransmission is just processed again. An entry
    with its response is ~0.8 kB, and under 500 registrations a second (1,000 requests,
    each kept Timer J = 32 s) 32,768 of them held 25 MB, most of the growth issue 10 saw.
    16,384 are 13 MB and still 16 s of retransmissions at that rate: a client retransmits
    only until it hears an answer, so after 16 s it has lost six in a row.
    """

    def __init__(self, linger: float = TIMER_J_UDP, capacity: int = 16384) -> None:
        self._linger = linger
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[float, bytes | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def receive(self, key: str, now: float) -> tuple[bool, bytes | None]:
        """(is_retransmission, response to resend if one was sent)."""
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = (now + self._linger, None)
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
            return False, None
        return True, entry[1]

    def respond(self, key: str, data: bytes, final: bool, reliable: bool, now: float) -> None:
        """Remember a response; a final one over TCP ends the transaction at once (Timer J = 0)."""
        if final and reliable:
            self._entries.pop(key, None)
            return
        self._entries[key] = (now + self._linger, data)
        self._entries.move_to_end(key)

    def expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (deadline, _) = next(iter(entries.items()))
            if deadline > now:
                break
            del entries[key]

    def next_deadline(self) -> float | None:
        for deadline, _ in self._entries.values():
            return deadline
        return None


class ClientTransaction(Generic[Dest]):
    __slots__ = ("data", "deadline", "dest", "interval", "key", "next_send", "reliable")

    def __init__(self, key: str, data: bytes, dest: Dest, reliable: bool, deadline: float) -> None:
        self.key = key
        self.data = data
        self.dest = dest
        self.reliable = reliable
        self.deadline = deadline
        self.interval = T1
        self.next_send: float | None = None


class Retransmit(NamedTuple, Generic[Dest]):
    # Generic value types are NamedTuples, plain classes otherwise: mypyc cannot build a
    # generic dataclass (mypyc/mypyc#827).
    data: bytes
    dest: Dest


@dataclass(frozen=True, slots=True)
class TimedOut:
    key: str


class ClientTransactions(Generic[Dest]):
    """Non-INVITE client transactions: Timer E retransmissions and Timer F timeout."""

    def __init__(self) -> None:
        self._live: dict[str, ClientTransaction[Dest]] = {}
        self._timers: list[tuple[float, int, str]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._live)

    def start(
        self, branch: str, method: str, data: bytes, dest: Dest, reliable: bool, now: float,
        timeout: float = 64 * T1,
    ) -> str:
        key = f"{branch}|{method}"
        tx = ClientTransaction(key, data, dest, reliable, now + timeout)
        if not reliable:
            tx.next_send = now + T1
            self._push(tx.next_send, key)
        self._push(tx.deadline, key)
        self._live[key] = tx
        return key

    def receive(self, response: Response) -> str | None:
        """The key of the transaction a final response completes, or None if it is not ours."""
        if not self._live:  # the usual case (the edge seldom sends a request of its own): no parsing
            return None
        key = client_key(response)
        if key is None or key not in self._live:
            return None
        if response.status < 200:
            self._live[key].interval = T2  # §17.1.2.2: Proceeding retransmits every T2
            return None
        del self._live[key]
        if len(self._timers) > 2 * len(self._live) + 64:
            # Each answered CANCEL or BYE left its Timer F entry (and key) for 32 s: under a
            # burst of calls those are most of the heap. Dropped here, amortised O(1).
            self.compact()
        return key

    def compact(self) -> None:
        """Only the timers of live transactions, in tables the size of what is left."""
        live = self._live
        self._timers = [entry for entry in self._timers if entry[2] in live]
        heapq.heapify(self._timers)
        self._live = dict(live)

    def next_deadline(self) -> float | None:
        while self._timers and self._timers[0][2] not in self._live:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def on_timer(self, now: float) -> list[Retransmit[Dest] | TimedOut]:
        actions: list[Retransmit[Dest] | TimedOut] = []
        while self._timers and self._timers[0][0] <= now:
            _, _, key = heapq.heappop(self._timers)
            tx = self._live.get(key)
            if tx is None:
                continue
            if now >= tx.deadline:
                del self._live[key]
                actions.append(TimedOut(key))
            elif tx.next_send is not None and now >= tx.next_send:
                actions.append(Retransmit(tx.data, tx.dest))
                tx.interval = min(tx.interval * 2, T2)
                tx.next_send = now + tx.interval
                self._push(tx.next_send, key)
        return actions

    def _push(self, when: float, key: str) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, key))
