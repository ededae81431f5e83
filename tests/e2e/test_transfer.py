"""Transfer through the real daemon (issue 14): blind (REFER) and attended (REFER with
Replaces, and a direct INVITE with Replaces), a transfer that fails and resumes, and media
workers that no handset request can kill (and that are forgotten at once when killed).

A (100) calls B (200); B transfers A to C (300). Each party plays its own tone and records
what it hears; the test measures the tones, the transferring phone's NOTIFYs (sipfrag) and
that every worker process is still alive after."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.simulator import tones
from appliance.simulator.handset import Handset
from appliance.sip.message import Response
from tests.e2e.conftest import DaemonFactory
from tests.support.baresip import Baresip
from tests.support.control import ControlConn, control_block
from tests.support.handsets import listen
from tests.support.kamailio import DID, OUTSIDE, OUTSIDE_PASSWORD, PASSWORD, Kamailio
from tests.support.kamailio import available as kamailio_available
from tests.support.linphone import Linphone
from tests.support.pbx import Daemon, user_block
from tests.support.ports import rtp_range
from tests.support.rawsip import RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HandsetFactory = Callable[..., Handset]
HEARD = -8.0
FAINT = -20.0


def house(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, extra_users: str = ""
          ) -> tuple[Daemon, Handset, Handset, Handset]:
    pbx = pbx_factory([user_block("100"), user_block("200"), user_block("300"), extra_users])
    phones = []
    for number in ("100", "200", "300"):
        phone = handset_factory(f"p{number}")
        assert phone.register(pbx.registrar, number, "secret")["code"] == 200
        phones.append(phone)
    return pbx, phones[0], phones[1], phones[2]


def connect(caller: Handset, callee: Handset, number: str) -> tuple[str, str]:
    call = caller.call(f"sip:{number}@home.arpa")
    incoming = str(callee.wait_incoming()["call"])
    callee.answer(incoming, 200)
    caller.wait_state(call, "CONFIRMED")
    callee.wait_state(incoming, "CONFIRMED")  # its ACK came: only then can it hold or transfer
    caller.wait_for("media", call=call, status="active")
    callee.wait_for("media", call=incoming, status="active")
    return call, incoming


def hear_each_other(a: tuple[Handset, str], c: tuple[Handset, str], tmp: Path) -> None:
    heard = listen([(a[0], a[1], 440), (c[0], c[1], 1000)], tmp, 1.5)
    assert tones.tone_level_db(heard[440], 1000) > HEARD
    assert tones.tone_level_db(heard[1000], 440) > HEARD


def worker_pids(pbx: Daemon) -> set[int]:
    return {int(m) for line in pbx.log_matches(r"event=media_worker_call") for m in re.findall(r"pid=(\d+)", line)}


def assert_alive(pids: set[int]) -> None:
    assert pids
    for pid in pids:
        os.kill(pid, 0)  # raises when the worker is gone


def assert_no_worker_died(pbx: Daemon) -> None:
    assert not pbx.log_matches(r"event=media_worker_died"), pbx.log_matches(r"event=media_worker_died")


def test_blind_transfer_by_the_callee(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                      tmp_path: Path) -> None:
    pbx, a, b, c = house(pbx_factory, handset_factory)
    a_call, b_call = connect(a, b, "200")
    # The Refer-To names no port and a host that is not the box: the leg still goes to the edge.
    b.send("transfer", call=b_call, uri="sip:300@127.0.0.1")
    incoming = c.wait_incoming(timeout=5)
    assert "sip:100@home.arpa" in str(incoming["from"])  # who is put through, not the worker
    c_call = str(incoming["call"])
    assert b.wait_for("transfer_status", call=b_call, code=100)
    c.answer(c_call, 200)
    final = b.wait_for("transfer_status", call=b_call, final=True, timeout=5)
    assert final["code"] == 200
    b.hangup(b_call)
    b.wait_state(b_call, "DISCONNECTED")
    c.wait_for("media", call=c_call, status="active")
    hear_each_other((a, a_call), (c, c_call), tmp_path)
    pbx.wait_log(r"event=transfer .*by=200 target=300")
    assert_alive(worker_pids(pbx))
    # The target may transfer in turn: C puts A through to B again.
    c.send("transfer", call=c_call, uri="sip:200@home.arpa")
    b_again = str(b.wait_incoming(timeout=5)["call"])
    b.answer(b_again, 200)
    assert c.wait_for("transfer_status", call=c_call, final=True, timeout=5)["code"] == 200
    c.hangup(c_call)
    b.wait_for("media", call=b_again, status="active")
    (tmp_path / "again").mkdir()
    hear_each_other((a, a_call), (b, b_again), tmp_path / "again")
    pbx.wait_log(r"event=transfer .*by=300 target=200")
    # B hangs up: the call ends for A, and at the edge.
    b.hangup(b_again)
    a.wait_state(a_call, "DISCONNECTED")
    pbx.wait_log("event=call_ended")
    assert_alive(worker_pids(pbx))
    assert_no_worker_died(pbx)


def test_the_live_view_follows_a_transfer(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    """After B puts A through to C, the TUI's view of the call (the control socket's events)
    says 100 talks to 300, answered by C's handset, not to 200 any more."""
    pbx, a, b, c = house(pbx_factory, handset_factory, control_block())
    control = ControlConn(pbx.config.parent / "ctl.sock")
    a_call, b_call = connect(a, b, "200")
    b.send("transfer", call=b_call, uri="sip:300@home.arpa")
    c_call = str(c.wait_incoming(timeout=5)["call"])
    c.answer(c_call, 200)
    moved = control.wait_event("call_transferred")["call"]
    assert (moved["caller"], moved["callee"], moved["phase"]) == ("100", "300", "answered")
    snapshot = control.command("snapshot")
    [c_device] = [d["id"] for n in snapshot["snapshot"]["numbers"] if n["number"] == "300" for d in n["devices"]]
    assert moved["answered_by"] == c_device
    b.wait_state(b_call, "DISCONNECTED", timeout=8)  # released (it hangs up, or the box BYEs it)
    c.hangup(c_call)
    a.wait_state(a_call, "DISCONNECTED")
    assert control.wait_event("call_ended")["call"]["callee"] == "300"
    assert_no_worker_died(pbx)


