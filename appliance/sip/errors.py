"""The grammar error the URI, header and message parsers share (a whole message refused is
`message.SipParseError`, beside the parser)."""

from __future__ import annotations


class SipSyntaxError(ValueError):
    """A header value or URI that does not follow the grammar."""
