"""BYEs around a dead edge: a media worker whose edge is gone ends its calls itself.

Every dialog of a worker is Record-Routed through the edge, so pjsua2's own BYE goes to
the edge's port; after the edge died (``kill -9``, a crash) nobody listens there and the
handsets would sit in a dead call.  The worker keeps, per leg, the facts a BYE needs
(:class:`Dialog`, from the INVITE, ACK or 2xx it already parsed) and, once it knows the
edge is gone, sends the BYEs itself over UDP straight to each party, retransmitting
every T1 (RFC 3261 §17.1.2.2) for about a second.  Plain sockets, no pjsua2: it runs on
the worker's main thread while pjsua2 sleeps.

Limits:

- A party on TCP or TLS cannot be reached (its connection died with the edge): skipped.
- The caller (and a joiner) is reached at the address the edge saw, its Via's
  ``received``/``rport``, so a phone behind NAT gets it; the callee is reached at the
  Contact of its 2xx (the edge never tells the worker the callee's flow), which a NATed
  callee may not receive.
- A call not yet answered gets nothing: the callee's INVITE transaction belongs to the
  edge, so only the edge could CANCEL it.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_cseq, parse_name_addr, parse_via
from appliance.sip.message import Request, Response, SipParseError, new_tag, parse_message

T1 = 0.5
"""RFC 3261 round-trip estimate: the first retransmission interval."""
RETRANSMIT_EVERY = T1
"""Fixed, not doubled: the worker is exiting, so the BYE goes at 0, 0.5 and 1.0 s."""
WAIT_S = 1.5
"""How long to wait for the 200s in all; the worker's exit stays within ~2 s of the EOF."""
CSEQ_STEP = 1000
"""Added to the highest CSeq the dialog may have used: room for the in-dialog requests
(session refreshes) pjsua2 sent that the worker never saw."""
UAS_CSEQ_FLOOR = 0x7FFF
"""pjsip starts a dialog's local CSeq below 0x8000 (``pj_rand() & 0x7FFF``); on a dialog
the worker answered it never saw its own number, so it counts from here."""
REASON = 'SIP;cause=503;text="PBX restarted"'
MAX_FORWARDS = "70"


@dataclass(slots=True)
class Dialog:
    """What a BYE sent around the edge needs: the dialog and where its party is."""

    call_id: str
    local: str
    """Our From: the worker's identity in this dialog, with our tag."""
    remote: str
    """Our To: the party, with its tag."""
    target: str
    """The Request-URI: the party's Contact."""
    cseq: int
    host: str
    port: int
    transport: str = "UDP"
    local_tagged: bool = True
    """Our tag is in `local` (a leg we answered learns it later: :func:`learn_local_tag`)."""

    def ready(self) -> bool:
        """Both tags known and the party reachable over UDP."""
        return self.transport == "UDP" and _has_tag(self.local) and _has_tag(self.remote)

    def bye(self, via_host: str, via_port: int, branch: str) -> bytes:
        host = f"[{via_host}]" if ":" in via_host else via_host
        return Request("BYE", self.target, [
            ("Via", f"SIP/2.0/UDP {host}:{via_port};branch=z9hG4bK{branch};rport"),
            ("Max-Forwards", MAX_FORWARDS),
            ("From", self.local),
            ("To", self.remote),
            ("Call-ID", self.call_id),
            ("CSeq", f"{self.cseq} BYE"),
            ("Reason", REASON),
        ]).to_bytes()


def _has_tag(value: str) -> bool:
    try:
        return bool(parse_name_addr(value).tag)
    except SipSyntaxError:
        return False


def _contact_uri(message: Request | Response) -> str | None:
    value = message.get("Contact")
    if not value:
        return None
    try:
        return str(parse_name_addr(value).uri)
    except SipSyntaxError:
        return None


