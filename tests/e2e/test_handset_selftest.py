"""The test handset tested on its own: no PBX, handsets call each other directly.

If these fail, every end-to-end test built on the handset is suspect, so they
prove the tool itself: calls in both transports, audio both ways (measured
with the Goertzel helpers), the wire trace, Reason headers on CANCEL/BYE,
registration events and clean process handling.
"""

from __future__ import annotations

import math
import os
import re
import socket
import struct
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.simulator import tones
from appliance.simulator.handset import Handset, HandsetGone, handsets

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(30)]

COMPLETED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'


def peer_uri(callee: Handset, user: str = "b") -> str:
    suffix = ";transport=tcp" if callee.transport == "tcp" else ""
    return f"sip:{user}@127.0.0.1:{callee.port}{suffix}"


def connect(a: Handset, b: Handset) -> tuple[str, str]:
    """A calls B, B answers; returns both call ids once audio flows."""
    b.auto_answer("answer")
    call_a = a.call(peer_uri(b))
    call_b = str(b.wait_incoming()["call"])
    a.wait_state(call_a, "CONFIRMED")
    b.wait_state(call_b, "CONFIRMED")
    a.wait_for("media", call=call_a, status="active")
    b.wait_for("media", call=call_b, status="active")
    return call_a, call_b


def assert_gone(phone: Handset, code: int = 0) -> None:
    assert phone.returncode == code, phone.events[-5:]
    with pytest.raises(ProcessLookupError):
        os.kill(phone.pid, 0)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[Handset]]:
    with handsets(2, names=["a", "b"], log_dir=tmp_path) as phones:
        yield phones


def test_audio_flows_both_ways(tmp_path: Path) -> None:
    with handsets(2, names=["a", "b"], log_dir=tmp_path) as (a, b):
        call_a, call_b = connect(a, b)
        a.play_tone(call_a, 440)
        b.play_tone(call_b, 1000)
        a.record(call_a, tmp_path / "a.wav")
        b.record(call_b, tmp_path / "b.wav")
        time.sleep(2.0)
        rec_a = a.stop_media(call_a)
        rec_b = b.stop_media(call_b)
        assert rec_a["complete"] and rec_b["complete"]
        a.hangup(call_a)
        assert a.wait_state(call_a, "DISCONNECTED")["last_status"] == 200
        assert b.wait_state(call_b, "DISCONNECTED")["end_request"] == "BYE"

    # B hears A's 440 Hz, not its own 1000 Hz; A the other way round. "Heard" is -8 dB, as in
    # every call test: the two handsets' bridges run on two clocks, and a single 10-ms frame
    # slip between them (about one run in twenty on a loaded box) costs a 2-s Goertzel up to
    # ~5 dB of coherent power although the tone is plainly there (a CI run measured -5.2).
    heard_by_b = tones.load_wav(str(rec_b["path"]))
    heard_by_a = tones.load_wav(str(rec_a["path"]))
    assert heard_by_b.duration > 1.2
    assert tones.tone_level_db(heard_by_b, 440) > -8
    assert tones.tone_level_db(heard_by_b, 1000) < -30
    assert tones.tone_level_db(heard_by_a, 1000) > -8
    assert tones.tone_level_db(heard_by_a, 440) < -30
    assert [f for f, _ in tones.dominant_tones(heard_by_b)] == [440.0]
    for phone in (a, b):
        assert_gone(phone)
        assert phone.events_of("bye")


