"""direct_bye: the dialog facts a media worker keeps, the BYE built from them, and the
UDP exchange with a party on loopback (a real socket playing the handset)."""

from __future__ import annotations

import socket
import threading
import time

from appliance.media import direct_bye
from appliance.sip.message import Request, Response, parse_message

CALL_ID = "abc123"


CALLER_VIA = "SIP/2.0/UDP 10.0.0.7:5062;rport=40001;received=192.0.2.9;branch=z9hG4bKc"


def a_leg_invite(caller_via: str = CALLER_VIA) -> Request:
    """The A-leg INVITE as the worker gets it: the edge's Via on top of the caller's."""
    return Request("INVITE", "sip:200@127.0.0.1:5070", [
        ("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKedge"),
        ("Via", caller_via),
        ("From", "<sip:100@home.arpa>;tag=caller1"),
        ("To", "<sip:200@home.arpa>"),
        ("Call-ID", CALL_ID),
        ("CSeq", "7 INVITE"),
        ("Contact", "<sip:100@10.0.0.7:5062;ob>"),
    ])


def test_incoming_reaches_the_caller_where_the_edge_saw_it() -> None:
    dialog = direct_bye.incoming(a_leg_invite())
    assert dialog is not None
    assert (dialog.host, dialog.port) == ("192.0.2.9", 40001)
    assert dialog.target == "sip:100@10.0.0.7:5062;ob"
    assert not dialog.ready()  # our tag is not known before we answer
    assert not dialog.local_tagged  # so the worker still parses what the leg sends or gets
    ok = Response(200, "OK", [("To", "<sip:200@home.arpa>;tag=worker9"), ("Call-ID", CALL_ID)])
    direct_bye.learn_local_tag(dialog, ok)
    assert dialog.ready() and dialog.local_tagged
    bye = parse_message(dialog.bye("127.0.0.1", 4000, "x1"))
    assert isinstance(bye, Request)
    assert bye.method == "BYE" and bye.uri == "sip:100@10.0.0.7:5062;ob"
    assert bye.get("From") == "<sip:200@home.arpa>;tag=worker9"
    assert bye.get("To") == "<sip:100@home.arpa>;tag=caller1"
    assert bye.cseq[0] > 0x7FFF  # above any CSeq pjsip may have used in the dialog
    assert bye.get("Reason") == 'SIP;cause=503;text="PBX restarted"'
    assert bye.get("Via") == "SIP/2.0/UDP 127.0.0.1:4000;branch=z9hG4bKx1;rport"
    assert not bye.get("Route")


def test_a_tcp_caller_is_skipped() -> None:
    dialog = direct_bye.incoming(a_leg_invite("SIP/2.0/TCP 10.0.0.7:5062;branch=z9hG4bKc"))
    assert dialog is not None
    direct_bye.learn_local_tag(dialog, Request("ACK", "sip:x@h", [("To", "<sip:200@h>;tag=w"),
                                                                   ("Call-ID", CALL_ID)]))
    assert dialog.transport == "TCP" and not dialog.ready()


def test_outgoing_from_the_b_leg_2xx() -> None:
    ok = Response(200, "OK", [
        ("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKw"),
        ("From", '"Ann" <sip:100@home.arpa>;tag=worker2'),
        ("To", "<sip:200@127.0.0.1:5060>;tag=callee3"),
        ("Call-ID", "b-leg"),
        ("CSeq", "31000 INVITE"),
        ("Contact", "<sip:200@127.0.0.1:41232>"),
    ])
    dialog = direct_bye.outgoing(ok)
    assert dialog is not None and dialog.ready()
    assert (dialog.host, dialog.port, dialog.cseq) == ("127.0.0.1", 41232, 31000 + direct_bye.CSEQ_STEP)
    assert dialog.local.endswith("tag=worker2") and dialog.remote.endswith("tag=callee3")


def _party(answer: bool) -> tuple[socket.socket, list[Request]]:
    """A UDP 'handset' on loopback that answers each BYE with 200 (or stays silent)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    got: list[Request] = []

    def serve() -> None:
        sock.settimeout(3)
        try:
            while True:
                data, peer = sock.recvfrom(65536)
                msg = parse_message(data)
                assert isinstance(msg, Request)
                got.append(msg)
                if answer:
                    reply = Response(200, "OK", [(k, v) for k, v in msg.headers
                                                 if k in ("Via", "From", "To", "Call-ID", "CSeq")])
                    sock.sendto(reply.to_bytes(), peer)
        except (TimeoutError, OSError):
            return

    threading.Thread(target=serve, daemon=True).start()
    return sock, got


def _dialog(port: int) -> direct_bye.Dialog:
    return direct_bye.Dialog(CALL_ID, "<sip:a@h>;tag=1", "<sip:b@h>;tag=2", f"sip:b@127.0.0.1:{port}",
                             40000, "127.0.0.1", port)


def test_send_byes_stops_at_the_200_and_reports_silence_and_closed_ports() -> None:
    answering, got = _party(answer=True)
    silent, ignored = _party(answer=False)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    not_ready = direct_bye.Dialog(CALL_ID, "<sip:a@h>", "<sip:b@h>;tag=2", "sip:b@h", 1, "127.0.0.1", 9)
    started = time.monotonic()
    results = direct_bye.send_byes([_dialog(answering.getsockname()[1]), _dialog(silent.getsockname()[1]),
                                    _dialog(closed_port), not_ready], wait=1.2)
    elapsed = time.monotonic() - started
    assert results == [200, 0, -1, 0]
    assert len(got) == 1  # answered at once: no retransmission
    assert len(ignored) == 3  # sent at 0, 0.5 and 1.0 s
    assert 1.1 < elapsed < 1.6
    answering.close()
    silent.close()