def incoming(invite: Request) -> Dialog | None:
    """A leg the worker answers (A-leg, joiner): the party is where the edge received
    the INVITE from, the caller's Via under the edge's own (its received/rport).  Our tag
    is learnt later from the ACK (:func:`learn_local_tag`).  None when unusable."""
    vias = invite.get_all("Via")
    target = _contact_uri(invite)
    caller = invite.get("From")
    to = invite.get("To")
    if not vias or target is None or not caller or not to:
        return None
    try:
        via = parse_via(vias[1] if len(vias) > 1 else vias[0])
    except SipSyntaxError:
        return None
    received = via.params.get("received")
    rport = via.params.get("rport")
    host = (received or via.host).strip("[]")
    port = int(rport) if rport and rport.isdigit() else (via.port or 5060)
    return Dialog(invite.call_id, to, caller, target, UAS_CSEQ_FLOOR + CSEQ_STEP, host, port, via.transport,
                  local_tagged=False)


def learn_local_tag(dialog: Dialog, message: Request | Response) -> None:
    """Our tag, from the To of an 18x/2xx we sent or of the ACK to our 2xx: pjsua2
    chose it, and its CallInfo.localUri leaves it out."""
    if isinstance(message, Request) and message.method != "ACK":
        return
    to = message.get("To")
    if to and _has_tag(to) and message.call_id == dialog.call_id:
        dialog.local = to
        dialog.local_tagged = True


def outgoing(ok: Response) -> Dialog | None:
    """A leg the worker placed (B-leg), from its 2xx: the party is at its Contact."""
    target = _contact_uri(ok)
    ours = ok.get("From")
    theirs = ok.get("To")
    if target is None or not ours or not theirs:
        return None
    try:
        uri = parse_name_addr(ok.get("Contact") or "").uri
        seq, _ = parse_cseq(ok.get("CSeq") or "")
    except SipSyntaxError:
        return None
    transport = uri.transport.upper() if uri.scheme == "sip" else "TLS"
    return Dialog(ok.call_id, ours, theirs, target, seq + CSEQ_STEP, uri.host.strip("[]"), uri.port or 5060,
                  transport)


@dataclass(slots=True)
class _Pending:
    index: int
    dialog: Dialog
    sock: socket.socket
    data: bytes
    status: int = 0


def send_byes(dialogs: list[Dialog], wait: float = WAIT_S,
              clock: Callable[[], float] = time.monotonic) -> list[int]:
    """BYE each dialog's party directly; returns, per dialog, the final status that came
    back (0: none in time or not sent, -1: the party's port is closed).

    One connected UDP socket per party: the kernel picks the source address that reaches
    it (named in Via, with ``rport`` for the way back) and reports a closed port."""
    pending: list[_Pending] = []
    results = [0] * len(dialogs)
    for index, dialog in enumerate(dialogs):
        if not dialog.ready():
            continue
        family = socket.AF_INET6 if ":" in dialog.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.connect((dialog.host, dialog.port))
            local = sock.getsockname()
            data = dialog.bye(str(local[0]), int(local[1]), new_tag() + os.urandom(4).hex())
            sock.setblocking(False)
        except OSError:
            sock.close()
            continue
        pending.append(_Pending(index, dialog, sock, data))
    by_sock = {p.sock: p for p in pending}
    start = clock()
    next_send = start
    try:
        while True:
            open_ = [p for p in pending if p.status == 0]
            now = clock()
            if not open_ or now - start >= wait:
                break
            if now >= next_send:
                for p in open_:
                    _send(p)
                next_send += RETRANSMIT_EVERY
            ready, _, _ = select.select([p.sock for p in open_ if p.status == 0], [], [],
                                        max(0.0, min(next_send, start + wait) - clock()))
            for sock in ready:
                _receive(by_sock[sock])
    finally:
        for p in pending:
            p.sock.close()
    for p in pending:
        results[p.index] = p.status
    return results


def _send(p: _Pending) -> None:
    try:
        p.sock.send(p.data)
    except ConnectionRefusedError:
        p.status = -1
    except OSError:
        pass


def _receive(p: _Pending) -> None:
    """Read what came back: a final response to our BYE ends the wait for this party."""
    while p.status == 0:
        try:
            data = p.sock.recv(65536)
        except ConnectionRefusedError:
            p.status = -1
            return
        except (BlockingIOError, OSError):
            return
        with contextlib.suppress(SipParseError, SipSyntaxError, ValueError):
            msg = parse_message(data)
            if isinstance(msg, Response) and msg.status >= 200 and msg.call_id == p.dialog.call_id \
                    and msg.cseq == (p.dialog.cseq, "BYE"):
                p.status = msg.status
