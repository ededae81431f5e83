"""A line per trunk (the line to the provider): registered, failing and why, since when, next try."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tui import format
from tui.model import PbxModel, Trunk

LABELS = {
    "registered": ("registered", "green"),
    "registering": ("registering", "yellow"),
    "failing": ("failing", "red"),
    "rejected": ("refused by the provider", "red"),
    "not_registering": ("not registering", "dim"),
}


def trunk_line(trunk: Trunk, now: float) -> Text:
    label, style = LABELS.get(trunk.status, (trunk.status, ""))
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f"Line {trunk.name} ", style="bold")
    text.append(f"({trunk.server}): ")
    text.append(label, style=style)
    if trunk.reason:
        text.append(f": {trunk.reason}")
    if trunk.since:
        text.append(f", since {format.since(trunk.since, now)}")
    if trunk.next_attempt is not None and trunk.status in ("failing", "rejected"):
        text.append(f", next try in {format.expires_in(trunk.next_attempt - now)}")
    return text


class TrunkLines(Static):
    DEFAULT_CSS = """
    TrunkLines {
        height: auto;
        padding: 0 1;
        display: none;
    }
    TrunkLines.-visible {
        display: block;
    }
    """

    def show(self, model: PbxModel, now: float) -> None:
        trunks = list(model.trunks.values())
        self.set_class(bool(trunks), "-visible")
        if not trunks:
            return
        self.update(Text("\n").join(trunk_line(t, now) for t in trunks))
