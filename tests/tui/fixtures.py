"""A house in a known state, built with the daemon's own LiveState, for display tests.

Going through the real state model keeps the data in exactly the protocol's shape; the
times are fixed so snapshots do not change from run to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.config import Config, LiveConfig, parse_config
from appliance.netaddr import AddressCache, InterfaceAddress
from appliance.sip.registrar import Registrar
from appliance.state import LiveState

NOW = 1_795_000_000.0  # a fixed "now" for the TUI's clock
CONFIG = """\
[server]
listen = ["0.0.0.0:5060"]
realm = "home.arpa"

[[users]]
number = "100"
name = "Grandpa"
password = "x"

[[users]]
number = "200"
name = "Family"
password = "Jx3-demo-password"
one_number = true
max_devices = 3
max_outgoing_calls = 2

[[users]]
number = "300"
name = "Office"
password = "y"
max_outgoing_calls = 1
"""

INTERFACES = [  # the box's own, as `ip -j addr` would list them: the wildcard becomes 192.168.1.2
    InterfaceAddress("lo", "127.0.0.1"), InterfaceAddress("lo", "::1"),
    InterfaceAddress("eth0", "192.168.1.2"), InterfaceAddress("eth0", "fe80::2"),
]

DEVICES = [  # id, number, user agent, transport, host, port, registered ago, expires in, reachable
    ("d1", "200", "Living room", "udp", "192.168.1.21", 5060, 7200, 312, True),
    ("d2", "200", "Kitchen", "udp", "192.168.1.22", 5060, 3600, 290, True),
    ("d3", "200", "Bathroom", "tcp", "192.168.1.23", 40112, 600, 45, False),
    ("d4", "100", "Grandpa's phone", "udp", "192.168.1.30", 5062, 86400, 500, True),
]


def house(config_path: Path | None = None) -> tuple[Config, Registrar, LiveState]:
    config = parse_config(CONFIG, config_path or Path("/etc/homepbx/config.toml"))
    registrar = Registrar(60, 3600, 600)
    registrar.load([_binding(*d) for d in DEVICES], NOW - 100000)
    state = LiveState(registrar, LiveConfig(config), box_addresses=AddressCache(lambda: INTERFACES))
    state.started_at = NOW - (3 * 86400 + 4 * 3600)
    return config, registrar, state


def _binding(binding_id: str, number: str, ua: str, transport: str, host: str, port: int,
             ago: int, expires: int, reachable: bool) -> dict[str, Any]:
    return {
        "id": binding_id, "number": number, "contact": f"<sip:{number}@{host}:{port}>", "instance": None,
        "call_id": f"call-{binding_id}", "cseq": 1, "expires_at": NOW + expires, "registered_at": NOW - ago,
        "flow": {"transport": transport, "host": host, "port": port, "local": ""},
        "user_agent": ua, "q": None, "reachable": reachable, "missed": 0 if reachable else 1,
    }


def ringing(state: LiveState) -> None:
    state.call_started("c1", "100", "200", "d4")
    for device in ("d1", "d2", "d3"):
        state.device_ringing("c1", device)
    state.calls["c1"].started_at = NOW - 5


def in_conference(state: LiveState) -> None:
    ringing(state)
    state.call_answered("c1", "d1")
    state.call_joined("c1", "d2")
    call = state.calls["c1"]
    call.started_at, call.answered_at = NOW - 140, NOW - 134
    state.call_started("c2", "300", "100", None)
    state.calls["c2"].started_at = NOW - 3


def snapshot(state: LiveState) -> dict[str, Any]:
    snap = state.snapshot()
    snap.update(time=NOW, protocol=1, reason="connect", config="/etc/homepbx/config.toml")
    return snap


def fixed_clock() -> float:
    return NOW


