"""The history database's writing side, lean enough for the writer process to import
(no dataclasses, pathlib or typing: a few MB less in a process that stays up).

`COLUMNS` is `store.CallRecord`'s fields in order (store.py checks it at import).
"""

from __future__ import annotations

import os
import sqlite3

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

COLUMNS = ("call_id", "started", "ended", "caller", "callee", "direction", "outcome", "answered", "caller_name",
           "callee_name", "answered_by", "answered_number", "forwarded_to", "condition", "trunk", "duration",
           "reason")
_INSERT = f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"

PRUNE_EVERY = 60.0
"""Seconds between prunes by age and count (and once at start)."""


def connect(path: str | os.PathLike[str], *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the box's settings: WAL, synchronous=FULL, a busy timeout."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False,
                               timeout=5.0)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


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


def insert(conn: sqlite3.Connection, rows: Sequence[Sequence[object]]) -> None:
    """Add `rows` (values in `COLUMNS` order) in one transaction: all of them or none."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_INSERT, rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
