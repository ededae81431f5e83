"""Several calls in one media worker process (issue 15), with real pjsua2 handsets.

Needs a pjsua2 build that holds more than one call per process (our own, PJSUA_MAX_CALLS
64): with the PyPI wheel (PJSUA_MAX_CALLS 4, one call per worker) every test here is
skipped.  Each party plays its own tone and records what it hears: a party must hear
its own call's parties and nothing of the other calls sharing the worker's bridge.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.media import protocol as P
from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_burst import burst
from tests.e2e.test_media_worker import HEARD as HEARD_DBFS
from tests.e2e.test_media_worker import SILENT, WorkerProc, a_headers, level
from tests.e2e.test_transfer import connect, raw_call
from tests.support.handsets import listen
from tests.support.pbx import Daemon, user_block
from tests.support.ports import rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
HandsetFactory = Callable[..., Handset]
HEARD = -8.0  # dB of total power: the tone clearly dominates what is heard
FAINT = -20.0


@functools.cache
def build_calls() -> int:
    """Calls per worker the loaded pjsua2 allows (asked for 4)."""
    out = subprocess.run([sys.executable, "-m", "appliance.media.worker", "--probe-calls", "4"], cwd=REPO,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return int(json.loads(out.splitlines()[-1])["calls"])


@pytest.fixture(autouse=True)
def _several_calls_per_worker() -> None:
    if build_calls() < 2:
        pytest.skip("the loaded pjsua2 allows only 1 call per worker (the PyPI wheel, PJSUA_MAX_CALLS = 4):"
                    " these tests need our own build (issue 17)")


def assert_heard(heard: dict[int, str], calls: list[list[int]]) -> None:
    """Each party (its tone) hears every other party of its call and nobody else's."""
    every = [f for call in calls for f in call]
    for call in calls:
        for own in call:
            levels = {f: round(tones.tone_level_db(heard[own], f), 1) for f in every}
            others = [f for f in call if f != own]
            strong = HEARD if len(others) == 1 else -12.0
            assert all(levels[f] > strong for f in others), (own, levels)
            assert all(levels[f] < FAINT for f in every if f not in others), (own, levels)


def worker_of(pbx: Daemon, caller: str) -> tuple[str, int]:
    """(token, worker pid) of the call `caller` placed."""
    line = pbx.wait_log(f"event=call_started call=.* caller={caller}")
    token = line.split("call=", 1)[1].split()[0]
    line = pbx.wait_log(f"event=media_worker_call .*token={token}")
    return token, int(line.split("pid=", 1)[1].split()[0])


def phones_for(pbx: Daemon, handset_factory: HandsetFactory, numbers: list[str]) -> dict[str, Handset]:
    phones = {n: handset_factory(f"p{n}") for n in numbers}
    for number, phone in phones.items():
        assert phone.register(pbx.registrar, number, "secret")["code"] == 200
    return phones


def media(calls_per_worker: int, max_calls: int = 8) -> str:
    return f"[media]\nmax_calls = {max_calls}\nmin_idle = 1\ncalls_per_worker = {calls_per_worker}\n\n"


# -- the worker alone -------------------------------------------------------------------------


@pytest.fixture
def worker2(tmp_path: Path) -> Iterator[WorkerProc]:
    proc = WorkerProc(rtp_ports=rtp_range(100), log_path=tmp_path / "worker.log", extra=["--calls", "2"])
    yield proc
    proc.close()


