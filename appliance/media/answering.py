"""The media worker's answering machine and mailbox menu (see the protocol's "Answering
machine" and "Mailbox").

Both run on the worker's main thread, in jobs and timers (`PjHost.later`/`after`), never in
a pjsua2 callback.  What is heard is a `Speaker`'s playlist (prompts, message files, tones)
on the caller's bridge port; what is recorded is an `AudioMediaRecorder` fed from that port
(WAV, 16-bit mono, the bridge's rate).  A prompt is a WAV file rendered at build time
(:mod:`.render_prompts`, which holds their texts); a missing one is a short tone, so a box built without
``espeak-ng`` still works, by ear.  Timing comes from the files' own lengths (the stdlib
``wave`` module), not from pjsua2's end-of-file callbacks, which run on its threads.
"""

from __future__ import annotations

import array
import contextlib
import re
import sys
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pjsua2 as pj

from appliance.media import protocol as P
from appliance.media.render_prompts import PROMPTS_DIR
from appliance.voicemail.mailbox import Mailbox

BRIDGE_RATE = 16000
TONE_MS = 300


@dataclass(frozen=True)
class Tone:
    hz: int
    ms: int


Sound = str | Path | Tone
"""A prompt's name, a WAV file, or a tone."""


class Host(Protocol):
    """What the answering machine needs of the worker."""

    def after(self, seconds: float, fn: Callable[[], None]) -> None: ...

    def emit(self, event: str, **fields: Any) -> None: ...

    def hang_up(self, leg: Any) -> None: ...


def wav_seconds(path: Path) -> float:
    """The length of a WAV file (0.0 when unreadable)."""
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() / float(w.getframerate() or 1)
    except (OSError, EOFError, wave.Error):
        return 0.0


def wav_rms(path: Path) -> float:
    """The RMS of a 16-bit WAV file's samples (0.0 when unreadable or not 16-bit)."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2:
                return 0.0
            samples = array.array("h", w.readframes(w.getnframes()))
    except (OSError, EOFError, wave.Error):
        return 0.0
    if sys.byteorder == "big":
        samples.byteswap()
    if not samples:
        return 0.0
    return float((sum(s * s for s in samples) / len(samples)) ** 0.5)


def is_message(path: Path) -> bool:
    """Long and loud enough to keep (not a hang-up at the tone, not silence)."""
    return wav_seconds(path) >= P.VOICEMAIL_MIN_S and wav_rms(path) >= P.SILENCE_RMS


def caller_number(identity: str) -> str:
    """`"Grandpa" <sip:100@home.arpa>` -> "100" (the user part; "" when there is none)."""
    match = re.search(r"sips?:([^@>;:]+)@", identity)
    return match.group(1) if match else ""


def count_words(n: int) -> str:
    return f"n{n}" if 0 <= n <= 20 else "many"


def when_written(host: Host, path: Path, then: Callable[[], None], tries: int = 30) -> None:
    """Run `then` once a closed recording's WAV header is written.  pjmedia writes it when
    the recorder's port is destroyed, which the conference bridge does on its next tick,
    not at once (checked every 100 ms, for 3 s at most)."""
    if tries <= 0 or wav_seconds(path) > 0 or not path.exists() or path.stat().st_size <= 44:
        then()
        return
    host.after(0.1, lambda: when_written(host, path, then, tries - 1))


class Speaker:
    """Plays sounds one after another to a port; a new `play` (or `stop`) cuts the old one."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.seq = 0
        self._current: Any = None
        self._port: Any = None

    def play(self, port: Any, sounds: Sequence[Sound], then: Callable[[], None] | None = None) -> None:
        self.stop()
        seq = self.seq
        self._next(port, list(sounds), seq, then)

    def stop(self) -> None:
        self.seq += 1
        current, port = self._current, self._port
        self._current = self._port = None
        if current is not None and port is not None:
            with contextlib.suppress(pj.Error):
                current.stopTransmit(port)
        del current  # the player's file closes here

    def _next(self, port: Any, sounds: list[Sound], seq: int, then: Callable[[], None] | None) -> None:
        if seq != self.seq:
            return
        self.stop()
        self.seq = seq  # still this playlist
        if not sounds:
            if then is not None:
                then()
            return
        sound = sounds.pop(0)
        try:
            seconds = self._start(port, sound)
        except pj.Error:
            seconds = 0.0
        self.host.after(seconds + 0.05, lambda: self._next(port, sounds, seq, then))

    def _start(self, port: Any, sound: Sound) -> float:
        if isinstance(sound, str):
            path = PROMPTS_DIR / f"{sound}.wav"
            sound = path if path.is_file() else Tone(P.PROMPT_FALLBACK_HZ, TONE_MS)
        if isinstance(sound, Tone):
            gen = pj.ToneGenerator()
            gen.createToneGenerator(BRIDGE_RATE, 1)
            tones = pj.ToneDescVector()
            desc = pj.ToneDesc()
            desc.freq1 = desc.freq2 = sound.hz
            desc.on_msec, desc.off_msec = sound.ms, 100
            tones.append(desc)
            gen.play(tones, False)
            self._current, self._port = gen, port
            gen.startTransmit(port)
            return (sound.ms + 100) / 1000
        seconds = wav_seconds(sound)
        if seconds <= 0:
            return 0.0
        player = pj.AudioMediaPlayer()
        player.createPlayer(str(sound), pj.PJMEDIA_FILE_NO_LOOP)
        self._current, self._port = player, port
        player.startTransmit(port)
        return seconds


