"""SVG snapshots of the main screens (pytest-textual-snapshot): 80x24, larger, 16 colours.

Update after an intended change of the look with `pytest tests/tui/test_snapshots.py
--snapshot-update`, and look at the SVGs in __snapshots__/ before committing them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from appliance.state import LiveState
from tests.tui import fixtures
from tui.app import HomePbxApp
from tui.messages import CommandDone, Disconnected
from tui.screens.messages_screen import MessagesScreen

pytestmark = [pytest.mark.tui, pytest.mark.timeout(60)]

SnapCompare = Callable[..., bool]


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """"since 10:42" is local time: pin the zone so snapshots match everywhere."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def make_app(theme_name: str = "textual-dark") -> HomePbxApp:
    return HomePbxApp(Path("/run/homepbx/control.sock"), connect=False, clock=fixtures.fixed_clock,
                      theme_name=theme_name)


def with_house(*scenes: Callable[[LiveState], None], then: Callable[[Pilot[None]], Any] | None = None
               ) -> Callable[[Pilot[None]], Any]:
    """run_before: feed the app the snapshot of a house in the given state."""
    async def run_before(pilot: Pilot[None]) -> None:
        _, _, state = fixtures.house()
        for scene in scenes:
            scene(state)
        app = pilot.app
        assert isinstance(app, HomePbxApp)
        app.feed(fixtures.snapshot(state))
        await pilot.pause()
        if then is not None:
            await then(pilot)
            await pilot.pause()

    return run_before


def test_idle_house_80x24(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), run_before=with_house())


def test_ringing_80x24(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), run_before=with_house(fixtures.ringing))


def test_conference_80x24(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), run_before=with_house(fixtures.in_conference))


def test_conference_120x36(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(120, 36), run_before=with_house(fixtures.in_conference))


def test_sixteen_colours(snap_compare: SnapCompare) -> None:
    """The theme a 16-colour terminal gets: the terminal's own ANSI colours."""
    assert snap_compare(make_app(theme_name="ansi-dark"), run_before=with_house(fixtures.in_conference))


def test_other_number_selected(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), press=["down"], run_before=with_house(fixtures.in_conference))


def test_daemon_not_running(snap_compare: SnapCompare) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        pilot.app.post_message(Disconnected("/run/homepbx/control.sock", "no such socket", 2.0))
        await pilot.pause()

    assert snap_compare(make_app(), run_before=run_before)


def test_limit_dialog(snap_compare: SnapCompare) -> None:
    async def press(pilot: Pilot[None]) -> None:
        await pilot.press("d")

    assert snap_compare(make_app(), run_before=with_house(then=press))


def test_password_dialog(snap_compare: SnapCompare) -> None:
    async def reveal(pilot: Pilot[None]) -> None:
        pilot.app.post_message(CommandDone("show_password", True, "", {"number": "200", "password": "Jx3-demo"}))

    assert snap_compare(make_app(), run_before=with_house(then=reveal))


def test_setup_dialog(snap_compare: SnapCompare) -> None:
    """`s` on 200: what to type into a handset, the box's address (not 0.0.0.0) first."""
    async def press(pilot: Pilot[None]) -> None:
        await pilot.press("s")

    assert snap_compare(make_app(), run_before=with_house(then=press))


def test_refused_command(snap_compare: SnapCompare) -> None:
    async def refuse(pilot: Pilot[None]) -> None:
        pilot.app.post_message(CommandDone(
            "set_user", False, "200 max devices 11 refused: max_devices: must be between 1 and 10, not 11"))

    assert snap_compare(make_app(), run_before=with_house(then=refuse))


def test_blocked_addresses(snap_compare: SnapCompare) -> None:
    """A line above the keys names the addresses ignored after failed logins, while they are."""
    async def block(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, HomePbxApp)
        now = fixtures.fixed_clock()
        for i, seconds in enumerate((60, 120, 240, 3600, 3600)):
            app.feed({"event": "address_blocked", "address": f"203.0.113.{i + 7}", "until": now + seconds,
                      "reason": "auth_failures"})

    assert snap_compare(make_app(), run_before=with_house(then=block))


def test_messages_view(snap_compare: SnapCompare) -> None:
    """`m` on 200: its voice messages, newest first, new ones marked."""
    now = fixtures.fixed_clock()
    reply = {"number": "200", "new": 2, "old": 1, "messages": [
        {"id": "20240611-104000-aaaaaa", "caller": "100", "name": "Grandpa", "received": now - 120, "seconds": 12.4,
         "heard": False},
        {"id": "20240611-090000-bbbbbb", "caller": "4930999999", "name": "", "received": now - 6000, "seconds": 75,
         "heard": False},
        {"id": "20240609-180000-cccccc", "caller": "4930555555", "name": "", "received": now - 2 * 86400,
         "seconds": 8, "heard": True},
    ]}

    async def open_view(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, HomePbxApp)
        await pilot.press("m")  # not connected: the view says so, then gets the list below
        await pilot.pause()
        assert isinstance(app.screen, MessagesScreen)
        app.screen.show(reply)

    assert snap_compare(make_app(), run_before=with_house(then=open_view))


def test_delete_message_asks_first(snap_compare: SnapCompare) -> None:
    async def open_and_delete(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, HomePbxApp)
        await pilot.press("m")
        await pilot.pause()
        assert isinstance(app.screen, MessagesScreen)
        app.screen.show({"number": "200", "messages": [
            {"id": "20240611-104000-aaaaaa", "caller": "100", "name": "Grandpa",
             "received": fixtures.fixed_clock() - 120, "seconds": 12.4, "heard": False}]})
        await pilot.pause()
        await pilot.press("d")

    assert snap_compare(make_app(), run_before=with_house(then=open_and_delete))
def test_history_view(snap_compare: SnapCompare) -> None:
    """`h`: the calls recorded, missed ones first and in red."""
    now = fixtures.fixed_clock()

    def row(n: int, outcome: str, ago: float, **extra: object) -> dict[str, object]:
        return {"id": n, "call_id": f"c{n}", "started": now - ago, "ended": now - ago + 30, "caller": "100",
                "caller_name": "Grandpa", "callee": "200", "callee_name": "Family", "direction": "internal",
                "outcome": outcome, "answered": None, "answered_by": "", "answered_number": "", "duration": 0.0,
                "forwarded_to": "", "condition": "", "trunk": "", "reason": "", **extra}

    rows = [
        row(6, "answered", 300, caller="+4930123456", caller_name="Dr Weber", direction="incoming", trunk="line",
            answered=now - 295, answered_by="Kitchen", answered_number="200", duration=134.0),
        row(5, "missed", 900, caller="+4930123456", caller_name="", direction="incoming", trunk="line"),
        row(4, "forwarded", 3600, callee="300", callee_name="Office", forwarded_to="200", condition="busy",
            answered=now - 3590, answered_by="Living room", answered_number="200", duration=61.0),
        row(3, "busy", 7200, caller="300", caller_name="Office"),
        row(2, "declined", 86400 * 2),
        row(1, "missed", 86400 * 3, caller="300", caller_name="Office"),
    ]

    async def fetch(missed_only: bool) -> list[dict[str, object]]:
        return [r for r in rows if r["outcome"] == "missed" or not missed_only]

    async def press(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, HomePbxApp)
        app.fetch_history = fetch  # type: ignore[method-assign]
        await pilot.press("h")
        await pilot.pause()
        await pilot.pause()

    assert snap_compare(make_app(), run_before=with_house(then=press))
