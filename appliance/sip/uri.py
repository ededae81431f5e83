"""SIP URIs (RFC 3261 §19.1): parse, print and compare.

The registrar recognises a device by its Contact URI when nothing better is available, so
URI comparison follows §19.1.4 exactly rather than comparing strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from appliance.sip.errors import SipSyntaxError

# Parameters that, when present in either URI, must be present and equal in both (§19.1.4).
_SIGNIFICANT_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def split_quoted(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes and angle brackets.

    Header lists (Contact, Via, Route) and parameter lists may carry quoted strings or
    bracketed URIs that contain the separator themselves.
    """
    if '"' not in text and "<" not in text:
        return text.split(sep)
    parts: list[str] = []
    start = 0
    in_quotes = False
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if in_quotes:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if in_quotes:
        raise SipSyntaxError("unterminated quoted string")
    parts.append(text[start:])
    return parts


def parse_params(text: str) -> dict[str, str | None]:
    """Parse ';name=value;flag' (leading ';' already removed). Names are lower-cased."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    for item in split_quoted(text, ";"):
        item = item.strip()
        if not item:
            continue
        name, eq, value = item.partition("=")
        name = name.strip().lower()
        if not name:
            raise SipSyntaxError("empty parameter name")
        params[name] = value.strip() if eq else None
    return params


def format_params(params: dict[str, str | None]) -> str:
    if not params:
        return ""
    return "".join([f";{k}" if v is None else f";{k}={v}" for k, v in params.items()])


@dataclass(slots=True, init=False)
class SipUri:
    """A sip: or sips: URI. Host is kept lower-case; user part is case-sensitive."""

    scheme: str
    user: str | None
    host: str
    port: int | None
    password: str | None
    params: dict[str, str | None]
    headers: str

    def __init__(self, scheme: str, user: str | None, host: str, port: int | None = None,
                 password: str | None = None, params: dict[str, str | None] | None = None,
                 headers: str = "") -> None:
        # Written out: mypyc compiles this one, the dataclass's generated __init__ runs interpreted.
        self.scheme = scheme
        self.user = user
        self.host = host
        self.port = port
        self.password = password
        self.params = {} if params is None else params
        self.headers = headers

    def __str__(self) -> str:
        userinfo = ""
        if self.user is not None:
            userinfo = self.user
            if self.password is not None:
                userinfo += ":" + self.password
            userinfo += "@"
        port = f":{self.port}" if self.port is not None else ""
        hdrs = f"?{self.headers}" if self.headers else ""
        return f"{self.scheme}:{userinfo}{self.host}{port}{format_params(self.params)}{hdrs}"

    @property
    def transport(self) -> str:
        value = self.params.get("transport")
        return value.lower() if value else ("tls" if self.scheme == "sips" else "udp")

    def host_port(self) -> str:
        return f"{self.host}:{self.port}" if self.port is not None else self.host


_BAD_HOST_CHARS = frozenset(' \t<>"')


@lru_cache(maxsize=4096)  # the same few sent-by and Contact addresses come again and again
def parse_host_port(text: str) -> tuple[str, int | None]:
    """Parse 'host', 'host:port', '[v6]' or '[v6]:port'."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipSyntaxError("unterminated IPv6 reference")
        host = text[: end + 1]
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise SipSyntaxError("bad host")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = text.partition(":")
        if _ and not port_text:
            raise SipSyntaxError("empty port")
    if not host or not _BAD_HOST_CHARS.isdisjoint(host):
        raise SipSyntaxError("bad host")
    port: int | None = None
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
            raise SipSyntaxError("bad port")
        port = int(port_text)
        if not 0 < port < 65536:
            raise SipSyntaxError("bad port")
    return host.lower(), port


def parse_uri(text: str) -> SipUri:
    """Parse a sip:/sips: URI; raises SipSyntaxError for anything else."""
    text = text.strip()
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in ("sip", "sips"):
        raise SipSyntaxError("unsupported URI scheme")
    rest, _, headers = rest.partition("?")
    user: str | None = None
    password: str | None = None
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, pcolon, pw = userinfo.partition(":")
        if pcolon:
            password = pw
        if not user:
            raise SipSyntaxError("empty user part")
    hostport, semi, param_text = rest.partition(";")
    host, port = parse_host_port(hostport)
    params = parse_params(param_text) if semi else {}
    return SipUri(scheme, user, host, port, password, params, headers)


def uri_equal(a: SipUri, b: SipUri) -> bool:
    """URI equivalence by RFC 3261 §19.1.4."""
    if a == b:
        return True  # identical fields (a device refreshing its binding): nothing to compare
    if a.scheme != b.scheme or _unescape(a.user) != _unescape(b.user):
        return False
    if _unescape(a.password) != _unescape(b.password):
        return False
    if a.host != b.host or a.port != b.port:
        return False
    for name in _SIGNIFICANT_PARAMS:
        va, vb = a.params.get(name, ...), b.params.get(name, ...)
        if va is ... and vb is ...:
            continue
        if va is ... or vb is ... or _lower(_unescape(va)) != _lower(_unescape(vb)):
            return False
    for name in a.params.keys() & b.params.keys():
        if _lower(_unescape(a.params[name])) != _lower(_unescape(b.params[name])):
            return False
    return _header_set(a.headers) == _header_set(b.headers)


_RESERVED = frozenset(";/?:@&=+$,")


def _unescape(value: Any) -> Any:
    """Decode %HH escapes of unreserved characters, which §19.1.4 makes equivalent to the
    characters themselves; escapes of reserved ones stay (in upper case)."""
    if not isinstance(value, str) or "%" not in value:
        return value
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        hex_text = value[i + 1 : i + 3]
        if ch == "%" and len(hex_text) == 2 and all(c in "0123456789abcdefABCDEF" for c in hex_text):
            decoded = chr(int(hex_text, 16))
            out.append(f"%{hex_text.upper()}" if decoded in _RESERVED or decoded == "%" else decoded)
            i += 3
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _header_set(headers: str) -> frozenset[tuple[str, str]]:
    items = set()
    for part in headers.split("&") if headers else ():
        name, _, value = part.partition("=")
        items.add((name.lower(), _unescape(value)))
    return frozenset(items)
