"""SIP software nobody here wrote: SIPp (Debian's sip-tester) registers and calls.

SIPp answers digest challenges with MD5 only, and gives up on a SHA-256 challenge instead of
taking the MD5 one after it (RFC 8760 §2.4 says to use the first supported). With the
shipped digest settings homepbx knows it by its User-Agent and offers it MD5 alone
(appliance/sip/digest_fallback.py); `[server] digest_algorithms = ["MD5"]` does the same
for every device. The scenarios are in tests/e2e/sipp/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import Daemon, user_block
from tests.support.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

SCENARIOS = Path(__file__).resolve().parent / "sipp"
MD5_ONLY = 'digest_algorithms = ["MD5"]\n'


Sipp = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def sipp() -> Iterator[Sipp]:
    """Start SIPp on 127.0.0.1:`port`, one call of `scenario` against the daemon; any SIPp
    still running at teardown (a test that failed half-way) is killed."""
    assert shutil.which("sipp"), "sipp is not installed: `make deps` installs Debian's sip-tester"
    started: list[subprocess.Popen[str]] = []

    def start(pbx: Daemon, scenario: str, workdir: Path, port: int, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["sipp", "-sf", str(SCENARIOS / scenario), "-m", "1", "-i", "127.0.0.1", "-p", str(port),
             "-mp", str(free_port()), "-nostdin", "-trace_msg", "-trace_err", "-timeout", "20s", *args,
             f"127.0.0.1:{pbx.port}"],
            cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def finish(proc: subprocess.Popen[str], workdir: Path, scenario: str) -> str:
    """Wait for SIPp; it exits 0 only if every message of the scenario went as written."""
    _, stderr = proc.communicate(timeout=30)
    trace = "".join(p.read_text(errors="replace") for p in workdir.glob(f"{Path(scenario).stem}_*_messages.log"))
    errors = "".join(p.read_text(errors="replace") for p in workdir.glob(f"{Path(scenario).stem}_*_errors.log"))
    assert proc.returncode == 0, f"sipp {scenario} exited {proc.returncode}: {stderr}\n{errors}\n{trace[-3000:]}"
    return trace


def register(sipp: Sipp, pbx: Daemon, tmp_path: Path, number: str, password: str, port: int) -> str:
    workdir = tmp_path / f"reg-{number}"
    workdir.mkdir()
    return finish(sipp(pbx, "register.xml", workdir, port, "-s", number, "-au", number, "-ap", password),
                  workdir, "register.xml")


def test_sipp_registers_when_md5_is_offered(pbx_factory: DaemonFactory, sipp: Sipp, tmp_path: Path) -> None:
    pbx = pbx_factory([user_block("200", "pw-200")], server_extra=MD5_ONLY)
    trace = register(sipp, pbx, tmp_path, "200", "pw-200", free_port())
    challenge = trace[trace.index("SIP/2.0 401"):]
    challenge = challenge[: challenge.index("\n\n")] if "\n\n" in challenge else challenge
    assert re.findall(r"WWW-Authenticate: Digest .*algorithm=(\S+?),", challenge) == ["MD5"]
    assert "SIP/2.0 200 OK" in trace
    pbx.wait_log(r"event=device_registered number=200 .*ua=SIPp")


def test_sipp_registers_with_the_shipped_digest_settings(pbx_factory: DaemonFactory, sipp: Sipp,
                                                          tmp_path: Path) -> None:
    pbx = pbx_factory([user_block("200", "pw-200")])
    trace = register(sipp, pbx, tmp_path, "200", "pw-200", free_port())
    challenge = trace[trace.index("SIP/2.0 401"):]
    challenge = challenge[: challenge.index("\n\n")] if "\n\n" in challenge else challenge
    assert re.findall(r"WWW-Authenticate: Digest .*algorithm=(\S+?),", challenge) == ["MD5"]
    assert "SIP/2.0 200 OK" in trace


def test_sipp_calls_sipp_through_the_pbx(pbx_factory: DaemonFactory, sipp: Sipp, tmp_path: Path) -> None:
    pbx = pbx_factory([user_block("200", "pw-200"), user_block("201", "pw-201")])  # shipped digest settings
    callee_port = free_port()
    register(sipp, pbx, tmp_path, "201", "pw-201", callee_port)
    callee_dir = tmp_path / "callee"
    callee_dir.mkdir()
    callee = sipp(pbx, "callee.xml", callee_dir, callee_port, "-aa")  # -aa: 200 to OPTIONS (qualify)
    caller_dir = tmp_path / "caller"
    caller_dir.mkdir()
    caller = sipp(pbx, "caller.xml", caller_dir, free_port(), "-s", "201", "-au", "200", "-ap", "pw-200",
                  "-set", "caller", "200")
    caller_trace = finish(caller, caller_dir, "caller.xml")
    callee_trace = finish(callee, callee_dir, "callee.xml")
    assert "SIP/2.0 407" in caller_trace and "Proxy-Authenticate: Digest" in caller_trace
    assert "Record-Route:" in callee_trace  # the proxy stays in the dialog: ACK and BYE come through it
    assert re.search(r"^BYE ", callee_trace, re.M)
    pbx.wait_log(r"event=call_answered .*device=")
    pbx.wait_log(r"event=call_ended .*caller=200 callee=201 reason=bye_from_caller outgoing=0")
