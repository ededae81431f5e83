"""Tests for appliance.sip.message, uri and headers: parsing, printing, responses, faults."""

from __future__ import annotations

import pytest

from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_cseq, parse_name_addr, parse_via, unquote
from appliance.sip.message import (
    Request,
    Response,
    SipParseError,
    canonical_name,
    make_response,
    parse_message,
)
from appliance.sip.uri import SipUri, parse_host_port, parse_params, parse_uri, split_quoted, uri_equal


def crlf(*lines: str, body: str = "") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


VIA = "Via: SIP/2.0/UDP 192.168.1.21:5060;branch=z9hG4bK776asdhds;rport"
FROM = "From: \"Kitchen\" <sip:200@home.arpa>;tag=1928301774"
TO = "To: <sip:200@home.arpa>"
CALL_ID = "Call-ID: a84b4c76e66710@pc33.home.arpa"


def register(*extra: str, cseq: str = "CSeq: 1 REGISTER", start: str = "REGISTER sip:home.arpa SIP/2.0",
             body: str = "", via: str | None = VIA, call_id: str | None = CALL_ID,
             max_forwards: str = "70") -> bytes:
    lines = [start]
    if via is not None:
        lines.append(via)
    lines += [f"Max-Forwards: {max_forwards}", TO, FROM]
    if call_id is not None:
        lines.append(call_id)
    lines.append(cseq)
    lines += list(extra)
    return crlf(*lines, body=body)


INVITE = crlf(
    "INVITE sip:100@home.arpa SIP/2.0",
    "Via: SIP/2.0/UDP pc33.home.arpa;branch=z9hG4bKnashds8",
    "Max-Forwards: 70",
    "To: Grandpa <sip:100@home.arpa>",
    "From: Family <sip:200@home.arpa>;tag=1928301774",
    "Call-ID: a84b4c76e66710",
    "CSeq: 314159 INVITE",
    "Contact: <sip:200@192.168.1.21>",
    "Content-Type: application/sdp",
    "Content-Length: 4",
    body="v=0\r",
)


# -- parsing ------------------------------------------------------------------------------


def test_parse_request_basic_fields() -> None:
    msg = parse_message(INVITE)
    assert isinstance(msg, Request)
    assert msg.method == "INVITE"
    assert msg.uri == "sip:100@home.arpa"
    assert msg.call_id == "a84b4c76e66710"
    assert msg.cseq == (314159, "INVITE")
    assert msg.get("To") == "Grandpa <sip:100@home.arpa>"
    assert msg.body == b"v=0\r"


def test_parse_response_status_and_reason() -> None:
    data = crlf(
        "SIP/2.0 180 Ringing Now",
        "Via: SIP/2.0/UDP pc33.home.arpa;branch=z9hG4bKnashds8",
        "To: <sip:100@home.arpa>;tag=a6c85cf",
        "From: <sip:200@home.arpa>;tag=1928301774",
        "Call-ID: x",
        "CSeq: 1 INVITE",
    )
    msg = parse_message(data)
    assert isinstance(msg, Response)
    assert (msg.status, msg.reason) == (180, "Ringing Now")
    assert msg.cseq == (1, "INVITE")


def test_compact_forms_are_expanded() -> None:
    data = crlf(
        "REGISTER sip:home.arpa SIP/2.0",
        "v: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1",
        "f: <sip:200@home.arpa>;tag=1",
        "t: <sip:200@home.arpa>",
        "i: compact-call-id",
        "CSeq: 2 REGISTER",
        "m: <sip:200@10.0.0.1>",
        "l: 0",
        "k: path, gruu",
        "c: application/sdp",
    )
    msg = parse_message(data)
    names = [k for k, _ in msg.headers]
    assert names == [
        "Via", "From", "To", "Call-ID", "CSeq", "Contact", "Content-Length", "Supported", "Content-Type"
    ]
    assert msg.call_id == "compact-call-id"
    assert msg.get("Contact") == "<sip:200@10.0.0.1>"
    assert msg.get("Supported") == "path, gruu"  # not a list header: left whole


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [("v", "Via"), ("V", "Via"), ("call-id", "Call-ID"), ("CALL-ID", "Call-ID"), ("cseq", "CSeq"),
     ("www-authenticate", "WWW-Authenticate"), ("x-my-header", "X-My-Header"), ("m", "Contact"),
     ("q", "Q"), ("Q", "Q")],
)
def test_canonical_name(raw: str, canonical: str) -> None:
    assert canonical_name(raw) == canonical


