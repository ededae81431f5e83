"""Levels end to end through a media worker, on every codec path, and the media
processes' sockets on loopback only (homepbx issue 12).

Each party plays a known tone and records it as it sends it (the handset's tone
monitor, before its encoder) while the other party records what it hears; the level of
the tone must be the same at both ends within 1 dB, both ways.  G.722 is where this
went wrong: pjmedia scales G.722 audio by its PCM shift around the codec, by default 2
(a quarter in, four times out) where standard G.722 ends (real phones, baresip) use 1,
so each pjmedia G.722 leg was 6 dB off, except where pjmedia's clipping detector had
halved that leg's shift.  The handsets use the standard level, like real phones, and
baresip phones (another G.722 implementation) check the same with the tester's setup.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import MediaConfig
from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_join_and_media import _invite_ok, _payloads, connect, house
from tests.support.baresip import Baresip
from tests.support.pbx import Daemon, user_block
from tests.support.ports import rtp_range
from tests.support.procs import descendants

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

HandsetFactory = Callable[..., Handset]
LOOPBACK = "127.0.0.1"
TCP_LISTEN = "0A"
HEALTH_PING_S = 2.0
"""The media pool's health_interval."""
TOLERANCE_DB = 1.0
TONE_S = 2.0
PAYLOAD = {"PCMU": "0", "PCMA": "8", "G722": "9"}
PATHS = [  # (the caller's codec, the callee's codec)
    ("PCMU", "PCMU"),
    ("PCMA", "PCMA"),
    ("G722", "G722"),
    ("PCMU", "G722"),
    ("G722", "PCMU"),
    ("PCMA", "G722"),
]


def level_db(wav: str, freq: float) -> float:
    """The tone's level in dB of full scale (a full-scale sine is about -3 dB): the
    median over 100-ms windows, so the edges of a recording (the jitter buffer filling,
    the far end stopping first) do not count."""
    return statistics.median(tones.tone_envelope(wav, freq, window=0.1, skip=tones.DEFAULT_SKIP))


@pytest.mark.parametrize(("caller_codec", "callee_codec"), PATHS, ids=[f"{a}-{b}" for a, b in PATHS])
def test_tone_level_kept_both_ways(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, tmp_path: Path,
                                   caller_codec: str, callee_codec: str) -> None:
    _, caller, phones = house(pbx_factory, handset_factory, devices=1, codecs=[caller_codec],
                              callee_codecs=[callee_codec], trace=True)
    callee = phones[0]
    call, answered = connect(caller, phones)
    # The codecs asked for are the codecs in use on each leg.
    assert _payloads(_invite_ok(caller, "rx"))[0] == PAYLOAD[caller_codec]
    assert _payloads(_invite_ok(callee, "tx"))[0] == PAYLOAD[callee_codec]

    parties = ((caller, call, 440.0, callee, answered), (callee, answered, 1000.0, caller, call))
    for phone, cid, freq, _, _ in parties:
        phone.play_tone(cid, freq, monitor=tmp_path / f"{phone.name}-sent.wav")
        phone.record(cid, tmp_path / f"{phone.name}-heard.wav")
    time.sleep(TONE_S)
    heard = {phone.name: str(phone.stop_media(cid)["path"]) for phone, cid, _, _, _ in parties}
    levels = {}
    for phone, cid, freq, listener, _ in parties:
        sent = level_db(phone.monitor_recorded(cid, tmp_path / f"{phone.name}-sent.wav"), freq)
        got = level_db(heard[listener.name], freq)
        levels[f"{phone.name}->{listener.name}"] = (round(sent, 1), round(got, 1))
    print(f"{caller_codec}->{callee_codec} (sent dB, heard dB):", levels)
    for direction, (sent, got) in levels.items():
        assert sent > -20, (direction, sent)  # the tone was really played
        assert abs(got - sent) <= TOLERANCE_DB, (f"{caller_codec}->{callee_codec}", direction, sent, got)
    caller.hangup(call)
    callee.wait_state(answered, "DISCONNECTED")


