"""A line that appears only while the daemon ignores addresses after failed logins."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tui import format
from tui.model import PbxModel

SHOWN = 2
"""Addresses named on the line; the rest are counted (a scanner can trip hundreds)."""


class BlockedLine(Static):
    DEFAULT_CSS = """
    BlockedLine {
        height: 1;
        padding: 0 1;
        color: $warning;
        display: none;
    }
    BlockedLine.-visible {
        display: block;
    }
    """

    def show(self, model: PbxModel, now: float) -> None:
        blocked = model.blocked_now(now)
        self.set_class(bool(blocked), "-visible")
        if not blocked:
            return
        count = len(blocked)
        text = Text(f"{count} address{'es' * (count != 1)} blocked", style="bold", no_wrap=True, overflow="ellipsis")
        text.append(" (failed logins): ")
        text.append(", ".join(f"{address} {format.expires_in(until - now)}" for address, until in blocked[:SHOWN]))
        if count > SHOWN:
            text.append(f", +{count - SHOWN}")
        self.update(text)
