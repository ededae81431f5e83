"""`homepbx demo`: a daemon, four simulated handsets and calls that ring and are answered."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.control import ControlConn
from tests.support.pbx import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.tui, pytest.mark.timeout(90)]


def test_demo_shows_devices_and_a_call_then_cleans_up() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "demo", "--no-tui", "--duration", "20"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("control socket: "):
                break
        match = re.match(r"control socket: (\S+)", lines[-1])
        assert match, lines
        socket = Path(match[1])
        with ControlConn(socket, timeout=15) as conn:
            devices = {n["number"]: sorted(d["user_agent"] for d in n["devices"]) for n in conn.snapshot["numbers"]}
            assert devices["200"] == ["Bathroom", "Kitchen", "Living room"]
            assert devices["100"] == ["Grandpa's phone"]
            ringing = conn.wait_event("device_ringing", timeout=15)
            assert ringing["call"]["caller"] == "100" and ringing["call"]["callee"] == "200"
            answered = conn.wait_event("call_answered", timeout=10)
            assert answered["call"]["answered_by"] in {d["id"] for d in conn.snapshot["numbers"][1]["devices"]}
        assert proc.wait(timeout=40) == 0
        assert not socket.parent.exists()  # the temporary config, state and logs are gone
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)
