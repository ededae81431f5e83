"""The shipped config.toml itself, untouched but for its addresses and ports: software
nobody here wrote registers with it (baresip, linphone, sipsak), and linphone is called by
a pjsua2 handset and heard.

The file is copied as it is; only `listen` becomes a free loopback port (the box's own
5060 on every interface is not for a test) and `rtp_ports` the test worker's own range (the
suite runs in two processes at once, tests/support/ports.py). The passwords are the ones the daemon
generates into it at first start, as on a new box.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.simulator import tones
from appliance.simulator.handset import Handset
from tests.support.baresip import Baresip
from tests.support.handsets import recorded
from tests.support.linphone import Linphone
from tests.support.pbx import REPO, Daemon
from tests.support.ports import free_port, media_ports, rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

HEARD = -8.0


@pytest.fixture
def shipped(tmp_path: Path) -> Daemon:
    port = free_port()
    text = (REPO / "config.toml").read_text()
    assert 'listen = ["0.0.0.0:5060"]' in text
    config = tmp_path / "config.toml"
    assert 'rtp_ports = "10000-10999"' in text
    text = text.replace('rtp_ports = "10000-10999"', f'rtp_ports = "{media_ports()}"')  # this xdist worker's
    config.write_text(text.replace('listen = ["0.0.0.0:5060"]', f'listen = ["127.0.0.1:{port}"]'))
    return Daemon(config, port)


def password(pbx: Daemon, number: str) -> str:
    user = load_config(pbx.config).user(number)
    assert user is not None and user.password  # generated at first start
    return user.password


def test_clients_register_and_linphone_is_called_on_the_shipped_config(
        shipped: Daemon, baresip: Callable[..., Baresip], linphone: Callable[..., Linphone],
        handset_factory: Callable[..., Handset], tmp_path: Path) -> None:
    if not shutil.which("sipsak"):
        pytest.skip("sipsak is not installed (`make test` installs Debian's sipsak)")
    pbx = shipped.start()
    try:
        family = baresip(tmp_path / "baresip", pbx, "200", password(pbx, "200"), 440, rtp_range())
        family.wait_for("registered successfully")
        grandpa = linphone(tmp_path / "linphone", pbx, "100", password(pbx, "100"), 440, rtp_range())
        grandpa.wait_registered()
        office = subprocess.run(
            ["sipsak", "-U", "-s", "sip:300@127.0.0.1", "-u", "300", "-a", password(pbx, "300"), "-x", "300",
             "-r", str(pbx.port)], capture_output=True, text=True, timeout=20, check=False)
        assert office.returncode == 0, office.stdout + office.stderr
        for number, agent in (("200", "baresip"), ("100", "Linphone"), ("300", "sipsak")):
            pbx.wait_log(rf'event=device_registered number={number} .*ua="?{agent}', timeout=5)

        handset = handset_factory("family-2")
        assert handset.register(pbx.registrar, "200", password(pbx, "200"))["code"] == 200  # one_number: 2nd device
        call = handset.call("sip:100@home.arpa")
        grandpa.wait_for(r"Receiving new incoming call from .*sip:200@")
        at = grandpa.command("answer")
        grandpa.wait_for(r"Media streams established", start=at)
        handset.wait_state(call, "CONFIRMED")
        handset.wait_for("media", call=call, status="active")
        handset.play_tone(call, 1000)
        heard = recorded(handset, call, tmp_path / "heard.wav", 1000, 2.0)
        assert tones.tone_level_db(heard, 440) > HEARD  # the handset hears linphone
        handset.hangup(call)
        assert not re.search(r"event=auth_abandoned", "\n".join(pbx.lines))  # no one gave up on a challenge
    finally:
        pbx.stop()
