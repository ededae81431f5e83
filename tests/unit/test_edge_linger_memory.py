"""What a finished call costs while it lingers (32 s, so late retransmissions still find
their way), and that nothing of it is left after: measured in-process on the fake clock.

Each call is what bench/calls.py plays over sockets: INVITE, 407, INVITE with credentials,
a fork to three devices of one number, 180 from each, 200 with SDP from one, CANCEL
(200 + 487) to the others, ACK and BYE through the Record-Route, 200 to the BYE.
Under a burst of 10,000 calls a second-long linger is 10,000 of these records at once:
every byte of one is 10 kB of RSS at the high-water mark.
"""

from __future__ import annotations

import gc
import tracemalloc
import types
from typing import Any

from appliance.edge.calls import DIALOG_LINGER
from appliance.edge.dialogs import Dialog
from appliance.sip.invite_transaction import InviteClient, InviteServer
from appliance.sip.message import Request, Response
from appliance.sip.proxy import Branch, Fork
from appliance.sip.registrar import Flow
from tests.unit import test_edge_fake_clock as fake
from tests.unit.test_edge_fake_clock import PHONE_100, House, requests, statuses

SDP = ("v=0\no=- 1 1 IN IP4 192.0.2.10\ns=-\nc=IN IP4 192.0.2.10\nt=0 0\nm=audio 4000 RTP/AVP 8 0 101\n"
       "a=rtpmap:8 PCMA/8000\na=rtpmap:0 PCMU/8000\na=rtpmap:101 telephone-event/8000\na=fmtp:101 0-16\n"
       "a=sendrecv\n")
DEVICES = [Flow("udp", "192.0.2.20", 5062 + k, "127.0.0.1:5060") for k in range(3)]


def house_with_three_devices() -> House:
    config = fake.CONFIG
    fake.CONFIG = config.replace('password = "pw200"', 'password = "pw200"\none_number = true')
    try:
        house = House()
    finally:
        fake.CONFIG = config
    for k, device in enumerate(DEVICES):
        assert statuses(house.authenticated("REGISTER", "200", "pw200", "200", device, f"reg200{k}")) == [200]
    return house


def _answer(request: Request, status: int, reason: str, tag: str, extra: str = "", body: str = "") -> str:
    to = request.get("To") or ""
    if ";tag=" not in to:
        to = f"{to};tag={tag}"
    head = "".join(f"Via: {v}\n" for v in request.get_all("Via"))
    head += "".join(f"Record-Route: {r}\n" for r in request.get_all("Record-Route")) if 100 < status < 300 else ""
    length = len(body.replace("\n", "\r\n"))
    return (f"SIP/2.0 {status} {reason}\n{head}From: {request.get('From')}\nTo: {to}\n"
            f"Call-ID: {request.call_id}\nCSeq: {request.get('CSeq')}\n{extra}Content-Length: {length}\n\n{body}")


Sent = list[tuple[Request | Response, Flow]]


def place_call(house: House, i: int, record: dict[str, object] | None = None) -> None:
    """One whole call (answered by the first device, the others cancelled), then hung up.
    `record`: what the devices and the caller sent (text, flow) and what the box sent for
    it, to send again later (retransmissions)."""
    call_id = f"linger{i}"
    sent = house.authenticated("INVITE", "100", "pw100", "200", PHONE_100, call_id,
                               extra="Content-Type: application/sdp\nUser-Agent: Probe/1.0\n")
    invites = requests(sent, "INVITE")
    assert len(invites) == 3, sent
    for k, (invite, flow) in enumerate(invites):
        house.receive(_answer(invite, 180, "Ringing", f"d{k}x{i}",
                              f"Contact: <sip:200@{flow.host}:{flow.port}>\n"), flow)
    invite, flow = invites[0]
    tag = f"d0x{i}"
    ok = _answer(invite, 200, "OK", tag, f"Contact: <sip:200@{flow.host}:{flow.port}>\n"
                 "Content-Type: application/sdp\n", SDP)
    answered = house.receive(ok, flow)
    assert [m.status for m, _ in answered if isinstance(m, Response)] == [200]
    lost: list[tuple[str, Flow, Sent]] = []
    for cancel, to in requests(answered, "CANCEL"):
        house.receive(_answer(cancel, 200, "OK", "c"), to)
        [(loser, _)] = [(m, f) for m, f in invites if f == to]
        text = _answer(loser, 487, "Request Terminated", f"d{to.port}x{i}")
        lost.append((text, to, house.receive(text, to)))
    dialog = (f"From: <sip:100@home.arpa>;tag=f{call_id}\nTo: <sip:200@home.arpa>;tag={tag}\n"
              f"Call-ID: {call_id}\n")
    route = "Route: <sip:127.0.0.1:5060;lr>\n"
    house.receive(f"ACK sip:200@{flow.host}:{flow.port} SIP/2.0\nVia: SIP/2.0/UDP 192.0.2.10:5062;"
                  f"branch=z9hG4bKack{i};rport\nMax-Forwards: 70\n{route}{dialog}CSeq: 2 ACK\n"
                  "Content-Length: 0\n\n", PHONE_100)
    bye_text = (f"BYE sip:200@{flow.host}:{flow.port} SIP/2.0\nVia: SIP/2.0/UDP 192.0.2.10:5062;"
                f"branch=z9hG4bKbye{i};rport\nMax-Forwards: 70\n{route}{dialog}CSeq: 3 BYE\nContent-Length: 0\n\n")
    relayed_bye = house.receive(bye_text, PHONE_100)
    [(bye, to)] = requests(relayed_bye, "BYE")
    assert statuses(house.receive(_answer(bye, 200, "OK", tag), to)) == [200]
    house.network.take()
    if record is not None:
        record.update(ok=(ok, flow, answered), lost=lost, bye=(bye_text, PHONE_100, relayed_bye), dialog=dialog,
                      route=route, device=flow)
    house.advance(0.001)


