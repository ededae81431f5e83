"""What to type into a handset for the selected number: the one screen a family needs.

Handsets ask for the same few things under different names (server, registrar, domain,
user, auth ID), so each is named the way most handsets do. The password is not in here:
`p` asks the daemon for it through the app's own show_password flow, shown over this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

WILDCARD_HOSTS = ("0.0.0.0", "::")
MD5_HINT = 'digest_algorithms = ["MD5"]'
MAX_SERVERS = 4
"""Addresses listed at most: the dialog must fit 80x24, and the first ones are the likely ones."""


def split_address(text: str) -> tuple[str, str]:
    """"192.168.1.2:5060" / "[fd00::2]:5060" -> (host, port); no port: (text, "")."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest.removeprefix(":")
    host, colon, port = text.rpartition(":")
    return (host, port) if colon else (text, "")


def handset_settings(number: str, addresses: Sequence[str]) -> list[tuple[str, str]]:
    """(field, value) rows; a row with no field name continues the one above."""
    pairs = [split_address(a) for a in addresses]
    ports = list(dict.fromkeys(port for _, port in pairs if port))
    several_ports = len(ports) > 1  # then each address goes with its own port
    servers = list(dict.fromkeys(
        address if several_ports else host
        for address, (host, _) in zip(addresses, pairs, strict=True) if host not in WILDCARD_HOSTS))
    servers = servers[:MAX_SERVERS] or ["this box's address"]  # the daemon found none: say what is meant
    port = "the one after each address" if several_ports else ports[0] if ports else "5060"
    rows = [("SIP server", servers[0])]
    rows += [("", f"or {server}") for server in servers[1:]]
    rows += [
        ("Registrar, domain", "the same as the server"),
        ("Port", port),
        ("Transport", "UDP or TCP"),
        ("User name", number),
        ("Auth name", f"{number} (also called auth ID)"),
        ("Password", "press p to show it"),
    ]
    return rows


class SetupDialog(ModalScreen[None]):
    DEFAULT_CSS = """
    SetupDialog {
        align: center middle;
    }
    SetupDialog > Vertical {
        width: 66;
        height: auto;
        border: round $primary;
        padding: 0 1;
    }
    SetupDialog #settings {
        padding: 1 0;
    }
    SetupDialog #md5 {
        padding-bottom: 1;
    }
    SetupDialog .hint {
        color: $text-muted;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "app.password", "Password"),
        Binding("escape", "close", "Close"),
    ]

    def __init__(self, title: str, number: str, addresses: Sequence[str]) -> None:
        super().__init__()
        self.title_text = title
        self.number = number
        self.addresses = tuple(addresses)

    def compose(self) -> ComposeResult:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(overflow="fold")
        for name, value in handset_settings(self.number, self.addresses):
            grid.add_row(name, Text(value, style="bold" if name else ""))
        with Vertical() as box:
            box.border_title = f"Set up a handset for {self.title_text}"
            yield Label("In the handset's SIP account settings, type:")
            yield Static(grid, id="settings")
            yield Static(Text.assemble(
                "Right password, yet it never registers? An old handset that gives up on the SHA-256 "
                "login is offered MD5 on its next try (the line above the keys says so); if it still "
                "fails, set ", (MD5_HINT, "bold"), " under [server] in config.toml, then r."), id="md5")
            yield Label("p shows the password · Esc closes", classes="hint")

    def action_close(self) -> None:
        self.dismiss(None)
