"""The homepbx terminal UI: numbers, their devices and the calls, live; a few keys steer.

A client of the daemon's control socket and nothing else. One worker keeps the connection
(and retries while the daemon is down); events update the model, and bursts of them
coalesce into one redraw.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.widgets import DataTable, Footer

from tui.client import CommandFailed, ControlClient
from tui.messages import CommandDone, Connected, Disconnected, ModelChanged
from tui.model import Number, PbxModel, ProtocolError
from tui.screens.dnd_dialog import WHOLE_NUMBER, DndDialog
from tui.screens.forward_dialog import ForwardDialog
from tui.screens.history_view import HistoryView
from tui.screens.messages_screen import MessageAction, MessagesScreen
from tui.screens.password_dialog import PasswordDialog
from tui.screens.setup_dialog import SetupDialog
from tui.screens.value_dialog import ValueDialog
from tui.widgets.blocked_line import BlockedLine
from tui.widgets.calls_panel import CallsPanel
from tui.widgets.connection_banner import ConnectionBanner
from tui.widgets.devices_panel import DevicesPanel
from tui.widgets.numbers_table import NumbersTable
from tui.widgets.result_line import ResultLine
from tui.widgets.status_bar import StatusBar
from tui.widgets.trunk_lines import TrunkLines

RETRY_INTERVAL = 2.0
HISTORY_ROWS = 200
"""Calls the History view reads (the newest)."""
SIXTEEN_COLOUR = ("standard", "windows")


def abandoned_notice(event: dict[str, Any]) -> str:
    """What a family reads when a handset gave up on the SHA-256 login."""
    agent = str(event.get("user_agent") or "a handset")
    return (f"{event.get('number', '?')}: {agent} at {event.get('address', '?')} gave up on the SHA-256 login; "
            "it is offered MD5 from now on (if it still fails: digest_algorithms = [\"MD5\"])")


class HomePbxApp(App[None]):
    TITLE = "homepbx"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #main {
        height: 2fr;
        min-height: 8;
    }
    CallsPanel {
        min-height: 4;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "toggle_one_number", "1#"),
        Binding("d", "max_devices", "Devices"),
        Binding("l", "outgoing_limit", "Limit"),
        Binding("f", "forwarding", "Fwd"),
        Binding("n", "dnd", "DND"),
        Binding("m", "messages", "Msgs"),
        Binding("s", "setup", "Set up"),
        Binding("p", "password", "Password"),
        Binding("h", "history", "History"),
        Binding("r", "reload", "Reload", show=False),  # documented in the README; the footer has 80 columns
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self,
        socket_path: Path,
        *,
        daemon_log: Path | None = None,
        clock: Callable[[], float] = time.time,
        connect: bool = True,
        retry_interval: float = RETRY_INTERVAL,
        theme_name: str | None = None,
        trace_path: Path | None = None,
    ) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.daemon_log = daemon_log
        self.clock = clock
        self.connect = connect
        self.retry_interval = retry_interval
        self.theme_name = theme_name
        self.trace_path = trace_path
        self.model = PbxModel()
        self.client: ControlClient | None = None
        self.connected: bool | None = None if connect else True
        self.latencies: list[tuple[frozenset[str], float]] = []
        """(event kinds, seconds from the daemon's event to the redrawn screen)."""

    # -- layout ----------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        yield ConnectionBanner(id="banner")
        with Horizontal(id="main"):
            yield NumbersTable(id="numbers")
            yield DevicesPanel(id="devices")
        yield CallsPanel(id="calls")
        yield TrunkLines(id="trunks")
        yield BlockedLine(id="blocked")
        yield ResultLine(id="result")
        yield Footer(compact=True)  # every key fits in 80 columns

    def on_mount(self) -> None:
        if self.theme_name:
            self.theme = self.theme_name
        elif self.console.color_system in SIXTEEN_COLOUR or os.environ.get("NO_COLOR"):
            self.theme = "ansi-dark"  # the terminal's own 16 colours, never approximations
        self.redraw()
        self.set_interval(1.0, self.tick)
        if self.connect:
            self.stay_connected()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """In the History view only its own keys (and quit) work: the others act on the main screen."""
        return action == "quit" or not isinstance(self.screen, HistoryView)

    @property
    def selected(self) -> Number | None:
        number = self.query_one(NumbersTable).selected
        return self.model.numbers.get(number) if number is not None else None

    def redraw(self) -> None:
        now = self.clock()
        self.query_one(StatusBar).show(self.model, now, self.connected)
        numbers = self.query_one(NumbersTable)
        numbers.show(self.model)
        self.query_one(DevicesPanel).show(self.model, numbers.selected, now)
        self.query_one(CallsPanel).show(self.model, now)
        self.query_one(TrunkLines).show(self.model, now)
        self.query_one(BlockedLine).show(self.model, now)

    def tick(self) -> None:
        """Durations and expiry countdowns move every second; nothing is asked of the daemon."""
        if not self.model.loaded:
            return
        now = self.clock()
        try:
            self.query_one(StatusBar).show(self.model, now, self.connected)
            self.query_one(DevicesPanel).show(self.model, self.query_one(NumbersTable).selected, now)
            self.query_one(CallsPanel).show(self.model, now)
            self.query_one(TrunkLines).show(self.model, now)
            self.query_one(BlockedLine).show(self.model, now)
        except NoMatches:
            pass  # a second's timer can fire while the main screen is not there (seen under load): the next draws

    # -- the connection --------------------------------------------------------------------
    @work(exclusive=True, group="control", exit_on_error=False)
    async def stay_connected(self) -> None:
        while True:
            client = ControlClient(self.socket_path)
            try:
                await client.connect()
                self.feed(await client.read())
                self.client = client
                self.post_message(Connected(str(self.socket_path)))
                while True:
                    self.feed(await client.read())
            except FileNotFoundError:
                reason = "no such socket"
            except ConnectionRefusedError:
                reason = "nothing is listening there"
            except PermissionError:
                reason = "permission denied (is this user in the homepbx group?)"
            except TimeoutError:
                reason = "no answer"
            except ProtocolError as err:
                reason = f"unexpected data from the daemon ({err})"
            except (ConnectionError, OSError) as err:
                reason = str(err) or type(err).__name__
            except Exception as err:  # never a traceback on screen: report, reconnect
                reason = f"internal error: {type(err).__name__}: {err}"
            finally:
                self.client = None
                await client.close()
            self.post_message(Disconnected(str(self.socket_path), reason, self.retry_interval, self._log_hint()))
            await asyncio.sleep(self.retry_interval)

    def feed(self, message: dict[str, Any]) -> None:
        """Apply a snapshot or event from the daemon, and schedule a redraw."""
        kind = self.model.apply(message)
        if kind == "history_changed" and isinstance(self.screen, HistoryView):
            self.screen.reload()
        if kind == "auth_abandoned":
            self.query_one(ResultLine).show(False, abandoned_notice(message))
        elif kind == "messages_changed":
            view = self._messages_view(str(message.get("number", "")))
            if view is not None:
                self.load_messages(view.number)
        stamp = message.get("time")
        self.post_message(ModelChanged({kind}, float(stamp) if isinstance(stamp, int | float) else None))

    def _log_hint(self) -> str:
        """The daemon's last error, when `homepbx run --tui` told us where its log is."""
        if self.daemon_log is None:
            return ""
        try:
            with open(self.daemon_log, "rb") as log:
                log.seek(max(0, os.fstat(log.fileno()).st_size - 16384))
                lines = log.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        errors = [line for line in lines if " ERROR " in line or "event=listen_failed" in line]
        return errors[-1][-200:] if errors else str(self.daemon_log)

    def on_connected(self, message: Connected) -> None:
        self.connected = True
        self.query_one(ConnectionBanner).clear()
        self.redraw()

    def on_disconnected(self, message: Disconnected) -> None:
        self.connected = False
        self.query_one(ConnectionBanner).show_problem(message.path, message.reason, message.retry_in, message.hint)
        self.redraw()

    def on_model_changed(self, message: ModelChanged) -> None:
        self.redraw()
        if message.first_event_time is not None:
            self.call_after_refresh(self._record_latency, frozenset(message.kinds), message.first_event_time)

    def _record_latency(self, kinds: frozenset[str], event_time: float) -> None:
        latency = time.time() - event_time
        self.latencies.append((kinds, latency))
        if self.trace_path is not None:
            try:
                with open(self.trace_path, "a") as trace:
                    trace.write(f"{','.join(sorted(kinds))} {latency * 1000:.1f}\n")
            except OSError:
                self.trace_path = None

    @on(DataTable.RowHighlighted, "#numbers")
    def number_selected(self) -> None:
        self.query_one(DevicesPanel).show(self.model, self.query_one(NumbersTable).selected, self.clock())

    # -- commands --------------------------------------------------------------------------
    def _need_number(self) -> Number | None:
        number = self.selected
        if number is None:
            self.query_one(ResultLine).show(False, "select a number first")
        return number

    def action_toggle_one_number(self) -> None:
        if (n := self._need_number()) is not None:
            on_off = "off" if n.one_number else "on"
            self.run_command(f"{n.number} one-number {on_off}", "set_user",
                             number=n.number, changes={"one_number": not n.one_number})

    def action_max_devices(self) -> None:
        if (n := self._need_number()) is not None:
            self._ask_and_set(n, "max_devices", ValueDialog(
                f"{n.title}: devices", "Handsets allowed with one-number on (1-10):", n.max_devices),
                lambda value: f"max devices {value}")

    def action_outgoing_limit(self) -> None:
        if (n := self._need_number()) is not None:
            self._ask_and_set(n, "max_outgoing_calls", ValueDialog(
                f"{n.title}: outgoing calls", "Simultaneous outgoing calls (0 = unlimited):", n.max_outgoing_calls),
                lambda value: f"outgoing limit {value or 'unlimited'}")

    def _ask_and_set(self, n: Number, field: str, dialog: ValueDialog, describe: Callable[[int], str]) -> None:
        """Ask for a number in `dialog`; a value given sets `field` of that user (cancel: nothing)."""

        def chosen(value: int | None) -> None:
            if value is not None:
                self.run_command(f"{n.number} {describe(value)}", "set_user", number=n.number,
                                 changes={field: value})

        self.push_screen(dialog, chosen)

    def action_forwarding(self) -> None:
        if (n := self._need_number()) is not None:

            def chosen(changes: dict[str, Any] | None) -> None:
                if changes:
                    said = ", ".join(f"{k.replace('_', ' ')} {v if v != '' else 'off'}" for k, v in changes.items())
                    self.run_command(f"{n.number} {said}", "set_user", number=n.number, changes=changes)

            self.push_screen(ForwardDialog(n), chosen)

    def action_dnd(self) -> None:
        """Do not disturb for the number, or for one of its devices."""
        if (n := self._need_number()) is not None:

            def chosen(which: str | None) -> None:
                if which is None:
                    return
                if which == WHOLE_NUMBER:
                    self.run_command(f"{n.number} do not disturb {'off' if n.dnd else 'on'}", "set_user",
                                     number=n.number, changes={"dnd": not n.dnd})
                    return
                on = which not in n.dnd_devices
                devices = [*n.dnd_devices, which] if on else [d for d in n.dnd_devices if d != which]
                label = next((d.label for d in self.model.devices_of(n.number) if d.device_id == which), which)
                self.run_command(f"{n.number} {label} do not disturb {'on' if on else 'off'}", "set_user",
                                 number=n.number, changes={"dnd_devices": devices})

            self.push_screen(DndDialog(n, self.model.devices_of(n.number)), chosen)

    def action_setup(self) -> None:
        """What to type into a handset; its `p` comes back to action_password below."""
        if (n := self._need_number()) is not None:
            self.push_screen(SetupDialog(n.title, n.number, self.model.reachable_at))

    def action_password(self) -> None:
        if (n := self._need_number()) is not None:
            self.run_command(f"{n.number} password", "show_password", number=n.number)

    def action_messages(self) -> None:
        """The number's voice messages: who, when, how long, new or heard; delete."""
        if (n := self._need_number()) is not None:
            self.push_screen(MessagesScreen(n.number, n.title, self.clock))
            self.load_messages(n.number)

    def _messages_view(self, number: str) -> MessagesScreen | None:
        view = self.screen_stack[-1] if self.screen_stack else None
        if not isinstance(view, MessagesScreen):
            view = next((s for s in self.screen_stack if isinstance(s, MessagesScreen)), None)
        return view if view is not None and view.number == number else None

    @work(group="messages", exclusive=True, exit_on_error=False)
    async def load_messages(self, number: str) -> None:
        client = self.client
        try:
            if client is None:
                raise ConnectionError("not connected to the daemon")
            reply = await client.command("messages", number=number)
        except CommandFailed as err:
            text = f"{err.field}: {err.message}" if err.field else err.message
        except (ConnectionError, OSError) as err:
            text = str(err)
        else:
            if (view := self._messages_view(number)) is not None:
                view.show(reply)
            return
        if (view := self._messages_view(number)) is not None:
            view.error(f"messages of {number}: {text}")

    def on_message_action(self, message: MessageAction) -> None:
        self.run_command(message.label, message.command, number=message.number, message_id=message.message_id)
    def action_history(self) -> None:
        """The calls recorded, missed ones first (read from the daemon's history database)."""
        self.push_screen(HistoryView(self.fetch_history, self.clock))

    async def fetch_history(self, missed_only: bool) -> list[dict[str, Any]]:
        client = self.client
        if client is None:
            raise ConnectionError("not connected to the daemon")
        reply = await client.command("history", limit=HISTORY_ROWS, missed_only=missed_only)
        calls = reply.get("calls")
        return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []

    def action_reload(self) -> None:
        self.run_command("reload config", "reload")

    @work(group="commands", exit_on_error=False)
    async def run_command(self, label: str, cmd: str, **fields: Any) -> None:
        client = self.client
        if client is None:
            self.post_message(CommandDone(cmd, False, f"{label}: not connected to the daemon"))
            return
        self.query_one(ResultLine).pending(label)
        try:
            reply = await client.command(cmd, **fields)
        except CommandFailed as err:
            where = f"{err.field}: " if err.field else ""
            self.post_message(CommandDone(cmd, False, f"{label} refused: {where}{err.message}"))
        except (ConnectionError, OSError) as err:
            self.post_message(CommandDone(cmd, False, f"{label}: {err}"))
        else:
            saved = " (saved to config.toml)" if cmd == "set_user" else ""
            self.post_message(CommandDone(cmd, True, f"{label}{saved}", reply))

    def on_command_done(self, message: CommandDone) -> None:
        if message.command == "show_password" and message.ok:
            number = str(message.reply.get("number", ""))
            title = self.model.party(number)
            self.push_screen(PasswordDialog(title, str(message.reply.get("password", ""))))
            self.query_one(ResultLine).show(True, f"{number} password shown")
            return
        self.query_one(ResultLine).show(message.ok, message.text)
        if message.command in ("delete_message", "mark_heard"):
            number = str(message.reply.get("number", ""))
            view = self._messages_view(number) if message.ok else next(
                (s for s in self.screen_stack if isinstance(s, MessagesScreen)), None)
            if view is not None and message.ok:
                self.load_messages(number)
            elif view is not None:
                view.error(message.text)
