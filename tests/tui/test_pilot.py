"""The TUI against the real daemon on loopback, with real pjsua2 handsets (Textual pilot)."""

from __future__ import annotations

import asyncio
import socket
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.simulator.handset import Handset
from tests.support.pbx import user_block
from tests.tui.conftest import PbxFactory, screen_text, wait_screen
from tui.app import HomePbxApp
from tui.screens.password_dialog import PasswordDialog
from tui.screens.setup_dialog import SetupDialog
from tui.screens.value_dialog import ValueDialog

pytestmark = [pytest.mark.e2e, pytest.mark.tui, pytest.mark.timeout(90)]

HandsetFactory = Callable[..., Handset]
PUSHED = 0.5  # s: an event on screen this fast came by push (the control socket), not a poll

FAMILY = user_block("200", name="Family", one_number=True, max_devices=3).replace(
    "max_devices = 3", "max_devices = 3  # three handsets in the house")
GRANDPA = user_block("100", name="Grandpa")


def devices_area(text: str) -> str:
    """The right-hand panel's column of the screen (the devices of the selected number)."""
    return "\n".join(line[36:] for line in text.splitlines()[1:15])


async def latencies(app: HomePbxApp, kind: str) -> list[float]:
    """Event-to-screen latencies of events of this kind (recorded just after the redraw)."""
    for _ in range(100):
        found = [latency for kinds, latency in app.latencies if kind in kinds]
        if found:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {kind} redraw recorded: {app.latencies}")


