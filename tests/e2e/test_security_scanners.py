"""SIPVicious, the scanner that finds and brute-forces SIP accounts, against the real daemon.

svwar enumerates extensions by the answers a PBX gives to REGISTER, INVITE and OPTIONS for
numbers that exist and numbers that do not; homepbx answers both alike, so it finds nothing.
svcrack guesses passwords: after 10 failures in a minute the address is ignored, so the
right password, further down its list, is never tried.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import Daemon, user_block
from tests.support.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

BIN = Path(sys.executable).parent


def scanner(tool: str, pbx: Daemon, *args: str) -> str:
    result = subprocess.run([str(BIN / f"sipvicious_{tool}"), *args, "-P", str(free_port()), "-p", str(pbx.port),
                             "127.0.0.1"], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


@pytest.mark.parametrize("method", ["REGISTER", "INVITE", "OPTIONS"])
def test_svwar_finds_no_extension(pbx_factory: DaemonFactory, method: str) -> None:
    pbx = pbx_factory([user_block("200"), user_block("201", one_number=True)])
    out = scanner("svwar", pbx, "--force", "-m", method, "-e", "150-250")
    assert "found nothing" in out, out
    assert "| 200" not in out and "| 201" not in out
    assert pbx.alive()


def test_svcrack_is_stopped_by_the_throttle(pbx_factory: DaemonFactory, tmp_path: Path) -> None:
    # svcrack answers MD5 challenges only (it crashes on SHA-256), hence MD5 alone here.
    pbx = pbx_factory([user_block("200", "right-password")], server_extra='digest_algorithms = ["MD5"]\n')
    words = tmp_path / "words.txt"
    words.write_text("".join(f"wrong{i}\n" for i in range(20)) + "right-password\n")
    out = scanner("svcrack", pbx, "-u", "200", "-d", str(words))
    assert "right-password" not in out, out
    assert "found nothing" in out, out
    pbx.wait_log(r"event=address_blocked peer=127\.0\.0\.1 seconds=\d+ reason=auth_failures")
    assert len(pbx.log_matches(r"event=auth_failed number=200")) == 10
