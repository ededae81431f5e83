"""Ask for one whole number (a device or call limit); Enter saves, Escape cancels."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class ValueDialog(ModalScreen[int | None]):
    DEFAULT_CSS = """
    ValueDialog {
        align: center middle;
    }
    ValueDialog > Vertical {
        width: 50;
        height: auto;
        border: round $primary;
        padding: 0 1;
    }
    ValueDialog Input {
        width: 1fr;
    }
    ValueDialog .hint {
        color: $text-muted;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, question: str, value: int) -> None:
        super().__init__()
        self.title_text = title
        self.question = question
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = self.title_text
            yield Label(self.question)
            yield Input(str(self.value), type="integer", id="value")
            yield Label("Enter saves · Esc cancels", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        try:
            self.dismiss(int(event.value))
        except ValueError:
            self.query_one(Input).value = str(self.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
