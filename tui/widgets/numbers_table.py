"""Every number: name, one-number on/off, devices registered / allowed, outgoing in use / allowed;
a mark after the number: ⊘ do not disturb, ↪ forwarding set (the devices panel says which)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from tui import format
from tui.model import PbxModel

COLUMNS = (("No.", "number", 4), ("Name", "name", 8), ("1#", "one", 3), ("Dev", "dev", 5), ("Out", "out", 4))


class NumbersTable(DataTable[Text]):
    DEFAULT_CSS = """
    NumbersTable {
        width: 36;
        height: 1fr;
        border: round $secondary;
        border-title-color: $text;
    }
    NumbersTable:focus {
        border: round $primary;
    }
    """

    def on_mount(self) -> None:
        self.border_title = "Numbers"
        self.cursor_type = "row"
        self.zebra_stripes = False
        for label, key, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    @property
    def selected(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:  # no such row (table being rebuilt)
            return None
        return key.value

    def show(self, model: PbxModel) -> None:
        selected = self.selected
        rows = {n: self._cells(model, n) for n in model.numbers}
        if list(rows) == [key.value for key in self.rows]:
            for number, cells in rows.items():
                for (_, column, _), cell in zip(COLUMNS, cells, strict=True):
                    self.update_cell(number, column, cell)
            return
        self.clear()
        for number, cells in rows.items():
            self.add_row(*cells, key=number)
        if selected not in rows:  # first draw: the shared number is the interesting one
            selected = next((n for n in rows if model.numbers[n].one_number), None)
        if selected in rows:
            self.move_cursor(row=list(rows).index(selected))

    @staticmethod
    def _cells(model: PbxModel, number: str) -> list[Text]:
        n = model.numbers[number]
        registered = len(model.devices_of(number))
        full = registered >= n.device_limit
        in_use = model.outgoing_in_use(number)
        return [
            Text.assemble((n.number, "bold"), (n.mark, "bold red" if n.dnd else "bold cyan")),
            Text(n.name, no_wrap=True, overflow="ellipsis"),
            Text("ON", style="bold green") if n.one_number else Text("off", style="dim"),
            Text(f"{registered}/{n.device_limit}", style="yellow" if full else ""),
            Text(f"{in_use}/{format.limit(n.max_outgoing_calls)}",
                 style="yellow" if n.max_outgoing_calls and in_use >= n.max_outgoing_calls else ""),
        ]
