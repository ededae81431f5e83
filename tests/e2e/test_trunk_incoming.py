"""Calls from the provider ring the family: Kamailio on 127.0.0.2 is the provider (registrar
and proxy with digest auth for its own users); the box registers to it as the family's DID,
and an "outside phone" registered at Kamailio calls that DID."""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.support.baresip import Baresip
from tests.support.control import ControlConn, control_block
from tests.support.kamailio import DID, HOST, OUTSIDE, OUTSIDE_PASSWORD, PASSWORD, Kamailio, available
from tests.support.pbx import Daemon, user_block
from tests.support.ports import rtp_range
from tests.support.rawsip import RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180),
              pytest.mark.skipif(not available(), reason="Debian's kamailio package is not installed")]

HandsetFactory = Callable[..., Handset]
COMPLETED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'
HEARD = -8.0
SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 4000 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n")


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Kamailio]:
    kamailio = Kamailio(tmp_path / "kamailio", {DID: PASSWORD, OUTSIDE: OUTSIDE_PASSWORD}).start()
    yield kamailio
    kamailio.stop()


def family(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, provider: Kamailio, *,
           incoming: str = f'"{DID}" = "200"', devices: int = 3,
           trunk_extra: str = "", server_extra: str = "") -> tuple[Daemon, list[Handset], Handset]:
    """The box registered at the provider, 200's handsets at the box, the outside phone at the provider."""
    trunk = ("[[trunks]]\nname = \"provider\"\n"
             f'server = "{provider.server}"\nusername = "{DID}"\npassword = "{PASSWORD}"\n'
             f"incoming = {{ {incoming} }}\n" + trunk_extra + "\n")
    pbx = pbx_factory([user_block("100"), user_block("200", one_number=True)], extra=control_block() + trunk,
                      server_extra=server_extra)
    phones = []
    for i in range(devices):
        phone = handset_factory(f"b{i}", trace=True)
        assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
        phones.append(phone)
    pbx.wait_log(r"event=trunk_registered trunk=provider")
    outside = handset_factory("outside", trace=True, codecs=["PCMA/8000"])
    reg = outside.register(f"sip:{provider.server}", OUTSIDE, OUTSIDE_PASSWORD, domain=provider.server)
    assert reg["code"] == 200, reg
    return pbx, phones, outside


def dial_did(outside: Handset, provider: Kamailio) -> str:
    return outside.call(f"sip:{DID}@{provider.server}")


def test_outside_call_rings_every_device_answered_elsewhere_audio(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, provider: Kamailio, tmp_path: Path) -> None:
    pbx, phones, outside = family(pbx_factory, handset_factory, provider)
    control = ControlConn(pbx.config.parent / "ctl.sock")
    call = dial_did(outside, provider)
    incoming = [str(p.wait_incoming(timeout=5)["call"]) for p in phones]
    for phone, cid in zip(phones, incoming, strict=True):
        phone.wait_state(cid, "EARLY")
    started = control.wait_event("call_started")["call"]
    assert (started["caller"], started["callee"], started["caller_device"]) == (OUTSIDE, "200", None)
    pbx.wait_log(rf"event=trunk_call number={OUTSIDE} did={DID} trunk=provider")
    # The outside number on the handsets' displays.
    invite = phones[0].wait_sip("rx", "INVITE ")
    head = invite.split("\r\n\r\n", 1)[0]
    from_line = next(line for line in head.split("\r\n") if line.startswith(("From:", "f:")))
    assert f'"{OUTSIDE}"' in from_line and f"sip:{OUTSIDE}@" in from_line
    assert f"P-Asserted-Identity: \"{OUTSIDE}\" <sip:{OUTSIDE}@" in head
    assert "X-Homepbx" not in invite

    phones[1].answer(incoming[1], 200)
    outside.wait_state(call, "CONFIRMED")
    for i in (0, 2):
        ended = phones[i].wait_state(incoming[i], "DISCONNECTED")
        assert ended["end_request"] == "CANCEL"
        assert ended["reason_header"] == COMPLETED_ELSEWHERE
    answered = control.wait_event("call_answered")["call"]
    assert answered["caller"] == OUTSIDE
    # The media worker answers the provider with the codec it offered (PCMA).
    ok = str(outside.wait_for("sip", dir="rx", msg=lambda m: str(m).startswith("SIP/2.0 200")
                              and "m=audio" in str(m))["msg"])
    assert "PCMA/8000" in ok and "PCMU" not in ok

    # Audio both ways between the outside phone and the handset that answered.
    outside.wait_for("media", call=call, status="active")
    phones[1].wait_for("media", call=incoming[1], status="active")
    heard = {}
    for phone, cid, freq in ((outside, call, 440), (phones[1], incoming[1], 1000)):
        phone.play_tone(cid, freq)
        phone.record(cid, tmp_path / f"{phone.name}.wav")
    time.sleep(2.0)
    heard[440] = str(outside.stop_media(call)["path"])
    heard[1000] = str(phones[1].stop_media(incoming[1])["path"])
    assert tones.tone_level_db(heard[440], 1000) > HEARD  # the outside caller hears the family
    assert tones.tone_level_db(heard[1000], 440) > HEARD  # and the family the outside caller

    # A *74 join works on an outside call as on any other.
    join = phones[0].call("sip:*74@home.arpa")
    phones[0].wait_state(join, "CONFIRMED")
    control.wait_event("call_joined")
    outside.hangup(call)
    phones[1].wait_state(incoming[1], "DISCONNECTED")
    phones[0].wait_state(join, "DISCONNECTED")
    ended = control.wait_event("call_ended")["call"]
    assert ended["caller"] == OUTSIDE
    control.close()
    assert provider.count("INVITE") == 1


