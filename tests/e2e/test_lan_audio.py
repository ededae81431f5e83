"""Audio with a handset that is not on the box itself (issue 12: "handsets work out of the box").

Every other test runs on loopback, where a media worker that advertises 127.0.0.1 still
works. Here one handset lives in its own network namespace, joined to the box by a veth
pair (10.231.N.1 on the box, 10.231.N.2 for the handset), as a phone on the LAN is: it
registers, calls and is called through the real daemon, and each party must hear the
other's tone, also after a hold and resume (a re-INVITE relayed through the box). The
daemon listens either on the box's LAN address or on the wildcard (the shipped config).

Needs root (`ip netns`); skipped with the reason when it is not permitted.
"""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.e2e.test_join_and_media import FAINT, HEARD, listen
from tests.support.pbx import Daemon, user_block, write_config
from tests.support.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HandsetFactory = Callable[..., Handset]


@dataclass(frozen=True)
class Lan:
    namespace: str
    box_ip: str
    phone_ip: str
    python: str
    """A python that runs inside the namespace (`ip netns exec`), for Handset(python=...)."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    """A network namespace with a veth pair to the box, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace (ip netns)")
    taken = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    free = [n for n in range(1, 255) if f" 10.231.{n}." not in taken]
    net = random.choice(free)
    suffix = secrets.token_hex(3)
    namespace, box_if, phone_if = f"hpbx-phone-{suffix}", f"hpbxb{suffix}", f"hpbxp{suffix}"
    box_ip, phone_ip = f"10.231.{net}.1", f"10.231.{net}.2"
    try:
        try:
            _ip("netns", "add", namespace)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"ip netns not permitted here: {getattr(exc, 'stderr', '') or exc}")
        _ip("link", "add", box_if, "type", "veth", "peer", "name", phone_if)
        _ip("link", "set", phone_if, "netns", namespace)
        _ip("addr", "add", f"{box_ip}/24", "dev", box_if)
        _ip("link", "set", box_if, "up")
        _ip("-n", namespace, "addr", "add", f"{phone_ip}/24", "dev", phone_if)
        _ip("-n", namespace, "link", "set", phone_if, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        wrapper = tmp_path / "python-in-namespace"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {namespace} {sys.executable} "$@"\n')
        wrapper.chmod(0o755)
        yield Lan(namespace, box_ip, phone_ip, str(wrapper))
    finally:
        subprocess.run(["ip", "link", "del", box_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


def _sdp_received(phone: Handset, start: str) -> str:
    """The SDP of the last traced message the phone received that starts with `start`."""
    for msg in reversed(phone.sip_messages("rx")):
        if msg.startswith(start) and "m=audio" in msg:
            return msg.split("\r\n\r\n", 1)[1]
    raise AssertionError(f"{phone!r} received no {start!r} with SDP")


def _connection(sdp: str) -> set[str]:
    """The addresses of an SDP's c= and o= lines."""
    return {line.split()[-1] for line in sdp.splitlines() if line.startswith(("c=", "o="))}


def _hear_each_other(a: Handset, a_call: str, b: Handset, b_call: str, tmp: Path) -> None:
    tmp.mkdir()
    heard = listen([(a, a_call, 440), (b, b_call, 1000)], tmp)
    assert tones.tone_level_db(heard[440], 1000) > HEARD, f"{a.name} does not hear {b.name}"
    assert tones.tone_level_db(heard[1000], 440) > HEARD, f"{b.name} does not hear {a.name}"
    assert tones.tone_level_db(heard[440], 440) < FAINT


@pytest.mark.parametrize("listen_on", ["lan_address", "wildcard"])
def test_lan_handset_hears_and_is_heard(lan: Lan, listen_on: str, handset_factory: HandsetFactory,
                                        tmp_path: Path) -> None:
    port = free_port("0.0.0.0")  # free on every address: the wildcard case binds them all
    host = lan.box_ip if listen_on == "lan_address" else "0.0.0.0"
    config = write_config(tmp_path, port, [user_block("100"), user_block("200")], listen=[f"{host}:{port}"])
    pbx = Daemon(config, port).start()
    try:
        far = handset_factory("far", python=lan.python, bind=lan.phone_ip, trace=True)
        assert far.register(f"sip:{lan.box_ip}:{port}", "100", "secret")["code"] == 200
        near = handset_factory("near", trace=True)
        near_registrar = f"sip:{lan.box_ip if listen_on == 'lan_address' else '127.0.0.1'}:{port}"
        assert near.register(near_registrar, "200", "secret")["code"] == 200

        # The LAN handset calls: the worker's answer reaches it naming the box's LAN address.
        call = far.call("sip:200@home.arpa")
        incoming = str(near.wait_incoming()["call"])
        near.answer(incoming, 200)
        far.wait_state(call, "CONFIRMED")
        far.wait_for("media", call=call, status="active")
        near.wait_for("media", call=incoming, status="active")
        assert _connection(_sdp_received(far, "SIP/2.0 200")) == {lan.box_ip}
        _hear_each_other(far, call, near, incoming, tmp_path / "a")

        # Hold and resume: the answer to each re-INVITE is relayed in the dialog.
        far.send("hold", call=call)
        far.wait_for("media", call=call, status="local_hold")
        far.send("unhold", call=call)
        far.wait_for("media", call=call, status="active")
        assert _connection(_sdp_received(far, "SIP/2.0 200")) == {lan.box_ip}
        _hear_each_other(far, call, near, incoming, tmp_path / "b")
        far.hangup(call)
        near.wait_state(incoming, "DISCONNECTED")
        pbx.wait_log("event=call_ended")

        # The LAN handset is called: the forked INVITE reaches it naming the box's LAN address.
        back = near.call("sip:100@home.arpa")
        ringing = str(far.wait_incoming()["call"])
        assert _connection(_sdp_received(far, "INVITE ")) == {lan.box_ip}
        far.answer(ringing, 200)
        near.wait_state(back, "CONFIRMED")
        near.wait_for("media", call=back, status="active")
        far.wait_for("media", call=ringing, status="active")
        _hear_each_other(near, back, far, ringing, tmp_path / "c")
        near.hangup(back)
        far.wait_state(ringing, "DISCONNECTED")
    finally:
        pbx.stop()
