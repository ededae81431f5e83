"""Tests for appliance.sip.invite_transaction: RFC 3261 §17 INVITE transactions, fake clock."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from appliance.sip.invite_transaction import (
    TIMER_B,
    TIMER_D_UDP,
    TIMER_H,
    TIMER_L,
    InviteClient,
    InviteServer,
    PassUp,
    Send,
    State,
    TimedOut,
    ack_for,
)
from appliance.sip.message import Request, Response, make_response, parse_message
from appliance.sip.transaction import T1, T2, T4

T0 = 1000.0
DEST = "device-1"


def invite(route: bool = False) -> Request:
    text = (
        "INVITE sip:200@192.168.1.21:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 192.168.1.2:5060;branch=z9hG4bKproxy1;rport\r\n"
        "Via: SIP/2.0/UDP 192.168.1.10:5062;branch=z9hG4bKcaller1;rport\r\n"
        "Max-Forwards: 69\r\n"
        'From: "Grandpa" <sip:100@home.arpa>;tag=caller\r\n'
        "To: <sip:200@home.arpa>\r\n"
        "Call-ID: invite-tx\r\n"
        "CSeq: 4 INVITE\r\n"
        + ("Route: <sip:10.0.0.9;lr>\r\nRoute: <sip:10.0.0.8;lr>\r\n" if route else "")
        + "Contact: <sip:100@192.168.1.10:5062>\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    msg = parse_message(text.encode())
    assert isinstance(msg, Request)
    return msg


def response(req: Request, status: int, tag: str = "dev1") -> Response:
    # printed and parsed again, as it would arrive from the network
    msg = parse_message(make_response(req, status, to_tag=tag).to_bytes())
    assert isinstance(msg, Response)
    return msg


def sends(actions: Sequence[object]) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, Send)]


def run_until(tx: InviteClient[str] | InviteServer[str], until: float) -> list[tuple[float, object]]:
    """Fire every timer due up to `until`, as the edge's timer wheel would; (time, action)."""
    fired: list[tuple[float, object]] = []
    for _ in range(1000):
        deadline = tx.next_deadline()
        if deadline is None or deadline > until:
            return fired
        fired += [(deadline, a) for a in tx.on_timer(deadline)]
    raise AssertionError("timers never settle")


# -- InviteClient -------------------------------------------------------------------------


def test_client_start_sends_the_request() -> None:
    req = invite()
    tx: InviteClient[str] = InviteClient(req, DEST, reliable=False, now=T0)
    assert tx.start() == [Send(req.to_bytes(), DEST)]
    assert tx.state is State.CALLING
    assert not tx.done


def test_client_timer_a_doubles_from_t1_over_udp_until_timer_b() -> None:
    req = invite()
    tx: InviteClient[str] = InviteClient(req, DEST, reliable=False, now=T0)
    tx.start()
    assert tx.next_deadline() == T0 + T1
    assert tx.on_timer(T0 + T1 - 0.001) == []  # not yet
    fired = run_until(tx, T0 + 100)
    resent = [t - T0 for t, a in fired if isinstance(a, Send)]
    # Timer A: T1, 2T1, 4T1, ... with no T2 cap (§17.1.1.2), until Timer B = 64*T1.
    assert resent == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert all(a == Send(req.to_bytes(), DEST) for _, a in fired if isinstance(a, Send))
    timed_out = [t for t, a in fired if isinstance(a, TimedOut)]
    assert timed_out == [T0 + TIMER_B] == [T0 + 32.0]
    assert tx.done and tx.next_deadline() is None


def test_client_no_retransmission_over_tcp_only_timer_b() -> None:
    tx: InviteClient[str] = InviteClient(invite(), DEST, reliable=True, now=T0)
    tx.start()
    assert tx.next_deadline() == T0 + TIMER_B
    fired = run_until(tx, T0 + 100)
    assert [a for _, a in fired] == [TimedOut()]
    assert tx.state is State.TERMINATED


def test_client_provisional_stops_retransmission_and_timer_b() -> None:
    req = invite()
    tx: InviteClient[str] = InviteClient(req, DEST, reliable=False, now=T0)
    tx.start()
    assert len(sends(tx.on_timer(T0 + T1))) == 1  # one retransmission before the 180
    ringing = response(req, 180)
    assert tx.on_response(ringing, T0 + 0.7) == [PassUp(ringing)]
    assert tx.state is State.PROCEEDING
    assert tx.next_deadline() is None  # Timer C is the proxy's ring timeout
    assert tx.on_timer(T0 + 60) == []
    again = response(req, 183)
    assert tx.on_response(again, T0 + 1) == [PassUp(again)]  # further provisionals pass up


def test_client_100_trying_also_stops_retransmission() -> None:
    req = invite()
    tx: InviteClient[str] = InviteClient(req, DEST, reliable=False, now=T0)
    tx.start()
    trying = response(req, 100)
    assert tx.on_response(trying, T0 + 0.1) == [PassUp(trying)]
    assert tx.next_deadline() is None


