"""check-config, SIGHUP reload, generated passwords: the daemon keeps its last good config."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import load_config
from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import REPO, user_block
from tests.support.rawsip import RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "check-config", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=30)


def test_check_config_names_file_line_and_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[server]\nlisten = ["127.0.0.1:5099"]\n')
    assert check_config(good).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = ["127.0.0.1:5099"]\n\n[[users]]\nnumber = "200"\nmax_devices = "three"\n')
    result = check_config(bad)
    assert result.returncode != 0
    assert f"{bad}:6" in result.stderr and "users[0].max_devices" in result.stderr
    shipped = check_config(REPO / "config.toml")
    assert shipped.returncode == 0, shipped.stderr


def test_sighup_bad_config_refused_good_config_applied(pbx_factory: DaemonFactory) -> None:
    pbx = pbx_factory([user_block("200", one_number=True, max_devices=1)])
    config = pbx.config
    original = config.read_text()
    client = RawClient(pbx.port)
    assert client.register("200", "secret").status == 200

    config.write_text(original + "\nbogus_key = 1\n")
    mark = len(pbx.lines)
    pbx.signal(signal.SIGHUP)
    line = pbx.wait_log("event=reload_refused", start=mark)
    assert str(config) in line and "bogus_key" in line
    # Still serving on the last good config.
    assert client.register("200", "secret").status == 200

    # A good change goes live: user 300 appears with a generated password written back.
    config.write_text(original + '\n# the office\n[[users]]\nnumber = "300"\npassword = ""\n')
    mark = len(pbx.lines)
    pbx.signal(signal.SIGHUP)
    pbx.wait_log("event=config_reloaded", start=mark)
    pbx.wait_log("event=password_generated number=300", start=mark)
    text = config.read_text()
    assert "# the office" in text and "# test config" in text
    password = load_config(config).user("300").password  # type: ignore[union-attr]
    assert len(password) >= 16
    office = RawClient(pbx.port)
    assert office.register("300", password).status == 200
    assert office.register("300", "wrong").status == 403
    client.close()
    office.close()


def test_generated_password_at_first_start(pbx_factory: DaemonFactory) -> None:
    pbx = pbx_factory([user_block("100", password="")])
    line = pbx.wait_log("event=password_generated number=100")
    password = load_config(pbx.config).user("100").password  # type: ignore[union-attr]
    assert f"password={password}" in line  # logged once, for the owner to type into the phone
    assert len(pbx.log_matches("password_generated")) == 1
    client = RawClient(pbx.port)
    assert client.register("100", password).status == 200
    client.close()


def test_sighup_changes_the_digest_algorithms_offered(pbx_factory: DaemonFactory) -> None:
    pbx = pbx_factory([user_block("200")])
    client = RawClient(pbx.port)

    def offered() -> list[str]:
        client.send(client.request("REGISTER", "sip:home.arpa", "200", headers=[("Expires", "300")]))
        challenge = client.final()
        assert challenge.status == 401
        return [v.split("algorithm=")[1].split(",")[0] for v in challenge.get_all("WWW-Authenticate")]

    assert offered() == ["SHA-256", "MD5"]
    text = pbx.config.read_text().replace('state_dir = "state"\n', 'state_dir = "state"\ndigest_algorithms = ["MD5"]\n')
    pbx.config.write_text(text)
    mark = len(pbx.lines)
    pbx.signal(signal.SIGHUP)
    pbx.wait_log("event=config_reloaded", start=mark)
    assert offered() == ["MD5"]
    assert client.register("200", "secret").status == 200  # answered with MD5, the one offered
    client.close()
