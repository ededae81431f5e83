"""The call history database: SQLite in WAL mode, `synchronous=FULL`.

Schema, migrations, writing, pruning and reading, as plain functions on a connection.  One
process writes (`writer.py`, started by `service.CallHistory`); readers use their own
connections (WAL lets them read while the writer writes).  WAL with synchronous=FULL fsyncs
the log at each commit, so a row announced as committed survives a power cut or `kill -9`.

The schema evolves by `MIGRATIONS`: step i takes a database from `user_version` i to
i + 1, each step in its own transaction, so a file of any earlier version opens.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from appliance.history.sql import COLUMNS

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



class CallRecord(NamedTuple):
    """One finished call, as stored: a tuple in `COLUMNS` order (one is built a call, and
    a row is then the tuple as it is)."""

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
        return self._asdict()


assert CallRecord._fields == COLUMNS, "sql.COLUMNS is CallRecord's fields, in order"
_SELECT: Final = f"SELECT id, {', '.join(COLUMNS)} FROM calls"


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


def as_row(record: CallRecord) -> list[object]:
    """A record's values in `COLUMNS` order (as `insert` and the writer's protocol take them)."""
    return list(record)