def test_unknown_did_is_404_and_a_stranger_is_challenged(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, provider: Kamailio) -> None:
    # The box's account number routes nowhere (no "*"): the provider's call gets 404.
    pbx, phones, outside = family(pbx_factory, handset_factory, provider, incoming='"4930123450" = "200"', devices=1)
    call = dial_did(outside, provider)
    assert outside.wait_state(call, "DISCONNECTED")["last_status"] == 404
    pbx.wait_log(rf"event=trunk_call_refused number={OUTSIDE} did={DID} trunk=provider status=404")
    # The same INVITE for the DID from an address that is not the provider's: challenged, not routed,
    # whatever it claims to be.
    stranger = RawClient(pbx.port, user_agent="kamailio-test-provider")
    stranger.send(stranger.request(
        "INVITE", f"sip:4930123450@127.0.0.1:{pbx.port}", OUTSIDE, to_number="4930123450", body=SDP,
        headers=[("Contact", f"<sip:{OUTSIDE}@127.0.0.1:{stranger.port}>"), ("Content-Type", "application/sdp"),
                 ("P-Asserted-Identity", f"<sip:{OUTSIDE}@{HOST}>")]))
    assert stranger.final().status == 407
    stranger.close()
    # From the provider's host but another port: not the address the box resolved, challenged too.
    neighbour = RawClient(pbx.port)
    neighbour.sock.close()
    neighbour.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    neighbour.sock.settimeout(3.0)
    neighbour.sock.bind((HOST, 0))
    neighbour.port = int(neighbour.sock.getsockname()[1])
    neighbour.send(neighbour.request(
        "INVITE", f"sip:4930123450@127.0.0.1:{pbx.port}", OUTSIDE, to_number="4930123450", body=SDP,
        headers=[("Contact", f"<sip:{OUTSIDE}@{HOST}:{neighbour.port}>"), ("Content-Type", "application/sdp")]))
    assert neighbour.final().status == 407
    neighbour.close()
    time.sleep(0.5)
    assert not phones[0].events_of("incoming_call")
    assert not pbx.log_matches("event=trunk_call ")


