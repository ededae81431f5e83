"""A number's SIP password, shown on request and gone when any key is pressed."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static


class PasswordDialog(ModalScreen[None]):
    DEFAULT_CSS = """
    PasswordDialog {
        align: center middle;
    }
    PasswordDialog > Vertical {
        width: 60;
        height: auto;
        border: round $warning;
        padding: 0 1;
    }
    PasswordDialog #password {
        padding: 1 0;
    }
    PasswordDialog .hint {
        color: $text-muted;
    }
    """

    def __init__(self, title: str, password: str) -> None:
        super().__init__()
        self.title_text = title
        self.password = password

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = f"Password of {self.title_text}"
            yield Label("User and auth name: the number. Type this into the handset:")
            yield Static(Text(self.password or "(none yet)", style="bold"), id="password")
            yield Label("Any key closes", classes="hint")

    def on_key(self, event: events.Key) -> None:
        event.stop()
        self.dismiss(None)
