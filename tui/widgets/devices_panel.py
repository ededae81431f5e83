"""The devices of the selected number, three lines each: who, what it is doing, its registration."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from tui import format
from tui.model import Device, DeviceState, Number, PbxModel

STATE_STYLE = {
    DeviceState.IDLE: ("○", "dim"),
    DeviceState.RINGING: ("◉", "bold yellow"),
    DeviceState.TALKING: ("●", "bold green"),
    DeviceState.CONFERENCE: ("◍", "bold cyan"),
}


class DevicesPanel(VerticalScroll):
    DEFAULT_CSS = """
    DevicesPanel {
        width: 1fr;
        height: 1fr;
        border: round $secondary;
        border-title-color: $text;
        padding: 0 1;
    }
    DevicesPanel > Static {
        width: 1fr;
    }
    """

    can_focus = False

    def compose(self) -> ComposeResult:
        yield Static(id="devices-body")

    def show(self, model: PbxModel, number: str | None, now: float) -> None:
        body = self.query_one("#devices-body", Static)
        n = model.numbers.get(number) if number is not None else None
        if n is None:
            self.border_title = "Devices"
            body.update(Text("no number selected" if model.loaded else "", style="dim"))
            return
        devices = model.devices_of(n.number)
        one = "one-number ON" if n.one_number else "one-number off"
        self.border_title = f"{n.title} · {one} · {len(devices)}/{n.device_limit}"
        rules = self._rules(n)
        if not devices:
            body.update(Group(*rules, Text("no device registered", style="dim")))
            return
        body.update(Group(*rules, *(self._device(model, d, now) for d in devices)))

    @staticmethod
    def _rules(n: Number) -> list[Text]:
        """The number's do-not-disturb and forwarding, one line above its devices (none when unset)."""
        if not n.dnd and not n.forwards:
            return []
        text = Text(no_wrap=True, overflow="ellipsis")
        if n.dnd:
            text.append("⊘ do not disturb", style="bold red")
        for i, rule in enumerate(n.forwards):
            text.append(" · " if i or n.dnd else "", style="dim")
            text.append(f"↪ {rule}" if i == 0 else rule, style="cyan")
        return [text]

    @staticmethod
    def _device(model: PbxModel, device: Device, now: float) -> Text:
        state = model.device_state(device.id)
        mark, style = STATE_STYLE[state]
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"{device.label}", style="bold")
        if device.dnd:
            text.append(" ⊘ DND", style="bold red")
        text.append(f"  {device.transport} {device.address}\n", style="")
        text.append(f"  {mark} ", style=style)
        text.append(_state_line(model, device, state, now), style=style)
        if device.reachable and state is DeviceState.IDLE:
            text.append(" · reachable", style="green")  # busy says reachable by itself
        elif not device.reachable:
            text.append(" · ✗ unreachable", style="bold red")
            if device.unreachable_reason:  # e.g. tcp_connect_failed: the box cannot connect to it
                text.append(f" ({device.unreachable_reason.replace('_', ' ')})", style="red")
        text.append(f"\n  since {format.since(device.registered_at, now)}"
                    f" · expires in {format.expires_in(device.expires_at - now)}", style="dim")
        return text


def _state_line(model: PbxModel, device: Device, state: DeviceState, now: float) -> str:
    call = model.call_of(device.id)
    if state is DeviceState.IDLE or call is None:
        return "idle"
    other = call.caller if call.callee == device.number and device.id != call.caller_device else call.callee
    if state is DeviceState.RINGING:
        return f"ringing · {model.party(call.caller)} · {format.duration(now - call.started_at)}"
    talk = format.duration(now - (call.answered_at or call.started_at))
    if state is DeviceState.CONFERENCE:
        return f"in conference · {model.party(other)} · {talk}"
    return f"talking with {model.party(other)} · {talk}"
