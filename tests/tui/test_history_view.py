"""The History view (key h): against the real daemon with pjsua2 handsets (Textual pilot),
and its lines from rows (missed calls first)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.simulator.handset import Handset
from tests.support.pbx import user_block
from tests.tui.conftest import PbxFactory, screen_text, wait_screen
from tui.app import HomePbxApp
from tui.history import history_lines
from tui.screens.history_view import HistoryView

HandsetFactory = Callable[..., Handset]
NOW = 1_795_000_000.0


def row(n: int, outcome: str, started: float, **extra: object) -> dict[str, object]:
    return {"id": n, "call_id": f"c{n}", "started": started, "ended": started + 30, "caller": "100",
            "caller_name": "Grandpa", "callee": "200", "callee_name": "Family", "direction": "internal",
            "outcome": outcome, "answered": started + 3 if outcome == "answered" else None,
            "answered_by": "Kitchen" if outcome == "answered" else "", "answered_number": "200",
            "duration": 27.0 if outcome == "answered" else 0.0, "forwarded_to": "", "condition": "", "trunk": "",
            "reason": "", **extra}


def test_missed_calls_come_first_then_the_newest() -> None:
    rows = [row(3, "answered", NOW - 60), row(2, "missed", NOW - 120), row(1, "busy", NOW - 180),
            row(4, "missed", NOW - 30), row(5, "forwarded", NOW - 10, forwarded_to="300", condition="no_answer")]
    lines = history_lines(rows, NOW)
    assert [line.id for line in lines] == [4, 2, 5, 3, 1]
    assert [line.missed for line in lines] == [True, True, False, False, False]
    answered = lines[3]
    assert (answered.who, answered.to, answered.outcome, answered.answered_by, answered.duration) == (
        "· 100 Grandpa", "200 Family", "answered", "Kitchen", "00:27")
    assert lines[2].outcome == "→ 300 no ans"
    assert (lines[0].outcome, lines[0].answered_by, lines[0].duration) == ("MISSED", "-", "-")


@pytest.mark.e2e
@pytest.mark.tui
@pytest.mark.timeout(90)
def test_history_view_shows_committed_calls(pbx_factory: PbxFactory, handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([user_block("200", name="Family", ring_timeout=5), user_block("100", name="Grandpa")])
    callee = handset_factory("kitchen", user_agent="Kitchen")
    caller = handset_factory("grandpa", user_agent="Grandpa phone")
    assert callee.register(pbx.registrar, "200", "secret")["code"] == 200
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200

    async def scenario() -> None:
        app = HomePbxApp(pbx.socket)
        async with app.run_test(size=(100, 24)) as pilot:
            await wait_screen(app, lambda t: "Kitchen" in t, what="the callee")
            await pilot.press("h")
            await pilot.pause()
            assert isinstance(app.screen, HistoryView)
            await wait_screen(app, lambda t: "no calls recorded yet" in t, what="an empty history")
            # One declined, then one answered: the view follows the daemon's history_changed.
            call = await asyncio.to_thread(caller.call, "sip:200@home.arpa")
            incoming = str((await asyncio.to_thread(callee.wait_incoming))["call"])
            await asyncio.to_thread(callee.wait_state, incoming, "EARLY")
            callee.answer(incoming, 603)
            await asyncio.to_thread(caller.wait_state, call, "DISCONNECTED")
            await wait_screen(app, lambda t: "declined" in t, what="the declined call")
            call = await asyncio.to_thread(caller.call, "sip:200@home.arpa")
            incoming = str((await asyncio.to_thread(callee.wait_incoming))["call"])
            callee.answer(incoming, 200)
            await asyncio.to_thread(caller.wait_state, call, "CONFIRMED")
            await asyncio.sleep(1.2)
            caller.hangup(call)
            text = await wait_screen(app, lambda t: "answered" in t, what="the answered call")
            line = next(t for t in text.splitlines() if "answered" in t)
            assert "100 Grandpa" in line and "200 Family" in line and "Kitchen" in line and "00:01" in line
            assert "History: 2 calls" in text
            await pilot.press("m")  # missed only: none
            await wait_screen(app, lambda t: "History: 0 missed calls" in t, what="missed only")
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, HistoryView)
            assert "Calls" in screen_text(app)

    asyncio.run(scenario())


def test_main_screen_keys_do_nothing_in_the_history_view() -> None:
    """`o`, `d`, `p` act on the selected number of the main screen: not from the History view."""
    async def scenario() -> None:
        app = HomePbxApp(Path("/nonexistent/control.sock"), connect=False)

        async def fetch(missed_only: bool) -> list[dict[str, object]]:
            return [row(1, "missed", NOW)]

        app.fetch_history = fetch  # type: ignore[method-assign]
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("h")
            await pilot.pause()
            await pilot.press("o", "d", "p", "n")
            await pilot.pause()
            assert isinstance(app.screen, HistoryView)
            text = await wait_screen(app, lambda t: "MISSED" in t, what="the missed call")
            assert "One-number" not in text and "q Quit" in text
            await pilot.press("h")  # h again: back
            await pilot.pause()
            assert not isinstance(app.screen, HistoryView)

    asyncio.run(scenario())
