"""The control socket: a local Unix socket through which the TUI sees and steers the PBX.

JSON lines both ways (documented in docs/control-protocol.md). A client gets a full
snapshot on connect, then every event of the live state; it may send commands, each
answered with ok or an error naming the field at fault. The daemon never waits for a
client: events go into a bounded queue per client, and a client that lets it overflow
loses the queue and gets a fresh snapshot instead.

Access is the file system's: the socket is mode 0660, owned by the daemon's user and the
configured group. Every connection's peer uid is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import json
import logging
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from appliance.config import Config, ConfigError, LiveConfig, UserConfig, control_socket_path, update_user
from appliance.history.service import CallHistory
from appliance.logs import fields
from appliance.state import Event, LiveState, forwarding_json
from appliance.voicemail.mailbox import Message, valid_id

log = logging.getLogger("homepbx.control")

PROTOCOL_VERSION: Final = 1
QUEUE_LIMIT: Final = 1000
"""Events queued for one client before it counts as fallen behind."""
MAX_LINE: Final = 64 * 1024
"""Longest command line accepted; a longer one closes the connection."""
SOCKET_MODE: Final = 0o660
HISTORY_MAX_LIMIT: Final = 1000
"""Most rows one `history` command returns (page with `before`)."""
_SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

SETTABLE_FIELDS: Final = ("one_number", "max_devices", "max_outgoing_calls", "name", "decline", "ring_timeout",
                          "forward_always", "forward_busy", "forward_no_answer", "forward_unreachable",
                          "no_answer_after", "dnd", "dnd_devices")
"""User settings a client may change (``number`` is the identity, ``password`` is never set here)."""


class CommandError(Exception):
    """A refused command: ``field`` names what is wrong (a command field or a config key)."""

    def __init__(self, field: str, message: str, key: str | None = None) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message
        self.key = key

    def reply(self, request_id: object) -> dict[str, Any]:
        out: dict[str, Any] = {"id": request_id, "reply": "error", "field": self.field, "message": self.message}
        if self.key:
            out["key"] = self.key
        return out


def _peer_credentials(sock: socket.socket | None) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connected process, from the kernel (SO_PEERCRED)."""
    if sock is None:
        return (-1, -1, -1)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return (-1, -1, -1)
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


EVENT, REPLY, SNAPSHOT = "event", "reply", "snapshot"


class _Client:
    """One connection: a bounded FIFO of lines to send, and the task that sends them."""

    def __init__(self, serial: int, writer: asyncio.StreamWriter, limit: int) -> None:
        self.serial = serial
        self.writer = writer
        self.limit = limit
        self.pending: deque[tuple[str, bytes]] = deque()  # (EVENT | REPLY | SNAPSHOT, line)
        self.events_pending = 0
        self.resync = False
        self.dropped = 0
        self.wake = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.closed = False

    def push_event(self, line: bytes) -> bool:
        """Queue an event; False when the client had fallen behind and lost its queue."""
        if self.closed:
            return True
        if self.resync:  # a snapshot is on its way and will include this change
            return True
        if self.events_pending >= self.limit:
            self.dropped = self.events_pending
            # Replies stay (someone waits for them); a snapshot not yet sent would be stale.
            self.pending = deque(item for item in self.pending if item[0] == REPLY)
            self.events_pending = 0
            self.resync = True
            self.wake.set()
            return False
        self.pending.append((EVENT, line))
        self.events_pending += 1
        self.wake.set()
        return True

    def push_reply(self, line: bytes, kind: str = "reply") -> None:
        self.pending.append((kind, line))
        self._update_room()
        self.wake.set()

    def _update_room(self) -> None:
        if len(self.pending) >= self.limit:
            self.room.clear()
        else:
            self.room.set()

    def take(self, max_bytes: int = 256 * 1024) -> bytes:
        """Lines ready to write, joined (bursts go out in one write)."""
        out: list[bytes] = []
        size = 0
        while self.pending and size < max_bytes:
            kind, line = self.pending.popleft()
            if kind == EVENT:
                self.events_pending -= 1
            out.append(line)
            size += len(line)
        self._update_room()
        return b"".join(out)