def test_blind_transfer_by_the_caller_who_stays_on_line(pbx_factory: DaemonFactory,
                                                        handset_factory: HandsetFactory, tmp_path: Path) -> None:
    """The transferring phone is the caller (A-leg) and does not hang up after the 200
    NOTIFY: the worker releases it; the transferred party and the target talk on."""
    pbx, a, b, c = house(pbx_factory, handset_factory)
    a_call, b_call = connect(a, b, "200")
    a.send("transfer", call=a_call, uri=f"sip:300@127.0.0.1:{pbx.port}")  # the issue: the worker died here
    c_call = str(c.wait_incoming()["call"])
    c.answer(c_call, 200)
    assert a.wait_for("transfer_status", call=a_call, final=True)["code"] == 200
    assert a.wait_state(a_call, "DISCONNECTED", timeout=8)["end_request"] == "BYE"  # released by the worker
    c.wait_for("media", call=c_call, status="active")
    hear_each_other((b, b_call), (c, c_call), tmp_path)
    assert not pbx.log_matches("event=call_ended")  # the call goes on without its caller
    b.hangup(b_call)
    c.wait_state(c_call, "DISCONNECTED")
    pbx.wait_log("event=call_ended")
    assert_alive(worker_pids(pbx))
    assert_no_worker_died(pbx)


