"""Registration to a telephone provider as a client (RFC 3261 §10.2), sans-I/O.

One `TrunkRegistration` per trunk: it builds the REGISTERs and keep-alive OPTIONS, reads
the responses, and says what to do next as actions; the edge (`edge/trunks.py`) does the
DNS and the sending and arms `next_deadline()` in the one timer wheel. Time is passed in.

- Digest: 401 and 407 are answered with the strongest challenge we support (SHA-256 over
  MD5, RFC 8760). A second challenge to credentials that answered a fresh nonce (not
  `stale=true`) means the provider refuses them: like 403 and 404 that is `rejected`,
  retried slowly (`REJECTED_RETRY`, doubling up to an hour) so the provider sees no more
  than a REGISTER pair every few minutes.
- Refresh before expiry (`refresh_delay`); timeouts, 5xx and DNS failures are retried with
  backoff (`retry_delay`, RFC 5626 §4.5 style: doubling, 50-100 % jitter, `Retry-After`
  honoured).
- Behind a home router: the address the provider saw (`received`/`rport` of our Via in
  its responses) becomes our Contact; when it changes we REGISTER again at once (the old
  Contact removed with `expires=0`). Keep-alive OPTIONS every `keepalive_interval` hold
  the router's mapping open; one that goes unanswered means the provider is gone: we say
  so and REGISTER again (its retransmissions find the provider when it is back).
- Over TCP (`transport = "tcp"`) the edge keeps one connection to the provider and says
  when it could not open it or lost it (`connection_lost`): a failure like a timeout,
  retried with the same backoff. Via and Contact say `TCP`/`;transport=tcp`, and the
  keep-alive is the RFC 5626 CRLF ping, which keeps both the connection and the router's
  mapping alive (a connection that dies is reported by the edge, not guessed from silence).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from appliance.sip.auth import authorization_value, parse_digest
from appliance.sip.headers import parse_name_addr, parse_via
from appliance.sip.message import Request, Response, new_tag
from appliance.sip.transaction import ClientTransactions, Retransmit, client_key

RETRY_BASE = 5.0
"""First retry after a timeout, 5xx or DNS failure; doubled each time."""
RETRY_MAX = 120.0
"""Longest wait between attempts while the provider is unreachable."""
REJECTED_RETRY = 300.0
"""First retry after the provider refused our credentials (403, 404, a second 401)."""
REJECTED_RETRY_MAX = 3600.0
PING = b"\r\n\r\n"
"""RFC 5626 §4.4.1 keep-alive on a connection (the provider answers with CRLF)."""
KEEPALIVE_TIMEOUT = 5.0
"""An OPTIONS keep-alive unanswered this long: the provider (or the path to it) is gone."""
REGISTER_TIMEOUT = 32.0
"""Timer F (64*T1): how long one REGISTER is retransmitted before it counts as a failure."""
MAX_ROUNDS = 4
"""Challenges, 423s and address changes answered within one attempt before giving up."""
PREFERRED_ALGORITHMS = ("SHA-256", "MD5")


class Status(Enum):
    NOT_REGISTERING = "not_registering"
    REGISTERING = "registering"
    REGISTERED = "registered"
    FAILING = "failing"
    REJECTED = "rejected"


class Target(NamedTuple):
    """Where the provider is: one resolved address (RFC 3263)."""

    transport: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class TrunkAccount:
    """What the state machine needs of a trunk's config."""

    name: str
    domain: str
    """The registrar's domain: the Request-URI, From and To (the server's host[:port])."""
    username: str
    auth_username: str
    password: str
    expires: int = 600
    keepalive_interval: int = 25


# -- actions -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Resolve:
    """Look the provider up (DNS); answer with `resolved` or `resolve_failed`."""


class Send(NamedTuple):
    data: bytes
    target: Target


@dataclass(frozen=True, slots=True)
class StatusChanged:
    status: Status
    reason: str


@dataclass(frozen=True, slots=True)
class AddressLearned:
    """The provider sees us at this address (behind NAT): now our Contact."""

    host: str
    port: int


Action = Resolve | Send | StatusChanged | AddressLearned


