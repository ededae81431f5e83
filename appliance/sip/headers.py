"""Structured views of the headers the core acts on: Via, name-addr headers, CSeq.

Messages keep header values as text; these parsers run only where a value is needed, so
a proxy that just relays a header never pays for parsing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.sip.errors import SipSyntaxError
from appliance.sip.uri import SipUri, format_params, parse_host_port, parse_params, parse_uri

MAGIC_COOKIE = "z9hG4bK"  # RFC 3261 §8.1.1.7: branch prefix of RFC 3261 compliant elements


@dataclass(slots=True, init=False)
class Via:
    """One Via entry: 'SIP/2.0/UDP host:port;branch=...;rport'."""

    transport: str
    host: str
    port: int | None
    params: dict[str, str | None]

    def __init__(self, transport: str, host: str, port: int | None,
                 params: dict[str, str | None] | None = None) -> None:
        # Written out: mypyc compiles this one, the dataclass's generated __init__ runs interpreted.
        self.transport = transport
        self.host = host
        self.port = port
        self.params = {} if params is None else params

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"SIP/2.0/{self.transport} {self.host}{port}{format_params(self.params)}"


# sent-protocol allows whitespace around each '/' (RFC 3261 §25.1 SLASH; RFC 4475 §3.1.1.1).
_VIA_PROTOCOL = re.compile(r"\s*([^/\s]+)\s*/\s*([^/\s]+)\s*/\s*([^/\s]+)\s+(.*)", re.DOTALL)


def parse_via(value: str) -> Via:
    # The usual spelling, "SIP/2.0/UDP sent-by...", is cut without the regular expression
    # (which reads it the same way); anything else goes through it.
    transport, space, rest = value[8:].partition(" ") if value.startswith("SIP/2.0/") else ("", "", "")
    if not (space and transport.isascii() and transport.isalpha()):
        match = _VIA_PROTOCOL.fullmatch(value)
        if match is None:
            raise SipSyntaxError("bad Via protocol")
        name, version, transport, rest = match.groups()
        if name.upper() != "SIP" or version != "2.0":
            raise SipSyntaxError("bad Via protocol")
    rest = rest.strip()
    sent_by, semi, param_text = rest.partition(";")
    host, port = parse_host_port(sent_by.strip())
    params = parse_params(param_text) if semi else {}
    return Via(transport.upper(), host, port, params)


@dataclass(slots=True, init=False)
class NameAddr:
    """From, To, Contact, Route, Record-Route: an optional display name, a URI, parameters.

    `params` are the header parameters (tag, expires, q, +sip.instance), never the URI's.
    """

    uri: SipUri
    display: str
    params: dict[str, str | None]

    def __init__(self, uri: SipUri, display: str = "", params: dict[str, str | None] | None = None) -> None:
        self.uri = uri  # written out, as Via's
        self.display = display
        self.params = {} if params is None else params

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        display = f"{self.display} " if self.display else ""
        return f"{display}<{self.uri}>{format_params(self.params)}"


def parse_name_addr(value: str) -> NameAddr:
    value = value.strip()
    lt = value.find("<")
    if lt >= 0:
        gt = value.find(">", lt)
        if gt < 0:
            raise SipSyntaxError("unterminated <URI>")
        display = value[:lt].strip()
        uri = parse_uri(value[lt + 1 : gt])
        rest = value[gt + 1 :].strip()
        if rest and not rest.startswith(";"):
            raise SipSyntaxError("text after >")
        return NameAddr(uri, display, parse_params(rest[1:]) if rest else {})
    # addr-spec form: parameters after ';' belong to the header (RFC 3261 §20.10).
    uri_text, semi, param_text = value.partition(";")
    uri = parse_uri(uri_text)
    if uri.headers:
        raise SipSyntaxError("URI headers need <>")
    return NameAddr(uri, "", parse_params(param_text) if semi else {})


def parse_cseq(value: str) -> tuple[int, str]:
    number, _, method = value.strip().partition(" ")
    method = method.strip()
    if not (number.isascii() and number.isdigit()) or len(number) > 10 or not method:
        raise SipSyntaxError("bad CSeq")
    seq = int(number)
    if seq >= 2**31:
        raise SipSyntaxError("bad CSeq")
    return seq, method


def unquote(value: str) -> str:
    """Strip one pair of double quotes (and <> inside, as in +sip.instance)."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = value[1:-1]
    return value
