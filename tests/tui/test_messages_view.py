"""The TUI's Messages view (`m`) against the real daemon (Textual pilot): the list of a
number's voice messages, `h` marks one heard, `d` deletes after a yes, a message that
comes in while the view is open shows up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from appliance.voicemail.mailbox import Mailbox
from tests.support.pbx import user_block
from tests.tui.conftest import PbxFactory, wait_screen
from tui.app import HomePbxApp
from tui.screens.confirm_dialog import ConfirmDialog
from tui.screens.messages_screen import MessagesScreen

pytestmark = [pytest.mark.e2e, pytest.mark.tui, pytest.mark.timeout(90)]


def leave(root: Path, caller: str, seconds: float, received: float) -> str:
    box = Mailbox(root)
    recording = box.recording_path("200")
    recording.write_bytes(b"RIFF")
    return box.add("200", recording, caller, "", seconds, received).id


def test_messages_view_lists_marks_heard_and_deletes(pbx_factory: PbxFactory) -> None:
    pbx = pbx_factory([user_block("100", name="Grandpa"), user_block("200", name="Family", one_number=True)])
    root = pbx.config.parent / "state" / "voicemail"
    box = Mailbox(root)
    older = leave(root, "4930999999", 75, time.time() - 3600)
    box.mark_heard("200", older)
    leave(root, "100", 12, time.time() - 60)

    async def scenario() -> None:
        app = HomePbxApp(pbx.socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_screen(app, lambda t: "Family" in t, what="the numbers")
            await pilot.press("m")
            await pilot.pause()
            assert isinstance(app.screen, MessagesScreen)
            text = await wait_screen(app, lambda t: "1 new, 1 heard" in t and "4930999999" in t, what="the list")
            assert "Messages of 200" in text and "4930999999" in text and "01:15" in text
            assert text.index("100") < text.index("4930999999")  # newest first

            await pilot.press("h")  # the new one, from 100
            await wait_screen(app, lambda t: "0 new, 2 heard" in t, what="marked heard")
            assert Mailbox(root).counts("200") == (0, 2)

            await pilot.press("d")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmDialog)
            await pilot.press("n")  # kept
            await pilot.pause()
            assert isinstance(app.screen, MessagesScreen) and len(Mailbox(root).messages("200")) == 2

            await pilot.press("down", "d")
            await pilot.pause()
            await pilot.press("y")
            text = await wait_screen(app, lambda t: "0 new, 1 heard" in t, what="deleted")
            assert "✓ 200 message from 4930999999 deleted" in text
            assert isinstance(app.screen, MessagesScreen)
            assert [m.caller for m in app.screen.messages] == ["100"]
            assert [m.caller for m in Mailbox(root).messages("200")] == ["100"]

            leave(root, "4930111111", 5, time.time())  # comes in while the view is open
            await wait_screen(app, lambda t: "1 new, 1 heard" in t and "4930111111" in t, timeout=8,
                              what="the new message")

            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, MessagesScreen)

    asyncio.run(scenario())
    pbx.assert_clean_log()