def retry_delay(failures: int, rand: float) -> float:
    """Wait before attempt `failures`+1 while the provider is unreachable (rand in [0, 1])."""
    full = min(RETRY_MAX, RETRY_BASE * 2.0 ** max(0, failures - 1))
    return full * (0.5 + 0.5 * rand)


def rejected_delay(rejections: int) -> float:
    """Wait after the provider refused our credentials `rejections` times in a row."""
    return min(REJECTED_RETRY_MAX, REJECTED_RETRY * 2.0 ** max(0, rejections - 1))


def refresh_delay(granted: int) -> float:
    """Refresh well before the provider forgets us: half of a short registration, else a
    minute (or a tenth of a long one) before it ends."""
    return granted - min(granted / 2, max(60.0, granted / 10))


def pick_challenge(values: list[str]) -> str | None:
    """The challenge to answer: the strongest algorithm we support, qop=auth or none."""
    best: tuple[int, str] | None = None
    for value in values:
        params = parse_digest(value)
        if params is None or "nonce" not in params or "realm" not in params:
            continue
        algorithm = params.get("algorithm", "MD5").upper()
        if algorithm not in PREFERRED_ALGORITHMS:
            continue
        if "qop" in params and "auth" not in [q.strip().lower() for q in params["qop"].split(",")]:
            continue
        rank = PREFERRED_ALGORITHMS.index(algorithm)
        if best is None or rank < best[0]:
            best = (rank, value)
    return best[1] if best is not None else None


