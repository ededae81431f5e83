"""The busy lamps' edge side on a fake clock: expiry, NOTIFY retransmissions and timeout,
the caps, and the router's events turned into NOTIFYs (no sockets, no sleeping)."""

from __future__ import annotations

from pathlib import Path

from appliance.config import LiveConfig, parse_config
from appliance.edge.auth_gate import AuthGate
from appliance.edge.calls import CallRouter
from appliance.edge.device_events import DeviceEvents
from appliance.edge.qualify import Qualifier
from appliance.edge.seams import CallEventsFanOut
from appliance.edge.server import Edge
from appliance.edge.subscriptions import Subscriptions
from appliance.edge.timers import TimerWheel
from appliance.sip.auth import NonceManager, authorization_value
from appliance.sip.authenticator import Authenticator
from appliance.sip.digest_fallback import DigestFallback
from appliance.sip.message import Request, Response
from appliance.sip.registrar import Flow, Registrar
from appliance.sip.throttle import FailureThrottle
from appliance.sip.transaction import ServerTransactions
from appliance.state import LiveState
from tests.support.fake_network import FakeNetwork

CONFIG = """
[server]
listen = ["127.0.0.1:5060"]
[[users]]
number = "100"
password = "pw100"
[[users]]
number = "200"
password = "pw200"
[[users]]
number = "300"
password = "pw300"
[media]
max_calls = 0
"""
KID = Flow("udp", "192.0.2.30", 5062, "127.0.0.1:5060")


class House:
    def __init__(self, max_per_device: int = 100) -> None:
        self.now = 1000.0
        self.settings = LiveConfig(parse_config(CONFIG, Path("/etc/homepbx/config.toml")))
        self.timers = TimerWheel(lambda: self.now, manual=True)
        self.registrar = Registrar(60, 3600, 600)
        throttle = FailureThrottle()
        self.state = LiveState(self.registrar, self.settings, wall=lambda: self.now)
        events = DeviceEvents(lambda: None, self.state.device_event)
        auth = AuthGate(Authenticator("home.arpa", NonceManager(b"k" * 32), throttle), self.settings,
                        self.state.address_blocked, DigestFallback())
        self.network = FakeNetwork()
        self.lamps = Subscriptions(self.settings, self.network, auth, self.registrar, self.timers,
                                   max_per_device=max_per_device)
        router = CallRouter(self.settings, self.network, self.registrar, auth,
                            CallEventsFanOut(self.state, self.lamps), self.timers, None)
        qualifier = Qualifier(self.settings, self.network, self.registrar, self.timers, events.publish)
        self.edge = Edge(self.settings, self.network, auth, self.registrar, throttle, ServerTransactions(), router,
                         qualifier, events.publish, clock=lambda: self.now, wall=lambda: self.now,
                         subscriptions=self.lamps)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.timers.advance_to(self.now)

    def receive(self, text: str, flow: Flow) -> list[tuple[Request | Response, Flow]]:
        self.edge.on_message(text.replace("\n", "\r\n").encode(), flow)
        self.timers.advance_to(self.now)  # what the loop runs right after (the first NOTIFY)
        return self.network.take()

    def subscribe(self, resource: str, call_id: str, *, event: str = "dialog", expires: int = 600,
                  flow: Flow = KID) -> list[tuple[Request | Response, Flow]]:
        def text(cseq: int, extra: str = "") -> str:
            return (f"SUBSCRIBE sip:{resource}@home.arpa SIP/2.0\n"
                    f"Via: SIP/2.0/UDP {flow.host}:{flow.port};branch=z9hG4bK{call_id}{cseq};rport\n"
                    f"Max-Forwards: 70\nFrom: <sip:300@home.arpa>;tag=f{call_id}\nTo: <sip:{resource}@home.arpa>\n"
                    f"Call-ID: {call_id}\nCSeq: {cseq} SUBSCRIBE\nContact: <sip:300@{flow.host}:{flow.port}>\n"
                    f"Event: {event}\nExpires: {expires}\n{extra}Content-Length: 0\n\n")
        [challenge] = [m for m, _ in self.receive(text(1), flow) if isinstance(m, Response)]
        assert isinstance(challenge, Response) and challenge.status == 407
        value = authorization_value(challenge.get_all("Proxy-Authenticate")[-1], username="300", password="pw300",
                                    method="SUBSCRIBE", uri=f"sip:{resource}@home.arpa", cnonce="c0ffee")
        return self.receive(text(2, f"Proxy-Authorization: {value}\n"), flow)

    def answer(self, notify: Request, status: int, flow: Flow = KID) -> None:
        head = "".join(f"{k}: {notify.get(k)}\n" for k in ("Via", "From", "To", "Call-ID", "CSeq"))
        self.receive(f"SIP/2.0 {status} X\n{head}Content-Length: 0\n\n", flow)


