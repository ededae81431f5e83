"""TCP handsets survive a PBX restart (issue 12): the box connects to the Contact again.

A restart closes every TCP connection, and a binding restored from bindings.json names a
connection that is gone. The box opens a new one to the handset's Contact (RFC 3261
§18.1.1) and reaches it over that from then on; where it cannot, it says why.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_registration import wait_devices
from tests.support.pbx import Daemon, user_block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

HandsetFactory = Callable[..., Handset]


def register_tcp(handset: Handset, pbx: Daemon, number: str) -> None:
    """Register over TCP with the handset's TCP listener as its Contact (pjsua puts the
    connection's source port there by default, where nothing listens)."""
    handset.send("register", registrar=f"{pbx.registrar};transport=tcp", number=number, password="secret",
                 realm="*", domain="home.arpa", expires=300, transport="tcp", contact_use_src_port=False)
    reg = handset.wait_for("reg_state", aor=f"sip:{number}@home.arpa")
    assert reg["code"] == 200
    assert f"127.0.0.1:{handset.port};" in str(reg["contacts"])


def _restart(pbx: Daemon, how: str, meanwhile: Callable[[], None] = lambda: None) -> Daemon:
    time.sleep(1.2)  # past the coalesced state write: a kill -9 flushes nothing
    if how == "kill":
        assert pbx.proc is not None
        pbx.proc.kill()
        pbx.proc.wait()
    else:
        assert pbx.stop() == 0
    meanwhile()
    return Daemon(pbx.config, pbx.port).start()


@pytest.mark.parametrize("how", ["sigterm", "kill"])
def test_tcp_handset_rings_and_answers_after_restart(pbx_factory: DaemonFactory,
                                                     handset_factory: HandsetFactory, how: str) -> None:
    pbx = pbx_factory([user_block("100"), user_block("200")])
    caller = handset_factory("caller")
    callee = handset_factory("tcp200", transport="tcp")
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
    register_tcp(callee, pbx, "200")
    wait_devices(pbx, "200", 1)
    again = _restart(pbx, how)
    try:
        again.wait_log("event=bindings_restored count=2")
        call = caller.call("sip:200@home.arpa")
        incoming = str(callee.wait_incoming(timeout=5)["call"])
        callee.wait_state(incoming, "EARLY")
        callee.answer(incoming, 200)
        caller.wait_state(call, "CONFIRMED")
        callee.wait_state(incoming, "CONFIRMED")
        caller.hangup(call)
        assert callee.wait_state(incoming, "DISCONNECTED")["end_request"] == "BYE"
        again.wait_log("event=call_ended .*reason=bye_from_caller")
        line = again.wait_log(r"event=tcp_connected ")
        assert f":{callee.port}" in line  # to the Contact's listener, not the old flow
        assert not again.log_matches("event=device_unreachable")
    finally:
        again.stop()


def test_unreachable_contact_says_why(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([user_block("100"), user_block("200")])
    caller = handset_factory("caller")
    callee = handset_factory("gone", transport="tcp")
    assert caller.register(pbx.registrar, "100", "secret")["code"] == 200
    register_tcp(callee, pbx, "200")
    wait_devices(pbx, "200", 1)
    # The handset goes while the box is down: nothing listens on its Contact any more.
    again = _restart(pbx, "sigterm", meanwhile=callee.kill)
    try:
        line = again.wait_log(r"event=device_unreachable number=200 ", timeout=8)
        assert "reason=tcp_connect_failed" in line
        call = caller.call("sip:200@home.arpa")
        ended = caller.wait_state(call, "DISCONNECTED", timeout=5)
        assert ended["last_status"] == 480
    finally:
        again.stop()


def test_lost_connection_is_reached_again_at_once(pbx_factory: DaemonFactory,
                                                  handset_factory: HandsetFactory) -> None:
    """Not only a restart: a handset whose connection closed is reached again at once, and
    one that went away for good is unreachable with the reason, without waiting for qualify."""
    pbx = pbx_factory([user_block("200", one_number=True)])
    stays, goes = handset_factory("stays", transport="tcp"), handset_factory("goes", transport="tcp")
    register_tcp(stays, pbx, "200")
    register_tcp(goes, pbx, "200")
    goes.kill()
    line = pbx.wait_log(r"event=device_unreachable number=200 ", timeout=5)
    # Within 5 s, not at the next qualify (30 s): the box tried it again at once. Its
    # reconnect is refused (tcp_connect_failed) or, now and then on loopback, gets through
    # and the OPTIONS on it goes unanswered within qualify_timeout (no_answer).
    assert re.search(r"reason=(tcp_connect_failed|no_answer)$", line), line
    assert len(pbx.log_matches("event=device_unreachable")) == 1  # the other one stays reachable
