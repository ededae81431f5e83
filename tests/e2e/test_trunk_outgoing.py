"""Calls out through the provider: Kamailio on 127.0.0.2 is the provider (it challenges every
INVITE from its users, the box's too), the box registers to it as the family's DID, and an
"outside phone" registered at Kamailio is called by a handset of the family dialling
0 + its number."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.support.baresip import Baresip
from tests.support.control import ControlConn, control_block
from tests.support.kamailio import DID, OUTSIDE, OUTSIDE_PASSWORD, PASSWORD, Kamailio, available
from tests.support.pbx import Daemon, user_block
from tests.support.ports import rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180),
              pytest.mark.skipif(not available(), reason="Debian's kamailio package is not installed")]

HandsetFactory = Callable[..., Handset]
EMERGENCY = "112"
HEARD = -8.0


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Kamailio]:
    kamailio = Kamailio(tmp_path / "kamailio", {DID: PASSWORD, OUTSIDE: OUTSIDE_PASSWORD,
                                                EMERGENCY: "emergency-pw"}).start()
    yield kamailio
    kamailio.stop()


def at_provider(handset_factory: HandsetFactory, provider: Kamailio, name: str, number: str,
                password: str) -> Handset:
    phone = handset_factory(name, trace=True, codecs=["PCMA/8000"])
    reg = phone.register(f"sip:{provider.server}", number, password, domain=provider.server)
    assert reg["code"] == 200, reg
    return phone


def family(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, provider: Kamailio, *,
           trunk_extra: str = "", devices: int = 1, **user_200: object) -> tuple[Daemon, list[Handset]]:
    trunk = ("[[trunks]]\nname = \"provider\"\n"
             f'server = "{provider.server}"\nusername = "{DID}"\npassword = "{PASSWORD}"\n'
             f'incoming = {{ "{DID}" = "200" }}\n' + trunk_extra + "\n")
    pbx = pbx_factory([user_block("100"), user_block("200", one_number=True, **user_200)],
                      extra=control_block() + trunk)
    phones = []
    for i in range(devices):
        phone = handset_factory(f"b{i}", trace=True)
        assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
        phones.append(phone)
    pbx.wait_log(r"event=trunk_registered trunk=provider")
    return pbx, phones


def test_call_out_answered_with_the_trunks_credentials_audio_both_ways(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, provider: Kamailio, tmp_path: Path) -> None:
    pbx, (phone,) = family(pbx_factory, handset_factory, provider)
    outside = at_provider(handset_factory, provider, "outside", OUTSIDE, OUTSIDE_PASSWORD)
    control = ControlConn(pbx.config.parent / "ctl.sock")
    call = phone.call(f"sip:0{OUTSIDE}@home.arpa")
    incoming = str(outside.wait_incoming(timeout=5)["call"])
    started = control.wait_event("call_started")["call"]
    assert (started["caller"], started["callee"]) == ("200", OUTSIDE)
    pbx.wait_log(rf"event=call_out call=\S+ caller=200 number={OUTSIDE} trunk=provider caller_id={DID}")
    # The provider had the prefix stripped, the trunk's number as the caller, G.711 only, nothing internal.
    invite = outside.wait_sip("rx", "INVITE ")
    head, _, body = invite.partition("\r\n\r\n")
    assert head.startswith(f"INVITE sip:{OUTSIDE}@")
    from_line = next(line for line in head.split("\r\n") if line.startswith(("From:", "f:")))
    assert f"sip:{DID}@{provider.server.split(':')[0]}" in from_line
    assert "X-Homepbx" not in invite and "G722" not in body
    assert "PCMA/8000" in body
    outside.wait_state(incoming, "EARLY")
    phone.wait_state(call, "EARLY")
    outside.answer(incoming, 200)
    phone.wait_state(call, "CONFIRMED")
    outside.wait_state(incoming, "CONFIRMED")
    assert control.wait_event("call_answered")["call"]["caller"] == "200"

    outside.wait_for("media", call=incoming, status="active")
    phone.wait_for("media", call=call, status="active")
    for handset, cid, freq in ((outside, incoming, 440), (phone, call, 1000)):
        handset.play_tone(cid, freq)
        handset.record(cid, tmp_path / f"{handset.name}.wav")
    time.sleep(2.0)
    heard_outside = str(outside.stop_media(incoming)["path"])
    heard_family = str(phone.stop_media(call)["path"])
    assert tones.tone_level_db(heard_outside, 1000) > HEARD  # the outside phone hears the family
    assert tones.tone_level_db(heard_family, 440) > HEARD  # and the family the outside phone
    # DTMF (RFC 4733) both ways: telephone-event stays in the offer to the provider, and the
    # worker carries the digits across.
    phone.dtmf(call, "12#")
    assert [outside.wait_for("dtmf", call=incoming)["digit"] for _ in range(3)] == ["1", "2", "#"]
    outside.dtmf(incoming, "9*")
    assert [phone.wait_for("dtmf", call=call)["digit"] for _ in range(2)] == ["9", "*"]

    # The call stays up past the provider's retransmission window (its ACK arrived with the
    # CSeq it expects), and the family's BYE reaches the outside phone.
    time.sleep(1.0)
    phone.hangup(call)
    ended = outside.wait_state(incoming, "DISCONNECTED")
    assert ended["end_request"] == "BYE"
    phone.wait_state(call, "DISCONNECTED")
    control.wait_event("call_ended")
    control.close()
    assert provider.count("INVITE") == 1  # the one with credentials; the first was challenged


def test_max_channels_503_and_emergency_numbers_go_out_at_every_limit(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, provider: Kamailio) -> None:
    pbx, (b0, b1) = family(pbx_factory, handset_factory, provider, trunk_extra="max_channels = 1\n", devices=2,
                           max_outgoing_calls=1)
    hundred = handset_factory("p100", trace=True)
    assert hundred.register(pbx.registrar, "100", "secret")["code"] == 200
    outside = at_provider(handset_factory, provider, "outside", OUTSIDE, OUTSIDE_PASSWORD)
    emergency = at_provider(handset_factory, provider, "emergency", EMERGENCY, "emergency-pw")

    first = b0.call(f"sip:0{OUTSIDE}@home.arpa")
    incoming = str(outside.wait_incoming(timeout=5)["call"])
    outside.answer(incoming, 200)
    b0.wait_state(first, "CONFIRMED")

    # The one line is taken: another extension's call out gets 503, 200's second one 403.
    busy = hundred.call(f"sip:0{OUTSIDE}@home.arpa")
    assert hundred.wait_state(busy, "DISCONNECTED")["last_status"] == 503
    over = b1.call(f"sip:0{OUTSIDE}@home.arpa")
    assert b1.wait_state(over, "DISCONNECTED")["last_status"] == 403

    # An emergency number goes out all the same, as dialled and with the prefix.
    for dialled in (EMERGENCY, "0" + EMERGENCY):
        call = b1.call(f"sip:{dialled}@home.arpa")
        rung = str(emergency.wait_incoming(timeout=5)["call"])
        emergency.answer(rung, 200)
        b1.wait_state(call, "CONFIRMED")
        pbx.wait_log(rf"event=call_out call=\S+ caller=200 number={EMERGENCY} trunk=provider "
                     rf"caller_id={DID} emergency=True")
        b1.hangup(call)
        emergency.wait_state(rung, "DISCONNECTED")
        b1.wait_state(call, "DISCONNECTED")
        time.sleep(0.2)
    b0.hangup(first)
    outside.wait_state(incoming, "DISCONNECTED")
    assert provider.count("INVITE") == 3


def test_call_out_to_baresip_at_the_provider_both_hear_the_other(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, provider: Kamailio,
        baresip: Callable[..., Baresip], tmp_path: Path) -> None:
    """The outside phone is software nobody here wrote: baresip at Kamailio, answering by itself."""
    pbx, (phone,) = family(pbx_factory, handset_factory, provider)
    outside = baresip(tmp_path / "outside", pbx, OUTSIDE, OUTSIDE_PASSWORD, 440, rtp_range(),
                      auto_answer=True, registrar=provider.server)
    outside.wait_for("registered successfully")
    call = phone.call(f"sip:0{OUTSIDE}@home.arpa")
    phone.wait_state(call, "CONFIRMED")
    outside.wait_for("Call established")
    phone.wait_for("media", call=call, status="active")
    phone.play_tone(call, 1000)
    phone.record(call, tmp_path / "family.wav")
    time.sleep(2.0)
    heard = str(phone.stop_media(call)["path"])
    phone.hangup(call)
    outside.wait_for("terminated")
    outside.stop()
    assert tones.tone_level_db(heard, 440) > HEARD  # the family hears the outside phone
    assert tones.tone_level_db(outside.heard(), 1000) > HEARD  # and the outside phone the family
    pbx.wait_log(rf"event=call_out call=\S+ caller=200 number={OUTSIDE} trunk=provider")
