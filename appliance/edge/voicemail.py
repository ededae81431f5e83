"""The answering machine's edge side: messages into the store, and the message lamps.

A media worker records a message and the media link tells `voicemail_recorded`: the
recording is moved into the number's mailbox (`appliance.voicemail.mailbox`, off the
event loop: it fsyncs) with the caller's name from the config, and the number's message
lamps are updated. A worker's mailbox menu (heard, delete) and the control socket
(`mark_heard`, `delete_message`) change the store too; after each, the lamps follow.

The lamps read the counts kept here (`counts`), not the disk: one listing per change,
not one per NOTIFY. Files a family changes by hand (scp, rm over SSH) are noticed by a
cheap watch in the one timer wheel: the mtime of each number's directory, every
`WATCH_INTERVAL` seconds; a NOTIFY goes out only when the counts really changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from appliance.config import LiveConfig
from appliance.edge.timers import Deadline, TimerWheel
from appliance.logs import fields
from appliance.voicemail.mailbox import Mailbox, Message, valid_id, valid_number

log = logging.getLogger("homepbx.voicemail")

WATCH_INTERVAL = 2.0
"""How often the mailbox directories are checked for changes made by hand."""
TMP_MAX_AGE = 86400.0
"""A recording in progress older than this was left by a process that died: removed at start."""


class MessageLamps(Protocol):
    """The message-summary subscriptions (edge.subscriptions.Subscriptions)."""

    def mailbox_changed(self, number: str) -> None: ...


class Voicemail:
    """The `VoicemailEvents` sink: the store of messages and the lamps that show it."""

    def __init__(self, settings: LiveConfig, mailbox: Mailbox, timers: TimerWheel, lamps: MessageLamps, *,
                 publish: Callable[[dict[str, Any]], None], wall: Callable[[], float]) -> None:
        self.settings = settings
        self.mailbox = mailbox
        self.timers = timers
        self.lamps = lamps
        self.publish = publish
        self.wall = wall
        self._counts: dict[str, tuple[int, int]] = {}
        self._mtimes: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: Deadline | None = None

    def start(self) -> None:
        """Sweep recordings abandoned by a crash (a day old), then watch for changes by hand."""
        try:
            self.mailbox.prepare()
        except OSError as err:
            log.warning("event=voicemail_store_unavailable %s", fields(root=self.mailbox.root, error=err))
        for number in self.mailbox.numbers():
            try:
                removed = self.mailbox.sweep_tmp(number, TMP_MAX_AGE, self.wall())
            except OSError as err:
                log.warning("event=voicemail_sweep_failed %s", fields(number=number, error=err))
                continue
            if removed:
                log.info("event=voicemail_tmp_swept %s", fields(number=number, files=removed))
        self._watch = self.timers.every(WATCH_INTERVAL, self._check_by_hand)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- what the lamps read -----------------------------------------------------------------
    def counts(self, number: str) -> tuple[int, int]:
        """(new, old) messages of `number`: kept here, read from the store the first time."""
        counts = self._counts.get(number)
        if counts is None:
            counts = self._counts[number] = self._read_counts(number)
        return counts

    def _read_counts(self, number: str) -> tuple[int, int]:
        if not valid_number(number):
            return 0, 0
        try:
            self._mtimes[number] = self._mtime(number)
            return self.mailbox.counts(number)
        except OSError as err:
            log.warning("event=mailbox_unreadable %s", fields(number=number, error=err))
            return 0, 0

    def _mtime(self, number: str) -> int:
        try:
            return (self.mailbox.root / number).stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def refresh(self, number: str) -> None:
        """Read `number`'s counts again; the lamps and the TUI are told if they changed."""
        before = self._counts.get(number)
        after = self._counts[number] = self._read_counts(number)
        if after == before:
            return
        new, old = after
        log.info("event=mailbox_counts %s", fields(number=number, new=new, old=old))
        self.lamps.mailbox_changed(number)
        self.publish({"event": "messages_changed", "number": number, "new": new, "old": old})

    def _check_by_hand(self, _now: float) -> None:
        for user in self.settings.current.users:
            number = user.number
            if number in self._counts and self._mtime(number) != self._mtimes.get(number):
                self.refresh(number)

    # -- VoicemailEvents -----------------------------------------------------------------------
    def voicemail_recorded(self, token: str, number: str, caller: str, path: str, seconds: float) -> None:
        recording = Path(path)
        if not valid_number(number) or not _inside(recording, self.mailbox.root / number / "tmp"):
            log.error("event=voicemail_refused %s", fields(token=token, number=number, path=path,
                                                          reason="not a recording path of this mailbox"))
            return
        user = self.settings.current.user(caller)
        caller_name = user.name if user is not None else ""
        received = self.wall()

        async def store() -> None:
            try:
                message = await asyncio.to_thread(self.mailbox.add, number, recording, caller, caller_name,
                                                  seconds, received)
            except OSError as err:
                log.error("event=voicemail_lost %s", fields(token=token, number=number, path=path, error=err))
                return
            log.info("event=voicemail_stored %s", fields(token=token, number=number, caller=caller,
                                                         id=message.id, seconds=f"{seconds:.1f}"))
            self.refresh(number)

        self._spawn(store())

    def mailbox_changed(self, number: str) -> None:
        if valid_number(number):
            self.refresh(number)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the control socket ----------------------------------------------------------------------
    async def messages(self, number: str) -> list[Message]:
        return await asyncio.to_thread(self.mailbox.messages, number)

    async def mark_heard(self, number: str, message_id: str) -> bool:
        found = await asyncio.to_thread(self.mailbox.mark_heard, number, message_id) if valid_id(message_id) else False
        self.refresh(number)
        return found

    async def delete(self, number: str, message_id: str) -> bool:
        found = await asyncio.to_thread(self.mailbox.delete, number, message_id) if valid_id(message_id) else False
        if found:
            log.info("event=voicemail_deleted %s", fields(number=number, id=message_id))
        self.refresh(number)
        return found


def _inside(path: Path, directory: Path) -> bool:
    try:
        return path.resolve().parent == directory.resolve() and path.is_file()
    except OSError:
        return False
