"""A box whose media engine does not load (pjsua2 missing, or built for another
architecture) with `[media] max_calls > 0`: one clear ERROR line, no traceback, no worker
retried in a loop, and calls still connect, straight between the handsets (unanchored)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.support.pbx import Daemon, user_block, write_config
from tests.support.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

UNAVAILABLE = r"event=media_engine_unavailable .*cannot open shared object file \(simulated\)"


@pytest.fixture
def broken_pjsua2(tmp_path: Path) -> Path:
    """A `pjsua2` that fails to import as a missing shared library would, first on the
    daemon's PYTHONPATH (the handsets keep the real one)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "pjsua2.py").write_text(
        'raise ImportError("libpjsua2.so.2: cannot open shared object file (simulated)")\n')
    return shadow


def test_unloadable_engine_is_one_line_and_calls_go_direct(
        tmp_path: Path, broken_pjsua2: Path, handset_factory: Callable[..., Handset]) -> None:
    port = free_port()
    config = write_config(tmp_path, port, [user_block("100"), user_block("200")],
                          extra="[media]\nmax_calls = 4\nmin_idle = 1\n")
    pbx = Daemon(config, port)
    pbx.allow_errors(UNAVAILABLE)
    pbx.start(timeout=30, env={"PYTHONPATH": str(broken_pjsua2)})
    try:
        caller, callee = handset_factory("caller"), handset_factory("callee")
        assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
        assert callee.register(pbx.registrar, "200", "secret")["code"] == 200
        call = caller.call("sip:200@home.arpa")
        ringing = callee.wait_incoming(timeout=5)
        incoming = str(ringing["call"])
        callee.wait_state(incoming, "EARLY")
        callee.answer(incoming, 200)
        answered = caller.wait_state(call, "CONFIRMED")
        # Unanchored: the proxy relays the caller's own dialog (an anchored call would
        # reach the callee as the worker's new dialog, with a Call-ID of its own).
        assert ringing["call_id"] == answered["call_id"]
        caller.wait_for("media", call=call, status="active")
        callee.wait_for("media", call=incoming, status="active")
        caller.play_tone(call, 440)
        caller.record(call, tmp_path / "caller.wav")
        callee.play_tone(incoming, 1000)
        callee.record(incoming, tmp_path / "callee.wav")
        time.sleep(1.5)
        assert tones.tone_level_db(str(callee.stop_media(incoming)["path"]), 440) > -6
        assert tones.tone_level_db(str(caller.stop_media(call)["path"]), 1000) > -6
        caller.hangup(call)
        callee.wait_state(incoming, "DISCONNECTED")
        time.sleep(1.0)  # a pool retrying in a loop would log again meanwhile
    finally:
        pbx.stop()
    said = pbx.log_matches(UNAVAILABLE)
    assert len(said) == 1, said
    assert not pbx.log_matches(r"media_worker_start_failed|media_zygote|Traceback|never retrieved")
    assert not pbx.log_matches(r"event=media_pool_capacity")
