"""The stateless relay sends a response only where the box recorded its request came from."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest

from appliance.edge.relay import RECORD_LIFETIME, STATELESS_PREFIX, StatelessRelay
from appliance.sip.headers import parse_via
from appliance.sip.message import Request, Response, parse_message
from appliance.sip.registrar import Flow
from tests.support.fake_network import FakeNetwork

CALLER = Flow("udp", "127.0.0.10", 5070, "127.0.0.1:5060")
CALLEE = Flow("udp", "127.0.0.20", 5080, "127.0.0.1:5060")
STRANGER = Flow("udp", "127.0.0.66", 4000, "127.0.0.1:5060")


class FakeEdge(FakeNetwork):
    """What the relay uses of the network; what it sends is kept as bytes."""

    parsed = False


def make_relay(**kw: Any) -> tuple[StatelessRelay, FakeEdge]:
    edge = FakeEdge()
    return StatelessRelay(edge, lambda flow: False, **kw), edge


def bye(branch: str = "z9hG4bKcaller1", via_host: str = "192.168.1.10:5060", method: str = "BYE") -> Request:
    data = (
        f"{method} sip:200@127.0.0.20:5080 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {via_host};branch={branch};rport=5070;received=127.0.0.10\r\n"
        "Route: <sip:127.0.0.1:5060;lr>\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:100@home.arpa>;tag=a\r\n"
        "To: <sip:200@home.arpa>;tag=b\r\n"
        "Call-ID: call-1\r\n"
        f"CSeq: 2 {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


def answer(request_bytes: bytes) -> Response:
    """The callee's 200: the request's Vias, top first, as a UAS copies them."""
    request = parse_message(request_bytes)
    lines = ["SIP/2.0 200 OK"] + [f"Via: {v}" for v in request.get_all("Via")]
    lines += [f"{n}: {request.get(n)}" for n in ("From", "To", "Call-ID", "CSeq")]
    message = parse_message(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode())
    assert isinstance(message, Response)
    return message


def forged(branch: str, second_via: str) -> Response:
    data = (
        "SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch={branch}\r\n"
        f"Via: SIP/2.0/UDP {second_via};branch=z9hG4bKvictim;rport\r\n"
        "From: <sip:100@home.arpa>;tag=a\r\nTo: <sip:200@home.arpa>;tag=b\r\n"
        "Call-ID: forged\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    message = parse_message(data)
    assert isinstance(message, Response)
    return message


def top_branch(message: Response) -> str:
    return parse_via(message.get("Via") or "").branch or ""


def relay_bye(relay: StatelessRelay, edge: FakeEdge, now: float, **kw: str) -> Response:
    """Relay a BYE from the caller to the callee at `now`; the callee's 200 for it."""
    assert relay.forward(bye(**kw), CALLEE, CALLER, now)
    data, dest = edge.sent.pop()
    assert dest == CALLEE
    return answer(data)


def test_response_goes_to_the_recorded_flow_not_the_next_via() -> None:
    relay, edge = make_relay()
    response = relay_bye(relay, edge, 0.0)
    assert top_branch(response).startswith(STATELESS_PREFIX)
    relay.backward(response, top_branch(response), CALLEE, 1.0)
    [(data, dest)] = edge.sent
    assert dest == CALLER  # where the BYE came from, not 192.168.1.10 from its Via
    out = parse_message(data)
    assert len(out.get_all("Via")) == 1 and "z9hG4bKcaller1" in (out.get("Via") or "")


def test_response_over_tcp_goes_back_on_the_requests_connection() -> None:
    relay, edge = make_relay()
    caller_tcp = Flow("tcp", "127.0.0.10", 40000, "127.0.0.1:5060")
    assert relay.forward(bye(), CALLEE, caller_tcp, 0.0)
    response = answer(edge.sent.pop()[0])
    relay.backward(response, top_branch(response), CALLEE, 0.5)
    assert [dest for _, dest in edge.sent] == [caller_tcp]


@pytest.mark.parametrize("second_via", ["127.0.0.55:5999", "relay-victim.invalid:5999", "\u00fcber.example:5060",
                                        "[::1]:5999", "127.0.0.55:notaport"])
