"""The digest gate for requests from devices, and the one place its refusals are reported.

REGISTER and INVITE are both challenged here (sans-I/O `Authenticator` underneath); a
refused answer is logged, and a block it starts is logged once with its length and shown
in the TUI, whichever method caused it. Which algorithms a device is offered is learned
per device (`sip/digest_fallback.py`): SHA-256 and MD5, or MD5 alone for a device that
gives up on SHA-256.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from appliance.config import LiveConfig
from appliance.logs import fields
from appliance.sip.authenticator import Authenticator, AuthResult, Outcome
from appliance.sip.digest_fallback import DigestFallback, device_key
from appliance.sip.message import Request
from appliance.sip.registrar import Flow

log = logging.getLogger("homepbx.edge")

BlockSink = Callable[[str, float, str], None]
"""(address, seconds, reason): an address is ignored from now on for `seconds`."""


class AuthGate:
    def __init__(self, auth: Authenticator, settings: LiveConfig, on_block: BlockSink,
                 fallback: DigestFallback) -> None:
        self.auth = auth
        self.settings = settings
        self.on_block = on_block
        self.fallback = fallback

    def check(self, request: Request, number: str, flow: Flow, now: float, *, proxy: bool = False) -> AuthResult:
        """Challenge, accept or refuse a request claiming to be `number` (401, or 407 with `proxy`)."""
        user = self.settings.current.user(number)
        agent = request.get("User-Agent")
        key = device_key(agent, flow.host)
        offer = self.fallback.offer(key, agent, self.auth.algorithms)
        result = self.auth.check(request, number, user.password if user else None, flow.host, now, proxy=proxy,
                                 offer=offer)
        if request.get("Proxy-Authorization" if proxy else "Authorization") is not None:
            self.fallback.answered(key)
        elif result.outcome is Outcome.CHALLENGED:
            self.fallback.challenged(key, offer, number, flow.host, agent, now)
        if result.outcome is Outcome.REFUSED:
            log.warning("event=auth_failed %s", fields(number=number, peer=f"{flow.host}:{flow.port}",
                                                       method=request.method))
        if result.blocked_for is not None:
            log.warning("event=address_blocked %s", fields(
                peer=flow.host, seconds=int(result.blocked_for), reason="auth_failures", method=request.method))
            self.on_block(flow.host, result.blocked_for, "auth_failures")
        return result
