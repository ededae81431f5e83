"""The top line: which PBX, how long it has run, how busy it is."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from tui import format
from tui.model import PbxModel


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        background: $primary;
        color: $text;
        padding: 0 1;
    }
    StatusBar.-offline {
        background: $error;
    }
    """

    def show(self, model: PbxModel, now: float, connected: bool | None) -> None:
        """``connected`` None: not tried yet."""
        self.set_class(connected is False, "-offline")
        left = Text("homepbx", style="bold")
        if model.loaded:
            left.append(f" · {model.realm} · {', '.join(model.reachable_at)}")
            if connected:
                left.append(f" · up {format.uptime(now - model.started_at)}")
        if connected is None:
            left.append(" · connecting…")
        elif not connected:
            left.append(" · daemon not running — retrying", style="bold")
        calls = len(model.calls)
        devices = len(model.devices)
        right = Text(f"{calls} call{'s' * (calls != 1)} · {devices} device{'s' * (devices != 1)}")
        grid = Table.grid(expand=True)
        grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        grid.add_column(justify="right", no_wrap=True)
        grid.add_row(left, right if model.loaded else "")
        self.update(grid)
