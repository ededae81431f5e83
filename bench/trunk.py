"""The outside line against a provider nobody here wrote (Kamailio): figures, not a test.

Kamailio (Debian's `kamailio`) plays the provider on 127.0.0.2, the box registers to it
as 4930123456, and an outside pjsua2 phone registered at Kamailio calls that number.
Prints: outside-call setup (the provider's INVITE reaching the box to all three devices
of 200 ringing) p50/p99 over `--calls` calls; registration recovery after the provider
restarts (keep-alive every `--keepalive` s); REGISTERs a provider refusing the password
sees in `--refused-seconds` (a real minute by default).

    .venv/bin/python bench/trunk.py [--calls 20] [--keepalive 1] [--refused-seconds 60]
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
from tests.support.control import ControlConn, control_block  # noqa: E402
from tests.support.kamailio import DID, OUTSIDE, OUTSIDE_PASSWORD, PASSWORD, Kamailio, available  # noqa: E402
from tests.support.pbx import Daemon, user_block, write_config  # noqa: E402


def box(tmp: Path, provider: Kamailio, password: str = PASSWORD, extra: str = "") -> Daemon:
    trunk = ('[[trunks]]\nname = "provider"\n'
             f'server = "{provider.server}"\nusername = "{DID}"\npassword = "{password}"\n'
             f'incoming = {{ "{DID}" = "200" }}\n{extra}\n')
    port = free_port()
    config = write_config(tmp, port, [user_block("100"), user_block("200", one_number=True)],
                          extra=control_block() + trunk)
    return Daemon(config, port).start()


def setup_times(tmp: Path, calls: int) -> None:
    provider = Kamailio(tmp / "kamailio", {DID: PASSWORD, OUTSIDE: OUTSIDE_PASSWORD}).start()
    pbx = box(tmp, provider)
    phones = [Handset(name=f"b{i}", log_path=tmp / f"b{i}.log") for i in range(3)]
    outside = Handset(name="outside", log_path=tmp / "outside.log", codecs=["PCMA/8000"])
    try:
        for phone in phones:
            assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
        pbx.wait_log(r"event=trunk_registered trunk=provider", timeout=10)
        reg = outside.register(f"sip:{provider.server}", OUTSIDE, OUTSIDE_PASSWORD, domain=provider.server)
        assert reg["code"] == 200, reg
        control = ControlConn(pbx.config.parent / "ctl.sock")
        setups = []
        for _ in range(calls):
            call = outside.call(f"sip:{DID}@{provider.server}")
            start = control.wait_event("call_started")["call"]["started_at"]  # the box's wall clock
            for _ in phones:
                control.wait_event("device_ringing")
            setups.append((time.time() - start) * 1000)
            incoming = [str(p.wait_incoming(timeout=5)["call"]) for p in phones]
            outside.hangup(call)
            for phone, cid in zip(phones, incoming, strict=True):
                phone.wait_state(cid, "DISCONNECTED")
            control.wait_event("call_ended")
            time.sleep(0.15)  # a worker rests after a call
        control.close()
        ms = sorted(setups)
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        print(f"outside call setup (provider INVITE at the box -> 3 devices ringing), {len(ms)} calls: "
              f"p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms")
    finally:
        for phone in [*phones, outside]:
            phone.begin_close()
        for phone in [*phones, outside]:
            phone.close()
        pbx.stop()
        provider.stop()


def recovery(tmp: Path, keepalive: int) -> None:
    provider = Kamailio(tmp / "kamailio", {DID: PASSWORD}).start()
    pbx = box(tmp, provider, extra=f"keepalive_interval = {keepalive}\n")
    try:
        provider.wait_contact(10.0)
        provider.stop()
        time.sleep(keepalive + 6)  # a keep-alive goes unanswered: the line is failing
        provider.start()
        took = provider.wait_contact(30.0)
        print(f"registration recovery after the provider returned (keep-alive every {keepalive} s): {took:.2f} s")
    finally:
        pbx.stop()
        provider.stop()


def refused(tmp: Path, seconds: float) -> None:
    provider = Kamailio(tmp / "kamailio", {DID: PASSWORD}).start()
    pbx = box(tmp, provider, password="wrong")
    try:
        time.sleep(seconds)
        print(f"REGISTERs seen by a provider refusing the password in {seconds:.0f} s: "
              f"{provider.count('REGISTER')}")
    finally:
        pbx.stop()
        provider.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--keepalive", type=int, default=1)
    parser.add_argument("--refused-seconds", type=float, default=60.0)
    args = parser.parse_args()
    if not available():
        print("kamailio is not installed (`make test` installs Debian's kamailio)")
        return 1
    for phase in (lambda tmp: setup_times(tmp, args.calls), lambda tmp: recovery(tmp, args.keepalive),
                  lambda tmp: refused(tmp, args.refused_seconds)):
        with tempfile.TemporaryDirectory() as tmp:
            phase(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
