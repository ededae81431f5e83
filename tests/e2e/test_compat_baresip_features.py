"""baresip (Debian's baresip-core 1.0) holds, resumes and sends DTMF through homepbx, on the
shipped config (offered MD5 alone by User-Agent, like test_softphone.py).

baresip (200) calls a pjsua2 handset (201) over UDP; the call is anchored in a media worker.
`/hold` sends a re-INVITE with `a=sendonly` and baresip stops sending: the handset records
near-silence; `/resume` (`a=sendrecv`) brings baresip's tone back. A digit typed alone on
baresip's console during the call goes out as RFC 4733 events and reaches the handset
through the worker; digits the handset sends reach baresip, which prints each event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.support.baresip import Baresip
from tests.support.handsets import recorded, until_heard
from tests.support.pbx import Daemon, user_block
from tests.support.ports import rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

HandsetFactory = Callable[..., Handset]
BaresipFactory = Callable[..., Baresip]
HEARD = -8.0  # dB of total power: the tone clearly dominates what is heard
FAINT = -20.0
BARESIP_TONE = 440
HANDSET_TONE = 1000


def call_in_progress(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, baresip: BaresipFactory,
                     tmp_path: Path) -> tuple[Daemon, Baresip, Handset, str]:
    """baresip as 200 calls a pjsua2 handset as 201 (shipped settings); the handset answers
    and sends its tone."""
    pbx = pbx_factory([user_block("200", "pw-200"), user_block("201", "pw-201")])
    handset = handset_factory("h201")
    assert handset.register(pbx.registrar, "201", "pw-201")["code"] == 200
    phone = baresip(tmp_path / "baresip", pbx, "200", "pw-200", BARESIP_TONE, rtp_range())
    phone.wait_for("registered successfully")
    phone.command("d 201")
    call = str(handset.wait_incoming(timeout=10)["call"])
    handset.answer(call, 200)
    phone.wait_for("Call established")
    handset.wait_for("media", call=call, status="active")
    handset.play_tone(call, HANDSET_TONE)
    return pbx, phone, handset, call


def test_baresip_holds_and_resumes_a_call_to_a_handset(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, baresip: BaresipFactory,
        tmp_path: Path) -> None:
    pbx, phone, handset, call = call_in_progress(pbx_factory, handset_factory, baresip, tmp_path)
    until_heard(handset, call, tmp_path, HANDSET_TONE, BARESIP_TONE, HEARD)
    talking = recorded(handset, call, tmp_path / "talking.wav", HANDSET_TONE, 1.0)

    at = phone.command("/hold")
    phone.wait_for("call: hold", start=at)
    time.sleep(0.3)  # the re-INVITE's answer and the last packets in flight
    paused = recorded(handset, call, tmp_path / "paused.wav", HANDSET_TONE, 1.0)
    at = phone.command("/resume")
    phone.wait_for("call: resume", start=at)
    until_heard(handset, call, tmp_path, HANDSET_TONE, BARESIP_TONE, HEARD)
    resumed = recorded(handset, call, tmp_path / "resumed.wav", HANDSET_TONE, 1.5)

    phone.command("b")  # hang up
    handset.wait_state(call, "DISCONNECTED")
    pbx.wait_log(r"event=call_ended .*caller=200 callee=201 reason=bye_from_caller")
    phone.stop()
    assert tones.tone_level_db(talking, BARESIP_TONE) > HEARD  # the handset hears baresip
    assert tones.tone_level_db(paused, BARESIP_TONE) < FAINT or tones.total_power(paused) < 1e-6  # on hold: quiet
    # Back, and clean over the whole recording: no frames dropped or repeated on the way.
    assert tones.tone_level_db(resumed, BARESIP_TONE) > HEARD, tones.tone_envelope(resumed, BARESIP_TONE)
    assert tones.tone_level_db(phone.heard(), HANDSET_TONE) > HEARD  # baresip heard the handset


def test_dtmf_from_baresip_reaches_a_handset_and_back(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, baresip: BaresipFactory,
        tmp_path: Path) -> None:
    pbx, phone, handset, call = call_in_progress(pbx_factory, handset_factory, baresip, tmp_path)

    phone.keys("12#")  # RFC 4733 to the worker, relayed as RFC 4733 to the handset
    assert [handset.wait_for("dtmf", call=call, timeout=5)["digit"] for _ in range(3)] == ["1", "2", "#"]
    at = len(phone.output.lines)
    handset.dtmf(call, "5*9")
    assert phone.received_dtmf(3, timeout=10, start=at) == ["5", "*", "9"]

    phone.command("b")
    handset.wait_state(call, "DISCONNECTED")
    pbx.wait_log(r"event=call_ended .*caller=200 callee=201 reason=bye_from_caller")