def _traced(fn: object) -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_a_finished_call_lingers_in_little_memory_and_leaves_nothing() -> None:
    house = house_with_three_devices()
    for i in range(30):  # warm up: caches, interned names, dicts at their working size
        place_call(house, i)
    house.advance(60)
    calls = 400
    tracemalloc.start()
    try:
        before = _traced(None)
        for i in range(1000, 1000 + calls):
            place_call(house, i)
        house.advance(1)  # what a buried fork left in the timer wheel (until its next entry's time)
        lingering = (_traced(None) - before) / calls
        house.advance(60)  # every linger is over
        house.edge.calls.compact(house.now)  # as the daemon's housekeeping does after a burst
        house.timers.compact()
        left = (_traced(None) - before) / calls
    finally:
        tracemalloc.stop()
    router = house.edge.calls
    assert not router._dialogs and not router._forks and not router._branches and not len(router.client_tx)
    assert not router._finished and not router._finished_invites and not router._ended
    assert not router._buried and not router._lingering
    # Was 14.2 kB: every re-arm of a fork left a heap entry, the losers' 487s and ACK bytes,
    # per-branch copies of header tuples, a timer and a closure per dialog; then ~7 kB: the
    # fork's transactions themselves (Timer L and D, 32 s). Now ~2.2 kB: a `FinishedFork`
    # and an `EndedDialog` instead of the Fork, its Branches, transactions, Requests and
    # the Dialog; the relay's record of the BYE, the used nonce.
    assert lingering < 3000, f"{lingering:.0f} bytes per lingering call"
    assert left < 150, f"{left:.0f} bytes per call after the linger"  # the used nonce (kept 300 s)


def _reachable(root: object) -> list[object]:
    """Every object the router holds (not through functions, classes or modules: the code)."""
    seen = {id(root)}
    todo, found = [root], []
    while todo:
        obj = todo.pop()
        found.append(obj)
        for ref in gc.get_referents(obj):
            if id(ref) in seen or isinstance(ref, type | types.ModuleType | types.FunctionType):
                continue
            seen.add(id(ref))
            todo.append(ref)
    return found


def test_a_lingering_call_keeps_no_message_at_all() -> None:
    """Once its fork only lingers and its dialog has ended, a call keeps compact records:
    no Request or Response (whole header lists), no Fork, Branch, transaction or Dialog."""
    house = house_with_three_devices()
    place_call(house, 1)
    house.advance(1)  # the emptied Fork the timer wheel held until its entry's time
    router = house.edge.calls
    assert len(router._ended) == 1 and len(router._finished) == 1 and len(router._finished_invites) == 1
    held = [type(o).__name__ for o in _reachable(router)
            if isinstance(o, Request | Response | Fork | Branch | Dialog | InviteClient | InviteServer)]
    assert held == []
    assert router.dialog_count == 1


def _send_again(house: House, text: str, flow: Flow) -> list[bytes]:
    return [m.to_bytes() for m, _ in house.receive(text, flow)]


def test_after_the_call_each_retransmission_is_answered_as_before_from_what_it_kept() -> None:
    house = house_with_three_devices()
    record: dict[str, Any] = {}
    place_call(house, 7, record)
    ok, ok_flow, answered = record["ok"]
    [relayed_ok] = [m.to_bytes() for m, f in answered if isinstance(m, Response) and f == PHONE_100]
    assert _send_again(house, ok, ok_flow) == [relayed_ok]  # the 2xx again: upstream again (RFC 6026)
    for text, flow, acked in record["lost"]:
        [ack] = [m.to_bytes() for m, f in acked if isinstance(m, Request) and m.method == "ACK"]
        assert _send_again(house, text, flow) == [ack]  # a 487 again: the same ACK (Timer D)
    bye, bye_flow, relayed = record["bye"]
    [(first, to)] = requests(relayed, "BYE")
    again = house.receive(bye, bye_flow)
    assert [(m.to_bytes(), f) for m, f in again] == [(first.to_bytes(), to)]  # relayed to the device again
    info = bye.replace("BYE sip", "INFO sip").replace("CSeq: 3 BYE", "CSeq: 4 INFO").replace("bye7", "info7")
    assert statuses(house.receive(info, PHONE_100)) == [481]  # nothing else in an ended dialog
    invite = house.request("INVITE", "100", "200", PHONE_100, 2, call_id="linger7")
    assert house.receive(invite, PHONE_100) == []  # its INVITE again: absorbed (Accepted)
    cancel = invite.replace("INVITE sip", "CANCEL sip").replace("2 INVITE", "2 CANCEL")
    assert statuses(house.receive(cancel, PHONE_100)) == [200]

    house.advance(DIALOG_LINGER + 1)  # every linger is over
    assert statuses(house.receive(bye, bye_flow)) == [481]
    for text, flow, _ in record["lost"]:
        assert house.receive(text, flow) == []
    router = house.edge.calls
    assert not router._finished and not router._finished_invites and not router._ended
    assert router.dialog_count == 0