def test_forged_response_with_our_prefix_goes_nowhere(second_via: str) -> None:
    relay, edge = make_relay()
    relay_bye(relay, edge, 0.0)  # a real record exists, for another branch
    branch = STATELESS_PREFIX + "0123456789abcdef0123"
    relay.backward(forged(branch, second_via), branch, STRANGER, 1.0)
    assert edge.sent == []


def test_host_name_in_the_next_via_of_a_real_response_raises_nothing() -> None:
    relay, edge = make_relay()
    response = relay_bye(relay, edge, 0.0, via_host="caller.example:5060")
    relay.backward(response, top_branch(response), CALLEE, 1.0)
    assert [dest for _, dest in edge.sent] == [CALLER]


def test_records_expire_after_a_transaction_lifetime() -> None:
    assert RECORD_LIFETIME == 32.0
    relay, edge = make_relay()
    response = relay_bye(relay, edge, 100.0)
    relay.backward(response, top_branch(response), CALLEE, 100.0 + 31.9)
    assert len(edge.sent) == 1  # still alive (and refreshed by this response)
    edge.sent.clear()
    late = relay_bye(relay, edge, 200.0, branch="z9hG4bKother")
    relay.backward(late, top_branch(late), CALLEE, 232.0)
    assert edge.sent == []
    assert relay._returns == {}


def test_a_retransmitted_request_gets_the_same_branch_and_refreshes_the_record() -> None:
    relay, edge = make_relay()
    first = relay_bye(relay, edge, 0.0)
    again = relay_bye(relay, edge, 20.0)
    assert top_branch(first) == top_branch(again)
    relay.backward(again, top_branch(again), CALLEE, 45.0)  # 45 s after the first, 25 after the second
    assert [dest for _, dest in edge.sent] == [CALLER]


def test_an_ack_is_relayed_but_leaves_no_record() -> None:
    relay, edge = make_relay()
    assert relay.forward(bye(method="ACK"), CALLEE, None, 0.0)
    assert len(edge.sent) == 1 and relay._returns == {}


def test_records_are_bounded_oldest_dropped_first() -> None:
    relay, edge = make_relay(max_records=10)
    responses = [relay_bye(relay, edge, float(i) / 100, branch=f"z9hG4bKb{i}") for i in range(25)]
    assert len(relay._returns) == 10
    relay.backward(responses[0], top_branch(responses[0]), CALLEE, 1.0)
    assert edge.sent == []
    relay.backward(responses[-1], top_branch(responses[-1]), CALLEE, 1.0)
    assert [dest for _, dest in edge.sent] == [CALLER]


def test_a_flood_of_forged_responses_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    relay, edge = make_relay()
    with caplog.at_level(logging.DEBUG, logger="homepbx.relay"):
        for i in range(200):
            branch = f"{STATELESS_PREFIX}{i:020d}"
            relay.backward(forged(branch, "relay-victim.invalid:5999"), branch, STRANGER, i / 100)
    assert edge.sent == []
    [record] = caplog.records
    assert record.levelno == logging.WARNING and not record.exc_info
    assert "event=relay_dropped" in record.getMessage() and "reason=unknown_branch" in record.getMessage()


def test_a_response_whose_flow_is_gone_is_dropped_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    relay, edge = make_relay()
    response = relay_bye(relay, edge, 0.0)
    edge.send = lambda data, flow: False  # type: ignore[method-assign]  # e.g. its TCP connection closed
    with caplog.at_level(logging.WARNING, logger="homepbx.relay"):
        for t in (1.0, 1.5, 2.0):
            relay.backward(answer(response.to_bytes()), top_branch(response), CALLEE, t)
    [record] = caplog.records
    assert "reason=unroutable" in record.getMessage() and "to=udp:127.0.0.10:5070" in record.getMessage()


# -- a media worker's SDP leaving the box ------------------------------------------------------

WORKER = Flow("udp", "127.0.0.1", 48000, "0.0.0.0:5060")
LAN_PHONE = Flow("udp", "192.168.1.30", 5062, "0.0.0.0:5060")
LOCAL_PHONE = Flow("udp", "127.0.0.1", 5090, "0.0.0.0:5060")
V6_PHONE = Flow("udp", "fd00::30", 5062, "[::]:5060")
WORKER_SDP = (b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=pjmedia\r\nt=0 0\r\nm=audio 10002 RTP/AVP 0\r\n"
              b"c=IN IP4 127.0.0.1\r\na=rtcp:10003 IN IP4 127.0.0.1\r\na=sendrecv\r\n")


