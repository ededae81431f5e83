"""Auth-failure throttling per source address (sans-I/O: time is passed in).

After ``max_failures`` failed authentications within ``window`` seconds an
address is ignored for a cool-off; each further block doubles the cool-off
(capped at ``max_cooloff``), so a password-guessing bot slows to a crawl while
a handset with a mistyped password recovers quickly once fixed.

The "address" is whatever key the caller chooses: an IPv4 address, or for
IPv6 preferably the /64 prefix, since a single host can rotate through a /64.
"""

from __future__ import annotations

__all__ = ["FailureThrottle"]


class _Entry:
    """Failure state of one address."""

    __slots__ = ("failures", "level", "quiet_from")

    def __init__(self) -> None:
        # Times of the recent failures (at most max_failures, oldest first).
        self.failures: list[float] = []
        # Number of blocks so far; the next cool-off is cooloff * 2**level.
        self.level = 0
        # Start of the current quiet period: the later of the last failure and
        # the end of the last block (time spent blocked is not "behaving").
        self.quiet_from = float("-inf")


class FailureThrottle:
    """Counts auth failures per source address; past `max_failures` within `window` seconds
    the address is blocked for a cool-off that doubles on each new block (capped).

    The ``max_failures``-th failure inside the window starts the block (so
    with the defaults, 9 quick failures pass and the 10th blocks). The
    escalation level resets once the address has gone ``max_cooloff`` seconds
    without a failure, counted from the end of its last block.

    Memory is bounded: at most ``max_tracked`` addresses are tracked (least
    recently failing evicted first), and at most ``max_tracked`` blocks are
    held (oldest dropped first); :meth:`sweep` drops entries carrying no state.
    """

    __slots__ = (
        "_blocked",
        "_cooloff",
        "_entries",
        "_max_cooloff",
        "_max_failures",
        "_max_tracked",
        "_window",
    )

    def __init__(
        self,
        max_failures: int = 10,
        window: float = 60.0,
        cooloff: float = 60.0,
        max_cooloff: float = 3600.0,
        max_tracked: int = 50_000,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        if window <= 0 or cooloff <= 0 or max_cooloff < cooloff:
            raise ValueError("need window > 0 and 0 < cooloff <= max_cooloff")
        if max_tracked < 1:
            raise ValueError("max_tracked must be >= 1")
        self._max_failures = max_failures
        self._window = float(window)
        self._cooloff = float(cooloff)
        self._max_cooloff = float(max_cooloff)
        self._max_tracked = max_tracked
        # Kept apart from the failure state so the hot path is one dict lookup
        # in a (normally tiny or empty) dict. address -> blocked until.
        self._blocked: dict[str, float] = {}
        self._entries: dict[str, _Entry] = {}

    def is_blocked(self, address: str, now: float) -> bool:
        """True while ``address`` is in a cool-off: drop its requests unanswered."""
        until = self._blocked.get(address)
        if until is None:
            return False
        if now < until:
            return True
        del self._blocked[address]
        return False

    def record_failure(self, address: str, now: float) -> float | None:
        """Count one failed authentication; return the cool-off if this failure started a block."""
        entries = self._entries
        entry = entries.pop(address, None)  # re-inserted below: keeps LRU order
        if entry is None:
            entry = _Entry()
        entries[address] = entry
        if len(entries) > self._max_tracked:
            del entries[next(iter(entries))]

        if self.is_blocked(address, now):
            # The caller should have dropped it unanswered; don't extend the block.
            return None
        if entry.level and now - entry.quiet_from >= self._max_cooloff:
            entry.level = 0  # long enough on good behaviour: forgive
        entry.quiet_from = now

        failures = entry.failures
        horizon = now - self._window
        while failures and failures[0] <= horizon:
            del failures[0]
        failures.append(now)
        if len(failures) < self._max_failures:
            return None

        failures.clear()
        duration = min(self._cooloff * 2.0 ** min(entry.level, 64), self._max_cooloff)
        entry.level += 1
        until = now + duration
        entry.quiet_from = until
        blocked = self._blocked
        blocked[address] = until
        if len(blocked) > self._max_tracked:
            del blocked[next(iter(blocked))]
        return duration

    def record_success(self, address: str, now: float) -> None:
        """Reset the failure count after a good authentication; the escalation level stays."""
        entry = self._entries.get(address)
        if entry is None:
            return
        entry.failures.clear()
        if entry.level == 0:
            del self._entries[address]

    def sweep(self, now: float) -> None:
        """Drop expired blocks and entries that no longer carry state (call periodically)."""
        self._blocked = {a: u for a, u in self._blocked.items() if now < u}
        horizon = now - self._window
        keep: dict[str, _Entry] = {}
        for address, entry in self._entries.items():
            if entry.level and now - entry.quiet_from >= self._max_cooloff:
                entry.level = 0
            failures = entry.failures
            while failures and failures[0] <= horizon:
                del failures[0]
            if entry.level or failures:
                keep[address] = entry
        self._entries = keep

    def blocked(self, now: float) -> dict[str, float]:
        """Addresses in a cool-off now, with the time each block ends (for status displays)."""
        return {a: u for a, u in self._blocked.items() if now < u}

    def failure_count(self, address: str, now: float) -> int:
        """Failures of ``address`` inside the current window (for status displays and tests)."""
        entry = self._entries.get(address)
        if entry is None:
            return 0
        horizon = now - self._window
        return sum(1 for t in entry.failures if t > horizon)

    def __len__(self) -> int:
        """Number of addresses with failure state (memory-bound checks)."""
        return len(self._entries)