def _format_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TrunkRegistration:
    """The registration of one trunk: a state machine driven by responses and time."""

    def __init__(self, account: TrunkAccount, *, rand: Callable[[], float] = random.random,
                 token: Callable[[], str] = new_tag) -> None:
        self.account = account
        self._rand = rand
        self._token = token
        self.status = Status.NOT_REGISTERING
        self.reason = ""
        self.since = 0.0
        self.expires_at: float | None = None
        self.next_attempt: float | None = None
        self.public: tuple[str, int] | None = None
        self._targets: list[tuple[Target, tuple[str, int]]] = []
        self._target_index = 0
        self._call_id = ""
        self._from_tag = ""
        self._cseq = 0
        self._expires = account.expires
        self._tx: ClientTransactions[Target] = ClientTransactions()
        self._register_key: str | None = None
        self._keepalive_key: str | None = None
        self._refresh_at: float | None = None
        self._keepalive_at: float | None = None
        self._failures = 0
        self._rejections = 0
        self._rounds = 0
        self._fresh_auth = False
        self._contact_in_request: tuple[str, int] | None = None
        self._registered_contact: tuple[str, int] | None = None
        self._resolving = False
        self._running = False

    # -- what the edge asks ------------------------------------------------------------------
    @property
    def target(self) -> Target | None:
        return self._targets[self._target_index][0] if self._targets else None

    def next_deadline(self) -> float | None:
        times = [t for t in (self.next_attempt, self._refresh_at, self._keepalive_at, self._tx.next_deadline())
                 if t is not None]
        return min(times) if times else None

    # -- inputs ------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        """Begin registering: look the provider up first."""
        self._running = True
        self._call_id = self._token() + self._token()
        self._from_tag = self._token()
        actions: list[Action] = [self._set_status(Status.REGISTERING, "", now)]
        return [*actions, *self._resolve()]

    def stop(self, now: float) -> list[Action]:
        """Stop: remove our registration at the provider (Expires: 0) if there is one."""
        actions: list[Action] = []
        if self.status is Status.REGISTERED and self.target is not None and self._registered_contact is not None:
            request = self._register_request(self._registered_contact, None, expires=0)
            actions.append(Send(request.to_bytes(), self.target))
        self._running = False
        self._tx = ClientTransactions()
        self._register_key = self._keepalive_key = None
        self._refresh_at = self._keepalive_at = self.next_attempt = None
        self.expires_at = None
        actions.append(self._set_status(Status.NOT_REGISTERING, "", now))
        return actions

    def disabled(self, now: float, reason: str = "register = false") -> list[Action]:
        """Nothing is sent (`register = false`, or what we cannot do yet); the TUI says why."""
        return [self._set_status(Status.NOT_REGISTERING, reason, now)]

    def resolved(self, targets: list[tuple[Target, tuple[str, int]]], now: float) -> list[Action]:
        """The provider's addresses, each with our own address towards it, best first."""
        self._resolving = False
        if not self._running:
            return []
        if not targets:
            return self.resolve_failed("no address found", now)
        self._targets = targets
        self._target_index = 0
        return self._begin_attempt(now)

    def resolve_failed(self, reason: str, now: float) -> list[Action]:
        self._resolving = False
        if not self._running:
            return []
        return self._fail(f"DNS: {reason}", now, rejected=False, reresolve=True)

    def connection_lost(self, reason: str, now: float) -> list[Action]:
        """Over TCP: the connection to the provider could not be opened, or closed. Whatever
        was waiting for an answer on it is gone: fail as on a timeout and retry with backoff
        (the next attempt opens a new connection)."""
        if not self._running or self.target is None or self.target.transport != "tcp":
            return []
        self._tx = ClientTransactions()
        self._keepalive_key = None
        self._target_index = (self._target_index + 1) % max(1, len(self._targets))
        return self._fail(reason, now, rejected=False, reresolve=self._target_index == 0)

    def on_response(self, response: Response, now: float) -> list[Action] | None:
        """A response to one of our requests (None: not ours)."""
        key = client_key(response)
        if key is None or key not in (self._register_key, self._keepalive_key):
            return None
        if self._tx.receive(response) is None:
            return []  # provisional
        if key == self._keepalive_key:
            self._keepalive_key = None
            return self._keepalive_answered(response, now)
        self._register_key = None
        return self._register_answered(response, now)

    def on_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for tx_action in self._tx.on_timer(now):
            if isinstance(tx_action, Retransmit):
                actions.append(Send(tx_action.data, tx_action.dest))
            elif tx_action.key == self._register_key:
                self._register_key = None
                self._target_index = (self._target_index + 1) % max(1, len(self._targets))
                actions += self._fail("timeout: no answer from the provider", now, rejected=False,
                                      reresolve=self._target_index == 0)
            elif tx_action.key == self._keepalive_key:
                self._keepalive_key = None
                actions += self._keepalive_lost(now)
        if self.next_attempt is not None and now >= self.next_attempt:
            self.next_attempt = None
            actions += self._resolve() if not self._targets else self._begin_attempt(now)
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            actions += self._begin_attempt(now)
        if self._keepalive_at is not None and now >= self._keepalive_at:
            self._keepalive_at = now + self.account.keepalive_interval
            if self._keepalive_key is None and self._register_key is None:
                actions += self._keepalive(now)
        return actions

    # -- REGISTER ----------------------------------------------------------------------------
    def _resolve(self) -> list[Action]:
        if self._resolving:
            return []
        self._resolving = True
        return [Resolve()]

    def _begin_attempt(self, now: float) -> list[Action]:
        self._rounds = 0
        self._fresh_auth = False
        return self._send_register(None, now)

    def _contact(self) -> tuple[str, int]:
        if self.public is not None:
            return self.public
        return self._targets[self._target_index][1]

    def _send_register(self, authorization: tuple[str, str] | None, now: float) -> list[Action]:
        target = self.target
        if target is None or self._register_key is not None:
            return []
        contact = self._contact()
        old = self._registered_contact if self._registered_contact not in (None, contact) else None
        request = self._register_request(contact, old, expires=self._expires, authorization=authorization)
        data = request.to_bytes()
        branch = parse_via(request.get("Via") or "").branch or ""
        self._register_key = self._tx.start(branch, "REGISTER", data, target, target.transport == "tcp", now,
                                            timeout=REGISTER_TIMEOUT)
        self._contact_in_request = contact
        self._keepalive_at = None
        return [Send(data, target)]

    def _register_request(self, contact: tuple[str, int], old: tuple[str, int] | None, *, expires: int,
                          authorization: tuple[str, str] | None = None) -> Request:
        account = self.account
        target = self.target
        assert target is not None
        local = self._targets[self._target_index][1]
        self._cseq += 1
        uri = f"sip:{account.domain}"
        aor = f"sip:{account.username}@{account.domain}"
        params = ";transport=tcp" if target.transport == "tcp" else ""
        contacts = [f"<sip:{account.username}@{_format_host(*contact)}{params}>;expires={expires}"]
        if old is not None:
            contacts.append(f"<sip:{account.username}@{_format_host(*old)}{params}>;expires=0")
        headers = [
            ("Via", f"SIP/2.0/{target.transport.upper()} {_format_host(*local)};branch=z9hG4bK{self._token()};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<{aor}>;tag={self._from_tag}"),
            ("To", f"<{aor}>"),
            ("Call-ID", self._call_id),
            ("CSeq", f"{self._cseq} REGISTER"),
            ("Contact", ", ".join(contacts)),
            ("Expires", str(expires)),
            ("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS"),
            ("User-Agent", "homepbx"),
        ]
        if authorization is not None:
            headers.append(authorization)
        headers.append(("Content-Length", "0"))
        return Request("REGISTER", uri, headers)

    def _register_answered(self, response: Response, now: float) -> list[Action]:
        status = response.status
        actions: list[Action] = self._learn_address(response)
        if status < 300:
            return actions + self._registered(response, now)
        if status in (401, 407) and self._rounds < MAX_ROUNDS:
            return actions + self._challenged(response, now)
        if status == 423 and self._rounds < MAX_ROUNDS:
            min_expires = response.get("Min-Expires") or ""
            if min_expires.strip().isdigit() and self._expires < int(min_expires) <= 86400:
                self._expires = int(min_expires)
                self._rounds += 1
                return actions + self._send_register(None, now)
        reason = f"{status} {response.reason}".strip()
        if status in (401, 403, 404, 407):
            return actions + self._fail(reason, now, rejected=True)
        retry_after = (response.get("Retry-After") or "").partition(";")[0].strip()
        minimum = float(retry_after) if retry_after.isdigit() else 0.0
        slow = 400 <= status < 500  # our request is wrong for this provider: no point hurrying
        return actions + self._fail(reason, now, rejected=False, slow=slow, at_least=minimum)

    def _challenged(self, response: Response, now: float) -> list[Action]:
        header, answer = ("WWW-Authenticate", "Authorization") if response.status == 401 else (
            "Proxy-Authenticate", "Proxy-Authorization")
        values = response.get_all(header)
        stale = any((parse_digest(v) or {}).get("stale", "").lower() == "true" for v in values)
        if self._fresh_auth and not stale:
            return self._fail(f"{response.status} {response.reason}: the provider refused the username or password",
                              now, rejected=True)
        challenge = pick_challenge(values)
        if challenge is None:
            return self._fail(f"{response.status}: no digest challenge we can answer (MD5, SHA-256)", now,
                              rejected=True)
        account = self.account
        try:
            value = authorization_value(challenge, username=account.auth_username, password=account.password,
                                        method="REGISTER", uri=f"sip:{account.domain}", cnonce=self._token())
        except ValueError as err:
            return self._fail(f"{response.status}: {err}", now, rejected=True)
        self._rounds += 1
        self._fresh_auth = True
        return self._send_register((answer, value), now)

    def _registered(self, response: Response, now: float) -> list[Action]:
        contact = self._contact_in_request
        if self.public is not None and contact != self.public and self._rounds < MAX_ROUNDS:
            # The provider sees us elsewhere than our Contact says: register the address it sees.
            self._registered_contact = contact
            self._rounds += 1
            return self._send_register(None, now)
        granted = self._granted(response, contact)
        if granted <= 0:
            return self._fail("200 without our Contact", now, rejected=False, slow=True)
        self._registered_contact = contact
        self._failures = self._rejections = 0
        self.expires_at = now + granted
        self._refresh_at = now + refresh_delay(granted)
        self.next_attempt = None
        interval = self.account.keepalive_interval
        self._keepalive_at = now + interval if interval else None
        return [self._set_status(Status.REGISTERED, "", now)]

    def _granted(self, response: Response, contact: tuple[str, int] | None) -> int:
        """Seconds the provider keeps our Contact: its `expires` param, else Expires."""
        header_expires = (response.get("Expires") or "").strip()
        fallback = int(header_expires) if header_expires.isdigit() else self._expires
        if contact is None:
            return fallback
        for value in response.get_all("Contact"):
            try:
                name_addr = parse_name_addr(value)
            except ValueError:
                continue
            uri = name_addr.uri
            if (uri.host or "").strip("[]") == contact[0] and (uri.port or 5060) == contact[1]:
                expires = name_addr.params.get("expires", "")
                return int(expires) if expires and expires.isdigit() else fallback
        return fallback

    def _fail(self, reason: str, now: float, *, rejected: bool, slow: bool = False, reresolve: bool = False,
              at_least: float = 0.0) -> list[Action]:
        self._register_key = None
        self._refresh_at = self._keepalive_at = None
        if rejected:
            self._rejections += 1
            delay = rejected_delay(self._rejections)
        else:
            self._failures += 1
            delay = rejected_delay(1) if slow else retry_delay(self._failures, self._rand())
        self.next_attempt = now + max(delay, at_least)
        if reresolve:
            self._targets = []
            self._target_index = 0
        status = Status.REJECTED if rejected else Status.FAILING
        if self.expires_at is not None and now >= self.expires_at:
            self.expires_at = None
        return [self._set_status(status, reason, now)]

    # -- keep-alive and the address the provider sees --------------------------------------------
    def _keepalive(self, now: float) -> list[Action]:
        target = self.target
        if target is None:
            return []
        if target.transport == "tcp":
            return [Send(PING, target)]  # no answer awaited: a dead connection is reported by the edge
        local = self._targets[self._target_index][1]
        branch = "z9hG4bK" + self._token()
        account = self.account
        request = Request("OPTIONS", f"sip:{account.domain}", [
            ("Via", f"SIP/2.0/{target.transport.upper()} {_format_host(*local)};branch={branch};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:{account.username}@{account.domain}>;tag={self._token()}"),
            ("To", f"<sip:{account.domain}>"),
            ("Call-ID", self._token() + self._token()),
            ("CSeq", "1 OPTIONS"),
            ("Content-Length", "0"),
        ])
        data = request.to_bytes()
        self._keepalive_key = self._tx.start(branch, "OPTIONS", data, target, target.transport == "tcp", now,
                                             timeout=KEEPALIVE_TIMEOUT)
        return [Send(data, target)]

    def _keepalive_answered(self, response: Response, now: float) -> list[Action]:
        actions = self._learn_address(response)
        if self._contact() != self._registered_contact and self._register_key is None:
            actions += self._begin_attempt(now)  # the router gave us a new mapping: tell the provider
        return actions

    def _keepalive_lost(self, now: float) -> list[Action]:
        """No answer to a keep-alive: say so and REGISTER again (its retransmissions reach
        the provider as soon as it is back)."""
        actions: list[Action] = [self._set_status(Status.FAILING, "provider not answering (keep-alive)", now)]
        self._refresh_at = None
        return actions + self._begin_attempt(now)

    def _learn_address(self, response: Response) -> list[Action]:
        """`received`/`rport` in our Via: where the provider sees us."""
        try:
            via = parse_via(response.get("Via") or "")
        except ValueError:
            return []
        received = via.params.get("received") or via.host.strip("[]")
        rport = via.params.get("rport") or ""
        port = int(rport) if rport.isdigit() and 0 < int(rport) < 65536 else (via.port or 5060)
        seen = (received.strip("[]"), port)
        local = self._targets[self._target_index][1] if self._targets else None
        current = self.public or local
        if seen == current:
            return []
        self.public = None if seen == local else seen
        return [AddressLearned(*seen)]

    def _set_status(self, status: Status, reason: str, now: float) -> StatusChanged:
        if status is not self.status:
            self.since = now
        self.status = status
        self.reason = reason
        return StatusChanged(status, reason)
