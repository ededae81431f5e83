"""The contract between the edge and a media worker: command line, SIP headers, JSON lines.

Pure stdlib and free of pjsua2, so the edge and the pool can import it without loading
the media library.  Every name here is used by both sides; change them together.

Process
-------
``python -m appliance.media.worker --sip-port 0 --rtp-ports LOW-HIGH --rtp-address ADDR --edge HOST:PORT
[--calls N] [--voicemail-dir DIR]``

The worker binds one UDP SIP transport on 127.0.0.1 (port 0 = ephemeral), RTP/RTCP pairs
inside LOW-HIGH only on ADDR (:func:`rtp_address`: where the edge listens), and takes up to
N calls at once (default 1), fewer when its pjsua2 build holds fewer (``PJSUA_MAX_CALLS`` /
4: one with the PyPI wheel); its ``ready`` says how many.  Each call is named by its token;
the calls share the process, the conference bridge (a call only ever hears its own legs) and
the RTP range (``PORTS_PER_CALL`` ports a call).  Its SDP names ADDR, or 127.0.0.1 when ADDR
is the wildcard: the edge then puts the box's address as each outside party reaches it in
place of 127.0.0.1 (:mod:`appliance.sip.sdp`, ``StatelessRelay.body_between``).  It writes
JSON events to stdout, one per line (the events of one pass of its loop in one write), and
reads JSON commands from stdin, one per line.
pjsua logs go to stderr.  ``{"cmd": "quit"}``, SIGTERM, SIGINT and SIGHUP mean a clean
shutdown: BYE/CANCEL/503 every leg, ``libDestroy``, exit status 0.  Stdin EOF without a quit
first means the edge died: the worker BYEs each answered party straight to its address, not
along the route set through the dead edge (:mod:`.direct_bye`), and exits within ~2 s.

Events (worker -> edge, stdout)
-------------------------------
- ``{"event": "ready", "sip_port": N, "pid": P, "rtp_ports": "LOW-HIGH", "calls": C}``: once,
  first; C = calls taken at once (absent: 1).
- ``{"event": "call_started", "token": T, "call_id": ..., "caller": ..., "target": ...}``:
  an A-leg INVITE was accepted and the B-leg INVITE sent.
- ``{"event": "call_ringing", "token": T, "code": 180}``: first 18x on the B-leg, relayed
  to A as 180 (extra event; the edge may ignore it).
- ``{"event": "call_answered", "token": T, "answered_by": ..., "codecs": {...}}``: the
  B-leg answered, A has been answered with 200.
- ``{"event": "leg_joined", "token": T, "leg": "j1", "from": ...}``: a join leg was answered.
- ``{"event": "leg_left", "token": T, "leg": "a"|"b"|"j1"..., "code": N}``: a leg that had
  been answered is gone; the call may go on (see "hang-up rules").
- ``{"event": "call_ended", "token": T, "reason": R, "code": N, "duration": S}``: every leg
  of call T is gone; its place in the worker is free again.  R is one of the ``REASON_*`` values.
- ``{"event": "transfer", "token": T, "leg": X, "new_leg": "t1", "target": URI}``: a REFER
  (or an INVITE with Replaces, target ``replaces``) was taken; ``{"event": "transferred",
  ...}`` when the new leg took X's place, ``{"event": "transfer_failed", ..., "code": N}``
  when it failed (extra events; the edge may ignore them).
- ``{"event": "voicemail_recorded", "token": T, "number": N, "caller": C, "path": P,
  "seconds": S}``: a message was recorded for number N (P: a file under the mailbox's
  ``tmp/`` the edge moves in with ``Mailbox.add``); none for silence or a hang-up at once.
- ``{"event": "mailbox_changed", "number": N}``: the mailbox menu marked a message heard,
  deleted one, or saved a greeting.
- ``{"event": "pong", "seq": N, "busy": bool, "active": A, "calls": N}``: reply to
  ``ping`` (busy: a call is in progress; A = calls in progress now; calls = calls finished
  so far).
- ``{"event": "error", "message": ...}``: a bad command or an unexpected failure (logged,
  never fatal).
- ``{"event": "bye", "reason": ...}``: last line before a clean exit.

Commands (edge -> worker, stdin)
--------------------------------
``{"cmd": "ping", "seq": N}``; ``{"cmd": "end", "token": T}`` (call T ends: its legs are
BYEd, CANCELled or refused, ``call_ended`` with reason ``end_all``; the other calls go
on); ``{"cmd": "end_all"}`` (every call ends); ``{"cmd": "quit"}``.  EOF on stdin (the
edge died) and a quit cover every call.

Probe (the pool learns the build's limit before starting workers): ``worker --zygote
--probe-calls N`` adds ``"calls": C`` to the zygote's ``ready``; ``worker --probe-calls N``
prints ``{"event": "capacity", "calls": C}`` and exits (C <= N).

SIP (edge -> worker)
--------------------
- A-leg: the caller's INVITE relayed to ``sip:<dialled>@127.0.0.1:<sip_port>`` with
  ``X-Homepbx-Token`` (random, names the call), ``X-Homepbx-Target`` (where the B-leg
  goes, ``sip:<number>@<edge host:port>``; default ``sip:<dialled>@<--edge>``) and
  ``X-Homepbx-Caller`` (``"Name" <sip:100@realm>``, the identity the callee sees; default:
  the A-leg's From).  A call beyond the worker's ``calls`` (or a second INVITE with a
  token already in progress there) gets 486.
- B-leg: ``INVITE <X-Homepbx-Target>`` sent straight to the edge, From = X-Homepbx-Caller,
  with ``X-Homepbx-Token``.  B-leg 18x -> 180 to A (once); B-leg 2xx -> 200 to A carrying
  ``P-Asserted-Identity`` (the B-leg 2xx's own P-Asserted-Identity if the edge put one
  there, else its To without tag) and ``X-Homepbx-Token``; a B-leg final failure -> the
  same code and phrase to A (a local failure without a code becomes 500).
- Join: an INVITE with ``X-Homepbx-Token`` of the call in this worker and
  ``X-Homepbx-Join: 1``: answered at once and added to the bridge.  Refused with 486
  when the call is not answered yet or already has ``MAX_LEGS`` legs, 481 when the token
  is not this worker's call.
- Pickup: an INVITE with ``X-Homepbx-Token`` of the call in this worker and
  ``X-Homepbx-Pickup: 1`` while the B-leg still rings: the picker is answered, A is
  answered (``P-Asserted-Identity`` naming the picker), the two are bridged and the
  B-leg is CANCELled (the edge's fork then CANCELs the ringing devices).  481 when the
  token is not this worker's call or the call is no longer ringing.
- Confirmation: an INVITE with ``X-Homepbx-Token`` and ``X-Homepbx-Play: confirm`` (a
  handset's feature code was applied): answered at once, ``CONFIRM_BEEPS`` short beeps of
  ``CONFIRM_TONE_HZ`` played to it, then BYE; no B-leg.  The session ends as any call
  (``call_ended``).
- Transfer (REFER, RFC 3515): the edge relays a REFER from a party X to the worker with
  its Refer-To rewritten to ``<sip:<target>@<edge>?X-Homepbx-Token=T&X-Homepbx-Transfer=<X's
  number>>`` (a ``Replaces`` header of the Refer-To kept, every other one dropped).  pjsua
  answers ``202``, sends the INVITE to that URI (its URI headers become headers of the
  INVITE, so it carries the token, the transferring number and any ``Replaces``) on a
  ``Leg`` the worker created for it (``t1``; pjsua2 would otherwise reuse X's ``Call``
  object for the new call), and NOTIFYs X with the sipfrag of each status (100, 18x, 200 or
  the failure).  The edge authorises the leg as X's extension (``call_policy.decide_transfer``)
  and rings the target like any call of X's, or relays an INVITE with ``Replaces`` to the
  worker holding the named dialog.  On the target's 200 the new leg takes X's place (X is
  cut from the bridge and BYEd ``TRANSFER_RELEASE_S`` later unless it hangs up first, as
  it should after the 200 NOTIFY); on a failure nothing else changes and X can resume.
  One transfer at a time per call: a second REFER meanwhile gets 491.  If X hangs up
  while the target rings, the call waits for the target's answer.
- Replaces (RFC 3891): an INVITE with ``Replaces`` naming one of the worker's confirmed
  dialogs (pjsua checks Call-ID and tags, 481 otherwise) is answered on a ``Leg`` created
  for it (``r1``), which takes the replaced leg's place; pjsua BYEs the replaced party.
- Answering machine: the edge answers the B-leg INVITE with a final ``480`` carrying
  ``X-Homepbx-Voicemail: <number>`` (and ``X-Homepbx-Voicemail-Max: <seconds>``, the
  longest message, default ``VOICEMAIL_MAX_S``) when the call goes to that number's
  answering machine (no answer in time, busy, DND, no reachable device).  Instead of
  passing the failure to A, the worker answers A (``call_answered`` with ``answered_by``
  ``voicemail:<number>``), plays the number's greeting (``Mailbox.greeting``, else the default prompt), a
  ``BEEP_HZ`` beep, and records A (WAV, 16-bit mono, the bridge's rate) to
  ``Mailbox.recording_path`` until A hangs up or the maximum is reached (then BYE).  A
  recording shorter than ``VOICEMAIL_MIN_S`` or quieter than ``SILENCE_RMS`` is deleted;
  otherwise ``voicemail_recorded`` goes out, shortly after ``call_ended`` (reason
  ``caller_hangup``, or ``callee_hangup`` when the maximum was reached): pjmedia finishes
  a WAV file on the bridge's next tick after the recorder is closed.  The mailbox
  store's root is the worker's ``--voicemail-dir``; without one the 480 goes to A as any
  failure.
- Mailbox: an INVITE with ``X-Homepbx-Token`` and ``X-Homepbx-Mailbox: <number>`` (the
  edge sends it only for a registered device of that number that dialled the mailbox
  code) is answered at once; no B-leg.  A spoken menu driven by DTMF (RFC 4733, else
  SIP INFO): "you have N new and M old messages", then 1 play (new messages first,
  newest first; played = heard), 2 next, 3 delete, 4 record a greeting (after the
  tone, ``#`` to stop; ``GREETING_MAX_S`` at most), 0 the menu again.  A change of the
  store (heard, deleted, greeting) emits ``mailbox_changed``.  Prompts are WAV files in
  ``PROMPTS_DIR`` (rendered at build time by ``make prompts``); a missing prompt is
  replaced by a short ``PROMPT_FALLBACK_HZ`` tone, never an error.
- Hang-up rules: A leaving ends the call (BYE to everyone else).  B or a joiner leaving
  leaves the rest talking as long as A and at least one other leg are up; once A is
  alone it is hung up too.  A cancelling before the answer CANCELs the B-leg.
- Refusals: 403 when the source host is not the ``--edge`` host, 400 without a token,
  486 while its ``calls`` calls are up, 503 while shutting down.
- The B-leg has no credentials: the edge must not challenge it (it trusts the worker by
  source address 127.0.0.1:<sip_port of a pool worker> plus the token).
- In-dialog requests follow the route set, so the edge must Record-Route both the A-leg
  relay and the B-leg fork to keep seeing BYEs and re-INVITEs.

What the edge does with it
--------------------------
``WorkerPool.acquire(token)`` -> a free call slot of a worker (the busiest one with
one), relay the INVITE to ``worker.address`` (None: answer
``503`` with ``Retry-After``); fork the B-leg INVITE that comes back with the token;
optionally put ``P-Asserted-Identity`` naming the answering device on the 2xx it forwards
to the worker (the worker copies it into its 200 to A); strip ``X-Homepbx-*`` from
everything that leaves the box; relay joins to ``pool.worker_for(token)``.  The pool
frees the call's slot on ``call_ended`` (after a short cool-down); ``release(worker, token)``
is for an INVITE that never reached it (or a call to end: ``end``).  ``worker_died(worker,
tokens)``: BYE the parties of every call that worker held from the dialog state the edge
saw; the other workers' calls go on.  Workers are forked from a zygote
(``worker --zygote``, see :func:`appliance.media.worker.zygote_main`).

Figures behind the design choices are in ``bench/media.py``.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Final

# --- SIP headers --------------------------------------------------------------------------
HDR_TOKEN: Final = "X-Homepbx-Token"
HDR_TARGET: Final = "X-Homepbx-Target"
HDR_CALLER: Final = "X-Homepbx-Caller"
HDR_JOIN: Final = "X-Homepbx-Join"
HDR_PICKUP: Final = "X-Homepbx-Pickup"
HDR_PLAY: Final = "X-Homepbx-Play"
PLAY_CONFIRM: Final = "confirm"
CONFIRM_TONE_HZ: Final = 880
CONFIRM_BEEPS: Final = 3
"""Beeps of 200 ms (100 ms apart) that say "done" to a handset that dialled a feature code."""
HDR_VOICEMAIL: Final = "X-Homepbx-Voicemail"
"""On the edge's 480 to a B-leg: the number whose answering machine takes the call."""
HDR_VOICEMAIL_MAX: Final = "X-Homepbx-Voicemail-Max"
"""With HDR_VOICEMAIL: the longest message in seconds."""
HDR_MAILBOX: Final = "X-Homepbx-Mailbox"
"""On an A-leg INVITE: open this number's mailbox menu (no B-leg)."""
VOICEMAIL_MAX_S: Final = 120
VOICEMAIL_MIN_S: Final = 1.5
"""A shorter recording is no message (a caller who hung up at the tone)."""
SILENCE_RMS: Final = 100
"""RMS of the 16-bit samples below which a recording is silence (about -50 dBFS)."""
GREETING_MAX_S: Final = 60
BEEP_HZ: Final = 1000
"""The tone after the greeting: speak now."""
PROMPT_FALLBACK_HZ: Final = 620
"""Played in place of a prompt whose WAV file is missing."""
PROMPTS_DIR_NAME: Final = "prompts"
"""Prompts are appliance/media/prompts/<name>.wav (``make prompts``, gitignored)."""
HDR_TRANSFER: Final = "X-Homepbx-Transfer"
"""On a worker's transfer leg: the number of the extension that asked for the transfer
(written by the edge into the Refer-To it relays to the worker; see "Transfer")."""
INTERNAL_HEADER_PREFIX: Final = "X-Homepbx-"
"""The edge strips every header with this prefix from anything that leaves the box."""
HDR_PAI: Final = "P-Asserted-Identity"

