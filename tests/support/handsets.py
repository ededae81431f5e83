"""Helpers for the pjsua2 handsets (appliance/simulator) in a call with another phone."""

from __future__ import annotations

import time
from pathlib import Path

from appliance.simulator.handset import Handset


def recorded(handset: Handset, call: str, path: Path, tone: int, seconds: float = 1.5) -> str:
    """What the handset hears for `seconds`, while it keeps sending its own `tone`."""
    handset.record(call, path)
    time.sleep(seconds)
    heard = str(handset.stop_media(call)["path"])
    handset.play_tone(call, tone)
    return heard


def listen(parties: list[tuple[Handset, str, int]], tmp: Path, seconds: float = 2.0) -> dict[int, str]:
    """Every party plays its tone and records; returns {tone: recording of that party}."""
    for phone, call, freq in parties:
        phone.play_tone(call, freq)
        phone.record(call, tmp / f"{phone.name}-{freq}-{time.monotonic_ns()}.wav")
    time.sleep(seconds)
    return {freq: str(phone.stop_media(call)["path"]) for phone, call, freq in parties}
