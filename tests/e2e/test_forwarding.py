"""Call forwarding and do-not-disturb end to end: the real daemon, pjsua2 handsets,
baresip dialling the codes, the control socket setting DND."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.media.protocol import CONFIRM_TONE_HZ
from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.support.baresip import Baresip
from tests.support.control import ControlConn, control_block
from tests.support.pbx import Daemon, user_block
from tests.support.ports import rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HandsetFactory = Callable[..., Handset]
BaresipFactory = Callable[..., Baresip]


def three(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, *, register: tuple[str, ...] = ("100", "200",
          "300"), u200: dict[str, object] | None = None, u300: dict[str, object] | None = None,
          ) -> tuple[Daemon, dict[str, Handset]]:
    """100, 200 and 300, one handset each (those in `register` registered)."""
    pbx = pbx_factory([user_block("100"), user_block("200", **(u200 or {})), user_block("300", **(u300 or {}))],
                      extra=control_block())
    phones = {}
    for number in register:
        phone = handset_factory(f"h{number}", trace=True)
        assert phone.register(pbx.registrar, number, "secret")["code"] == 200
        phones[number] = phone
    return pbx, phones


def user_setting(pbx: Daemon, number: str, name: str) -> object:
    user = load_config(pbx.config).user(number)
    assert user is not None
    return getattr(user, name)


def dial_code(phone: Handset, code: str, heard: Path | None = None) -> dict[str, object]:
    """Dial a feature code: answered, beeps, hung up by the box (BYE); with `heard`, what
    the handset heard is recorded there."""
    call = phone.call(f"sip:{code}@home.arpa")
    phone.wait_state(call, "CONFIRMED", timeout=10)
    if heard is not None:
        phone.wait_for("media", call=call, status="active")
        phone.record(call, heard)
    ended = phone.wait_state(call, "DISCONNECTED", timeout=10)
    assert ended["end_request"] == "BYE"
    if heard is not None:  # the recording is closed when the call is gone
        phone.wait_for("recorded", call=call, path=str(heard.resolve()))
    return ended


def answer_and_hear(caller: Handset, call: str, callee: Handset, incoming: str, tmp_path: Path) -> None:
    """The callee answers; the caller's tone is heard there."""
    callee.answer(incoming, 200)
    caller.wait_state(call, "CONFIRMED")
    callee.wait_for("media", call=incoming, status="active")
    caller.wait_for("media", call=call, status="active")
    caller.play_tone(call, 440)
    callee.record(incoming, tmp_path / "heard.wav")
    time.sleep(1.5)
    heard = callee.stop_media(incoming)["path"]
    assert tones.tone_level_db(str(heard), 440) > -6
    caller.hangup(call)
    callee.wait_state(incoming, "DISCONNECTED")


def test_forward_always_set_by_code_rings_the_target_with_diversion(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, tmp_path: Path) -> None:
    pbx, phones = three(pbx_factory, handset_factory)
    dial_code(phones["200"], "*72300", heard=tmp_path / "beeps.wav")
    assert tones.tone_level_db(str(tmp_path / "beeps.wav"), CONFIRM_TONE_HZ) > -12  # the beeps that say "done"
    pbx.wait_log(r"event=feature_code number=200 .*code=forward_always changes=.forward_always=300")
    assert user_setting(pbx, "200", "forward_always") == "300"  # saved in config.toml

    call = phones["100"].call("sip:200@home.arpa")
    incoming = str(phones["300"].wait_incoming(timeout=5)["call"])
    invite = phones["300"].wait_sip("rx", "INVITE ")
    assert "Diversion: <sip:200@home.arpa>;reason=unconditional" in invite
    assert not phones["200"].events_of("incoming_call")  # 200 never rang
    answer_and_hear(phones["100"], call, phones["300"], incoming, tmp_path)
    pbx.wait_log(r"event=call_forwarded .*number=200 condition=always to=300")

    dial_code(phones["200"], "*73")
    pbx.wait_log(r"event=feature_code number=200 .*changes=.forward_always=.\s*$")
    assert user_setting(pbx, "200", "forward_always") == ""
    call = phones["100"].call("sip:200@home.arpa")
    incoming = str(phones["200"].wait_incoming(timeout=5)["call"])
    phones["100"].hangup(call)
    phones["200"].wait_state(incoming, "DISCONNECTED")
    pbx.assert_clean_log()


