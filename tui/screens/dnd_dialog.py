"""Do not disturb: the whole number, or one of its devices. Enter switches the line chosen,
Escape cancels."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from tui.model import Device, Number

WHOLE_NUMBER = ""
"""The option id of the number itself (a device's is its device id)."""


class DndDialog(ModalScreen[str | None]):
    """Dismissed with what to switch: WHOLE_NUMBER, or a device id; None if cancelled."""

    DEFAULT_CSS = """
    DndDialog {
        align: center middle;
    }
    DndDialog > Vertical {
        width: 60;
        height: auto;
        border: round $primary;
        padding: 0 1;
    }
    DndDialog OptionList {
        height: auto;
        max-height: 12;
    }
    DndDialog .hint {
        color: $text-muted;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, number: Number, devices: list[Device]) -> None:
        super().__init__()
        self.number = number
        self.devices = [d for d in devices if d.device_id]

    def compose(self) -> ComposeResult:
        n = self.number
        options = [Option(f"[{'x' if n.dnd else ' '}] the whole number {n.number}", id="whole")]
        for d in self.devices:
            mark = "x" if d.device_id in n.dnd_devices else " "
            options.append(Option(f"[{mark}] {d.label} ({d.transport} {d.address})", id=f"d:{d.device_id}"))
        with Vertical() as box:
            box.border_title = f"{n.title}: do not disturb"
            yield Label("Nothing rings while on; callers get busy forwarding or 486")
            yield OptionList(*options)
            yield Label("↑↓ choose · Enter switches on/off · Esc cancels", classes="hint")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        option_id = event.option.id or ""
        self.dismiss(WHOLE_NUMBER if option_id == "whole" else option_id.removeprefix("d:"))

    def action_cancel(self) -> None:
        self.dismiss(None)
