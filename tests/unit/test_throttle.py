"""Tests for appliance.sip.throttle with a fake clock (plain floats)."""

from __future__ import annotations

import pytest

from appliance.sip.throttle import FailureThrottle

A = "192.0.2.1"
B = "192.0.2.2"
T0 = 5000.0


def fail(t: FailureThrottle, n: int, now: float, address: str = A) -> list[float | None]:
    return [t.record_failure(address, now) for _ in range(n)]


def test_nine_failures_do_not_block_tenth_does() -> None:
    t = FailureThrottle()
    assert fail(t, 9, T0) == [None] * 9
    assert not t.is_blocked(A, T0)
    assert t.record_failure(A, T0 + 1) == 60.0
    assert t.is_blocked(A, T0 + 1)
    assert not t.is_blocked(B, T0 + 1)


def test_failures_outside_window_do_not_count() -> None:
    t = FailureThrottle(window=60.0)
    for i in range(30):
        assert t.record_failure(A, T0 + i * 7.0) is None  # ~8.6 per minute: never 10
    assert not t.is_blocked(A, T0 + 300)
    assert t.failure_count(A, T0 + 203) == 9


def test_sliding_window_counts_last_window_only() -> None:
    t = FailureThrottle()
    fail(t, 5, T0)
    fail(t, 4, T0 + 59)
    assert t.record_failure(A, T0 + 61) is None  # the first five have aged out
    assert t.record_failure(A, T0 + 61) is None
    assert t.failure_count(A, T0 + 61) == 6


def test_blocked_for_cooloff_then_free() -> None:
    t = FailureThrottle(cooloff=60.0)
    fail(t, 10, T0)
    assert t.is_blocked(A, T0 + 59.9)
    assert not t.is_blocked(A, T0 + 60.0)
    assert not t.is_blocked(A, T0 + 61.0)


def test_second_block_doubles_and_is_capped() -> None:
    t = FailureThrottle(cooloff=60.0, max_cooloff=200.0)
    now = T0
    durations = []
    for _ in range(4):
        d = fail(t, 10, now)[-1]
        assert d is not None
        durations.append(d)
        now += d
        assert not t.is_blocked(A, now)
    assert durations == [60.0, 120.0, 200.0, 200.0]


def test_failures_while_blocked_do_not_extend() -> None:
    t = FailureThrottle()
    fail(t, 10, T0)
    assert fail(t, 20, T0 + 1) == [None] * 20
    assert not t.is_blocked(A, T0 + 60)


def test_success_resets_counter_not_level() -> None:
    t = FailureThrottle()
    fail(t, 9, T0)
    t.record_success(A, T0 + 1)
    assert fail(t, 9, T0 + 2) == [None] * 9
    assert t.record_failure(A, T0 + 2) == 60.0
    t.record_success(A, T0 + 70)
    assert fail(t, 10, T0 + 71)[-1] == 120.0  # escalation survives a success


def test_escalation_decays_after_quiet_period() -> None:
    t = FailureThrottle(cooloff=60.0, max_cooloff=3600.0)
    fail(t, 10, T0)  # blocked until T0+60, level 1
    fail(t, 10, T0 + 60)  # 120 s, until T0+180, level 2
    assert fail(t, 10, T0 + 180 + 3599)[-1] == 240.0  # not quiet long enough
    end = T0 + 180 + 3599 + 240
    assert fail(t, 10, end + 3600)[-1] == 60.0  # quiet for max_cooloff: forgiven


def test_record_success_unknown_address_is_noop() -> None:
    t = FailureThrottle()
    t.record_success(A, T0)
    assert len(t) == 0
    fail(t, 3, T0)
    t.record_success(A, T0)
    assert len(t) == 0  # nothing left worth tracking


def test_sweep_bounds_memory() -> None:
    t = FailureThrottle()
    for i in range(1000):
        t.record_failure(f"10.0.{i // 256}.{i % 256}", T0)
    fail(t, 10, T0, address=B)
    assert len(t) == 1001
    t.sweep(T0 + 61)
    assert len(t) == 1  # only B, which still has an escalation level
    assert not t.is_blocked(B, T0 + 61)
    t.sweep(T0 + 60 + 3600)
    assert len(t) == 0


def test_max_tracked_caps_memory() -> None:
    t = FailureThrottle(max_tracked=100)
    for i in range(10_000):
        t.record_failure(f"addr{i}", T0)
        assert len(t) <= 100
    assert t.failure_count("addr9999", T0) == 1
    assert t.failure_count("addr0", T0) == 0


def test_blocked_address_survives_eviction_of_its_failure_state() -> None:
    t = FailureThrottle(max_tracked=10)
    fail(t, 10, T0)
    for i in range(50):
        t.record_failure(f"other{i}", T0)
    assert t.is_blocked(A, T0 + 1)


def test_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        FailureThrottle(max_failures=0)
    with pytest.raises(ValueError):
        FailureThrottle(cooloff=100, max_cooloff=10)


def test_blocked_lists_current_blocks_with_their_end() -> None:
    t = FailureThrottle()
    fail(t, 10, T0)
    assert t.blocked(T0 + 1) == {A: T0 + 60}
    assert t.blocked(T0 + 60) == {}