def test_forward_on_busy(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, tmp_path: Path) -> None:
    pbx, phones = three(pbx_factory, handset_factory, u200={"forward_busy": "300"})
    call = phones["100"].call("sip:200@home.arpa")
    busy = str(phones["200"].wait_incoming(timeout=5)["call"])
    phones["200"].answer(busy, 486)
    incoming = str(phones["300"].wait_incoming(timeout=5)["call"])
    assert "Diversion: <sip:200@home.arpa>;reason=user-busy" in phones["300"].wait_sip("rx", "INVITE ")
    answer_and_hear(phones["100"], call, phones["300"], incoming, tmp_path)
    pbx.assert_clean_log()


def test_forward_on_no_answer_after_n_seconds(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                              tmp_path: Path) -> None:
    pbx, phones = three(pbx_factory, handset_factory, u200={"forward_no_answer": "300", "no_answer_after": 5})
    started = time.monotonic()
    call = phones["100"].call("sip:200@home.arpa")
    ringing = str(phones["200"].wait_incoming(timeout=5)["call"])
    incoming = str(phones["300"].wait_incoming(timeout=10)["call"])
    elapsed = time.monotonic() - started
    assert 4.5 < elapsed < 7.0, elapsed
    assert phones["200"].wait_state(ringing, "DISCONNECTED")["end_request"] == "CANCEL"
    assert "reason=no-answer" in phones["300"].wait_sip("rx", "INVITE ")
    answer_and_hear(phones["100"], call, phones["300"], incoming, tmp_path)
    pbx.assert_clean_log()


def test_forward_when_unreachable(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                  tmp_path: Path) -> None:
    pbx, phones = three(pbx_factory, handset_factory, register=("100", "300"), u200={"forward_unreachable": "300"})
    call = phones["100"].call("sip:200@home.arpa")
    incoming = str(phones["300"].wait_incoming(timeout=5)["call"])
    assert "reason=unavailable" in phones["300"].wait_sip("rx", "INVITE ")
    answer_and_hear(phones["100"], call, phones["300"], incoming, tmp_path)
    pbx.assert_clean_log()


def test_dnd_by_code_refuses_486_then_forwards_on_busy(pbx_factory: DaemonFactory,
                                                       handset_factory: HandsetFactory) -> None:
    pbx, phones = three(pbx_factory, handset_factory)
    dial_code(phones["200"], "*78")
    assert user_setting(pbx, "200", "dnd") is True
    call = phones["100"].call("sip:200@home.arpa")
    assert phones["100"].wait_state(call, "DISCONNECTED")["last_status"] == 486
    dial_code(phones["200"], "*90300")
    call = phones["100"].call("sip:200@home.arpa")
    incoming = str(phones["300"].wait_incoming(timeout=5)["call"])
    assert "reason=do-not-disturb" in phones["300"].wait_sip("rx", "INVITE ")
    phones["100"].hangup(call)
    phones["300"].wait_state(incoming, "DISCONNECTED")
    dial_code(phones["200"], "*76")  # toggled off
    assert user_setting(pbx, "200", "dnd") is False
    assert not phones["200"].events_of("incoming_call")
    pbx.assert_clean_log()


