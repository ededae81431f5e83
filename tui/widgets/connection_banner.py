"""Shown while the daemon cannot be reached: why, and that we keep trying."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class ConnectionBanner(Static):
    DEFAULT_CSS = """
    ConnectionBanner {
        height: auto;
        max-height: 7;
        border: round $error;
        border-title-color: $error;
        padding: 0 1;
        display: none;
    }
    ConnectionBanner.-visible {
        display: block;
    }
    """

    def on_mount(self) -> None:
        self.border_title = "daemon not running"

    def show_problem(self, path: str, reason: str, retry_in: float, hint: str = "") -> None:
        text = Text()
        text.append(reason[:1].upper() + reason[1:], style="bold")
        text.append(f": {path}\n")
        text.append(f"Retrying every {retry_in:g} s. ", style="bold")
        text.append("Start it: make run, or systemctl start homepbx.")
        if hint:
            text.append(f"\nDaemon log: {hint}", style="italic")
        self.update(text)
        self.add_class("-visible")

    def clear(self) -> None:
        self.remove_class("-visible")