def test_client_non_2xx_is_acked_per_17_1_1_3() -> None:
    req = invite(route=True)
    tx: InviteClient[str] = InviteClient(req, DEST, reliable=False, now=T0)
    tx.start()
    busy = response(req, 486, tag="busytag")
    actions = tx.on_response(busy, T0 + 1)
    assert len(actions) == 2
    ack_send, passed = actions
    assert passed == PassUp(busy)
    assert isinstance(ack_send, Send) and ack_send.dest == DEST
    ack = parse_message(ack_send.data)
    assert isinstance(ack, Request)
    assert ack.method == "ACK"
    assert ack.uri == req.uri
    assert ack.get_all("Via") == ["SIP/2.0/UDP 192.168.1.2:5060;branch=z9hG4bKproxy1;rport"]  # top Via only
    assert ack.get("To") == "<sip:200@home.arpa>;tag=busytag"
    assert ack.get("From") == req.get("From")
    assert ack.call_id == req.call_id
    assert ack.get("CSeq") == "4 ACK"
    assert ack.get_all("Route") == ["<sip:10.0.0.9;lr>", "<sip:10.0.0.8;lr>"]
    assert ack.get("Contact") is None
    assert tx.state is State.COMPLETED


def test_client_timer_d_absorbs_retransmitted_finals_and_resends_ack() -> None:
    req = invite()
    tx: InviteClient[str] = InviteClient(req, DEST, reliable=False, now=T0)
    tx.start()
    busy = response(req, 486)
    first = tx.on_response(busy, T0 + 1)
    ack = first[0]
    assert isinstance(ack, Send)
    assert tx.next_deadline() == T0 + 1 + TIMER_D_UDP == T0 + 33.0  # no more Timer A either
    assert tx.on_response(busy, T0 + 2) == [ack]  # resent ACK, not passed up again
    assert tx.on_response(response(req, 180), T0 + 3) == []
    assert tx.on_timer(T0 + 32.9) == []
    assert not tx.done
    assert tx.on_timer(T0 + 33.0) == []  # Timer D ends it quietly
    assert tx.done
    assert tx.on_response(busy, T0 + 34) == []


def test_client_timer_d_is_zero_over_tcp() -> None:
    req = invite()
    tx: InviteClient[str] = InviteClient(req, DEST, reliable=True, now=T0)
    tx.start()
    tx.on_response(response(req, 603), T0 + 1)
    assert tx.next_deadline() == T0 + 1
    assert tx.on_timer(T0 + 1) == []
    assert tx.done


def test_client_2xx_goes_to_accepted_and_retransmissions_pass_up() -> None:
    req = invite()
    tx: InviteClient[str] = InviteClient(req, DEST, reliable=False, now=T0)
    tx.start()
    ok = response(req, 200)
    assert tx.on_response(ok, T0 + 2) == [PassUp(ok)]  # no ACK: the 2xx ACK is end to end
    assert tx.state is State.ACCEPTED
    assert tx.on_response(ok, T0 + 3) == [PassUp(ok)]  # retransmitted 2xx: passed up again
    other = response(req, 200, tag="dev2")
    assert tx.on_response(other, T0 + 4) == [PassUp(other)]  # a 2xx from another fork too
    assert tx.on_response(response(req, 486), T0 + 5) == []  # a non-2xx is ignored in Accepted
    assert tx.on_response(response(req, 180), T0 + 5) == []
    assert tx.next_deadline() == T0 + 2 + TIMER_L  # Timer M (RFC 6026)
    assert run_until(tx, T0 + 100) == []
    assert tx.done
    assert tx.on_response(ok, T0 + 101) == []


def test_client_cancel_sent_bounds_a_proceeding_transaction() -> None:
    req = invite()
    tx: InviteClient[str] = InviteClient(req, DEST, reliable=False, now=T0)
    tx.start()
    tx.on_response(response(req, 180), T0 + 0.2)
    assert tx.next_deadline() is None
    tx.cancel_sent(T0 + 5)
    assert tx.next_deadline() == T0 + 5 + TIMER_B
    assert [a for _, a in run_until(tx, T0 + 100)] == [TimedOut()]
    assert tx.done


def test_ack_for_uses_request_to_when_response_has_none() -> None:
    req = invite()
    resp = Response(500, "Server Internal Error", [("Via", req.get("Via") or "")])
    ack = ack_for(req, resp)
    assert ack.get("To") == "<sip:200@home.arpa>"
    assert ack.get("Max-Forwards") == "70"


# -- InviteServer -------------------------------------------------------------------------


