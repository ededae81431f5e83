"""The box registers to a provider nobody here wrote: Kamailio on 127.0.0.2 with digest auth."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import DaemonFactory
from tests.support.control import ControlConn, control_block
from tests.support.kamailio import Kamailio, available
from tests.support.pbx import Daemon, user_block

pytestmark = pytest.mark.skipif(not available(), reason="Debian's kamailio package is not installed")

DID = "4930123456"
PASSWORD = "provider-pw"


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Kamailio]:
    kamailio = Kamailio(tmp_path / "kamailio", {DID: PASSWORD}, algorithm="SHA-256").start()
    yield kamailio
    kamailio.stop()


def trunk_block(server: str, password: str = PASSWORD, **extra: object) -> str:
    lines = ["[[trunks]]", 'name = "provider"', f'server = "{server}"', f'username = "{DID}"',
             f'password = "{password}"', f'incoming = {{ "{DID}" = "200" }}']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n\n"


def start_box(pbx_factory: DaemonFactory, provider: Kamailio, password: str = PASSWORD, **trunk: object) -> Daemon:
    return pbx_factory([user_block("200")], extra=control_block() + trunk_block(provider.server, password, **trunk))


def trunk_state(daemon: Daemon) -> dict[str, Any]:
    conn = ControlConn(daemon.config.parent / "ctl.sock")
    try:
        trunks = conn.snapshot["trunks"]
    finally:
        conn.close()
    assert [t["name"] for t in trunks] == ["provider"]
    return dict(trunks[0])


def wait_status(daemon: Daemon, status: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = trunk_state(daemon)
        if state["status"] == status or time.monotonic() > deadline:
            assert state["status"] == status, state
            return state
        time.sleep(0.1)


def test_registers_with_sha256_digest(pbx_factory: DaemonFactory, provider: Kamailio) -> None:
    daemon = start_box(pbx_factory, provider)
    provider.wait_contact(5.0)
    assert provider.contacts() == [f"sip:{DID}@127.0.0.1:{daemon.port}"]
    assert provider.count("SAVED") == 1
    daemon.wait_log(r"event=trunk_registered trunk=provider server=127\.0\.0\.2:\d+ expires=600")
    state = wait_status(daemon, "registered", 2.0)
    assert state["expires_at"] > time.time() + 500
    assert state["reason"] == ""


def test_provider_restart_recovered_by_itself(pbx_factory: DaemonFactory, provider: Kamailio) -> None:
    """The provider goes away (and forgets every registration); the box notices through its
    keep-alives and is registered again soon after the provider is back."""
    daemon = start_box(pbx_factory, provider, keepalive_interval=1)
    provider.wait_contact(5.0)
    time.sleep(1.5)
    assert provider.count("OPTIONS") >= 1  # keep-alives flowing
    provider.stop()
    state = wait_status(daemon, "failing", 1 + 5 + 3)  # a keep-alive interval, its timeout, slack
    assert "keep-alive" in state["reason"]
    provider.start()
    recovery = provider.wait_contact(10.0)
    print(f"\nregistration recovery after the provider returned: {recovery:.2f} s")
    assert recovery < 6.0  # the REGISTER in flight is retransmitted every 4 s at most (T2)
    wait_status(daemon, "registered", 2.0)


def test_over_tcp_the_connection_lost_is_reopened_on_the_backoff(pbx_factory: DaemonFactory,
                                                                 provider: Kamailio) -> None:
    """`transport = "tcp"`: the provider's restart closes the box's connection; the line shows
    failing at once (no keep-alive timeout to wait for) and a new connection registers again."""
    daemon = start_box(pbx_factory, provider, transport='"tcp"')
    provider.wait_contact(5.0)
    (contact,) = provider.contacts()
    assert contact.endswith(";transport=tcp"), contact
    provider.stop()
    state = wait_status(daemon, "failing", 2.0)
    assert state["reason"] == "connection to the provider lost"
    daemon.wait_log(r"event=trunk_connection_lost trunk=provider server=127\.0\.0\.2:\d+")
    provider.start()
    recovery = provider.wait_contact(15.0)
    print(f"\nTCP registration recovery after the provider returned: {recovery:.2f} s")
    assert recovery < 11.0  # the first retry 2.5-5 s after the loss, or the second 5-10 s later
    wait_status(daemon, "registered", 2.0)
    assert provider.contacts()[0].endswith(";transport=tcp")


def test_wrong_password_is_shown_and_not_hammered(pbx_factory: DaemonFactory, provider: Kamailio) -> None:
    daemon = start_box(pbx_factory, provider, password="wrong")
    state = wait_status(daemon, "rejected", 5.0)
    assert "refused the username or password" in state["reason"]
    assert state["next_attempt"] - time.time() > 250  # the next try is minutes away
    daemon.wait_log(r"event=trunk_rejected trunk=provider .*hint=\"check username and password\"")
    window = 15.0
    time.sleep(window)
    registers = provider.count("REGISTER")
    print(f"\nREGISTERs to a provider refusing the password in {window:.0f} s: {registers}")
    assert registers == 2  # the first try and its answer to the challenge, nothing since
    assert provider.contacts() == []
