"""The benchmarks are not tests, but they must at least start: each one answers --help.

A bench that no longer imports (a helper renamed in another bench, say) would otherwise
only be found the next time someone wants a figure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_starts(script: str) -> None:
    result = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_fuzz_corpus_is_real_sip() -> None:
    """Every corpus entry parses as sent, with its Content-Length matching its body."""
    from appliance.sip.message import parse_message
    from bench.fuzz import load_corpus

    corpus = load_corpus()
    methods = set()
    for data in corpus:
        message = parse_message(data)
        assert len(message.body) == int(message.get("Content-Length") or 0)
        methods.add(getattr(message, "method", "response"))
    assert {"REGISTER", "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "SUBSCRIBE", "response"} <= methods


def test_fuzz_never_lets_a_relayed_response_leave_loopback() -> None:
    """The stateless relay sends a response to its second Via: a fuzzed one must never name a
    routable address (the branch prefix in any case, anywhere in a datagram or TCP stream)."""
    from bench.fuzz import relays_off_loopback

    head = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch={b}\r\nVia: SIP/2.0/UDP {host}:5060\r\n"
    assert relays_off_loopback(head.format(b="z9hG4bKsl1", host="10.0.0.1").encode())
    assert relays_off_loopback(head.format(b="z9hG4bKSL1", host="127.0.0.1;received=192.168.1.2").encode())
    assert relays_off_loopback(b"junk z9hG4bKsl then later 8.8.8.8")
    assert not relays_off_loopback(head.format(b="z9hG4bKsl1", host="127.3.2.1").encode())
    assert not relays_off_loopback(head.format(b="z9hG4bKab", host="10.0.0.1").encode())
