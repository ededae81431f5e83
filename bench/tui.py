"""Event-to-screen latency of the TUI: how long after the daemon's event a device shows
ringing (and a call answered) on the screen.

Starts the real daemon on a loopback port with a control socket, the Textual app headless
(`run_test`) as its client, and two pjsua2 handsets; `--calls` times over, one calls the
other, which rings, is answered and hung up. Each redraw the app makes for an event records
the time from the event's stamp (daemon clock = this machine's) to just after the redraw
(`HomePbxApp.latencies`, the figure `HOMEPBX_TUI_TRACE` logs too). Prints median, p95 and
max per kind; it is not a test and asserts nothing (issue 5: ringing within 100 ms).

    .venv/bin/python bench/tui.py [--calls 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.ports import free_port  # noqa: E402
from appliance.simulator.handset import Handset  # noqa: E402
from bench.register import start_daemon  # noqa: E402
from tui.app import HomePbxApp  # noqa: E402

CONFIG = """[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"

[control]
socket = "ctl.sock"

[[users]]
number = "200"
name = "Family"
password = "secret"

[[users]]
number = "100"
name = "Grandpa"
password = "secret"
"""


async def redrawn(app: HomePbxApp, kind: str, since: int, timeout: float = 5.0) -> None:
    """Wait until the app has redrawn for an event of `kind` (latencies after index `since`)."""
    deadline = time.monotonic() + timeout
    while not any(kind in kinds for kinds, _ in app.latencies[since:]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the screen never showed {kind}")
        await asyncio.sleep(0.005)


def summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return (f"{name}: median {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms, max {ms[-1]:.1f} ms "
            f"(n={len(ms)})")


async def measure(socket_path: Path, registrar: str, calls: int) -> dict[str, list[float]]:
    callee = Handset(name="kitchen", user_agent="Kitchen")
    caller = Handset(name="grandpa", user_agent="Grandpa")
    try:
        assert callee.register(registrar, "200", "secret")["code"] == 200
        assert caller.register(registrar, "100", "secret")["code"] == 200
        callee.auto_answer("ring")
        app = HomePbxApp(socket_path)
        seen: dict[str, list[float]] = {"device_ringing": [], "call_answered": []}
        async with app.run_test(size=(100, 30)):
            for _ in range(calls):
                before = len(app.latencies)
                call = await asyncio.to_thread(caller.call, "sip:200@home.arpa")
                incoming = await asyncio.to_thread(callee.wait_incoming)
                await redrawn(app, "device_ringing", before)
                callee.answer(str(incoming["call"]))
                await redrawn(app, "call_answered", before)
                for kind, values in seen.items():
                    values.extend(lat for kinds, lat in app.latencies[before:] if kind in kinds)
                caller.hangup(call)
                await asyncio.to_thread(caller.wait_state, call, "DISCONNECTED")
                await asyncio.sleep(0.2)  # pjlib frees closed sockets after 500 ms; keep the pace human
        return seen
    finally:
        for phone in (callee, caller):
            phone.begin_close()
        for phone in (callee, caller):
            phone.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="TUI event-to-screen latency with a real daemon and handsets")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = Path(tmp) / "config.toml"
        config.write_text(CONFIG.format(port=port))
        daemon, _ = start_daemon(config)  # answering SIP; the control socket follows the media workers
        deadline = time.monotonic() + 10
        while not (Path(tmp) / "ctl.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            seen = asyncio.run(measure(Path(tmp) / "ctl.sock", f"sip:127.0.0.1:{port}", args.calls))
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)
    print(f"TUI event-to-screen latency over {args.calls} calls (headless Textual app, real daemon, pjsua2 handsets)")
    for kind, values in seen.items():
        print("  " + summary(kind, values))


if __name__ == "__main__":
    main()
