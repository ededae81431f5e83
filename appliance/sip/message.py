"""SIP messages (RFC 3261 §7): parse from bytes, inspect, edit, build and print.

Header values stay text; names are canonicalised (compact forms expanded) so lookups are
plain string compares. Comma-separated lists of Via, Contact, Route, Record-Route and Path
are split into one entry each at parse time, because those are the ones the core edits.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import lru_cache

from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_cseq
from appliance.sip.uri import split_quoted

MAX_MESSAGE_SIZE = 16384
"""Largest message we accept; above it a request gets 513 (RFC 3261 §21.5.14)."""

COMPACT_FORMS = {
    "i": "Call-ID", "m": "Contact", "e": "Content-Encoding", "l": "Content-Length",
    "c": "Content-Type", "f": "From", "s": "Subject", "k": "Supported", "t": "To",
    "v": "Via", "o": "Event", "r": "Refer-To", "b": "Referred-By", "x": "Session-Expires",
    "u": "Allow-Events", "a": "Accept-Contact", "j": "Reject-Contact",
    "d": "Request-Disposition", "y": "Identity",
}
_KNOWN = [
    "Accept", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow", "Allow-Events",
    "Authentication-Info", "Authorization", "Call-ID", "Call-Info", "Contact",
    "Content-Disposition", "Content-Encoding", "Content-Language", "Content-Length",
    "Content-Type", "CSeq", "Date", "Error-Info", "Event", "Expires", "From", "In-Reply-To",
    "Max-Forwards", "Min-Expires", "MIME-Version", "Organization", "P-Asserted-Identity",
    "Path", "Priority", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Require",
    "RAck", "Reason", "Record-Route", "Refer-To", "Referred-By", "Reply-To", "Require",
    "Retry-After", "Route", "RSeq", "Server", "Session-Expires", "Subject", "Supported",
    "Timestamp", "To", "Unsupported", "User-Agent", "Via", "Warning", "WWW-Authenticate",
]
_CANONICAL = {name.lower(): name for name in _KNOWN}
_KNOWN_SET = frozenset(_KNOWN)  # names that are their own canonical form
_LIST_HEADERS = frozenset({"Via", "Contact", "Route", "Record-Route", "Path"})
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
_REQUIRED = ("Via", "From", "To", "Call-ID", "CSeq")
_ECHOED = frozenset(_REQUIRED)  # what a response copies from its request (§8.2.6.2)

REASON_PHRASES = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 420: "Bad Extension",
    423: "Interval Too Brief", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 500: "Server Internal Error",
    501: "Not Implemented", 503: "Service Unavailable", 504: "Server Time-out",
    505: "Version Not Supported", 513: "Message Too Large", 600: "Busy Everywhere",
    603: "Decline", 604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}


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



@lru_cache(maxsize=1024)
def canonical_name(name: str) -> str:
    """'v' -> 'Via', 'call-id' -> 'Call-ID', 'x-foo' -> 'X-Foo'."""
    lower = name.lower()
    if len(lower) == 1:
        return COMPACT_FORMS.get(lower, lower.upper())  # one case, so lookups ignore it
    known = _CANONICAL.get(lower)
    if known:
        return known
    return "-".join(part.capitalize() for part in lower.split("-"))


DIALOG_HEADERS = frozenset({"Via", "From", "To", "Call-ID", "CSeq", "Contact", "Route"})
"""What a finished transaction or dialog still needs of its request or answer: to answer a
retransmission, ACK or CANCEL a branch, BYE a party (never the body, SDP or credentials)."""
_ANSWER_HEADERS = DIALOG_HEADERS - {"Via"}


class Message:
    """Headers and body shared by requests and responses."""

    __slots__ = ("_cseq", "body", "headers")

    def __init__(self, headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> None:
        self.headers: list[tuple[str, str]] = headers if headers is not None else []
        self.body = body
        self._cseq: tuple[str, tuple[int, str]] | None = None

    def get(self, name: str) -> str | None:
        """First value of a header, or None."""
        if name not in _KNOWN_SET:  # the core asks by canonical name: skip the cache call
            name = canonical_name(name)
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def first_values(self) -> dict[str, str]:
        """The first value of every header, by name: one pass, for code that looks up several."""
        return dict(reversed(self.headers))  # reversed, so the first occurrence wins

    def get_all(self, name: str) -> list[str]:
        name = canonical_name(name)
        return [value for key, value in self.headers if key == name]

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        entry = (canonical_name(name), value)
        if first:
            self.headers.insert(0, entry)
        else:
            self.headers.append(entry)

    def set(self, name: str, value: str) -> None:
        """Replace every value of `name` with one (in place of the first, else appended)."""
        name = canonical_name(name)
        out: list[tuple[str, str]] = []
        placed = False
        for key, old in self.headers:
            if key == name:
                if not placed:
                    out.append((key, value))
                    placed = True
            else:
                out.append((key, old))
        if not placed:
            out.append((name, value))
        self.headers = out

    def remove(self, name: str) -> None:
        name = canonical_name(name)
        self.headers = [(k, v) for k, v in self.headers if k != name]

    def pop_first(self, name: str) -> str | None:
        name = canonical_name(name)
        for i, (key, value) in enumerate(self.headers):
            if key == name:
                del self.headers[i]
                return value
        return None

    @property
    def call_id(self) -> str:
        return self.get("Call-ID") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        """Parsed once per CSeq value (a message's is asked for a dozen times on its way
        through); the value is the key, so a CSeq set since is parsed afresh."""
        value = self.get("CSeq") or ""
        memo = self._cseq
        if memo is not None and memo[0] is value:
            return memo[1]
        parsed = parse_cseq(value)
        self._cseq = (value, parsed)
        return parsed

    def dialog_headers(self) -> list[tuple[str, str]]:
        """Only the `DIALOG_HEADERS`, for a `skeleton`."""
        return [header for header in self.headers if header[0] in DIALOG_HEADERS]  # the same tuples, not copies

    def start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        lines = [f"{k}: {v}\r\n" for k, v in self.headers if k != "Content-Length"]
        head = "".join(lines)
        return f"{self.start_line()}\r\n{head}Content-Length: {len(self.body)}\r\n\r\n".encode() + self.body

    def __bytes__(self) -> bytes:
        return self.to_bytes()


class Request(Message):
    __slots__ = ("method", "uri")

    def __init__(
        self, method: str, uri: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri = uri

    def start_line(self) -> str:
        return f"{self.method} {self.uri} SIP/2.0"

    def skeleton(self) -> Request:
        """What the edge keeps of a finished request for the 32 s its call lingers: the
        dialog headers, no body, so a burst of calls does not hold whole INVITEs."""
        return Request(self.method, self.uri, self.dialog_headers())

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


class Response(Message):
    __slots__ = ("reason", "status")

    def __init__(
        self, status: int, reason: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason

    def start_line(self) -> str:
        return f"SIP/2.0 {self.status} {self.reason}"

    def skeleton(self) -> Response:
        """The dialog headers of a finished answer (its To tag and Contact), no body and
        no Via (a response's Vias name the hops it took back, nothing a dialog needs)."""
        return Response(self.status, self.reason, [h for h in self.headers if h[0] in _ANSWER_HEADERS])

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


def parse_message(data: bytes) -> Request | Response:
    """Parse one whole message (a UDP datagram or one framed TCP message).

    Raises SipParseError; its `request` is set when the fault can be answered with 400.
    """
    end = data.find(b"\r\n\r\n")
    sep_len = 4
    if end < 0:
        end = data.find(b"\n\n")
        sep_len = 2
        if end < 0:
            raise SipParseError("no end of headers")
    try:
        head = data[:end].decode("utf-8")
    except UnicodeDecodeError:
        raise SipParseError("headers are not UTF-8") from None
    lines = head.split("\r\n") if sep_len == 4 else head.split("\n")
    if _bare_line_break(head, lines, sep_len):
        # Not answered: a 400 would echo the value (Via, From, To...) and with it the break,
        # a header of the sender's making in our response, or in a response we relay.
        raise SipParseError("bare CR or LF in a header")
    message, version = _parse_start_line(lines[0])
    _parse_headers(lines, message)
    body = data[end + sep_len :]
    request = message if isinstance(message, Request) else None
    # A request's headers are checked by name (`_validate_request`): one dict of them. A
    # response needs only its Content-Length: one scan, no dict.
    first = message.first_values() if request is not None else {}
    length_text = (first if request is not None else message).get("Content-Length")
    if length_text is not None:
        if not _is_digits(length_text.strip()):
            raise SipParseError("Bad Content-Length", request=_answerable(request))
        length = int(length_text)
        if length > len(body):
            raise SipParseError("Content-Length exceeds body", request=_answerable(request))
        body = body[:length]
    message.body = body
    if request is not None:
        if version != "SIP/2.0":
            raise SipParseError("SIP Version Not Supported", status=505, request=_answerable(request))
        _validate_request(request, first)
    return message


def _bare_line_break(head: str, lines: list[str], sep_len: int) -> bool:
    """A CR or LF inside a line (RFC 3261 §7.3.1: only CRLF ends one); two counts in C, no loop.

    With LF-only line ends (the lenient form) a CR may still end a line, nowhere else.
    """
    breaks = len(lines) - 1
    if sep_len == 4:
        return head.count("\r") != breaks or head.count("\n") != breaks
    return "\r" in head and any("\r" in line[:-1] for line in lines)


def _parse_start_line(line: str) -> tuple[Request | Response, str]:
    if line.startswith("SIP/"):
        version, _, rest = line.partition(" ")
        code, _, reason = rest.partition(" ")
        if version != "SIP/2.0" or len(code) != 3 or not _is_digits(code) or code[0] == "0":
            raise SipParseError("bad status line")
        return Response(int(code), reason), version
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise SipParseError("bad request line")
    method, uri, version = parts
    if not _is_token(method):
        raise SipParseError("bad method")
    return Request(method, uri), version


def _parse_headers(lines: list[str], message: Request | Response) -> None:
    headers = message.headers
    bad: str | None = None
    open_entry = False  # the last entry of `headers` may still take folded lines
    has_list = False  # some list header holds a comma: split after the loop
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            if not open_entry:
                bad = "folded line without header"
                continue
            name, value = headers[-1]
            folded = line.strip()
            headers[-1] = (name, f"{value} {folded}".strip())
            has_list = has_list or (name in _LIST_HEADERS and "," in folded)
            continue
        name, colon, value = line.partition(":")
        canonical = _header_name(name) if colon else None
        if canonical is None:
            bad = bad or "malformed header line"
            open_entry = False
            continue
        value = value.strip()
        headers.append((canonical, value))
        open_entry = True
        has_list = has_list or (canonical in _LIST_HEADERS and "," in value)
    if has_list:
        headers[:] = [entry for name, value in headers for entry in _entries(name, value)]
    if bad:
        raise SipParseError(bad, request=_answerable(message))


@lru_cache(maxsize=1024)
def _header_name(raw: str) -> str | None:
    """The canonical name of a header line's name part, or None if it is not a token."""
    name = raw.rstrip()
    return canonical_name(name) if _is_token(name) else None


@lru_cache(maxsize=1024)
def _is_token(name: str) -> bool:
    return bool(name) and all(c in _TOKEN_CHARS for c in name)


def _entries(name: str, value: str) -> list[tuple[str, str]]:
    """One header line as entries: a list header's comma-separated values split apart."""
    if name in _LIST_HEADERS and "," in value:
        try:
            parts = split_quoted(value, ",")
        except SipSyntaxError:
            parts = [value]
        return [(name, part.strip()) for part in parts if part.strip()]
    return [(name, value)]


def _is_digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²', which int() then rejects."""
    return text.isascii() and text.isdigit()


def _answerable(message: Request | Response | None) -> Request | None:
    """The request, if a response can be routed back to its sender (it has a Via)."""
    if not isinstance(message, Request) or message.get("Via") is None:
        return None
    return message


def _validate_request(request: Request, first: dict[str, str]) -> None:
    """`first`: the first value of each of the request's headers."""
    for name in _REQUIRED:
        if name not in first:
            raise SipParseError(f"Missing {name} header", request=_answerable(request))
    try:
        _, method = parse_cseq(first["CSeq"])
    except SipSyntaxError:
        raise SipParseError("Bad CSeq", request=request) from None
    if method != request.method:
        raise SipParseError("CSeq method does not match", request=request)
    max_forwards = first.get("Max-Forwards")
    if max_forwards is not None and (not _is_digits(max_forwards) or int(max_forwards) > 255):
        raise SipParseError("Bad Max-Forwards", request=request)


class RandomPool:
    """Random bytes from the system's generator, drawn 4 kB at a time: one os.urandom per
    tag was a getrandom(2) system call each, ~10 per call through the box (11% of the
    edge's CPU under load). The same bytes, fewer calls; a forked child draws its own."""

    __slots__ = ("_buffer", "_size", "_used")

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._buffer = b""
        self._used = 0

    def take(self, count: int) -> bytes:
        start = self._used
        if start + count > len(self._buffer):
            self._buffer = os.urandom(max(self._size, count))
            start = 0
        self._used = start + count
        return self._buffer[start : start + count]

    def reset(self) -> None:
        """Forget the bytes drawn (a forked child must not use its parent's)."""
        self._buffer = b""
        self._used = 0


RANDOM = RandomPool()
os.register_at_fork(after_in_child=RANDOM.reset)


def new_tag() -> str:
    """A random token for tags, branches and Call-IDs."""
    return RANDOM.take(6).hex()


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> Response:
    """A response carrying the request's Via, From, To, Call-ID and CSeq (§8.2.6.2).

    A To-tag is added when the request's To has none (never on 100 Trying): the one given,
    else a fresh one (§8.2.6.2).
    """
    copy_record_route = 100 < status < 300
    copied: list[tuple[str, str]] = []
    for key, value in request.headers:
        if key in _ECHOED:
            if key == "To" and status > 100 and ";tag=" not in value.replace(" ", ""):
                if to_tag is None:
                    to_tag = new_tag()  # drawn only when needed
                if to_tag:
                    value = f"{value};tag={to_tag}"
            copied.append((key, value))
        elif key == "Record-Route" and copy_record_route:
            copied.append((key, value))
    copied.extend([(canonical_name(k), v) for k, v in headers])
    return Response(status, reason or REASON_PHRASES.get(status, "Unknown"), copied, body)
