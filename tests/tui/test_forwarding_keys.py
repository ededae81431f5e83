"""The TUI's forwarding (`f`) and do-not-disturb (`n`) keys against the real daemon and a
real handset (Textual pilot): the dialogs, config.toml, the marks on screen."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from appliance.config import load_config
from appliance.simulator.handset import Handset
from tests.support.pbx import user_block
from tests.tui.conftest import PbxFactory, wait_screen
from tui.app import HomePbxApp
from tui.screens.dnd_dialog import DndDialog
from tui.screens.forward_dialog import ForwardDialog

pytestmark = [pytest.mark.e2e, pytest.mark.tui, pytest.mark.timeout(90)]

HandsetFactory = Callable[..., Handset]


def test_forwarding_and_dnd_keys(pbx_factory: PbxFactory, handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([user_block("200", name="Family", one_number=True), user_block("300", name="Office")])
    phone = handset_factory("kitchen", user_agent="Kitchen")
    assert phone.register(pbx.registrar, "200", "secret")["code"] == 200

    def user(number: str) -> object:
        found = load_config(pbx.config).user(number)
        assert found is not None
        return found

    async def scenario() -> None:
        app = HomePbxApp(pbx.socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_screen(app, lambda t: "Kitchen" in t, what="the handset")
            await pilot.press("f")
            await pilot.pause()
            assert isinstance(app.screen, ForwardDialog)
            await pilot.press("tab", "3", "0", "0", "enter")  # Busy / DND -> 300
            text = await wait_screen(app, lambda t: "✓ 200 forward busy 300 (saved to config.toml)" in t)
            assert "200↪" in text and "↪ busy → 300" in text
            assert user("200").forward_busy == "300"  # type: ignore[attr-defined]

            await pilot.press("f")
            await pilot.pause()
            await pilot.press("2", "0", "0", "enter")  # always to itself: refused by the daemon
            await wait_screen(app, lambda t: "refused: forward_always: '200': a number cannot" in t)
            assert user("200").forward_always == ""  # type: ignore[attr-defined]

            await pilot.press("n")
            await pilot.pause()
            assert isinstance(app.screen, DndDialog)
            await pilot.press("down", "enter")  # the Kitchen handset
            text = await wait_screen(app, lambda t: "✓ 200 Kitchen do not disturb on" in t and "⊘ DND" in t)
            assert user("200").dnd_devices == (f"200@127.0.0.1:{phone.port}",)  # type: ignore[attr-defined]

            await pilot.press("n")
            await pilot.pause()
            await pilot.press("enter")  # the whole number
            text = await wait_screen(app, lambda t: "✓ 200 do not disturb on" in t and "200⊘" in t)
            assert "⊘ do not disturb" in text
            assert user("200").dnd is True  # type: ignore[attr-defined]

            await pilot.press("n")
            await pilot.pause()
            await pilot.press("escape")  # cancelled: nothing sent
            await pilot.pause()
            assert user("200").dnd is True  # type: ignore[attr-defined]

    asyncio.run(scenario())