def test_a_worker_takes_its_calls_and_ends_one_alone(worker2: WorkerProc, handset_factory: HandsetFactory,
                                                     tmp_path: Path) -> None:
    assert worker2.calls == 2
    a1, b1, a2, b2, x = (handset_factory(n) for n in ("a1", "b1", "a2", "b2", "x"))
    calls = []
    for a, b, token in ((a1, b1, "tok-1"), (a2, b2, "tok-2")):
        b.auto_answer("answer")
        call_a = a.call(worker2.uri(), headers=a_headers(token, b))
        call_b = str(b.wait_incoming()["call"])
        a.wait_for("media", call=call_a, status="active")
        b.wait_for("media", call=call_b, status="active")
        calls.append((call_a, call_b))
    # A third call is one too many for this worker: 486, the two calls untouched.
    busy = x.call(worker2.uri(), headers=a_headers("tok-3", b1))
    assert x.wait_state(busy, "DISCONNECTED")["last_status"] == 486
    worker2.send(P.CMD_PING, seq=1)
    assert worker2.wait_for(P.EV_PONG, seq=1)["active"] == 2
    # Tones both ways in both calls, measured: each hears its own peer only.
    parties = [(a1, calls[0][0], 440), (b1, calls[0][1], 1000), (a2, calls[1][0], 620), (b2, calls[1][1], 1700)]
    for phone, call, freq in parties:
        phone.play_tone(call, freq)
        phone.record(call, tmp_path / f"{phone.name}.wav")
    time.sleep(1.6)
    heard = {freq: tones.load_wav(str(phone.stop_media(call)["path"])) for phone, call, freq in parties}
    for own, peer in ((440, 1000), (1000, 440), (620, 1700), (1700, 620)):
        assert level(heard[own], peer) > HEARD_DBFS, (own, peer)
        for other in {440, 1000, 620, 1700} - {own, peer}:
            assert level(heard[own], other) < SILENT, (own, other)
    # The edge ends one call (end): its legs get a BYE, the other call goes on.
    worker2.send(P.CMD_END, token="tok-1")
    assert a1.wait_state(calls[0][0], "DISCONNECTED")["end_request"] == "BYE"
    assert b1.wait_state(calls[0][1], "DISCONNECTED")["end_request"] == "BYE"
    assert worker2.wait_for(P.EV_CALL_ENDED, token="tok-1")["reason"] == P.REASON_END_ALL
    worker2.send(P.CMD_PING, seq=2)
    assert worker2.wait_for(P.EV_PONG, seq=2)["active"] == 1
    assert not a2.events_of("call_state", call=calls[1][0], state="DISCONNECTED")
    a2.play_tone(calls[1][0], 620)
    b2.record(calls[1][1], tmp_path / "b2-after.wav")
    time.sleep(1.0)
    a2.stop_media(calls[1][0])
    assert level(tones.load_wav(str(b2.stop_media(calls[1][1])["path"])), 620) > HEARD_DBFS
    b2.hangup(calls[1][1])
    assert worker2.wait_for(P.EV_CALL_ENDED, token="tok-2")["reason"] == P.REASON_CALLEE_HANGUP


# -- through the daemon -------------------------------------------------------------------


def test_calls_share_a_worker_and_each_hears_only_its_own(pbx_factory: DaemonFactory,
                                                         handset_factory: HandsetFactory,
                                                         tmp_path: Path) -> None:
    numbers = ["100", "200", "300", "400", "500", "600"]
    pbx = pbx_factory([user_block(n) for n in numbers], extra=media(4))
    phones = phones_for(pbx, handset_factory, numbers)
    calls = {}
    for caller, callee in (("100", "200"), ("300", "400"), ("500", "600")):
        calls[caller] = connect(phones[caller], phones[callee], callee)
    pids = {worker_of(pbx, caller)[1] for caller in calls}
    assert len(pids) == 1  # packed: one process hosts the three calls
    heard = listen([(phones["100"], calls["100"][0], 440), (phones["200"], calls["100"][1], 1000),
                    (phones["300"], calls["300"][0], 620), (phones["400"], calls["300"][1], 1700),
                    (phones["500"], calls["500"][0], 350), (phones["600"], calls["500"][1], 1300)], tmp_path)
    assert_heard(heard, [[440, 1000], [620, 1700], [350, 1300]])
    # One call ends; the others go on in the same worker.
    phones["300"].hangup(calls["300"][0])
    assert phones["400"].wait_state(calls["300"][1], "DISCONNECTED")["end_request"] == "BYE"
    (tmp_path / "after").mkdir()
    heard = listen([(phones["100"], calls["100"][0], 440), (phones["200"], calls["100"][1], 1000),
                    (phones["500"], calls["500"][0], 350), (phones["600"], calls["500"][1], 1300)],
                   tmp_path / "after", 1.5)
    assert_heard(heard, [[440, 1000], [350, 1300]])
    # A DTMF digit stays in its call.
    phones["100"].dtmf(calls["100"][0], "5")
    assert phones["200"].wait_for("dtmf", call=calls["100"][1])["digit"] == "5"
    time.sleep(0.3)
    assert not phones["600"].events_of("dtmf")
    for caller in ("100", "500"):
        phones[caller].hangup(calls[caller][0])
    pbx.wait_log("event=call_ended .*outgoing=0")
    assert not pbx.log_matches(r"event=media_worker_died")