def test_header_names_are_case_insensitive() -> None:
    msg = parse_message(register("cOnTaCt: <sip:200@10.0.0.1>", "EXPIRES: 300", "x-custom-thing: 1",
                                 cseq="cseq: 1 REGISTER"))
    assert msg.get("contact") == msg.get("CONTACT") == "<sip:200@10.0.0.1>"
    assert msg.get("Expires") == "300"
    assert msg.get("X-Custom-Thing") == "1"
    assert msg.cseq == (1, "REGISTER")
    assert ("Contact", "<sip:200@10.0.0.1>") in msg.headers


def test_folded_header_lines_are_joined() -> None:
    data = register("Subject: I know you're there,", "     pay attention", "\tplease", "Expires: 60")
    msg = parse_message(data)
    assert msg.get("Subject") == "I know you're there, pay attention please"
    assert msg.get("Expires") == "60"


def test_folded_via_list_is_split_after_joining() -> None:
    data = crlf(
        "OPTIONS sip:home.arpa SIP/2.0",
        "Via: SIP/2.0/UDP a.example;branch=z9hG4bK1,",
        "  SIP/2.0/TCP b.example:5070;branch=z9hG4bK2",
        "From: <sip:200@home.arpa>;tag=1",
        "To: <sip:home.arpa>",
        "Call-ID: c",
        "CSeq: 1 OPTIONS",
    )
    vias = parse_message(data).get_all("Via")
    assert vias == ["SIP/2.0/UDP a.example;branch=z9hG4bK1", "SIP/2.0/TCP b.example:5070;branch=z9hG4bK2"]


def test_repeated_and_comma_separated_contacts() -> None:
    data = register(
        'Contact: "Doe, John" <sip:200@10.0.0.1;transport=tcp>;q=0.7, <sip:200@10.0.0.2>',
        "Contact: <sip:200@10.0.0.3>;expires=60",
        'm: "a,b" <sip:200@10.0.0.4>;+sip.instance="<urn:uuid:00000000-0000-0000-0000-000000000001>"',
    )
    contacts = parse_message(data).get_all("Contact")
    assert contacts == [
        '"Doe, John" <sip:200@10.0.0.1;transport=tcp>;q=0.7',
        "<sip:200@10.0.0.2>",
        "<sip:200@10.0.0.3>;expires=60",
        '"a,b" <sip:200@10.0.0.4>;+sip.instance="<urn:uuid:00000000-0000-0000-0000-000000000001>"',
    ]
    first = parse_name_addr(contacts[0])
    assert first.display == '"Doe, John"'
    assert first.params == {"q": "0.7"}


def test_via_list_with_quoted_comma_in_parameter() -> None:
    data = crlf(
        "OPTIONS sip:home.arpa SIP/2.0",
        'Via: SIP/2.0/UDP a.example;branch=z9hG4bK1;x="p,q", SIP/2.0/UDP b.example;branch=z9hG4bK2',
        "From: <sip:200@home.arpa>;tag=1",
        "To: <sip:home.arpa>",
        "Call-ID: c",
        "CSeq: 1 OPTIONS",
    )
    vias = parse_message(data).get_all("Via")
    assert len(vias) == 2
    assert parse_via(vias[0]).params["x"] == '"p,q"'
    assert parse_via(vias[1]).host == "b.example"