def test_tcp_call_with_dtmf_and_bye_reason(tmp_path: Path) -> None:
    with handsets(2, names=["a", "b"], log_dir=tmp_path, transport="tcp") as (a, b):
        assert a.transport == b.transport == "tcp"
        call_a = a.call(peer_uri(b), headers={"X-Homepbx-Test": "tcp"})
        incoming = b.wait_incoming()
        call_b = str(incoming["call"])
        assert incoming["request_uri"] == peer_uri(b)
        assert incoming["headers"]["X-Homepbx-Test"] == "tcp"
        assert "TCP" in str(incoming["headers"]["Via"])
        a.wait_state(call_a, "EARLY")  # auto_answer defaults to ringing
        b.answer(call_b, 200)
        a.wait_state(call_a, "CONFIRMED")
        a.wait_for("media", call=call_a, status="active")
        b.wait_for("media", call=call_b, status="active")
        a.dtmf(call_a, "19#")
        assert [b.wait_for("dtmf", call=call_b)["digit"] for _ in range(3)] == ["1", "9", "#"]
        b.hangup(call_b, headers={"Reason": "Q.850;cause=16"})
        ended = a.wait_state(call_a, "DISCONNECTED")
        assert ended["end_request"] == "BYE"
        assert ended["reason_header"] == "Q.850;cause=16"
    assert_gone(a)
    assert_gone(b)


def test_trace_shows_the_wire(tmp_path: Path) -> None:
    a = Handset(name="a", trace=True, log_path=tmp_path / "a.log")
    b = Handset(name="b", log_path=tmp_path / "b.log")
    with a, b:
        call_a, _ = connect(a, b)
        a.hangup(call_a)
        a.wait_state(call_a, "DISCONNECTED")
        tx_invite = a.sip_messages("tx", contains="INVITE sip:")
        assert tx_invite and tx_invite[0].startswith(f"INVITE {peer_uri(b)} SIP/2.0\r\n")
        assert "m=audio" in tx_invite[0]
        assert any(m.startswith("SIP/2.0 200 OK") for m in a.sip_messages("rx"))
        assert "Content-Length:" in a.wait_sip("tx", "BYE ")
        assert not b.events_of("sip")  # only with trace


def test_cancel_carries_reason_to_the_callee(tmp_path: Path) -> None:
    """The shape of "answered elsewhere": CANCEL with a Reason header, seen
    on the wire (trace) and as reason_header by the receiver."""
    with handsets(2, names=["a", "b"], log_dir=tmp_path, trace=True) as (a, b):
        call_a = a.call(peer_uri(b))
        call_b = str(b.wait_incoming()["call"])
        a.wait_state(call_a, "EARLY")
        a.hangup(call_a, headers={"Reason": COMPLETED_ELSEWHERE})
        assert a.wait_state(call_a, "DISCONNECTED")["last_status"] == 487
        ended = b.wait_state(call_b, "DISCONNECTED")
        assert ended["end_request"] == "CANCEL"
        assert ended["reason_header"] == COMPLETED_ELSEWHERE
        cancel = b.wait_for("call_request", call=call_b, method="CANCEL")
        assert cancel["headers"]["Reason"] == COMPLETED_ELSEWHERE
        line = f"\r\nReason: {COMPLETED_ELSEWHERE}\r\n"
        assert line in a.wait_sip("tx", "CANCEL ")
        assert line in b.wait_sip("rx", "CANCEL ")


def test_reject_and_robustness(pair: list[Handset]) -> None:
    a, b = pair
    b.auto_answer("reject", code=486, reason="Busy Here Today")
    call_a = a.call(peer_uri(b))
    ended = a.wait_state(call_a, "DISCONNECTED")
    assert (ended["last_status"], ended["last_reason"]) == (486, "Busy Here Today")
    # Bad input is reported, never fatal.
    a.send("no_such_command")
    assert a.wait_for("error", cmd="no_such_command")
    a.send("hangup", call="c99")
    assert "c99" in str(a.wait_for("error", cmd="hangup")["message"])
    assert a.proc.stdin is not None
    a.proc.stdin.write(b"{not json\n")
    a.proc.stdin.flush()
    assert a.wait_for("error", cmd="?")
    a.ping()
    # A vanished handset: waits fail fast instead of hanging.
    b.kill()
    assert b.returncode == -9
    with pytest.raises(HandsetGone):
        b.wait_for("pong", timeout=5)
    b.close()  # idempotent after kill


