"""Calls through the real daemon with real pjsua2 handsets: ring-all, answered elsewhere,
declines, timeouts, cancels, limits, audio."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import Daemon, user_block
from tests.support.rawsip import RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HandsetFactory = Callable[..., Handset]
COMPLETED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'


def family(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, *, devices: int = 3,
           transports: tuple[str, ...] = ("udp",), trace: bool = False,
           **user200: object) -> tuple[Daemon, Handset, list[Handset]]:
    """100 (one handset) and 200 (one-number on, `devices` handsets), all registered."""
    pbx = pbx_factory([user_block("100", max_outgoing_calls=2),
                       user_block("200", one_number=True, **user200)])
    caller = handset_factory("caller", trace=trace)
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
    phones = []
    for i in range(devices):
        phone = handset_factory(f"b{i}", transport=transports[i % len(transports)], trace=trace)
        assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
        phones.append(phone)
    return pbx, caller, phones


def ring_all(phones: list[Handset]) -> list[str]:
    return [str(p.wait_incoming(timeout=5)["call"]) for p in phones]


def test_ring_all_answer_elsewhere_audio_and_hangup(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                                    tmp_path: Path) -> None:
    pbx, caller, phones = family(pbx_factory, handset_factory, trace=True)
    call = caller.call("sip:200@home.arpa")
    incoming = ring_all(phones)
    for phone, cid in zip(phones, incoming, strict=True):
        phone.wait_state(cid, "EARLY")  # every handset rings (180 sent)
    phones[1].answer(incoming[1], 200)
    caller.wait_state(call, "CONFIRMED")
    for i in (0, 2):
        ended = phones[i].wait_state(incoming[i], "DISCONNECTED")
        assert ended["end_request"] == "CANCEL"
        assert ended["reason_header"] == COMPLETED_ELSEWHERE
        cancel = phones[i].wait_sip("rx", "CANCEL ")
        assert f"Reason: {COMPLETED_ELSEWHERE}" in cancel
    # The callee sees who calls; the caller's From is the authenticated number.
    invite = phones[1].wait_sip("rx", "INVITE ")
    assert "sip:100@" in invite.split("From:", 1)[1].split("\r\n", 1)[0]
    assert "X-Homepbx" not in invite  # the edge's internal headers never leave the box

    # Audio both ways between the caller and the answering handset.
    answered = incoming[1]
    caller.wait_for("media", call=call, status="active")
    phones[1].wait_for("media", call=answered, status="active")
    caller.play_tone(call, 440)
    phones[1].play_tone(answered, 1000)
    caller.record(call, tmp_path / "caller.wav")
    phones[1].record(answered, tmp_path / "callee.wav")
    time.sleep(2.0)
    heard_by_caller = caller.stop_media(call)["path"]
    heard_by_callee = phones[1].stop_media(answered)["path"]
    assert tones.tone_level_db(str(heard_by_callee), 440) > -6
    assert tones.tone_level_db(str(heard_by_caller), 1000) > -6
    assert tones.tone_level_db(str(heard_by_callee), 1000) < -20

    # Callee hangs up: the BYE crosses the proxy to the caller.
    phones[1].hangup(answered)
    assert caller.wait_state(call, "DISCONNECTED")["end_request"] == "BYE"
    pbx.wait_log("event=call_ended .*reason=bye_from_callee")


def test_caller_hangs_up_udp_and_tcp_devices(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, caller, phones = family(pbx_factory, handset_factory, devices=2, transports=("tcp", "udp"))
    call = caller.call("sip:200@home.arpa")
    incoming = ring_all(phones)
    phones[0].answer(incoming[0], 200)  # the TCP handset answers
    caller.wait_state(call, "CONFIRMED")
    assert phones[1].wait_state(incoming[1], "DISCONNECTED")["reason_header"] == COMPLETED_ELSEWHERE
    phones[0].wait_state(incoming[0], "CONFIRMED")
    caller.hangup(call)
    assert phones[0].wait_state(incoming[0], "DISCONNECTED")["end_request"] == "BYE"
    pbx.wait_log("event=call_ended .*reason=bye_from_caller")


def test_answer_race_exactly_one_wins(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    _, caller, phones = family(pbx_factory, handset_factory, devices=2)
    call = caller.call("sip:200@home.arpa")
    incoming = ring_all(phones)
    for phone, cid in zip(phones, incoming, strict=True):
        phone.wait_state(cid, "EARLY")
    for phone, cid in zip(phones, incoming, strict=True):
        phone.answer(cid, 200)  # both at once
    caller.wait_state(call, "CONFIRMED")
    outcomes = []
    for phone, cid in zip(phones, incoming, strict=True):
        state = phone.wait_for("call_state", call=cid, state=lambda s: s in ("CONFIRMED", "DISCONNECTED"))
        outcomes.append(state["state"])
    # The loser may have reached CONFIRMED before the proxy's BYE: it must end soon.
    time.sleep(1.0)
    live = [p for p, cid in zip(phones, incoming, strict=True)
            if not p.events_of("call_state", call=cid, state="DISCONNECTED")]
    assert len(live) == 1, outcomes
    assert len(caller.events_of("call_state", call=call, state="CONFIRMED")) == 1
    caller.hangup(call)
    assert live[0].wait_for("call_state", state="DISCONNECTED")["end_request"] == "BYE"


def test_one_declines_others_keep_ringing_then_all_decline(pbx_factory: DaemonFactory,
                                                          handset_factory: HandsetFactory) -> None:
    pbx, caller, phones = family(pbx_factory, handset_factory)
    call = caller.call("sip:200@home.arpa")
    incoming = ring_all(phones)
    phones[0].answer(incoming[0], 486)
    time.sleep(0.5)
    for phone, cid in zip(phones[1:], incoming[1:], strict=True):
        assert not phone.events_of("call_state", call=cid, state="DISCONNECTED")  # still ringing
    assert not caller.events_of("call_state", call=call, state="DISCONNECTED")
    phones[1].answer(incoming[1], 603)
    phones[2].answer(incoming[2], 486)
    ended = caller.wait_state(call, "DISCONNECTED")
    assert ended["last_status"] == 603  # §16.7: a 6xx beats the 486s
    pbx.wait_log("event=call_ended .*reason=status_")


def test_decline_all_devices_policy(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    _, caller, phones = family(pbx_factory, handset_factory, devices=2, decline="all_devices")
    call = caller.call("sip:200@home.arpa")
    incoming = ring_all(phones)
    phones[0].answer(incoming[0], 603)
    assert caller.wait_state(call, "DISCONNECTED")["last_status"] == 603
    assert phones[1].wait_state(incoming[1], "DISCONNECTED")["end_request"] == "CANCEL"


def test_ring_timeout_gives_480(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    _, caller, phones = family(pbx_factory, handset_factory, devices=2, ring_timeout=5)
    started = time.monotonic()
    call = caller.call("sip:200@home.arpa")
    incoming = ring_all(phones)
    ended = caller.wait_state(call, "DISCONNECTED", timeout=10)
    assert ended["last_status"] == 480
    assert 4.5 < time.monotonic() - started < 8
    for phone, cid in zip(phones, incoming, strict=True):
        assert phone.wait_state(cid, "DISCONNECTED")["end_request"] == "CANCEL"


def test_caller_cancel_cancels_every_device(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, caller, phones = family(pbx_factory, handset_factory)
    call = caller.call("sip:200@home.arpa")
    incoming = ring_all(phones)
    for phone, cid in zip(phones, incoming, strict=True):
        phone.wait_state(cid, "EARLY")
    caller.hangup(call)
    assert caller.wait_state(call, "DISCONNECTED")["last_status"] == 487
    for phone, cid in zip(phones, incoming, strict=True):
        assert phone.wait_state(cid, "DISCONNECTED")["end_request"] == "CANCEL"
    pbx.wait_log("event=call_ended .*reason=status_487")


def test_unknown_number_and_nobody_home(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([user_block("100"), user_block("300")])
    caller = handset_factory("caller")
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
    unknown = caller.call("sip:999@home.arpa")
    assert caller.wait_state(unknown, "DISCONNECTED")["last_status"] == 404
    nobody = caller.call("sip:300@home.arpa")  # a user with no handset registered
    assert caller.wait_state(nobody, "DISCONNECTED")["last_status"] == 480


def test_unauthenticated_invite_is_challenged_and_rings_nothing(pbx_factory: DaemonFactory,
                                                                handset_factory: HandsetFactory) -> None:
    pbx, _, phones = family(pbx_factory, handset_factory, devices=1)
    stranger = RawClient(pbx.port)
    sdp = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
    stranger.send(stranger.request("INVITE", "sip:200@home.arpa", "100", to_number="200", body=sdp,
                                   headers=[("Contact", f"<sip:100@127.0.0.1:{stranger.port}>"),
                                            ("Content-Type", "application/sdp")]))
    first = stranger.recv()
    while first.status < 200:
        first = stranger.recv()
    assert first.status == 407
    assert first.get_all("Proxy-Authenticate")[0].startswith("Digest")
    assert "algorithm=SHA-256" in first.get_all("Proxy-Authenticate")[0]
    time.sleep(0.5)
    assert not phones[0].events_of("incoming_call")
    # Wrong credentials: refused, still nothing rings.
    wrong = stranger.invite_with_auth("200", "100", "not-the-password", body=sdp)
    assert wrong.status == 403
    time.sleep(0.3)
    assert not phones[0].events_of("incoming_call")
    stranger.close()


def test_calling_own_number_rings_the_other_devices(pbx_factory: DaemonFactory,
                                                    handset_factory: HandsetFactory) -> None:
    _, _, phones = family(pbx_factory, handset_factory, devices=3)
    call = phones[0].call("sip:200@home.arpa")
    rung = [str(p.wait_incoming()["call"]) for p in phones[1:]]
    assert len(rung) == 2
    time.sleep(0.3)
    assert not phones[0].events_of("incoming_call")
    phones[2].answer(rung[1], 200)
    phones[0].wait_state(call, "CONFIRMED")
    phones[0].hangup(call)


def test_outgoing_limit_counts_all_devices_and_never_leaks(pbx_factory: DaemonFactory,
                                                           handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([user_block("100", one_number=True, max_outgoing_calls=1),
                       user_block("200", one_number=True)])
    kitchen, hall = handset_factory("kitchen"), handset_factory("hall")
    callee = handset_factory("callee")
    for phone, number in ((kitchen, "100"), (hall, "100"), (callee, "200")):
        assert phone.register(pbx.registrar, number, "secret")["code"] == 200
    first = kitchen.call("sip:200@home.arpa")
    callee_call = str(callee.wait_incoming()["call"])
    second = hall.call("sip:200@home.arpa")  # the other device of 100, at the same time
    refused = hall.wait_state(second, "DISCONNECTED")
    assert refused["last_status"] == 403
    assert "Outgoing call limit reached" in str(refused["last_reason"])
    callee.answer(callee_call, 200)
    kitchen.wait_state(first, "CONFIRMED")
    kitchen.hangup(first)
    callee.wait_state(callee_call, "DISCONNECTED")
    # Many calls ending every way (answered and hung up, declined, cancelled): the count
    # falls back to 0 each time, so the limit of 1 never refuses a call.
    callee.auto_answer("reject", code=486)
    for i in range(60):
        phone = kitchen if i % 2 else hall
        cid = phone.call("sip:200@home.arpa")
        status = phone.wait_state(cid, "DISCONNECTED")["last_status"]
        assert status == 486, (i, status)
        # pjlib frees a closed socket's ioqueue slot only after 500 ms and has 64 of them:
        # a handset taking ~30 calls a second would abort. Real phones are slower.
        time.sleep(0.05)
    callee.auto_answer("ring")
    callee.drain()  # forget the rejected calls' events
    for _ in range(10):
        cid = hall.call("sip:200@home.arpa")
        incoming = str(callee.wait_incoming()["call"])
        callee.wait_state(incoming, "EARLY")
        hall.hangup(cid)
        assert hall.wait_state(cid, "DISCONNECTED")["last_status"] == 487
        time.sleep(0.05)
    callee.auto_answer("answer")
    for _ in range(10):
        cid = kitchen.call("sip:200@home.arpa")
        kitchen.wait_state(cid, "CONFIRMED")
        kitchen.hangup(cid)
        kitchen.wait_state(cid, "DISCONNECTED")
        time.sleep(0.05)
    time.sleep(0.3)
    assert pbx.log_matches("event=call_ended")[-1].endswith("outgoing=0")
    assert len(pbx.log_matches("event=call_ended")) >= 81


def test_hold_reinvite_passes_through_the_proxy(pbx_factory: DaemonFactory,
                                               handset_factory: HandsetFactory) -> None:
    """A re-INVITE inside the dialog follows the Record-Route through the edge and is
    answered by the far end (the media worker that anchors the call)."""
    _, caller, phones = family(pbx_factory, handset_factory, devices=1, trace=True)
    call = caller.call("sip:200@home.arpa")
    incoming = str(phones[0].wait_incoming()["call"])
    phones[0].answer(incoming, 200)
    caller.wait_state(call, "CONFIRMED")
    caller.send("hold", call=call)
    reinvite = caller.wait_for("sip", dir="tx", msg=lambda m: str(m).startswith("INVITE ") and ";tag=" in
                               str(m).split("\r\nTo:", 1)[1].split("\r\n", 1)[0])
    assert "Route: <sip:127.0.0.1:" in str(reinvite["msg"])  # back through the proxy
    assert "a=sendonly" in str(reinvite["msg"])
    answer = caller.wait_for("sip", dir="rx", msg=lambda m: str(m).startswith("SIP/2.0 200") and
                             "INVITE\r\n" in str(m) and "a=recvonly" in str(m))
    assert "X-Homepbx" not in str(answer["msg"])  # internal headers never leave the box
    caller.hangup(call)
    assert phones[0].wait_state(incoming, "DISCONNECTED")["end_request"] == "BYE"


def test_loop_is_detected(pbx_factory: DaemonFactory) -> None:
    """An INVITE whose Via list already holds one of our branches came back to us: 482."""
    pbx = pbx_factory([user_block("100"), user_block("200")])
    client = RawClient(pbx.port)
    looped = f"SIP/2.0/UDP 127.0.0.1:{pbx.port};branch=z9hG4bKsl0123456789abcdef;rport"
    client.send(client.request("INVITE", "sip:200@home.arpa", "100", to_number="200",
                               headers=[("Via", looped), ("Contact", f"<sip:100@127.0.0.1:{client.port}>")]))
    assert client.final().status == 482
    assert pbx.alive()
    client.close()