@pytest.mark.parametrize(("target", "code"), [("300", 486), ("555", 404)])
def test_failed_transfer_resumes(pbx_factory: DaemonFactory, handset_factory: HandsetFactory, tmp_path: Path,
                                 target: str, code: int) -> None:
    pbx, a, b, c = house(pbx_factory, handset_factory)
    c.auto_answer("reject", 486)
    a_call, b_call = connect(a, b, "200")
    b.send("hold", call=b_call)
    b.wait_for("media", call=b_call, status="local_hold")
    b.send("transfer", call=b_call, uri=f"sip:{target}@home.arpa")
    final = b.wait_for("transfer_status", call=b_call, final=True, timeout=8)
    assert final["code"] == code
    b.send("unhold", call=b_call)
    b.wait_for("media", call=b_call, status="active")
    hear_each_other((a, a_call), (b, b_call), tmp_path)
    a.hangup(a_call)
    b.wait_state(b_call, "DISCONNECTED")
    assert_alive(worker_pids(pbx))
    assert_no_worker_died(pbx)


# -- no handset request kills a worker; a dead worker is forgotten --------------------------------

SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


class RawDialog:
    """A raw caller's answered call through the edge: sends in-dialog requests byte by byte."""

    def __init__(self, raw: RawClient, answer: Response, number: str) -> None:
        self.raw = raw
        self.number = number
        self.to = answer.get("To") or ""
        self.target = (answer.get("Contact") or "").strip("<>").split(">")[0]
        self.routes = answer.get_all("Record-Route")
        self.invite_cseq = raw.cseq
        self.cseq = raw.cseq + 10

    def request(self, method: str, headers: list[tuple[str, str]] = (), body: bytes = b"") -> bytes:
        self.cseq += 1
        cseq = self.invite_cseq if method == "ACK" else self.cseq
        lines = [f"{method} {self.target} SIP/2.0",
                 f"Via: SIP/2.0/UDP 127.0.0.1:{self.raw.port};branch=z9hG4bK{os.urandom(6).hex()};rport",
                 "Max-Forwards: 70", f"From: <sip:{self.number}@home.arpa>;tag={self.raw.call_id[:8]}",
                 f"To: {self.to}", f"Call-ID: {self.raw.call_id}", f"CSeq: {cseq} {method}",
                 *[f"Route: {r}" for r in self.routes], *[f"{k}: {v}" for k, v in headers],
                 f"Content-Length: {len(body)}", "", ""]
        return "\r\n".join(lines).encode() + body

    def send(self, method: str, headers: list[tuple[str, str]] = (), body: bytes = b"") -> Response | None:
        self.raw.send(self.request(method, headers, body))
        if method == "ACK":
            return None
        while True:
            response = self.raw.final()
            if response.cseq[1] == method:
                return response


def raw_call(pbx: Daemon, callee: Handset) -> RawDialog:
    callee.auto_answer("answer")
    raw = RawClient(pbx.port)
    answer = raw.invite_with_auth("200", "100", "secret", body=SDP)
    assert answer.status == 200
    dialog = RawDialog(raw, answer, "100")
    dialog.send("ACK")
    return dialog


