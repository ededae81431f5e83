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
