"""The whole edge driven by a fake clock: no sockets, no processes, no sleeping.

The components are wired here as the composition root wires them, each with the few
things it uses, with a network that records what would be sent and a timer wheel that
only moves when the test says so. Who arms what (qualify rounds, ring timeouts, CANCELs,
registration expiry) is then checked to the millisecond.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from appliance.config import LiveConfig, parse_config
from appliance.edge.auth_gate import AuthGate
from appliance.edge.calls import CallRouter
from appliance.edge.device_events import DeviceEvents
from appliance.edge.qualify import Qualifier
from appliance.edge.server import Edge
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
[registration]
qualify_interval = 30
qualify_timeout = 5
[[users]]
number = "100"
password = "pw100"
[[users]]
number = "200"
password = "pw200"
ring_timeout = 20
[media]
max_calls = 0
"""
WALL0 = 1_800_000_000.0


class House:
    def __init__(self, network: FakeNetwork | None = None) -> None:
        self.now = 1000.0
        self.settings = LiveConfig(parse_config(CONFIG, Path("/etc/homepbx/config.toml")))
        self.timers = TimerWheel(lambda: self.now, manual=True)
        self.registrar = Registrar(60, 3600, 600)
        throttle = FailureThrottle()
        self.state = LiveState(self.registrar, self.settings, wall=self.wall)
        events = DeviceEvents(lambda: None, self.state.device_event)
        auth = AuthGate(Authenticator("home.arpa", NonceManager(b"k" * 32), throttle), self.settings,
                        self.state.address_blocked, DigestFallback())
        self.network = network or FakeNetwork()
        router = CallRouter(self.settings, self.network, self.registrar, auth, self.state, self.timers, None)
        self.qualifier = Qualifier(self.settings, self.network, self.registrar, self.timers, events.publish)
        self.edge = Edge(self.settings, self.network, auth, self.registrar, throttle, ServerTransactions(), router,
                         self.qualifier, events.publish, clock=lambda: self.now, wall=self.wall)

    def wall(self) -> float:
        return WALL0 + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.timers.advance_to(self.now)

    def receive(self, text: str, flow: Flow) -> list[tuple[Request | Response, Flow]]:
        self.edge.on_message(text.replace("\n", "\r\n").encode(), flow)
        return self.network.take()

    def request(self, method: str, number: str, to: str, flow: Flow, cseq: int, *, call_id: str,
                extra: str = "", body: str = "") -> str:
        return (f"{method} sip:{to}@home.arpa SIP/2.0\n"
                f"Via: SIP/2.0/UDP {flow.host}:{flow.port};branch=z9hG4bK{call_id}{cseq};rport\n"
                f"Max-Forwards: 70\nFrom: <sip:{number}@home.arpa>;tag=f{call_id}\nTo: <sip:{to}@home.arpa>\n"
                f"Call-ID: {call_id}\nCSeq: {cseq} {method}\n"
                f"Contact: <sip:{number}@{flow.host}:{flow.port}>\n{extra}Content-Length: {len(body)}\n\n{body}")

    def authenticated(self, method: str, number: str, password: str, to: str, flow: Flow, call_id: str,
                      extra: str = "") -> list[tuple[Request | Response, Flow]]:
        """Send `method`, answer its challenge; what the edge sent after the answer."""
        [(challenge, _)] = [(m, f) for m, f in self.receive(self.request(method, number, to, flow, 1,
                                                                         call_id=call_id, extra=extra), flow)
                            if isinstance(m, Response) and m.status in (401, 407)]
        assert isinstance(challenge, Response)
        header = "WWW-Authenticate" if challenge.status == 401 else "Proxy-Authenticate"
        reply = "Authorization" if challenge.status == 401 else "Proxy-Authorization"
        uri = f"sip:{to}@home.arpa"
        value = authorization_value(challenge.get_all(header)[-1], username=number, password=password,
                                    method=method, uri=uri, cnonce="c0ffee")
        return self.receive(self.request(method, number, to, flow, 2, call_id=call_id,
                                         extra=f"{extra}{reply}: {value}\n"), flow)