TRANSFER_RELEASE_S: Final = 4.0
"""After a transfer succeeded, how long the transferring party may take to hang up itself."""

# --- limits -----------------------------------------------------------------------------
MAX_LEGS: Final = 3
"""A, B and one joiner.  The stock pjsua2 wheel allows 4 calls per process, so a
4th INVITE can still be received and refused."""
PORTS_PER_LEG: Final = 2
"""RTP and RTCP."""
PORTS_PER_CALL: Final = (MAX_LEGS + 1) * PORTS_PER_LEG
"""Enough for every leg of a call plus a refused 4th join (pjsua creates its media
transport before we can refuse it)."""
MIN_PORTS_PER_WORKER: Final = PORTS_PER_CALL
"""A worker taking one call."""
LOOPBACK: Final = "127.0.0.1"
WILDCARD: Final = "0.0.0.0"
CODECS: Final = ("PCMU/8000", "PCMA/8000", "G722/16000")
"""Enabled codecs; the rest (speex, iLBC, GSM, L16) are off so transcoding stays cheap."""

# --- events -----------------------------------------------------------------------------
EV_READY: Final = "ready"
EV_CAPACITY: Final = "capacity"
EV_CALL_STARTED: Final = "call_started"
EV_CALL_RINGING: Final = "call_ringing"
EV_CALL_ANSWERED: Final = "call_answered"
EV_LEG_JOINED: Final = "leg_joined"
EV_LEG_LEFT: Final = "leg_left"
EV_CALL_ENDED: Final = "call_ended"
EV_TRANSFER: Final = "transfer"
EV_TRANSFERRED: Final = "transferred"
EV_TRANSFER_FAILED: Final = "transfer_failed"
EV_VOICEMAIL_RECORDED: Final = "voicemail_recorded"
EV_MAILBOX_CHANGED: Final = "mailbox_changed"
EV_PONG: Final = "pong"
EV_ERROR: Final = "error"
EV_BYE: Final = "bye"
EV_UNAVAILABLE: Final = "unavailable"
"""The media engine (pjsua2) does not load here: one line, then the process exits with
EXIT_UNAVAILABLE. The pool stops trying and the calls go unanchored."""
EXIT_UNAVAILABLE: Final = 3

