"""Every call state on screen: the daemon's real LiveState and ControlServer in-process, the
events they emit reaching the TUI over the real socket (only SIP is left out, so joins and
conferences show even before the daemon routes *74)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from textual.pilot import Pilot

from appliance.config import load_config
from appliance.control import ControlServer
from appliance.daemon import Daemon
from tests.support.control import control_block
from tests.support.pbx import write_config
from tests.support.ports import free_port
from tests.tui.conftest import wait_screen
from tests.tui.fixtures import DEVICES, _binding
from tui.app import HomePbxApp

pytestmark = [pytest.mark.tui, pytest.mark.timeout(60)]

USERS = [
    '[[users]]\nnumber = "100"\nname = "Grandpa"\npassword = "x"\n',
    '[[users]]\nnumber = "200"\nname = "Family"\npassword = "y"\none_number = true\nmax_devices = 3\n',
]


def house(tmp_path: Path) -> tuple[Daemon, Path]:
    """The daemon's state and control parts (no SIP), its devices registered a minute ago."""
    config_path = write_config(tmp_path, free_port(), USERS, extra=control_block())
    edge = Daemon(load_config(config_path), config_path)
    now = time.time()
    edge.registrar.load([{**_binding(*d), "expires_at": now + 300, "registered_at": now - 60} for d in DEVICES],
                        now)
    return edge, config_path


@contextlib.asynccontextmanager
async def watching(edge: Daemon, config_path: Path, tmp_path: Path) -> AsyncIterator[tuple[HomePbxApp, Pilot[None]]]:
    """The TUI on the daemon's real control socket, showing the idle house."""
    server = ControlServer(edge.state, edge.settings, edge, config_path)
    await server.start()
    try:
        app = HomePbxApp(tmp_path / "ctl.sock")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_screen(app, lambda t: "Living room" in t and "no calls" in t)
            yield app, pilot
    finally:
        await server.stop()



def test_ringing_answered_joined_left_ended(tmp_path: Path) -> None:
    edge, config_path = house(tmp_path)
    state = edge.state

    async def scenario() -> None:
        async with watching(edge, config_path, tmp_path) as (app, pilot):
            state.call_started("c1", "100", "200", "d4")
            for device in ("d1", "d2", "d3"):
                state.device_ringing("c1", device)
            text = await wait_screen(app, lambda t: t.count("◉ ringing · 100 Grandpa · 00:0") == 3)
            assert "100 Grandpa → 200 Family · ringing: Living room, Kitchen, Bathroom" in text
            assert "1/∞" in text  # Grandpa's outgoing call counts

            state.call_answered("c1", "d1")
            text = await wait_screen(app, lambda t: "● talking with 100 Grandpa" in t)
            assert "answered by Living room" in text
            assert "○ idle · reachable" in text  # Kitchen stopped ringing
            assert "○ idle · ✗ unreachable" in text  # Bathroom, which stopped answering pings

            state.call_joined("c1", "d2")
            text = await wait_screen(app, lambda t: t.count("◍ in conference · 100 Grandpa · 00:0") == 2)
            assert "answered by Living room · Kitchen joined" in text

            state.call_left("c1", "d2")
            await wait_screen(app, lambda t: "● talking with 100" in t and "in conference" not in t)

            await pilot.press("up")  # select 100: Grandpa's phone is the caller, talking with 200
            await wait_screen(app, lambda t: "● talking with 200 Family" in t)

            state.call_ended("c1", "caller_hung_up")
            text = await wait_screen(app, lambda t: "no calls" in t and "○ idle" in t)
            assert "0/∞" in text

    asyncio.run(scenario())


def test_trunk_calls_show_the_outside_number(tmp_path: Path) -> None:
    """A call from the provider shows who calls from outside; a call out, the number called."""
    edge, config_path = house(tmp_path)
    state = edge.state

    async def scenario() -> None:
        async with watching(edge, config_path, tmp_path) as (app, _):
            # The router tells the live state an outside call as caller = the outside number, no device.
            state.call_started("in1", "4930999999", "200", None)
            for device in ("d1", "d2"):
                state.device_ringing("in1", device)
            text = await wait_screen(app, lambda t: t.count("◉ ringing · 4930999999 · 00:0") == 2)
            assert "4930999999 → 200 Family · ringing: Living room, Kitchen" in text
            state.call_answered("in1", "d1")
            text = await wait_screen(app, lambda t: "● talking with 4930999999" in t)
            assert "4930999999 → 200 Family · answered by Living room" in text
            state.call_ended("in1", "bye_from_caller")
            await wait_screen(app, lambda t: "no calls" in t)

            # A call out: the caller's device, the number it called (prefix stripped) as callee.
            state.call_started("out1", "100", "4930888888", "d4")
            text = await wait_screen(app, lambda t: "100 Grandpa → 4930888888" in t)
            state.call_answered("out1", None)
            text = await wait_screen(app, lambda t: "100 Grandpa → 4930888888 · answered by the callee" in t)
            assert "1/∞" in text  # it counts as Grandpa's outgoing call
            state.call_ended("out1", "bye_from_caller")
            await wait_screen(app, lambda t: "no calls" in t)

    asyncio.run(scenario())
