"""The call history store and recorder: migrations, pruning, outcomes from the router's
events, group commit in the writer process, and durability of committed rows."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.config import LiveConfig, parse_config
from appliance.edge.seams import CallEventsFanOut
from appliance.history.recorder import HistoryRecorder, outcome_of
from appliance.history.service import MAX_PENDING, CallHistory
from appliance.history.sql import connect, insert, prune
from appliance.history.store import MIGRATIONS, SCHEMA_VERSION, CallRecord, as_row, migrate, query
from appliance.sip.registrar import Binding, Flow

CONFIG = """
[server]
listen = ["127.0.0.1:5060"]
[[users]]
number = "100"
name = "Kitchen"
password = "pw100"
[[users]]
number = "200"
name = "Family"
password = "pw200"
[[trunks]]
name = "line"
server = "sip.example.net"
username = "u"
password = "p"
outgoing_prefix = "0"
incoming = { "*" = "200" }
"""


def record(n: int, *, started: float = 1000.0, outcome: str = "answered") -> CallRecord:
    return CallRecord(call_id=f"c{n}", started=started, ended=started + 5, caller="100", callee="200",
                      direction="internal", outcome=outcome)


# -- schema ------------------------------------------------------------------------------------
def columns(conn: sqlite3.Connection) -> list[str]:
    return [row[1] for row in conn.execute("PRAGMA table_info(calls)")]


def test_migrations_from_an_empty_file(tmp_path: Path) -> None:
    conn = connect(tmp_path / "h.sqlite3")
    assert migrate(conn) == (0, SCHEMA_VERSION)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert {"forwarded_to", "condition", "trunk", "answered_by", "duration", "reason"} <= set(columns(conn))
    assert migrate(conn) == (SCHEMA_VERSION, SCHEMA_VERSION)  # again: nothing to do


def test_migration_from_v1_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    conn = connect(path)
    assert migrate(conn, MIGRATIONS[:1]) == (0, 1)
    conn.execute("INSERT INTO calls (call_id, started, ended, caller, callee, direction, outcome, duration) "
                 "VALUES ('old', 10, 20, '100', '200', 'internal', 'answered', 8)")
    conn.close()
    history = CallHistory(path, wall=lambda: 100.0)  # pruned by age at open: the row is young
    history.open()
    rows = history.query()
    assert [(r["call_id"], r["duration"], r["forwarded_to"], r["trunk"]) for r in rows] == [("old", 8, "", "")]
    conn = connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert "calls_outcome_started" in {r[1] for r in conn.execute("PRAGMA index_list(calls)")}


def test_a_failed_migration_step_leaves_the_previous_version(tmp_path: Path) -> None:
    conn = connect(tmp_path / "h.sqlite3")
    broken = (*MIGRATIONS[:1], ("ALTER TABLE calls ADD COLUMN x TEXT", "NOT SQL"))
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, broken)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "x" not in columns(conn)


# -- pruning -----------------------------------------------------------------------------------
def test_prune_by_age_and_by_count(tmp_path: Path) -> None:
    conn = connect(tmp_path / "h.sqlite3")
    migrate(conn)
    day = 86400.0
    now = 100 * day
    insert(conn, [as_row(record(i, started=now - (50 - i) * day)) for i in range(50)])  # one a day, the newest today
    assert prune(conn, now, max_days=30, max_rows=0) == 20  # older than 30 days
    assert prune(conn, now, max_days=30, max_rows=10) == 20
    left = query(conn, limit=100)
    assert [r["call_id"] for r in left] == [f"c{i}" for i in range(49, 39, -1)]  # the newest 10
    assert prune(conn, now, max_days=0, max_rows=0) == 0


def test_store_prunes_at_open(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    conn = connect(path)
    migrate(conn)
    insert(conn, [as_row(record(i)) for i in range(5)])
    history = CallHistory(path, max_rows=3, wall=lambda: 2000.0)
    history.open()
    assert [r["call_id"] for r in history.query()] == ["c4", "c3", "c2"]
    assert history.stats.pruned == 2


# -- writing: the writer process ----------------------------------------------------------------
async def started(path: Path, **kwargs: Any) -> tuple[CallHistory, list[list[str]]]:
    committed: list[list[str]] = []
    history = CallHistory(path, on_committed=committed.append, **kwargs)
    await asyncio.to_thread(history.open)
    await history.start()
    return history, committed


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_group_commit_in_the_writer_process_then_announced(tmp_path: Path) -> None:
    async def main() -> None:
        history, committed = await started(tmp_path / "h.sqlite3", batch_seconds=0.2)
        try:
            begun = time.perf_counter()
            for i in range(100):
                history.add(record(i))
            assert time.perf_counter() - begun < 0.05  # add never waits for the disk
            assert committed == []  # nothing announced before it is committed
            await until(lambda: sum(map(len, committed)) >= 100)
            assert sorted(c for batch in committed for c in batch) == sorted(f"c{i}" for i in range(100))
            assert len(committed) == 1  # one line to the writer, one transaction, one announcement
            assert history.stats.commits == 1 and history.stats.rows == 100
            # What was announced is there for another connection (the control socket's reader).
            assert len(await asyncio.to_thread(history.query, limit=1000)) == 100
        finally:
            await history.close()
    asyncio.run(main())


def test_close_writes_what_is_pending(tmp_path: Path) -> None:
    async def main() -> None:
        history, _ = await started(tmp_path / "h.sqlite3", batch_seconds=10.0)
        await until(lambda: history._proc is not None)
        history.add(record(1))
        await history.close()
    asyncio.run(main())
    conn = connect(tmp_path / "h.sqlite3")
    assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] == 1


def test_a_writer_that_dies_is_started_again_and_rows_wait_for_it(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        history, committed = await started(tmp_path / "h.sqlite3", batch_seconds=0.01)
        try:
            await until(lambda: history._proc is not None)
            first = history._proc
            assert first is not None
            first.kill()
            await until(lambda: history._proc is None)
            history.add(record(7))  # no writer now: the row waits
            await until(lambda: history._proc is not None and history._proc is not first)
            await until(lambda: committed == [["c7"]])
        finally:
            await history.close()
    asyncio.run(main())
    assert "event=history_writer_exited" in caplog.text


def test_rows_wait_for_a_writer_bounded_and_the_drop_is_logged_once(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        history = CallHistory(tmp_path / "h.sqlite3", batch_seconds=0.01)
        history.open()  # no writer started: every row waits
        for i in range(MAX_PENDING + 5):
            history.add(record(i))
        await asyncio.sleep(0.05)  # flushes find no writer and try again later
        assert history.waiting == MAX_PENDING
        assert history.stats.dropped == 5
        await history.close()
    asyncio.run(main())
    assert caplog.text.count("event=history_rows_dropped") == 1
    assert "event=history_rows_lost" in caplog.text  # what still waited at stop is said


def run_writer(path: Path, *args: str) -> subprocess.Popen[str]:
    conn = connect(path)
    migrate(conn)
    conn.close()
    return subprocess.Popen([sys.executable, "-S", "-m", "appliance.history.writer", str(path), "0", "0", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])


def rows_line(*numbers: int) -> str:
    return json.dumps({"rows": [as_row(record(n)) for n in numbers]}) + "\n"


def test_the_writer_process_stays_lean() -> None:
    """It runs as long as the daemon: none of the heavier modules at start (a few MB each time)."""
    heavy = ("logging", "dataclasses", "pathlib", "typing", "asyncio")
    probe = f"import sys, appliance.history.writer; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"


def test_writer_commits_what_it_read_when_the_daemon_is_gone(tmp_path: Path) -> None:
    """The daemon killed: the writer reads to the end of the pipe, commits, exits cleanly."""
    proc = run_writer(tmp_path / "h.sqlite3")
    assert proc.stdin is not None
    proc.stdin.write(rows_line(1, 2) + rows_line(3) + '{"rows": [["half a li')  # cut mid-line
    proc.stdin.close()
    assert proc.wait(10) == 0
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    conn = connect(tmp_path / "h.sqlite3")
    assert sorted(r[0] for r in conn.execute("SELECT call_id FROM calls")) == ["c1", "c2", "c3"]


def test_writer_answers_bad_input_with_one_error_and_goes_on(tmp_path: Path) -> None:
    proc = run_writer(tmp_path / "h.sqlite3")
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write("not json\n" + '{"nothing": 1}\n' + '{"rows": [[1, 2]]}\n')  # a short row is skipped
    proc.stdin.flush()
    proc.stdin.write(rows_line(5))
    proc.stdin.close()
    assert json.loads(proc.stdout.readline()) == {"committed": ["c5"]}
    assert proc.wait(10) == 0
    errors = proc.stderr.read()
    assert errors.count("event=history_bad_input") == 2 and "Traceback" not in errors


def test_committed_rows_survive_kill_9(tmp_path: Path) -> None:
    """The writer killed mid-burst: every row it announced is in the file, which is sound."""
    path = tmp_path / "h.sqlite3"
    proc = run_writer(path)
    assert proc.stdin is not None and proc.stdout is not None
    announced: list[str] = []
    n = 0
    while len(announced) < 300:
        proc.stdin.write(rows_line(*range(n, n + 7)))
        proc.stdin.flush()
        n += 7
        announced.extend(json.loads(proc.stdout.readline())["committed"])
    for _ in range(20):  # more in flight as it dies
        proc.stdin.write(rows_line(*range(n, n + 7)))
        n += 7
    proc.stdin.flush()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for line in proc.stdout.read().splitlines():  # lines it printed before dying
        announced.extend(json.loads(line)["committed"])
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {row[0] for row in conn.execute("SELECT call_id FROM calls")}
    assert set(announced) <= stored


# -- outcomes from events -----------------------------------------------------------------------
@pytest.mark.parametrize(("direction", "kwargs", "reason", "expected"), [
    ("internal", {"answered": True}, "bye_from_caller", "answered"),
    ("internal", {"rang": True}, "status_480", "missed"),
    ("internal", {"rang": True}, "status_487", "missed"),
    ("internal", {}, "status_487", "cancelled"),
    ("internal", {"rang": True}, "status_603", "declined"),
    ("internal", {"rang": True}, "status_486", "busy"),
    ("incoming", {"rang": True}, "status_600", "busy"),
    ("internal", {"forwarded": True, "answered": True}, "bye_from_callee", "forwarded"),
    ("internal", {"voicemail": True}, "caller_hangup", "voicemail"),
    ("outgoing", {}, "status_487", "cancelled"),
    ("outgoing", {}, "status_480", "failed"),
    ("outgoing", {}, "status_503", "failed"),
    ("internal", {}, "no_media_worker", "failed"),
])
def test_outcome_mapping(direction: str, kwargs: dict[str, bool], reason: str, expected: str) -> None:
    flags = {"answered": False, "rang": False, "forwarded": False, "voicemail": False, **kwargs}
    assert outcome_of(direction, reason=reason, **flags) == expected


class Rows:
    def __init__(self) -> None:
        self.rows: list[CallRecord] = []

    def add(self, record: CallRecord) -> None:
        self.rows.append(record)


class Devices:
    def get(self, binding_id: str) -> Binding | None:
        if binding_id != "b1":
            return None
        return Binding("b1", "200", "sip:200@192.0.2.5", None, "x", 1, 0, 0, Flow("udp", "192.0.2.5", 5062, ""),
                       user_agent="Yealink T46")


def recorder() -> tuple[HistoryRecorder, Rows, list[float]]:
    now = [1000.0]
    settings = LiveConfig(parse_config(CONFIG, Path("/etc/homepbx/config.toml")))
    rows = Rows()
    return HistoryRecorder(settings, Devices(), rows, wall=lambda: now[0]), rows, now


def test_recorder_internal_answered_call() -> None:
    rec, rows, now = recorder()
    events = CallEventsFanOut(rec)
    events.call_started("t1", "100", "200", "dev100")
    events.device_ringing("t1", "b1")
    now[0] += 4
    events.call_answered("t1", "b1")
    now[0] += 60
    assert rows.rows == []  # nothing written while the call goes on
    events.call_ended("t1", "bye_from_caller")
    (row,) = rows.rows
    assert (row.direction, row.outcome, row.caller_name, row.callee_name) == ("internal", "answered", "Kitchen",
                                                                              "Family")
    assert (row.started, row.answered, row.ended, row.duration) == (1000.0, 1004.0, 1064.0, 60.0)
    assert (row.answered_by, row.answered_number) == ("Yealink T46", "200")


def test_recorder_outside_calls_and_forwarding() -> None:
    rec, rows, now = recorder()
    rec.call_started("in", "+4930123", "200", None, trunk="line", caller_name="Grandma")
    rec.device_ringing("in", "b1")
    rec.call_ended("in", "status_487")
    rec.call_started("out", "100", "0301234", "dev100", trunk="line")
    rec.call_answered("out", None)
    now[0] += 30
    rec.call_ended("out", "bye_from_callee")
    rec.call_started("fw", "100", "200", "dev100")
    rec.call_forwarded("fw", "200", "100", "no_answer")
    rec.call_ended("fw", "status_480")
    incoming, outgoing, forwarded = rows.rows
    assert (incoming.direction, incoming.outcome, incoming.caller_name, incoming.trunk) == (
        "incoming", "missed", "Grandma", "line")
    assert (outgoing.direction, outgoing.outcome, outgoing.duration, outgoing.answered_number) == (
        "outgoing", "answered", 30.0, "0301234")
    assert (forwarded.outcome, forwarded.forwarded_to, forwarded.condition) == ("forwarded", "100", "no_answer")
    rec.call_ended("unknown", "status_480")  # a call it never saw start: nothing
    assert len(rows.rows) == 3
