"""A network for the edge's components in unit tests: records what they send instead of sending it."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, ClassVar

from appliance.sip.message import parse_message
from appliance.sip.registrar import Flow


class FakeNetwork:
    """The box on 127.0.0.1:5060. `sent` holds (message, flow) for each send, the message
    parsed, or its bytes where `parsed` is False; `send` takes literal IP addresses only,
    as a socket does. A TCP connect is held in `connects` until the test ends it."""

    addresses: ClassVar[list[str]] = ["127.0.0.1:5060"]
    parsed: ClassVar[bool] = True

    def __init__(self) -> None:
        self.sent: list[tuple[Any, Flow]] = []
        self.connects: list[tuple[Flow, Callable[[Flow | None, str], None]]] = []

    def send(self, data: bytes, flow: Flow) -> bool:
        ipaddress.ip_address(flow.host)  # a host name or junk raises, as sendto would
        self.sent.append((parse_message(data) if self.parsed else data, flow))
        return self.flow_open(flow)

    def local_address(self, flow: Flow) -> tuple[str, int]:
        return "127.0.0.1", 5060

    def local_ips(self) -> set[str]:
        return {"127.0.0.1"}

    def flow_open(self, flow: Flow) -> bool:
        return True

    def connect(self, flow: Flow, then: Callable[[Flow | None, str], None]) -> None:
        self.connects.append((flow, then))

    def take(self) -> list[tuple[Any, Flow]]:
        """What was sent since the last `take`."""
        sent, self.sent = self.sent, []
        return sent
