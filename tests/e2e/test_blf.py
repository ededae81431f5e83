"""Busy lamps through the real daemon: a raw-socket subscriber (a BLF key, a presence
watcher, a voicemail lamp) watches a number while pjsua2 handsets call it, and reads what
each NOTIFY says: idle, ringing (early), talking (confirmed), then terminated."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.simulator.handset import Handset
from appliance.sip.auth import authorization_value
from appliance.sip.message import Request, Response, parse_message
from tests.e2e.conftest import DaemonFactory
from tests.support.baresip import Baresip
from tests.support.pbx import Daemon, user_block
from tests.support.ports import rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

HandsetFactory = Callable[..., Handset]


class Watcher:
    """A subscriber on a raw UDP socket: SUBSCRIBEs (with the 407 round trip), and answers
    each NOTIFY 200 (or as told), keeping them in order."""

    def __init__(self, pbx_port: int, number: str, password: str = "secret") -> None:
        self.server = ("127.0.0.1", pbx_port)
        self.number = number
        self.password = password
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.call_id = os.urandom(8).hex()
        self.tag = os.urandom(4).hex()
        self.cseq = 0
        self.to_tag: str | None = None
        self.notifies: list[Request] = []
        self.responses: list[Response] = []
        self.notify_status = 200

    def close(self) -> None:
        self.sock.close()

    def _send_subscribe(self, resource: str, event: str, expires: int, extra: list[tuple[str, str]]) -> None:
        self.cseq += 1
        to_tag = f";tag={self.to_tag}" if self.to_tag else ""
        lines = [
            f"SUBSCRIBE sip:{resource}@home.arpa SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK{os.urandom(6).hex()};rport",
            "Max-Forwards: 70",
            f"From: <sip:{self.number}@home.arpa>;tag={self.tag}",
            f"To: <sip:{resource}@home.arpa>{to_tag}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} SUBSCRIBE",
            f"Contact: <sip:{self.number}@127.0.0.1:{self.port}>",
            f"Event: {event}",
            f"Expires: {expires}",
            *[f"{k}: {v}" for k, v in extra],
            "Content-Length: 0", "", "",
        ]
        self.sock.sendto("\r\n".join(lines).encode(), self.server)

    def subscribe(self, resource: str, event: str = "dialog", expires: int = 600, *,
                  authenticate: bool = True) -> Response:
        """SUBSCRIBE (answering the challenge when `authenticate`); the final response."""
        self._send_subscribe(resource, event, expires, [])
        first = self.final()
        if first.status != 407 or not authenticate:
            return first
        challenge = first.get("Proxy-Authenticate") or ""
        auth = authorization_value(challenge, username=self.number, password=self.password, method="SUBSCRIBE",
                                   uri=f"sip:{resource}@home.arpa", cnonce=os.urandom(4).hex())
        self._send_subscribe(resource, event, expires, [("Proxy-Authorization", auth)])
        final = self.final()
        if final.status == 200:
            self.to_tag = re.search(r";tag=([^;>\s]+)", final.get("To") or "").group(1)  # type: ignore[union-attr]
        return final

    def refresh(self, resource: str, event: str, expires: int) -> Response:
        self._send_subscribe(resource, event, expires, [])
        return self.final()

    def pump(self, until: float) -> None:
        while time.monotonic() < until:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            message = parse_message(data)
            if isinstance(message, Response):
                self.responses.append(message)
                return
            self.notifies.append(message)
            reply = (f"SIP/2.0 {self.notify_status} {'OK' if self.notify_status == 200 else 'Nope'}\r\n"
                     + "".join(f"{k}: {message.get(k)}\r\n" for k in ("Via", "From", "To", "Call-ID", "CSeq"))
                     + "Content-Length: 0\r\n\r\n")
            self.sock.sendto(reply.encode(), self.server)
            return

    def final(self, timeout: float = 3.0) -> Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while self.responses:
                response = self.responses.pop(0)
                if response.status >= 200:
                    return response
            self.pump(deadline)
        raise TimeoutError("no final response")

    def wait_notify(self, predicate: Callable[[Request], bool], timeout: float = 5.0) -> Request:
        """The first NOTIFY (seen or still to come) that matches; earlier ones are consumed."""
        deadline = time.monotonic() + timeout
        while True:
            while self.notifies:
                notify = self.notifies.pop(0)
                if predicate(notify):
                    return notify
            if time.monotonic() >= deadline:
                raise TimeoutError("no matching NOTIFY")
            self.pump(deadline)


def dialog_states(notify: Request) -> list[str]:
    return re.findall(r"<state>(\w+)</state>", notify.body.decode())


def has_state(state: str) -> Callable[[Request], bool]:
    return lambda n: state in dialog_states(n)


def house(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> tuple[Daemon, Handset, Handset]:
    pbx = pbx_factory([user_block("100"), user_block("200"), user_block("300")])
    caller, callee = handset_factory("caller"), handset_factory("callee")
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
    assert callee.register(pbx.registrar, "200", "secret")["code"] == 200
    return pbx, caller, callee


def test_dialog_lamp_sees_idle_ringing_talking_and_the_end(pbx_factory: DaemonFactory,
                                                          handset_factory: HandsetFactory) -> None:
    pbx, caller, callee = house(pbx_factory, handset_factory)
    watcher = Watcher(pbx.port, "300")
    try:
        ok = watcher.subscribe("200", "dialog")
        assert ok.status == 200, ok
        assert 60 <= int(ok.get("Expires") or 0) <= 600
        first = watcher.wait_notify(lambda n: True)
        assert first.get("Event") == "dialog"
        assert first.get("Content-Type") == "application/dialog-info+xml"
        assert (first.get("Subscription-State") or "").startswith("active;expires=")
        body = first.body.decode()
        assert 'version="0"' in body and 'entity="sip:200@home.arpa"' in body
        assert dialog_states(first) == []  # idle

        call = caller.call("sip:200@home.arpa")
        incoming = str(callee.wait_incoming()["call"])
        ringing = watcher.wait_notify(has_state("early"))
        text = ringing.body.decode()
        assert 'direction="recipient"' in text and "sip:100@home.arpa" in text
        token = re.search(r'call-id="([^"]+)"', text).group(1)  # type: ignore[union-attr]
        assert pbx.log_matches(f"event=call_started call={token} ")

        callee.answer(incoming, 200)
        caller.wait_state(call, "CONFIRMED")
        talking = watcher.wait_notify(has_state("confirmed"))
        assert dialog_states(talking) == ["confirmed"]

        caller.hangup(call)
        callee.wait_state(incoming, "DISCONNECTED")
        ended = watcher.wait_notify(has_state("terminated"))
        assert dialog_states(ended) == ["terminated"]
        versions = [int(re.search(r'version="(\d+)"', n.body.decode()).group(1))  # type: ignore[union-attr]
                    for n in (first, ringing, talking, ended)]
        assert versions == sorted(versions) and len(set(versions)) == 4
        cseqs = [int((n.get("CSeq") or "0").split()[0]) for n in (first, ringing, talking, ended)]
        assert cseqs == sorted(cseqs) and len(set(cseqs)) == 4

        # Unsubscribe: 200, a last NOTIFY saying terminated, nothing after it.
        assert watcher.refresh("200", "dialog", 0).status == 200
        last = watcher.wait_notify(lambda n: True)
        assert (last.get("Subscription-State") or "").startswith("terminated")
        again = caller.call("sip:200@home.arpa")
        callee.wait_incoming(call=lambda c: c != incoming)
        with pytest.raises(TimeoutError):
            watcher.wait_notify(lambda n: True, timeout=1.0)
        caller.hangup(again)
    finally:
        watcher.close()
    pbx.assert_clean_log()


def test_the_caller_is_shown_busy(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, caller, callee = house(pbx_factory, handset_factory)
    watcher = Watcher(pbx.port, "300")
    try:
        assert watcher.subscribe("100", "dialog").status == 200
        watcher.wait_notify(lambda n: True)
        call = caller.call("sip:200@home.arpa")
        callee.wait_incoming()
        busy = watcher.wait_notify(has_state("confirmed"))
        assert 'direction="initiator"' in busy.body.decode()  # calling out: busy, not ringing
        caller.hangup(call)
        watcher.wait_notify(has_state("terminated"))
    finally:
        watcher.close()


def test_presence_says_ringing_then_on_the_phone(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, caller, callee = house(pbx_factory, handset_factory)
    watcher = Watcher(pbx.port, "300")
    try:
        assert watcher.subscribe("200", "presence").status == 200
        first = watcher.wait_notify(lambda n: True)
        assert first.get("Content-Type") == "application/pidf+xml"
        assert "<basic>open</basic>" in first.body.decode()
        call = caller.call("sip:200@home.arpa")
        incoming = str(callee.wait_incoming()["call"])
        ringing = watcher.wait_notify(lambda n: b"Ringing" in n.body)
        assert b"<basic>open</basic>" in ringing.body
        callee.answer(incoming, 200)
        talking = watcher.wait_notify(lambda n: b"On the phone" in n.body)
        assert b"<basic>open</basic>" in talking.body and b"<rpid:on-the-phone/>" in talking.body
        caller.hangup(call)
        idle = watcher.wait_notify(lambda n: b"On the phone" not in n.body)
        assert b"<basic>open</basic>" in idle.body and b"Ringing" not in idle.body
    finally:
        watcher.close()
    nobody = Watcher(pbx.port, "300")  # 300 has no registered device: closed
    try:
        assert nobody.subscribe("300", "presence").status == 200
        offline = nobody.wait_notify(lambda n: True)
        assert b"<basic>closed</basic>" in offline.body
    finally:
        nobody.close()


def test_message_summary_gets_messages_waiting_no(pbx_factory: DaemonFactory) -> None:
    pbx = pbx_factory([user_block("100"), user_block("200")])
    watcher = Watcher(pbx.port, "100")
    try:
        assert watcher.subscribe("100", "message-summary").status == 200
        notify = watcher.wait_notify(lambda n: True)
        assert notify.get("Content-Type") == "application/simple-message-summary"
        assert notify.body.startswith(b"Messages-Waiting: no\r\n")
        other = Watcher(pbx.port, "100")
        try:
            assert other.subscribe("200", "message-summary").status == 403  # not its own mailbox
            assert other.subscribe("*97", "message-summary").status == 200  # a voicemail code: its own
        finally:
            other.close()
    finally:
        watcher.close()
    pbx.assert_clean_log()


def test_subscribe_refusals(pbx_factory: DaemonFactory) -> None:
    pbx = pbx_factory([user_block("100"), user_block("200")])
    watcher = Watcher(pbx.port, "100")
    try:
        challenged = watcher.subscribe("200", "dialog", authenticate=False)
        assert challenged.status in (401, 407)  # never answered without credentials
        assert not watcher.notifies
        assert watcher.subscribe("200", "conference").status == 489  # unknown package
        brief = watcher.subscribe("200", "dialog", expires=5)
        assert brief.status == 423 and brief.get("Min-Expires") == "60"
        assert watcher.subscribe("999", "dialog").status == 404
        wrong = Watcher(pbx.port, "100", password="wrong")
        try:
            assert wrong.subscribe("200", "dialog").status in (401, 403, 407)
        finally:
            wrong.close()
    finally:
        watcher.close()
    pbx.allow_errors("auth_failed")


def test_a_refused_notify_ends_the_subscription(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, caller, callee = house(pbx_factory, handset_factory)
    watcher = Watcher(pbx.port, "300")
    try:
        assert watcher.subscribe("200", "dialog").status == 200
        watcher.wait_notify(lambda n: True)
        watcher.notify_status = 481  # the handset forgot the subscription
        call = caller.call("sip:200@home.arpa")
        callee.wait_incoming()
        watcher.wait_notify(has_state("early"))
        pbx.wait_log("event=subscription_ended .*reason=notify_481")
        caller.hangup(call)
        with pytest.raises(TimeoutError):
            watcher.wait_notify(lambda n: True, timeout=1.0)
        assert watcher.refresh("200", "dialog", 600).status == 481
    finally:
        watcher.close()



def test_baresip_presence_watcher_sees_busy_and_back(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                                     baresip: Callable[..., Baresip], tmp_path: Path) -> None:
    """Debian's baresip (presence module, a contact with presence=p2p) subscribes to 200
    and shows it Busy during a call (RPID on-the-phone), Online again after it. (Its
    `/contacts` listing is not flushed to a pipe reliably: the status-change lines are.)"""
    pbx, caller, callee = house(pbx_factory, handset_factory)
    phone = baresip(tmp_path / "baresip", pbx, "300", "secret", 1000, rtp_range(), watch=("200",))
    pbx.wait_log("event=subscribed number=300 resource=200 event=presence", timeout=10)
    start = len(phone.output.lines)
    call = caller.call("sip:200@home.arpa")
    incoming = str(callee.wait_incoming()["call"])
    callee.answer(incoming, 200)
    caller.wait_state(call, "CONFIRMED")
    busy = phone.output.wait_for(r"<sip:200@.*changed status from .* to .*Busy", 5.0, start)
    caller.hangup(call)
    phone.output.wait_for(r"<sip:200@.*changed status from .*Busy.* to .*Online", 5.0,
                          phone.output.lines.index(busy))
    pbx.assert_clean_log()