# --- commands ---------------------------------------------------------------------------
CMD_PING: Final = "ping"
CMD_END: Final = "end"
CMD_END_ALL: Final = "end_all"
CMD_QUIT: Final = "quit"

# --- leg names --------------------------------------------------------------------------
LEG_A: Final = "a"
LEG_B: Final = "b"
JOIN_LEG_PREFIX: Final = "j"
TRANSFER_LEG_PREFIX: Final = "t"
"""A leg placed for a REFER ("t1", ...) or answered for an INVITE with Replaces ("r1", ...)."""
REPLACING_LEG_PREFIX: Final = "r"

# --- call_ended reasons -----------------------------------------------------------------
REASON_CALLER_HANGUP: Final = "caller_hangup"
"""A hung up after the answer."""
REASON_CALLEE_HANGUP: Final = "callee_hangup"
"""The last non-A leg hung up, so A was hung up too."""
REASON_CANCELLED: Final = "cancelled"
"""A gave up before the answer; the B-leg was cancelled."""
REASON_REJECTED: Final = "rejected"
"""The B-leg failed (code = its final status), A got the same code."""
REASON_END_ALL: Final = "end_all"
"""The edge ended it (``end`` or ``end_all``)."""
REASON_SHUTDOWN: Final = "shutdown"
REASON_ERROR: Final = "error"
"""The worker could not place the B-leg or answer A (code says what A got)."""