def test_join_and_transfer_in_a_shared_worker(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                              tmp_path: Path) -> None:
    pbx = pbx_factory([user_block("100"), user_block("200", one_number=True), user_block("300"),
                       user_block("400"), user_block("500")], extra=media(4))
    phones = phones_for(pbx, handset_factory, ["100", "300", "400", "500"])
    b0, b1 = handset_factory("b0"), handset_factory("b1")
    for phone in (b0, b1):
        assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
    # Call 1: 100 -> 200 (two devices ring, b0 answers); call 2: 300 -> 400.
    call1 = phones["100"].call("sip:200@home.arpa")
    ringing = {p: str(p.wait_incoming()["call"]) for p in (b0, b1)}
    b0.answer(ringing[b0], 200)
    phones["100"].wait_state(call1, "CONFIRMED")
    b0.wait_for("media", call=ringing[b0], status="active")
    b1.wait_for("call_state", call=ringing[b1], state="DISCONNECTED")
    call2 = connect(phones["300"], phones["400"], "400")
    (_, pid1), (_, pid2) = worker_of(pbx, "100"), worker_of(pbx, "300")
    assert pid1 == pid2
    # b1 joins call 1 (*74); 400 transfers 300 to 500, which answers; 400 hangs up.
    join = b1.call("sip:*74@home.arpa")
    b1.wait_state(join, "CONFIRMED")
    b1.wait_for("media", call=join, status="active")
    pbx.wait_log("event=call_joined")
    phones["400"].send("transfer", call=call2[1], uri="sip:500@home.arpa")
    target = str(phones["500"].wait_incoming(timeout=5)["call"])
    phones["500"].answer(target, 200)
    assert phones["400"].wait_for("transfer_status", call=call2[1], final=True, timeout=5)["code"] == 200
    phones["400"].hangup(call2[1])
    phones["500"].wait_for("media", call=target, status="active")
    pbx.wait_log(r"event=transfer .*by=400 target=500")
    heard = listen([(phones["100"], call1, 440), (b0, ringing[b0], 1000), (b1, join, 1700),
                    (phones["300"], call2[0], 620), (phones["500"], target, 1300)], tmp_path)
    assert_heard(heard, [[440, 1000, 1700], [620, 1300]])
    phones["100"].hangup(call1)
    phones["300"].hangup(call2[0])
    assert b1.wait_state(join, "DISCONNECTED")["end_request"] == "BYE"
    assert phones["500"].wait_state(target, "DISCONNECTED")["end_request"] == "BYE"
    os.kill(pid1, 0)  # alive
    assert not pbx.log_matches(r"event=media_worker_died")


