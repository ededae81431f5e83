"""`homepbx demo`: a daemon, a simulated provider (a second daemon), five simulated handsets,
and calls (from outside through the provider, and inside) that ring and are answered."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.control import ControlConn
from tests.support.pbx import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.tui, pytest.mark.timeout(90)]

OUTSIDE = "4930999999"


def test_demo_shows_devices_and_a_call_then_cleans_up() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "demo", "--no-tui", "--duration", "25"],
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
            family = {d["id"] for n in conn.snapshot["numbers"] if n["number"] == "200" for d in n["devices"]}
            trunks = {t["name"]: t for t in conn.snapshot["trunks"]}
            assert trunks["provider"]["status"] == "registered", trunks
            # First someone outside calls the family's number at the provider: all three ring.
            ringing = {d for c in conn.snapshot["calls"] if c["caller"] == OUTSIDE for d in c["ringing"]}
            while ringing != family:
                event = conn.wait_event("device_ringing", timeout=15)
                assert (event["call"]["caller"], event["call"]["callee"]) == (OUTSIDE, "200"), event
                ringing.add(event["device"])
            answered = conn.wait_event("call_answered", timeout=10)
            assert answered["call"]["caller"] == OUTSIDE and answered["call"]["answered_by"] in family
            # Then Grandpa calls 200.
            ringing_100 = conn.wait_event("device_ringing", timeout=15)
            assert ringing_100["call"]["caller"] == "100" and ringing_100["call"]["callee"] == "200"
            answered = conn.wait_event("call_answered", timeout=10)
            assert answered["call"]["caller"] == "100" and answered["call"]["answered_by"] in family
        assert proc.wait(timeout=40) == 0
        assert not socket.parent.exists()  # the temporary config, state and logs are gone
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)
