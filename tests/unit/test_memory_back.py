"""The housekeeping gives memory back after a burst of calls (compacted tables, malloc_trim)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from appliance import daemon as daemon_module
from appliance.daemon import Daemon


class Counts:
    def __init__(self) -> None:
        self.dialog_count = 0
        self.compacted = 0

    def compact(self, now: float = 0.0) -> None:
        self.compacted += 1


def test_trims_when_a_burst_is_over_and_again_when_its_last_dialogs_go(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(daemon_module, "_malloc_trim", lambda pad: trims.append(pad) or 1)
    calls, timers = Counts(), Counts()
    nonces: list[int] = []
    box = SimpleNamespace(calls=calls, timers=timers, nonces=nonces, _dialog_peak=0, _nonce_peak=0,
                          _trim_again=False)

    def tick(dialogs: int) -> None:
        calls.dialog_count = dialogs
        Daemon._give_memory_back(box, 0.0)  # type: ignore[arg-type]

    for dialogs in (10, 200, 400):  # a few calls: nothing to give back
        tick(dialogs)
    tick(0)
    assert trims == []
    for dialogs in (3000, 9000, 10000, 4000, 1300):  # a burst, its linger ending
        tick(dialogs)
    assert trims == []
    tick(1000)  # 1/10 of the peak left
    assert trims == [0] and calls.compacted == 1 and timers.compacted == 1
    tick(600)
    assert len(trims) == 1
    tick(0)  # the last of them gone: once more
    assert len(trims) == 2
    for _ in range(5):
        tick(0)
    assert len(trims) == 2  # and not every second after
    nonces.extend(range(10000))  # the burst's nonces, expiring 300 s on
    tick(0)
    del nonces[1000:]
    tick(0)
    assert len(trims) == 3