def test_kill_of_a_shared_worker_ends_its_calls_only(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                                     tmp_path: Path) -> None:
    numbers = ["100", "200", "300", "400", "500", "600"]
    pbx = pbx_factory([user_block(n) for n in numbers], extra=media(2, max_calls=4))
    pbx.allow_errors("media_worker")
    phones = phones_for(pbx, handset_factory, ["200", "300", "400", "500", "600"])
    dialog = raw_call(pbx, phones["200"])  # 100 -> 200 from a raw socket: its BYE after the kill
    call1_b = str(phones["200"].wait_incoming()["call"])
    call2 = connect(phones["300"], phones["400"], "400")
    call3 = connect(phones["500"], phones["600"], "600")
    (token1, pid1), (token2, pid2), (token3, pid3) = (worker_of(pbx, c) for c in ("100", "300", "500"))
    assert pid1 == pid2 and pid3 != pid1  # two calls a worker: the third one in a second worker
    os.kill(pid1, signal.SIGKILL)
    # Both calls of the killed worker end: the edge BYEs each party it can.
    assert phones["200"].wait_state(call1_b, "DISCONNECTED", timeout=10)["end_request"] == "BYE"
    assert phones["300"].wait_state(call2[0], "DISCONNECTED", timeout=10)["end_request"] == "BYE"
    assert phones["400"].wait_state(call2[1], "DISCONNECTED", timeout=10)["end_request"] == "BYE"
    for token in (token1, token2):
        pbx.wait_log(f"event=call_ended call={token} .*reason=media_worker_died")
    bye = dialog.send("BYE")
    assert bye is not None and bye.status == 481  # the dead worker's dialog is forgotten
    dialog.raw.close()
    # The call in the other worker goes on, with audio both ways.
    heard = listen([(phones["500"], call3[0], 440), (phones["600"], call3[1], 1000)], tmp_path, 1.5)
    assert_heard(heard, [[440, 1000]])
    assert not pbx.log_matches(f"event=call_ended call={token3}")
    # A new call works (a replacement worker, or the second one's free slot).
    again = connect(phones["300"], phones["400"], "400")
    phones["300"].hangup(again[0])
    phones["500"].hangup(call3[0])
    phones["600"].wait_state(call3[1], "DISCONNECTED")


def test_a_burst_loses_no_call_with_calls_packed(pbx_factory: DaemonFactory, tmp_path: Path) -> None:
    """tests/e2e/test_burst.py's burst (300 SIPp calls, 60 in flight, max_calls 64) with
    16 calls a worker: none fails, no worker dies, and far fewer processes start."""
    assert shutil.which("sipp"), "sipp is not installed: `make deps` installs Debian's sip-tester"
    extra = '[media]\nmax_calls = 64\nmin_idle = 1\ncalls_per_worker = 16\n\n'
    pbx = pbx_factory([user_block("200", "pw-200"), user_block("201", "pw-201")], extra=extra)
    burst(pbx, tmp_path)
    assert pbx.log_matches(r"event=media_pool_capacity calls_per_worker=16")
    pids = {m for line in pbx.log_matches(r"event=media_worker_call") for m in re.findall(r"pid=(\d+)", line)}
    assert len(pids) <= 8, pids  # 60 in flight: 4 workers hold them (one process a call: 60)


def test_a_transfer_offers_its_own_calls_codecs(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    """The codec order is the worker's, set by the call that began last; a transfer
    INVITE (made by pjsua from the REFER) must still lead with its own call's codec."""
    pbx = pbx_factory([user_block(n) for n in ("100", "200", "300", "400", "500")], extra=media(4))
    wide = ["G722", "PCMU"]
    phones = {"100": handset_factory("p100", codecs=["G722"]), "200": handset_factory("p200", codecs=wide),
              "300": handset_factory("p300", codecs=["PCMU"]), "400": handset_factory("p400"),
              "500": handset_factory("p500", codecs=wide, trace=True)}
    for number, phone in phones.items():
        assert phone.register(pbx.registrar, number, "secret")["code"] == 200
    call1 = connect(phones["100"], phones["200"], "200")  # G.722 only: the B-leg leads with it
    call2 = connect(phones["300"], phones["400"], "400")  # PCMU only, and it began last
    assert worker_of(pbx, "100")[1] == worker_of(pbx, "300")[1]
    phones["200"].send("transfer", call=call1[1], uri="sip:500@home.arpa")
    target = str(phones["500"].wait_incoming(timeout=5)["call"])
    invite = phones["500"].wait_sip("rx", "INVITE ")
    m_audio = next(line for line in invite.split("\r\n") if line.startswith("m=audio"))
    assert m_audio.split()[3] == "9", m_audio  # G.722 leads, as in call 1's offer
    phones["500"].answer(target, 200)
    assert phones["200"].wait_for("transfer_status", call=call1[1], final=True, timeout=5)["code"] == 200
    phones["100"].hangup(call1[0])
    phones["300"].hangup(call2[0])
    phones["500"].wait_state(target, "DISCONNECTED")
