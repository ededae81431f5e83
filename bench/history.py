"""The call history database: writes per call, the History view's query with 100,000 rows,
insert throughput. Figures, not a test.

The daemon's `CallHistory` with its writer process, on a temporary directory (the disk
under it decides the fsync cost):

1. commits per call: calls end one at a time (each alone in its commit), then a burst of
   `--burst` calls ending at once (group commit), commits as the writer announced them;
2. insert throughput: `--rows` records handed to `CallHistory.add` as fast as possible,
   timed until the last is committed, and the longest `add` call (what the event loop pays);
3. query time: the History view's query (`history` command: newest 200, and missed only)
   on a table of `--rows` rows, p50/p95 over `--queries` runs, plus a page deep in the past.

    .venv/bin/python bench/history.py [--rows 100000] [--burst 1000] [--queries 200]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.config import LiveConfig, parse_config  # noqa: E402
from appliance.history.recorder import HistoryRecorder  # noqa: E402
from appliance.history.service import CallHistory  # noqa: E402
from appliance.history.store import CallRecord  # noqa: E402
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


async def wait_rows(history: CallHistory, rows: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while history.stats.rows < rows:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{history.stats.rows} of {rows} rows committed")
        await asyncio.sleep(0.001)


async def opened(path: Path, max_days: int = 365, max_rows: int = 100_000) -> CallHistory:
    history = CallHistory(path, max_days=max_days, max_rows=max_rows)
    history.open()
    await history.start()
    return history


async def writes_per_call(tmp: Path, burst: int) -> None:
    history = await opened(tmp / "writes.sqlite3")
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
        await wait_rows(history, n + 1)
    single_commits = history.stats.commits
    for n in range(burst):
        call(singles + n)
    await wait_rows(history, singles + burst)
    burst_commits = history.stats.commits - single_commits
    await history.close()
    print(f"writes per call, calls ending one at a time ({singles}): {single_commits / singles:.2f} commits "
          "(one fsync of the WAL each, synchronous=FULL)")
    print(f"writes per call, a burst of {burst} calls ending at once: "
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


async def throughput(tmp: Path, rows: int) -> CallHistory:
    now = time.time()
    history = await opened(tmp / "big.sqlite3", max_rows=0, max_days=0)
    records = [record(n, now) for n in range(rows)]
    gc.collect()
    gc.freeze()  # the 100,000 records made here are the bench's, not the daemon's: keep them out of GC pauses
    longest = 0.0
    started = time.perf_counter()
    for n, r in enumerate(records):
        t0 = time.perf_counter()
        history.add(r)
        longest = max(longest, time.perf_counter() - t0)
        if n % 100 == 99:  # the event loop turns between calls ending, as in the daemon
            await asyncio.sleep(0)
        while history.waiting > 5000:  # faster than any PBX: keep under the rows it would drop
            await asyncio.sleep(0.001)
    await wait_rows(history, rows, timeout=600)
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
            found = history.query(limit=200, **options)
            times.append(time.perf_counter() - t0)
        assert len(found) == 200
        print(f"History view query with {rows:,} rows, {label}: p50 {statistics.median(times) * 1000:.2f} ms, "
              f"p95 {percentile(times, 95) * 1000:.2f} ms")


async def run(tmp: Path, rows: int, burst: int, queries: int) -> None:
    await writes_per_call(tmp, burst)
    history = await throughput(tmp, rows)
    try:
        query_times(history, queries, rows)
    finally:
        await history.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="homepbx-history-") as directory:
        tmp = Path(directory)
        asyncio.run(run(tmp, args.rows, args.burst, args.queries))
        size = (tmp / "big.sqlite3").stat().st_size
        print(f"database size with {args.rows:,} rows: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
