"""A trunk's `external_address`: what the box names itself to that provider (SDP, Via,
Record-Route) when it sits behind a router that forwards the SIP and RTP ports to it.

The call router is wired as the daemon wires it, with a provider recognised by its
address (a fake `TrunkLookup`), a media worker that is there at once (a fake
`MediaAnchor`) and a network that records what would be sent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from appliance.config import LiveConfig, parse_config
from appliance.edge.auth_gate import AuthGate
from appliance.edge.calls import CallRouter
from appliance.edge.timers import TimerWheel
from appliance.sip.auth import NonceManager
from appliance.sip.authenticator import Authenticator
from appliance.sip.digest_fallback import DigestFallback
from appliance.sip.message import Request, Response, parse_message
from appliance.sip.registrar import DevicePolicy, Flow, Registrar
from appliance.sip.sdp import addresses
from appliance.sip.throttle import FailureThrottle
from appliance.state import LiveState
from tests.support.fake_network import FakeNetwork

EXTERNAL = "203.0.113.5"
LAN = "192.168.1.2"
PROVIDER = Flow("udp", "198.51.100.7", 5060, "0.0.0.0:5060")
WORKER_PORT = 48000
WORKER = Flow("udp", "127.0.0.1", WORKER_PORT, "0.0.0.0:5060")
PHONE = Flow("udp", "192.168.1.30", 5062, "0.0.0.0:5060")
CONFIG = """
[server]
listen = ["0.0.0.0:5060"]
[[users]]
number = "200"
password = "pw200"
[[trunks]]
name = "provider"
server = "198.51.100.7"
username = "4930123456"
password = "pw"
incoming = {{ "4930123456" = "200" }}
{external}
"""
PROVIDER_SDP = "v=0\no=- 1 1 IN IP4 198.51.100.7\ns=-\nc=IN IP4 198.51.100.7\nt=0 0\nm=audio 30000 RTP/AVP 8\n"
WORKER_SDP = ("v=0\no=- 2 2 IN IP4 127.0.0.1\ns=pjmedia\nc=IN IP4 127.0.0.1\nt=0 0\n"
              "m=audio 10002 RTP/AVP 8\na=rtcp:10003 IN IP4 127.0.0.1\n")


class WildcardNetwork(FakeNetwork):
    """A wildcard listener: the box is 192.168.1.2 to everyone outside, 127.0.0.1 to itself."""

    addresses: ClassVar[list[str]] = ["0.0.0.0:5060"]

    def local_address(self, flow: Flow) -> tuple[str, int]:
        return ("127.0.0.1" if flow.host.startswith("127.") else LAN), 5060

    def local_ips(self) -> set[str]:
        return {"127.0.0.1", LAN}

    def connect(self, flow: Flow, then: Callable[[Flow | None, str], None]) -> None:
        raise AssertionError("no TCP here")


class Trunks:
    def trunk_at(self, flow: Flow) -> str | None:
        return "provider" if (flow.host, flow.port) == (PROVIDER.host, PROVIDER.port) else None

    def provider_flow(self, name: str) -> Flow | None:
        return PROVIDER


class Media:
    edge_address = "127.0.0.1:5060"
    available = True

    def is_worker(self, flow: Flow) -> bool:
        return flow.host == "127.0.0.1" and flow.port == WORKER_PORT

    def anchor(self, token: str, then: Callable[[int | None], None]) -> None:
        then(WORKER_PORT)

    def call_over(self, token: str) -> None:
        pass


def message(text: str) -> Request | Response:
    head, _, body = text.partition("\n\n")
    body = body.replace("\n", "\r\n")
    return parse_message((head.replace("\n", "\r\n") + f"\r\nContent-Length: {len(body)}\r\n\r\n"
                          + body).encode())


def router(external: str) -> tuple[CallRouter, WildcardNetwork]:
    now = 1000.0
    config = parse_config(CONFIG.format(external=external), Path("/etc/homepbx/config.toml"))
    settings = LiveConfig(config)
    timers = TimerWheel(lambda: now, manual=True)
    registrar = Registrar(60, 3600, 600)
    register = message("REGISTER sip:home.arpa SIP/2.0\nVia: SIP/2.0/UDP 192.168.1.30:5062;branch=z9hG4bKr1\n"
                       "From: <sip:200@home.arpa>;tag=r\nTo: <sip:200@home.arpa>\nCall-ID: reg-1\n"
                       "CSeq: 1 REGISTER\nContact: <sip:200@192.168.1.30:5062>\n\n")
    assert isinstance(register, Request)
    registrar.register(register, "200", DevicePolicy(limit=3, one_number=True), PHONE, now)
    auth = AuthGate(Authenticator("home.arpa", NonceManager(b"k" * 32), FailureThrottle()), settings,
                    lambda *a: None, DigestFallback())
    network = WildcardNetwork()
    calls = CallRouter(settings, network, registrar, auth, LiveState(registrar, settings, wall=lambda: now),
                       timers, Media(), Trunks())
    return calls, network


def provider_call(calls: CallRouter, network: WildcardNetwork) -> Response:
    """The provider's INVITE for the DID, the worker's 200: what the provider is sent."""
    invite = message(
        "INVITE sip:4930123456@192.168.1.2 SIP/2.0\n"
        "Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKprov1;rport=5060;received=198.51.100.7\n"
        "Max-Forwards: 70\nFrom: <sip:4930999999@198.51.100.7>;tag=p1\nTo: <sip:4930123456@198.51.100.7>\n"
        "Call-ID: prov-call-1\nCSeq: 1 INVITE\nContact: <sip:4930999999@198.51.100.7:5060>\n"
        "Content-Type: application/sdp\n\n" + PROVIDER_SDP)
    assert isinstance(invite, Request)
    assert calls.on_request(invite, PROVIDER, PROVIDER, 1000.0)
    [(to_worker, dest)] = [(m, f) for m, f in network.take() if isinstance(m, Request)]
    assert dest == WORKER and to_worker.method == "INVITE"
    lines = ["SIP/2.0 200 OK", *(f"Via: {v}" for v in to_worker.get_all("Via")),
             *(f"Record-Route: {v}" for v in to_worker.get_all("Record-Route")),
             f"From: {to_worker.get('From')}", f"To: {to_worker.get('To')};tag=w1",
             f"Call-ID: {to_worker.call_id}", "CSeq: 1 INVITE", f"Contact: <sip:media@127.0.0.1:{WORKER_PORT}>",
             "Content-Type: application/sdp"]
    ok = message("\n".join(lines) + "\n\n" + WORKER_SDP)
    assert isinstance(ok, Response)
    assert calls.on_response(ok, WORKER, 1000.1)
    [(answer, dest)] = [(m, f) for m, f in network.take() if isinstance(m, Response) and m.status == 200]
    assert dest == PROVIDER and isinstance(answer, Response)
    return answer


def test_the_provider_is_told_the_external_address_in_sdp_and_record_route() -> None:
    calls, network = router(f'external_address = "{EXTERNAL}"')
    answer = provider_call(calls, network)
    assert addresses(answer.body) == [EXTERNAL, EXTERNAL, EXTERNAL]  # o=, c=, a=rtcp:
    assert b"m=audio 10002 " in answer.body  # the port as the worker chose it (the router forwards it)
    assert f"<sip:{EXTERNAL}:5060;lr>" in ", ".join(answer.get_all("Record-Route"))
    assert LAN not in ", ".join(answer.get_all("Record-Route"))

    # An in-dialog request from the worker to the provider (a re-INVITE): Via and SDP name it too.
    reinvite = message(
        f"INVITE sip:4930999999@198.51.100.7:5060 SIP/2.0\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{WORKER_PORT};branch=z9hG4bKw2;rport={WORKER_PORT};received=127.0.0.1\n"
        "Route: <sip:127.0.0.1:5060;lr>\nMax-Forwards: 70\n"
        f"From: {answer.get('To')}\nTo: {answer.get('From')}\nCall-ID: {answer.call_id}\nCSeq: 2 INVITE\n"
        "Content-Type: application/sdp\n\n" + WORKER_SDP)
    assert isinstance(reinvite, Request)
    calls.relay.forward(reinvite, PROVIDER, WORKER, 1001.0, WORKER)
    [(sent, dest)] = network.take()
    assert dest == PROVIDER and isinstance(sent, Request)
    assert (sent.get("Via") or "").startswith(f"SIP/2.0/UDP {EXTERNAL}:5060;")
    assert addresses(sent.body) == [EXTERNAL, EXTERNAL, EXTERNAL]


def test_without_it_the_provider_is_told_the_address_it_reaches() -> None:
    calls, network = router("")
    answer = provider_call(calls, network)
    assert addresses(answer.body) == [LAN, LAN, LAN]
    assert f"<sip:{LAN}:5060;lr>" in ", ".join(answer.get_all("Record-Route"))
