"""The store of messages (appliance/voicemail/mailbox.py): layout, atomic adds, listing, path safety."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.voicemail.mailbox import Mailbox, valid_id

RECEIVED = 1_780_000_000.0


def recording(box: Mailbox, number: str, data: bytes = b"RIFF....WAVEfmt ") -> Path:
    path = box.recording_path(number)
    path.write_bytes(data)
    return path


def test_add_moves_the_recording_in_with_a_sidecar(tmp_path: Path) -> None:
    box = Mailbox(tmp_path / "voicemail")
    rec = recording(box, "100", b"audio")
    assert rec.parent == tmp_path / "voicemail" / "100" / "tmp"
    message = box.add("100", rec, caller="200", caller_name="Kitchen", seconds=4.5, received=RECEIVED)
    assert not rec.exists()
    assert valid_id(message.id)
    assert message.id.startswith(time.strftime("%Y%m%d-%H%M%S", time.localtime(RECEIVED)))
    d = tmp_path / "voicemail" / "100"
    assert (d / f"{message.id}.wav").read_bytes() == b"audio"
    assert message.wav == d / f"{message.id}.wav"
    assert json.loads((d / f"{message.id}.json").read_text()) == {
        "id": message.id, "number": "100", "caller": "200", "caller_name": "Kitchen",
        "received": RECEIVED, "seconds": 4.5, "heard": False,
    }
    assert box.messages("100") == [message]
    assert box.counts("100") == (1, 0)
    assert box.numbers() == ["100"]
    # Nothing left behind but the messages, the lock and the (empty) tmp directory.
    assert sorted(p.name for p in d.iterdir()) == sorted([".lock", "tmp", f"{message.id}.wav", f"{message.id}.json"])


def test_newest_first_counts_mark_heard_and_delete(tmp_path: Path) -> None:
    box = Mailbox(tmp_path)
    old = box.add("100", recording(box, "100"), "200", "", 1, RECEIVED)
    new = box.add("100", recording(box, "100"), "300", "Bob", 2, RECEIVED + 60)
    same_second = box.add("100", recording(box, "100"), "300", "Bob", 2, RECEIVED + 60)
    assert same_second.id != new.id
    assert [m.id for m in box.messages("100")][2] == old.id
    assert box.counts("100") == (3, 0)
    assert box.mark_heard("100", old.id)
    assert box.mark_heard("100", old.id)  # idempotent
    assert box.counts("100") == (2, 1)
    assert box.message("100", old.id) is not None and box.message("100", old.id).heard  # type: ignore[union-attr]
    assert box.delete("100", new.id)
    assert not box.delete("100", new.id)
    assert not box.mark_heard("100", new.id)
    assert box.counts("100") == (1, 1)
    assert not (tmp_path / "100" / f"{new.id}.wav").exists()
    assert box.messages("200") == [] and box.counts("200") == (0, 0)


def test_greeting(tmp_path: Path) -> None:
    box = Mailbox(tmp_path)
    assert box.greeting("100") is None
    box.set_greeting("100", recording(box, "100", b"one"))
    box.set_greeting("100", recording(box, "100", b"two"))
    greeting = box.greeting("100")
    assert greeting == tmp_path / "100" / "greeting.wav" and greeting.read_bytes() == b"two"
    assert box.messages("100") == []  # the greeting is no message
    assert box.clear_greeting("100") and box.greeting("100") is None and not box.clear_greeting("100")


@pytest.mark.parametrize("number", ["", "../etc", "100/../200", "1" * 16, "abc", "/tmp", ".", "10 0"])
def test_a_number_that_is_no_number_names_no_path(tmp_path: Path, number: str) -> None:
    box = Mailbox(tmp_path / "vm")
    for call in (box.messages, box.counts, box.greeting, box.recording_path):
        with pytest.raises(ValueError):
            call(number)
    with pytest.raises(ValueError):
        box.add(number, tmp_path / "x.wav", "1", "", 1, RECEIVED)
    assert not (tmp_path / "vm").exists()


@pytest.mark.parametrize(
    "message_id", ["../../x", "20260101-000000-abcdeg", "greeting", "", "20260101-000000-abcdef/.."],
)
def test_an_id_that_is_no_id_names_no_path(tmp_path: Path, message_id: str) -> None:
    box = Mailbox(tmp_path)
    with pytest.raises(ValueError):
        box.delete("100", message_id)
    with pytest.raises(ValueError):
        box.mark_heard("100", message_id)


def test_broken_sidecars_are_skipped_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = Mailbox(tmp_path)
    good = box.add("100", recording(box, "100"), "200", "", 1, RECEIVED)
    d = tmp_path / "100"
    (d / "20260101-000000-aaaaaa.wav").write_bytes(b"x")  # a crash before its sidecar
    (d / "20260101-000000-bbbbbb.wav").write_bytes(b"x")
    (d / "20260101-000000-bbbbbb.json").write_text("{not json")
    (d / "20260101-000000-cccccc.wav").write_bytes(b"x")
    (d / "20260101-000000-cccccc.json").write_text('{"caller": "1"}')  # no received
    (d / "20260101-000000-dddddd.json").write_text(json.dumps(good.sidecar()))  # audio gone
    (d / "20260101-000000-eeeeee.wav").write_bytes(b"x")
    (d / "20260101-000000-eeeeee.json").write_text("[1, 2]")
    (d / "notes.txt").write_text("the family's own file")
    with caplog.at_level(logging.WARNING, logger="homepbx.voicemail"):
        assert box.messages("100") == [good]
        assert box.messages("100") == [good]
        assert box.counts("100") == (1, 0)
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 5, skipped
    assert all("voicemail message skipped" in line for line in skipped)


def test_add_from_another_file_system_copies(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system")
    source = shm / f"homepbx-test-{os.getpid()}.wav"
    source.write_bytes(b"far away")
    box = Mailbox(tmp_path)
    message = box.add("100", source, "200", "", 1, RECEIVED)
    assert message.wav.read_bytes() == b"far away" and not source.exists()


def test_two_processes_adding_at_once_lose_nothing(tmp_path: Path) -> None:
    """The edge adds while a worker's menu marks heard: every change is whole (flock + rename)."""
    script = (
        "import sys; from pathlib import Path; from appliance.voicemail.mailbox import Mailbox\n"
        "box = Mailbox(Path(sys.argv[1]))\n"
        "for i in range(30):\n"
        "    p = box.recording_path('100'); p.write_bytes(b'x')\n"
        "    m = box.add('100', p, 'c', '', 1, 1780000000.0)\n"
        "    box.mark_heard('100', m.id)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)]) for _ in range(3)]
    assert [p.wait(timeout=30) for p in procs] == [0, 0, 0]
    box = Mailbox(tmp_path)
    assert box.counts("100") == (0, 90)


def test_sweep_tmp_removes_only_old_recordings(tmp_path: Path) -> None:
    box = Mailbox(tmp_path)
    assert box.sweep_tmp("100", 3600, time.time()) == 0
    old, fresh = recording(box, "100"), recording(box, "100")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    kept = box.add("100", recording(box, "100"), "200", "", 1, RECEIVED)
    assert box.sweep_tmp("100", 3600, time.time()) == 1
    assert not old.exists() and fresh.exists() and box.messages("100") == [kept]


def test_messages_are_readable_by_the_daemons_group_only_whatever_the_umask(tmp_path: Path) -> None:
    """The appliance's daemon runs with umask 0077; the family's `pbx` login (its group)
    copies messages off the box: directories 0750, messages, sidecars, greetings 0640."""
    old = os.umask(0o077)
    try:
        box = Mailbox(tmp_path / "voicemail")
        message = box.add("200", recording(box, "200"), "100", "Grandpa", 3.0, time.time())
        box.set_greeting("200", recording(box, "200"))
        box.mark_heard("200", message.id)
    finally:
        os.umask(old)
    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    assert mode(tmp_path / "voicemail") == mode(tmp_path / "voicemail" / "200") == 0o750
    assert mode(message.wav) == mode(message.wav.with_suffix(".json")) == 0o640
    assert mode(tmp_path / "voicemail" / "200" / "greeting.wav") == 0o640