PHONE_100 = Flow("udp", "192.0.2.10", 5062, "127.0.0.1:5060")
PHONE_200 = Flow("udp", "192.0.2.20", 5062, "127.0.0.1:5060")


def statuses(sent: list[tuple[Request | Response, Flow]]) -> list[int]:
    return [m.status for m, _ in sent if isinstance(m, Response)]


def requests(sent: list[tuple[Request | Response, Flow]], method: str) -> list[tuple[Request, Flow]]:
    return [(m, f) for m, f in sent if isinstance(m, Request) and m.method == method]


def test_qualify_rounds_and_timeouts_run_on_the_fake_clock() -> None:
    house = House()
    assert statuses(house.authenticated("REGISTER", "200", "pw200", "200", PHONE_200, "reg200")) == [200]
    house.qualifier.start()  # the first round is due now
    house.advance(0)
    [(options, dest)] = requests(house.network.take(), "OPTIONS")
    assert dest == PHONE_200
    house.advance(4.9)  # UDP: retransmitted at 0.5, 1.5 and 3.5 s (T1 doubling), same transaction
    again = requests(house.network.take(), "OPTIONS")
    assert len(again) == 3 and {m.get("Via") for m, _ in again} == {options.get("Via")}
    [binding] = house.registrar.bindings("200")
    assert binding.reachable
    house.advance(0.1)  # qualify_timeout = 5 s: a miss
    [binding] = house.registrar.bindings("200")
    assert not binding.reachable
    house.advance(24.9)
    assert requests(house.network.take(), "OPTIONS") == []
    house.advance(0.1)  # 30 s: the next round
    [(second, dest)] = requests(house.network.take(), "OPTIONS")
    assert dest == PHONE_200 and second.get("Via") != options.get("Via")


def test_an_unanswered_call_is_cancelled_at_the_ring_timeout() -> None:
    house = House()
    assert statuses(house.authenticated("REGISTER", "200", "pw200", "200", PHONE_200, "reg200")) == [200]
    sent = house.authenticated("INVITE", "100", "pw100", "200", PHONE_100, "call1",
                               extra="Content-Type: application/sdp\n")
    [(invite, dest)] = requests(sent, "INVITE")
    assert dest == PHONE_200 and invite.get("P-Asserted-Identity") == '"100" <sip:100@home.arpa>'
    assert house.state.calls  # the live state saw the call start
    ringing = (f"SIP/2.0 180 Ringing\nVia: {invite.get('Via')}\nFrom: {invite.get('From')}\n"
               f"To: {invite.get('To')};tag=dev\nCall-ID: {invite.call_id}\nCSeq: {invite.get('CSeq')}\n"
               "Content-Length: 0\n\n")
    assert statuses(house.receive(ringing, PHONE_200)) == [180]  # relayed to the caller
    house.advance(19.9)
    assert requests(house.network.take(), "CANCEL") == []
    house.advance(0.1)  # ring_timeout = 20 s
    [(cancel, dest)] = requests(house.network.take(), "CANCEL")
    assert dest == PHONE_200 and cancel.call_id == invite.call_id


def test_registrations_expire_by_the_wall_clock_given() -> None:
    house = House()
    extra = "Expires: 60\n"
    sent = house.authenticated("REGISTER", "200", "pw200", "200", PHONE_200, "reg200", extra=extra)
    assert statuses(sent) == [200]
    now = house.wall()
    assert house.registrar.expire(now + 59) == []
    assert [e.binding.number for e in house.registrar.expire(now + 61)] == ["200"]


class TwoNetworks(FakeNetwork):
    """A wildcard listener on a box with two networks: 192.0.2.1 and 10.0.0.1."""

    addresses: ClassVar[list[str]] = ["0.0.0.0:5060"]

    def local_address(self, flow: Flow) -> tuple[str, int]:
        return ("10.0.0.1" if flow.host.startswith("10.") else "192.0.2.1"), 5060