def test_quit_during_a_call_hangs_up_and_exits(pair: list[Handset], tmp_path: Path) -> None:
    a, b = pair
    call_a, call_b = connect(a, b)
    a.record(call_a, tmp_path / "cut.wav")
    time.sleep(0.3)
    started = time.monotonic()
    a.close()
    assert time.monotonic() - started < 3
    assert_gone(a)
    assert a.events_of("recorded", call=call_a)[0]["complete"] is True
    assert b.wait_state(call_b, "DISCONNECTED")["end_request"] == "BYE"


class StubRegistrar:
    """Just enough registrar to exercise the handset: digest challenge, then
    200 echoing the Contact; users named "bad*" get a 403 with a custom phrase."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            text = data.decode()
            self.requests.append(text)
            hdr: dict[str, str] = {}
            for line in text.split("\r\n\r\n")[0].split("\r\n")[1:]:
                name, _, value = line.partition(":")
                hdr.setdefault(name.strip().lower(), value.strip())
            if "bad" in hdr["to"]:
                status, extra = "403 Forbidden (test phrase)", ""
            elif "authorization" not in hdr:
                status, extra = (
                    "401 Unauthorized",
                    'WWW-Authenticate: Digest realm="home.arpa", nonce="n1"\r\n',
                )
            else:
                expires = re.search(r"\d+", hdr.get("expires", "300"))
                contact = f"{hdr['contact']};expires={expires.group(0) if expires else 300}"
                status, extra = "200 OK", f"Contact: {contact}\r\n"
            reply = (
                f"SIP/2.0 {status}\r\nVia: {hdr['via']}\r\nFrom: {hdr['from']}\r\n"
                f"To: {hdr['to']};tag=stub\r\nCall-ID: {hdr['call-id']}\r\nCSeq: {hdr['cseq']}\r\n"
                f"{extra}Content-Length: 0\r\n\r\n"
            )
            self.sock.sendto(reply.encode(), addr)


def test_registration_events(tmp_path: Path) -> None:
    stub = StubRegistrar()
    try:
        with Handset(name="r", log_path=tmp_path / "r.log") as phone:
            registrar = f"sip:127.0.0.1:{stub.port}"
            ok = phone.register(registrar, "200", "pw", expires=120, instance="urn:uuid:0-1")
            assert (ok["code"], ok["expires"], ok["active"]) == (200, 120, True)
            assert ok["contacts"] == [
                f'<sip:200@127.0.0.1:{phone.port}>;+sip.instance="<urn:uuid:0-1>";expires=120'
            ]
            assert 'Authorization: Digest username="200"' in stub.requests[-1]
            gone = phone.unregister()
            assert (gone["code"], gone["expires"], gone["active"]) == (200, 0, False)
            refused = phone.register(registrar, "bad", "pw")
            assert (refused["code"], refused["reason"]) == (403, "Forbidden (test phrase)")
    finally:
        stub.close()


def test_tone_helpers_on_synthetic_audio(tmp_path: Path) -> None:
    path = tmp_path / "mix.wav"
    rate = 8000
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        frames = (
            int(8000 * math.sin(2 * math.pi * 425 * i / rate) + 800 * math.sin(2 * math.pi * 1000 * i / rate))
            for i in range(rate)
        )
        out.writeframes(b"".join(struct.pack("<h", s) for s in frames))
    assert tones.tone_level_db(path, 425) == pytest.approx(0, abs=0.2)
    assert tones.tone_level_db(path, 1000) == pytest.approx(-20, abs=0.5)
    assert tones.tone_level_db(path, 480) < -40
    assert [f for f, _ in tones.dominant_tones(path, min_db=-25)] == [425.0, 1000.0]
    envelope = tones.tone_envelope(path, 425, window=0.25)
    assert len(envelope) == 4 and all(-16 < db < -14 for db in envelope)