def encode(kind: str, name: str, **fields: Any) -> bytes:
    """One JSON line: ``encode("cmd", "ping", seq=1)`` or ``encode("event", "pong", ...)``."""
    return (json.dumps({kind: name, **fields}, separators=(",", ":"), default=str) + "\n").encode()


def decode(line: bytes | str) -> dict[str, Any]:
    """Parse one JSON line into a dict; raises ValueError for anything else."""
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def parse_port_range(text: str) -> tuple[int, int]:
    """``"10000-10999"`` -> (10000, 10999); raises ValueError when malformed or empty."""
    low_text, sep, high_text = text.partition("-")
    if not sep:
        raise ValueError(f"port range {text!r}: expected LOW-HIGH")
    low, high = int(low_text), int(high_text)
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"port range {text!r}: need 1 <= LOW <= HIGH <= 65535")
    return low, high


def format_port_range(ports: tuple[int, int]) -> str:
    return f"{ports[0]}-{ports[1]}"


def split_port_range(ports: tuple[int, int], slots: int, calls: int = 1) -> list[tuple[int, int]]:
    """Cut a range into `slots` disjoint sub-ranges, each starting on an even port and
    holding an even number of ports (RTP even, RTCP odd), so workers never collide.

    Raises ValueError when a slice would be smaller than `calls` * PORTS_PER_CALL (a
    worker taking `calls` calls at once).
    """
    low, high = ports
    if low % 2:
        low += 1
    size = (high - low + 1) // max(slots, 1)
    size -= size % 2
    need = max(calls, 1) * PORTS_PER_CALL
    if slots < 1 or size < need:
        raise ValueError(
            f"rtp port range {ports[0]}-{ports[1]} is too small for {slots} media workers"
            f" ({need} ports each)"
        )
    return [(low + i * size, low + (i + 1) * size - 1) for i in range(slots)]


