"""Calls anchored in media workers, through the real daemon: join with *74, transcoding,
pool exhaustion and a worker killed mid-call. Each party plays its own tone and records
what it hears; the test measures each tone's level."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.support.handsets import listen
from tests.support.pbx import Daemon, user_block
from tests.support.procs import descendants

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HandsetFactory = Callable[..., Handset]
HEARD = -8.0  # dB of total power: the tone clearly dominates what is heard
FAINT = -20.0


def house(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, *, devices: int = 3,
          one_number: bool = True, media: str = "", codecs: list[str] | None = None,
          callee_codecs: list[str] | None = None, trace: bool = False) -> tuple[Daemon, Handset, list[Handset]]:
    pbx = pbx_factory([user_block("100"), user_block("200", one_number=one_number)], extra=media)
    caller = handset_factory("caller", codecs=codecs, trace=trace)
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
    phones = []
    for i in range(devices):
        phone = handset_factory(f"b{i}", codecs=callee_codecs, trace=trace)
        assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
        phones.append(phone)
    return pbx, caller, phones


def connect(caller: Handset, phones: list[Handset], answering: int = 0) -> tuple[str, str]:
    call = caller.call("sip:200@home.arpa")
    incoming = [str(p.wait_incoming()["call"]) for p in phones]
    phones[answering].answer(incoming[answering], 200)
    caller.wait_state(call, "CONFIRMED")
    caller.wait_for("media", call=call, status="active")
    phones[answering].wait_for("media", call=incoming[answering], status="active")
    return call, incoming[answering]


def test_two_party_call_each_hears_the_other(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                             tmp_path: Path) -> None:
    _, caller, phones = house(pbx_factory, handset_factory, devices=1)
    call, answered = connect(caller, phones)
    heard = listen([(caller, call, 440), (phones[0], answered, 1000)], tmp_path)
    assert tones.tone_level_db(heard[440], 1000) > HEARD  # the caller hears the callee
    assert tones.tone_level_db(heard[1000], 440) > HEARD
    assert tones.tone_level_db(heard[440], 440) < FAINT  # and not itself
    # DTMF (RFC 4733) end to end, both ways, through the worker.
    caller.dtmf(call, "12#")
    assert [phones[0].wait_for("dtmf", call=answered)["digit"] for _ in range(3)] == ["1", "2", "#"]
    phones[0].dtmf(answered, "9*")
    assert [caller.wait_for("dtmf", call=call)["digit"] for _ in range(2)] == ["9", "*"]
    caller.hangup(call)
    phones[0].wait_state(answered, "DISCONNECTED")


def test_join_three_way_then_joiner_leaves_then_caller_leaves(pbx_factory: DaemonFactory,
                                                              handset_factory: HandsetFactory,
                                                              tmp_path: Path) -> None:
    pbx, caller, phones = house(pbx_factory, handset_factory, devices=3)
    call, answered = connect(caller, phones, answering=0)
    for phone in phones[1:]:  # the others stopped ringing: answered elsewhere
        phone.wait_for("call_state", state="DISCONNECTED")
    joiner = phones[1]
    join = joiner.call("sip:*74@home.arpa")
    joiner.wait_state(join, "CONFIRMED")
    joiner.wait_for("media", call=join, status="active")
    pbx.wait_log("event=call_joined")
    heard = listen([(caller, call, 440), (phones[0], answered, 1000), (joiner, join, 1700)], tmp_path)
    for own, others in ((440, (1000, 1700)), (1000, (440, 1700)), (1700, (440, 1000))):
        for other in others:
            assert tones.tone_level_db(heard[own], other) > -12, (own, other)
        assert tones.tone_level_db(heard[own], own) < FAINT, own  # itself at most faintly

    # A fourth party is refused: three at most.
    fourth = phones[2].call("sip:*74@home.arpa")
    assert phones[2].wait_state(fourth, "DISCONNECTED")["last_status"] == 486

    # The joiner leaves: caller and the answering phone keep talking.
    joiner.hangup(join)
    joiner.wait_state(join, "DISCONNECTED")
    pbx.wait_log("event=call_left")
    (tmp_path / "after").mkdir()
    heard = listen([(caller, call, 440), (phones[0], answered, 1000)], tmp_path / "after", 1.5)
    assert tones.tone_level_db(heard[440], 1000) > HEARD
    assert tones.tone_level_db(heard[1000], 440) > HEARD

    # The caller leaves: the call ends for everyone.
    caller.hangup(call)
    assert phones[0].wait_state(answered, "DISCONNECTED")["end_request"] == "BYE"
    pbx.wait_log("event=call_ended .*outgoing=0")


def test_join_refused_cases(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    _, caller, phones = house(pbx_factory, handset_factory, devices=2)
    lonely = phones[1].call("sip:*74@home.arpa")  # nothing to join yet
    assert phones[1].wait_state(lonely, "DISCONNECTED")["last_status"] == 404
    other = caller.call("sip:*74@home.arpa")  # 100 has one-number off
    assert caller.wait_state(other, "DISCONNECTED")["last_status"] == 403


def test_join_needs_one_number(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    _, caller, phones = house(pbx_factory, handset_factory, devices=1, one_number=False)
    call, _ = connect(caller, phones)
    attempt = phones[0].call("sip:*74@home.arpa")  # the answering phone itself: refused too
    assert phones[0].wait_state(attempt, "DISCONNECTED")["last_status"] == 403
    caller.hangup(call)


def test_pcmu_caller_with_g722_callee_transcoded(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                                 tmp_path: Path) -> None:
    _, caller, phones = house(pbx_factory, handset_factory, devices=1, codecs=["PCMU"], callee_codecs=["G722"],
                              trace=True)
    call, answered = connect(caller, phones)
    to_caller = _invite_ok(caller, "rx")
    from_callee = _invite_ok(phones[0], "tx")
    assert "m=audio" in to_caller and _payloads(to_caller)[0] == "0"  # PCMU on the caller's side
    assert _payloads(from_callee)[0] == "9"  # G.722 on the callee's side: the worker transcodes
    heard = listen([(caller, call, 440), (phones[0], answered, 1000)], tmp_path)
    assert tones.tone_level_db(heard[440], 1000) > HEARD
    assert tones.tone_level_db(heard[1000], 440) > HEARD
    caller.hangup(call)


def test_pool_exhaustion_gets_503(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    media = "[media]\nmax_calls = 1\nmin_idle = 1\n\n"
    pbx = pbx_factory([user_block("100"), user_block("200"), user_block("300")], extra=media)
    a, b, c = handset_factory("a"), handset_factory("b"), handset_factory("c")
    for phone, number in ((a, "100"), (b, "200"), (c, "300")):
        assert phone.register(pbx.registrar, number, "secret")["code"] == 200
    first = a.call("sip:200@home.arpa")
    incoming = str(b.wait_incoming()["call"])
    b.answer(incoming, 200)
    a.wait_state(first, "CONFIRMED")
    second = c.call("sip:100@home.arpa")
    refused = c.wait_state(second, "DISCONNECTED")
    assert refused["last_status"] == 503
    # The call in progress is untouched.
    assert not a.events_of("call_state", call=first, state="DISCONNECTED")
    a.hangup(first)
    b.wait_state(incoming, "DISCONNECTED")


def test_worker_killed_ends_only_its_call(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                          tmp_path: Path) -> None:
    # A process per call (our pjsua2 build would otherwise pack both calls into one worker:
    # tests/e2e/test_media_worker_multi.py kills a shared worker).
    pbx = pbx_factory([user_block("100"), user_block("200"), user_block("300"), user_block("400")],
                      extra="[media]\ncalls_per_worker = 1\n\n")
    phones = {n: handset_factory(f"p{n}") for n in ("100", "200", "300", "400")}
    for number, phone in phones.items():
        assert phone.register(pbx.registrar, number, "secret")["code"] == 200
    calls = {}
    for caller, callee in (("100", "200"), ("300", "400")):
        call = phones[caller].call(f"sip:{callee}@home.arpa")
        incoming = str(phones[callee].wait_incoming()["call"])
        phones[callee].answer(incoming, 200)
        phones[caller].wait_state(call, "CONFIRMED")
        calls[caller] = (call, incoming)
    line = pbx.wait_log("event=call_started call=.* caller=100")
    token = line.split("call=", 1)[1].split()[0]
    pid = _worker_pid_for(pbx, token)
    os.kill(pid, signal.SIGKILL)
    # Both parties of that call get a BYE from the edge.
    assert phones["100"].wait_state(calls["100"][0], "DISCONNECTED", timeout=10)["end_request"] == "BYE"
    assert phones["200"].wait_state(calls["100"][1], "DISCONNECTED", timeout=10)["end_request"] == "BYE"
    pbx.wait_log(f"event=call_ended call={token} .*reason=media_worker_died")
    # The other call goes on, with audio.
    call, incoming = calls["300"]
    heard = listen([(phones["300"], call, 440), (phones["400"], incoming, 1000)], tmp_path)
    assert tones.tone_level_db(heard[440], 1000) > HEARD
    assert tones.tone_level_db(heard[1000], 440) > HEARD
    # The registrations are untouched, and a new call works on a replacement worker.
    phones["300"].hangup(call)
    again = phones["100"].call("sip:200@home.arpa")
    incoming = str(phones["200"].wait_incoming(call=lambda c: c != calls["100"][1])["call"])
    phones["200"].answer(incoming, 200)
    phones["100"].wait_state(again, "CONFIRMED")
    phones["100"].hangup(again)


def _worker_pid_for(pbx: Daemon, token: str) -> int:
    """The pid of the media worker that the daemon gave call `token`."""
    line = pbx.wait_log(f"event=media_worker_call .*token={token}")
    return int(line.split("pid=", 1)[1].split()[0])


def _invite_ok(phone: Handset, direction: str) -> str:
    """The traced 200 OK to an INVITE, with its SDP."""
    event = phone.wait_for("sip", dir=direction, msg=lambda m: str(m).startswith("SIP/2.0 200")
                           and " INVITE\r\n" in str(m) and "m=audio" in str(m))
    return str(event["msg"])


def _payloads(message: str) -> list[str]:
    """The payload types of the first m=audio line of a message's SDP."""
    line = next(li for li in message.split("\r\n") if li.startswith("m=audio"))
    return line.split()[3:]


