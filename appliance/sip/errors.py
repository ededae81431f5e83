"""Errors raised by the sans-I/O SIP core."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.sip.message import Request


class SipSyntaxError(ValueError):
    """A header value or URI that does not follow the grammar."""


class SipParseError(ValueError):
    """A message that cannot be accepted.

    `request` is set when enough of a request was read to answer it (Via, From, To,
    Call-ID and CSeq); the caller then sends `status` with `reason` as the phrase, which
    names the fault. Without it the message is dropped, as RFC 3261 §16.3 and §18 allow.
    """

    def __init__(self, reason: str, *, status: int = 400, request: Request | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.request = request
