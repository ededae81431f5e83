"""A stranger cannot make the box reflect a response to an address of their choosing.

Responses to statelessly relayed requests carry our branch prefix; a forged one with that
prefix and a second Via naming some victim must go nowhere, and a flood of them (or of
malformed packets) must cost the log a line or two, never a traceback per packet.
"""

from __future__ import annotations

import socket
import time

import pytest

from appliance.edge.relay import STATELESS_PREFIX
from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import user_block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(30)]

FORGED = (
    "SIP/2.0 200 OK\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:{pbx_port};branch=" + STATELESS_PREFIX + "{branch}\r\n"
    "Via: SIP/2.0/UDP {victim};branch=z9hG4bKvictim;rport\r\n"
    "From: <sip:100@home.arpa>;tag=a\r\n"
    "To: <sip:200@home.arpa>;tag=b\r\n"
    "Call-ID: forged-{branch}\r\n"
    "CSeq: 1 BYE\r\n"
    "Content-Length: 0\r\n\r\n"
)


@pytest.fixture
def pbx(pbx_factory: DaemonFactory):  # type: ignore[no-untyped-def]
    return pbx_factory([user_block("200")])


def _sender() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_forged_response_is_not_reflected_to_the_second_via(pbx) -> None:  # type: ignore[no-untyped-def]
    victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    victim.bind(("127.0.0.55", 0))
    victim.settimeout(1.0)
    victim_port = victim.getsockname()[1]
    sender = _sender()
    for branch in ("0123456789abcdef0123", "deadbeefdeadbeefdead"):
        data = FORGED.format(pbx_port=pbx.port, branch=branch, victim=f"127.0.0.55:{victim_port}")
        sender.sendto(data.encode(), ("127.0.0.1", pbx.port))
    with pytest.raises(TimeoutError):
        victim.recv(65535)
    assert pbx.alive()
    victim.close()
    sender.close()


def test_flood_of_forged_and_malformed_packets_costs_a_few_log_lines(pbx) -> None:  # type: ignore[no-untyped-def]
    sender = _sender()
    start = len(pbx.lines)
    for i in range(200):
        host = "relay-victim.invalid:5999" if i % 2 else "\u00fcber.invalid:5999"
        data = FORGED.format(pbx_port=pbx.port, branch=f"{i:020d}", victim=host)
        sender.sendto(data.encode(), ("127.0.0.1", pbx.port))
    good = (b"OPTIONS sip:home.arpa SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKm;rport\r\n"
            b"From: <sip:200@home.arpa>;tag=m\r\nTo: <sip:200@home.arpa>\r\nCall-ID: ok\r\n"
            b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    malformed = good.replace(b"Call-ID: ok\r\n", b"")  # 400 Missing Call-ID, answered every time
    sender.settimeout(3.0)
    for _ in range(200):
        sender.sendto(malformed, ("127.0.0.1", pbx.port))
        assert sender.recv(65535).startswith(b"SIP/2.0 400 ")
    # Still serving, and every packet was read before we look at the log.
    sender.sendto(good, ("127.0.0.1", pbx.port))
    assert sender.recv(65535).startswith(b"SIP/2.0 200 ")
    time.sleep(0.2)
    lines = pbx.lines[start:]
    assert not any("Traceback" in line for line in lines)
    assert len([line for line in lines if "relay" in line]) <= 2, lines
    assert len([line for line in lines if "event=malformed" in line]) <= 2, lines
    assert len([line for line in lines if "WARNING" in line or "ERROR" in line]) <= 4, lines
    sender.close()
