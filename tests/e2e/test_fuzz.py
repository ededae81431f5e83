"""The mutation fuzzer (bench/fuzz.py) against the real daemon: it must stay up, answer,
log no traceback and no ERROR, and keep its descriptors, whatever comes in.

About 50 s: 30 s of datagrams, 20 s of TCP connections (several messages each, some torn,
some ended by a reset), OPTIONS liveness checks all along, a digest REGISTER over UDP and
TCP at the end. A failure prints each kind of traceback once, with its whole text; rerun
`python bench/fuzz.py --seed N --log FILE` for the daemon's full log.
"""

from __future__ import annotations

import pytest

from bench.fuzz import Report, fuzz

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

SEED = 20261204
FD_SLACK = 3  # a listener or log file opened lazily; a leak is one per connection, hundreds here


def _show(report: Report, kinds: dict[str, int]) -> str:
    return "\n\n".join(f"{n} x {sig}\n{report.traceback_examples[sig]}" for sig, n in kinds.items())


def test_fuzzed_udp_and_tcp_leave_the_daemon_well() -> None:
    report = fuzz(seconds=25, count=None, seed=SEED, tcp_share=0.4, say=lambda _: None)  # bench/fuzz.py runs longer
    summary = "\n".join(report.lines())
    assert report.udp_sent > 1000 and report.tcp_sent > 1000, summary
    assert not report.crashed, summary
    assert report.unanswered == 0, summary
    # Late (over 200 ms) but answered: allowed now and then on a shared 2-core box.
    assert report.late <= max(2, report.checks // 50), summary
    assert (report.register_udp, report.register_tcp) == (200, 200), summary

    tracebacks = report.traceback_kinds
    assert report.tracebacks == 0, f"{summary}\n\ntracebacks:\n{_show(report, tracebacks)}"
    assert not report.error_lines, "\n".join([summary, *report.error_lines[:20]])
    assert report.fd_growth <= FD_SLACK, summary
