"""The tone measure every audio test relies on (appliance/simulator/tones.py)."""

from __future__ import annotations

import math

from appliance.simulator import tones
from appliance.simulator.tones import Signal

RATE = 8000


def sine(freq: float, seconds: float, amplitude: float = 0.5, phase: float = 0.0) -> list[float]:
    return [amplitude * math.sin(2 * math.pi * freq * i / RATE + phase) for i in range(int(seconds * RATE))]


def test_a_clean_tone_is_the_whole_signal_and_another_frequency_is_not_there() -> None:
    sig = Signal(RATE, tuple(sine(440, 1.5)))
    assert tones.tone_level_db(sig, 440, skip=0) > -0.5
    assert tones.tone_level_db(sig, 1000, skip=0) < -40


def test_a_frame_slipped_between_two_media_clocks_costs_the_tone_nothing() -> None:
    """A 10-ms frame lost in the middle (a phase jump, inaudible) used to cost a
    whole-file Goertzel ~5 dB and fail tone tests at random under CPU load."""
    first = sine(440, 0.75)
    second = sine(440, 0.75, phase=2 * math.pi * 440 * 0.01 + math.pi / 2)  # 10 ms skipped, and then some
    sig = Signal(RATE, tuple(first + second))
    assert tones.tone_level_db(sig, 440, skip=0) > -2.0  # a whole-file bin: -7 dB


def test_two_tones_are_told_apart() -> None:
    mixed = [a + b for a, b in zip(sine(440, 1.0, 0.3), sine(1000, 1.0, 0.3), strict=True)]
    sig = Signal(RATE, tuple(mixed))
    assert -4.0 < tones.tone_level_db(sig, 440, skip=0) < -2.0
    assert -4.0 < tones.tone_level_db(sig, 1000, skip=0) < -2.0
    assert tones.tone_level_db(sig, 697, skip=0) < -30
