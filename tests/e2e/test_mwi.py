"""Message lamps through the real daemon (RFC 3842): two devices of a number subscribe to
its `message-summary` on raw sockets and read each NOTIFY while messages come into the
mailbox and are marked heard and deleted over the control socket."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.sip.message import Request
from appliance.voicemail.mailbox import Mailbox
from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_blf import Watcher
from tests.support.baresip import Baresip
from tests.support.control import ControlConn, control_block
from tests.support.pbx import user_block
from tests.support.ports import rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def summary(new: int, old: int) -> Callable[[Request], bool]:
    waiting = b"yes" if new else b"no"
    return lambda n: (n.body.startswith(b"Messages-Waiting: " + waiting + b"\r\n")
                      and f"Voice-Message: {new}/{old} (0/0)\r\n".encode() in n.body)


def wait_all(watchers: list[Watcher], new: int, old: int) -> None:
    for watcher in watchers:
        notify = watcher.wait_notify(summary(new, old))
        assert notify.get("Event") == "message-summary"
        assert notify.get("Content-Type") == "application/simple-message-summary"
        assert b"Message-Account: sip:100@" in notify.body


def leave_message(root: Path, number: str, caller: str) -> str:
    """A message put in the store as a worker's recording would be (the family's files
    changed by hand take the same path to the lamps)."""
    box = Mailbox(root)
    recording = box.recording_path(number)
    recording.write_bytes(b"RIFF\x24\x00\x00\x00WAVE")
    return box.add(number, recording, caller, "", 3.0, time.time()).id


def test_lamps_light_with_a_new_message_and_go_dark_when_heard_or_deleted(pbx_factory: DaemonFactory) -> None:
    pbx = pbx_factory([user_block("100", name="Anna"), user_block("200", name="Kitchen")], extra=control_block())
    root = pbx.config.parent / "state" / "voicemail"
    phones = [Watcher(pbx.port, "100"), Watcher(pbx.port, "100")]
    other = Watcher(pbx.port, "200")
    control = ControlConn(pbx.config.parent / "ctl.sock")
    try:
        for watcher in [*phones, other]:
            assert watcher.subscribe(watcher.number, "message-summary").status == 200
        wait_all(phones, 0, 0)
        other.wait_notify(summary(0, 0))
        assert control.command("messages", number="100") == {
            "id": 1, "reply": "ok", "number": "100", "new": 0, "old": 0, "messages": []}

        first = leave_message(root, "100", "200")
        wait_all(phones, 1, 0)
        event = control.wait_event("messages_changed")
        assert (event["number"], event["new"], event["old"]) == ("100", 1, 0)
        listed = control.command("messages", number="100")
        assert (listed["new"], listed["old"]) == (1, 0)
        [message] = listed["messages"]
        assert message["id"] == first and message["caller"] == "200" and message["heard"] is False
        assert message["seconds"] == 3.0 and message["file"] == str(root / "100" / f"{first}.wav")

        assert control.command("mark_heard", number="100", message_id=first)["reply"] == "ok"
        wait_all(phones, 0, 1)
        assert control.command("messages", number="100")["messages"][0]["heard"] is True

        second = leave_message(root, "100", "+4930123456")
        wait_all(phones, 1, 1)
        assert control.command("delete_message", number="100", message_id=second)["reply"] == "ok"
        wait_all(phones, 0, 1)
        assert control.command("delete_message", number="100", message_id=first)["reply"] == "ok"
        wait_all(phones, 0, 0)
        assert not list((root / "100").glob("*.wav"))

        # The other number's lamp never moved.
        assert not [n for n in other.notifies if b"Messages-Waiting: yes" in n.body]

        refused = control.command("delete_message", number="100", message_id=first)
        assert (refused["reply"], refused["field"]) == ("error", "message_id")
        refused = control.command("mark_heard", number="100", message_id="../../config")
        assert (refused["reply"], refused["field"]) == ("error", "message_id")
        refused = control.command("messages", number="999")
        assert (refused["reply"], refused["field"]) == ("error", "number")
    finally:
        control.close()
        for watcher in [*phones, other]:
            watcher.close()
    pbx.assert_clean_log()


def test_a_device_subscribing_later_sees_messages_already_waiting(pbx_factory: DaemonFactory) -> None:
    """A message stored while the daemon was down lights the lamp at the first SUBSCRIBE."""
    pbx = pbx_factory([user_block("100")])
    root = pbx.config.parent / "state" / "voicemail"
    leave_message(root, "100", "200")
    leave_message(root, "100", "200")
    phone = Watcher(pbx.port, "100")
    try:
        assert phone.subscribe("100", "message-summary").status == 200
        phone.wait_notify(summary(2, 0), timeout=1.0)
    finally:
        phone.close()
    pbx.assert_clean_log()


class SlowHop:
    """A UDP hop between a phone and the box that holds every datagram `delay` seconds, as a
    slow home network would.

    Debian's baresip 1.0.0 needs it: its mwi module starts a 1-ms timer that re-subscribes
    every entry of a list it appends to, so when registration completes within that
    millisecond (loopback) the phone spins printing "subscribing to messages" and never
    sends a SUBSCRIBE.  Behind this hop registration takes a few round trips of `delay`."""

    def __init__(self, box_port: int, delay: float = 0.05) -> None:
        self.box = ("127.0.0.1", box_port)
        self.delay = delay
        self.phone: tuple[str, int] | None = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        while True:
            try:
                data, source = self.sock.recvfrom(65535)
            except OSError:
                return
            if source == self.box:
                if self.phone is None:
                    continue
                target = self.phone
            else:
                self.phone, target = source, self.box
            threading.Timer(self.delay, self._send, (data, target)).start()

    def _send(self, data: bytes, target: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(data, target)

    def close(self) -> None:
        self.sock.close()


def test_baresip_message_lamp(pbx_factory: DaemonFactory, baresip: Callable[..., Baresip], tmp_path: Path) -> None:
    """Debian's baresip (its mwi module subscribes to its own mailbox after registering)
    prints each message-summary it gets: dark, lit with one new message, dark once heard."""
    pbx = pbx_factory([user_block("100")], extra=control_block())
    root = pbx.config.parent / "state" / "voicemail"
    hop = SlowHop(pbx.port)
    try:
        phone = baresip(tmp_path / "baresip", pbx, "100", "secret", 1000, rtp_range(), mwi=True,
                        registrar=f"127.0.0.1:{hop.port}")
        phone.wait_for("Messages-Waiting: no")
        start = len(phone.output.lines)
        message_id = leave_message(root, "100", "200")
        phone.wait_for("Messages-Waiting: yes", start=start)
        phone.wait_for("Voice-Message: 1/0 (0/0)", start=start)
        start = len(phone.output.lines)
        with ControlConn(pbx.config.parent / "ctl.sock") as control:
            assert control.command("mark_heard", number="100", message_id=message_id)["reply"] == "ok"
        phone.wait_for("Messages-Waiting: no", start=start)
        phone.wait_for("Voice-Message: 0/1 (0/0)", start=start)
    finally:
        hop.close()
    pbx.assert_clean_log()
