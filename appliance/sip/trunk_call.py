"""What a call out through the provider needs beyond a proxy's work, sans-I/O.

The media worker's leg of a call out leaves through the edge to the provider, which
challenges it (`407`, or `401`) like any of its users. The edge, not the worker, answers
with the trunk's credentials (`credentials`, the header to add to the INVITE it re-sends
with a new CSeq), so the worker never sees the challenge. The offer to the provider is
cut to G.711 (`g711_only`): what every provider takes, and no transcoding in its path.
"""

from __future__ import annotations

from appliance.sip.auth import authorization_value
from appliance.sip.message import Request, Response
from appliance.sip.trunk_registration import pick_challenge

PROVIDER_PAYLOADS = {"PCMU/8000": "0", "PCMA/8000": "8"}
"""The codecs offered to a provider, by rtpmap name and static payload type."""


def credentials(request: Request, challenge: Response, *, username: str, password: str,
                cnonce: str) -> tuple[str, str] | None:
    """The (header, value) that answers `challenge` to `request`, or None when it offers
    nothing we can answer (no digest with MD5 or SHA-256, qop=auth or none)."""
    header, answer = ("WWW-Authenticate", "Authorization") if challenge.status == 401 else (
        "Proxy-Authenticate", "Proxy-Authorization")
    chosen = pick_challenge(challenge.get_all(header))
    if chosen is None:
        return None
    try:
        value = authorization_value(chosen, username=username, password=password, method=request.method,
                                    uri=request.uri, cnonce=cnonce)
    except ValueError:
        return None
    return answer, value


def g711_only(body: bytes) -> bytes:
    """An SDP offer with only PCMU, PCMA and telephone-event left on its audio line (and
    their rtpmap/fmtp lines); an offer without either G.711 codec is left as it is."""
    text = body.decode("utf-8", "replace")
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.split(newline)
    names: dict[str, str] = {}
    for line in lines:
        if line.startswith("a=rtpmap:"):
            pt, _, name = line[len("a=rtpmap:"):].partition(" ")
            names[pt] = name.strip()
    kept: set[str] = set()
    audio = -1
    for i, line in enumerate(lines):
        if line.startswith("m=audio "):
            fields = line.split(" ")
            for pt in fields[3:]:
                name = names.get(pt, {v: k for k, v in PROVIDER_PAYLOADS.items()}.get(pt, ""))
                if name.upper() in PROVIDER_PAYLOADS or name.lower().startswith("telephone-event/"):
                    kept.add(pt)
            if not kept & (set(PROVIDER_PAYLOADS.values()) | {p for p, n in names.items()
                                                              if n.upper() in PROVIDER_PAYLOADS}):
                return body
            lines[i] = " ".join(fields[:3] + [pt for pt in fields[3:] if pt in kept])
            audio = i
            break
    if audio < 0:
        return body
    # The audio section runs to the next m= line: another stream's rtpmap (video, a T.140
    # text stream) names payload types of its own and stays.
    end = next((i for i in range(audio + 1, len(lines)) if lines[i].startswith("m=")), len(lines))
    out = []
    for i, line in enumerate(lines):
        if audio < i < end and line.startswith(("a=rtpmap:", "a=fmtp:")):
            pt = line.split(":", 1)[1].split(" ", 1)[0]
            if pt not in kept:
                continue
        out.append(line)
    return newline.join(out).encode()