def test_record_route_list_split_but_other_headers_kept_whole() -> None:
    msg = parse_message(register(
        "Record-Route: <sip:p1.example;lr>, <sip:p2.example;lr>",
        "Allow: INVITE, ACK, BYE",
    ))
    assert msg.get_all("Record-Route") == ["<sip:p1.example;lr>", "<sip:p2.example;lr>"]
    assert msg.get_all("Allow") == ["INVITE, ACK, BYE"]


def test_body_is_cut_to_content_length() -> None:
    data = register("Content-Length: 5", body="hello, and trailing garbage")
    assert parse_message(data).body == b"hello"


def test_body_without_content_length_is_the_rest() -> None:
    assert parse_message(register(body="abc")).body == b"abc"


def test_zero_content_length_gives_empty_body() -> None:
    assert parse_message(register("Content-Length: 0", body="xyz")).body == b""


def test_body_may_contain_blank_lines_and_binary() -> None:
    body = b"line1\r\n\r\nline3\x00\xff"
    data = register(f"Content-Length: {len(body)}").replace(b"\r\n\r\n", b"\r\n\r\n", 1) + body
    msg = parse_message(data)
    assert msg.body == body


def test_bare_lf_message() -> None:
    data = (
        b"REGISTER sip:home.arpa SIP/2.0\n"
        b"Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\n"
        b"From: <sip:200@home.arpa>;tag=1\n"
        b"To: <sip:200@home.arpa>\n"
        b"Call-ID: lf\n"
        b"CSeq: 1 REGISTER\n"
        b"Subject: folded\n"
        b" across lines\n"
        b"Content-Length: 2\n"
        b"\n"
        b"ok"
    )
    msg = parse_message(data)
    assert isinstance(msg, Request)
    assert msg.call_id == "lf"
    assert msg.get("Subject") == "folded across lines"
    assert msg.body == b"ok"


def test_ipv6_hosts() -> None:
    data = crlf(
        "REGISTER sip:[2001:db8::1] SIP/2.0",
        "Via: SIP/2.0/UDP [2001:db8::9:1]:5060;branch=z9hG4bKas3-111",
        "From: <sip:200@[2001:db8::1]>;tag=1",
        "To: <sip:200@[2001:db8::1]>",
        "Call-ID: v6",
        "CSeq: 1 REGISTER",
        "Contact: <sip:200@[2001:DB8::10]:5070;transport=tcp>",
    )
    msg = parse_message(data)
    assert isinstance(msg, Request)
    assert parse_uri(msg.uri).host == "[2001:db8::1]"
    via = parse_via(msg.get("Via") or "")
    assert (via.host, via.port, via.branch) == ("[2001:db8::9:1]", 5060, "z9hG4bKas3-111")
    contact = parse_name_addr(msg.get("Contact") or "")
    assert (contact.uri.host, contact.uri.port, contact.uri.transport) == ("[2001:db8::10]", 5070, "tcp")


def test_whitespace_around_colon_and_values() -> None:
    msg = parse_message(register("Expires   :    300   ", "Subject:"))
    assert msg.get("Expires") == "300"
    assert msg.get("Subject") == ""


def test_max_forwards_zero_parses() -> None:
    # 0 is valid syntax; answering 483 is the edge's job, not the parser's
    assert parse_message(register(max_forwards="0")).get("Max-Forwards") == "0"


def test_unknown_method_is_accepted() -> None:
    data = register(start="FOO.BAR sip:home.arpa SIP/2.0", cseq="CSeq: 1 FOO.BAR")
    msg = parse_message(data)
    assert isinstance(msg, Request)
    assert msg.method == "FOO.BAR"


# -- printing and editing ------------------------------------------------------------------


