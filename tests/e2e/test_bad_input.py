"""Bad input gets the RFC answer and never crashes, stalls or leaks the daemon."""

from __future__ import annotations

import socket
import time

import pytest

from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import user_block
from tests.support.rawsip import RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

HEAD = (
    "{method} sip:home.arpa SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{branch};rport\r\n"
    "From: <sip:200@home.arpa>;tag=abc\r\n"
    "To: <sip:200@home.arpa>\r\n"
    "Call-ID: bad-{branch}\r\n"
    "CSeq: 1 {method}\r\n"
)


def message(client: RawClient, method: str = "OPTIONS", extra: str = "", drop: str = "",
            body: bytes = b"", branch: str = "1") -> bytes:
    head = HEAD.format(method=method, port=client.port, branch=branch)
    if drop:
        head = "".join(line + "\r\n" for line in head.split("\r\n") if line and not line.startswith(drop))
    head += "Max-Forwards: 70\r\n" if "Max-Forwards" not in extra else ""
    return (head + extra + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.fixture
def pbx(pbx_factory: DaemonFactory):  # type: ignore[no-untyped-def]
    return pbx_factory([user_block("200", one_number=True)])


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_options_keepalive_answered(pbx, transport: str) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(pbx.port, transport)
    client.send(message(client))
    response = client.recv()
    assert response.status == 200
    assert "REGISTER" in (response.get("Allow") or "")
    via = response.get("Via") or ""
    if transport == "udp":
        # RFC 3581: rport filled in with the source port.
        assert f"rport={client.port}" in via and "received=127.0.0.1" in via
    client.close()


CASES = [
    ("missing Call-ID", dict(drop="Call-ID"), 400, "Missing Call-ID header"),
    ("missing CSeq", dict(drop="CSeq"), 400, "Missing CSeq header"),
    ("CSeq method mismatch", dict(extra="", method="OPTIONS"), None, None),
    ("bad Content-Length", dict(extra="Content-Length: x\r\n"), 400, "Content-Length"),
    ("Max-Forwards zero", dict(extra="Max-Forwards: 0\r\n"), 483, "Too Many Hops"),
    ("unknown method", dict(method="FROBNICATE"), 501, "Not Implemented"),
    ("unserved method", dict(method="PUBLISH"), 405, "Method Not Allowed"),
    ("BYE outside a dialog", dict(method="BYE"), 481, None),
]


@pytest.mark.parametrize("name,kw,status,phrase", [c for c in CASES if c[2] is not None],
                         ids=[c[0] for c in CASES if c[2] is not None])
def test_malformed_answered(pbx, name: str, kw: dict, status: int, phrase: str | None) -> None:  # type: ignore[no-untyped-def,type-arg]
    client = RawClient(pbx.port)
    client.send(message(client, **kw))
    response = client.recv()
    assert response.status == status, name
    if phrase:
        assert phrase in response.reason
    client.close()


def test_cseq_mismatch_and_garbage_then_still_serving(pbx) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(pbx.port, timeout=1.0)
    bad = message(client).replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
    client.send(bad)
    response = client.recv()
    assert response.status == 400 and "CSeq" in response.reason
    # Unanswerable: no Via, binary garbage, a response to nobody, an empty datagram.
    for junk in (message(client, drop="Via"), b"\x00\xff" * 300, b"SIP/2.0 200 OK\r\n\r\n", b"",
                 b"INVITE\r\n\r\n", "OPTIONS sip:x SIP/2.0\r\nVia: ü\r\n\r\n".encode("latin-1")):
        client.send(junk)
    with pytest.raises(TimeoutError):
        client.recv()
    client.send(message(client, branch="after"))
    assert client.recv().status == 200
    assert pbx.alive()
    client.close()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_oversize_gets_513(pbx, transport: str) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(pbx.port, transport)
    client.send(message(client, method="OPTIONS", body=b"x" * 20000,
                        extra="Content-Type: text/plain\r\n"))
    response = client.recv()
    assert response.status == 513
    client.close()
    again = RawClient(pbx.port, transport)
    again.send(message(again, branch="2"))
    assert again.recv().status == 200
    again.close()


def test_tcp_framing_split_and_pipelined(pbx) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(pbx.port, "tcp")
    one = message(client, branch="a")
    two = message(client, branch="b")
    client.send(b"\r\n\r\n")  # RFC 5626 keep-alive ping, answered with a pong
    assert client.sock.recv(2) == b"\r\n"
    client.send(one[:30])
    time.sleep(0.1)
    client.send(one[30:] + two)
    first, second = client.recv(), client.recv()
    assert first.status == second.status == 200
    assert "branch=z9hG4bKa" in (first.get("Via") or "")
    assert "branch=z9hG4bKb" in (second.get("Via") or "")
    client.close()


def test_retransmitted_register_answered_once(pbx) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(pbx.port)
    data = client.request("REGISTER", "sip:home.arpa", "200", headers=[
        ("Contact", f"<sip:200@127.0.0.1:{client.port}>")])
    client.send(data)
    first = client.recv()
    client.send(data)  # a retransmission: the same answer, not a new challenge
    second = client.recv()
    assert first.status == second.status == 401
    assert first.get("WWW-Authenticate") == second.get("WWW-Authenticate")
    client.close()


def test_tcp_connection_flood_of_junk_closes_only_that_connection(pbx) -> None:  # type: ignore[no-untyped-def]
    junk = socket.create_connection(("127.0.0.1", pbx.port))
    junk.sendall(b"GARBAGE GARBAGE\r\nNo-Colon-Here\r\n\r\n")
    junk.settimeout(2)
    assert junk.recv(100) == b""  # closed after the unframeable message
    junk.close()
    client = RawClient(pbx.port, "tcp")
    client.send(message(client))
    assert client.recv().status == 200
    client.close()


def test_allow_lists_what_is_accepted_inside_a_call(pbx) -> None:  # type: ignore[no-untyped-def]
    """REFER, NOTIFY and MESSAGE are relayed inside a call, so Allow names them; outside one, 481."""
    client = RawClient(pbx.port)
    client.send(message(client))
    allowed = {m.strip() for m in (client.recv().get("Allow") or "").split(",")}
    assert {"INVITE", "REGISTER", "REFER", "NOTIFY", "MESSAGE", "UPDATE", "INFO"} <= allowed
    assert "SUBSCRIBE" in allowed  # busy lamps (test_blf.py)
    assert "PUBLISH" not in allowed  # answered 405 (above)
    client.send(message(client, method="REFER"))
    assert client.recv().status == 481
    client.close()
