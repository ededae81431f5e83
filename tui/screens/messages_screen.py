"""The Messages view of one number (`m`): its voice messages, newest first, with who left
each, when, how long, and new or heard; `d` deletes the selected one (after a yes), `h`
marks it heard. The app fetches the list over the control socket and hands it to `show`;
the screen asks the app for changes by posting `MessageAction`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

from tui import format
from tui.screens.confirm_dialog import ConfirmDialog


@dataclass
class MessageAction(Message):
    """Delete a message (`delete_message`) or mark it heard (`mark_heard`)."""

    command: str
    number: str
    message_id: str
    label: str


@dataclass(frozen=True)
class VoiceMessage:
    id: str
    caller: str
    name: str
    received: float
    seconds: float
    heard: bool

    @property
    def who(self) -> str:
        return f"{self.caller} {self.name}" if self.name else self.caller or "unknown"


def parse_messages(reply: Mapping[str, Any]) -> list[VoiceMessage]:
    """The `messages` reply's list; entries that are not what the protocol says are left out."""
    out = []
    for item in reply.get("messages") or []:
        try:
            out.append(VoiceMessage(str(item["id"]), str(item.get("caller") or ""), str(item.get("name") or ""),
                                    float(item["received"]), float(item.get("seconds") or 0),
                                    bool(item.get("heard"))))
        except (KeyError, TypeError, ValueError):
            continue
    return out


COLUMNS = (("", "state", 5), ("From", "from", 28), ("When", "when", 13), ("Length", "len", 7))


class MessagesScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    MessagesScreen {
        align: center middle;
    }
    MessagesScreen > Vertical {
        width: 72;
        height: 80%;
        border: round $primary;
        padding: 0 1;
    }
    MessagesScreen DataTable {
        height: 1fr;
    }
    MessagesScreen .hint {
        color: $text-muted;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("d", "delete", "Delete"),
        Binding("h", "heard", "Heard"),
        Binding("escape,m,q", "close", "Close"),
    ]

    def __init__(self, number: str, title: str, clock: Callable[[], float]) -> None:
        super().__init__()
        self.number = number
        self.title_text = title
        self.clock = clock
        self.messages: list[VoiceMessage] = []
        self.loaded = False

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = f"Messages of {self.title_text}"
            yield Label("… loading", id="summary")
            yield DataTable(id="messages", cursor_type="row", zebra_stripes=False)
            yield Label("d delete · h mark heard · Esc closes", classes="hint")

    def on_mount(self) -> None:
        self._columns()
        self.query_one(DataTable).focus()

    def _columns(self) -> DataTable[Any]:
        """The table, with its columns (the list may arrive before the screen is mounted)."""
        table: DataTable[Any] = self.query_one(DataTable)
        if not table.columns:
            for label, key, width in COLUMNS:
                table.add_column(label, key=key, width=width)
        return table

    def show(self, reply: Mapping[str, Any]) -> None:
        """The `messages` reply for this number."""
        self.messages = parse_messages(reply)
        self.loaded = True
        new = sum(1 for m in self.messages if not m.heard)
        heard = len(self.messages) - new
        summary = Text()
        if not self.messages:
            summary.append("No messages")
        else:
            summary.append(f"{new} new", style="bold" if new else "")
            summary.append(f", {heard} heard")
        self.query_one("#summary", Label).update(summary)
        table = self._columns()
        row = table.cursor_row
        table.clear()
        now = self.clock()
        for m in self.messages:
            state = Text("new", style="bold green") if not m.heard else Text("heard", style="dim")
            table.add_row(state, Text(m.who, no_wrap=True, overflow="ellipsis"), _when(m.received, now),
                          format.duration(m.seconds), key=m.id)
        if self.messages:
            table.move_cursor(row=min(row, len(self.messages) - 1))

    def error(self, text: str) -> None:
        self.query_one("#summary", Label).update(Text(f"✗ {text}", style="red"))

    @property
    def selected(self) -> VoiceMessage | None:
        table = self.query_one(DataTable)
        if not self.messages or not 0 <= table.cursor_row < len(self.messages):
            return None
        return self.messages[table.cursor_row]

    def action_delete(self) -> None:
        message = self.selected
        if message is None:
            return
        when = _when(message.received, self.clock())

        def answered(yes: bool | None) -> None:
            if yes:
                self.post_message(MessageAction("delete_message", self.number, message.id,
                                                f"{self.number} message from {message.who} deleted"))

        self.app.push_screen(ConfirmDialog("Delete message", f"Delete the message from {message.who} ({when})?"),
                             answered)

    def action_heard(self) -> None:
        message = self.selected
        if message is not None and not message.heard:
            self.post_message(MessageAction("mark_heard", self.number, message.id,
                                            f"{self.number} message from {message.who} marked heard"))

    def action_close(self) -> None:
        self.dismiss(None)


def _when(stamp: float, now: float) -> str:
    """14:05 today, else 03 Dec 14:05."""
    today = format.since(stamp, now)
    return today if ":" in today else f"{today} {format.since(stamp, stamp)}"