def test_odd_in_dialog_requests_never_kill_the_worker(pbx_factory: DaemonFactory,
                                                       handset_factory: HandsetFactory) -> None:
    pbx, _, b, c = house(pbx_factory, handset_factory)
    dialog = raw_call(pbx, b)
    b_call = str(b.wait_state(str(b.wait_incoming()["call"]), "CONFIRMED")["call"])
    pids = worker_pids(pbx)
    assert_alive(pids)
    answers = {}
    answers["refer_no_refer_to"] = dialog.send("REFER")
    answers["refer_garbage"] = dialog.send("REFER", [("Refer-To", "<\x01garbage:::>")])
    answers["refer_bad_replaces"] = dialog.send("REFER", [("Refer-To", "<sip:300@home.arpa?Replaces=nonsense>")])
    answers["refer_bad_escape"] = dialog.send("REFER", [("Refer-To", "<sip:3%zz@home.arpa?Replaces=%zz>")])
    time.sleep(0.5)  # those transfers fail at once: they leave no transfer running
    answers["refer_elsewhere"] = dialog.send("REFER", [("Refer-To", "<sip:300@192.0.2.1:5099;transport=tcp>")])
    answers["refer_second"] = dialog.send("REFER", [("Refer-To", "<sip:300@home.arpa>")])
    answers["info"] = dialog.send("INFO", [("Content-Type", "application/dtmf-relay")], b"Signal=5\r\nDuration=160\r\n")
    answers["message"] = dialog.send("MESSAGE", [("Content-Type", "text/plain")], b"hello")
    answers["update"] = dialog.send("UPDATE")
    answers["options"] = dialog.send("OPTIONS")
    statuses = {name: r.status if r is not None else None for name, r in answers.items()}
    assert statuses["refer_no_refer_to"] == 400 and statuses["refer_garbage"] == 400
    assert statuses["refer_elsewhere"] == 202  # the leg goes to the edge all the same: 300 rings
    assert statuses["refer_second"] == 491  # one transfer at a time
    assert all(s is not None and s >= 200 for s in statuses.values()), statuses
    time.sleep(1.0)  # the failed transfers' NOTIFYs, any late failure
    assert_alive(pids)
    assert_no_worker_died(pbx)
    assert b.events_of("call_state", call=b_call, state="DISCONNECTED") == []  # the call is still up
    # The transferring party hangs up while the first transfer's target (300) rings: the
    # call waits for 300, which answers and talks with B.
    c_call = str(c.wait_incoming()["call"])
    bye = dialog.send("BYE")
    assert bye is not None and bye.status == 200
    c.answer(c_call, 200)
    c.wait_for("media", call=c_call, status="active")
    assert b.events_of("call_state", call=b_call, state="DISCONNECTED") == []
    b.hangup(b_call)
    c.wait_state(c_call, "DISCONNECTED")
    pbx.wait_log("event=call_ended")
    assert_alive(pids)
    assert_no_worker_died(pbx)
    dialog.raw.close()


def target_ringing(pbx_factory: DaemonFactory, handset_factory: HandsetFactory
                   ) -> tuple[Daemon, Handset, Handset, RawDialog, str, str]:
    """A raw caller talks to B and REFERs itself to C: C rings, nobody has hung up yet."""
    pbx, _, b, c = house(pbx_factory, handset_factory)
    dialog = raw_call(pbx, b)
    b_call = str(b.wait_state(str(b.wait_incoming()["call"]), "CONFIRMED")["call"])
    refer = dialog.send("REFER", [("Refer-To", "<sip:300@home.arpa>")])
    assert refer is not None and refer.status == 202
    return pbx, b, c, dialog, b_call, str(c.wait_incoming()["call"])


