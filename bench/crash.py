"""kill -9 of the daemon mid-call: how long until both handsets have their BYE. Figures, not a test.

Each run starts a daemon on a loopback port with media workers, two pjsua2 handsets
(100 calls 200, 200 answers), kills the daemon with SIGKILL, and times until both
handsets report the call DISCONNECTED by a BYE (sent by the orphaned media worker
straight to each of them).

    .venv/bin/python bench/crash.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.ports import free_port  # noqa: E402
from appliance.simulator.handset import Handset  # noqa: E402
from tests.support.pbx import Daemon, user_block, write_config  # noqa: E402


def one_run(tmp: Path) -> float:
    port = free_port()
    config = write_config(tmp, port, [user_block("100"), user_block("200")])
    daemon = Daemon(config, port).start()
    phones = [Handset(name=name, log_path=tmp / f"{name}.log") for name in ("caller", "callee")]
    try:
        caller, callee = phones
        assert caller.register(daemon.registrar, "100", "secret")["code"] == 200
        assert callee.register(daemon.registrar, "200", "secret")["code"] == 200
        call = caller.call("sip:200@home.arpa")
        incoming = str(callee.wait_incoming()["call"])
        callee.answer(incoming, 200)
        caller.wait_state(call, "CONFIRMED")
        callee.wait_state(incoming, "CONFIRMED")
        killed = time.monotonic()
        daemon.kill()
        ends = [caller.wait_state(call, "DISCONNECTED", timeout=10),
                callee.wait_state(incoming, "DISCONNECTED", timeout=10)]
        elapsed = time.monotonic() - killed
        assert all(end["end_request"] == "BYE" for end in ends), ends
        return elapsed
    finally:
        for phone in phones:
            phone.begin_close()
        for phone in phones:
            phone.close()
        daemon.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            times.append(one_run(Path(tmp)))
        print(f"run {i + 1}: kill -9 to both BYEs {times[-1] * 1000:.1f} ms")
    print(f"kill -9 to both parties' BYE over {len(times)} runs: median {statistics.median(times) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