def test_serialise_round_trip_preserves_everything() -> None:
    msg = parse_message(INVITE)
    again = parse_message(msg.to_bytes())
    assert isinstance(msg, Request) and isinstance(again, Request)
    assert (again.method, again.uri, again.headers, again.body) == (msg.method, msg.uri, msg.headers, msg.body)
    assert bytes(msg) == msg.to_bytes()


def test_to_bytes_format_and_content_length_recomputed() -> None:
    req = Request("OPTIONS", "sip:home.arpa", [("Call-ID", "x"), ("Content-Length", "999")], b"abc")
    assert req.to_bytes() == b"OPTIONS sip:home.arpa SIP/2.0\r\nCall-ID: x\r\nContent-Length: 3\r\n\r\nabc"
    resp = Response(486, "Busy Here", [("Call-ID", "x")])
    assert resp.to_bytes() == b"SIP/2.0 486 Busy Here\r\nCall-ID: x\r\nContent-Length: 0\r\n\r\n"


def test_compact_forms_are_printed_long() -> None:
    msg = parse_message(register("m: <sip:200@10.0.0.1>"))
    out = msg.to_bytes()
    assert b"\r\nContact: <sip:200@10.0.0.1>\r\n" in out
    assert b"\r\nm:" not in out


def test_header_editing() -> None:
    msg = Request("OPTIONS", "sip:home.arpa")
    msg.add("v", "SIP/2.0/UDP b")
    msg.add("Via", "SIP/2.0/UDP a", first=True)
    msg.add("X-Foo", "1")
    msg.add("x-foo", "2")
    assert msg.get_all("Via") == ["SIP/2.0/UDP a", "SIP/2.0/UDP b"]
    assert msg.pop_first("via") == "SIP/2.0/UDP a"
    assert msg.get_all("Via") == ["SIP/2.0/UDP b"]
    msg.set("X-Foo", "3")
    assert msg.get_all("X-Foo") == ["3"]
    assert msg.headers.index(("X-Foo", "3")) == 1  # in place of the first
    msg.set("Expires", "60")
    assert msg.headers[-1] == ("Expires", "60")
    msg.remove("x-foo")
    assert msg.get("X-Foo") is None
    assert msg.pop_first("X-Foo") is None
    assert msg.call_id == ""


# -- make_response -----------------------------------------------------------------------


def _request_with_record_route() -> Request:
    msg = parse_message(register(
        "Via: SIP/2.0/UDP proxy.example;branch=z9hG4bK2",
        "Record-Route: <sip:p1.example;lr>",
        "Contact: <sip:200@10.0.0.1>",
        "User-Agent: phone",
    ))
    assert isinstance(msg, Request)
    return msg


def test_make_response_copies_dialog_headers_in_order() -> None:
    req = _request_with_record_route()
    resp = make_response(req, 200, to_tag="totag")
    assert (resp.status, resp.reason) == (200, "OK")
    assert resp.get_all("Via") == req.get_all("Via")
    assert resp.get("From") == req.get("From")
    assert resp.get("To") == "<sip:200@home.arpa>;tag=totag"
    assert resp.call_id == req.call_id
    assert resp.get("CSeq") == req.get("CSeq")
    assert resp.get_all("Record-Route") == ["<sip:p1.example;lr>"]
    assert resp.get("Contact") is None
    assert resp.get("User-Agent") is None
    assert resp.get("Max-Forwards") is None


def test_make_response_fresh_to_tag_when_none_given() -> None:
    req = _request_with_record_route()
    a = parse_name_addr(make_response(req, 404).get("To") or "")
    b = parse_name_addr(make_response(req, 404).get("To") or "")
    assert a.tag and b.tag and a.tag != b.tag


def test_make_response_no_to_tag_on_100() -> None:
    req = _request_with_record_route()
    resp = make_response(req, 100)
    assert resp.reason == "Trying"
    assert resp.get("To") == "<sip:200@home.arpa>"
    assert make_response(req, 100, to_tag="x").get("To") == "<sip:200@home.arpa>"
    assert resp.get("Record-Route") is None


