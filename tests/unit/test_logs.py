"""Log lines a stranger can trigger: escaped, and rate-limited per source."""

from __future__ import annotations

import logging

import pytest

from appliance.logs import PerSourceLimit, fields, log_limited


def test_fields_escape_what_could_forge_a_line() -> None:
    assert str(fields(ua="x\r\nERROR fake")) == 'ua="x\\r\\nERROR fake"'
    assert str(fields(host="ünï")) == "host=\\xfcn\\xef"
    assert str(fields(a="b c", d="")) == 'a="b c" d=""'


def test_one_line_per_source_per_interval_and_the_held_back_count() -> None:
    limit = PerSourceLimit(interval=10.0)
    assert [limit.allow("a", t) for t in (0.0, 1.0, 2.0, 9.9, 10.0, 10.5, 25.0)] == [0, None, None, None, 3, None, 1]
    assert limit.allow("b", 1.0) == 0  # another source is not held back by the first


def test_memory_is_bounded() -> None:
    limit = PerSourceLimit(interval=10.0, max_sources=100)
    for i in range(1000):
        limit.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limit._sources) == 100


def test_log_limited_reports_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.limited")
    limit = PerSourceLimit(interval=10.0)
    with caplog.at_level(logging.WARNING, logger="test.limited"):
        for t in range(12):
            log_limited(logger, limit, "1.2.3.4", float(t), "malformed", peer="1.2.3.4")
    assert [r.getMessage() for r in caplog.records] == [
        "event=malformed peer=1.2.3.4", "event=malformed peer=1.2.3.4 suppressed=9"]
