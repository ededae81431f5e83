"""The call history as the daemon sees it: rows handed to the writer process, reads from here.

`add` never waits: rows gather for `batch_seconds`, then go to the writer process
(`writer.py`) as one line on its stdin, one write for the whole batch.  The writer
commits and answers with the call ids; only then is `on_committed` called (on the event
loop), so what anyone has been shown is on disk.

A writer that exits while the daemon runs is logged and started again after
`RESPAWN_DELAY`; rows that arrive meanwhile wait (at most `MAX_PENDING`).  Readers
(`query`) use their own connection, from a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from appliance.history.sql import connect, prune
from appliance.history.store import SCHEMA_VERSION, CallRecord, as_row, migrate, query
from appliance.logs import fields
from appliance.source import REPO_ROOT

log = logging.getLogger("homepbx.history")

BATCH_SECONDS: Final = 0.05
RESPAWN_DELAY: Final = 1.0
MAX_PENDING: Final = 10_000
"""Rows kept while no writer runs (or it is behind); beyond, the oldest are dropped (and counted)."""
MAX_UNREAD: Final = 1 << 20
"""Bytes waiting in the pipe to the writer past which rows wait here instead."""

Committed = Callable[[list[str]], None]


@dataclass
class WriterStats:
    """What the writer did (bench/history.py, tests)."""

    rows: int = 0
    commits: int = 0
    dropped: int = 0
    pruned: int = 0
    """Rows deleted by the prune at open (the writer's later prunes are in its log)."""


class CallHistory:
    """Owns the history file: migrates it at open, runs its writer process, reads it."""

    def __init__(self, path: Path, *, max_days: int = 365, max_rows: int = 100_000,
                 on_committed: Committed | None = None, wall: Callable[[], float] = time.time,
                 batch_seconds: float = BATCH_SECONDS, stderr: int | IO[Any] | None = None) -> None:
        self.path = path
        self.max_days = max_days
        self.max_rows = max_rows
        self.on_committed = on_committed
        self.wall = wall
        self.batch_seconds = batch_seconds
        self.stderr = stderr
        self.stats = WriterStats()
        self._pending: list[list[object]] = []
        self._dropping = False
        self._flush_handle: asyncio.TimerHandle | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._opened = False
        self._closing = False
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()

    # -- life cycle ----------------------------------------------------------------------------
    def open(self) -> None:
        """Create or migrate the file and prune it (blocking: call from a thread at start-up)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path)
        try:
            before, after = migrate(conn)
            if before != after:
                log.info("event=history_migrated %s", fields(path=self.path, from_version=before, to_version=after))
            if after > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {after} is newer than this homepbx ({SCHEMA_VERSION})")
            self.stats.pruned += prune(conn, self.wall(), self.max_days, self.max_rows)
        finally:
            conn.close()
        self._opened = True

    async def start(self) -> None:
        """Start the writer (after `open`); rows added before are kept for it."""
        if self._opened and self._watcher is None:
            self._watcher = asyncio.create_task(self._run(), name="history-writer")

    async def close(self, timeout: float = 5.0) -> None:
        """Hand over what is pending, let the writer commit it and exit."""
        self._closing = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("event=history_writer_slow_to_stop %s", fields(pid=proc.pid, action="killed"))
                proc.kill()
        if self._pending:
            log.warning("event=history_rows_lost %s", fields(rows=len(self._pending), reason="no_writer_at_stop"))
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def configure(self, max_days: int, max_rows: int) -> None:
        """New bounds (a reload); the writer applies them at its next prune."""
        self.max_days, self.max_rows = max_days, max_rows
        self._send({"bounds": [max_days, max_rows]})

    # -- writing -------------------------------------------------------------------------------
    def add(self, record: CallRecord) -> None:
        """Queue a finished call; never blocks (committed within ~`batch_seconds` and a disk
        write).  Without a database (never opened, or it could not be) the row is dropped."""
        if not self._opened or self._closing:
            return
        self._pending.append(as_row(record))
        if len(self._pending) > MAX_PENDING:
            del self._pending[0]
            if not self._dropping:  # once per stretch: the journal of a small box stays readable
                log.warning("event=history_rows_dropped %s", fields(waiting=MAX_PENDING, reason="writer_behind"))
            self._dropping = True
            self.stats.dropped += 1
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(self.batch_seconds, self._flush)

    @property
    def waiting(self) -> int:
        """Rows not yet handed to the writer."""
        return len(self._pending)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._pending and self._send({"rows": self._pending}):
            self._pending = []
            self._dropping = False
        if self._pending and not self._closing:  # no writer now, or it is behind: try again
            self._flush_handle = asyncio.get_running_loop().call_later(self.batch_seconds, self._flush)

    def _send(self, message: dict[str, object]) -> bool:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return False
        if proc.stdin.transport.get_write_buffer_size() > MAX_UNREAD:  # a stalled disk: wait here, bounded
            return False
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        return True

    async def _run(self) -> None:
        """Run the writer, read what it committed, start it again if it exits."""
        while not self._closing:
            try:
                proc = self._proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-S", "-m", "appliance.history.writer", str(self.path), str(self.max_days),
                    str(self.max_rows), logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self.stderr,
                    cwd=str(REPO_ROOT), start_new_session=True, limit=1 << 24)
            except OSError as err:
                log.error("event=history_writer_failed %s", fields(error=err, retry_in=RESPAWN_DELAY))
                await asyncio.sleep(RESPAWN_DELAY)
                continue
            assert proc.stdin is not None and proc.stdout is not None
            if self._closing:  # close() came while it started: it has nothing to write
                proc.stdin.close()
            self._flush()  # what gathered while no writer ran
            while line := await proc.stdout.readline():
                self._committed(line)
            code = await proc.wait()
            self._proc = None
            if not self._closing:
                log.error("event=history_writer_exited %s", fields(pid=proc.pid, code=code, retry_in=RESPAWN_DELAY))
                await asyncio.sleep(RESPAWN_DELAY)

    def _committed(self, line: bytes) -> None:
        try:
            calls = [str(c) for c in json.loads(line)["committed"]]
        except (ValueError, KeyError, TypeError):
            log.warning("event=history_writer_said %s", fields(line=line[:80]))
            return
        self.stats.rows += len(calls)
        self.stats.commits += 1
        if self.on_committed is not None:
            try:
                self.on_committed(calls)
            except Exception:
                log.exception("event=history_listener_failed")

    # -- reading -------------------------------------------------------------------------------
    def query(self, *, limit: int = 100, before: float | None = None,
              missed_only: bool = False) -> list[dict[str, Any]]:
        """Rows, newest first (blocking: call from a thread, e.g. `asyncio.to_thread`)."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = connect(self.path, readonly=True)
            return query(self._reader, limit=limit, before=before, missed_only=missed_only)
