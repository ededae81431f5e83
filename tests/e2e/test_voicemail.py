"""The answering machine end to end: the real daemon and media workers, pjsua2 handsets
(baresip once as the caller), the mailbox store on disk.

A call nobody answers (or busy, DND, no handset) reaches the number's answering machine,
the caller's tone lands in the stored WAV, the mailbox code plays it back to the number's
own handset and deletes it by DTMF; hang-ups at once leave nothing; a daemon killed during
a recording loses no earlier message."""

from __future__ import annotations

import array
import math
import sqlite3
import time
import wave
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.simulator import tones
from appliance.simulator.handset import Handset
from appliance.voicemail.mailbox import Mailbox, Message
from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_blf import Watcher
from tests.e2e.test_mwi import summary
from tests.support.baresip import Baresip
from tests.support.pbx import Daemon, user_block
from tests.support.ports import rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

HandsetFactory = Callable[..., Handset]
TONE = 440
SHORT_GREETING_S = 0.4


def silence_wav(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(array.array("h", [0] * int(16000 * seconds)).tobytes())
    return path


def tone_wav(path: Path, hz: float, seconds: float) -> Path:
    samples = [int(8000 * math.sin(2 * math.pi * hz * i / 16000)) for i in range(int(16000 * seconds))]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(array.array("h", samples).tobytes())
    return path


def mailbox(pbx: Daemon) -> Mailbox:
    return Mailbox(load_config(pbx.config).server.state_dir / "voicemail")


def start(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, *, register: tuple[str, ...] = ("100", "200"),
          greeting: bool = True, **u200: object) -> tuple[Daemon, dict[str, Handset]]:
    """100, 200 (answering machine on, 5 s) and 300; with `greeting`, 200's greeting is
    0.4 s of silence (the test need not sit through the spoken default)."""
    settings: dict[str, object] = {"voicemail": True, "voicemail_after": 5, **u200}
    pbx = pbx_factory([user_block("100"), user_block("200", one_number=True, **settings), user_block("300")])
    if greeting:
        box = mailbox(pbx)
        box.set_greeting("200", silence_wav(box.recording_path("200"), SHORT_GREETING_S))
    phones = {}
    for number in register:
        phone = handset_factory(f"h{number}")
        assert phone.register(pbx.registrar, number, "secret")["code"] == 200
        phones[number] = phone
    return pbx, phones


def sustained(wav: Path | str, hz: float, *, seconds: float, floor_db: float = -30.0) -> bool:
    """`hz` present for at least `seconds` in a row (speech never holds one frequency so long)."""
    run = best = 0
    for level in tones.tone_envelope(wav, hz):
        run = run + 1 if level > floor_db else 0
        best = max(best, run)
    return best * 0.1 >= seconds


def assert_tone(wav: Path) -> None:
    """The caller's tone is in a stored message: the main thing in it (a bridge tick lost
    under CPU load adds a click, hence not -3 dB), and loud for 1.5 s on end."""
    assert tones.tone_level_db(wav, TONE) > -10
    assert sustained(wav, TONE, seconds=1.5, floor_db=-20)


def leave_message(pbx: Daemon, caller: Handset, talk: float = 3.0, *, ringing: Handset | None = None,
                  answered_within: float = 10.0) -> str:
    """`caller` calls 200, is answered by the answering machine, plays its tone for
    `talk` seconds after the greeting and hangs up; returns the call."""
    start_line = len(pbx.lines)
    call = caller.call(f"sip:200@127.0.0.1:{pbx.port}")
    if ringing is not None:
        ringing.wait_incoming(timeout=5)
    caller.wait_state(call, "CONFIRMED", timeout=answered_within)
    caller.wait_for("media", call=call, status="active")
    pbx.wait_log(r"event=call_to_voicemail .*number=200", start=start_line)
    caller.play_tone(call, TONE)
    time.sleep(SHORT_GREETING_S + 0.7 + talk)  # greeting, beep, message
    caller.hangup(call)
    caller.wait_state(call, "DISCONNECTED")
    return call


def clean(pbx: Daemon) -> None:
    """No ERROR, and no media worker died or reported a failure (the worker never dies)."""
    pbx.assert_clean_log()
    assert not pbx.log_matches("event=media_worker_(lost|error|died|unresponsive)")


def stored(pbx: Daemon, count: int = 1, timeout: float = 5.0) -> list[Message]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = mailbox(pbx).messages("200")
        if len(messages) >= count:
            return messages
        time.sleep(0.1)
    return mailbox(pbx).messages("200")


def test_no_answer_reaches_the_answering_machine_and_the_tone_is_in_the_message(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, phones = start(pbx_factory, handset_factory)
    started = time.monotonic()
    leave_message(pbx, phones["100"], ringing=phones["200"])
    assert time.monotonic() - started > 5  # it rang voicemail_after seconds first
    messages = stored(pbx)
    assert len(messages) == 1
    message = messages[0]
    assert message.caller == "100" and not message.heard
    assert 2.0 < message.seconds < 5.0
    assert_tone(message.wav)
    with wave.open(str(message.wav)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
    pbx.wait_log(r"event=voicemail_stored .*number=200")
    clean(pbx)


def test_a_hang_up_right_away_or_silence_leaves_no_message(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, phones = start(pbx_factory, handset_factory, register=("100",), greeting=False)  # unreachable
    caller = phones["100"]
    call = caller.call(f"sip:200@127.0.0.1:{pbx.port}")
    caller.wait_state(call, "CONFIRMED", timeout=5)
    time.sleep(1.0)  # hung up during the spoken greeting
    caller.hangup(call)
    caller.wait_state(call, "DISCONNECTED")
    at = len(pbx.lines)
    call = caller.call(f"sip:200@127.0.0.1:{pbx.port}")  # says nothing after the tone
    caller.wait_state(call, "CONFIRMED", timeout=5)
    time.sleep(5.3 + 0.7 + 3.0)  # the spoken default greeting, the beep, 3 s of silence
    caller.hangup(call)
    caller.wait_state(call, "DISCONNECTED")
    pbx.wait_log(r"event=call_ended .*callee=200", start=at)
    time.sleep(1.0)  # the worker judges the recording once pjmedia has closed it
    assert mailbox(pbx).messages("200") == []
    assert not list((mailbox(pbx).root / "200" / "tmp").glob("*.wav"))  # dropped, not left behind
    assert not pbx.log_matches("event=voicemail_recorded")
    clean(pbx)


def test_the_mailbox_code_plays_the_message_back_and_deletes_it_and_the_lamp_follows(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, tmp_path: Path) -> None:
    pbx, phones = start(pbx_factory, handset_factory, register=("100", "200"))
    lamp = Watcher(pbx.port, "200")  # a device of 200 watching its message lamp
    try:
        assert lamp.subscribe("200", "message-summary").status == 200
        lamp.wait_notify(summary(0, 0))
        leave_message(pbx, phones["100"], ringing=phones["200"])
        [message] = stored(pbx)
        lamp.wait_notify(summary(1, 0))
        listener = phones["200"]
        call = listener.call(f"sip:*97@127.0.0.1:{pbx.port}")
        listener.wait_state(call, "CONFIRMED", timeout=5)
        listener.wait_for("media", call=call, status="active")
        time.sleep(0.5)
        listener.record(call, tmp_path / "heard.wav")
        listener.dtmf(call, "1")
        time.sleep(4.5)
        heard = listener.stop_media(call)["path"]
        assert sustained(heard, TONE, seconds=1.5)
        found = mailbox(pbx).message("200", message.id)
        assert found is not None and found.heard
        lamp.wait_notify(summary(0, 1))  # heard: the lamp goes dark
        listener.dtmf(call, "3")
        lamp.wait_notify(summary(0, 0))
        assert mailbox(pbx).messages("200") == []
        assert not message.wav.exists()
        listener.hangup(call)
        listener.wait_state(call, "DISCONNECTED")
    finally:
        lamp.close()
    clean(pbx)


def test_a_handset_of_another_number_hears_only_its_own_mailbox(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, tmp_path: Path) -> None:
    pbx, phones = start(pbx_factory, handset_factory, register=("100", "200"))
    box = mailbox(pbx)
    message = box.add("200", tone_wav(box.recording_path("200"), TONE, 3.0), "300", "", 3.0, time.time())
    intruder = phones["100"]
    call = intruder.call(f"sip:*97@127.0.0.1:{pbx.port}")  # 100's own (empty) mailbox, never 200's
    intruder.wait_state(call, "CONFIRMED", timeout=5)
    intruder.wait_for("media", call=call, status="active")
    intruder.record(call, tmp_path / "intruder.wav")
    intruder.dtmf(call, "1")
    time.sleep(3.0)
    intruder.dtmf(call, "3")
    time.sleep(1.0)
    heard = intruder.stop_media(call)["path"]
    assert not sustained(heard, TONE, seconds=1.0)
    intruder.hangup(call)
    found = mailbox(pbx).message("200", message.id)
    assert found is not None and not found.heard  # untouched
    pbx.wait_log(r"event=mailbox_opened .*number=100")
    clean(pbx)


def test_a_device_that_is_not_registered_cannot_open_the_mailbox(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, phones = start(pbx_factory, handset_factory, register=("200",))
    phone = phones["200"]
    phone.unregister()  # it still knows the password: authenticated, but no device of 200
    call = phone.call(f"sip:*97@127.0.0.1:{pbx.port}")
    ended = phone.wait_state(call, "DISCONNECTED", timeout=5)
    assert ended["code"] == 403
    pbx.wait_log(r"event=mailbox_refused .*number=200 status=403")
    clean(pbx)


@pytest.mark.parametrize("why", ["busy", "dnd", "unreachable"])
def test_busy_dnd_and_unreachable_reach_it_at_once(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, why: str) -> None:
    settings: dict[str, object] = {"dnd": True} if why == "dnd" else {}
    register = ("100",) if why == "unreachable" else ("100", "200")
    pbx, phones = start(pbx_factory, handset_factory, register=register, voicemail_after=30, **settings)
    if why == "busy":
        phones["200"].auto_answer("reject", code=486)
    started = time.monotonic()
    leave_message(pbx, phones["100"], answered_within=5)
    assert time.monotonic() - started < 15  # not after voicemail_after (30 s)
    [message] = stored(pbx)
    assert_tone(message.wav)
    pbx.wait_log(rf"event=call_to_voicemail .*number=200 condition={why}")
    clean(pbx)


def test_forwarding_wins_over_the_answering_machine(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, phones = start(pbx_factory, handset_factory, register=("100", "300"), forward_unreachable="300")
    call = phones["100"].call(f"sip:200@127.0.0.1:{pbx.port}")
    incoming = phones["300"].wait_incoming(timeout=5)
    phones["300"].answer(str(incoming["call"]), 200)
    phones["100"].wait_state(call, "CONFIRMED")
    phones["100"].hangup(call)
    assert not pbx.log_matches("event=call_to_voicemail")
    clean(pbx)


def test_baresip_leaves_a_message(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                  baresip: Callable[..., Baresip], tmp_path: Path) -> None:
    pbx, _ = start(pbx_factory, handset_factory, register=())  # 200 unreachable: at once
    phone = baresip(tmp_path / "baresip", pbx, "100", "secret", TONE, rtp_range())
    phone.wait_for("registered successfully")
    at = phone.command("d 200")
    phone.wait_for("Call established", start=at)
    time.sleep(SHORT_GREETING_S + 0.7 + 3.0)
    phone.command("b")
    phone.wait_for("terminated", start=at)
    [message] = stored(pbx)
    assert message.caller == "100" and message.seconds > 2.0
    assert_tone(message.wav)
    phone.stop()
    clean(pbx)


def test_a_daemon_killed_during_a_recording_loses_no_earlier_message(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, phones = start(pbx_factory, handset_factory, register=("100",))
    leave_message(pbx, phones["100"])
    [first] = stored(pbx)
    data = first.wav.read_bytes()
    caller = phones["100"]
    call = caller.call(f"sip:200@127.0.0.1:{pbx.port}")
    caller.wait_state(call, "CONFIRMED", timeout=5)
    caller.play_tone(call, TONE)
    time.sleep(2.5)  # recording now
    pbx.kill()
    caller.wait_state(call, "DISCONNECTED", timeout=10)  # the worker BYEs it directly
    assert [m.id for m in mailbox(pbx).messages("200")] == [first.id]
    assert first.wav.read_bytes() == data
    # Nor the call history: the first call's row was committed when it ended.
    history = sqlite3.connect(load_config(pbx.config).server.state_dir / "history.sqlite3")
    try:
        assert history.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = history.execute("SELECT caller, callee, outcome FROM calls").fetchall()
        assert ("100", "200", "voicemail") in rows
    finally:
        history.close()
    # A new daemon on the same state directory still has it, and takes new messages.
    again = Daemon(pbx.config, pbx.port).start()
    try:
        assert phones["100"].register(again.registrar, "100", "secret")["code"] == 200
        leave_message(again, phones["100"])
        messages = stored(again, 2)
        assert [m.id for m in messages][1:] == [first.id]
        assert_tone(first.wav)
        clean(again)
    finally:
        again.stop()


def test_a_greeting_recorded_from_the_handset_is_what_the_next_caller_hears(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory, tmp_path: Path) -> None:
    pbx, phones = start(pbx_factory, handset_factory, register=("100", "200"), greeting=False)
    owner = phones["200"]
    call = owner.call(f"sip:*97@127.0.0.1:{pbx.port}")
    owner.wait_state(call, "CONFIRMED", timeout=5)
    owner.wait_for("media", call=call, status="active")
    owner.dtmf(call, "4")  # "record your greeting after the tone", the tone
    time.sleep(6.0)
    owner.play_tone(call, 660)
    time.sleep(2.5)
    owner.dtmf(call, "#")
    deadline = time.monotonic() + 5
    while mailbox(pbx).greeting("200") is None and time.monotonic() < deadline:
        time.sleep(0.1)
    greeting = mailbox(pbx).greeting("200")
    assert greeting is not None
    assert sustained(greeting, 660, seconds=1.0, floor_db=-20)
    owner.hangup(call)
    owner.wait_state(call, "DISCONNECTED")
    caller = phones["100"]
    phones["200"].auto_answer("reject", code=486)  # busy: the answering machine at once
    call = caller.call(f"sip:200@127.0.0.1:{pbx.port}")
    caller.wait_state(call, "CONFIRMED", timeout=5)
    caller.wait_for("media", call=call, status="active")
    caller.record(call, tmp_path / "greeting-heard.wav")
    time.sleep(2.5)
    heard = caller.stop_media(call)["path"]
    caller.hangup(call)
    assert sustained(heard, 660, seconds=1.0)
    clean(pbx)


def test_the_longest_message_is_cut_by_the_box(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, phones = start(pbx_factory, handset_factory, register=("100",), voicemail_max_seconds=5)
    caller = phones["100"]
    call = caller.call(f"sip:200@127.0.0.1:{pbx.port}")
    caller.wait_state(call, "CONFIRMED", timeout=5)
    caller.play_tone(call, TONE)
    ended = caller.wait_state(call, "DISCONNECTED", timeout=12)  # the caller never hangs up
    assert ended["end_request"] == "BYE"
    [message] = stored(pbx)
    assert 4.5 < message.seconds < 5.5
    assert_tone(message.wav)
    clean(pbx)
