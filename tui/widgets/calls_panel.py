"""Calls in progress: who calls whom, which devices ring, who answered, who joined, how long."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from tui import format
from tui.model import Call, PbxModel


class CallsPanel(VerticalScroll):
    DEFAULT_CSS = """
    CallsPanel {
        height: 1fr;
        border: round $secondary;
        border-title-color: $text;
        padding: 0 1;
    }
    """

    can_focus = False

    def compose(self) -> ComposeResult:
        yield Static(id="calls-body")

    def on_mount(self) -> None:
        self.border_title = "Calls"

    def show(self, model: PbxModel, now: float) -> None:
        body = self.query_one("#calls-body", Static)
        calls = sorted(model.calls.values(), key=lambda c: (c.started_at, c.id))
        self.border_title = f"Calls ({len(calls)})" if calls else "Calls"
        if not calls:
            body.update(Text("no calls", style="dim"))
            return
        body.update(Group(*(call_line(model, c, now) for c in calls)))


def call_line(model: PbxModel, call: Call, now: float) -> Text:
    text = Text()  # a long line wraps: every ringing device stays named
    text.append(model.party(call.caller), style="bold")
    text.append(" → ")
    text.append(model.party(call.callee), style="bold")
    text.append(" · ")
    if call.phase == "ringing":
        ringing = ", ".join(model.device_label(d) for d in call.ringing) or "nobody yet"
        text.append("ringing: ", style="bold yellow")
        text.append(ringing)
        text.append(f" · {format.duration(now - call.started_at)}", style="dim")
        return text
    text.append("answered by ", style="bold green")
    text.append(model.device_label(call.answered_by) if call.answered_by else "the callee")
    for joined in call.joined:
        text.append(" · ")
        text.append(model.device_label(joined), style="cyan")
        text.append(" joined", style="cyan")
    text.append(f" · {format.duration(now - (call.answered_at or call.started_at))}", style="dim")
    return text
