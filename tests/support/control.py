"""A blocking client of the daemon's control socket, for tests: read events, send commands."""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Message = dict[str, Any]


def control_block(socket_path: str = "ctl.sock") -> str:
    """A [control] section for tests.support.pbx.write_config(extra=...): a socket per test."""
    return f'[control]\nsocket = "{socket_path}"\n\n'


class ControlConn:
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self.ids = itertools.count(1)
        self.seen: list[Message] = []
        self.snapshot = self.read()
        assert self.snapshot["event"] == "snapshot", self.snapshot

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def read(self) -> Message:
        line = self.file.readline()
        if not line:
            raise ConnectionError("control socket closed")
        message: Message = json.loads(line)
        self.seen.append(message)
        return message

    def send_raw(self, data: bytes) -> None:
        self.file.write(data)
        self.file.flush()

    def command(self, cmd: str, **fields: object) -> Message:
        """Send a command and return its reply; events that come first stay in ``seen``."""
        request_id = next(self.ids)
        self.send_raw((json.dumps({"id": request_id, "cmd": cmd, **fields}) + "\n").encode())
        return self.reply(request_id)

    def reply(self, request_id: object) -> Message:
        while True:
            message = self.read()
            if "reply" in message and message.get("id") == request_id:
                return message

    def wait_event(self, kind: str, timeout: float = 5.0, where: Callable[[Message], bool] | None = None) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.read()
            if message.get("event") == kind and (where is None or where(message)):
                return message
        raise TimeoutError(f"no {kind} event within {timeout} s")

    def __enter__(self) -> ControlConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
