"""The daemon (the edge) killed with SIGKILL mid-call: its media workers, left without
the edge their dialogs are routed through, BYE both parties straight to each handset
and exit, so no phone sits in a dead call."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import user_block
from tests.support.procs import descendants

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

HandsetFactory = Callable[..., Handset]
BYE_WITHIN = 4.0
"""Seconds from the kill to both BYEs: the worker sees EOF at once and sends them first."""


def test_daemon_killed_mid_call_both_parties_get_bye(pbx_factory: DaemonFactory,
                                                     handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([user_block("100"), user_block("200")])
    caller, callee = handset_factory("caller", trace=True), handset_factory("callee", trace=True)
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
    assert callee.register(pbx.registrar, "200", "secret")["code"] == 200
    call = caller.call("sip:200@home.arpa")
    incoming = str(callee.wait_incoming()["call"])
    callee.answer(incoming, 200)
    caller.wait_state(call, "CONFIRMED")
    callee.wait_state(incoming, "CONFIRMED")
    assert pbx.proc is not None
    workers = descendants(pbx.proc.pid)
    assert workers, "the daemon should have media worker processes"

    killed = time.monotonic()
    pbx.kill()
    ended_caller = caller.wait_state(call, "DISCONNECTED", timeout=BYE_WITHIN)
    ended_callee = callee.wait_state(incoming, "DISCONNECTED", timeout=BYE_WITHIN)
    elapsed = time.monotonic() - killed
    print(f"kill -9 to both BYEs: {elapsed:.3f} s")
    assert ended_caller["end_request"] == "BYE"
    assert ended_callee["end_request"] == "BYE"
    for phone in (caller, callee):
        bye = phone.wait_sip("rx", "BYE ")
        assert 'Reason: SIP;cause=503;text="PBX restarted"' in bye, bye
        # The BYE was answered (by the handset, to the worker's own socket).
        phone.wait_for("sip", dir="tx", msg=_ok_to_bye)
    assert elapsed < BYE_WITHIN

    deadline = time.monotonic() + 5
    while _alive(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(workers), f"processes left behind: {_alive(workers)}"
    print(f"kill -9 to no worker left: {time.monotonic() - killed:.3f} s")


def test_daemon_killed_mid_conference_every_party_gets_bye(pbx_factory: DaemonFactory,
                                                            handset_factory: HandsetFactory) -> None:
    """A *74 joiner is a leg the worker answered, like the caller: it gets its BYE too."""
    pbx = pbx_factory([user_block("100"), user_block("200", one_number=True)])
    caller = handset_factory("caller")
    phones = [handset_factory(f"b{i}") for i in range(2)]
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
    for phone in phones:
        assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
    call = caller.call("sip:200@home.arpa")
    incoming = [str(p.wait_incoming()["call"]) for p in phones]
    phones[0].answer(incoming[0], 200)
    caller.wait_state(call, "CONFIRMED")
    phones[1].wait_state(incoming[1], "DISCONNECTED")  # answered elsewhere
    join = phones[1].call("sip:*74@home.arpa")
    phones[1].wait_state(join, "CONFIRMED")
    pbx.wait_log("event=call_joined")

    killed = time.monotonic()
    pbx.kill()
    for phone, leg in ((caller, call), (phones[0], incoming[0]), (phones[1], join)):
        assert phone.wait_state(leg, "DISCONNECTED", timeout=BYE_WITHIN)["end_request"] == "BYE", phone
    print(f"kill -9 to three BYEs: {time.monotonic() - killed:.3f} s")


def _ok_to_bye(message: object) -> bool:
    text = str(message)
    return text.startswith("SIP/2.0 200") and any(
        line.startswith("CSeq:") and line.endswith(" BYE") for line in text.split("\r\n"))


def _alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie has exited)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return out