def test_a_device_registers_and_appears(pbx_factory: PbxFactory, handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([FAMILY])
    phone = handset_factory("lr", user_agent="Living room")

    async def scenario() -> None:
        app = HomePbxApp(pbx.socket)
        async with app.run_test(size=(80, 24)):
            text = await wait_screen(app, lambda t: "no device registered" in t, what="an empty number")
            assert "200   Family    ON   0/3" in text
            state = await asyncio.to_thread(phone.register, pbx.registrar, "200", "secret")
            assert state["code"] == 200
            text = await wait_screen(app, lambda t: "Living room" in t and "expires in" in t, what="the new device")
            devices = devices_area(text)
            assert f"udp 127.0.0.1:{phone.port}" in devices
            assert "○ idle · reachable" in devices
            assert "expires in" in devices
            assert "200   Family    ON   1/3" in text
            assert "1 device" in text.splitlines()[0]

    asyncio.run(scenario())


def test_a_call_rings_the_device_then_it_talks(pbx_factory: PbxFactory, handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([FAMILY, GRANDPA])
    callee = handset_factory("kitchen", user_agent="Kitchen")
    caller = handset_factory("grandpa", user_agent="Grandpa phone")
    assert callee.register(pbx.registrar, "200", "secret")["code"] == 200
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
    callee.auto_answer("ring")

    async def scenario() -> None:
        app = HomePbxApp(pbx.socket)
        async with app.run_test(size=(80, 24)):
            await wait_screen(app, lambda t: "Kitchen" in t and "idle" in t, what="the idle callee")
            call = await asyncio.to_thread(caller.call, "sip:200@home.arpa")
            text = await wait_screen(app, lambda t: "◉ ringing" in devices_area(t), what="ringing")
            assert "◉ ringing · 100 Grandpa · 00:0" in devices_area(text)
            assert "ringing: Kitchen" in text  # the calls panel
            ringing = await latencies(app, "device_ringing")
            # The redraw follows the event itself. The 100 ms figure (issue 5) is measured by
            # bench/tui.py over many calls; one sample on a loaded 2-core CI box is not a
            # measurement (112 ms was seen there once), so this only bounds it loosely.
            assert ringing[0] <= PUSHED, f"ringing took {ringing[0] * 1000:.0f} ms to reach the screen"

            incoming = await asyncio.to_thread(callee.wait_incoming)
            callee.answer(str(incoming["call"]))
            text = await wait_screen(app, lambda t: "● talking with 100 Grandpa" in t, what="talking")
            assert "answered by Kitchen" in text
            answered = await latencies(app, "call_answered")
            assert answered[0] <= PUSHED

            caller.hangup(call)
            text = await wait_screen(app, lambda t: "no calls" in t and "○ idle" in t, what="the call ended")
            assert "0 calls" in text.splitlines()[0]
            print(f"\nevent-to-screen: ringing {ringing[0] * 1000:.1f} ms, answered {answered[0] * 1000:.1f} ms,"
                  f" median of all {statistics.median(lat for _, lat in app.latencies) * 1000:.1f} ms")

    asyncio.run(scenario())


def test_toggles_change_the_file_and_the_daemon(pbx_factory: PbxFactory, handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([FAMILY])
    phones = [handset_factory(f"p{i}", user_agent=f"Phone {i}") for i in range(4)]
    for phone in phones[:3]:
        assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
    assert phones[3].register(pbx.registrar, "200", "secret")["code"] == 403  # 3 of 3

    async def scenario() -> None:
        app = HomePbxApp(pbx.socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_screen(app, lambda t: "ON   3/3" in t, what="3 of 3 devices")
            await pilot.press("d")
            await pilot.pause()
            assert isinstance(app.screen, ValueDialog)
            await pilot.press("backspace", "4", "enter")
            text = await wait_screen(app, lambda t: "✓ 200 max devices 4 (saved to config.toml)" in t)
            assert "ON   3/4" in text
            config = pbx.config.read_text()
            assert "max_devices = 4  # three handsets in the house" in config
            assert config.startswith("# test config\n")

            state = await asyncio.to_thread(phones[3].register, pbx.registrar, "200", "secret")
            assert state["code"] == 200  # the fourth handset is now accepted, without a restart
            await wait_screen(app, lambda t: "ON   4/4" in t, what="4 of 4 devices")

            # A value the daemon refuses: shown with the field and why, nothing written.
            await pilot.press("d")
            await pilot.pause()
            await pilot.press("backspace", "1", "1", "enter")
            await wait_screen(app, lambda t: "✗ 200 max devices 11 refused: max_devices: must be between 1 and 10" in t)
            assert pbx.config.read_text() == config

            await pilot.press("o")  # one-number off: one handset allowed, the others leave
            text = await wait_screen(app, lambda t: "✓ 200 one-number off" in t and "off  1/1" in t)
            assert "one_number = false" in pbx.config.read_text()
            refused = await asyncio.to_thread(phones[1].register, pbx.registrar, "200", "secret")
            assert refused["code"] == 200  # with one-number off a new handset replaces the old
            await wait_screen(app, lambda t: "off  1/1" in t and "Phone 1" in devices_area(t))

    asyncio.run(scenario())


def test_password_reveal_and_limit_dialog(pbx_factory: PbxFactory) -> None:
    pbx = pbx_factory([FAMILY])

    async def scenario() -> None:
        app = HomePbxApp(pbx.socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_screen(app, lambda t: "Family" in t)
            assert "secret" not in screen_text(app)
            await pilot.press("p")
            text = await wait_screen(app, lambda t: "Password of 200 Family" in t)
            assert isinstance(app.screen, PasswordDialog)
            assert "secret" in text
            await pilot.press("space")
            await wait_screen(app, lambda t: "secret" not in t, what="the password gone")
            await pilot.press("l")
            await pilot.pause()
            assert isinstance(app.screen, ValueDialog)
            await pilot.press("escape")  # cancelled: nothing sent
            await pilot.pause()
            assert not isinstance(app.screen, ValueDialog)
            await pilot.press("l")
            await pilot.pause()
            await pilot.press("2", "enter")  # the field's "0" is selected: typing replaces it
            await wait_screen(app, lambda t: "✓ 200 outgoing limit 2" in t)
            assert "max_outgoing_calls = 2" in pbx.config.read_text()
            await wait_screen(app, lambda t: "0/2" in t)

    asyncio.run(scenario())


def test_set_up_a_handset_shows_what_to_type(pbx_factory: PbxFactory) -> None:
    """`s`: server, port and user name of the selected number; its `p` reveals the password
    through the usual show_password command, over the dialog; Escape closes it."""
    pbx = pbx_factory([GRANDPA, FAMILY])

    async def scenario() -> None:
        app = HomePbxApp(pbx.socket)
        async with app.run_test(size=(80, 24)) as pilot:
            text = await wait_screen(app, lambda t: "200   Family" in t)
            assert f"127.0.0.1:{pbx.port}" in text.splitlines()[0]  # the status bar
            await pilot.press("down", "s")
            text = await wait_screen(app, lambda t: "Set up a handset for 200 Family" in t)
            assert isinstance(app.screen, SetupDialog)
            assert "SIP server         127.0.0.1" in text
            assert f"Port               {pbx.port}" in text
            assert "User name          200" in text and "Auth name          200" in text
            assert 'digest_algorithms = ["MD5"]' in text
            assert "secret" not in text
            await pilot.press("p")
            text = await wait_screen(app, lambda t: "Password of 200 Family" in t)
            assert "secret" in text
            await pilot.press("space")  # the password goes, the set-up stays
            text = await wait_screen(app, lambda t: "secret" not in t, what="the password gone")
            assert isinstance(app.screen, SetupDialog) and "SIP server" in text
            await pilot.press("o")  # the main screen's keys do nothing under the dialog
            await pilot.press("escape")
            text = await wait_screen(app, lambda t: "SIP server" not in t, what="the dialog closed")
            assert "200   Family    ON" in text
            assert "one_number = true" in pbx.config.read_text()

    asyncio.run(scenario())


def test_daemon_not_running_then_started_then_gone(pbx_factory: PbxFactory) -> None:
    pbx = pbx_factory([FAMILY], run=False)

    async def scenario() -> None:
        app = HomePbxApp(pbx.socket, retry_interval=0.2)
        async with app.run_test(size=(80, 24)) as pilot:
            text = await wait_screen(app, lambda t: "No such socket: " in t)
            assert "daemon not running" in text and "Retrying every 0.2 s" in text
            await asyncio.to_thread(pbx.start)
            text = await wait_screen(app, lambda t: "200   Family" in t and "daemon not running" not in t)
            assert "up 0m" in text.splitlines()[0]
            await asyncio.to_thread(pbx.stop)
            text = await wait_screen(app, lambda t: "daemon not running" in t)
            assert "Traceback" not in text
            assert "200   Family" in text  # the last known state stays on screen
            await pilot.press("o")
            await wait_screen(app, lambda t: "not connected to the daemon" in t)
            assert app.is_running

    asyncio.run(scenario())


def test_garbage_on_the_socket_is_reported_not_crashed(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"

    async def scenario() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b'{"event": "snapshot", "numbers": [{"number": 5}]}\n')
            await writer.drain()
            await reader.read()

        server = await asyncio.start_unix_server(serve, path=str(path))
        try:
            app = HomePbxApp(path, retry_interval=0.2)
            async with app.run_test(size=(80, 24)):
                text = await wait_screen(app, lambda t: "Unexpected data from the daemon" in t)
                assert "Traceback" not in text
                assert app.is_running
        finally:
            server.close()

    asyncio.run(scenario())


def test_refused_socket_permission_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "closed.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))  # bound, not listening: connection refused

    async def scenario() -> None:
        app = HomePbxApp(path, retry_interval=0.2)
        async with app.run_test(size=(80, 24)):
            await wait_screen(app, lambda t: "Nothing is listening there" in t)

    try:
        asyncio.run(scenario())
    finally:
        sock.close()