def _address(hex_address: str) -> str:
    """/proc/net's little-endian hex address -> text."""
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening(pid: int) -> list[tuple[str, str, int]]:
    """(protocol, address, port) of every socket process `pid` can receive on: its UDP
    sockets and its listening TCP sockets (from /proc/<pid>/fd and /proc/<pid>/net)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = []
    for proto in ("udp", "udp6", "tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode not in inodes or (proto.startswith("tcp") and state != TCP_LISTEN):
                continue
            address, port = local.split(":")
            found.append((proto, _address(address), int(port, 16)))
    return found


def test_media_processes_listen_on_loopback_only(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    """Every socket of the zygote and of each worker is on 127.0.0.1, in a call too; the
    RTP ports are left out (they follow the edge's listen address, another change)."""
    pbx, caller, phones = house(pbx_factory, handset_factory, devices=1)
    call, answered = connect(caller, phones)
    rtp = range(MediaConfig().rtp_port_low, MediaConfig().rtp_port_high + 1)
    assert pbx.proc is not None
    # A socket that only sends (the host's wake-up datagrams) is bound at its first
    # send: wait for the pool's health ping (every 2 s) to have reached every worker.
    time.sleep(HEALTH_PING_S + 0.5)
    children = descendants(pbx.proc.pid)
    assert children, "the daemon should have media processes"
    seen = {pid: listening(pid) for pid in children}
    assert any(seen.values()), "the media workers should have sockets"
    wide = {pid: [s for s in sockets if s[1] != LOOPBACK and s[2] not in rtp] for pid, sockets in seen.items()}
    assert not any(wide.values()), f"listening beyond {LOOPBACK}: {wide}"
    caller.hangup(call)
    phones[0].wait_state(answered, "DISCONNECTED")


class CodecBaresip(Baresip):
    """A baresip limited to one codec (its own G.722, not pjmedia's), dumping what it
    encodes (the level it sends) and what it decodes (the level it hears)."""

    def __init__(self, workdir: Path, pbx: Daemon, number: str, tone_hz: int, rtp_ports: str, codec: str,
                 *, auto_answer: bool = False) -> None:
        assert shutil.which("baresip"), "baresip is not installed: `make deps` installs Debian's baresip-core"
        super().__init__(workdir, pbx, number, f"pw-{number}", tone_hz, rtp_ports, auto_answer=auto_answer,
                         codec=codec)

    def dump(self, kind: str) -> str:
        (path,) = self.dumps.glob(f"*-{kind}.wav")
        return str(path)


BARESIP_CODEC = {"PCMU": "PCMU", "G722": "G722/16000/1"}
RATE = {"PCMU": 8000, "G722": 16000}
BARESIP_PATHS = [("G722", "PCMU"), ("G722", "G722")]


@pytest.mark.parametrize(("caller_codec", "callee_codec"), BARESIP_PATHS, ids=[f"{a}-{b}" for a, b in BARESIP_PATHS])
def test_tone_level_kept_with_another_g722(pbx_factory: DaemonFactory, tmp_path: Path,
                                           caller_codec: str, callee_codec: str) -> None:
    """The outside tester's case: baresip phones, whose G.722 is not pjmedia's."""
    pbx = pbx_factory([user_block("200", "pw-200"), user_block("201", "pw-201")],
                      server_extra='digest_algorithms = ["MD5"]\n')
    callee = CodecBaresip(tmp_path / "callee", pbx, "201", 1000, rtp_range(), BARESIP_CODEC[callee_codec],
                          auto_answer=True)
    caller = CodecBaresip(tmp_path / "caller", pbx, "200", 440, rtp_range(), BARESIP_CODEC[caller_codec])
    try:
        for phone in (callee, caller):
            phone.wait_for("registered successfully")
        caller.command("d 201")
        callee.wait_for("Call established")
        caller.wait_for("Call established")
        time.sleep(TONE_S)
        caller.command("b")
        callee.wait_for("terminated")
    finally:
        caller.stop()
        callee.stop()
    # The codec each phone used: its dumps are at that codec's rate.
    assert tones.load_wav(caller.dump("enc")).rate == RATE[caller_codec]
    assert tones.load_wav(callee.dump("enc")).rate == RATE[callee_codec]
    levels = {
        "caller->callee": (level_db(caller.dump("enc"), 440), level_db(callee.dump("dec"), 440)),
        "callee->caller": (level_db(callee.dump("enc"), 1000), level_db(caller.dump("dec"), 1000)),
    }
    print(f"baresip {caller_codec}->{callee_codec} (sent dB, heard dB):",
          {k: (round(a, 1), round(b, 1)) for k, (a, b) in levels.items()})
    for direction, (sent, got) in levels.items():
        assert sent > -20, (direction, sent)
        assert abs(got - sent) <= TOLERANCE_DB, (f"{caller_codec}->{callee_codec}", direction, sent, got)
