"""Tests for appliance.sip.transaction: RFC 3261 §17 non-INVITE timers, with a fake clock."""

from __future__ import annotations

import itertools

import pytest

from appliance.sip.message import Request, Response, make_response, parse_message
from appliance.sip.transaction import (
    T1,
    T2,
    TIMER_J_UDP,
    ClientTransactions,
    Retransmit,
    ServerTransactions,
    TimedOut,
    client_key,
    server_key,
)

T0 = 5000.0
DEST = ("192.168.1.21", 5060)


def request(
    method: str = "REGISTER",
    branch: str = "z9hG4bKabc123",
    sent_by: str = "192.168.1.21:5060",
    cseq_method: str | None = None,
) -> Request:
    cseq_method = cseq_method or method
    text = (
        f"{method} sip:home.arpa SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {sent_by};branch={branch};rport\r\n"
        "Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKlower\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:200@home.arpa>;tag=f1\r\n"
        "To: <sip:200@home.arpa>\r\n"
        "Call-ID: tx-call\r\n"
        f"CSeq: 7 {cseq_method}\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    msg = parse_message(text.encode())
    assert isinstance(msg, Request)
    return msg


def response_to(req: Request, status: int) -> Response:
    # printed and parsed again, as it would arrive from the network
    msg = parse_message(make_response(req, status).to_bytes())
    assert isinstance(msg, Response)
    return msg


# -- keys ---------------------------------------------------------------------------------


def test_server_key_parts() -> None:
    key = server_key(request())
    assert key == "z9hG4bKabc123|192.168.1.21:5060|REGISTER"


def test_server_key_ack_matches_invite() -> None:
    assert server_key(request("ACK")) == server_key(request("INVITE"))
    assert server_key(request("CANCEL")) != server_key(request("INVITE"))


def test_server_key_distinguishes_sent_by_and_branch() -> None:
    base = server_key(request())
    assert server_key(request(sent_by="192.168.1.22:5060")) != base
    assert server_key(request(branch="z9hG4bKother")) != base
    assert server_key(request(branch="z9hG4bKabc123")) == base


def test_server_key_none_without_rfc3261_branch() -> None:
    assert server_key(request(branch="1234abc")) is None  # RFC 2543 peer
    msg = parse_message(
        b"OPTIONS sip:h SIP/2.0\r\nVia: SIP/2.0/UDP a\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:h>\r\n"
        b"Call-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n"
    )
    assert isinstance(msg, Request)
    assert server_key(msg) is None
    msg.remove("Via")
    assert server_key(msg) is None


def test_client_key_from_top_via_and_cseq_method() -> None:
    req = request()
    assert client_key(response_to(req, 200)) == "z9hG4bKabc123|REGISTER"
    resp = response_to(req, 200)
    resp.remove("Via")
    assert client_key(resp) is None
    resp = response_to(req, 200)
    resp.set("CSeq", "garbage")
    assert client_key(resp) is None
    resp = response_to(req, 200)
    resp.set("Via", "SIP/2.0/UDP 1.2.3.4")
    assert client_key(resp) is None


# -- server transactions ------------------------------------------------------------------


def test_server_absorbs_retransmission_before_any_response() -> None:
    st = ServerTransactions()
    key = server_key(request())
    assert key is not None
    assert st.receive(key, T0) == (False, None)
    assert st.receive(key, T0 + 0.5) == (True, None)
    assert len(st) == 1


def test_server_resends_last_response() -> None:
    st = ServerTransactions()
    key = "k"
    st.receive(key, T0)
    st.respond(key, b"SIP/2.0 100 Trying", final=False, reliable=False, now=T0)
    assert st.receive(key, T0 + 0.5) == (True, b"SIP/2.0 100 Trying")
    st.respond(key, b"SIP/2.0 200 OK", final=True, reliable=False, now=T0 + 1)
    assert st.receive(key, T0 + 1.5) == (True, b"SIP/2.0 200 OK")
    assert st.receive(key, T0 + 3) == (True, b"SIP/2.0 200 OK")


def test_server_udp_linger_is_timer_j_after_final_response() -> None:
    assert TIMER_J_UDP == 64 * T1 == 32.0
    st = ServerTransactions()
    st.receive("k", T0)
    st.respond("k", b"final", final=True, reliable=False, now=T0 + 2)
    assert st.next_deadline() == T0 + 2 + TIMER_J_UDP
    st.expire(T0 + 2 + TIMER_J_UDP - 0.01)
    assert st.receive("k", T0 + 33) == (True, b"final")
    st.expire(T0 + 2 + TIMER_J_UDP)
    assert len(st) == 0
    assert st.next_deadline() is None
    assert st.receive("k", T0 + 35) == (False, None)  # new again


def test_server_final_over_tcp_ends_at_once() -> None:
    st = ServerTransactions()
    st.receive("k", T0)
    st.respond("k", b"provisional", final=False, reliable=True, now=T0)
    assert len(st) == 1
    st.respond("k", b"final", final=True, reliable=True, now=T0)
    assert len(st) == 0
    assert st.receive("k", T0 + 0.1) == (False, None)


def test_server_expire_in_deadline_order() -> None:
    st = ServerTransactions(linger=10)
    st.receive("a", T0)
    st.receive("b", T0 + 1)
    st.respond("a", b"A", final=True, reliable=False, now=T0 + 5)  # a now lingers until T0+15
    assert st.next_deadline() == T0 + 11
    st.expire(T0 + 11)
    assert st.receive("b", T0 + 12) == (False, None)  # b was forgotten (and is new again)
    assert st.receive("a", T0 + 12) == (True, b"A")
    st.expire(T0 + 15)
    assert st.receive("a", T0 + 16) == (False, None)


def test_server_capacity_forgets_oldest() -> None:
    st = ServerTransactions(capacity=2)
    for key in ("a", "b", "c"):
        assert st.receive(key, T0) == (False, None)
    assert len(st) == 2
    assert st.receive("b", T0) == (True, None)
    assert st.receive("c", T0) == (True, None)
    assert st.receive("a", T0)[0] is False  # forgotten: processed again


def test_server_default_capacity_bounds_memory() -> None:
    """Under 500 registrations a second the cache is full: its default size is its memory (issue 10)."""
    st = ServerTransactions()
    response = b"SIP/2.0 401 Unauthorized\r\n" + b"x" * 600
    for i in range(40000):
        key = f"z9hG4bK{i}x{i}|127.0.0.1:40000|REGISTER"
        st.receive(key, T0 + i / 1000)
        st.respond(key, response, final=True, reliable=False, now=T0 + i / 1000)
    assert len(st) <= 16384
    key = "z9hG4bK39999x39999|127.0.0.1:40000|REGISTER"
    assert st.receive(key, T0 + 40) == (True, response)  # recent ones are still answered


# -- client transactions ------------------------------------------------------------------


def run_clock(ct: ClientTransactions[tuple[str, int]], until: float) -> list[tuple[float, object]]:
    """Fire every timer up to `until`, as the edge's loop would; return (time, action)."""
    fired: list[tuple[float, object]] = []
    while (deadline := ct.next_deadline()) is not None and deadline <= until:
        for action in ct.on_timer(deadline):
            fired.append((deadline, action))
    return fired


def test_client_udp_timer_e_doubles_to_t2_then_timer_f() -> None:
    ct: ClientTransactions[tuple[str, int]] = ClientTransactions()
    key = ct.start("z9hG4bK1", "OPTIONS", b"OPTIONS ...", DEST, reliable=False, now=T0)
    assert key == "z9hG4bK1|OPTIONS"
    assert ct.next_deadline() == T0 + T1
    assert ct.on_timer(T0 + T1 - 0.01) == []
    fired = run_clock(ct, T0 + 100)
    sends = [t - T0 for t, a in fired if isinstance(a, Retransmit)]
    assert sends == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    gaps = [b - a for a, b in itertools.pairwise([0.0, *sends])]
    assert gaps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert max(gaps) == T2
    assert all(a == Retransmit(b"OPTIONS ...", DEST) for _, a in fired[:-1])
    assert fired[-1] == (T0 + 64 * T1, TimedOut(key))
    assert len(ct) == 0
    assert ct.next_deadline() is None


def test_client_tcp_never_retransmits_but_times_out() -> None:
    ct: ClientTransactions[tuple[str, int]] = ClientTransactions()
    key = ct.start("z9hG4bK2", "OPTIONS", b"x", DEST, reliable=True, now=T0)
    assert ct.next_deadline() == T0 + 64 * T1
    assert ct.on_timer(T0 + 31.9) == []
    assert run_clock(ct, T0 + 100) == [(T0 + 32, TimedOut(key))]


def test_client_custom_timeout() -> None:
    ct: ClientTransactions[tuple[str, int]] = ClientTransactions()
    key = ct.start("z9hG4bK3", "OPTIONS", b"x", DEST, reliable=False, now=T0, timeout=2.0)
    fired = run_clock(ct, T0 + 10)
    assert [(t - T0, type(a).__name__) for t, a in fired] == [
        (0.5, "Retransmit"), (1.5, "Retransmit"), (2.0, "TimedOut")
    ]
    assert fired[-1][1] == TimedOut(key)


def test_client_final_response_completes() -> None:
    req = request("OPTIONS", branch="z9hG4bK4")
    ct: ClientTransactions[tuple[str, int]] = ClientTransactions()
    key = ct.start("z9hG4bK4", "OPTIONS", req.to_bytes(), DEST, reliable=False, now=T0)
    assert ct.on_timer(T0 + 0.5) == [Retransmit(req.to_bytes(), DEST)]
    assert ct.receive(response_to(req, 200)) == key
    assert len(ct) == 0
    assert run_clock(ct, T0 + 100) == []
    # a retransmitted final response is no longer ours
    assert ct.receive(response_to(req, 200)) is None


@pytest.mark.parametrize("status", [404, 408, 500, 603])
def test_client_error_responses_complete_too(status: int) -> None:
    req = request("OPTIONS", branch="z9hG4bK5")
    ct: ClientTransactions[tuple[str, int]] = ClientTransactions()
    key = ct.start("z9hG4bK5", "OPTIONS", b"x", DEST, reliable=True, now=T0)
    assert ct.receive(response_to(req, status)) == key
    assert len(ct) == 0


def test_client_provisional_moves_to_t2_retransmits() -> None:
    req = request("OPTIONS", branch="z9hG4bK6")
    ct: ClientTransactions[tuple[str, int]] = ClientTransactions()
    key = ct.start("z9hG4bK6", "OPTIONS", b"x", DEST, reliable=False, now=T0)
    assert ct.receive(response_to(req, 100)) is None  # not final: still running
    assert len(ct) == 1
    fired = run_clock(ct, T0 + 100)
    sends = [t - T0 for t, a in fired if isinstance(a, Retransmit)]
    # the pending Timer E fires, then every T2 (§17.1.2.2, Proceeding)
    assert sends[:3] == [0.5, 4.5, 8.5]
    assert all(b - a == T2 for a, b in itertools.pairwise(sends))
    assert fired[-1] == (T0 + 32, TimedOut(key))


def test_client_ignores_responses_not_its_own() -> None:
    ct: ClientTransactions[tuple[str, int]] = ClientTransactions()
    ct.start("z9hG4bK7", "OPTIONS", b"x", DEST, reliable=False, now=T0)
    assert ct.receive(response_to(request("OPTIONS", branch="z9hG4bKother"), 200)) is None
    # same branch, other method (a CANCEL's response must not end the INVITE's)
    assert ct.receive(response_to(request("NOTIFY", branch="z9hG4bK7"), 200)) is None
    assert len(ct) == 1


def test_client_late_timer_sends_once_not_a_burst() -> None:
    ct: ClientTransactions[tuple[str, int]] = ClientTransactions()
    ct.start("z9hG4bK8", "OPTIONS", b"x", DEST, reliable=False, now=T0)
    actions = ct.on_timer(T0 + 10)  # the loop was busy for 10 s
    assert actions == [Retransmit(b"x", DEST)]
    assert ct.next_deadline() == T0 + 11  # the doubled interval, from now


def test_client_many_transactions_independent() -> None:
    ct: ClientTransactions[tuple[str, int]] = ClientTransactions()
    a = ct.start("z9hG4bKa", "OPTIONS", b"a", ("a", 1), reliable=False, now=T0)
    b = ct.start("z9hG4bKb", "OPTIONS", b"b", ("b", 2), reliable=True, now=T0 + 1)
    assert len(ct) == 2
    assert ct.on_timer(T0 + 0.5) == [Retransmit(b"a", ("a", 1))]
    assert ct.receive(response_to(request("OPTIONS", branch="z9hG4bKa"), 200)) == a
    fired = run_clock(ct, T0 + 100)
    assert fired == [(T0 + 33, TimedOut(b))]
