"""Transfer through the real daemon (issue 14): blind (REFER) and attended (REFER with
Replaces, and a direct INVITE with Replaces), a transfer that fails and resumes, and media
workers that no handset request can kill (and that are forgotten at once when killed).

A (100) calls B (200); B transfers A to C (300). Each party plays its own tone and records
what it hears; the test measures the tones, the transferring phone's NOTIFYs (sipfrag) and
that every worker process is still alive after."""

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
from tests.support.pbx import Daemon, user_block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HandsetFactory = Callable[..., Handset]
HEARD = -8.0
FAINT = -20.0


def house(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, extra_users: str = ""
          ) -> tuple[Daemon, Handset, Handset, Handset]:
    pbx = pbx_factory([user_block("100"), user_block("200"), user_block("300"), extra_users])
    phones = []
    for number in ("100", "200", "300"):
        phone = handset_factory(f"p{number}")
        assert phone.register(pbx.registrar, number, "secret")["code"] == 200
        phones.append(phone)
    return pbx, phones[0], phones[1], phones[2]


def connect(caller: Handset, callee: Handset, number: str) -> tuple[str, str]:
    call = caller.call(f"sip:{number}@home.arpa")
    incoming = str(callee.wait_incoming()["call"])
    callee.answer(incoming, 200)
    caller.wait_state(call, "CONFIRMED")
    caller.wait_for("media", call=call, status="active")
    callee.wait_for("media", call=incoming, status="active")
    return call, incoming


def listen(parties: list[tuple[Handset, str, int]], tmp: Path, seconds: float = 1.5) -> dict[int, str]:
    for phone, call, freq in parties:
        phone.play_tone(call, freq)
        phone.record(call, tmp / f"{phone.name}-{freq}-{time.monotonic_ns()}.wav")
    time.sleep(seconds)
    return {freq: str(phone.stop_media(call)["path"]) for phone, call, freq in parties}


def hear_each_other(a: tuple[Handset, str], c: tuple[Handset, str], tmp: Path) -> None:
    heard = listen([(a[0], a[1], 440), (c[0], c[1], 1000)], tmp)
    assert tones.tone_level_db(heard[440], 1000) > HEARD
    assert tones.tone_level_db(heard[1000], 440) > HEARD


def worker_pids(pbx: Daemon) -> set[int]:
    return {int(m) for line in pbx.log_matches(r"event=media_worker_call") for m in re.findall(r"pid=(\d+)", line)}


def assert_alive(pids: set[int]) -> None:
    assert pids
    for pid in pids:
        os.kill(pid, 0)  # raises when the worker is gone


def assert_no_worker_died(pbx: Daemon) -> None:
    assert not pbx.log_matches(r"event=media_worker_died"), pbx.log_matches(r"event=media_worker_died")


def test_blind_transfer_by_the_callee(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                      tmp_path: Path) -> None:
    pbx, a, b, c = house(pbx_factory, handset_factory)
    a_call, b_call = connect(a, b, "200")
    # The Refer-To names no port and a host that is not the box: the leg still goes to the edge.
    b.send("transfer", call=b_call, uri="sip:300@127.0.0.1")
    incoming = c.wait_incoming(timeout=5)
    assert "100" in str(incoming["from"]) or "100" in str(incoming["headers"])
    c_call = str(incoming["call"])
    assert b.wait_for("transfer_status", call=b_call, code=100)
    c.answer(c_call, 200)
    final = b.wait_for("transfer_status", call=b_call, final=True, timeout=5)
    assert final["code"] == 200
    b.hangup(b_call)
    b.wait_state(b_call, "DISCONNECTED")
    c.wait_for("media", call=c_call, status="active")
    hear_each_other((a, a_call), (c, c_call), tmp_path)
    pbx.wait_log(r"event=transfer .*by=200 target=300")
    assert_alive(worker_pids(pbx))
    # C hangs up: the call ends for A, and at the edge.
    c.hangup(c_call)
    a.wait_state(a_call, "DISCONNECTED")
    pbx.wait_log("event=call_ended")
    assert_alive(worker_pids(pbx))
    assert_no_worker_died(pbx)


def test_blind_transfer_by_the_caller_who_stays_on_line(pbx_factory: DaemonFactory,
                                                        handset_factory: HandsetFactory, tmp_path: Path) -> None:
    """The transferring phone is the caller (A-leg) and does not hang up after the 200
    NOTIFY: the worker releases it; the transferred party and the target talk on."""
    pbx, a, b, c = house(pbx_factory, handset_factory)
    a_call, b_call = connect(a, b, "200")
    a.send("transfer", call=a_call, uri="sip:300@home.arpa")
    c_call = str(c.wait_incoming()["call"])
    c.answer(c_call, 200)
    assert a.wait_for("transfer_status", call=a_call, final=True)["code"] == 200
    assert a.wait_state(a_call, "DISCONNECTED", timeout=8)["end_request"] == "BYE"  # released by the worker
    c.wait_for("media", call=c_call, status="active")
    hear_each_other((b, b_call), (c, c_call), tmp_path)
    assert not pbx.log_matches("event=call_ended")  # the call goes on without its caller
    b.hangup(b_call)
    c.wait_state(c_call, "DISCONNECTED")
    pbx.wait_log("event=call_ended")
    assert_alive(worker_pids(pbx))
    assert_no_worker_died(pbx)


@pytest.mark.parametrize(("target", "code"), [("300", 486), ("555", 404)])
def test_failed_transfer_resumes(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, tmp_path: Path,
                                 target: str, code: int) -> None:
    pbx, a, b, c = house(pbx_factory, handset_factory)
    c.auto_answer("reject", 486)
    a_call, b_call = connect(a, b, "200")
    b.send("hold", call=b_call)
    b.wait_for("media", call=b_call, status="local_hold")
    b.send("transfer", call=b_call, uri=f"sip:{target}@home.arpa")
    final = b.wait_for("transfer_status", call=b_call, final=True, timeout=8)
    assert final["code"] == code
    b.send("unhold", call=b_call)
    b.wait_for("media", call=b_call, status="active")
    hear_each_other((a, a_call), (b, b_call), tmp_path)
    a.hangup(a_call)
    b.wait_state(b_call, "DISCONNECTED")
    assert_alive(worker_pids(pbx))
    assert_no_worker_died(pbx)
