"""The call history database: SQLite in WAL mode, `synchronous=FULL`, one writer thread.

Rows are written off the event loop: `add` puts a row on a queue and returns at once; the
writer thread takes what has gathered within `batch_seconds` of the first row and commits
it in transactions of at most `batch_rows` (group commit). Only
after the commit is a row announced (`on_committed`, called on the event loop), so what
anyone has been shown is on disk: WAL with synchronous=FULL fsyncs the log at each commit,
and a power cut or `kill -9` loses at most rows nobody has seen yet.

Readers (`query`) use their own connection, from a thread (`asyncio.to_thread`): WAL lets
them read while the writer writes.

The schema evolves by `MIGRATIONS`: step i takes a database from `user_version` i to
i + 1, each step in its own transaction, so a file of any earlier version opens.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from appliance.logs import fields as log_fields

log = logging.getLogger("homepbx.history")

FILE_NAME: Final = "history.sqlite3"

OUTCOMES: Final = ("answered", "missed", "declined", "busy", "forwarded", "voicemail", "failed", "cancelled")
DIRECTIONS: Final = ("internal", "incoming", "outgoing")

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 0 -> 1: the first schema (one row per call).
    (
        """CREATE TABLE calls (
            id INTEGER PRIMARY KEY,
            call_id TEXT NOT NULL,
            started REAL NOT NULL,
            answered REAL,
            ended REAL NOT NULL,
            caller TEXT NOT NULL,
            caller_name TEXT NOT NULL DEFAULT '',
            callee TEXT NOT NULL,
            direction TEXT NOT NULL,
            outcome TEXT NOT NULL,
            answered_by TEXT NOT NULL DEFAULT '',
            duration REAL NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX calls_started ON calls (started)",
    ),
    # 1 -> 2: forwarding, the trunk, who the callee is, why it ended; missed calls found by index.
    (
        "ALTER TABLE calls ADD COLUMN callee_name TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE calls ADD COLUMN answered_number TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE calls ADD COLUMN forwarded_to TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE calls ADD COLUMN condition TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE calls ADD COLUMN trunk TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE calls ADD COLUMN reason TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX calls_outcome_started ON calls (outcome, started)",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

BATCH_SECONDS: Final = 0.05
BATCH_ROWS: Final = 256
PRUNE_EVERY: Final = 60.0
"""Seconds between prunes by age and count (and once at start)."""


@dataclass(frozen=True)
class CallRecord:
    """One finished call, as stored."""

    call_id: str
    started: float
    ended: float
    caller: str
    callee: str
    direction: str
    outcome: str
    answered: float | None = None
    caller_name: str = ""
    callee_name: str = ""
    answered_by: str = ""
    """The device that answered (its user agent, or its address)."""
    answered_number: str = ""
    """The number whose device answered (another number's for a pickup)."""
    forwarded_to: str = ""
    condition: str = ""
    """Why the call was forwarded: always, busy, no_answer, unreachable, dnd."""
    trunk: str = ""
    duration: float = 0.0
    reason: str = ""
    """Why the call ended, as the router said (status_486, bye_from_caller, ...)."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


COLUMNS: Final = tuple(f.name for f in fields(CallRecord))
_INSERT: Final = f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_SELECT: Final = f"SELECT id, {', '.join(COLUMNS)} FROM calls"


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the box's settings: WAL, synchronous=FULL, a busy timeout."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False,
                               timeout=5.0)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def migrate(conn: sqlite3.Connection, steps: Sequence[Sequence[str]] = MIGRATIONS) -> tuple[int, int]:
    """Bring the schema up to date, one transaction per step; (version before, after).
    A database newer than this code is left alone (its reader refuses it)."""
    before = int(conn.execute("PRAGMA user_version").fetchone()[0])
    version = before
    while version < len(steps):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in steps[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version += 1
    return before, version


def prune(conn: sqlite3.Connection, now: float, max_days: int, max_rows: int) -> int:
    """Delete rows older than `max_days` and all but the newest `max_rows` (0: no bound);
    the number of rows deleted."""
    deleted = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        if max_days > 0:
            deleted += conn.execute("DELETE FROM calls WHERE started < ?", (now - max_days * 86400.0,)).rowcount
        if max_rows > 0:
            row = conn.execute("SELECT id FROM calls ORDER BY id DESC LIMIT 1 OFFSET ?", (max_rows,)).fetchone()
            if row is not None:
                deleted += conn.execute("DELETE FROM calls WHERE id <= ?", (row[0],)).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return deleted


def query(conn: sqlite3.Connection, *, limit: int = 100, before: float | None = None,
          missed_only: bool = False) -> list[dict[str, Any]]:
    """The newest calls first (started before `before` when given); only missed ones on request."""
    where: list[str] = []
    args: list[Any] = []
    if missed_only:
        where.append("outcome = 'missed'")
    if before is not None:
        where.append("started < ?")
        args.append(before)
    sql = _SELECT + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY started DESC, id DESC LIMIT ?"
    args.append(limit)
    names = ("id", *COLUMNS)
    return [dict(zip(names, row, strict=True)) for row in conn.execute(sql, args)]


@dataclass
class WriterStats:
    """What the writer did (bench/history.py, tests)."""

    rows: int = 0
    commits: int = 0
    statements: int = 0
    pruned: int = 0


Committed = Callable[[list[CallRecord]], None]

_STOP: Final = object()


class CallHistory:
    """The history database of one box: rows added from the event loop, written by a thread."""

    def __init__(self, path: Path, *, max_days: int = 365, max_rows: int = 100_000,
                 on_committed: Committed | None = None, wall: Callable[[], float] = time.time,
                 batch_seconds: float = BATCH_SECONDS, batch_rows: int = BATCH_ROWS) -> None:
        self.path = path
        self.max_days = max_days
        self.max_rows = max_rows
        self.on_committed = on_committed
        self.wall = wall
        self.batch_seconds = batch_seconds
        self.batch_rows = batch_rows
        self.stats = WriterStats()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None

    # -- life cycle ----------------------------------------------------------------------------
    def open(self) -> None:
        """Create or migrate the file and start the writer thread (blocking: call at start-up)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path)
        before, after = migrate(conn)
        if before != after:
            log.info("event=history_migrated %s", log_fields(path=self.path, from_version=before, to_version=after))
        if after > SCHEMA_VERSION:
            conn.close()
            raise RuntimeError(f"{self.path}: schema version {after} is newer than this homepbx ({SCHEMA_VERSION})")
        self._writer = conn
        self._prune()
        self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the writer (blocking: call from a thread at shutdown)."""
        if self._thread is not None:
            self._closing.set()
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # -- writing -------------------------------------------------------------------------------
    def add(self, record: CallRecord) -> None:
        """Queue a finished call; never blocks (the writer thread commits it within ~50 ms).
        Without a writer (never opened, or the file could not be opened) the row is dropped."""
        if self._thread is not None:
            self._queue.put(record)

    def _run(self) -> None:
        conn = self._writer
        assert conn is not None
        last_prune = time.monotonic()
        stopping = False
        while not stopping:
            first = self._queue.get()
            stopping = first is _STOP
            if not stopping:
                # Let the batch gather while this thread sleeps: rows put meanwhile wake
                # nobody (a get() with a timeout here was woken by every row, a futex and
                # a thread switch per call under load). close() cuts the wait short.
                self._closing.wait(self.batch_seconds)
            batch = [] if stopping else [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)
            records = [r for r in batch if isinstance(r, CallRecord)]
            for at in range(0, len(records), self.batch_rows):
                self._commit(conn, records[at : at + self.batch_rows])
            if time.monotonic() - last_prune >= PRUNE_EVERY:
                last_prune = time.monotonic()
                self._prune()
        conn.close()
        self._writer = None

    def _commit(self, conn: sqlite3.Connection, records: list[CallRecord]) -> None:
        """One transaction for `records`, then they are announced (never before)."""
        try:
            self._write(conn, records)
        except sqlite3.Error as err:
            log.error("event=history_write_failed %s", log_fields(path=self.path, rows=len(records), error=err))
            return
        if self.on_committed is not None:
            try:
                self.on_committed(records)
            except Exception:
                log.exception("event=history_listener_failed")

    def _write(self, conn: sqlite3.Connection, records: list[CallRecord]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, [tuple(getattr(r, c) for c in COLUMNS) for r in records])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.stats.rows += len(records)
        self.stats.commits += 1
        self.stats.statements += 2 + len(records)  # BEGIN, an INSERT per row, COMMIT

    def _prune(self) -> None:
        conn = self._writer
        if conn is None or (self.max_days <= 0 and self.max_rows <= 0):
            return
        try:
            deleted = prune(conn, self.wall(), self.max_days, self.max_rows)
        except sqlite3.Error as err:
            log.warning("event=history_prune_failed %s", log_fields(path=self.path, error=err))
            return
        self.stats.pruned += deleted
        if deleted:
            log.info("event=history_pruned %s", log_fields(rows=deleted, max_days=self.max_days,
                                                           max_rows=self.max_rows))

    def configure(self, max_days: int, max_rows: int) -> None:
        """New bounds (a reload); applied at the next prune."""
        self.max_days, self.max_rows = max_days, max_rows

    # -- reading -------------------------------------------------------------------------------
    def query(self, *, limit: int = 100, before: float | None = None,
              missed_only: bool = False) -> list[dict[str, Any]]:
        """Rows, newest first (blocking: call from a thread, e.g. `asyncio.to_thread`)."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = connect(self.path, readonly=True)
            return query(self._reader, limit=limit, before=before, missed_only=missed_only)

    def counts(self) -> Mapping[str, int]:
        """Rows by outcome (blocking)."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = connect(self.path, readonly=True)
            return dict(self._reader.execute("SELECT outcome, count(*) FROM calls GROUP BY outcome").fetchall())
