"""One number, many devices: real pjsua2 handsets register to the real daemon."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from appliance.simulator.handset import Handset
from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import user_block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

HandsetFactory = Callable[..., Handset]


def registered_devices(daemon: object, number: str) -> int:
    """Devices of `number` in the daemon's state file (written within ~1 s)."""
    from tests.support.pbx import Daemon

    assert isinstance(daemon, Daemon)
    path = daemon.config.parent / "state" / "bindings.json"
    data = json.loads(path.read_text())
    return sum(1 for b in data["bindings"] if b["number"] == number)


def wait_devices(daemon: object, number: str, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if registered_devices(daemon, number) == count:
                return
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{number} does not have {count} devices")
        time.sleep(0.05)


def test_three_devices_then_fourth_refused(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([user_block("200", one_number=True, max_devices=3)])
    phones = [handset_factory(f"p{i}", transport="udp" if i % 2 else "tcp") for i in range(4)]
    for phone in phones[:3]:
        state = phone.register(pbx.registrar, "200", "secret")
        assert state["code"] == 200, state
    wait_devices(pbx, "200", 3)
    refused = phones[3].register(pbx.registrar, "200", "secret")
    assert refused["code"] == 403
    assert "Device limit reached" in str(refused["reason"])
    # A refresh of a registered device is not a new device.
    phones[0].send("set_registration", renew=True)
    renewed = phones[0].wait_for("reg_state", code=200, timeout=5)
    assert renewed["code"] == 200
    wait_devices(pbx, "200", 3)
    # Unregistering frees a slot for the fourth device.
    assert phones[1].unregister()["code"] == 200
    wait_devices(pbx, "200", 2)
    phones[3].send("set_registration", renew=True)
    assert phones[3].wait_for("reg_state", code=200, timeout=5)["code"] == 200
    wait_devices(pbx, "200", 3)
    assert pbx.log_matches("event=device_removed.*reason=unregistered")


def test_one_number_off_new_device_replaces_old(pbx_factory: DaemonFactory,
                                                handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([user_block("100")])
    first, second = handset_factory("first"), handset_factory("second", transport="tcp")
    assert first.register(pbx.registrar, "100", "secret")["code"] == 200
    assert second.register(pbx.registrar, "100", "secret")["code"] == 200
    wait_devices(pbx, "100", 1)
    line = pbx.wait_log("event=device_removed.*reason=replaced")
    assert f":{first.port}" in line


def test_wrong_password_refused_and_throttled(pbx_factory: DaemonFactory,
                                              handset_factory: HandsetFactory) -> None:
    from tests.support.rawsip import RawClient

    pbx = pbx_factory([user_block("200")])
    phone = handset_factory("bad")
    state = phone.register(pbx.registrar, "200", "wrong")
    assert state["code"] == 403
    client = RawClient(pbx.port)
    try:
        for _ in range(12):
            try:
                response = client.register("200", "wrong")
            except TimeoutError:
                break
            assert response.status == 403
        else:
            raise AssertionError("address never throttled")
        pbx.wait_log("event=address_blocked peer=127.0.0.1")
        # Ignored now, even with the right password: the cool-off holds.
        with pytest.raises(TimeoutError):
            client.register("200", "secret")
    finally:
        client.close()


def test_bindings_survive_restart_and_kill(pbx_factory: DaemonFactory,
                                           handset_factory: HandsetFactory) -> None:
    from tests.support.pbx import Daemon

    pbx = pbx_factory([user_block("200", one_number=True)])
    phones = [handset_factory(f"p{i}") for i in range(2)]
    for phone in phones:
        assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
    wait_devices(pbx, "200", 2)
    time.sleep(1.5)  # past the coalesced state write
    pbx.kill()  # kill -9: no chance to flush
    again = Daemon(pbx.config, pbx.port).start()
    try:
        again.wait_log("event=bindings_restored count=2")
        code = again.stop()
        assert code == 0, "\n".join(again.lines[-60:])
        third = Daemon(pbx.config, pbx.port).start()
        try:
            third.wait_log("event=bindings_restored count=2")
        finally:
            third.stop()
    finally:
        again.stop()


def test_unreachable_device_replaced_then_removed(pbx_factory: DaemonFactory,
                                                  handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([user_block("200", one_number=True, max_devices=2)],
                      qualify_interval=1, qualify_timeout=1)
    a, b, c = handset_factory("a"), handset_factory("b"), handset_factory("c")
    assert a.register(pbx.registrar, "200", "secret")["code"] == 200
    assert b.register(pbx.registrar, "200", "secret")["code"] == 200
    assert c.register(pbx.registrar, "200", "secret")["code"] == 403
    b.kill()  # the handset vanishes without unregistering
    pbx.wait_log("event=device_unreachable", timeout=6)
    c.send("set_registration", renew=True)
    assert c.wait_for("reg_state", code=200, timeout=5)["code"] == 200
    line = pbx.wait_log("event=device_removed.*reason=replaced")
    assert f":{b.port}" in line
    wait_devices(pbx, "200", 2)
    # a and c answer qualify and stay; nothing else is removed.
    time.sleep(2.5)
    wait_devices(pbx, "200", 2)


def test_qualify_removes_after_three_misses(pbx_factory: DaemonFactory,
                                            handset_factory: HandsetFactory) -> None:
    pbx = pbx_factory([user_block("200", one_number=True)], qualify_interval=1, qualify_timeout=1)
    phone = handset_factory("gone")
    assert phone.register(pbx.registrar, "200", "secret")["code"] == 200
    phone.kill()
    pbx.wait_log("event=device_unreachable", timeout=6)
    pbx.wait_log("event=device_removed.*reason=unreachable", timeout=10)
    wait_devices(pbx, "200", 0)


def test_invite_auth_failures_block_and_the_block_is_logged(pbx_factory: DaemonFactory) -> None:
    """A password-guessing INVITE storm is blocked like a REGISTER one, and says so once."""
    from tests.support.rawsip import RawClient

    pbx = pbx_factory([user_block("100"), user_block("200")])
    client = RawClient(pbx.port)
    try:
        for _ in range(12):
            try:
                response = client.invite_with_auth("200", "100", "wrong")
            except TimeoutError:
                break
            assert response.status == 403
        else:
            raise AssertionError("address never throttled")
        line = pbx.wait_log(r"event=address_blocked peer=127\.0\.0\.1 ")
        assert "seconds=60 reason=auth_failures method=INVITE" in line
        assert len(pbx.log_matches("event=address_blocked")) == 1
    finally:
        client.close()


def test_bindings_of_a_removed_user_are_dropped_on_load(pbx_factory: DaemonFactory,
                                                         handset_factory: HandsetFactory) -> None:
    from tests.support.pbx import Daemon

    pbx = pbx_factory([user_block("200"), user_block("300")])
    assert handset_factory("p200").register(pbx.registrar, "200", "secret")["code"] == 200
    assert handset_factory("p300").register(pbx.registrar, "300", "secret")["code"] == 200
    wait_devices(pbx, "300", 1)
    time.sleep(1.5)  # past the coalesced state write
    assert pbx.stop() == 0
    text = pbx.config.read_text()
    pbx.config.write_text(text.replace(user_block("300"), ""))  # 300 leaves the config while stopped
    again = Daemon(pbx.config, pbx.port).start()
    try:
        again.wait_log("event=bindings_restored count=2")
        again.wait_log(r"event=device_removed number=300 .*reason=deleted")
        wait_devices(again, "300", 0)
        assert registered_devices(again, "200") == 1
    finally:
        again.stop()
