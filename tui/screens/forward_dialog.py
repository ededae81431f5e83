"""Set a number's call forwarding: a target per condition ("" = off) and the seconds of
ringing before no-answer forwarding; Enter saves all, Escape cancels."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from tui.model import Number

FIELDS = (("forward_always", "Always"), ("forward_busy", "Busy / DND"), ("forward_no_answer", "No answer"),
          ("forward_unreachable", "Unreachable"))


class ForwardDialog(ModalScreen[dict[str, Any] | None]):
    """Dismissed with the changed settings (field: value), {} if none changed, None if cancelled."""

    DEFAULT_CSS = """
    ForwardDialog {
        align: center middle;
    }
    ForwardDialog > Vertical {
        width: 56;
        height: auto;
        border: round $primary;
        padding: 0 1;
    }
    ForwardDialog Horizontal {
        height: auto;
    }
    ForwardDialog Horizontal > Label {
        width: 20;
    }
    ForwardDialog Input {
        width: 1fr;
    }
    ForwardDialog .hint {
        color: $text-muted;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, number: Number) -> None:
        super().__init__()
        self.number = number

    def compose(self) -> ComposeResult:
        n = self.number
        with Vertical() as box:
            box.border_title = f"{n.title}: forwarding"
            yield Label("To an extension, or an outside number with its prefix; empty = off")
            for field, label in FIELDS:
                with Horizontal():
                    yield Label(label)
                    yield Input(getattr(n, field), id=field, restrict=r"[0-9*#+]*", compact=True)
            with Horizontal():
                yield Label("No answer after (s)")
                yield Input(str(n.no_answer_after), type="integer", id="no_answer_after", compact=True)
            yield Label("Tab moves · Enter saves · Esc cancels", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        changes: dict[str, Any] = {}
        for field, _ in FIELDS:
            value = self.query_one(f"#{field}", Input).value.strip()
            if value != getattr(self.number, field):
                changes[field] = value
        raw = self.query_one("#no_answer_after", Input).value.strip()
        try:
            seconds = int(raw)
        except ValueError:
            seconds = self.number.no_answer_after
        if seconds != self.number.no_answer_after:
            changes["no_answer_after"] = seconds
        self.dismiss(changes)

    def action_cancel(self) -> None:
        self.dismiss(None)