def test_make_response_keeps_existing_to_tag() -> None:
    msg = parse_message(crlf(
        "BYE sip:200@10.0.0.1 SIP/2.0", VIA, FROM, "To: <sip:100@home.arpa>;tag=existing", CALL_ID,
        "CSeq: 2 BYE",
    ))
    assert isinstance(msg, Request)
    assert make_response(msg, 200, to_tag="new").get("To") == "<sip:100@home.arpa>;tag=existing"


def test_make_response_record_route_only_on_2xx_and_1xx() -> None:
    req = _request_with_record_route()
    assert make_response(req, 180).get("Record-Route") is not None
    assert make_response(req, 486).get("Record-Route") is None


def test_make_response_reason_extra_headers_and_body() -> None:
    req = _request_with_record_route()
    resp = make_response(req, 423, headers=[("min-expires", "60")], body=b"x")
    assert resp.reason == "Interval Too Brief"
    assert resp.get("Min-Expires") == "60"
    assert resp.body == b"x"
    assert make_response(req, 403, "Device limit reached").reason == "Device limit reached"
    assert make_response(req, 499).reason == "Unknown"
    again = parse_message(resp.to_bytes())
    assert isinstance(again, Response)
    assert again.status == 423 and again.get("Min-Expires") == "60"


# -- faults ----------------------------------------------------------------------------


def parse_error(data: bytes) -> SipParseError:
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    return info.value


@pytest.mark.parametrize(
    ("data", "reason", "status"),
    [
        (register(call_id=None), "Missing Call-ID header", 400),
        (register(cseq="CSeq: abc REGISTER"), "Bad CSeq", 400),
        (register(cseq="CSeq: 1"), "Bad CSeq", 400),
        (register(cseq="CSeq: 99999999999 REGISTER"), "Bad CSeq", 400),
        (register(cseq="CSeq: 1 INVITE"), "CSeq method does not match", 400),
        (register("Content-Length: abc"), "Bad Content-Length", 400),
        (register("Content-Length: -1"), "Bad Content-Length", 400),
        (register("Content-Length: 10", body="short"), "Content-Length exceeds body", 400),
        (register(max_forwards="many"), "Bad Max-Forwards", 400),
        (register(max_forwards="256"), "Bad Max-Forwards", 400),
        (register("this line has no colon"), "malformed header line", 400),
        (register("Bad Name: x"), "malformed header line", 400),
        (register(start="REGISTER sip:home.arpa SIP/3.0"), "SIP Version Not Supported", 505),
        (register(cseq="CSeq: ² REGISTER"), "Bad CSeq", 400),
        (register("Content-Length: ²"), "Bad Content-Length", 400),
        (register(max_forwards="²"), "Bad Max-Forwards", 400),
    ],
)
def test_answerable_faults(data: bytes, reason: str, status: int) -> None:
    err = parse_error(data)
    assert err.reason == reason
    assert err.status == status
    assert isinstance(err.request, Request)
    # enough is known to answer it: the response goes back along the Via
    resp = make_response(err.request, err.status, err.reason)
    assert resp.get("Via") == VIA.split(": ", 1)[1]
    assert resp.reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (register(via=None), "Missing Via header"),
        (register(via=None, call_id=None), "Missing Via header"),
        (register("Bad Name: x", via=None), "malformed header line"),
        (b"REGISTER sip:home.arpa SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\n", "no end of headers"),
        (b"", "no end of headers"),
        (register().replace(b"home.arpa", "hôme.arpa".encode("latin-1")), "headers are not UTF-8"),
        (register(start="REGISTER sip:home.arpa"), "bad request line"),
        (register(start="REGISTER  sip:home.arpa SIP/2.0"), "bad request line"),
        (register(start="REGISTER sip:home.arpa SIP/2.0 extra"), "bad request line"),
        (register(start="REG(ISTER sip:home.arpa SIP/2.0"), "bad method"),
        (crlf("SIP/2.0 2000 OK", VIA), "bad status line"),
        (crlf("SIP/2.0 099 Odd", VIA), "bad status line"),
        (crlf("SIP/3.0 200 OK", VIA), "bad status line"),
        (crlf("SIP/2.0 ²²² OK", VIA), "bad status line"),
        (crlf("SIP/2.0 200 OK", "  folded first", VIA), "folded line without header"),
    ],
)
def test_unanswerable_faults_are_dropped(data: bytes, reason: str) -> None:
    err = parse_error(data)
    assert err.reason == reason
    assert err.request is None