def test_record_route_is_doubled_when_the_parties_reach_the_box_at_different_addresses() -> None:
    """RFC 5658: each side of the dialog gets the box's address it can reach."""
    house = House(TwoNetworks())
    far_200 = Flow("udp", "10.0.0.20", 5062, "0.0.0.0:5060")
    assert statuses(house.authenticated("REGISTER", "200", "pw200", "200", far_200, "reg200")) == [200]
    sent = house.authenticated("INVITE", "100", "pw100", "200", Flow("udp", "192.0.2.10", 5062, "0.0.0.0:5060"),
                               "call1")
    [(invite, _)] = requests(sent, "INVITE")
    assert invite.get_all("Record-Route") == ["<sip:10.0.0.1:5060;lr>", "<sip:192.0.2.1:5060;lr>"]
    near = Flow("udp", "192.0.2.10", 5062, "0.0.0.0:5060")
    assert statuses(house.authenticated("REGISTER", "100", "pw100", "100", near, "reg100")) == [200]
    sent = house.authenticated("INVITE", "200", "pw200", "100", Flow("udp", "10.0.0.21", 5062, "0.0.0.0:5060"),
                               "call3")
    [(invite, _)] = requests(sent, "INVITE")
    assert invite.get_all("Record-Route") == ["<sip:192.0.2.1:5060;lr>", "<sip:10.0.0.1:5060;lr>"]
    sent = house.authenticated("INVITE", "100", "pw100", "100", Flow("udp", "192.0.2.11", 5062, "0.0.0.0:5060"),
                               "call4")
    [(invite, _)] = requests(sent, "INVITE")
    assert invite.get_all("Record-Route") == ["<sip:192.0.2.1:5060;lr>"]  # one network: one entry


def test_in_dialog_requests_go_the_other_way_by_the_from_tag_however_the_from_is_written() -> None:
    """The caller's From as in its INVITE, or respelled with the same tag, goes to the
    callee; the callee's requests (its own tag in From) go to the caller."""
    house = House()
    assert statuses(house.authenticated("REGISTER", "200", "pw200", "200", PHONE_200, "reg200")) == [200]
    [(invite, _)] = requests(house.authenticated("INVITE", "100", "pw100", "200", PHONE_100, "dir1",
                                                 extra="Content-Type: application/sdp\n"), "INVITE")
    ok = (f"SIP/2.0 200 OK\nVia: {invite.get('Via')}\nRecord-Route: {invite.get('Record-Route')}\n"
          f"From: {invite.get('From')}\nTo: {invite.get('To')};tag=dev\nCall-ID: dir1\n"
          f"CSeq: {invite.get('CSeq')}\nContact: <sip:200@{PHONE_200.host}:{PHONE_200.port}>\nContent-Length: 0\n\n")
    assert statuses(house.receive(ok, PHONE_200)) == [200]

    def in_dialog(method: str, cseq: int, from_value: str, to_value: str, flow: Flow) -> list[Flow]:
        text = (f"{method} sip:x@{flow.host} SIP/2.0\nVia: SIP/2.0/UDP {flow.host}:{flow.port};"
                f"branch=z9hG4bK{method}{cseq}{flow.port}\nMax-Forwards: 70\nRoute: <sip:127.0.0.1:5060;lr>\n"
                f"From: {from_value}\nTo: {to_value}\nCall-ID: dir1\nCSeq: {cseq} {method}\nContent-Length: 0\n\n")
        return [dest for _, dest in requests(house.receive(text, flow), method)]

    caller, callee = "<sip:100@home.arpa>;tag=fdir1", "<sip:200@home.arpa>;tag=dev"
    assert in_dialog("INFO", 3, caller, callee, PHONE_100) == [PHONE_200]  # as in the INVITE
    assert in_dialog("INFO", 4, '"Kitchen" <sip:100@home.arpa> ; tag=fdir1', callee, PHONE_100) == [PHONE_200]
    assert in_dialog("INFO", 1, callee, caller, PHONE_200) == [PHONE_100]  # the callee's