def workers_needed(max_calls: int, calls: int, spare: int) -> int:
    """Port slices for a pool of `max_calls` calls, `calls` to a worker, and `spare`
    more for replacements starting while old workers exit."""
    return -(-max_calls // max(calls, 1)) + spare


def fit_calls(ports: tuple[int, int], max_calls: int, calls: int, spare: int) -> int:
    """The most calls per worker, at most `calls`, whose port slices fit in `ports`
    (1 if even that does not fit: the caller's split_port_range then says why)."""
    for c in range(max(calls, 1), 1, -1):
        try:
            split_port_range(ports, workers_needed(max_calls, c, spare), c)
        except ValueError:
            continue
        return c
    return 1


def rtp_address(listen_host: str) -> str:
    """Where a worker binds RTP for an edge listening on `listen_host`: the same IPv4
    address, or the wildcard when the edge listens on every address (``0.0.0.0``, or
    ``::``, which takes IPv4 too); never wider than the edge.  Media stay IPv4: an IPv6
    or named listener keeps them on loopback, as before."""
    host = listen_host.strip("[]")
    if host in ("", WILDCARD, "::"):
        return WILDCARD
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return LOOPBACK
    return host if address.version == 4 else LOOPBACK


def parse_hostport(text: str) -> tuple[str, int]:
    """``"127.0.0.1:5060"`` or ``"[::1]:5060"`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)
