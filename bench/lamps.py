"""Busy lamps in the edge, in-process (no sockets): what SUBSCRIBEs and a NOTIFY fan-out cost.

`--watchers` subscriptions to one number (each with the full 407 digest round trip, its
200 and first NOTIFY), then that number starts ringing, is answered and hangs up: every
watcher gets a NOTIFY for each. The network only counts bytes, the clock is the real one,
the timer wheel is driven by hand; the NOTIFYs stay unanswered (their transactions are
in the memory figure). Prints figures; it is not a test and asserts nothing.

    .venv/bin/python bench/lamps.py [--watchers 1000] [--event dialog]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.config import LiveConfig, parse_config  # noqa: E402
from appliance.edge.auth_gate import AuthGate  # noqa: E402
from appliance.edge.subscriptions import Subscriptions  # noqa: E402
from appliance.edge.timers import TimerWheel  # noqa: E402
from appliance.sip.auth import NonceManager, authorization_value  # noqa: E402
from appliance.sip.authenticator import Authenticator  # noqa: E402
from appliance.sip.digest_fallback import DigestFallback  # noqa: E402
from appliance.sip.message import Request, parse_message  # noqa: E402
from appliance.sip.registrar import Flow, Registrar  # noqa: E402
from appliance.sip.throttle import FailureThrottle  # noqa: E402

CONFIG = """
[server]
listen = ["127.0.0.1:5060"]
[[users]]
number = "100"
password = "pw"
[[users]]
number = "200"
password = "pw"
[[users]]
number = "300"
password = "pw"
"""


class CountingNetwork:
    def __init__(self) -> None:
        self.addresses = ["127.0.0.1:5060"]
        self.messages = 0
        self.bytes = 0

    def send(self, data: bytes, flow: Flow) -> bool:
        self.messages += 1
        self.bytes += len(data)
        return True

    def local_address(self, flow: Flow) -> tuple[str, int]:
        return "127.0.0.1", 5060

    def local_ips(self) -> set[str]:
        return {"127.0.0.1"}

    def flow_open(self, flow: Flow) -> bool:
        return True

    def connect(self, flow: Flow, then: Callable[[Flow | None, str], None]) -> None:
        then(None, "bench")


def subscribe_text(call_id: str, cseq: int, flow: Flow, event: str, extra: str = "") -> Request:
    text = (f"SUBSCRIBE sip:200@home.arpa SIP/2.0\r\nVia: SIP/2.0/UDP {flow.host}:{flow.port};branch=z9hG4bK{call_id}"
            f"{cseq};rport\r\nMax-Forwards: 70\r\nFrom: <sip:300@home.arpa>;tag=f{call_id}\r\n"
            f"To: <sip:200@home.arpa>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} SUBSCRIBE\r\n"
            f"Contact: <sip:300@{flow.host}:{flow.port}>\r\nEvent: {event}\r\nExpires: 600\r\n{extra}"
            "Content-Length: 0\r\n\r\n")
    message = parse_message(text.encode())
    assert isinstance(message, Request)
    return message


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--event", default="dialog", choices=("dialog", "presence"))
    args = parser.parse_args()
    settings = LiveConfig(parse_config(CONFIG, Path("/etc/homepbx/config.toml")))
    timers = TimerWheel(time.monotonic, manual=True)
    throttle = FailureThrottle()
    auth = AuthGate(Authenticator("home.arpa", NonceManager(b"k" * 32), throttle), settings,
                    lambda *_: None, DigestFallback())
    network = CountingNetwork()
    lamps = Subscriptions(settings, network, auth, Registrar(60, 3600, 600), timers,
                          max_per_device=args.watchers, max_total=args.watchers)
    tracemalloc.start()
    started = time.perf_counter()
    for i in range(args.watchers):
        flow = Flow("udp", f"10.0.{i // 250}.{i % 250 + 1}", 5062, "127.0.0.1:5060")
        challenge = lamps.on_subscribe(subscribe_text(f"c{i}", 1, flow, args.event), flow, flow, timers.now())
        value = authorization_value(challenge.get("Proxy-Authenticate") or "", username="300", password="pw",
                                    method="SUBSCRIBE", uri="sip:200@home.arpa", cnonce="c0ffee")
        ok = lamps.on_subscribe(subscribe_text(f"c{i}", 2, flow, args.event, f"Proxy-Authorization: {value}\r\n"),
                                flow, flow, timers.now())
        assert ok.status == 200, ok
        timers.advance_to(timers.now())  # the first NOTIFY
    subscribed = time.perf_counter() - started
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"{args.watchers} {args.event} subscriptions (407 round trip, 200, first NOTIFY): "
          f"{subscribed * 1e3 / args.watchers:.3f} ms each; {memory / args.watchers / 1e3:.1f} kB each (traced)")
    for what, step in (("ringing", lambda: (lamps.call_started("t1", "100", "200", "d1"),
                                            lamps.device_ringing("t1", "d2"))),
                       ("answered", lambda: lamps.call_answered("t1", None)),
                       ("hung up", lambda: lamps.call_ended("t1", "bye_from_caller"))):
        before, sent_bytes = network.messages, network.bytes
        t0 = time.perf_counter()
        step()
        elapsed = time.perf_counter() - t0
        print(f"200 {what}: {network.messages - before} NOTIFYs ({(network.bytes - sent_bytes) / 1e3:.0f} kB) "
              f"in {elapsed * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
