"""One line above the keys: what the last command did, or why it was refused."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class ResultLine(Static):
    DEFAULT_CSS = """
    ResultLine {
        height: 1;
        padding: 0 1;
    }
    """

    def show(self, ok: bool, message: str) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append("✓ " if ok else "✗ ", style="bold green" if ok else "bold red")
        text.append(message)
        self.update(text)

    def pending(self, message: str) -> None:
        self.update(Text(f"… {message}", style="dim", no_wrap=True, overflow="ellipsis"))