def test_server_retransmitted_request_gets_last_provisional() -> None:
    req = invite()
    srv: InviteServer[str] = InviteServer(DEST, reliable=False)
    assert srv.on_retransmission() == []  # nothing sent yet
    trying = make_response(req, 100)
    assert srv.respond(trying, T0) == [Send(trying.to_bytes(), DEST)]
    assert srv.on_retransmission() == [Send(trying.to_bytes(), DEST)]
    ringing = make_response(req, 180, to_tag="t")
    assert srv.respond(ringing, T0 + 0.1) == [Send(ringing.to_bytes(), DEST)]
    assert srv.on_retransmission() == [Send(ringing.to_bytes(), DEST)]
    assert srv.state is State.PROCEEDING
    assert srv.next_deadline() is None  # provisionals are not retransmitted by timer
    assert srv.final_status is None


def test_server_timer_g_retransmits_non_2xx_capped_at_t2_until_timer_h() -> None:
    req = invite()
    srv: InviteServer[str] = InviteServer(DEST, reliable=False)
    srv.respond(make_response(req, 180, to_tag="t"), T0)
    busy = make_response(req, 486, to_tag="t")
    assert srv.respond(busy, T0) == [Send(busy.to_bytes(), DEST)]
    assert srv.state is State.COMPLETED
    assert srv.final_status == 486
    fired = run_until(srv, T0 + 100)
    resent = [t - T0 for t, a in fired if isinstance(a, Send)]
    assert resent[:6] == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5]  # T1, 2T1, 4T1, then every T2
    gaps = [b - a for a, b in itertools.pairwise(resent)]
    assert max(gaps) == T2
    assert resent[-1] < TIMER_H
    assert all(a == Send(busy.to_bytes(), DEST) for _, a in fired if isinstance(a, Send))
    assert [t for t, a in fired if isinstance(a, TimedOut)] == [T0 + TIMER_H]
    assert srv.done


def test_server_retransmitted_invite_in_completed_resends_final() -> None:
    req = invite()
    srv: InviteServer[str] = InviteServer(DEST, reliable=False)
    busy = make_response(req, 486, to_tag="t")
    srv.respond(busy, T0)
    assert srv.on_retransmission() == [Send(busy.to_bytes(), DEST)]


def test_server_no_timer_g_over_tcp() -> None:
    req = invite()
    srv: InviteServer[str] = InviteServer(DEST, reliable=True)
    srv.respond(make_response(req, 486, to_tag="t"), T0)
    assert srv.next_deadline() == T0 + TIMER_H
    assert [a for _, a in run_until(srv, T0 + 100)] == [TimedOut()]


@pytest.mark.parametrize(("reliable", "linger"), [(False, T4), (True, 0.0)])
def test_server_ack_confirms_and_timer_i_ends(reliable: bool, linger: float) -> None:
    req = invite()
    srv: InviteServer[str] = InviteServer(DEST, reliable=reliable)
    srv.respond(make_response(req, 603, to_tag="t"), T0)
    assert srv.on_ack(T0 + 1) == []
    assert srv.state is State.CONFIRMED
    assert srv.next_deadline() == T0 + 1 + linger
    assert srv.on_retransmission() == []  # absorbed in Confirmed
    assert [a for _, a in run_until(srv, T0 + 100)] == []  # no retransmission, no TimedOut
    assert srv.done


def test_server_ack_before_final_is_ignored() -> None:
    req = invite()
    srv: InviteServer[str] = InviteServer(DEST, reliable=False)
    srv.respond(make_response(req, 100), T0)
    srv.on_ack(T0 + 0.1)
    assert srv.state is State.PROCEEDING


def test_server_2xx_accepted_then_non_2xx_ignored() -> None:
    req = invite()
    srv: InviteServer[str] = InviteServer(DEST, reliable=False)
    ok = make_response(req, 200, to_tag="t")
    assert srv.respond(ok, T0) == [Send(ok.to_bytes(), DEST)]
    assert srv.state is State.ACCEPTED
    assert srv.final_status == 200
    assert srv.respond(make_response(req, 486, to_tag="u"), T0 + 0.1) == []
    assert srv.respond(make_response(req, 180, to_tag="u"), T0 + 0.1) == []
    again = make_response(req, 200, to_tag="u")
    assert srv.respond(again, T0 + 0.2) == [Send(again.to_bytes(), DEST)]  # further 2xx pass
    assert srv.final_status == 200
    assert srv.on_retransmission() == []  # the TU retransmits 2xx, not the transaction
    assert srv.next_deadline() == T0 + TIMER_L
    assert run_until(srv, T0 + 100) == []  # Timer L: no TimedOut, no retransmission
    assert srv.done
    assert srv.respond(ok, T0 + 101) == []


def test_server_final_after_terminated_is_dropped() -> None:
    req = invite()
    srv: InviteServer[str] = InviteServer(DEST, reliable=True)
    srv.respond(make_response(req, 486, to_tag="t"), T0)
    run_until(srv, T0 + 100)
    assert srv.respond(make_response(req, 200, to_tag="t"), T0 + 101) == []