def _line(message: Mapping[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()


class Steering(Protocol):
    """What the control socket's commands may do to the running daemon."""

    def apply_config(self, config: Config) -> None:
        """Take a new, already validated config live."""
        ...

    def reload(self) -> ConfigError | None:
        """Re-read the config file (as SIGHUP does); the error if it was refused."""
        ...


class MessageStore(Protocol):
    """The answering machine's messages (edge.voicemail.Voicemail): each change also
    updates the number's message lamps."""

    async def messages(self, number: str) -> list[Message]: ...

    async def mark_heard(self, number: str, message_id: str) -> bool: ...

    async def delete(self, number: str, message_id: str) -> bool: ...


class ControlServer:
    """Serves the control socket: the live state out, commands in; ``config_path`` is the
    file commands edit."""

    def __init__(self, state: LiveState, settings: LiveConfig, steering: Steering, config_path: Path, *,
                 queue_limit: int = QUEUE_LIMIT, edit_lock: asyncio.Lock | None = None,
                 messages: MessageStore | None = None, history: CallHistory | None = None) -> None:
        self.state = state
        self.messages = messages
        self.history = history
        self.settings = settings
        self.steering = steering
        self.config_path = config_path
        self.queue_limit = queue_limit
        self.path: Path | None = None
        self._server: asyncio.base_events.Server | None = None
        self._clients: dict[int, _Client] = {}
        self._senders: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._edit_lock = edit_lock or asyncio.Lock()  # shared with the daemon's own edits (feature codes)

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind and listen; a failure is logged and leaves the PBX running without the socket."""
        path = control_socket_path(self.settings.current)
        try:
            await self._listen(path)
        except (OSError, ValueError) as err:
            log.error("event=control_failed %s", fields(socket=path, error=err, action="running_without_control"))
            return
        self.path = path
        log.info("event=control_listening %s", fields(socket=path, group=self.settings.current.control.group or "-"))

    async def _listen(self, path: Path) -> None:
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise ValueError(f"socket path longer than {_SUN_PATH_MAX} bytes; set [control] socket")
        group = self.settings.current.control.group
        gid = -1
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ValueError(f"[control] group {group!r} does not exist") from None
        created = not path.parent.exists()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        if created and gid >= 0:
            os.chown(path.parent, -1, gid)
        await self._remove_stale(path)
        # Bind with a umask that already gives 0660, so there is no moment with wider access.
        old_umask = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(path), limit=MAX_LINE)
        finally:
            os.umask(old_umask)
        os.chmod(path, SOCKET_MODE)
        if gid >= 0:
            os.chown(path, -1, gid)

    async def _remove_stale(self, path: Path) -> None:
        """Unlink a socket left by a dead daemon; refuse to take over a live one."""
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ValueError(f"{path} exists and is not a socket")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
        except (OSError, TimeoutError):
            path.unlink(missing_ok=True)
            return
        writer.close()
        raise ValueError(f"{path} is served by another running daemon")

    async def stop(self) -> None:
        self.state.unsubscribe(self._on_event)
        if self._server is not None:
            self._server.close()
        for client in list(self._clients.values()):
            client.closed = True
            client.writer.close()  # each handler then sees the end of its stream and returns
        for task in list(self._senders):
            task.cancel()
        if self._handlers:
            _, late = await asyncio.wait(list(self._handlers), timeout=2.0)
            for task in late:
                task.cancel()
        await asyncio.gather(*self._senders, *self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
            if self.path is not None:
                with contextlib.suppress(OSError):
                    self.path.unlink()

    # -- events ----------------------------------------------------------------------------
    def snapshot(self, reason: str) -> dict[str, Any]:
        snap = self.state.snapshot()
        snap.update(protocol=PROTOCOL_VERSION, reason=reason, config=str(self.config_path))
        return snap

    def _on_event(self, event: Event) -> None:
        if not self._clients:
            return
        if event.get("event") == "config_changed":
            # Settings and devices may all have changed: carry them, so a client redraws from it.
            event = {**event, "numbers": self.state.snapshot()["numbers"]}
        line = _line(event)  # serialised once for every client
        for client in list(self._clients.values()):
            if not client.push_event(line):
                log.warning("event=control_client_behind %s", fields(
                    client=client.serial, dropped=client.dropped, action="fresh_snapshot"))

    # -- connections -----------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        serial = next(self._ids)
        pid, uid, gid = _peer_credentials(writer.get_extra_info("socket"))
        log.info("event=control_connected %s", fields(client=serial, peer_uid=uid, peer_gid=gid, peer_pid=pid))
        client = _Client(serial, writer, self.queue_limit)
        client.push_reply(_line(self.snapshot("connect")), SNAPSHOT)
        self._clients[serial] = client
        if len(self._clients) == 1:
            # Listen only while someone is connected: unheard, the live state does not even
            # build its events (a busy registrar makes one per REGISTER).
            self.state.subscribe(self._on_event)
        sender = asyncio.create_task(self._send_loop(client))
        self._senders.add(sender)
        this = asyncio.current_task()
        if this is not None:
            self._handlers.add(this)
        reason = "eof"
        try:
            reason = await self._read_loop(client, reader, uid)
        except asyncio.CancelledError:
            reason = "stopping"
            raise
        except (ConnectionError, OSError) as err:
            reason = type(err).__name__
        finally:
            self._clients.pop(serial, None)
            if not self._clients:
                self.state.unsubscribe(self._on_event)
            client.closed = True
            if reason in ("eof", "line_too_long"):
                # Let the last replies out, then close.
                with contextlib.suppress(asyncio.CancelledError, TimeoutError, OSError):
                    await asyncio.wait_for(self._flush(client), 1.0)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            writer.close()
            self._senders.discard(sender)
            if this is not None:
                self._handlers.discard(this)
            log.info("event=control_closed %s", fields(client=serial, reason=reason))

    async def _flush(self, client: _Client) -> None:
        while client.pending:
            client.writer.write(client.take())
            await client.writer.drain()

    async def _send_loop(self, client: _Client) -> None:
        try:
            while True:
                await client.wake.wait()
                client.wake.clear()
                if client.resync:
                    client.resync = False
                    client.writer.write(_line(self.snapshot("resync")))
                if client.pending:
                    client.writer.write(client.take())
                    client.wake.set()  # more may be left
                await client.writer.drain()
        except (ConnectionError, OSError):
            client.closed = True  # the reader notices the end and cleans up

    async def _read_loop(self, client: _Client, reader: asyncio.StreamReader, uid: int) -> str:
        while True:
            await client.room.wait()  # a client that sends and never reads waits here, alone
            try:
                raw = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                return "eof"
            except asyncio.LimitOverrunError:
                client.push_reply(_line(CommandError("line", f"longer than {MAX_LINE} bytes").reply(None)))
                return "line_too_long"
            if client.closed:
                return "write_failed"
            if not raw.strip():
                continue
            reply = await self._command(raw, client.serial, uid)
            client.push_reply(_line(reply))

    # -- commands --------------------------------------------------------------------------
    async def _command(self, raw: bytes, client: int, uid: int) -> dict[str, Any]:
        request_id: object = None
        try:
            try:
                message = json.loads(raw)
            except ValueError as err:
                raise CommandError("line", f"not JSON: {err}") from None
            if not isinstance(message, dict):
                raise CommandError("line", "must be a JSON object")
            request_id = message.get("id")
            cmd = message.get("cmd")
            if not isinstance(cmd, str):
                raise CommandError("cmd", "missing (a string: set_user, show_password, reload, snapshot, history, "
                                          "ping, messages, mark_heard, delete_message)")
            handler = getattr(self, f"_cmd_{cmd}", None)
            if handler is None:
                raise CommandError("cmd", f"unknown command {cmd!r}")
            result: dict[str, Any] = await handler(message, client, uid)
        except CommandError as err:
            log.info("event=control_command %s", fields(
                client=client, peer_uid=uid, cmd=_safe(raw), result="error", field=err.field, reason=err.message))
            return err.reply(request_id)
        return {"id": request_id, "reply": "ok", **result}

    def _number(self, message: Mapping[str, Any]) -> str:
        number = message.get("number")
        if not isinstance(number, str) or not number:
            raise CommandError("number", "missing (the user's number, a string)")
        if self.settings.current.user(number) is None:
            raise CommandError("number", f"no user with number {number!r}")
        return number

    async def _cmd_ping(self, message: Mapping[str, Any], client: int, uid: int) -> dict[str, Any]:
        return {}

    async def _cmd_snapshot(self, message: Mapping[str, Any], client: int, uid: int) -> dict[str, Any]:
        return {"snapshot": self.snapshot("request")}

    async def _cmd_set_user(self, message: Mapping[str, Any], client: int, uid: int) -> dict[str, Any]:
        number = self._number(message)
        changes = message.get("changes")
        if not isinstance(changes, dict) or not changes:
            raise CommandError("changes", "missing (an object of field: value)")
        for name, value in changes.items():
            if name not in SETTABLE_FIELDS:
                raise CommandError(name, f"not a field that can be set here (settable: {', '.join(SETTABLE_FIELDS)})")
            if name == "dnd_devices" and isinstance(value, list) and all(isinstance(v, str) for v in value):
                continue  # the one list: device ids
            if value is None or isinstance(value, dict | list):
                raise CommandError(name, f"must be a single value, not {json.dumps(value)}")
        async with self._edit_lock:
            try:
                # File I/O and fsync off the event loop; SIP keeps flowing meanwhile.
                config = await asyncio.to_thread(update_user, self.config_path, number, changes)
            except ConfigError as err:
                field = err.key.rsplit(".", 1)[-1] if err.key else "config"
                raise CommandError(field, err.message, key=err.key or None) from None
            self.steering.apply_config(config)
        log.info("event=control_command %s", fields(
            client=client, peer_uid=uid, cmd="set_user", number=number,
            changes=",".join(f"{k}={v}" for k, v in changes.items()), result="ok", config=self.config_path))
        user = config.user(number)
        assert user is not None
        return {"number": number, "user": _user_json(user)}

    async def _cmd_show_password(self, message: Mapping[str, Any], client: int, uid: int) -> dict[str, Any]:
        number = self._number(message)
        user = self.settings.current.user(number)
        assert user is not None
        log.info("event=password_shown %s", fields(client=client, peer_uid=uid, number=number))
        return {"number": number, "password": user.password}

    async def _cmd_history(self, message: Mapping[str, Any], client: int, uid: int) -> dict[str, Any]:
        """Calls from the history database, newest first: only committed rows, read by a
        thread of its own (the event loop never waits on the disk)."""
        if self.history is None:
            raise CommandError("cmd", "no call history in this daemon")
        limit = message.get("limit", 100)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= HISTORY_MAX_LIMIT:
            raise CommandError("limit", f"must be an integer from 1 to {HISTORY_MAX_LIMIT}")
        before = message.get("before")
        if before is not None and (isinstance(before, bool) or not isinstance(before, int | float)):
            raise CommandError("before", "must be a unix time (a number), or absent")
        missed_only = message.get("missed_only", False)
        if not isinstance(missed_only, bool):
            raise CommandError("missed_only", "must be true or false")
        try:
            rows = await asyncio.to_thread(self.history.query, limit=limit,
                                           before=float(before) if before is not None else None,
                                           missed_only=missed_only)
        except Exception as err:  # sqlite3.Error, a vanished file: the client is told, the daemon goes on
            log.warning("event=history_read_failed %s", fields(client=client, error=err))
            raise CommandError("history", f"cannot read the call history: {err}") from None
        return {"calls": rows, "more": len(rows) == limit}

    async def _cmd_reload(self, message: Mapping[str, Any], client: int, uid: int) -> dict[str, Any]:
        async with self._edit_lock:
            error = self.steering.reload()
        if error is not None:
            field = error.key.rsplit(".", 1)[-1] if error.key else "config"
            raise CommandError(field, str(error), key=error.key or None)
        log.info("event=control_command %s", fields(client=client, peer_uid=uid, cmd="reload", result="ok"))
        return {"users": len(self.settings.current.users)}

    # -- the answering machine's messages -----------------------------------------------------
    def _store(self) -> MessageStore:
        if self.messages is None:
            raise CommandError("cmd", "no answering machine in this daemon")
        return self.messages

    @staticmethod
    def _message_id(message: Mapping[str, Any]) -> str:
        message_id = message.get("message_id")
        if not isinstance(message_id, str) or not valid_id(message_id):
            raise CommandError("message_id", "missing or malformed (a message's id, as `messages` lists it)")
        return message_id

    async def _cmd_messages(self, message: Mapping[str, Any], client: int, uid: int) -> dict[str, Any]:
        number = self._number(message)
        listed = await self._store().messages(number)
        new = sum(1 for m in listed if not m.heard)
        return {"number": number, "new": new, "old": len(listed) - new, "messages": [_message_json(m) for m in listed]}

    async def _cmd_mark_heard(self, message: Mapping[str, Any], client: int, uid: int) -> dict[str, Any]:
        return await self._change_message("mark_heard", message, client, uid)

    async def _cmd_delete_message(self, message: Mapping[str, Any], client: int, uid: int) -> dict[str, Any]:
        return await self._change_message("delete_message", message, client, uid)

    async def _change_message(self, cmd: str, message: Mapping[str, Any], client: int, uid: int) -> dict[str, Any]:
        """mark_heard or delete_message: one message of a number, logged; `message_id` if there is none."""
        number, message_id = self._number(message), self._message_id(message)
        store = self._store()
        change = store.mark_heard if cmd == "mark_heard" else store.delete
        if not await change(number, message_id):
            raise CommandError("message_id", f"no message {message_id} for {number}")
        log.info("event=control_command %s", fields(client=client, peer_uid=uid, cmd=cmd, number=number,
                                                    message_id=message_id, result="ok"))
        return {"number": number, "message_id": message_id}


def _message_json(message: Message) -> dict[str, Any]:
    return {
        "id": message.id, "caller": message.caller, "name": message.caller_name, "received": message.received,
        "seconds": message.seconds, "heard": message.heard, "file": str(message.wav),
    }


def _user_json(user: UserConfig) -> dict[str, Any]:
    return {
        "number": user.number, "name": user.name, "one_number": user.one_number,
        "max_devices": user.max_devices, "device_limit": user.device_limit,
        "max_outgoing_calls": user.max_outgoing_calls, "decline": user.decline,
        "ring_timeout": user.ring_timeout, **forwarding_json(user),
    }


def _safe(raw: bytes) -> str:
    """A refused command line for the log: short, one line, never a password."""
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:120]
