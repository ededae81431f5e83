"""The connection address of an SDP body (RFC 4566), read and rewritten; sans-I/O.

Only what the edge needs to give an outside party the box's address instead of a media
worker's internal one (the idea of Kamailio's fix_nated_sdp, rtpproxy's address
rewrite): the address of the session and media `c=` lines, the origin `o=` line and an
RFC 3605 `a=rtcp:` attribute.  Every other byte of the body is kept as it was (line
endings included); an address other than the one asked for is left alone, so an
``IN IP4 0.0.0.0`` hold (RFC 3264 §8.4) or a multicast ``c=`` stays as sent.
"""

from __future__ import annotations

__all__ = ["addresses", "is_sdp", "rewrite_address"]

_ENCODING = "latin-1"
"""Byte for byte, whatever the body holds: an SDP is not always valid UTF-8."""


def is_sdp(content_type: str | None) -> bool:
    """Is a body of this Content-Type an SDP (``application/sdp``, parameters ignored)?"""
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "application/sdp"


def addresses(body: bytes) -> list[str]:
    """The addresses of the `o=`, `c=` and `a=rtcp:` lines, in order (for logs and tests)."""
    found: list[str] = []
    for line in body.decode(_ENCODING).splitlines():
        parsed = _address_field(line)
        if parsed is not None:
            start, end = parsed
            found.append(line[start:end])
    return found


def rewrite_address(body: bytes, old: str, new: str) -> bytes:
    """`body` with the address `old` replaced by `new` wherever it names where media go.

    The address type follows `new` (``IP6`` for an address with a colon).  Returns `body`
    itself when nothing matched, so a caller can tell by identity that nothing changed.
    """
    text = body.decode(_ENCODING)
    lines = text.splitlines(keepends=True)
    changed = False
    addrtype = "IP6" if ":" in new else "IP4"
    for i, line in enumerate(lines):
        parsed = _address_field(line)
        if parsed is None:
            continue
        start, end = parsed
        address = line[start:end]
        if address != old:  # a multicast c= carries /ttl: never a unicast address of ours
            continue
        head = line[:start]
        # "... IN IP4 " before the address: the address type is the word before it.
        words = head.rstrip().rsplit(" ", 1)
        if len(words) == 2 and words[1] in ("IP4", "IP6"):
            head = f"{words[0]} {addrtype} "
        lines[i] = head + new + line[end:]
        changed = True
    return "".join(lines).encode(_ENCODING) if changed else body


def _address_field(line: str) -> tuple[int, int] | None:
    """Where the unicast/connection address is in a `c=`, `o=` or `a=rtcp:` line, else None."""
    stripped = line.rstrip("\r\n")
    if stripped.startswith("c="):
        fields, want = 3, 2  # c=<nettype> <addrtype> <connection-address>
        offset = 2
    elif stripped.startswith("o="):
        fields, want = 6, 5  # o=<username> <sess-id> <sess-version> <nettype> <addrtype> <address>
        offset = 2
    elif stripped.startswith("a=rtcp:"):
        fields, want = 4, 3  # a=rtcp:<port> <nettype> <addrtype> <address> (RFC 3605)
        offset = 7
    else:
        return None
    parts = stripped[offset:].split(" ")
    if len(parts) != fields or parts[want - 2] != "IN" or not parts[want]:
        return None
    start = offset + sum(len(p) + 1 for p in parts[:want])
    return start, start + len(parts[want])
