"""Pickup through the real daemon: a call ringing at 200's handsets is answered on 300's
handset by `*8`, by `**200`, or by the BLF key's INVITE with Replaces (the call-id of the
ringing dialog from a dialog NOTIFY). The caller and the picker hear each other (tones),
the ringing devices get a CANCEL, and the media worker lives on."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_blf import Watcher, has_state
from tests.support.pbx import Daemon, user_block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

HandsetFactory = Callable[..., Handset]
HEARD = -8.0


def house(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
          ringing_devices: int = 2) -> tuple[Daemon, Handset, list[Handset], Handset]:
    pbx = pbx_factory([user_block("100"), user_block("200", one_number=True), user_block("300")])
    caller = handset_factory("caller")
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
    phones = []
    for i in range(ringing_devices):
        phone = handset_factory(f"b{i}")
        assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
        phones.append(phone)
    picker = handset_factory("picker")
    assert picker.register(pbx.registrar, "300", "secret")["code"] == 200
    return pbx, caller, phones, picker


def ring(pbx: Daemon, caller: Handset, phones: list[Handset]) -> tuple[str, list[str], str]:
    """100 calls 200; returns the call, the ringing phones' calls, and the call's token."""
    call = caller.call("sip:200@home.arpa")
    incoming = [str(p.wait_incoming()["call"]) for p in phones]
    line = pbx.wait_log("event=call_started call=.* caller=100")
    return call, incoming, line.split("call=", 1)[1].split()[0]


def worker_pid(pbx: Daemon, token: str) -> int:
    line = pbx.wait_log(f"event=media_worker_call .*token={token}")
    return int(line.split("pid=", 1)[1].split()[0])


def talk(caller: Handset, call: str, picker: Handset, picked: str, tmp: Path) -> None:
    """Caller and picker each play a tone; each hears the other's."""
    caller.wait_for("media", call=call, status="active")
    picker.wait_for("media", call=picked, status="active")
    for phone, c, freq in ((caller, call, 440), (picker, picked, 1000)):
        phone.play_tone(c, freq)
        phone.record(c, tmp / f"{phone.name}.wav")
    time.sleep(2.0)
    heard_by_caller = str(caller.stop_media(call)["path"])
    heard_by_picker = str(picker.stop_media(picked)["path"])
    assert tones.tone_level_db(heard_by_caller, 1000) > HEARD
    assert tones.tone_level_db(heard_by_picker, 440) > HEARD


def picked_up(pbx: Daemon, caller: Handset, call: str, phones: list[Handset], incoming: list[str],
              picker: Handset, picked: str, token: str, tmp: Path) -> None:
    pid = worker_pid(pbx, token)
    picker.wait_state(picked, "CONFIRMED")
    caller.wait_state(call, "CONFIRMED")
    for phone, c in zip(phones, incoming, strict=True):  # they stop ringing: CANCELled
        assert phone.wait_state(c, "DISCONNECTED")["end_request"] == "CANCEL"
    pbx.wait_log(f"event=call_picked_up call={token} number=300")
    talk(caller, call, picker, picked, tmp)
    picker.hangup(picked)
    caller.wait_state(call, "DISCONNECTED")
    pbx.wait_log(f"event=call_ended call={token} ")
    assert os.path.exists(f"/proc/{pid}")  # the worker lives on
    assert not pbx.log_matches("media_worker_died|media_worker_lost")
    pbx.assert_clean_log()


def test_star8_picks_up_the_call_ringing_elsewhere(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                                   tmp_path: Path) -> None:
    pbx, caller, phones, picker = house(pbx_factory, handset_factory)
    call, incoming, token = ring(pbx, caller, phones)
    picked = picker.call("sip:*8@home.arpa")
    picked_up(pbx, caller, call, phones, incoming, picker, picked, token, tmp_path)


def test_directed_pickup_names_the_number(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                          tmp_path: Path) -> None:
    pbx, caller, phones, picker = house(pbx_factory, handset_factory, ringing_devices=1)
    call, incoming, token = ring(pbx, caller, phones)
    picked = picker.call("sip:**200@home.arpa")
    picked_up(pbx, caller, call, phones, incoming, picker, picked, token, tmp_path)


def test_blf_key_pickup_with_replaces_early_only(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                                 tmp_path: Path) -> None:
    pbx, caller, phones, picker = house(pbx_factory, handset_factory, ringing_devices=1)
    watcher = Watcher(pbx.port, "300")
    try:
        assert watcher.subscribe("200", "dialog").status == 200
        watcher.wait_notify(lambda n: True)
        call, incoming, token = ring(pbx, caller, phones)
        early = watcher.wait_notify(has_state("early")).body.decode()
        call_id = re.search(r'call-id="([^"]+)"', early).group(1)  # type: ignore[union-attr]
        local_tag = re.search(r'local-tag="([^"]+)"', early).group(1)  # type: ignore[union-attr]
        remote_tag = re.search(r'remote-tag="([^"]+)"', early).group(1)  # type: ignore[union-attr]
        replaces = f"{call_id};to-tag={local_tag};from-tag={remote_tag};early-only"
        picked = picker.call("sip:200@home.arpa", headers={"Replaces": replaces})
        picked_up(pbx, caller, call, phones, incoming, picker, picked, token, tmp_path)
    finally:
        watcher.close()


def test_nothing_ringing_nothing_picked_up(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, caller, phones, picker = house(pbx_factory, handset_factory, ringing_devices=1)
    for uri in ("sip:*8@home.arpa", "sip:**200@home.arpa", "sip:**999@home.arpa"):
        attempt = picker.call(uri)
        assert picker.wait_state(attempt, "DISCONNECTED")["last_status"] == 404, uri
    # Once answered, the call is no longer there to pick up.
    call, incoming, token = ring(pbx, caller, phones)
    phones[0].answer(incoming[0], 200)
    caller.wait_state(call, "CONFIRMED")
    attempt = picker.call("sip:**200@home.arpa")
    assert picker.wait_state(attempt, "DISCONNECTED")["last_status"] == 404
    stale = picker.call("sip:200@home.arpa", headers={"Replaces": f"{token};to-tag=x;from-tag=y;early-only"})
    assert picker.wait_state(stale, "DISCONNECTED")["last_status"] == 481
    caller.hangup(call)
    phones[0].wait_state(incoming[0], "DISCONNECTED")
    pbx.assert_clean_log()
