"""Digest gate for requests from devices: challenge, verify, throttle (sans-I/O).

REGISTER is challenged with 401/WWW-Authenticate, INVITE and other requests with
407/Proxy-Authenticate (RFC 3261 §22). Unknown users and wrong passwords get the same
answer, after the same work, so a scanner cannot tell which numbers exist.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from appliance.sip.auth import ALGORITHMS, NonceManager, Verdict, challenge_values, find_credentials, verify
from appliance.sip.message import Request, Response, make_response
from appliance.sip.throttle import FailureThrottle


class Outcome(Enum):
    ACCEPTED = "accepted"
    CHALLENGED = "challenged"
    REFUSED = "refused"


class AuthResult(NamedTuple):
    outcome: Outcome
    response: Response | None = None
    blocked_for: float | None = None  # set when this failure started a cool-off


_ACCEPTED = AuthResult(Outcome.ACCEPTED)  # immutable, so one instance serves every request


class Authenticator:
    def __init__(
        self, realm: str, nonces: NonceManager, throttle: FailureThrottle,
        algorithms: tuple[str, ...] = ALGORITHMS,
    ) -> None:
        self.realm = realm
        self.nonces = nonces
        self.throttle = throttle
        self.algorithms = algorithms  # offered in this order, and the only ones accepted

    def check(
        self, request: Request, user: str, password: str | None, source: str, now: float,
        *, proxy: bool = False, offer: tuple[str, ...] | None = None,
    ) -> AuthResult:
        """Decide on one request claiming to be `user` (password None: no such user).

        `offer`: the challenges for this device (default: every algorithm configured);
        any configured algorithm is accepted in an answer.
        """
        header = "Proxy-Authorization" if proxy else "Authorization"
        credentials = find_credentials(request.get_all(header), self.realm)
        if credentials is None:
            return AuthResult(Outcome.CHALLENGED, self.challenge(request, user, now, proxy=proxy, offer=offer))
        verdict = verify(
            credentials, expected_user=user, password=password, realm=self.realm,
            method=request.method, nonces=self.nonces, now=now, algorithms=self.algorithms,
        )
        if verdict is Verdict.OK:
            self.throttle.record_success(source, now)
            return _ACCEPTED
        if verdict is Verdict.STALE:
            return AuthResult(
                Outcome.CHALLENGED, self.challenge(request, user, now, proxy=proxy, stale=True, offer=offer)
            )
        if verdict is Verdict.MISSING:
            return AuthResult(Outcome.CHALLENGED, self.challenge(request, user, now, proxy=proxy, offer=offer))
        blocked = self.throttle.record_failure(source, now)
        response = make_response(request, 403, "Forbidden (authentication failed)")
        return AuthResult(Outcome.REFUSED, response, blocked)

    def challenge(
        self, request: Request, user: str, now: float, *, proxy: bool = False, stale: bool = False,
        offer: tuple[str, ...] | None = None,
    ) -> Response:
        nonce = self.nonces.issue(user, now)
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        values = challenge_values(self.realm, nonce, stale=stale, algorithms=offer or self.algorithms)
        status = 407 if proxy else 401
        return make_response(request, status, None, headers=[(name, v) for v in values])