def test_outside_call_setup_time(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                 provider: Kamailio) -> None:
    """The provider's INVITE reaching the box (call_started) to every device ringing (the
    third device_ringing), over 20 calls, as the live state reports them."""
    pbx, phones, outside = family(pbx_factory, handset_factory, provider)
    control = ControlConn(pbx.config.parent / "ctl.sock")
    setups = []
    for _ in range(20):
        call = dial_did(outside, provider)
        start = control.wait_event("call_started")["call"]["started_at"]  # the box's wall clock
        for _ in phones:
            control.wait_event("device_ringing")
        setups.append(time.time() - start)
        incoming = [str(p.wait_incoming(timeout=5)["call"]) for p in phones]
        outside.hangup(call)
        for phone, cid in zip(phones, incoming, strict=True):
            phone.wait_state(cid, "DISCONNECTED")
        outside.wait_state(call, "DISCONNECTED")
        control.wait_event("call_ended")
        time.sleep(0.15)  # a worker rests 0.6 s after a call: 8 of them, not all used up at once
    control.close()
    ms = sorted(s * 1000 for s in setups)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    print(f"\noutside call setup (provider INVITE at the box -> 3 devices ringing), {len(ms)} calls: "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    assert p50 < 500


def test_provider_over_tcp_registers_calls_in_and_out_on_its_connection(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, provider: Kamailio) -> None:
    """`transport = "tcp"`: the box connects to the provider and registers over that
    connection (Contact ;transport=tcp); the provider's call to the DID comes back over it
    and rings the family; a call out goes over it too; CRLF pings keep it up, and the box
    does not reap it however quiet it is (the idle timeout is 1 s here)."""
    pbx, (phone,), outside = family(pbx_factory, handset_factory, provider, devices=1,
                                    trunk_extra='transport = "tcp"\nkeepalive_interval = 1\n',
                                    server_extra="tcp_idle_timeout = 1\n")
    assert "proto=tcp" in provider.log() and "proto=udp contact=<sip:" + DID not in provider.log()
    (contact,) = [c for c in provider.contacts() if c.startswith(f"sip:{DID}@")]
    assert contact.endswith(";transport=tcp") and contact.startswith(f"sip:{DID}@127.0.0.1:"), contact
    pbx.wait_log(r"event=tcp_connected peer=127\.0\.0\.2:")

    call = dial_did(outside, provider)
    rung = str(phone.wait_incoming(timeout=5)["call"])
    pbx.wait_log(rf"event=trunk_call number={OUTSIDE} did={DID} trunk=provider")
    phone.answer(rung, 200)
    outside.wait_state(call, "CONFIRMED")
    phone.wait_state(rung, "CONFIRMED")
    time.sleep(3.0)  # no SIP for a while, only pings: the connection, the call and the registration stay
    outside.hangup(call)
    phone.wait_state(rung, "DISCONNECTED")

    out = phone.call(f"sip:0{OUTSIDE}@home.arpa")
    incoming = str(outside.wait_incoming(timeout=5)["call"])
    assert f"PROVIDER INVITE from {DID} to {OUTSIDE} proto=tcp" in provider.log()
    outside.answer(incoming, 200)
    phone.wait_state(out, "CONFIRMED")
    phone.hangup(out)
    outside.wait_state(incoming, "DISCONNECTED")
    assert provider.count("OPTIONS") == 0  # the keep-alives were CRLF pings on the connection
    assert [c for c in provider.contacts() if c.startswith(f"sip:{DID}@")] == [contact]  # one connection
    assert not pbx.log_matches("event=trunk_connection_lost")


def test_baresip_at_the_provider_calls_the_family_and_is_heard(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, provider: Kamailio,
        baresip: Callable[..., Baresip], tmp_path: Path) -> None:
    """The outside phone is software nobody here wrote: baresip registered at Kamailio dials
    the family's number; 200's handsets ring, one answers, each side hears the other."""
    pbx, phones, _ = family(pbx_factory, handset_factory, provider, devices=2)
    outside = baresip(tmp_path / "outside", pbx, OUTSIDE, OUTSIDE_PASSWORD, 440, rtp_range(),
                      registrar=provider.server)
    outside.wait_for("registered successfully")
    outside.command(f"d sip:{DID}@{provider.server}")
    incoming = [str(p.wait_incoming(timeout=10)["call"]) for p in phones]
    phones[0].answer(incoming[0], 200)
    outside.wait_for("Call established")
    assert phones[1].wait_state(incoming[1], "DISCONNECTED")["reason_header"] == COMPLETED_ELSEWHERE
    phones[0].wait_for("media", call=incoming[0], status="active")
    phones[0].play_tone(incoming[0], 1000)
    phones[0].record(incoming[0], tmp_path / "family.wav")
    time.sleep(2.0)
    heard = str(phones[0].stop_media(incoming[0])["path"])
    outside.command("b")  # hang up
    phones[0].wait_state(incoming[0], "DISCONNECTED")
    outside.stop()
    assert tones.tone_level_db(heard, 440) > HEARD  # the family hears the outside caller
    assert tones.tone_level_db(outside.heard(), 1000) > HEARD  # and the outside caller the family
    pbx.wait_log(rf"event=trunk_call number={OUTSIDE} did={DID} trunk=provider")
