"""The call history end to end: the real daemon, pjsua2 handsets, the control socket's
`history` command; a row per call kind, and rows shown before a `kill -9` still there
after the restart."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.support.control import ControlConn, control_block
from tests.support.kamailio import DID, OUTSIDE, OUTSIDE_PASSWORD, PASSWORD, Kamailio, available
from tests.support.pbx import Daemon, user_block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HandsetFactory = Callable[..., Handset]


def history(control: ControlConn, count: int, timeout: float = 5.0, **options: object) -> list[dict[str, Any]]:
    """The newest `count` rows, oldest first, once that many are there (rows are committed
    within ~50 ms of a call's end)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = control.command("history", limit=count, **options)
        assert reply["reply"] == "ok", reply
        rows: list[dict[str, Any]] = reply["calls"]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows[::-1]
        time.sleep(0.05)


def house(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
          extra: str = "") -> tuple[Daemon, Handset, Handset, ControlConn]:
    """100 (Kitchen) and 200 (Family, rings 5 s), one handset each; 300 forwards always to 200."""
    pbx = pbx_factory([user_block("100", name="Kitchen"), user_block("200", name="Family", ring_timeout=5),
                       user_block("300", forward_always="200")], extra=control_block() + extra)
    kitchen, family = handset_factory("h100", trace=True), handset_factory("h200", trace=True)
    assert kitchen.register(pbx.registrar, "100", "secret")["code"] == 200
    assert family.register(pbx.registrar, "200", "secret")["code"] == 200
    return pbx, kitchen, family, ControlConn(pbx.config.parent / "ctl.sock")


def talk(caller: Handset, callee: Handset, uri: str = "sip:200@home.arpa", seconds: float = 1.0) -> None:
    call = caller.call(uri)
    incoming = str(callee.wait_incoming()["call"])
    callee.answer(incoming, 200)
    caller.wait_state(call, "CONFIRMED")
    time.sleep(seconds)
    caller.hangup(call)
    callee.wait_state(incoming, "DISCONNECTED")


def refused(caller: Handset, callee: Handset, status: int) -> None:
    call = caller.call("sip:200@home.arpa")
    incoming = str(callee.wait_incoming()["call"])
    callee.wait_state(incoming, "EARLY")
    callee.answer(incoming, status)
    caller.wait_state(call, "DISCONNECTED")


def test_a_row_for_every_call_kind(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, kitchen, family, control = house(pbx_factory, handset_factory)
    talk(kitchen, family)  # answered
    refused(kitchen, family, 603)  # declined
    refused(kitchen, family, 486)  # busy
    call = kitchen.call("sip:200@home.arpa")  # missed: nobody answers within ring_timeout (5 s)
    family.wait_incoming()
    ended = kitchen.wait_state(call, "DISCONNECTED", timeout=12)
    assert ended["last_status"] == 480
    talk(kitchen, family, "sip:300@home.arpa")  # 300 forwards always to 200, which answers

    rows = history(control, 5)
    assert [r["outcome"] for r in rows] == ["answered", "declined", "busy", "missed", "forwarded"]
    for row in rows:
        assert (row["caller"], row["caller_name"], row["direction"], row["trunk"]) == ("100", "Kitchen", "internal",
                                                                                      "")
        assert row["started"] <= row["ended"]
    answered, declined, busy, missed, forwarded = rows
    assert (answered["callee"], answered["callee_name"], answered["answered_number"]) == ("200", "Family", "200")
    assert answered["answered_by"]  # the device (its user agent)
    assert 0.8 <= answered["duration"] <= 5 and answered["answered"] is not None
    assert (declined["reason"], busy["reason"]) == ("status_603", "status_486")
    assert (declined["answered"], declined["duration"], busy["answered_by"]) == (None, 0.0, "")
    assert missed["ended"] - missed["started"] >= 4.5
    assert (forwarded["callee"], forwarded["forwarded_to"], forwarded["condition"]) == ("300", "200", "always")
    assert forwarded["answered_number"] == "200" and forwarded["duration"] > 0.5
    # Missed calls alone, and paging by time.
    assert [r["outcome"] for r in history(control, 1, missed_only=True)] == ["missed"]
    older = control.command("history", limit=10, before=busy["started"])
    assert [r["outcome"] for r in older["calls"]] == ["declined", "answered"]
    bad = control.command("history", limit=0)
    assert (bad["reply"], bad["field"]) == ("error", "limit")
    pbx.assert_clean_log()


def test_rows_shown_before_kill_9_are_there_after_restart(pbx_factory: DaemonFactory,
                                                          handset_factory: HandsetFactory) -> None:
    pbx, kitchen, family, control = house(pbx_factory, handset_factory)
    shown: list[str] = []
    for _ in range(3):
        talk(kitchen, family, seconds=0.2)
        event = control.wait_event("history_changed")  # announced only once committed
        shown.extend(event["calls"])
    rows_before = history(control, 3)
    assert [r["call_id"] for r in rows_before] == shown
    refused(kitchen, family, 486)  # and one more, killed right after: shown or not, never half-written
    control.close()
    pbx.kill()

    database = pbx.config.parent / "state" / "history.sqlite3"
    conn = sqlite3.connect(database)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    again = Daemon(pbx.config, pbx.port).start()
    try:
        with ControlConn(pbx.config.parent / "ctl.sock") as control:
            after = control.command("history", limit=10)["calls"][::-1]
        ids = [r["call_id"] for r in after]
        assert ids[:3] == shown
        assert after[:3] == rows_before
        assert len(after) in (3, 4)
    finally:
        again.stop()


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Kamailio]:
    kamailio = Kamailio(tmp_path / "kamailio", {DID: PASSWORD, OUTSIDE: OUTSIDE_PASSWORD}).start()
    yield kamailio
    kamailio.stop()


@pytest.mark.skipif(not available(), reason="Debian's kamailio package is not installed")
def test_outside_calls_are_incoming_and_outgoing_rows(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                                      provider: Kamailio) -> None:
    trunk = ("[[trunks]]\nname = \"provider\"\n"
             f'server = "{provider.server}"\nusername = "{DID}"\npassword = "{PASSWORD}"\n'
             f'incoming = {{ "{DID}" = "200" }}\n\n')
    pbx, _, family, control = house(pbx_factory, handset_factory, extra=trunk)
    pbx.wait_log(r"event=trunk_registered trunk=provider")
    outside = handset_factory("outside", trace=True, codecs=["PCMA/8000"])
    reg = outside.register(f"sip:{provider.server}", OUTSIDE, OUTSIDE_PASSWORD, domain=provider.server)
    assert reg["code"] == 200, reg
    talk(outside, family, f"sip:{DID}@{provider.server}", seconds=0.5)
    talk(family, outside, f"sip:0{OUTSIDE}@home.arpa", seconds=0.5)  # out through the provider
    incoming, outgoing = history(control, 2)
    assert (incoming["direction"], incoming["caller"], incoming["callee"], incoming["trunk"],
            incoming["outcome"], incoming["answered_number"]) == ("incoming", OUTSIDE, "200", "provider", "answered",
                                                                  "200")
    assert (outgoing["direction"], outgoing["caller"], outgoing["caller_name"], outgoing["callee"],
            outgoing["trunk"], outgoing["outcome"]) == ("outgoing", "200", "Family", OUTSIDE, "provider", "answered")
    assert outgoing["duration"] > 0.3


def test_a_call_to_the_answering_machine_is_a_voicemail_row(pbx_factory: DaemonFactory,
                                                            handset_factory: HandsetFactory) -> None:
    """400 has its answering machine on and no handset: the call is answered by it at once
    (unreachable), and its row says so."""
    pbx, kitchen, _family, control = house(pbx_factory, handset_factory,
                                          extra=user_block("400", name="Study", voicemail=True))
    call = kitchen.call("sip:400@home.arpa")
    kitchen.wait_state(call, "CONFIRMED", timeout=10)
    pbx.wait_log(r"event=call_to_voicemail .*number=400")
    time.sleep(0.5)
    kitchen.hangup(call)
    kitchen.wait_state(call, "DISCONNECTED")
    [row] = history(control, 1)
    assert (row["caller"], row["callee"], row["direction"], row["outcome"]) == ("100", "400", "internal",
                                                                                "voicemail")


def test_an_unreadable_database_leaves_the_calls_working(pbx_factory: DaemonFactory,
                                                         handset_factory: HandsetFactory, tmp_path: Path) -> None:
    """A history file that is no database (a bad disk, a stray copy): logged once, calls go on."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "history.sqlite3").write_bytes(b"this is not an SQLite database" * 100)
    pbx, kitchen, family, control = house(pbx_factory, handset_factory)
    pbx.wait_log(r"event=history_unavailable .*action=running_without_history")
    pbx.allow_errors(r"event=history_unavailable")
    talk(kitchen, family, seconds=0.2)
    reply = control.command("history", limit=5)
    assert (reply["reply"], reply["field"]) == ("error", "history")