def test_dnd_for_one_device_by_control_socket(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([user_block("100"), user_block("200", one_number=True)], extra=control_block())
    caller = handset_factory("caller")
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
    kitchen, bedroom = handset_factory("kitchen"), handset_factory("bedroom")
    for phone in (kitchen, bedroom):
        assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
    control = ControlConn(pbx.config.parent / "ctl.sock")
    (number,) = [n for n in control.snapshot["numbers"] if n["number"] == "200"]
    devices = [d["device_id"] for d in number["devices"]]
    assert len(devices) == 2 and all(d["dnd"] is False for d in number["devices"])
    reply = control.command("set_user", number="200", changes={"dnd_devices": [devices[0]]})
    assert reply["reply"] == "ok", reply
    assert user_setting(pbx, "200", "dnd_devices") == (devices[0],)

    call = caller.call("sip:200@home.arpa")
    rang = [p for p in (kitchen, bedroom) if p.events_of("incoming_call") or _rings(p)]
    assert len(rang) == 1
    caller.hangup(call)
    # every device in DND: the number is in DND, 486
    assert control.command("set_user", number="200", changes={"dnd_devices": devices})["reply"] == "ok"
    call = caller.call("sip:200@home.arpa")
    assert caller.wait_state(call, "DISCONNECTED")["last_status"] == 486
    control.close()
    pbx.assert_clean_log()


def _rings(phone: Handset) -> bool:
    try:
        phone.wait_incoming(timeout=2)
    except Exception:
        return False
    return True


def test_a_forwarding_loop_is_refused(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, phones = three(pbx_factory, handset_factory, u200={"forward_always": "300"},
                        u300={"forward_always": "200"})
    call = phones["100"].call("sip:200@home.arpa")
    assert phones["100"].wait_state(call, "DISCONNECTED")["last_status"] == 482
    assert not phones["200"].events_of("incoming_call") and not phones["300"].events_of("incoming_call")
    pbx.assert_clean_log()


def test_codes_from_baresip(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, baresip: BaresipFactory,
                            tmp_path: Path) -> None:
    pbx = pbx_factory([user_block("200", "pw-200"), user_block("300", "pw-300")])
    phone = baresip(tmp_path / "baresip", pbx, "200", "pw-200", 440, rtp_range())
    phone.wait_for("registered successfully")
    at = phone.command("d *72300")
    pbx.wait_log(r"event=feature_code number=200 .*changes=.forward_always=300", timeout=10)
    phone.wait_for("Call established", start=at)  # answered, beeped at,
    phone.wait_for("session closed", start=at)  # and hung up by the box
    at = phone.command("d *78")
    pbx.wait_log(r"event=feature_code number=200 .*changes=.dnd=True", timeout=10)
    phone.wait_for("session closed", start=at)
    config = load_config(pbx.config).user("200")
    assert config is not None and config.forward_always == "300" and config.dnd
    phone.stop()
    pbx.assert_clean_log()


@pytest.mark.parametrize("condition", ["always", "busy"])
def test_forward_to_an_outside_number_through_the_provider(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, tmp_path: Path, condition: str) -> None:
    from tests.support.kamailio import DID, OUTSIDE, OUTSIDE_PASSWORD, PASSWORD, Kamailio, available
    if not available():
        pytest.skip("Debian's kamailio package is not installed")
    provider = Kamailio(tmp_path / "kamailio", {DID: PASSWORD, OUTSIDE: OUTSIDE_PASSWORD}).start()
    try:
        trunk = ("[[trunks]]\nname = \"provider\"\n"
                 f'server = "{provider.server}"\nusername = "{DID}"\npassword = "{PASSWORD}"\n'
                 f'incoming = {{ "{DID}" = "200" }}\n\n')
        u200 = user_block("200", max_outgoing_calls=1, **{f"forward_{condition}": f"0{OUTSIDE}"})
        pbx = pbx_factory([user_block("100"), u200], extra=control_block() + trunk)
        caller = handset_factory("h100", trace=True)
        assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
        family = handset_factory("h200", trace=True)
        assert family.register(pbx.registrar, "200", "secret")["code"] == 200
        pbx.wait_log(r"event=trunk_registered trunk=provider")
        outside = handset_factory("outside", trace=True, codecs=["PCMA/8000"])
        assert outside.register(f"sip:{provider.server}", OUTSIDE, OUTSIDE_PASSWORD,
                                domain=provider.server)["code"] == 200
        for _ in range(2):  # the second time: the first call's count on 200's limit (1 of 1) was released
            call = caller.call("sip:200@home.arpa")
            if condition == "busy":
                family.answer(str(family.wait_incoming(timeout=5)["call"]), 486)
            incoming = str(outside.wait_incoming(timeout=10)["call"])
            invite = outside.wait_sip("rx", "INVITE ")
            assert f"INVITE sip:{OUTSIDE}@" in invite and "X-Homepbx" not in invite
            pbx.wait_log(rf"event=call_forwarded .*number=200 condition={condition} to={OUTSIDE} trunk=provider")
            answer_and_hear(caller, call, outside, incoming, tmp_path)
            pbx.wait_log(r"event=call_ended .*caller=100 callee=")
        pbx.assert_clean_log()
    finally:
        provider.stop()
