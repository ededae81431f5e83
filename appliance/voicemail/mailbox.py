"""The messages of each number as ordinary audio files in the state directory.

Layout under ``root`` (``<state_dir>/voicemail``)::

    <number>/<id>.wav       the message (what the worker recorded)
    <number>/<id>.json      its sidecar: id, number, caller, caller_name, received, seconds, heard
    <number>/greeting.wav   the number's own greeting (absent: the default greeting)
    <number>/tmp/           recordings in progress (``recording_path``)

A family copies the ``.wav`` files off the box with scp; nothing else is needed to read
them. The edge (which adds messages and lights the lamps) and the media workers (whose
menu marks them heard and deletes them) are different processes: every change takes an
``flock`` on ``<number>/.lock`` and lands by rename, so a reader sees a message whole or
not at all, and a power cut loses nothing already stored. A sidecar that is missing or
unreadable never breaks a listing: that message is skipped and logged once.

Pure stdlib, no asyncio: the calls are small file operations.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.fileio import atomic_write, fsync_dir
from appliance.logs import fields

log = logging.getLogger("homepbx.voicemail")

# The same rule as the config's [[users]] numbers: digits only, so a number can never
# name a path outside the store.
_NUMBER = re.compile(r"[0-9]{1,15}")
_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")
GREETING = "greeting.wav"


SHARED_DIR = 0o750
SHARED_FILE = 0o640
"""Messages, sidecars and greetings: the daemon's user writes, its group (the `pbx`
login on the appliance) reads; nobody else (the daemon's umask is 0077)."""

def valid_number(number: str) -> bool:
    return _NUMBER.fullmatch(number) is not None


def valid_id(message_id: str) -> bool:
    return _ID.fullmatch(message_id) is not None


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    number: str
    caller: str
    caller_name: str
    received: float
    seconds: float
    heard: bool
    wav: Path

    def sidecar(self) -> dict[str, object]:
        """What ``<id>.json`` holds (and what the control socket shows, with ``wav``)."""
        return {
            "id": self.id, "number": self.number, "caller": self.caller, "caller_name": self.caller_name,
            "received": self.received, "seconds": self.seconds, "heard": self.heard,
        }


class Mailbox:
    """The store of messages under ``root``; cheap to make, holds no open files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._logged: set[tuple[str, str]] = set()

    # -- paths ---------------------------------------------------------------------------

    def _dir(self, number: str) -> Path:
        if not valid_number(number):
            raise ValueError(f"not a number: {number!r}")
        return self.root / number

    def _paths(self, number: str, message_id: str) -> tuple[Path, Path]:
        if not valid_id(message_id):
            raise ValueError(f"not a message id: {message_id!r}")
        d = self._dir(number)
        return d / f"{message_id}.wav", d / f"{message_id}.json"

    @contextlib.contextmanager
    def _locked(self, number: str) -> Iterator[Path]:
        d = self._dir(number)
        _shared_dir(self.root, d)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield d
        finally:
            os.close(fd)

    def numbers(self) -> list[str]:
        """The numbers that have a directory in the store."""
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        return sorted(e.name for e in entries if valid_number(e.name) and e.is_dir())

    # -- reading -------------------------------------------------------------------------

    def messages(self, number: str) -> list[Message]:
        """The number's messages, newest first."""
        d = self._dir(number)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        present = set(names)
        out: list[Message] = []
        for name in names:
            stem, dot, ext = name.rpartition(".")
            if not dot or not valid_id(stem):
                continue
            if ext == "wav" and f"{stem}.json" not in present:
                self._skip(d / name, "no sidecar")
            elif ext == "json":
                if f"{stem}.wav" not in present:
                    self._skip(d / name, "no audio file")
                    continue
                message = self._read(number, stem, d / name)
                if message is not None:
                    out.append(message)
        out.sort(key=lambda m: (m.received, m.id), reverse=True)
        return out

    def message(self, number: str, message_id: str) -> Message | None:
        wav, sidecar = self._paths(number, message_id)
        if not wav.exists():
            return None
        return self._read(number, message_id, sidecar)

    def counts(self, number: str) -> tuple[int, int]:
        """(new, old): messages not heard yet, and heard ones still kept."""
        messages = self.messages(number)
        new = sum(1 for m in messages if not m.heard)
        return new, len(messages) - new

    def greeting(self, number: str) -> Path | None:
        path = self._dir(number) / GREETING
        return path if path.is_file() else None

    def _read(self, number: str, message_id: str, sidecar: Path) -> Message | None:
        try:
            data = json.loads(sidecar.read_bytes())
            if not isinstance(data, dict):
                raise ValueError("not an object")
            message = Message(
                id=message_id, number=number,
                caller=str(data.get("caller", "")), caller_name=str(data.get("caller_name", "")),
                received=float(data["received"]), seconds=float(data.get("seconds", 0.0)),
                heard=bool(data.get("heard", False)), wav=sidecar.with_suffix(".wav"),
            )
        except FileNotFoundError:
            return None  # deleted between the listing and the read
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._skip(sidecar, f"unreadable sidecar ({exc.__class__.__name__})")
            return None
        return message

    def _skip(self, path: Path, why: str) -> None:
        key = (str(path), why)
        if key in self._logged:
            return
        self._logged.add(key)
        log.warning("voicemail message skipped %s", fields(path=path, reason=why))

    # -- changing ------------------------------------------------------------------------

    def prepare(self) -> None:
        """The store's root made (mode 0750), so the `pbx` login's read-only SFTP starts
        there even before the first message."""
        _shared_dir(self.root)

    def recording_path(self, number: str) -> Path:
        """A fresh path for a recording in progress; ``add`` moves it in when it is finished."""
        tmp = self._dir(number) / "tmp"
        _shared_dir(self.root, tmp.parent)
        tmp.mkdir(exist_ok=True)
        return tmp / f"rec-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}.wav"

    def sweep_tmp(self, number: str, older_than: float, now: float) -> int:
        """Remove recordings left in ``<number>/tmp`` by a process that died while recording,
        if last written more than ``older_than`` seconds before ``now``; how many went."""
        tmp = self._dir(number) / "tmp"
        removed = 0
        try:
            entries = list(tmp.iterdir())
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.is_file() and now - entry.stat().st_mtime > older_than:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def add(self, number: str, wav: Path, caller: str, caller_name: str, seconds: float,
            received: float) -> Message:
        """Move the finished recording ``wav`` in as a new message (not heard yet).

        The audio lands first (fsynced, renamed), then the sidecar (tmp, fsync, rename): a
        message is listed only once both are whole.
        """
        with self._locked(number) as d:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(received))
            while True:
                message_id = f"{stamp}-{secrets.token_hex(3)}"
                target, sidecar = d / f"{message_id}.wav", d / f"{message_id}.json"
                if not target.exists() and not sidecar.exists():
                    break
            _move_in(wav, target)
            message = Message(
                id=message_id, number=number, caller=caller, caller_name=caller_name,
                received=float(received), seconds=float(seconds), heard=False, wav=target,
            )
            atomic_write(sidecar, _dump(message), mode=SHARED_FILE)
        return message

    def mark_heard(self, number: str, message_id: str) -> bool:
        """Mark a message heard; False if there is no such message."""
        _, sidecar = self._paths(number, message_id)
        with self._locked(number):
            message = self.message(number, message_id)
            if message is None:
                return False
            if not message.heard:
                data = message.sidecar()
                data["heard"] = True
                atomic_write(sidecar, json.dumps(data, indent=1) + "\n", mode=SHARED_FILE)
        return True

    def delete(self, number: str, message_id: str) -> bool:
        """Delete a message (sidecar first, so it leaves the listing at once); False if absent."""
        wav, sidecar = self._paths(number, message_id)
        with self._locked(number) as d:
            found = False
            for path in (sidecar, wav):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    found = True
            if found:
                fsync_dir(d)
        return found

    def set_greeting(self, number: str, wav: Path) -> None:
        """Make ``wav`` (moved in) the number's greeting, replacing the old one atomically."""
        with self._locked(number) as d:
            _move_in(wav, d / GREETING)

    def clear_greeting(self, number: str) -> bool:
        """Back to the default greeting; False if the number had none of its own."""
        with self._locked(number) as d:
            try:
                (d / GREETING).unlink()
            except FileNotFoundError:
                return False
            fsync_dir(d)
        return True


def _dump(message: Message) -> str:
    return json.dumps(message.sidecar(), indent=1) + "\n"


def _shared_dir(*directories: Path) -> None:
    """The ``directories`` made (parents first), readable by the daemon's group (the
    family's `pbx` login copies messages off the box) whatever the umask."""
    for d in directories:
        d.mkdir(parents=True, exist_ok=True)
        if d.stat().st_mode & 0o777 != SHARED_DIR:
            os.chmod(d, SHARED_DIR)


def _move_in(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` durably: readers see the old file or the whole new one."""
    with open(source, "rb+") as f:
        os.fchmod(f.fileno(), SHARED_FILE)
        os.fsync(f.fileno())
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Another file system: copy beside the target, then rename.
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        with contextlib.suppress(FileNotFoundError):
            source.unlink()
    fsync_dir(target.parent)
