"""Issue 15: no call lost in a burst. SIPp places 200 calls, up to 30 in flight, through the
box with every call anchored in a media worker (`[media] max_calls = 64`, one warm worker):
the pool must start workers ahead of demand and let an INVITE wait for one, never answer
503 while media slots are free; a call cancelled while it waits leaves no worker held."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from appliance.sip.auth import authorization_value
from tests.e2e.conftest import DaemonFactory
from tests.support.pbx import Daemon, user_block
from tests.support.ports import free_port, rtp_range
from tests.support.rawsip import RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

SCENARIOS = Path(__file__).resolve().parent / "sipp"
CALLS = 300
IN_FLIGHT = 60
MEDIA = '[media]\nmax_calls = 64\nmin_idle = 1\nrtp_ports = "{ports}"\n\n'


def _sipp(scenario: str, workdir: Path, port: int, pbx_port: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["sipp", "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port), "-mp", str(free_port()),
         "-nostdin", "-trace_err", "-trace_stat", "-timeout", "60s", *args, f"127.0.0.1:{pbx_port}"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _failed(workdir: Path) -> tuple[int, int]:
    """(successful, failed) from SIPp's last statistics line."""
    stat = next(workdir.glob("*_.csv"), None) or next(workdir.glob("*.csv"))
    rows = [line.split(";") for line in stat.read_text().splitlines() if line.strip()]
    head, last = rows[0], rows[-1]
    return int(last[head.index("SuccessfulCall(C)")]), int(last[head.index("FailedCall(C)")])


def burst(pbx: Daemon, tmp_path: Path, scenario: Path = SCENARIOS / "caller.xml") -> None:
    """201 registers a SIPp that answers every call; 200 places CALLS calls at it through
    `pbx`, IN_FLIGHT at once (`scenario`): every one must succeed."""
    callee_port = free_port()
    started: list[subprocess.Popen[str]] = []
    try:
        reg_dir = tmp_path / "reg"
        reg_dir.mkdir()
        reg = _sipp("register.xml", reg_dir, callee_port, pbx.port, "-m", "1", "-s", "201", "-au", "201",
                    "-ap", "pw-201")
        started.append(reg)
        assert reg.wait(timeout=20) == 0, reg.communicate()[1]
        callee_dir = tmp_path / "callee"
        callee_dir.mkdir()
        started.append(_sipp("callee.xml", callee_dir, callee_port, pbx.port, "-aa", "-m", str(CALLS)))
        caller_dir = tmp_path / "caller"
        caller_dir.mkdir()
        caller = _sipp(str(scenario), caller_dir, free_port(), pbx.port, "-s", "201", "-au", "200", "-ap", "pw-200",
                       "-set", "caller", "200", "-m", str(CALLS), "-l", str(IN_FLIGHT), "-r", "300")
        started.append(caller)
        caller.communicate(timeout=75)
        ok, failed = _failed(caller_dir)
        refused = [line for line in pbx.lines if "no_media_worker" in line]
        errors = "".join(p.read_text(errors="replace") for p in caller_dir.glob("*_errors.log"))
        assert (ok, failed) == (CALLS, 0), f"{failed} failed, {len(refused)} refused: {refused[:3]} {errors[-3000:]}"
        assert caller.returncode == 0
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert not re.search(r"event=media_worker_died", "\n".join(pbx.lines))


@pytest.mark.parametrize("hold_ms", [500, 0])
def test_a_burst_of_anchored_calls_loses_none(pbx_factory: DaemonFactory, tmp_path: Path, hold_ms: int) -> None:
    """hold 0: the caller's BYE right behind its ACK (the edge releases the worker on that
    BYE while the BYE is still on its way to the worker)."""
    assert shutil.which("sipp"), "sipp is not installed: `make deps` installs Debian's sip-tester"
    pbx = pbx_factory([user_block("200", "pw-200"), user_block("201", "pw-201")],
                      extra=MEDIA.format(ports=rtp_range(66 * 8)))  # 64 calls and 2 spare workers
    scenario = tmp_path / "caller.xml"
    scenario.write_text((SCENARIOS / "caller.xml").read_text().replace(
        '<pause milliseconds="500"/>', f'<pause milliseconds="{hold_ms}"/>' if hold_ms else ""))
    burst(pbx, tmp_path, scenario)


def _invite_with_auth(client: RawClient, to_number: str, number: str, password: str) -> bytes:
    """The authenticated INVITE (after the 407 round trip), sent; its bytes for the CANCEL."""
    headers = [("Contact", f"<sip:{number}@127.0.0.1:{client.port}>"), ("Content-Type", "application/sdp")]
    uri = f"sip:{to_number}@home.arpa"
    first = client.request("INVITE", uri, number, headers=headers, body=SDP, to_number=to_number)
    client.send(first)
    challenge = client.final()
    client.ack(first, challenge)
    assert challenge.status == 407
    auth = authorization_value(challenge.get("Proxy-Authenticate") or "", username=number, password=password,
                               method="INVITE", uri=uri, cnonce="0a4f113b")
    invite = client.request("INVITE", uri, number, headers=[*headers, ("Proxy-Authorization", auth)], body=SDP,
                            to_number=to_number)
    client.send(invite)
    return invite


def _cancel_of(invite: bytes) -> bytes:
    """CANCEL: the INVITE's Request-URI, Via (branch), From, To, Call-ID and CSeq number."""
    head = invite.decode().split("\r\n\r\n", 1)[0].split("\r\n")
    keep = [line for line in head[1:] if line.split(":", 1)[0] in ("Via", "From", "To", "Call-ID", "Max-Forwards")]
    cseq = next(line for line in head if line.startswith("CSeq:")).split()[1]
    return "\r\n".join([head[0].replace("INVITE", "CANCEL", 1), *keep, f"CSeq: {cseq} CANCEL",
                        "Content-Length: 0", "", ""]).encode()


SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 4000 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n")


def test_a_call_cancelled_while_waiting_for_a_worker_leaves_it_free(pbx_factory: DaemonFactory) -> None:
    """No worker warm (min_idle = 0): the INVITE waits for one to start; the caller's
    CANCEL meanwhile is answered 200 and the INVITE 487, and the worker started for it is
    not left held: with max_calls = 1 the next call gets it."""
    media = f'[media]\nmax_calls = 1\nmin_idle = 0\nrtp_ports = "{rtp_range(64)}"\n\n'
    pbx = pbx_factory([user_block("200", "pw-200"), user_block("201", "pw-201")], extra=media)
    callee, caller = RawClient(pbx.port), RawClient(pbx.port)
    try:
        assert callee.register("201", "pw-201").status == 200
        invite = _invite_with_auth(caller, "201", "200", "pw-200")
        assert caller.recv().status == 100
        caller.send(_cancel_of(invite))
        answers = {caller.recv().status, caller.recv().status}
        assert answers == {200, 487}
        pbx.wait_log(r"event=call_ended .*reason=status_487")
        time.sleep(1.5)  # the worker started for it is ready by now
        assert not any("event=media_worker_call" in line for line in pbx.lines)
        # The only worker is free: the next call reaches the callee through it.
        second = RawClient(pbx.port)
        try:
            _invite_with_auth(second, "201", "200", "pw-200")
            callee.sock.settimeout(5.0)
            received = callee.recv_raw()
            while received.startswith(b"OPTIONS "):  # qualify
                received = callee.recv_raw()
            assert received.startswith(b"INVITE ")
        finally:
            second.close()
    finally:
        callee.close()
        caller.close()
