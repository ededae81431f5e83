"""The history writer: the one process that writes the call history database.

    python -S -m appliance.history.writer PATH MAX_DAYS MAX_ROWS [LOG_LEVEL]

(-S: no site-packages, it needs none; run from the directory that holds `appliance`.)

Why a process and not a thread of the daemon: a writer thread had to win the GIL back from
the busy event loop after every SQLite call, and while it waited, every turn of the loop
woke it for nothing (about 14,000 futex wake-ups a second, a sixth of the edge's calls/s
under a burst).  A process shares no GIL; its only cost to the edge is one pipe write per
batch.

Protocol, one JSON object per line.  In (stdin, from `service.CallHistory`):
`{"rows": [[values in COLUMNS order], ...]}`, and `{"bounds": [max_days, max_rows]}` after
a reload.  Out (stdout): `{"committed": [call ids]}` after each commit, never before.

Every line already waiting is committed in one transaction (group commit: a slow disk
makes bigger transactions, not a backlog).  At end of input (the daemon stopped, or was
killed) the writer commits what it read and exits; a half-written last line is dropped.
A batch that fails is logged and dropped; the writer goes on with the next.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time

from appliance.history.sql import COLUMNS, PRUNE_EVERY, connect, insert, prune

TYPE_CHECKING = False
if TYPE_CHECKING:  # not imported at run time: this process stays small (see history/sql.py)
    from collections.abc import Callable, Iterator
    from typing import IO

READ_SIZE = 1 << 20


def batches(fd: int) -> Iterator[list[bytes]]:
    """The complete lines waiting on `fd`, as one list per read, until end of input."""
    rest = b""
    while chunk := os.read(fd, READ_SIZE):
        *lines, rest = (rest + chunk).split(b"\n")
        if lines:
            yield lines


class Writer:
    """Commits batches of rows and prunes by age and count."""

    def __init__(self, conn: sqlite3.Connection, out: IO[str] | None, max_days: int, max_rows: int, *,
                 log_level: str = "INFO", wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.conn = conn
        self.log_level = log_level
        self.logging_set_up = False
        self.out = out
        self.max_days, self.max_rows = max_days, max_rows
        self.wall, self.monotonic = wall, monotonic
        self.last_prune = monotonic()

    def log(self, level: str, event: str, **values: object) -> None:
        """One log line as the daemon writes them.  `logging` is imported at the first line,
        not at start: most writers never log, and it is a megabyte in a process that stays up."""
        import logging

        from appliance.logs import fields, setup_logging

        if not self.logging_set_up:
            setup_logging(self.log_level)
            self.logging_set_up = True
        logging.getLogger("homepbx.history").log(logging.getLevelName(level), "event=%s %s", event, fields(**values))

    def handle(self, lines: list[bytes]) -> None:
        """One read's lines: new bounds apply at once, all rows go in one transaction."""
        rows: list[list[object]] = []
        for line in lines:
            try:
                message = json.loads(line)
                if "bounds" in message:
                    self.max_days, self.max_rows = (int(n) for n in message["bounds"])
                else:
                    rows.extend(row for row in message["rows"] if len(row) == len(COLUMNS))
            except (ValueError, TypeError, KeyError) as err:
                self.log("ERROR", "history_bad_input", error=err, line=line[:80])
        if rows:
            self.commit(rows)
        if self.monotonic() - self.last_prune >= PRUNE_EVERY:
            self.last_prune = self.monotonic()
            self.prune()

    def commit(self, rows: list[list[object]]) -> None:
        try:
            insert(self.conn, rows)
        except sqlite3.Error as err:
            self.log("ERROR", "history_write_failed", rows=len(rows), error=err)
            return
        if self.out is None:
            return
        try:
            self.out.write(json.dumps({"committed": [row[0] for row in rows]}) + "\n")
            self.out.flush()
        except BrokenPipeError:  # the daemon is gone; what is still to read gets committed all the same
            self.out = None

    def prune(self) -> None:
        try:
            deleted = prune(self.conn, self.wall(), self.max_days, self.max_rows)
        except sqlite3.Error as err:
            self.log("WARNING", "history_prune_failed", error=err)
            return
        if deleted:
            self.log("INFO", "history_pruned", rows=deleted, max_days=self.max_days, max_rows=self.max_rows)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C is the daemon's; this ends at end of input
    conn = connect(argv[0])
    writer = Writer(conn, sys.stdout, int(argv[1]), int(argv[2]), log_level=argv[3] if len(argv) > 3 else "INFO")
    try:
        for lines in batches(sys.stdin.fileno()):
            writer.handle(lines)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
