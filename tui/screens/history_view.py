"""The History view (key h): the calls the box has recorded, missed ones first and in red.

Read from the daemon's database through the control socket's `history` command, so only
committed rows are ever shown; re-read when the daemon says a row was added.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from tui.history import history_lines

Fetch = Callable[[bool], Awaitable[list[dict[str, Any]]]]
"""Ask the daemon for rows (missed only, or all)."""


class HistoryView(Screen[None]):
    DEFAULT_CSS = """
    HistoryView > Vertical {
        border: round $secondary;
        border-title-color: $text;
        height: 1fr;
    }
    HistoryView #history-status {
        height: 1;
        padding: 0 1;
        color: $text-muted;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,h", "close", "Back"),
        Binding("m", "toggle_missed", "Missed only"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self, fetch: Fetch, clock: Callable[[], float]) -> None:
        super().__init__()
        self.fetch = fetch
        self.clock = clock
        self.missed_only = False
        self.rows: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = "History"
            yield DataTable(id="history", cursor_type="row", zebra_stripes=False)
        yield Static("", id="history-status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("When", "Who", "To", "Outcome", "Answered", "Length")
        self.reload()

    @work(exclusive=True, group="history", exit_on_error=False)
    async def reload(self) -> None:
        status = self.query_one("#history-status", Static)
        try:
            rows = await self.fetch(self.missed_only)
        except Exception as err:  # not connected, refused: said on the status line
            status.update(Text(f"history not available: {err}", style="bold red"))
            return
        self.show(rows)

    def show(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        table = self.query_one(DataTable)
        table.clear()
        lines = history_lines(rows, self.clock())
        for line in lines:
            style = "bold red" if line.missed else ""
            cells = (line.when, line.who, line.to, line.outcome, line.answered_by, line.duration)
            table.add_row(*(Text(c, style=style) for c in cells), key=str(line.id))
        missed = sum(1 for line in lines if line.missed)
        which = "missed calls" if self.missed_only else "calls"
        box = self.query_one(Vertical)
        box.border_title = f"History: {len(lines)} {which}" + (f", {missed} missed" if missed and not
                                                                 self.missed_only else "")
        self.query_one("#history-status", Static).update(
            Text("no calls recorded yet" if not lines else "missed calls first · m: missed only · esc: back",
                 style="dim"))

    def action_close(self) -> None:
        self.dismiss(None)

    def action_toggle_missed(self) -> None:
        self.missed_only = not self.missed_only
        self.reload()

    def action_refresh(self) -> None:
        self.reload()