def test_the_other_party_hanging_up_while_the_target_rings_ends_the_call(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    """The transferring party left right after its REFER's 202; the other party hangs up
    while the target still rings: nobody is left for the target, so its ringing stops and
    the call ends (it used to ring on, and be a call with nobody if answered)."""
    pbx, b, c, dialog, b_call, c_call = target_ringing(pbx_factory, handset_factory)
    bye = dialog.send("BYE")
    assert bye is not None and bye.status == 200
    b.hangup(b_call)
    c.wait_state(c_call, "DISCONNECTED")
    pbx.wait_log("event=call_ended")
    assert_no_worker_died(pbx)
    dialog.raw.close()


def test_both_parties_hanging_up_at_once_while_the_target_rings_ends_the_call(
        pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    """As above, but both hang-ups reach the worker in one poll (a busy machine: the CI
    flake), so the other party's leaves before the transferring party's leg is reaped."""
    pbx, b, c, dialog, b_call, c_call = target_ringing(pbx_factory, handset_factory)
    (pid,) = worker_pids(pbx)
    os.kill(pid, signal.SIGSTOP)
    try:
        dialog.raw.send(dialog.request("BYE"))
        b.hangup(b_call)
        time.sleep(0.3)  # both BYEs wait in the stopped worker's socket
    finally:
        os.kill(pid, signal.SIGCONT)
    c.wait_state(c_call, "DISCONNECTED")
    b.wait_state(b_call, "DISCONNECTED")
    pbx.wait_log("event=call_ended")
    assert_alive({pid})
    assert_no_worker_died(pbx)
    dialog.raw.close()


def test_dead_worker_is_forgotten_at_once(pbx_factory: DaemonFactory, handset_factory: HandsetFactory) -> None:
    pbx, _, b, _ = house(pbx_factory, handset_factory)
    pbx.allow_errors("media_worker")
    dialog = raw_call(pbx, b)
    b_call = str(b.wait_incoming()["call"])
    (pid,) = worker_pids(pbx)
    os.kill(pid, signal.SIGKILL)
    pbx.wait_log("event=media_worker_lost")
    assert b.wait_state(b_call, "DISCONNECTED")["end_request"] == "BYE"  # the edge BYEd the device
    bye = dialog.send("BYE")
    assert bye is not None and bye.status == 481  # not relayed to the dead port
    # Nothing more comes for that BYE (no relay, so no 408 or retransmission later).
    dialog.raw.sock.settimeout(1.0)
    with pytest.raises(TimeoutError):
        dialog.raw.recv()
    dialog.raw.close()


# -- attended: REFER with Replaces, and a direct INVITE with Replaces ------------------------------

def test_attended_transfer_with_replaces(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                         tmp_path: Path) -> None:
    """B talks to A (call 1, worker W1), puts A on hold and calls C (call 2, worker W2), then
    REFERs call 1 with Replaces naming call 2: A ends up talking to C, B is released from both."""
    pbx, a, b, c = house(pbx_factory, handset_factory)
    a_call, b_call1 = connect(a, b, "200")
    b.send("hold", call=b_call1)
    b.wait_for("media", call=b_call1, status="local_hold")
    b_call2, c_call = connect(b, c, "300")
    assert len(worker_pids(pbx)) in (1, 2)  # one when a worker hosts several calls (our pjsua2 build)
    b.send("transfer", call=b_call1, replaces=b_call2)
    assert b.wait_for("transfer_status", call=b_call1, final=True, timeout=8)["code"] == 200
    # W2 replaced its leg to B with the one from W1 and BYEd B; B leaves call 1 (or is released).
    assert b.wait_state(b_call2, "DISCONNECTED")["end_request"] == "BYE"
    b.hangup(b_call1)
    b.wait_state(b_call1, "DISCONNECTED")
    pbx.wait_log(r"event=replaces .*by=200")
    hear_each_other((a, a_call), (c, c_call), tmp_path)
    assert a.events_of("call_state", call=a_call, state="DISCONNECTED") == []
    assert c.events_of("call_state", call=c_call, state="DISCONNECTED") == []
    a.hangup(a_call)
    c.wait_state(c_call, "DISCONNECTED")
    for _ in range(2):
        pbx.wait_log("event=call_ended")
    assert_alive(worker_pids(pbx))
    assert_no_worker_died(pbx)


def dialog_of(phone: Handset, status: str) -> tuple[str, str, str]:
    """Call-ID, From tag and To tag of the INVITE's `status` response the phone received."""
    deadline = time.monotonic() + 5
    while True:
        found = [m for m in phone.sip_messages("rx") if m.startswith(f"SIP/2.0 {status}")
                 and re.search(r"(?im)^CSeq:\s*\d+ INVITE", m)]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert found, status
    value = {k.strip().lower(): v.strip() for k, _, v in
             (line.partition(":") for line in found[-1].split("\r\n")[1:] if ":" in line)}
    return value["call-id"], value["from"].split("tag=")[1].split(";")[0], value["to"].split("tag=")[1].split(";")[0]


def test_direct_invite_with_replaces(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                     tmp_path: Path) -> None:
    """A handset's own INVITE with Replaces naming an answered call's dialog is challenged and
    relayed to the worker holding it: A's other handset takes A's place in A's call with B
    (call pull). Another number's handset naming that dialog gets 403 (nobody takes over a
    call of someone else's), one naming no dialog 481."""
    pbx = pbx_factory([user_block("100", one_number=True), user_block("200"), user_block("300")])
    a, a2 = handset_factory("p100", trace=True), handset_factory("p100b")
    b, c = handset_factory("p200"), handset_factory("p300")
    for phone, number in ((a, "100"), (a2, "100"), (b, "200"), (c, "300")):
        assert phone.register(pbx.registrar, number, "secret")["code"] == 200

    a_call = a.call("sip:200@home.arpa")
    b_call = str(b.wait_incoming()["call"])
    nothing = c.call("sip:100@home.arpa", headers={"Replaces": "no-such-call;to-tag=x;from-tag=y"})
    assert c.wait_state(nothing, "DISCONNECTED")["last_status"] == 481

    b.answer(b_call, 200)
    a.wait_state(a_call, "CONFIRMED")
    b.wait_for("media", call=b_call, status="active")
    call_id, from_tag, to_tag = dialog_of(a, "200")
    replaces = {"Replaces": f"{call_id};to-tag={to_tag};from-tag={from_tag}"}
    stranger = c.call("sip:100@home.arpa", headers=replaces)
    assert c.wait_state(stranger, "DISCONNECTED")["last_status"] == 403
    pulled = a2.call("sip:200@home.arpa", headers=replaces)
    a2.wait_state(pulled, "CONFIRMED")
    assert a.wait_state(a_call, "DISCONNECTED")["end_request"] == "BYE"
    a2.wait_for("media", call=pulled, status="active")
    hear_each_other((b, b_call), (a2, pulled), tmp_path)
    pbx.wait_log(r"event=replaces .*by=100")
    a2.hangup(pulled)
    b.wait_state(b_call, "DISCONNECTED")
    pbx.wait_log("event=call_ended")
    assert_alive(worker_pids(pbx))
    assert_no_worker_died(pbx)


def test_blind_transfer_from_baresip(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                     baresip: Callable[..., Baresip], tmp_path: Path) -> None:
    """Debian's baresip as the transferring phone (`/transfer 300` on its console)."""
    pbx = pbx_factory([user_block("100"), user_block("200", "pw-200"), user_block("300")])
    a, c = handset_factory("p100"), handset_factory("p300")
    assert a.register(pbx.registrar, "100", "secret")["code"] == 200
    assert c.register(pbx.registrar, "300", "secret")["code"] == 200
    phone = baresip(tmp_path / "baresip", pbx, "200", "pw-200", 1700, rtp_range(), auto_answer=True)
    phone.wait_for("registered successfully")
    a_call = a.call("sip:200@home.arpa")
    a.wait_state(a_call, "CONFIRMED", timeout=10)
    phone.wait_for("Call established")
    phone.command("/transfer 300")
    c_call = str(c.wait_incoming(timeout=10)["call"])
    c.answer(c_call, 200)
    c.wait_for("media", call=c_call, status="active")
    pbx.wait_log(r"event=transfer .*by=200 target=300")
    # baresip is released: it hangs up after the 200 NOTIFY (or the worker would BYE it).
    deadline = time.monotonic() + 8
    while True:
        at = phone.command("/listcalls")
        line = phone.wait_for("Active calls", start=at)
        if "(0)" in line or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "Active calls (0)" in line
    hear_each_other((a, a_call), (c, c_call), tmp_path)
    c.hangup(c_call)
    a.wait_state(a_call, "DISCONNECTED")
    assert_alive(worker_pids(pbx))
    assert_no_worker_died(pbx)


@pytest.mark.skipif(not kamailio_available(), reason="Debian's kamailio package is not installed")
def test_blind_transfer_to_an_outside_number(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                             tmp_path: Path) -> None:
    """B transfers A to 0 + an outside phone at the provider (Kamailio): placed as B's call
    out (B's caller ID, the trunk's credentials, B's outgoing limit while it lasts); A and
    the outside phone talk."""
    provider = Kamailio(tmp_path / "kamailio", {DID: PASSWORD, OUTSIDE: OUTSIDE_PASSWORD}).start()
    try:
        trunk = ("[[trunks]]\nname = \"provider\"\n"
                 f'server = "{provider.server}"\nusername = "{DID}"\npassword = "{PASSWORD}"\n')
        pbx = pbx_factory([user_block("100"), user_block("200", max_outgoing_calls=1)], extra=trunk)
        a, b = handset_factory("p100"), handset_factory("p200")
        assert a.register(pbx.registrar, "100", "secret")["code"] == 200
        assert b.register(pbx.registrar, "200", "secret")["code"] == 200
        outside = handset_factory("outside", trace=True, codecs=["PCMA/8000"])
        assert outside.register(f"sip:{provider.server}", OUTSIDE, OUTSIDE_PASSWORD,
                                domain=provider.server)["code"] == 200
        pbx.wait_log(r"event=trunk_registered trunk=provider")
        a_call, b_call = connect(a, b, "200")
        b.send("transfer", call=b_call, uri=f"sip:0{OUTSIDE}@home.arpa")
        o_call = str(outside.wait_incoming(timeout=8)["call"])
        invite = outside.wait_sip("rx", "INVITE ")
        assert f"sip:{DID}@" in next(line for line in invite.split("\r\n") if line.startswith(("From:", "f:")))
        assert "X-Homepbx" not in invite
        outside.answer(o_call, 200)
        assert b.wait_for("transfer_status", call=b_call, final=True, timeout=8)["code"] == 200
        b.hangup(b_call)
        outside.wait_for("media", call=o_call, status="active")
        hear_each_other((a, a_call), (outside, o_call), tmp_path)
        again = b.call(f"sip:0{OUTSIDE}@home.arpa")  # B's one call out is the transferred one
        assert b.wait_state(again, "DISCONNECTED")["last_status"] == 403
        outside.hangup(o_call)
        a.wait_state(a_call, "DISCONNECTED")
        pbx.wait_log("event=call_ended")
        assert_alive(worker_pids(pbx))
        assert_no_worker_died(pbx)
    finally:
        provider.stop()


def test_attended_transfer_from_linphone(pbx_factory: DaemonFactory, handset_factory: HandsetFactory,
                                         linphone: Callable[..., Linphone], tmp_path: Path) -> None:
    """Debian's linphonec as the transferring phone: `transfer 1 --to-call 2` (REFER with
    Replaces, once sent straight to 127.0.0.1:5060 by the worker)."""
    pbx = pbx_factory([user_block("100"), user_block("200", "pw-200"), user_block("300")])
    a, c = handset_factory("p100"), handset_factory("p300")
    assert a.register(pbx.registrar, "100", "secret")["code"] == 200
    assert c.register(pbx.registrar, "300", "secret")["code"] == 200
    c.auto_answer("answer")
    phone = linphone(tmp_path / "linphone", pbx, "200", "pw-200", 1700, rtp_range())
    phone.wait_registered()
    a_call = a.call("sip:200@home.arpa")
    phone.wait_for(r"Receiving new incoming call from .*sip:100@")
    at = phone.command("answer")
    phone.wait_for(r"Media streams established", start=at)
    a.wait_state(a_call, "CONFIRMED")
    at = phone.command("pause")
    phone.wait_for(r"Pausing call 1", start=at)
    time.sleep(0.5)
    at = phone.command("call sip:300@127.0.0.1")
    c_call = str(c.wait_incoming(timeout=10)["call"])
    phone.wait_for(r"Media streams established with sip:300@", start=at)
    at = phone.command("transfer 1 --to-call 2")
    pbx.wait_log(r"event=replaces .*by=200", timeout=10)
    phone.wait_for(r"Call 1 with .* ended", timeout=10, start=at)
    phone.wait_for(r"Call 2 with .* ended", timeout=10, start=at)
    c.wait_for("media", call=c_call, status="active")
    hear_each_other((a, a_call), (c, c_call), tmp_path)
    a.hangup(a_call)
    c.wait_state(c_call, "DISCONNECTED")
    assert_alive(worker_pids(pbx))
    assert_no_worker_died(pbx)
