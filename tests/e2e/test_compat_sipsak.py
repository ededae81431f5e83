"""sipsak (Debian's sipsak 0.9.8.1) against the shipped config, untouched.

sipsak answers MD5 digest challenges only and reads the first challenge alone: homepbx knows
it by its User-Agent and offers it MD5 alone (appliance/sip/digest_fallback.py). Two things
it needs on its command line, both sipsak's own quirks rather than the PBX's:

- `-u 200`: left to itself, sipsak takes the digest username from the URI with the `@`
  (`username="200@"`), which no registrar can match to user 200;
- `-x 60` or more: its default `Expires: 15` is below the registrar's minimum (60 s), and it
  does not retry with the `Min-Expires` of the `423 Interval Too Brief` it gets.

The port goes in `-r`: with it in the URI sipsak 0.9.8.1 writes the URI with the port's
last digit cut off (`sip:200@127.0.0.1:1506` for port 15060) into its headers.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import Daemon, user_block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def sipsak(pbx: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """Run sipsak against the daemon (port in `-r`), most verbose: every message it sends and gets
    (some on stderr) in `stdout`."""
    if not shutil.which("sipsak"):
        pytest.skip("sipsak is not installed (`make test` installs Debian's sipsak)")
    return subprocess.run(["sipsak", "-vvv", *args, "-r", str(pbx.port)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=20, check=False)


def register(pbx: Daemon, number: str, password: str) -> subprocess.CompletedProcess[str]:
    return sipsak(pbx, "-U", "-s", f"sip:{number}@127.0.0.1", "-u", number, "-a", password, "-x", "300")


def test_sipsak_registers_with_md5_and_its_options_ping_is_answered(pbx_factory: DaemonFactory) -> None:
    pbx = pbx_factory([user_block("200", "pw-200")])  # shipped digest settings
    done = register(pbx, "200", "pw-200")
    assert done.returncode == 0, done.stdout
    assert "All usrloc tests completed successful" in done.stdout
    challenges = [line for line in done.stdout.splitlines() if line.startswith("WWW-Authenticate:")]
    assert challenges and all("algorithm=MD5" in line for line in challenges)  # MD5 alone, known by User-Agent
    pbx.wait_log(r'event=device_registered number=200 .*ua="sipsak ')
    assert not pbx.log_matches("event=auth_abandoned")

    ping = sipsak(pbx, "-s", "sip:127.0.0.1")
    assert ping.returncode == 0, ping.stdout
    assert "SIP/2.0 200 OK" in ping.stdout and "CSeq: 1 OPTIONS" in ping.stdout


def test_sipsak_wrong_password_refused_and_counted_until_blocked(pbx_factory: DaemonFactory) -> None:
    pbx = pbx_factory([user_block("200", "pw-200")])
    for attempt in range(1, 11):
        done = register(pbx, "200", "wrong")
        assert done.returncode != 0
        assert "403 Forbidden" in done.stdout
        assert len(pbx.log_matches(r"event=auth_failed number=200 peer=127\.0\.0\.1:\d+ method=REGISTER")) == attempt
    # The tenth failure within a minute blocks the address (a cool-off, logged once).
    pbx.wait_log(r"event=address_blocked peer=127\.0\.0\.1 seconds=\d+ reason=auth_failures method=REGISTER")
    assert not pbx.log_matches("event=device_registered")
