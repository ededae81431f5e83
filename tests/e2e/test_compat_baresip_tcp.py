"""baresip (Debian's baresip-core 1.0) over TCP against the shipped config, untouched.

It registers over its own TCP connection (`;transport=tcp` on the account) and calls a pjsua2
handset on UDP; each hears the other's tone. Like baresip over UDP (test_softphone.py) it is
offered MD5 alone, known by its User-Agent.
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
from tests.support.pbx import user_block
from tests.support.ports import rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

HEARD = -8.0  # dB of total power: the tone clearly dominates what is heard
FAINT = -20.0


def test_baresip_registers_over_tcp_and_calls_a_handset_both_hear_the_other(
        pbx_factory: DaemonFactory, baresip: Callable[..., Baresip], handset_factory: Callable[..., Handset],
        tmp_path: Path) -> None:
    pbx = pbx_factory([user_block("200", "pw-200"), user_block("201", "pw-201")])  # shipped digest settings
    handset = handset_factory("h201")
    assert handset.register(pbx.registrar, "201", "pw-201")["code"] == 200
    phone = baresip(tmp_path / "baresip", pbx, "200", "pw-200", 440, rtp_range(), transport="tcp")
    phone.wait_for("registered successfully")
    pbx.wait_log(r"event=device_registered number=200 .*flow=tcp:127\.0\.0\.1:\d+ .*ua=\"?baresip")

    phone.command("d 201")
    call = str(handset.wait_incoming(timeout=10)["call"])
    handset.answer(call, 200)
    phone.wait_for("Call established")
    handset.wait_for("media", call=call, status="active")
    handset.play_tone(call, 1000)
    handset.record(call, tmp_path / "handset.wav")
    time.sleep(2.0)
    heard = str(handset.stop_media(call)["path"])
    phone.command("b")  # hang up
    handset.wait_state(call, "DISCONNECTED")
    pbx.wait_log(r"event=call_ended .*caller=200 callee=201 reason=bye_from_caller")
    phone.stop()
    assert tones.tone_level_db(heard, 440) > HEARD  # the handset hears baresip
    assert tones.tone_level_db(phone.heard(), 1000) > HEARD  # baresip hears the handset
    assert tones.tone_level_db(phone.heard(), 440) < FAINT  # and not itself
