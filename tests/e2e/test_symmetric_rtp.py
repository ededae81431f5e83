"""Symmetric RTP towards the provider: the media worker sends its audio back to where the
provider's audio comes from, not only where the provider's SDP said (a provider, or the
family's own router, whose NAT sends from another port than the one it announced).

The "provider" here is a raw socket: a trunk with `register = false` whose server is that
socket's address, so its INVITE is the provider's (recognised by address, not challenged,
routed by the DID). Its SDP announces RTP port X; it then sends RTP from another socket Y.
pjmedia's UDP transport (as the worker uses it, no PJMEDIA_UDP_NO_SRC_ADDR_CHECKING)
switches its remote address to the packets' source after a few of them
(PJMEDIA_RTP_NAT_PROBATION_CNT).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable

import pytest

from appliance.simulator.handset import Handset
from appliance.sip.message import Response, parse_message
from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import user_block
from tests.support.rawsip import RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

DID = "4930123456"
OUTSIDE = "4930999999"
PACKET = 0.02  # 20 ms of PCMA


def rtp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def received(sock: socket.socket) -> list[tuple[bytes, tuple[str, int]]]:
    """Every datagram waiting on `sock`, with its source."""
    got = []
    while select.select([sock], [], [], 0)[0]:
        data, source = sock.recvfrom(2048)
        got.append((data, source))
    return got


def rtp(seq: int, ssrc: int = 0x1234ABCD) -> bytes:
    return struct.pack("!BBHII", 0x80, 8, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc) + b"\xd5" * 160


def media_port(answer: Response) -> int:
    for line in answer.body.decode().splitlines():
        if line.startswith("m=audio "):
            return int(line.split()[1])
    raise AssertionError(f"no m=audio in {answer.body!r}")


def in_dialog(provider: RawClient, method: str, cseq: int, answer: Response, from_value: str) -> bytes:
    """An ACK or BYE of the provider's dialog: to the answer's Contact, along its Record-Route."""
    contact = (answer.get("Contact") or "").split("<", 1)[1].split(">", 1)[0]
    routes = [r.strip() for value in reversed(answer.get_all("Record-Route")) for r in value.split(",")[::-1]]
    lines = [f"{method} {contact} SIP/2.0",
             f"Via: SIP/2.0/UDP 127.0.0.1:{provider.port};branch=z9hG4bK{os.urandom(6).hex()};rport",
             "Max-Forwards: 70", *(f"Route: {r}" for r in routes), f"From: {from_value}",
             f"To: {answer.get('To')}", f"Call-ID: {answer.call_id}", f"CSeq: {cseq} {method}",
             "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


def test_rtp_goes_back_to_where_the_providers_rtp_comes_from(
        pbx_factory: DaemonFactory, handset_factory: Callable[..., Handset]) -> None:
    provider = RawClient(0)
    announced, actual = rtp_socket(), rtp_socket()  # X in the SDP, Y where RTP comes from
    x_port = announced.getsockname()[1]
    trunk = ('[[trunks]]\nname = "provider"\n'
             f'server = "127.0.0.1:{provider.port}"\nusername = "{DID}"\npassword = "pw"\nregister = false\n'
             f'incoming = {{ "{DID}" = "200" }}\n\n')
    pbx = pbx_factory([user_block("200")], extra=trunk)
    provider.server = ("127.0.0.1", pbx.port)
    pbx.wait_log(r"event=trunk_not_registering trunk=provider")
    phone = handset_factory("b0")
    assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
    phone.auto_answer("answer", 200)

    sdp = (f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           f"m=audio {x_port} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\na=sendrecv\r\n").encode()
    invite = provider.request(
        "INVITE", f"sip:{DID}@127.0.0.1:{pbx.port}", OUTSIDE, to_number=DID, body=sdp,
        headers=[("Contact", f"<sip:{OUTSIDE}@127.0.0.1:{provider.port}>"), ("Content-Type", "application/sdp")])
    provider.send(invite)
    answer = provider.final()
    assert answer.status == 200, answer
    from_value = next(v for n, v in parse_message(invite).headers if n == "From")
    provider.send(in_dialog(provider, "ACK", 1, answer, from_value))
    worker_rtp = ("127.0.0.1", media_port(answer))

    # Before the provider sends anything, the worker's RTP goes where the SDP said: X.
    time.sleep(1.0)
    assert len(received(announced)) > 10
    assert received(actual) == []

    # The provider's RTP comes from Y: the worker's follows it there.
    deadline = time.monotonic() + 2.0
    seq = 0
    while time.monotonic() < deadline:
        actual.sendto(rtp(seq), worker_rtp)
        seq += 1
        time.sleep(PACKET)
    received(announced)
    received(actual)
    for _ in range(50):  # one more second: where does the worker send now?
        actual.sendto(rtp(seq), worker_rtp)
        seq += 1
        time.sleep(PACKET)
    at_y, at_x = received(actual), received(announced)
    assert len(at_y) > 25, (len(at_y), len(at_x))
    assert {source for _, source in at_y} == {worker_rtp}
    assert at_x == []

    provider.send(in_dialog(provider, "BYE", 2, answer, from_value))
    assert provider.final().status == 200
    for sock in (announced, actual):
        sock.close()
    provider.close()
