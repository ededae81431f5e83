"""A TCP device whose connection is gone is reached again over a new connection to its
Contact (issue 12): when the qualifier tries (fake clock, fake network), and how the
transports connect (real loopback sockets)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import LiveConfig, parse_config
from appliance.edge.qualify import Qualifier
from appliance.edge.tcp_limits import TcpLimits
from appliance.edge.timers import TimerWheel
from appliance.edge.transport import CONNECT_TIMEOUT, Transports
from appliance.sip.message import Request, parse_message
from appliance.sip.registrar import EventKind, Flow, Registrar, RegistrarEvent
from tests.support.fake_network import FakeNetwork

CONFIG = """
[server]
listen = ["127.0.0.1:5060"]
[registration]
qualify_interval = 30
qualify_timeout = 5
[[users]]
number = "200"
password = "pw200"
"""
WALL0 = 1_800_000_000.0
OLD_FLOW = Flow("tcp", "192.0.2.20", 40001, "127.0.0.1:5060")  # the connection before the restart
NEW_FLOW = Flow("tcp", "192.0.2.20", 5070, "127.0.0.1:5060")


def restored(contact: str = "<sip:200@192.0.2.20:5070;transport=tcp>", **extra: object) -> dict[str, Any]:
    """A binding as bindings.json keeps it across a restart."""
    return {"id": "d1", "number": "200", "contact": contact, "instance": None, "call_id": "c1", "cseq": 1,
            "expires_at": WALL0 + 300, "registered_at": WALL0,
            "flow": {"transport": OLD_FLOW.transport, "host": OLD_FLOW.host, "port": OLD_FLOW.port,
                     "local": OLD_FLOW.local}, **extra}


class TcpNetwork(FakeNetwork):
    """A TCP flow is open once the test has connected it (`open`); a send on another fails."""

    def __init__(self) -> None:
        super().__init__()
        self.open: set[Flow] = set()

    def flow_open(self, flow: Flow) -> bool:
        return flow.transport == "udp" or flow in self.open


class House:
    def __init__(self, *items: dict[str, Any]) -> None:
        self.now = 1000.0
        self.timers = TimerWheel(lambda: self.now, manual=True)
        self.registrar = Registrar(60, 3600, 600)
        assert self.registrar.load(items or [restored()], WALL0) == len(items or [1])
        self.network = TcpNetwork()
        self.events: list[RegistrarEvent] = []
        settings = LiveConfig(parse_config(CONFIG, Path("/etc/homepbx/config.toml")))
        self.qualifier = Qualifier(settings, self.network, self.registrar, self.timers, self.events.extend)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.timers.advance_to(self.now)

    def connected(self, flow: Flow | None, why: str = "") -> None:
        """The pending connect ends."""
        (_target, then), = self.network.connects
        self.network.connects.clear()
        if flow is not None:
            self.network.open.add(flow)
        then(flow, why)


def test_after_a_restart_the_contact_is_connected_and_becomes_the_flow() -> None:
    house = House()
    house.qualifier.start()
    house.advance(0)  # the first round, at start
    [(target, _)] = house.network.connects
    assert target == NEW_FLOW  # the Contact's address and port, from the listener it came on
    assert house.network.sent == []  # nothing goes out on the dead flow
    house.connected(NEW_FLOW)
    [binding] = house.registrar.bindings("200")
    assert binding.flow == NEW_FLOW and binding.reachable
    [(options, dest)] = house.network.sent
    assert options.method == "OPTIONS" and dest == NEW_FLOW
    assert house.events == []


def test_a_refused_connect_makes_the_device_unreachable_with_the_reason_once_per_round() -> None:
    house = House()
    house.qualifier.start()
    house.advance(0)
    house.connected(None, "refused")
    [event] = house.events
    assert (event.kind, event.reason) == (EventKind.UNREACHABLE, "tcp_connect_failed")
    [binding] = house.registrar.bindings("200")
    assert binding.unreachable_reason == "tcp_connect_failed" and binding.flow == OLD_FLOW
    house.qualifier.flow_lost(OLD_FLOW)  # no second attempt within the round
    house.advance(29.9)
    assert house.network.connects == []
    house.advance(0.1)  # the next round tries again
    assert len(house.network.connects) == 1
    house.connected(NEW_FLOW)
    assert house.registrar.bindings("200")[0].flow == NEW_FLOW


def test_a_lost_connection_is_reached_again_at_once() -> None:
    house = House()
    house.network.open.add(OLD_FLOW)
    house.qualifier.start()
    house.advance(0)
    assert [dest for _, dest in house.network.sent] == [OLD_FLOW]  # alive: qualified on its own flow
    house.network.open.discard(OLD_FLOW)
    house.qualifier.flow_lost(OLD_FLOW)
    [(target, _)] = house.network.connects
    assert target == NEW_FLOW
    house.qualifier.flow_lost(OLD_FLOW)  # one attempt at a time
    assert len(house.network.connects) == 1


def test_re_registered_meanwhile_keeps_its_own_connection() -> None:
    house = House()
    house.qualifier.start()
    house.advance(0)
    [binding] = house.registrar.bindings("200")
    mine = Flow("tcp", "192.0.2.20", 40002, "127.0.0.1:5060")
    binding.flow = mine  # what a REGISTER over a new connection does
    house.network.open.add(mine)
    house.connected(NEW_FLOW)
    assert binding.flow == mine and house.events == [] and house.network.sent == []


@pytest.mark.parametrize("item, reason", [
    (restored(outbound=True, instance="urn:uuid:1"), "outbound_flow_lost"),
    (restored("<sip:200@192.0.2.20:5070;transport=udp>"), "tcp_flow_lost"),
])
def test_no_connect_to_an_outbound_device_or_a_non_tcp_contact(item: dict[str, Any], reason: str) -> None:
    house = House(item)
    house.qualifier.start()
    house.advance(0)
    assert house.network.connects == []
    [event] = house.events
    assert (event.kind, event.reason) == (EventKind.UNREACHABLE, reason)


def test_stopped_qualifier_ignores_lost_connections_and_late_results() -> None:
    house = House()
    house.qualifier.start()
    house.advance(0)
    house.qualifier.stop()
    house.connected(None, "refused")
    house.qualifier.flow_lost(OLD_FLOW)
    assert house.events == [] and house.network.connects == []


def test_registrar_notes_rfc5626_outbound() -> None:
    registrar = Registrar(60, 3600, 600)
    flow = Flow("tcp", "192.0.2.20", 40001, "127.0.0.1:5060")

    def register(supported: str, contact_params: str, call_id: str) -> bool:
        text = (f"REGISTER sip:home.arpa SIP/2.0\r\nVia: SIP/2.0/TCP 192.0.2.20:40001;branch=z9hG4bK{call_id}\r\n"
                f"From: <sip:200@home.arpa>;tag=1\r\nTo: <sip:200@home.arpa>\r\nCall-ID: {call_id}\r\n"
                f"CSeq: 1 REGISTER\r\n{supported}"
                f"Contact: <sip:200@192.0.2.20:5070;transport=tcp>{contact_params}\r\nContent-Length: 0\r\n\r\n")
        request = parse_message(text.encode())
        assert isinstance(request, Request)
        from appliance.sip.registrar import DevicePolicy
        response, events = registrar.register(request, "200", DevicePolicy(5, False), flow, WALL0)
        assert response.status == 200
        return events[-1].binding.outbound

    instance = ';+sip.instance="<urn:uuid:{}>"'
    assert register("Supported: path, outbound\r\n", instance.format(1) + ";reg-id=1", "a")
    assert not register("", instance.format(2) + ";reg-id=1", "b")  # no Supported: outbound
    assert not register("Supported: outbound\r\n", instance.format(3), "c")  # no reg-id
    assert [b["outbound"] for b in registrar.dump()] == [True, False, False]


# -- the transports' side: real sockets on loopback ---------------------------------------------------

class Receiver:
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, Flow]] = []

    def on_message(self, data: bytes, flow: Flow) -> None:
        self.messages.append((data, flow))

    def on_oversize(self, head: bytes, flow: Flow) -> None:
        pass


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_connect_opens_a_connection_served_like_an_accepted_one() -> None:
    async def run() -> None:
        lost: list[Flow] = []
        transports = Transports(TimerWheel(time.monotonic), TcpLimits(max_per_address=2), fd_limit=4096,
                                on_lost=lost.append)
        receiver = Receiver()
        local = await transports.listen("127.0.0.1", 0, receiver)
        handset = socket.create_server(("127.0.0.1", 0))
        handset.setblocking(False)
        port = handset.getsockname()[1]
        results: list[tuple[Flow | None, str]] = []
        try:
            transports.connect(Flow("tcp", "127.0.0.1", port, local), lambda f, why: results.append((f, why)))
            loop = asyncio.get_running_loop()
            peer, _ = await loop.sock_accept(handset)
            for _ in range(100):
                if results:
                    break
                await asyncio.sleep(0.01)
            [(flow, why)] = results
            assert why == "" and flow == Flow("tcp", "127.0.0.1", port, local)
            assert transports.flow_open(flow) and transports.send(b"OPTIONS\r\n", flow)
            assert await loop.sock_recv(peer, 100) == b"OPTIONS\r\n"
            # it owes no first message: past the header timeout nothing closes it
            assert transports.tcp.guard.due(time.monotonic() + 11, lambda c: True) == []
            # what the handset sends on it is delivered with that flow
            await loop.sock_sendall(peer, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            for _ in range(100):
                if receiver.messages:
                    break
                await asyncio.sleep(0.01)
            assert receiver.messages[0][1] == flow
            # already open: answered at once, no second connection
            transports.connect(flow, lambda f, why: results.append((f, why)))
            assert results[-1] == (flow, "") and len(transports.tcp.guard) == 1
            peer.close()
            for _ in range(100):
                if lost:
                    break
                await asyncio.sleep(0.01)
            assert lost == [flow] and not transports.flow_open(flow)
            # refused: nothing listens there any more
            handset.close()
            transports.connect(flow, lambda f, why: results.append((f, why)))
            for _ in range(100):
                if len(results) == 3:
                    break
                await asyncio.sleep(0.01)
            assert results[-1] == (None, "refused") and len(transports.tcp.guard) == 0
        finally:
            handset.close()
            await transports.close()

    _run(run())


def test_connect_respects_the_caps_and_refuses_non_addresses() -> None:
    async def run() -> list[tuple[Flow | None, str]]:
        transports = Transports(TimerWheel(time.monotonic), TcpLimits(max_per_address=1), fd_limit=4096)
        results: list[tuple[Flow | None, str]] = []
        transports.connect(Flow("tcp", "127.0.0.1", 5060), lambda f, why: results.append((f, why)))
        local = await transports.listen("127.0.0.1", 0, Receiver())
        transports.tcp.guard.admit("someone", "127.0.0.1", time.monotonic())  # type: ignore[arg-type]
        for flow in (Flow("tcp", "127.0.0.1", 5070, local), Flow("tcp", "handset.lan", 5060, local),
                     Flow("tcp", "192.0.2.1", 0, local)):
            transports.connect(flow, lambda f, why: results.append((f, why)))
        await transports.close()
        return results

    assert _run(run()) == [(None, "not_listening"), (None, "cap_max_per_address"), (None, "not_an_address"),
                           (None, "not_an_address")]


def test_connect_gives_up_at_the_deadline_of_the_timer_wheel() -> None:
    async def run() -> list[tuple[Flow | None, str]]:
        clock = [100.0]
        timers = TimerWheel(lambda: clock[0], manual=True)
        transports = Transports(timers, fd_limit=4096)
        local = await transports.listen("127.0.0.1", 0, Receiver())
        loop = asyncio.get_running_loop()
        never = loop.create_future()

        async def hangs(*_args: object, **_kw: object) -> object:
            return await never  # a SYN nobody answers

        loop.create_connection = hangs  # type: ignore[method-assign,assignment]
        results: list[tuple[Flow | None, str]] = []
        transports.connect(Flow("tcp", "127.0.0.1", 5070, local), lambda f, why: results.append((f, why)))
        await asyncio.sleep(0.05)
        clock[0] += CONNECT_TIMEOUT - 0.1
        timers.advance_to(clock[0])
        await asyncio.sleep(0.05)
        assert results == []
        clock[0] += 0.1
        timers.advance_to(clock[0])
        await asyncio.sleep(0.05)
        await transports.close()
        return results

    assert _run(run()) == [(None, "timeout")]


def test_the_device_row_says_why_it_is_unreachable() -> None:
    from appliance.state import LiveState
    from tui.model import PbxModel, _device
    from tui.widgets.devices_panel import DevicesPanel

    house = House()
    house.qualifier.start()
    house.advance(0)
    house.connected(None, "refused")
    [binding] = house.registrar.bindings("200")
    state = LiveState(house.registrar, LiveConfig(parse_config(CONFIG, Path("/etc/homepbx/config.toml"))),
                      wall=lambda: WALL0)
    raw = state.device_json(binding)
    assert raw["unreachable_reason"] == "tcp_connect_failed"
    row = DevicesPanel._device(PbxModel(), _device(raw), WALL0 + 10).plain
    assert "unreachable (tcp connect failed)" in row