def test_response_with_bad_header_is_never_answerable() -> None:
    err = parse_error(crlf("SIP/2.0 200 OK", VIA, "garbage"))
    assert err.request is None


def test_first_missing_header_is_named() -> None:
    data = crlf("OPTIONS sip:home.arpa SIP/2.0", VIA, FROM, CALL_ID, "CSeq: 1 OPTIONS")
    err = parse_error(data)
    assert err.reason == "Missing To header"
    assert err.request is not None


def test_parse_error_is_a_value_error_with_message() -> None:
    err = parse_error(register(call_id=None))
    assert isinstance(err, ValueError)
    assert str(err) == "Missing Call-ID header"


# -- URIs --------------------------------------------------------------------------------


def test_parse_uri_all_parts() -> None:
    uri = parse_uri("sips:alice:secret@Atlanta.COM:5061;transport=TCP;lr;maddr=239.255.255.1?subject=x&p=1")
    assert uri == SipUri(
        "sips", "alice", "atlanta.com", 5061, "secret",
        {"transport": "TCP", "lr": None, "maddr": "239.255.255.1"}, "subject=x&p=1",
    )
    assert uri.transport == "tcp"
    assert uri.host_port() == "atlanta.com:5061"


@pytest.mark.parametrize(
    "text",
    [
        "sip:home.arpa",
        "sip:200@home.arpa",
        "sip:200@192.168.1.21:5062;transport=tcp",
        "sips:alice:pw@example.com;lr",
        "sip:200@[2001:db8::1]:5060;ob",
        "sip:biloxi.com;method=REGISTER?to=sip:bob%40biloxi.com",
    ],
)
def test_uri_print_round_trip(text: str) -> None:
    uri = parse_uri(text)
    assert str(uri) == text
    assert parse_uri(str(uri)) == uri


def test_uri_defaults() -> None:
    assert parse_uri("sip:h").transport == "udp"
    assert parse_uri("sips:h").transport == "tls"
    assert parse_uri("sip:h").host_port() == "h"
    assert parse_uri("SIP:User@H").scheme == "sip"
    assert parse_uri("SIP:User@H").user == "User"


@pytest.mark.parametrize(
    "text",
    [
        "tel:+15551234", "http://x", "sip", "sip:", "sip:@host", "sip:host:", "sip:host:0", "sip:host:65536",
        "sip:host:12x", "sip:host:²", "sip:[::1", "sip:[::1]x", "sip:ho st", "sip:a@b;=x",
    ],
)
def test_bad_uris(text: str) -> None:
    with pytest.raises(SipSyntaxError):
        parse_uri(text)


# RFC 3261 §19.1.4: the equal and the not-equal lists.
RFC_EQUAL = [
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
    ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;security=on"),
    (
        "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
        "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
    ),
    (
        "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
        "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
    ),
]
RFC_NOT_EQUAL = [
    ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
    ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
    ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;security=off"),
]


@pytest.mark.parametrize(("a", "b"), RFC_EQUAL)
def test_rfc3261_equal_uris(a: str, b: str) -> None:
    assert uri_equal(parse_uri(a), parse_uri(b))
    assert uri_equal(parse_uri(b), parse_uri(a))


