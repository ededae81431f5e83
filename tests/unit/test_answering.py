"""The answering machine's judgement of a recording, and its prompts (appliance/media/answering.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.media import answering, render_prompts
from appliance.media import protocol as P
from appliance.media.render_prompts import PROMPTS
from tests.e2e.test_voicemail import silence_wav, tone_wav


def test_a_recording_is_a_message_when_long_and_loud_enough(tmp_path: Path) -> None:
    assert answering.is_message(tone_wav(tmp_path / "ok.wav", 440, 2.0))
    assert not answering.is_message(tone_wav(tmp_path / "short.wav", 440, P.VOICEMAIL_MIN_S - 0.2))
    assert not answering.is_message(silence_wav(tmp_path / "silent.wav", 5.0))
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\0\0\0\0WAVE")
    assert not answering.is_message(broken)
    assert not answering.is_message(tmp_path / "missing.wav")


def test_wav_length_and_level(tmp_path: Path) -> None:
    wav = tone_wav(tmp_path / "t.wav", 440, 1.5)
    assert abs(answering.wav_seconds(wav) - 1.5) < 0.01
    assert 5000 < answering.wav_rms(wav) < 6000  # 8000 peak: 8000/sqrt(2)


def test_caller_numbers_and_count_words() -> None:
    assert answering.caller_number('"Grandpa" <sip:100@home.arpa>') == "100"
    assert answering.caller_number("<sip:+4930123@sip.example.net>") == "+4930123"
    assert answering.caller_number("") == ""
    assert answering.count_words(3) == "n3" and answering.count_words(21) == "many"
    assert all(answering.count_words(n) in PROMPTS for n in range(30))


def test_prompts_render_with_espeak_ng(tmp_path: Path) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (`make deps` installs it)")
    done = render_prompts.render(tmp_path)
    assert {p.stem for p in done} == set(PROMPTS)
    assert 3.0 < answering.wav_seconds(tmp_path / "greeting.wav") < 10.0
    assert answering.wav_rms(tmp_path / "greeting.wav") > P.SILENCE_RMS
