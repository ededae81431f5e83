"""Helpers for the pjsua2 handsets (appliance/simulator) in a call with another phone."""

from __future__ import annotations

import time
from pathlib import Path

from appliance.simulator import tones
from appliance.simulator.handset import Handset


def recorded(handset: Handset, call: str, path: Path, tone: int, seconds: float = 1.5) -> str:
    """What the handset hears for `seconds`, while it keeps sending its own `tone`."""
    handset.record(call, path)
    time.sleep(seconds)
    heard = str(handset.stop_media(call)["path"])
    handset.play_tone(call, tone)
    return heard


def until_heard(handset: Handset, call: str, tmp: Path, own: int, heard: int, level: float,
                timeout: float = 5.0) -> None:
    """Wait until the handset hears the `heard` tone above `level` dB in a short recording:
    a softphone's tone starts a moment after its media is up, later under load (each probe
    is 0.6 s: tones.DEFAULT_SKIP ignores the first 0.3)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = recorded(handset, call, tmp / f"probe-{time.monotonic_ns()}.wav", own, 0.6)
        if tones.tone_level_db(probe, heard) > level:
            return
        assert time.monotonic() < deadline, f"no {heard} Hz tone within {timeout} s"


def listen(parties: list[tuple[Handset, str, int]], tmp: Path, seconds: float = 2.0) -> dict[int, str]:
    """Every party plays its tone and records; returns {tone: recording of that party}."""
    for phone, call, freq in parties:
        phone.play_tone(call, freq)
        phone.record(call, tmp / f"{phone.name}-{freq}-{time.monotonic_ns()}.wav")
    time.sleep(seconds)
    return {freq: str(phone.stop_media(call)["path"]) for phone, call, freq in parties}