@pytest.mark.parametrize(("a", "b"), RFC_NOT_EQUAL)
def test_rfc3261_unequal_uris(a: str, b: str) -> None:
    assert not uri_equal(parse_uri(a), parse_uri(b))
    assert not uri_equal(parse_uri(b), parse_uri(a))


def test_uri_equal_more_cases() -> None:
    assert not uri_equal(parse_uri("sip:a@h"), parse_uri("sips:a@h"))
    assert not uri_equal(parse_uri("sip:a:x@h"), parse_uri("sip:a:y@h"))
    assert not uri_equal(parse_uri("sip:a@h;user=phone"), parse_uri("sip:a@h"))
    assert uri_equal(parse_uri("sip:a@h;user=phone"), parse_uri("sip:a@h;USER=Phone"))
    # an escaped reserved character is not the same as the character itself
    assert not uri_equal(parse_uri("sip:a%3Bb@h"), parse_uri("sip:a;b@h"))
    assert uri_equal(parse_uri("sip:a%3bb@h"), parse_uri("sip:a%3Bb@h"))


def test_split_quoted() -> None:
    assert split_quoted('a, "b, c", <sip:x;p=1,2>, d', ",") == ["a", ' "b, c"', " <sip:x;p=1,2>", " d"]
    assert split_quoted(r'"a\", b", c', ",") == [r'"a\", b"', " c"]
    assert split_quoted("a;b", ";") == ["a", "b"]
    with pytest.raises(SipSyntaxError):
        split_quoted('"open, <x>', ",")


def test_parse_params() -> None:
    assert parse_params("") == {}
    assert parse_params('Tag=ABC;lr;Q=0.5;x="a;b"') == {"tag": "ABC", "lr": None, "q": "0.5", "x": '"a;b"'}
    with pytest.raises(SipSyntaxError):
        parse_params("=v")


def test_parse_host_port() -> None:
    assert parse_host_port("Example.COM") == ("example.com", None)
    assert parse_host_port("1.2.3.4:5060") == ("1.2.3.4", 5060)
    assert parse_host_port("[2001:DB8::1]:5061") == ("[2001:db8::1]", 5061)
    assert parse_host_port("[::1]") == ("[::1]", None)
    for bad in ("", ":5060", "h:", "h:0", "h:abc", "[::1]5060"):
        with pytest.raises(SipSyntaxError):
            parse_host_port(bad)


# -- header parsers ----------------------------------------------------------------------


def test_parse_via() -> None:
    via = parse_via("SIP / 2.0 / udp   pc33.Home.arpa:5066;branch=z9hG4bK776;received=1.2.3.4;rport")
    assert (via.transport, via.host, via.port) == ("UDP", "pc33.home.arpa", 5066)
    assert via.branch == "z9hG4bK776"
    assert via.params == {"branch": "z9hG4bK776", "received": "1.2.3.4", "rport": None}
    assert str(via) == "SIP/2.0/UDP pc33.home.arpa:5066;branch=z9hG4bK776;received=1.2.3.4;rport"
    assert parse_via(str(via)) == via
    assert parse_via("SIP/2.0/TCP h").port is None
    assert parse_via("SIP/2.0/TCP h").branch is None


def test_parse_via_rfc4475_whitespace() -> None:
    # RFC 4475 §3.1.1.1 (wsinv): LWS around '/', folded and tabbed
    msg = parse_message(crlf(
        "INVITE sip:vivekg@chair-dnrc.example.com SIP/2.0",
        "Via  : SIP  /   2.0", "  /UDP", "    192.0.2.2;branch=390skdjuw",
        "From: <sip:a@b>;tag=1", "To: <sip:c@d>", "Call-ID: ws", "CSeq: 0009", "  INVITE",
    ))
    via = parse_via(msg.get("Via") or "")
    assert (via.transport, via.host, via.branch) == ("UDP", "192.0.2.2", "390skdjuw")
    assert msg.cseq == (9, "INVITE")


