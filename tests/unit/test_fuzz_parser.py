"""Property tests for the parser: it only ever returns a message or raises SipParseError.

Inputs are arbitrary bytes, SIP-looking junk, and valid messages mutated at random; a
built message survives print and parse unchanged.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_cseq, parse_name_addr, parse_via
from appliance.sip.message import (
    _LIST_HEADERS,
    _TOKEN_CHARS,
    Request,
    Response,
    SipParseError,
    canonical_name,
    make_response,
    parse_message,
)
from appliance.sip.uri import parse_uri, uri_equal

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SEEDS = [
    (
        b"REGISTER sip:home.arpa SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.168.1.21:5060;branch=z9hG4bK776asdhds;rport\r\n"
        b"Max-Forwards: 70\r\n"
        b"From: \"Kitchen\" <sip:200@home.arpa>;tag=1928301774\r\n"
        b"To: <sip:200@home.arpa>\r\n"
        b"Call-ID: a84b4c76e66710@pc33\r\n"
        b"CSeq: 2 REGISTER\r\n"
        b"Contact: <sip:200@192.168.1.21:5060;transport=udp>;expires=300, <sip:200@[2001:db8::1]>\r\n"
        b"Authorization: Digest username=\"200\", realm=\"home.arpa\", nonce=\"abc\", "
        b"uri=\"sip:home.arpa\", response=\"0123456789abcdef\", algorithm=SHA-256\r\n"
        b"Expires: 300\r\n"
        b"Content-Length: 0\r\n\r\n"
    ),
    (
        b"INVITE sip:100@home.arpa SIP/2.0\r\n"
        b"v: SIP/2.0/TCP pc33.home.arpa;branch=z9hG4bKnashds8\r\n"
        b"f: Family <sip:200@home.arpa>;tag=1\r\n"
        b"t: <sip:100@home.arpa>\r\n"
        b"i: call-1\r\n"
        b"CSeq: 1 INVITE\r\n"
        b"Subject: folded\r\n  value\r\n"
        b"c: application/sdp\r\n"
        b"l: 24\r\n\r\n"
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n"
    ),
    (
        b"SIP/2.0 200 OK\n"
        b"Via: SIP/2.0/UDP p1.example;branch=z9hG4bK1, SIP/2.0/UDP p2.example;branch=z9hG4bK2\n"
        b"Record-Route: <sip:p1.example;lr>\n"
        b"From: <sip:200@home.arpa>;tag=1\n"
        b"To: <sip:100@home.arpa>;tag=2\n"
        b"Call-ID: x\n"
        b"CSeq: 1 INVITE\n"
        b"Content-Length: 0\n\n"
    ),
]

INTERESTING = [
    b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\n\n", b"\r\n ", b"\r\n\t", b" ", b":", b",", b";", b"=",
    b"<", b">", b'"', b"\\", b"[", b"]", b"@", b"%", b"%zz", b"\x00", b"\xff", b"\xc3", "²".encode(),
    "١".encode(), b"0", b"9", b"-1", b"99999999999", b"SIP/2.0", b"SIP/3.0", b"Via: ", b"v: ",
    b"Content-Length: 999", b"l: x", b"CSeq: 1 BYE", b"Contact: *", b"Max-Forwards: 0",
]


def _check(data: bytes) -> Request | Response | None:
    """Parse; anything but a message or SipParseError fails the test."""
    try:
        message = parse_message(data)
    except SipParseError as err:
        assert err.reason
        assert 400 <= err.status < 600
        if err.request is not None:
            assert isinstance(err.request, Request)
            # answerable means a response can be built and printed
            response = make_response(err.request, err.status, err.reason)
            assert response.get("Via") is not None
            response.to_bytes()
        return None
    assert isinstance(message, Request | Response)
    return message


def _same(a: Request | Response, b: Request | Response) -> None:
    assert a.start_line() == b.start_line()
    strip = [(k, v) for k, v in a.headers if k != "Content-Length"]
    assert strip == [(k, v) for k, v in b.headers if k != "Content-Length"]
    assert a.body == b.body


def _reprint_is_stable(message: Request | Response) -> None:
    """A message we accepted prints to bytes that parse back to the same message."""
    again = parse_message(message.to_bytes())
    _same(message, again)


def _exercise_views(message: Request | Response) -> None:
    """The structured parsers raise only SipSyntaxError on whatever a message holds."""
    for value in message.get_all("Via"):
        try:
            parse_via(value)
        except SipSyntaxError:
            pass
    for name in ("From", "To", "Contact", "Record-Route"):
        for value in message.get_all(name):
            try:
                parse_name_addr(value)
            except SipSyntaxError:
                pass
    try:
        parse_cseq(message.get("CSeq") or "")
    except SipSyntaxError:
        pass


@FUZZ
@given(st.binary(max_size=1500))
def test_arbitrary_bytes(data: bytes) -> None:
    message = _check(data)
    if message is not None:
        _reprint_is_stable(message)


sip_junk = st.lists(
    st.one_of(st.sampled_from(INTERESTING), st.sampled_from(SEEDS).map(lambda s: s[:40]), st.binary(max_size=8)),
    max_size=60,
).map(b"".join)


@FUZZ
@given(sip_junk)
def test_sip_looking_junk(data: bytes) -> None:
    message = _check(data)
    if message is not None:
        _reprint_is_stable(message)
        _exercise_views(message)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "dup_line", "truncate", "flip"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "replace":
            data[pos : pos + draw(st.integers(1, 4))] = draw(st.sampled_from(INTERESTING))
        elif op == "insert":
            data[pos:pos] = draw(st.one_of(st.sampled_from(INTERESTING), st.binary(min_size=1, max_size=6)))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 30))]
        elif op == "dup_line":
            start = data.rfind(b"\n", 0, pos) + 1
            end = data.find(b"\n", pos)
            if end > 0:
                data[start:start] = data[start : end + 1]
        elif op == "truncate":
            del data[pos:]
        elif data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@settings(FUZZ, max_examples=500)
@given(mutated())
def test_mutated_valid_messages(data: bytes) -> None:
    message = _check(data)
    if message is not None:
        _reprint_is_stable(message)
        _exercise_views(message)


def test_seeds_parse() -> None:
    # the mutations start from valid messages: check they are
    for seed in SEEDS:
        message = _check(seed)
        assert message is not None
        _reprint_is_stable(message)


# -- build -> print -> parse ---------------------------------------------------------------

token = st.text(st.sampled_from(sorted(_TOKEN_CHARS)), min_size=1, max_size=12)
# header text: no CR/LF, and parsing strips surrounding whitespace, so build it stripped
line_char = st.characters(exclude_categories=["Cs"], exclude_characters="\r\n")
value_text = st.text(line_char, max_size=40).map(str.strip)
_SKIP = _LIST_HEADERS | {"Content-Length", "Max-Forwards", "Via", "From", "To", "Call-ID", "CSeq"}
header_name = (
    st.text(st.sampled_from(sorted(_TOKEN_CHARS)), min_size=2, max_size=16)
    .map(canonical_name)
    .filter(lambda n: n not in _SKIP)
)
label = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-"), min_size=1, max_size=10).map(
    lambda s: "h" + s
)
host = st.one_of(
    st.lists(label, min_size=1, max_size=3).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)
user = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.!~*'()+-"),
               min_size=1, max_size=10)
uri_text = st.builds(
    lambda scheme, u, h, port, params: f"{scheme}:{u + '@' if u else ''}{h}"
    f"{f':{port}' if port else ''}{''.join(params)}",
    st.sampled_from(["sip", "sips"]),
    st.one_of(st.none(), user),
    host,
    st.one_of(st.none(), st.integers(1, 65535)),
    st.lists(st.sampled_from([";transport=tcp", ";lr", ";user=phone", ";ob", ";maddr=10.0.0.1"]), max_size=3,
             unique=True),
)


@st.composite
def built_requests(draw: st.DrawFn) -> Request:
    method = draw(token)
    uri = draw(uri_text)
    headers = [
        ("Via", f"SIP/2.0/UDP {draw(host)};branch=z9hG4bK{draw(token)}"),
        ("From", f"<{draw(uri_text)}>;tag={draw(token)}"),
        ("To", f"<{draw(uri_text)}>"),
        ("Call-ID", draw(token)),
        ("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}"),
    ]
    headers += [(draw(header_name), draw(value_text)) for _ in range(draw(st.integers(0, 6)))]
    contacts = draw(st.lists(uri_text, max_size=3))
    headers += [("Contact", f"<{c}>") for c in contacts]
    headers = draw(st.permutations(headers))
    return Request(method, uri, headers, draw(st.binary(max_size=200)))


@ROUND_TRIP
@given(built_requests())
def test_build_parse_round_trip(request: Request) -> None:
    parsed = parse_message(request.to_bytes())
    assert isinstance(parsed, Request)
    assert parsed.method == request.method
    assert parsed.uri == request.uri
    assert parsed.body == request.body
    assert [h for h in parsed.headers if h[0] != "Content-Length"] == request.headers
    assert parsed.get("Content-Length") == str(len(request.body))


@ROUND_TRIP
@given(
    st.integers(100, 699),
    st.text(line_char, max_size=30),
    st.lists(st.tuples(header_name, value_text), max_size=5),
    st.binary(max_size=100),
)
def test_response_round_trip(status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
    response = Response(status, reason, headers, body)
    parsed = parse_message(response.to_bytes())
    assert isinstance(parsed, Response)
    assert (parsed.status, parsed.reason, parsed.body) == (status, reason, body)
    assert [h for h in parsed.headers if h[0] != "Content-Length"] == headers


@ROUND_TRIP
@given(uri_text)
def test_uri_print_parse_round_trip(text: str) -> None:
    uri = parse_uri(text)
    assert str(uri) == text
    again = parse_uri(str(uri))
    assert again == uri
    assert uri_equal(uri, again)


@FUZZ
@given(st.text(max_size=80))
def test_uri_parser_raises_only_syntax_errors(text: str) -> None:
    try:
        parse_uri(text)
    except SipSyntaxError:
        pass
