"""The shipped digest settings work with handsets that give up on SHA-256, and say so.

homepbx offers SHA-256 and MD5 (RFC 8760 order) to every device, except one known or seen
to give up on SHA-256 (appliance/sip/digest_fallback.py): that one is offered MD5 alone.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import Daemon, user_block
from tests.support.rawsip import RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def offered(client: RawClient, number: str) -> list[str]:
    """The algorithms of the challenges a fresh REGISTER gets (left unanswered)."""
    client.send(client.request("REGISTER", "sip:home.arpa", number,
                               headers=[("Contact", f"<sip:{number}@127.0.0.1:{client.port}>")]))
    response = client.recv()
    assert response.status == 401
    return [re.search(r"algorithm=([\w-]+)", v).group(1)  # type: ignore[union-attr]
            for v in response.get_all("WWW-Authenticate")]


def test_a_device_that_gives_up_on_sha256_is_told_apart_and_offered_md5(pbx_factory: DaemonFactory) -> None:
    pbx = pbx_factory([user_block("200")])
    phone = RawClient(pbx.port, user_agent="Acme Phone 1.0")
    try:
        assert offered(phone, "200") == ["SHA-256", "MD5"]  # and it never answers: gave up
        line = pbx.wait_log(r"event=auth_abandoned ", timeout=6)
        assert 'number=200 peer=127.0.0.1 ua="Acme Phone 1.0" action=offer_md5_only' in line
        assert offered(phone, "200") == ["MD5"]
        assert phone.register("200", "secret").status == 200
        assert pbx.log_matches("event=auth_failed") == []  # giving up is not a wrong password
        others = RawClient(pbx.port, user_agent="Other Phone 2.0")
        try:
            assert offered(others, "200") == ["SHA-256", "MD5"]  # other software keeps SHA-256
            assert others.register("200", "secret").status == 200
        finally:
            others.close()
    finally:
        phone.close()
    assert pbx.stop() == 0
    again = Daemon(pbx.config, pbx.port).start()  # what was learned survives a restart
    phone = RawClient(again.port, user_agent="Acme Phone 1.0")
    try:
        assert offered(phone, "200") == ["MD5"]
    finally:
        phone.close()
        again.stop()


def test_software_known_to_give_up_gets_md5_from_the_first_challenge(pbx_factory: DaemonFactory) -> None:
    pbx = pbx_factory([user_block("200")])
    for agent in ("baresip v1.0.0 (x86_64/linux)", "sipsak 0.9.8.1", "SIPp"):
        client = RawClient(pbx.port, user_agent=agent)
        try:
            assert offered(client, "200") == ["MD5"], agent
        finally:
            client.close()
    time.sleep(1.5)
    assert pbx.log_matches("event=auth_abandoned") == []  # MD5 alone: nothing to give up on
