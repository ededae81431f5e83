"""The control socket, seen from the TUI: read the daemon's lines, send commands, match replies."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from pathlib import Path
from typing import Any

from tui.model import ProtocolError

MAX_LINE = 16 * 1024 * 1024  # a snapshot of a big house still fits
COMMAND_TIMEOUT = 5.0


class CommandFailed(Exception):
    """The daemon refused a command; ``field`` and ``message`` say why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class ControlClient:
    """One connection to the daemon. :meth:`read` yields snapshots and events; replies to
    :meth:`command` are picked out of the same stream by their id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self, timeout: float = 3.0) -> None:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.path), limit=MAX_LINE), timeout)

    async def read(self) -> dict[str, Any]:
        """The next snapshot or event; ConnectionError when the daemon has gone."""
        assert self._reader is not None
        while True:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                raise ConnectionResetError("the daemon closed the connection") from None
            except asyncio.LimitOverrunError:
                raise ProtocolError("line too long") from None
            try:
                message = json.loads(line)
            except ValueError as err:
                raise ProtocolError(f"not JSON: {err}") from None
            if not isinstance(message, dict):
                raise ProtocolError("not a JSON object")
            if "reply" in message:
                future = self._waiting.pop(message.get("id"), None)  # type: ignore[arg-type]
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            return message

    async def command(self, cmd: str, timeout: float = COMMAND_TIMEOUT, **fields: Any) -> dict[str, Any]:
        """Send a command; its ok reply, or CommandFailed. Needs :meth:`read` running."""
        if self._writer is None or self._writer.is_closing():
            raise ConnectionError("not connected to the daemon")
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            self._writer.write((json.dumps({"id": request_id, "cmd": cmd, **fields}) + "\n").encode())
            await self._writer.drain()
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ConnectionError("the daemon did not answer in time") from None
        finally:
            self._waiting.pop(request_id, None)
        if reply.get("reply") != "ok":
            raise CommandFailed(str(reply.get("field") or ""), str(reply.get("message") or "refused"))
        return reply

    async def close(self) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("connection closed"))
        self._waiting.clear()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None