def notifies(sent: list[tuple[Request | Response, Flow]]) -> list[Request]:
    return [m for m, _ in sent if isinstance(m, Request) and m.method == "NOTIFY"]


def test_expiry_sends_a_last_notify_and_nothing_after() -> None:
    house = House()
    sent = house.subscribe("200", "s1", expires=60)
    assert [m.status for m, _ in sent if isinstance(m, Response)] == [200]
    [first] = notifies(sent)
    house.answer(first, 200)
    house.advance(59.9)
    assert notifies(house.network.take()) == []
    house.advance(0.1)
    [last] = notifies(house.network.take())
    assert last.get("Subscription-State") == "terminated;reason=timeout"
    house.answer(last, 200)
    house.lamps.call_started("t1", "100", "200", "d1")
    house.lamps.device_ringing("t1", "d2")
    assert notifies(house.network.take()) == [] and len(house.lamps) == 0


def test_an_unanswered_notify_is_retransmitted_then_ends_the_subscription() -> None:
    house = House()
    [first] = notifies(house.subscribe("200", "s2"))
    house.advance(4.0)
    again = notifies(house.network.take())
    assert len(again) == 3 and {n.get("CSeq") for n in again} == {first.get("CSeq")}  # 0.5, 1.5, 3.5 s
    house.advance(28.0)  # Timer F: 32 s
    house.network.take()
    assert len(house.lamps) == 0
    house.lamps.call_started("t1", "100", "200", "d1")
    house.lamps.device_ringing("t1", "d2")
    assert notifies(house.network.take()) == []


def test_call_events_become_notifies_only_on_change() -> None:
    house = House()
    [first] = notifies(house.subscribe("200", "s3"))
    house.answer(first, 200)
    house.lamps.call_started("t1", "100", "200", "d1")
    assert notifies(house.network.take()) == []  # 200 is not ringing yet
    house.lamps.device_ringing("t1", "d7")
    house.lamps.device_ringing("t1", "d8")  # still just ringing: no second NOTIFY
    [ringing] = notifies(house.network.take())
    assert b"<state>early</state>" in ringing.body and b'version="1"' in ringing.body
    house.lamps.call_answered("t1", None)
    [talking] = notifies(house.network.take())
    assert b"<state>confirmed</state>" in talking.body
    house.lamps.call_ended("t1", "bye_from_caller")
    [ended] = notifies(house.network.take())
    assert b"<state>terminated</state>" in ended.body and b'version="3"' in ended.body


def test_subscriptions_are_capped_per_device() -> None:
    house = House(max_per_device=2)
    assert notifies(house.subscribe("100", "c1"))
    assert notifies(house.subscribe("200", "c2"))
    sent = house.subscribe("300", "c3")
    assert [m.status for m, _ in sent if isinstance(m, Response)] == [503] and not notifies(sent)
    other = Flow("udp", "192.0.2.31", 5062, "127.0.0.1:5060")
    assert notifies(house.subscribe("300", "c4", flow=other))  # another device has room


def test_a_notify_that_cannot_be_sent_ends_the_subscription() -> None:
    house = House()
    [first] = notifies(house.subscribe("200", "s5"))
    house.answer(first, 200)
    house.network.flow_open = lambda flow: False  # type: ignore[method-assign]  # its TCP connection closed
    house.lamps.call_started("t1", "100", "200", "d1")
    house.lamps.device_ringing("t1", "d2")
    assert len(notifies(house.network.take())) == 1 and len(house.lamps) == 0
    house.lamps.call_answered("t1", None)
    assert notifies(house.network.take()) == []
