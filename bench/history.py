"""The call history database: writes per call, the History view's query with 100,000 rows,
insert throughput. Figures, not a test.

In-process, on a temporary directory (the disk under it decides the fsync cost):

1. writes per call: calls end one at a time (each alone in its commit), then a burst of
   `--burst` calls ending at once (group commit); SQL statements counted by SQLite's trace
   callback on the writer's connection, commits by the writer;
2. insert throughput: `--rows` records handed to `CallHistory.add` as fast as possible,
   timed until the last is committed, and the longest `add` call (what the event loop pays);
3. query time: the History view's query (`history` command: newest 200, and missed only)
   on a table of `--rows` rows, p50/p95 over `--queries` runs, plus a page deep in the past.

    .venv/bin/python bench/history.py [--rows 100000] [--burst 1000] [--queries 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.config import LiveConfig, parse_config  # noqa: E402
from appliance.history.recorder import HistoryRecorder  # noqa: E402
from appliance.history.store import CallHistory, CallRecord  # noqa: E402
from appliance.sip.registrar import Binding  # noqa: E402

CONFIG = """
[[users]]
number = "100"
password = "x"
[[users]]
number = "200"
password = "y"
"""
OUTCOMES = ("answered", "answered", "answered", "missed", "busy", "declined", "forwarded", "cancelled")


class NoDevices:
    def get(self, binding_id: str) -> Binding | None:
        return None


def wait_rows(history: CallHistory, rows: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while history.stats.rows < rows:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{history.stats.rows} of {rows} rows committed")
        time.sleep(0.001)


def counted(history: CallHistory) -> list[str]:
    statements: list[str] = []
    assert history._writer is not None
    history._writer.set_trace_callback(statements.append)
    return statements


def writes_per_call(tmp: Path, burst: int) -> None:
    history = CallHistory(tmp / "writes.sqlite3")
    history.open()
    statements = counted(history)
    recorder = HistoryRecorder(LiveConfig(parse_config(CONFIG, tmp / "config.toml")), NoDevices(), history)

    def call(n: int) -> None:
        token = f"t{n}"
        recorder.call_started(token, "100", "200", "dev")
        recorder.device_ringing(token, "b1")
        recorder.call_answered(token, "b1")
        recorder.call_ended(token, "bye_from_caller")

    singles = 20
    for n in range(singles):
        call(n)
        wait_rows(history, n + 1)
    single_statements, single_commits = len(statements), history.stats.commits
    statements.clear()
    commits_before = history.stats.commits
    for n in range(burst):
        call(singles + n)
    wait_rows(history, singles + burst)
    burst_commits = history.stats.commits - commits_before
    history.close()
    print(f"writes per call, calls ending one at a time ({singles}): "
          f"{single_statements / singles:.1f} SQL statements, {single_commits / singles:.2f} commits "
          "(one fsync of the WAL each, synchronous=FULL)")
    print(f"writes per call, a burst of {burst} calls ending at once: {len(statements) / burst:.3f} SQL statements, "
          f"{burst_commits / burst:.4f} commits ({burst_commits} commits for {burst} rows)")


def record(n: int, now: float) -> CallRecord:
    outcome = OUTCOMES[n % len(OUTCOMES)]
    started = now - (100_000 - n) * 60.0
    answered = started + 4 if outcome in ("answered", "forwarded") else None
    return CallRecord(call_id=f"c{n}", started=started, ended=started + 90, caller=f"{100 + n % 50}",
                      callee="200", direction="internal", outcome=outcome, answered=answered,
                      caller_name="Someone", callee_name="Family",
                      answered_by="Yealink T46S" if answered else "", answered_number="200" if answered else "",
                      duration=86.0 if answered else 0.0, reason="bye_from_caller")


def throughput(tmp: Path, rows: int) -> CallHistory:
    now = time.time()
    history = CallHistory(tmp / "big.sqlite3", max_rows=0, max_days=0)
    history.open()
    records = [record(n, now) for n in range(rows)]
    longest = 0.0
    started = time.perf_counter()
    for r in records:
        t0 = time.perf_counter()
        history.add(r)
        longest = max(longest, time.perf_counter() - t0)
    wait_rows(history, rows, timeout=600)
    elapsed = time.perf_counter() - started
    print(f"insert throughput: {rows} rows in {elapsed:.2f} s = {rows / elapsed:,.0f} rows/s, "
          f"{history.stats.commits} commits; longest add() on the caller's thread {longest * 1e6:.0f} µs")
    return history


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def query_times(history: CallHistory, queries: int, rows: int) -> None:
    for label, options in (("newest 200", {}), ("missed only, newest 200", {"missed_only": True}),
                           ("a page of 200 half-way back", {"before": time.time() - rows / 2 * 60.0})):
        times = []
        for _ in range(queries):
            t0 = time.perf_counter()
            found = history.query(limit=200, **options)  # type: ignore[arg-type]
            times.append(time.perf_counter() - t0)
        assert len(found) == 200
        print(f"History view query with {rows:,} rows, {label}: p50 {statistics.median(times) * 1000:.2f} ms, "
              f"p95 {percentile(times, 95) * 1000:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="homepbx-history-") as directory:
        tmp = Path(directory)
        writes_per_call(tmp, args.burst)
        history = throughput(tmp, args.rows)
        try:
            query_times(history, args.queries, args.rows)
        finally:
            history.close()
        size = (tmp / "big.sqlite3").stat().st_size
        print(f"database size with {args.rows:,} rows: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