class WildcardEdge(FakeEdge):
    """A wildcard listener: the box is 192.168.1.2 to the LAN, 127.0.0.1 to itself."""

    addresses: ClassVar[list[str]] = ["0.0.0.0:5060"]

    def local_address(self, flow: Flow) -> tuple[str, int]:
        if ":" in flow.host:
            return "fd00::2", 5060
        return ("127.0.0.1" if flow.host.startswith("127.") else "192.168.1.2"), 5060


def worker_relay() -> tuple[StatelessRelay, WildcardEdge]:
    edge = WildcardEdge()
    return StatelessRelay(edge, lambda flow: flow == WORKER), edge


def with_sdp(message: Request | Response, body: bytes = WORKER_SDP, content_type: str = "application/sdp") -> None:
    message.set("Content-Type", content_type)
    message.body = body


def test_a_workers_sdp_to_a_lan_handset_names_the_box_lan_address() -> None:
    relay, edge = worker_relay()
    reinvite = bye(method="INVITE")  # the worker's re-INVITE, say
    with_sdp(reinvite)
    assert relay.forward(reinvite, LAN_PHONE, WORKER, 0.0, WORKER)
    data, dest = edge.sent.pop()
    sent = parse_message(data)
    assert dest == LAN_PHONE and b"127.0.0.1" not in sent.body
    assert sent.body == WORKER_SDP.replace(b"127.0.0.1", b"192.168.1.2")
    assert sent.get("Content-Length") == str(len(sent.body))
    # The handset's 200 (its own SDP) goes back to the worker untouched.
    ok = answer(data)
    with_sdp(ok, b"v=0\r\nc=IN IP4 192.168.1.30\r\n")
    relay.backward(ok, top_branch(ok), LAN_PHONE, 0.1)
    data, dest = edge.sent.pop()
    assert dest == WORKER and parse_message(data).body == b"v=0\r\nc=IN IP4 192.168.1.30\r\n"


def test_the_workers_answer_to_a_lan_handsets_reinvite_names_the_box_lan_address() -> None:
    relay, edge = worker_relay()
    reinvite = bye(method="INVITE")
    with_sdp(reinvite, b"v=0\r\nc=IN IP4 192.168.1.30\r\n")
    assert relay.forward(reinvite, WORKER, LAN_PHONE, 0.0, LAN_PHONE)
    data, dest = edge.sent.pop()
    assert dest == WORKER and parse_message(data).body == b"v=0\r\nc=IN IP4 192.168.1.30\r\n"
    ok = answer(data)
    with_sdp(ok)
    relay.backward(ok, top_branch(ok), WORKER, 0.1)
    data, dest = edge.sent.pop()
    sent = parse_message(data)
    assert dest == LAN_PHONE and sent.body == WORKER_SDP.replace(b"127.0.0.1", b"192.168.1.2")
    assert sent.get("Content-Length") == str(len(sent.body))


@pytest.mark.parametrize("source, dest, content_type", [
    (WORKER, LOCAL_PHONE, "application/sdp"),  # a handset on the box itself: 127.0.0.1 is right
    (WORKER, V6_PHONE, "application/sdp"),  # media are IPv4: nothing better to name
    (WORKER, LAN_PHONE, "text/plain"),  # not an SDP
    (LAN_PHONE, WORKER, "application/sdp"),  # towards the worker: internal hop
    (LOCAL_PHONE, LAN_PHONE, "application/sdp"),  # handset to handset (no worker): theirs
])
def test_bodies_left_as_they_are(source: Flow, dest: Flow, content_type: str) -> None:
    relay, _ = worker_relay()
    message = bye(method="INVITE")
    with_sdp(message, content_type=content_type)
    assert relay.body_between(message, source, dest) is message.body


def test_a_request_relayed_without_its_source_keeps_its_body() -> None:
    relay, edge = worker_relay()
    message = bye(method="INVITE")
    with_sdp(message)
    assert relay.forward(message, LAN_PHONE, WORKER, 0.0)
    assert parse_message(edge.sent.pop()[0]).body == WORKER_SDP
