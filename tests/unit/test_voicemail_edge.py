"""The answering machine's edge side (appliance/edge/voicemail.py) on a fake clock: a
worker's recording moved into the store with the caller's name, the lamps told only when
the counts change, files changed by hand noticed by the watch, path tricks refused."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.config import LiveConfig, parse_config
from appliance.edge.timers import TimerWheel
from appliance.edge.voicemail import WATCH_INTERVAL, Voicemail
from appliance.voicemail.mailbox import Mailbox

CONFIG = """
[server]
listen = ["127.0.0.1:5060"]
[[users]]
number = "100"
password = "pw100"
[[users]]
number = "200"
name = "Kitchen"
password = "pw200"
"""


class Lamps:
    def __init__(self) -> None:
        self.changed: list[str] = []

    def mailbox_changed(self, number: str) -> None:
        self.changed.append(number)


class Box:
    def __init__(self, root: Path) -> None:
        self.now = 1000.0
        self.timers = TimerWheel(lambda: self.now, manual=True)
        self.lamps = Lamps()
        self.events: list[dict[str, Any]] = []
        self.mailbox = Mailbox(root)
        settings = LiveConfig(parse_config(CONFIG, Path("/etc/homepbx/config.toml")))
        self.vm = Voicemail(settings, self.mailbox, self.timers, self.lamps, publish=self.events.append,
                            wall=lambda: 1_780_000_000.0)

    def tick(self) -> None:
        self.now += WATCH_INTERVAL
        self.timers.advance_to(self.now)


async def settle(vm: Voicemail) -> None:
    while vm._tasks:
        await asyncio.gather(*vm._tasks)


def test_a_recording_becomes_a_message_and_lights_the_lamp(tmp_path: Path) -> None:
    async def main() -> None:
        box = Box(tmp_path)
        assert box.vm.counts("100") == (0, 0)
        recording = box.mailbox.recording_path("100")
        recording.write_bytes(b"RIFF")
        box.vm.voicemail_recorded("tok1", "100", "200", str(recording), 4.2)
        await settle(box.vm)
        [message] = box.mailbox.messages("100")
        assert (message.caller, message.caller_name, message.seconds) == ("200", "Kitchen", 4.2)
        assert message.received == 1_780_000_000.0 and not recording.exists()
        assert box.vm.counts("100") == (1, 0)
        assert box.lamps.changed == ["100"]
        assert box.events == [{"event": "messages_changed", "number": "100", "new": 1, "old": 0}]
        # The worker's menu reports a change that left the counts alone (a greeting): no NOTIFY.
        box.vm.mailbox_changed("100")
        assert box.lamps.changed == ["100"]
        assert await box.vm.mark_heard("100", message.id)
        assert box.vm.counts("100") == (0, 1) and box.lamps.changed == ["100", "100"]
        assert not await box.vm.delete("100", "20260101-000000-abcdef")
        assert await box.vm.delete("100", message.id)
        assert box.vm.counts("100") == (0, 0) and box.lamps.changed == ["100", "100", "100"]
        assert not await box.vm.mark_heard("100", "../x")

    asyncio.run(main())


def test_files_changed_by_hand_are_noticed_by_the_watch(tmp_path: Path) -> None:
    async def main() -> None:
        box = Box(tmp_path)
        box.vm.start()
        assert box.vm.counts("100") == (0, 0)  # asked by a lamp: now watched
        box.tick()
        assert box.lamps.changed == []
        recording = box.mailbox.recording_path("100")
        recording.write_bytes(b"RIFF")
        message = box.mailbox.add("100", recording, "200", "", 1, 1.0)
        box.tick()
        assert box.lamps.changed == ["100"] and box.vm.counts("100") == (1, 0)
        box.tick()
        assert box.lamps.changed == ["100"]  # nothing new
        for path in (tmp_path / "100").glob(f"{message.id}.*"):
            os.unlink(path)  # rm over SSH
        box.tick()
        assert box.lamps.changed == ["100", "100"] and box.vm.counts("100") == (0, 0)
        await box.vm.stop()

    asyncio.run(main())


@pytest.mark.parametrize("path", ["/etc/passwd", "{root}/100/tmp/../../200/x.wav", "{root}/200/tmp/rec.wav",
                                  "{root}/100/tmp/missing.wav"])
def test_a_recording_outside_the_mailbox_is_refused(tmp_path: Path, path: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        box = Box(tmp_path)
        (tmp_path / "200" / "tmp").mkdir(parents=True)
        (tmp_path / "200" / "tmp" / "rec.wav").write_bytes(b"RIFF")
        box.mailbox.recording_path("100")
        with caplog.at_level(logging.ERROR):
            box.vm.voicemail_recorded("tok", "100", "200", path.format(root=tmp_path), 1.0)
            box.vm.voicemail_recorded("tok", "../100", "200", str(box.mailbox.recording_path("100")), 1.0)
        await settle(box.vm)
        assert box.mailbox.messages("100") == [] and box.lamps.changed == []
        assert [r.getMessage().split()[0] for r in caplog.records] == ["event=voicemail_refused"] * 2
        assert (tmp_path / "200" / "tmp" / "rec.wav").exists()

    asyncio.run(main())