class Recorder:
    """Records a port to a WAV file until `close`."""

    def __init__(self, port: Any, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.port = port
        self.rec: Any = pj.AudioMediaRecorder()
        self.rec.createRecorder(str(path))
        port.startTransmit(self.rec)

    def follow(self, port: Any) -> None:
        """Record `port` from now on (the caller's stream was re-made)."""
        if self.rec is None:
            return
        with contextlib.suppress(pj.Error):
            port.startTransmit(self.rec)  # connecting a connected pair again is harmless
        self.port = port

    def close(self) -> Path:
        """Stop; the WAV header is written when the recorder is destroyed."""
        rec, self.rec = self.rec, None
        if rec is not None:
            with contextlib.suppress(pj.Error):
                self.port.stopTransmit(rec)
        del rec
        return self.path


def _mailbox(root: Path) -> Mailbox:
    return Mailbox(root)


class AnsweringMachine:
    """Greeting, beep, then the caller's message until it hangs up or `max_seconds`."""

    def __init__(self, host: Host, root: Path, token: str, number: str, caller: str, leg: Any,
                 max_seconds: int) -> None:
        self.host = host
        self.mailbox = _mailbox(root)
        self.token = token
        self.number = number
        self.caller = caller
        self.leg = leg
        self.max_seconds = max_seconds
        self.speaker = Speaker(host)
        self.recorder: Recorder | None = None
        self.started = False
        self.closed = False

    def media_ready(self, port: Any) -> None:
        """The caller's audio is up: the greeting, the beep, then record.  Again after a
        re-INVITE re-made the stream: the recording goes on from the new port."""
        if self.closed:
            return
        if self.started:
            if self.recorder is not None:
                self.recorder.follow(port)
            return
        self.started = True
        greeting = self.mailbox.greeting(self.number)
        sounds: list[Sound] = [greeting if greeting is not None else "greeting", Tone(P.BEEP_HZ, 500)]
        self.speaker.play(port, sounds, lambda: self._record(port))

    def _record(self, port: Any) -> None:
        if self.closed or self.leg is None or self.leg.disconnected:
            return
        self.recorder = Recorder(port, Path(self.mailbox.recording_path(self.number)))
        self.host.after(self.max_seconds, self._enough)

    def _enough(self) -> None:
        if not self.closed and self.recorder is not None and self.leg is not None:
            self.host.hang_up(self.leg)

    def on_digit(self, digit: str) -> None:
        """Digits are ignored (they are in the message)."""

    def close(self) -> None:
        """The call is over: keep the message, or drop a silent or too short one."""
        if self.closed:
            return
        self.closed = True
        self.leg = None  # timers may hold this object a while: never a reaped Call with it
        self.speaker.stop()
        if self.recorder is None:
            return
        path = self.recorder.close()
        self.recorder = None
        when_written(self.host, path, lambda: self._judge(path))

    def _judge(self, path: Path) -> None:
        if not is_message(path):
            path.unlink(missing_ok=True)
            return
        self.host.emit(P.EV_VOICEMAIL_RECORDED, token=self.token, number=self.number,
                       caller=caller_number(self.caller) or "anonymous",
                       path=str(path), seconds=round(wav_seconds(path), 2))


class MailboxMenu:
    """The number's messages by DTMF: 1 play, 2 next, 3 delete, 4 record a greeting, 0 menu."""

    def __init__(self, host: Host, root: Path, number: str, leg: Any) -> None:
        self.host = host
        self.root = root
        self.mailbox = _mailbox(root)
        self.number = number
        self.leg = leg
        self.speaker = Speaker(host)
        messages = self.mailbox.messages(number)  # newest first
        self.messages = [m for m in messages if not m.heard] + [m for m in messages if m.heard]
        self.index = -1
        self.port: Any = None
        self.greeting: Recorder | None = None
        self.closed = False

    def media_ready(self, port: Any) -> None:
        if self.port is not None or self.closed:
            return
        self.port = port
        new = sum(1 for m in self.messages if not m.heard)
        old = len(self.messages) - new
        if not self.messages:
            self.say(["no_messages", "menu"])
        else:
            self.say(["you_have", count_words(new), "new_messages", count_words(old), "old_messages", "menu"])

    def say(self, sounds: Sequence[Sound], then: Callable[[], None] | None = None) -> None:
        if self.port is not None and not self.closed:
            self.speaker.play(self.port, sounds, then)

    def on_digit(self, digit: str) -> None:
        if self.port is None or self.closed:
            return
        if self.greeting is not None:
            if digit == "#":
                self._greeting_done()
            return
        if digit == "1":
            self.index = max(self.index, 0)
            self._play()
        elif digit == "2":
            self.index += 1
            self._play()
        elif digit == "3":
            self._delete()
        elif digit == "4":
            self.say(["record_greeting", Tone(P.BEEP_HZ, 500)], self._greeting_start)
        elif digit in ("0", "*"):
            self.say(["menu"])

    def _play(self) -> None:
        if not self.messages:
            self.say(["no_messages", "menu"])
            return
        if self.index >= len(self.messages):
            self.index = len(self.messages)
            self.say(["no_more_messages", "menu"])
            return
        message = self.messages[self.index]
        if not message.heard:
            self.mailbox.mark_heard(self.number, message.id)
            self.messages[self.index] = self.mailbox.message(self.number, message.id) or message
            self.host.emit(P.EV_MAILBOX_CHANGED, number=self.number)
        self.say(["message", message.wav, "after_message"])

    def _delete(self) -> None:
        if not 0 <= self.index < len(self.messages):
            self.say(["no_messages" if not self.messages else "no_more_messages", "menu"])
            return
        message = self.messages.pop(self.index)
        self.mailbox.delete(self.number, message.id)
        self.host.emit(P.EV_MAILBOX_CHANGED, number=self.number)
        self.index -= 1  # "next" goes on with the message after the deleted one
        self.say(["deleted", "menu"])

    def _greeting_start(self) -> None:
        if self.closed or self.port is None:
            return
        self.greeting = Recorder(self.port, Path(self.mailbox.recording_path(self.number)))
        recorder = self.greeting

        def enough() -> None:
            if self.greeting is recorder:
                self._greeting_done()

        self.host.after(P.GREETING_MAX_S, enough)

    def _greeting_done(self) -> None:
        """Save the greeting just recorded, or drop a silent or too short one."""
        recorder, self.greeting = self.greeting, None
        if recorder is None:
            return
        path = recorder.close()
        when_written(self.host, path, lambda: self._keep_greeting(path))

    def _keep_greeting(self, path: Path) -> None:
        if not is_message(path):
            path.unlink(missing_ok=True)
            self.say(["greeting_not_saved", "menu"])
            return
        self.mailbox.set_greeting(self.number, path)
        self.host.emit(P.EV_MAILBOX_CHANGED, number=self.number)
        self.say(["greeting_saved", "menu"])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.leg = None  # timers may hold this object a while: never a reaped Call with it
        self.port = None
        self.speaker.stop()
        if self.greeting is not None:
            self._greeting_done()  # hung up while recording: what was said is the greeting