@pytest.mark.parametrize("bad", ["SIP/2.0 h", "SIP/3.0/UDP h", "HTTP/2.0/UDP h", "SIP/2.0/UDP", "SIP/2.0/UDP h:x"])
def test_parse_via_rejects(bad: str) -> None:
    with pytest.raises(SipSyntaxError):
        parse_via(bad)


def test_parse_name_addr_forms() -> None:
    na = parse_name_addr('"Living room" <sip:200@192.168.1.21:5060;transport=udp>;tag=abc;expires=60')
    assert na.display == '"Living room"'
    assert na.uri.params == {"transport": "udp"}  # URI parameters stay in the URI
    assert na.params == {"tag": "abc", "expires": "60"}
    assert na.tag == "abc"
    assert str(na) == '"Living room" <sip:200@192.168.1.21:5060;transport=udp>;tag=abc;expires=60'

    bare = parse_name_addr("sip:200@home.arpa;tag=xyz")  # addr-spec: params are header params
    assert bare.uri.params == {}
    assert bare.tag == "xyz"
    assert bare.display == ""
    assert str(bare) == "<sip:200@home.arpa>;tag=xyz"

    plain = parse_name_addr("Bob <sip:bob@biloxi.com>")
    assert plain.display == "Bob"
    assert plain.params == {}
    inst = parse_name_addr('<sip:a@b>;+sip.instance="<urn:uuid:1234>"')
    assert unquote(inst.params["+sip.instance"] or "") == "<urn:uuid:1234>"


@pytest.mark.parametrize("bad", ["<sip:a@b", "<sip:a@b> junk", "<tel:123>", "sip:a@b?x=y", "nothing"])
def test_parse_name_addr_rejects(bad: str) -> None:
    with pytest.raises(SipSyntaxError):
        parse_name_addr(bad)


def test_parse_cseq() -> None:
    assert parse_cseq("  42   INVITE ") == (42, "INVITE")
    assert parse_cseq(f"{2**31 - 1} ACK") == (2**31 - 1, "ACK")
    for bad in ("", "1", "INVITE", "x INVITE", "-1 INVITE", f"{2**31} INVITE", "²  INVITE"):
        with pytest.raises(SipSyntaxError):
            parse_cseq(bad)


def test_unquote() -> None:
    assert unquote('"abc"') == "abc"
    assert unquote("abc") == "abc"
    assert unquote('"') == '"'


def test_unknown_single_letter_header_lookup_ignores_case() -> None:
    msg = parse_message(register("n: identity-info"))
    assert msg.get("n") == msg.get("N") == "identity-info"


_LINES = [
    "OPTIONS sip:home.arpa SIP/2.0", "Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK1",
    "From: <sip:200@home.arpa>;tag=1{inside}", "To: <sip:home.arpa>", "Call-ID: c1", "CSeq: 1 OPTIONS",
    "Max-Forwards: 70", "Content-Length: 0",
]


@pytest.mark.parametrize("inside", ["\nX-Injected: yes", "\rX-Injected: yes", "\n\rX: y", "\r\x00X: y", "\r"])
def test_bare_line_break_in_a_header_is_refused_unanswered(inside: str) -> None:
    """Found by bench/fuzz.py: a CR or LF inside a value was kept, so a 400 or a relayed
    response carried a header line of the sender's making. Not answered: the answer would
    echo it."""
    raw = ("\r\n".join(_LINES) + "\r\n\r\n").format(inside=inside).encode()
    with pytest.raises(SipParseError) as err:
        parse_message(raw)
    assert err.value.request is None


def test_lf_only_message_still_parses() -> None:
    """The lenient form, every line ended by a bare LF, is not a bare line break."""
    raw = ("\n".join(_LINES) + "\n\n").format(inside="").encode()
    assert parse_message(raw).get("From") == "<sip:200@home.arpa>;tag=1"
