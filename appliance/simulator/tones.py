"""Pure-python tone measurement on recorded WAV files.

Handsets record what they hear to 16-bit mono WAV files; tests then ask
"is there 440 Hz in here, and how strongly?".  A Goertzel filter per
frequency of interest is cheap enough in pure Python (no numpy on the
appliance) for a few seconds of telephone audio.

Levels are relative: ``tone_level_db`` is the power at one frequency versus
the total power of the signal, so 0 dB means "all of it", about -3 dB or
better means "clearly the main tone" and below -30 dB means "not there".
"""

from __future__ import annotations

import math
import os
import sys
import wave
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "DEFAULT_SKIP",
    "Signal",
    "dominant_tones",
    "goertzel_power",
    "load_wav",
    "tone_envelope",
    "tone_level_db",
    "tone_power",
    "total_power",
]

DEFAULT_SKIP = 0.3
"""Seconds ignored at the start: jitter buffer fill and codec start-up."""

SILENCE_DB = -120.0
"""Level reported for a silent or empty signal."""

TELEPHONY_TONES: tuple[float, ...] = (
    350.0,
    400.0,
    425.0,
    440.0,
    450.0,
    480.0,
    620.0,
    697.0,
    770.0,
    852.0,
    941.0,
    1000.0,
    1209.0,
    1336.0,
    1477.0,
    1633.0,
    2000.0,
)
"""Default candidates for dominant_tones: dial/ring/busy tones, DTMF, 1 kHz."""

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Signal:
    """Samples scaled to [-1, 1) and their sample rate."""

    rate: int
    samples: tuple[float, ...]

    @property
    def duration(self) -> float:
        return len(self.samples) / self.rate if self.rate else 0.0


def _read_wav(path: str, skip: float) -> Signal:
    with wave.open(path, "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: need 16-bit samples, got {8 * wav.getsampwidth()}-bit")
        channels = wav.getnchannels()
        rate = wav.getframerate()
        raw = wav.readframes(wav.getnframes())
    pcm = array("h")
    pcm.frombytes(raw[: len(raw) - len(raw) % 2])
    if sys.byteorder == "big":
        pcm.byteswap()
    if channels > 1:
        pcm = pcm[::channels]  # first channel is enough for tone checks
    start = min(int(skip * rate), len(pcm))
    return Signal(rate, tuple(s / 32768.0 for s in pcm[start:]))


@lru_cache(maxsize=16)
def _cached(path: str, mtime_ns: int, size: int, skip: float) -> Signal:
    return _read_wav(path, skip)


def load_wav(wav_path: PathLike, skip: float = DEFAULT_SKIP) -> Signal:
    """Read a 16-bit WAV file, dropping the first `skip` seconds (cached per
    file version, since tests usually ask about several frequencies)."""
    path = os.fspath(wav_path)
    st = os.stat(path)
    return _cached(path, st.st_mtime_ns, st.st_size, float(skip))


def _signal(source: PathLike | Signal, skip: float) -> Signal:
    return source if isinstance(source, Signal) else load_wav(source, skip)


def goertzel_power(samples: Sequence[float], rate: int, freq: float) -> float:
    """Mean-square power of the `freq` component (a full-scale sine at that
    frequency gives 0.5).  A Hann window keeps nearby tones apart."""
    n = len(samples)
    if n < 2 or rate <= 0:
        return 0.0
    coeff = 2.0 * math.cos(2.0 * math.pi * freq / rate)
    step = 2.0 * math.pi / (n - 1)
    s1 = s2 = 0.0
    wsum = 0.0
    cos = math.cos
    for i, x in enumerate(samples):
        w = 0.5 - 0.5 * cos(step * i)
        wsum += w
        s0 = x * w + coeff * s1 - s2
        s2 = s1
        s1 = s0
    mag2 = s1 * s1 + s2 * s2 - coeff * s1 * s2
    if wsum <= 0:
        return 0.0
    amplitude = 2.0 * math.sqrt(max(mag2, 0.0)) / wsum
    return amplitude * amplitude / 2.0


def total_power(wav_path: PathLike | Signal, *, skip: float = DEFAULT_SKIP) -> float:
    """Mean-square power of the whole signal (after `skip`)."""
    sig = _signal(wav_path, skip)
    if not sig.samples:
        return 0.0
    return math.fsum(x * x for x in sig.samples) / len(sig.samples)


POWER_WINDOW = 0.5
"""Seconds per Goertzel window in `tone_power`: 2-Hz bins, so 425, 440 and 450 Hz (dial tones) stay apart."""


def tone_power(wav_path: PathLike | Signal, freq: float, *, skip: float = DEFAULT_SKIP) -> float:
    """Absolute mean-square power at `freq` (0.5 = full-scale sine): the mean of its power
    in each `POWER_WINDOW`, not one Goertzel over the whole file. A whole-file bin is a
    fraction of a hertz wide, so one 10-ms frame slipped between two media clocks (a
    phase jump nobody hears) split the tone across it and cost it ~5 dB; per window the
    slip touches one window only."""
    sig = _signal(wav_path, skip)
    size = int(POWER_WINDOW * sig.rate)
    samples = sig.samples
    if size < 2 or len(samples) < 2 * size:
        return goertzel_power(samples, sig.rate, freq)
    starts = range(0, len(samples) - size + 1, size)
    return math.fsum(goertzel_power(samples[i:i + size], sig.rate, freq) for i in starts) / len(starts)


def _ratio_db(part: float, whole: float) -> float:
    if whole <= 0.0 or part <= 0.0:
        return SILENCE_DB
    return max(10.0 * math.log10(part / whole), SILENCE_DB)


def tone_level_db(wav_path: PathLike | Signal, freq: float, *, skip: float = DEFAULT_SKIP) -> float:
    """Power at `freq` relative to the total power, in dB (0 = pure tone).

    A silent file gives SILENCE_DB, so "no audio" never looks like a tone.
    """
    sig = _signal(wav_path, skip)
    return _ratio_db(tone_power(sig, freq), total_power(sig))


def dominant_tones(
    wav_path: PathLike | Signal,
    candidates: Iterable[float] = TELEPHONY_TONES,
    *,
    min_db: float = -10.0,
    skip: float = DEFAULT_SKIP,
) -> list[tuple[float, float]]:
    """Candidate frequencies at least `min_db` relative to the total power,
    as (freq, level_db), strongest first."""
    sig = _signal(wav_path, skip)
    whole = total_power(sig)
    levels = [(float(f), _ratio_db(tone_power(sig, f), whole)) for f in candidates]
    return sorted((x for x in levels if x[1] >= min_db), key=lambda x: -x[1])


def tone_envelope(
    wav_path: PathLike | Signal,
    freq: float,
    *,
    window: float = 0.1,
    skip: float = 0.0,
) -> list[float]:
    """Level of `freq` per `window` seconds, in dB relative to full scale
    (a full-scale sine is about -3 dB; silence gives SILENCE_DB).  Useful for
    cadences such as ringback: on/off shows up as high/low runs."""
    sig = _signal(wav_path, skip)
    size = max(int(window * sig.rate), 2)
    out = []
    for start in range(0, len(sig.samples) - size + 1, size):
        chunk = sig.samples[start : start + size]
        out.append(_ratio_db(goertzel_power(chunk, sig.rate, freq), 1.0))
    return out
