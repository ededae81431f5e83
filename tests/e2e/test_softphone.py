"""A softphone nobody here wrote: two baresip instances (Debian's baresip-core) call each
other through homepbx, and each hears the other's tone.

baresip 1.0 (Debian 12) answers MD5 digest challenges only, and gives up on a SHA-256
challenge instead of taking the MD5 one after it: with the shipped digest settings homepbx
knows it by its User-Agent and offers it MD5 alone (appliance/sip/digest_fallback.py).
Each phone sends a sine and dumps what it decodes to a WAV file (tests/support/baresip.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.simulator import tones
from tests.e2e.conftest import DaemonFactory
from tests.support.baresip import Baresip
from tests.support.pbx import user_block
from tests.support.ports import rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def test_baresip_calls_baresip_and_both_hear_the_other(
    pbx_factory: DaemonFactory, baresip: Callable[..., Baresip], tmp_path: Path
) -> None:
    pbx = pbx_factory([user_block("200", "pw-200"), user_block("201", "pw-201")])  # shipped digest settings
    callee = baresip(tmp_path / "callee", pbx, "201", "pw-201", 1000, rtp_range(), auto_answer=True)
    caller = baresip(tmp_path / "caller", pbx, "200", "pw-200", 440, rtp_range())
    for phone in (callee, caller):
        phone.wait_for("registered successfully")
    caller.command("d 201")
    callee.wait_for("Call established")
    caller.wait_for("Call established")
    time.sleep(2.0)  # two seconds of both tones
    caller.command("b")  # hang up
    callee.wait_for("terminated")
    pbx.wait_log(r"event=call_ended .*caller=200 callee=201 reason=bye_from_caller")
    caller.stop()
    callee.stop()
    assert tones.tone_level_db(callee.heard(), 440) > -6
    assert tones.tone_level_db(caller.heard(), 1000) > -6
    assert tones.tone_level_db(callee.heard(), 1000) < -20  # its own tone does not come back