def test_sigterm_ends_calls_with_bye_and_leaves_no_process(pbx_factory: DaemonFactory,
                                                           handset_factory: HandsetFactory) -> None:
    pbx, caller, phones = house(pbx_factory, handset_factory, devices=1)
    call, answered = connect(caller, phones)
    assert pbx.proc is not None
    children = descendants(pbx.proc.pid)
    assert children, "the daemon should have media worker processes"
    assert pbx.stop() == 0
    assert caller.wait_state(call, "DISCONNECTED")["end_request"] == "BYE"
    assert phones[0].wait_state(answered, "DISCONNECTED")["end_request"] == "BYE"
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in children if Path(f"/proc/{pid}/stat").exists()
            and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
    assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize("holder", ["caller", "callee"])
def test_hold_and_resume_through_a_worker_keeps_the_audio_clean(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, tmp_path: Path, holder: str) -> None:
    """Both parties play their tones throughout; one holds (a re-INVITE: the worker re-creates
    its stream, the other party's port has nobody listening in the bridge meanwhile) and
    resumes. Right after, each hears the other's tone as cleanly as before, over the whole
    recording: nothing the other party sent during the hold is played late, no frames shed."""
    _, caller, phones = house(pbx_factory, handset_factory, devices=1)
    call, answered = connect(caller, phones)
    caller.play_tone(call, 440)
    phones[0].play_tone(answered, 1000)
    phone, phone_call = (caller, call) if holder == "caller" else (phones[0], answered)
    time.sleep(0.3)
    phone.send("hold", call=phone_call)
    phone.wait_for("media", call=phone_call, status="local_hold")
    time.sleep(1.0)
    phone.send("unhold", call=phone_call)
    phone.wait_for("media", call=phone_call, status="active")
    heard = listen([(caller, call, 440), (phones[0], answered, 1000)], tmp_path, 1.5)
    assert tones.tone_level_db(heard[440], 1000) > HEARD, tones.tone_envelope(heard[440], 1000)
    assert tones.tone_level_db(heard[1000], 440) > HEARD, tones.tone_envelope(heard[1000], 440)
    caller.hangup(call)
    phones[0].wait_state(answered, "DISCONNECTED")
