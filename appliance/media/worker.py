"""Media worker: a pjsua2 B2BUA that anchors up to ``--calls`` calls at once in its conference bridge.

Run as ``python -m appliance.media.worker --sip-port 0 --rtp-ports LOW-HIGH --rtp-address ADDR
--edge HOST:PORT [--calls N]``;
the contract with the edge (headers, events, commands) is in :mod:`.protocol`.

Why it is built this way (figures in ``bench/media.py``):

- The main loop, the command channel, signals and shutdown are the shared pjsua2 host's
  (:class:`appliance.pjhost.PjHost`): pjsua2 on the main thread only, asleep in
  ``libHandleEvents(1000)`` until SIP or a timer, woken by a CRLF keep-alive to its
  own SIP port when a command or a signal arrives.
- RTP runs on pjmedia's own ioqueue and thread (``hasIoqueue``, media ``threadCnt = 1``),
  so the Python main loop wakes for SIP, commands and timers only, not for each RTP
  packet: CPU per bridged PCMA call, 8 calls, fell from 0.95-1.0 % to 0.76 % of a core
  (1 call: 1.34-1.40 % to 0.85 %; bench/media_vs_asterisk.py, back to back on a shared
  2-core box).  The price: that thread polls every 10 ms, 0.30 % of a core for a warm
  idle worker against 0.016 % with RTP on the SIP ioqueue (``--no-media-thread``).
  A 8 kHz bridge (``--clock-rate 8000``) saved less than the noise (0.85 to 0.79 % at 8
  calls) and would make G.722 calls narrowband: not taken.
- The conference bridge is clocked by the null sound device, which pjsua opens when the
  first port is connected and closes one second after the last call (``sndAutoCloseTime``).
- Every ``Call`` is strongly referenced until DISCONNECTED and dropped after
  ``libHandleEvents`` returns, never inside a callback.  Automatic garbage collection is
  off (a collection started by a helper thread could run a pjsua2 destructor on an
  unregistered thread, which aborts); the main loop collects when a call ends.
- pjsua2 callbacks only record facts and queue jobs (``later``); jobs run right after
  ``libHandleEvents`` returns, so no pjsua2 operation is nested inside a callback.
- A REFER or an INVITE with Replaces is the one place a callback creates something: pjsua2
  wants the new call's object before the callback returns, and without one it reuses the
  transferring leg's ``Call`` for the new call (the worker used to die when that call
  ended).  So the worker hands it a ``Leg`` of its own (``newCall``), or refuses.
- A reaped ``Leg`` is dropped everywhere at once: pjsua2's ``~Call`` clears the user data
  of its call id, so an old object outliving the reuse of its id would orphan a new call.
- The B-leg's From is set per call with ``SipTxOption.localUri``: one account serves
  every caller identity.
- The conference bridge runs at 16 kHz (G.722 stays wideband) with pjmedia's linear
  resampler (quality 2), which is exact for 8 kHz legs and a quarter cheaper per call
  than the small filter.
- G.722 uses the standard level (pjmedia's PCM shift 1, not its default 2,
  :func:`appliance.pjhost.set_g722_pcm_shift`): with 2, a G.722 phone was heard 6 dB too
  loud and heard the other party 6 dB too quietly, on the legs where pjmedia's clipping
  detector had not happened to drop the shift (``tests/e2e/test_levels.py``).
- Stdin EOF with no quit before it means the edge died: every dialog is Record-Routed
  through it, so the answered parties are BYEd directly (:mod:`.direct_bye`) and the
  process exits without pjsua2's teardown, whose BYEs would go to the dead edge.
- ``--zygote`` turns the module into a fork server (:func:`zygote_main`), so workers
  share the imported bindings.
- Several calls share one process, one bridge clock and one media thread (``--calls``):
  each call is a :class:`Session` keyed by its token, and every callback finds its session
  through its ``Leg``.  How many a process takes is the build's: pjsua keeps
  ``PJSUA_MAX_CALLS`` call slots (4 in the PyPI wheel), a call may use
  ``PJSUA_CALLS_PER_CALL`` of them (A, B, a join leg, a transfer leg), and ``libInit``
  silently cuts ``maxCalls`` to the build's maximum, so the worker asks for
  ``4 * --calls`` and reads back what it got (``pjsua_call_get_max_count``,
  :func:`build_call_limit`).  The PyPI wheel thus gives one call per process, as before.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from appliance.media import protocol as P

try:
    import pjsua2 as pj
except ImportError as missing:  # not installed, or its libraries do not load (another arch)
    if __name__ != "__main__":
        raise
    # Run by the pool: one line it understands, not a traceback per attempt.
    os.write(1, P.encode("event", P.EV_UNAVAILABLE, error=str(missing)))
    os._exit(P.EXIT_UNAVAILABLE)

from appliance.jsonlines import Emitter, private_stdout
from appliance.logs import fields
from appliance.media import answering, direct_bye
from appliance.pjerrors import pj_error_text
from appliance.pjhost import STDIN_CLOSED, LogWriter, PjHost, block_signals, create_library, set_g722_pcm_shift
from appliance.sip.message import Request, Response, SipParseError, parse_message

SHUTDOWN_PUMP_S = 2.0
"""How long shutdown waits for BYE/CANCEL transactions before destroying the library."""
EDGE_LOST = STDIN_CLOSED
"""The stop reason when the command channel ends without a quit: the edge is gone."""
NULL_SINK = "null"
"""The links' name for the bridge's port 0, the null sound device (see connect_bridge)."""
_STATIC_PT = {"0": "PCMU/8000", "8": "PCMA/8000", "9": "G722/16000"}


# ------------------------------------------------------------------------------------------
# small helpers


def parse_sip(text: str) -> Request | Response | None:
    """The project's parser over pjsua2's message text; None when it refuses it."""
    try:
        return parse_message(text.encode("utf-8", "surrogateescape"))
    except (SipParseError, ValueError):
        return None


def strip_tag(value: str) -> str:
    """A From/To value without its tag parameter (the identity, not the dialog)."""
    head, sep, _ = value.partition(">")
    if sep:
        return head + sep
    return value.split(";", 1)[0].strip()


def offered_codecs(sdp: str) -> list[str]:
    """Our codec ids ("PCMU/8000", ...) in the order the first m=audio line offers them."""
    payloads: list[str] = []
    rtpmap: dict[str, str] = {}
    in_audio = False
    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            if payloads:
                break
            parts = line[2:].split()
            in_audio = bool(parts) and parts[0] == "audio"
            if in_audio:
                payloads = parts[3:]
        elif in_audio and line.startswith("a=rtpmap:"):
            pt, _, encoding = line[len("a=rtpmap:") :].partition(" ")
            name, _, rate = encoding.partition("/")
            # G.722 is "G722/8000" in SDP (RFC 3551's historic RTP clock), 16 kHz audio.
            rtpmap[pt] = "G722/16000" if name.upper() == "G722" else f"{name.upper()}/{rate.split('/')[0]}"
    ours = {c.upper(): c for c in P.CODECS}
    result: list[str] = []
    for pt in payloads:
        codec = ours.get(rtpmap.get(pt, _STATIC_PT.get(pt, "")).upper())
        if codec is not None and codec not in result:
            result.append(codec)
    return result


def host_of(address: str) -> str:
    """"127.0.0.1:5060" / "[::1]:5060" -> the host."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def sip_headers(pairs: dict[str, str]) -> Any:
    vec = pj.SipHeaderVector()
    for name, value in pairs.items():
        h = pj.SipHeader()
        h.hName = name
        h.hValue = value
        vec.append(h)
    return vec


# ------------------------------------------------------------------------------------------
# pjsua2 subclasses: callbacks record facts and queue jobs, nothing more


class WorkerAccount(pj.Account):  # type: ignore[misc]
    """The worker's one local account: receives the A-leg and joins, places the B-leg
    (From is set per call through SipTxOption.localUri, so no account per caller)."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    def onIncomingCall(self, prm: Any) -> None:
        self.worker.guard("onIncomingCall", self.worker.on_incoming_call, self, prm)


class Leg(pj.Call):  # type: ignore[misc]
    """One call leg of the session ("a", "b", "j1"...), or a refused stray INVITE."""

    def __init__(self, worker: Worker, acc: WorkerAccount, call_id: int | None = None) -> None:
        if call_id is None:
            super().__init__(acc)
        else:
            super().__init__(acc, call_id)
        self.worker = worker
        self.name = ""
        self.session: Session | None = None
        self.disconnected = False
        self.confirmed = False
        self.established = False
        """A 2xx went either way (CONNECTING or CONFIRMED): the dialog can take a BYE."""
        self.port: Any = None
        """The active audio stream's bridge port as of the last media state (None: none):
        read here, not asked of pjsua2 again (:meth:`Worker.on_call_media_state`)."""
        self.port_id = -1
        self.code = 0
        self.reason = ""
        self.identity = ""
        """For the B-leg: who answered (P-Asserted-Identity or To of its 2xx)."""
        self.remote = ""
        self.dialog: direct_bye.Dialog | None = None
        """What a BYE around the edge needs, should the edge die (see direct_bye)."""
        self.voicemail: tuple[str, int] | None = None
        """For the B-leg: the edge's 480 sent the call to this number's answering machine
        (number, longest message in seconds)."""
        self._stands_for: weakref.ref[Leg] | None = None
        """A transfer or replacing leg: the leg it takes the place of once answered (weakly:
        a reaped Leg must be gone everywhere at once, see Session.forget)."""

    def onCallState(self, prm: Any) -> None:
        self.worker.guard("onCallState", self.worker.on_call_state, self, prm)

    def onCallMediaState(self, prm: Any) -> None:
        self.worker.guard("onCallMediaState", self.worker.on_call_media_state, self)

    def onDtmfDigit(self, prm: Any) -> None:
        self.worker.guard("onDtmfDigit", self.worker.on_dtmf, self, str(prm.digit))

    def onCallTransferRequest(self, prm: Any) -> None:
        # Refused unless the worker takes it with a Leg of its own: without a newCall,
        # pjsua2 would reuse this very object for the new call (the worker used to die of
        # that when the new call ended).
        prm.statusCode = 500
        self.worker.guard("onCallTransferRequest", self.worker.on_transfer_request, self, prm)

    def onCallReplaceRequest(self, prm: Any) -> None:
        prm.statusCode = 500  # same reason as above
        self.worker.guard("onCallReplaceRequest", self.worker.on_replace_request, self, prm)

    def onCallReplaced(self, prm: Any) -> None:
        self.worker.guard("onCallReplaced", self.worker.on_replaced, self, prm)

    def onCallTransferStatus(self, prm: Any) -> None:
        prm.cont = False  # the worker's transfers are not this leg's; nothing to follow

    def alive(self) -> bool:
        return not self.disconnected

    @property
    def media_active(self) -> bool:
        return self.port is not None

    @property
    def stands_for(self) -> Leg | None:
        return self._stands_for() if self._stands_for is not None else None

    @stands_for.setter
    def stands_for(self, leg: Leg | None) -> None:
        self._stands_for = weakref.ref(leg) if leg is not None else None

    def audio_media(self) -> Any:
        """The active audio stream's bridge port, or None."""
        if self.disconnected:
            return None
        try:
            info = self.getInfo()
        except pj.Error:
            return None
        for media in info.media:
            if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                return self.getAudioMedia(media.index)
        return None

    def codec(self) -> str | None:
        if self.disconnected:
            return None
        try:
            info = self.getInfo()
            for media in info.media:
                if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                    stream = self.getStreamInfo(media.index)
                    return f"{stream.codecName}/{stream.codecClockRate}"
        except pj.Error:
            pass
        return None


@dataclass(eq=False)
class Session:
    """The one call this worker anchors: its token and legs."""

    token: str
    caller: str
    target: str
    a: Leg | None
    b: Leg | None = None
    joiners: list[Leg] = field(default_factory=list)
    transfer: Leg | None = None
    """The leg placed or answered for a transfer, until it is answered or fails."""
    transfer_seq: int = 0
    vacated: str = ""
    """The role ("a", "b", "j") of the leg a running transfer stands for, once that leg is reaped."""
    links: set[tuple[str, int, str, int]] = field(default_factory=set)
    """Bridge connections made: (source leg, its port, sink leg, its port)."""
    join_seq: int = 0
    ringing_sent: bool = False
    answered: bool = False
    answered_at: float = 0.0
    ending: bool = False
    reason: str = ""
    code: int = 0
    machine: answering.AnsweringMachine | answering.MailboxMenu | None = None
    """The answering machine or the mailbox menu this session is (no B-leg)."""
    codecs: list[str] = field(default_factory=list)
    """The A-leg offer's codecs, in its order: what this call's own offers lead with."""

    def legs(self) -> list[Leg]:
        return [leg for leg in (self.a, self.b, *self.joiners, self.transfer) if leg is not None]

    def a_alive(self) -> bool:
        return self.a is not None and self.a.alive()

    def forget(self, leg: Leg) -> None:
        """Drop a reaped leg.  pjsua2's ~Call clears the user data of its call id, so a
        Call object kept after its id is reused would orphan the new call."""
        if self.transfer is not None and self.transfer.stands_for is leg:
            self.vacated = "a" if self.a is leg else "b" if self.b is leg else "j"
        if self.a is leg:
            self.a = None
        if self.b is leg:
            self.b = None
        if leg in self.joiners:
            self.joiners.remove(leg)
        if self.transfer is leg:
            self.transfer = None
        leg.session = None

    def set_reason(self, reason: str, code: int = 0) -> None:
        """The first cause of the end wins (a reject, a cancel, a hang-up...)."""
        if not self.reason:
            self.reason = reason
            self.code = code


# ------------------------------------------------------------------------------------------
# the worker


PJSUA_CALLS_PER_CALL: Final = 4
"""pjsua call slots one of our calls may use: A, B, a join leg, a transfer leg."""


def build_call_limit() -> int:
    """pjsua's call limit in force (after ``libInit``, which cut ``maxCalls`` to the
    build's ``PJSUA_MAX_CALLS``).  pjsua2 does not wrap ``pjsua_call_get_max_count``: it
    is called in the loaded module itself, as for the G.722 level (pjhost)."""
    module = getattr(pj, "_pjsua2", None)
    path = getattr(module, "__file__", None)
    if not path:
        return PJSUA_CALLS_PER_CALL
    lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    get_max = lib.pjsua_call_get_max_count
    get_max.argtypes = []
    get_max.restype = ctypes.c_uint
    return int(get_max())


def calls_allowed(wanted: int, limit: int) -> int:
    """Calls one process takes at once: `wanted`, cut to what `limit` pjsua calls hold
    (PJSUA_CALLS_PER_CALL each), at least one."""
    return max(1, min(wanted, limit // PJSUA_CALLS_PER_CALL))


_PROBE_ENDPOINTS: list[Any] = []


def probe_calls(wanted: int) -> int:
    """How many calls a worker of this build would take: a throw-away ``libInit`` asking
    for `wanted` calls' worth, in a process that then exits with ``os._exit`` (a child:
    see :func:`probe_in_child`)."""
    ep = create_library()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.uaConfig.maxCalls = PJSUA_CALLS_PER_CALL * max(1, wanted)
    cfg.logConfig.level = 0
    cfg.logConfig.consoleLevel = 0
    cfg.medConfig.threadCnt = 0
    cfg.medConfig.hasIoqueue = False
    ep.libInit(cfg)
    _PROBE_ENDPOINTS.append(ep)  # never destroyed: ~Endpoint would take a second in libDestroy
    return calls_allowed(wanted, build_call_limit())


class Worker(PjHost):
    """Owns the transport, the account, the sessions (one per call, by token) and every
    Leg; the endpoint and the loop are the host's."""

    def __init__(self, args: argparse.Namespace, out: Emitter) -> None:
        super().__init__(out)
        self.args = args
        self.rtp_ports = P.parse_port_range(args.rtp_ports)
        self.edge_host, self.edge_port = P.parse_hostport(args.edge)
        self.legs: list[Leg] = []
        self.sessions: dict[str, Session] = {}
        """The calls in progress, by token."""
        self.capacity = 1
        """Calls taken at once (``--calls`` cut to the build's limit, set by start)."""
        self.dirty = False
        self.calls_done = 0
        self.acc: WorkerAccount | None = None
        self.sip_port = 0
        self.null_sink: Any = None
        """The null sound device's bridge port (port 0), once a stream was connected to it."""
        self.codec_ranking: list[str] = []
        """The codec order last given to pjsua (see set_codec_order)."""

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        level = int(self.args.log_level)
        cfg = self.create_endpoint(LogWriter(), level, msg_logging=level >= 4)
        ua = cfg.uaConfig
        # As many pjsua calls as --calls calls may use; libInit cuts it to the build's
        # PJSUA_MAX_CALLS (4 in the PyPI wheel: one call), read back after it.
        ua.maxCalls = PJSUA_CALLS_PER_CALL * max(1, int(self.args.calls))
        ua.userAgent = "homepbx-media"
        med = cfg.medConfig
        # RTP on pjmedia's own ioqueue and thread, off the Python loop (see the module
        # docstring; --no-media-thread puts it on the SIP ioqueue, for comparison).
        med.hasIoqueue = bool(self.args.media_thread)
        med.threadCnt = 1 if self.args.media_thread else 0
        med.noVad = True
        med.ecTailLen = 0  # no echo canceller: nothing here has a speaker
        med.clockRate = int(self.args.clock_rate)
        med.sndClockRate = int(self.args.clock_rate)
        med.quality = int(self.args.quality)
        med.sndAutoCloseTime = 1
        self.init_endpoint(cfg)
        self.capacity = calls_allowed(int(self.args.calls), build_call_limit())
        set_g722_pcm_shift()  # G.722 legs at the level every other G.722 end uses

        tcfg = pj.TransportConfig()
        tcfg.port = int(self.args.sip_port)
        tcfg.boundAddress = P.LOOPBACK
        tcfg.publicAddress = P.LOOPBACK
        tid, self.sip_port = self.create_transport(pj.PJSIP_TRANSPORT_UDP, tcfg)
        self.start_library()
        self.set_codec_order(list(P.CODECS))

        acfg = pj.AccountConfig()
        acfg.idUri = f"sip:media@{P.LOOPBACK}:{self.sip_port}"
        acfg.sipConfig.transportId = tid
        nat = acfg.natConfig
        nat.sipOutboundUse = 0
        nat.contactRewriteUse = 0
        nat.viaRewriteUse = 0
        nat.sdpNatRewriteUse = 0
        nat.sipStunUse = pj.PJSUA_STUN_USE_DISABLED
        nat.mediaStunUse = pj.PJSUA_STUN_USE_DISABLED
        nat.iceEnabled = False
        nat.udpKaIntervalSec = 0
        mt = acfg.mediaConfig.transportConfig
        # RTP where the edge listens (--rtp-address), so a handset on the LAN reaches it.
        # Bound to the wildcard, the SDP names 127.0.0.1 (right for the edge's own hop)
        # and the edge writes in the address each outside party reaches the box at.
        rtp = str(self.args.rtp_address)
        mt.boundAddress = "" if rtp == P.WILDCARD else rtp
        mt.publicAddress = P.LOOPBACK if rtp == P.WILDCARD else rtp
        mt.port = self.rtp_ports[0]
        mt.portRange = self.rtp_ports[1] - self.rtp_ports[0]
        # Symmetric RTP needs no option: pjmedia's UDP transport sends to the source of the
        # RTP it receives once a few packets came from there (PJMEDIA_RTP_NAT_PROBATION_CNT),
        # whatever the SDP said (tests/e2e/test_symmetric_rtp.py).
        self.acc = WorkerAccount(self)
        self.acc.create(acfg, True)

    def set_codec_order(self, order: list[str]) -> None:
        """Enable only our codecs, `order` first: the B-leg offer then leads with the
        A-leg's codec, so the common case needs no transcoding."""
        ranked = order + [c for c in P.CODECS if c not in order]
        if ranked == self.codec_ranking:
            return  # as set for the last call (the common case: every call offers the same)
        self.codec_ranking = ranked
        for info in self.ep.codecEnum2():
            cid = str(info.codecId)
            base = cid.rsplit("/", 1)[0] if cid.count("/") == 2 else cid
            prio = 255 - ranked.index(base) if base in ranked else 0
            if int(info.priority) != prio:
                self.ep.codecSetPriority(cid, prio)

    def ready(self) -> None:
        self.out.emit(
            P.EV_READY, sip_port=self.sip_port, pid=os.getpid(), rtp_ports=P.format_port_range(self.rtp_ports),
            calls=self.capacity,
        )

    def shutdown(self) -> None:
        """With the edge gone, the calls are ended around it instead (:meth:`end_around_edge`)."""
        if self.stop_reason == EDGE_LOST:
            self.end_around_edge()
            self.out.emit(P.EV_BYE, reason=self.stop_reason)
            return
        super().shutdown()

    def wind_down(self) -> None:
        """End every call, then drop every pjsua2 object (the host destroys the library)."""
        self.end_everything(P.REASON_SHUTDOWN)
        self.pump(SHUTDOWN_PUMP_S, lambda: not self.legs and not self.sessions)
        self.drop_objects()

    def end_around_edge(self) -> None:
        """The edge died: BYE every answered party straight to it (direct_bye), then
        exit without pjsua2's teardown.  pjsua2's own BYEs would follow the route set to
        the dead edge's port, where a restarted daemon may already listen and would see
        BYEs for dialogs it never knew; the process exit frees everything anyway."""
        started = time.monotonic()
        legs = [leg for leg in self.legs if leg.established and not leg.disconnected]
        dialogs = [leg.dialog for leg in legs if leg.dialog is not None and leg.dialog.ready()]
        results = direct_bye.send_byes(dialogs)
        lost = fields(answered=len(legs), byes=len(dialogs), acked=sum(1 for r in results if r >= 200),
                      ms=round((time.monotonic() - started) * 1000))
        sys.stderr.write(f"event=media_edge_lost {lost}\n")
        sys.stderr.flush()

    def drop_objects(self) -> None:
        self.jobs.clear()
        for session in list(self.sessions.values()):
            self.finish_session(session)
        for leg in self.legs:
            leg.session = None
        self.legs.clear()
        if self.acc is not None:
            with contextlib.suppress(pj.Error):
                self.acc.shutdown()
        self.acc = None
        self.null_sink = None

    # -- main-loop chores ------------------------------------------------------------------
    def handle_line(self, line: bytes) -> None:
        try:
            cmd = P.decode(line)
        except ValueError as exc:
            self.out.emit(P.EV_ERROR, where="stdin", message=f"bad command line: {exc}")
            return
        self.handle_command(cmd)

    def handle_command(self, cmd: dict[str, Any]) -> None:
        name = cmd.get("cmd")
        if name == P.CMD_PING:
            self.out.emit(P.EV_PONG, seq=cmd.get("seq"), busy=bool(self.sessions),
                          active=len(self.sessions), calls=self.calls_done)
        elif name == P.CMD_END_ALL:
            self.end_everything(P.REASON_END_ALL)
        elif name == P.CMD_END:
            session = self.sessions.get(str(cmd.get("token") or ""))
            if session is not None:
                self.end_session(session, P.REASON_END_ALL)
        elif name == P.CMD_QUIT:
            self.request_stop(str(cmd.get("reason") or "quit"))
        else:
            self.out.emit(P.EV_ERROR, where="command", message=f"unknown command {name!r}")

    def after_events(self) -> None:
        if self.dirty:
            self.reap()

    def reap(self) -> None:
        """Drop disconnected legs (after libHandleEvents returned, never in a callback)
        and close the session once all its legs are gone."""
        self.dirty = False
        gone = [leg for leg in self.legs if leg.disconnected]
        if not gone:
            return
        self.legs = [leg for leg in self.legs if not leg.disconnected]
        touched: list[Session] = []
        for leg in gone:
            session = leg.session
            if session is not None:
                session.forget(leg)
                if session not in touched:
                    touched.append(session)
            leg.session = None
        del gone
        for session in touched:
            if not session.legs():
                self.finish_session(session)

    def finish_session(self, session: Session) -> None:
        if self.sessions.get(session.token) is not session:
            return
        del self.sessions[session.token]
        self.calls_done += 1
        self.close_machine(session)
        duration = time.monotonic() - session.answered_at if session.answered else 0.0
        for leg in session.legs():
            session.forget(leg)
        self.out.emit(
            P.EV_CALL_ENDED,
            token=session.token,
            reason=session.reason or P.REASON_CALLEE_HANGUP,
            code=session.code,
            duration=round(duration, 3),
        )
        if self.stop_reason is None:
            gc.collect()  # here, on the pj thread, between calls

    # -- call control ----------------------------------------------------------------------
    def answer(self, leg: Leg, code: int, reason: str = "", headers: dict[str, str] | None = None) -> None:
        if leg.disconnected:
            return
        prm = pj.CallOpParam(True)
        prm.statusCode = code
        if reason:
            prm.reason = reason
        if headers:
            prm.txOption.headers = sip_headers(headers)
        leg.answer(prm)

    def hangup(self, leg: Leg | None, code: int = 0, reason: str = "") -> None:
        """BYE (answered), CANCEL (our early B-leg) or a final `code` (unanswered A)."""
        if leg is None or leg.disconnected:
            return
        prm = pj.CallOpParam(True)
        if code:
            prm.statusCode = code
        if reason:
            prm.reason = reason
        try:
            leg.hangup(prm)
        except pj.Error as exc:
            self.out.emit(P.EV_ERROR, where="hangup", leg=leg.name, message=pj_error_text(exc))

    def end_everything(self, reason: str) -> None:
        """Every call ends (end_all, quit): their legs and any stray one."""
        for session in self.sessions.values():
            session.set_reason(reason)
            session.ending = True
        for leg in list(self.legs):
            self.hangup(leg, 503 if not leg.confirmed else 0, "Service Unavailable")
        self.dirty = True

    def end_session(self, session: Session, reason: str) -> None:
        """One call ends (the edge's ``end``); the others go on."""
        session.set_reason(reason)
        session.ending = True
        for leg in list(self.legs):
            if leg.session is session:
                self.hangup(leg, 503 if not leg.confirmed else 0, "Service Unavailable")
        self.dirty = True

    def refuse(self, leg: Leg, code: int, reason: str) -> None:
        leg.name = "refused"
        self.answer(leg, code, reason)

    # -- callbacks (record facts, queue jobs) ----------------------------------------------
    def on_incoming_call(self, acc: WorkerAccount, prm: Any) -> None:
        leg = Leg(self, acc, prm.callId)
        self.legs.append(leg)
        msg = parse_sip(str(prm.rdata.wholeMsg))
        source = str(prm.rdata.srcAddress)
        if isinstance(msg, Request):
            leg.dialog = direct_bye.incoming(msg)
        self.later(lambda: self.route_incoming(leg, msg, source))

    def route_incoming(self, leg: Leg, msg: Request | Response | None, source: str) -> None:
        if leg.disconnected:
            return
        if not isinstance(msg, Request):
            self.refuse(leg, 400, "Unreadable INVITE")
            return
        if self.edge_host not in ("", "0.0.0.0", "::") and host_of(source) != self.edge_host:
            self.refuse(leg, 403, "Not From Edge")
            return
        if self.stop_reason is not None:
            self.refuse(leg, 503, "Shutting Down")
            return
        token = (msg.get(P.HDR_TOKEN) or "").strip()
        if (msg.get(P.HDR_PLAY) or "").strip() == P.PLAY_CONFIRM:
            self.play_confirm(leg, token, msg)
            return
        if msg.get(P.HDR_MAILBOX) is not None:
            self.open_mailbox(leg, token, msg)
            return
        if (msg.get(P.HDR_PICKUP) or "").strip() == "1":
            self.pickup(leg, token, msg)
        elif (msg.get(P.HDR_JOIN) or "").strip() == "1":
            self.join(leg, token, msg)
        else:
            self.start_session(leg, token, msg)

    def free_for(self, leg: Leg, token: str) -> bool:
        """A new call may start here: else refused, 486 while `capacity` calls are up (or
        one with this token), 400 without a token."""
        if len(self.sessions) >= self.capacity or token in self.sessions:
            self.refuse(leg, 486, "Busy Here")
            return False
        if not token:
            self.refuse(leg, 400, f"Missing {P.HDR_TOKEN}")
            return False
        return True

    def begin_session(self, a: Leg, token: str, msg: Request, caller: str, target: str,
                      shown_target: str | None = None) -> Session:
        """`a`'s call becomes one of this worker's sessions: its A-leg, its offer's codecs first,
        told to the edge (`call_started`; `shown_target` names a call with no B-leg)."""
        a.name = P.LEG_A
        a.remote = strip_tag(msg.get("From") or "")
        session = Session(token=token, caller=caller, target=target, a=a,
                          codecs=offered_codecs(msg.body.decode("utf-8", "replace")))
        a.session = session
        self.sessions[token] = session
        self.set_codec_order(session.codecs)
        self.out.emit(P.EV_CALL_STARTED, token=token, call_id=msg.get("Call-ID"), caller=caller,
                      target=target if shown_target is None else shown_target)
        return session

    def start_session(self, a: Leg, token: str, msg: Request) -> None:
        if not self.free_for(a, token):
            return
        dialled = msg.uri.split(":", 1)[-1].split("@", 1)[0] if "@" in msg.uri else ""
        target = (msg.get(P.HDR_TARGET) or "").strip() or f"sip:{dialled}@{self.args.edge}"
        caller = (msg.get(P.HDR_CALLER) or "").strip() or strip_tag(msg.get("From") or "")
        session = self.begin_session(a, token, msg, caller, target)
        assert self.acc is not None
        b = Leg(self, self.acc)
        b.name = P.LEG_B
        b.session = session
        session.b = b
        self.legs.append(b)
        prm = pj.CallOpParam(True)
        if caller:
            prm.txOption.localUri = caller
        prm.txOption.headers = sip_headers({P.HDR_TOKEN: token})
        try:
            b.makeCall(target, prm)
        except pj.Error as exc:
            b.disconnected = True
            self.out.emit(P.EV_ERROR, where="makeCall", target=target, message=pj_error_text(exc))
            session.set_reason(P.REASON_ERROR, 500)
            session.ending = True
            self.answer(a, 500, "B-leg Failed")
            self.dirty = True

    # -- confirmation beeps (a feature code applied) ------------------------------------------
    def play_confirm(self, leg: Leg, token: str, msg: Request) -> None:
        """Answer, beep CONFIRM_BEEPS times, hang up: the handset hears its code was applied."""
        if not self.free_for(leg, token):
            return
        self.begin_session(leg, token, msg, "", "", shown_target="confirm")
        self.answer(leg, 200, headers={P.HDR_TOKEN: token})
        self.after(0.1, lambda: self.confirm_beeps(leg, 30))

    def confirm_beeps(self, leg: Leg, tries: int) -> None:
        """Once the leg's audio is up (re-checked every 100 ms, `tries` times): the beeps, then BYE."""
        if leg.disconnected:
            return
        port = leg.port
        if port is None:
            if tries > 0:
                self.after(0.1, lambda: self.confirm_beeps(leg, tries - 1))
            else:
                self.hangup(leg)
            return
        gen = pj.ToneGenerator()
        gen.createToneGenerator(16000, 1)
        tones = pj.ToneDescVector()
        for _ in range(P.CONFIRM_BEEPS):
            desc = pj.ToneDesc()
            desc.freq1 = desc.freq2 = P.CONFIRM_TONE_HZ
            desc.on_msec, desc.off_msec = 200, 100
            tones.append(desc)
        gen.play(tones, False)
        gen.startTransmit(port)

        def done() -> None:
            with contextlib.suppress(pj.Error):
                gen.stopTransmit(port)
            self.hangup(leg)

        self.after(0.3 * P.CONFIRM_BEEPS + 0.2, done)

    def join(self, leg: Leg, token: str, msg: Request) -> None:
        session = self.sessions.get(token) if token else None
        if session is None:
            self.refuse(leg, 481, "No Such Call Here")
            return
        live = [x for x in session.legs() if x.alive()]
        if not session.answered or session.ending or len(live) >= P.MAX_LEGS:
            self.refuse(leg, 486, "Busy Here")
            return
        session.join_seq += 1
        leg.name = f"{P.JOIN_LEG_PREFIX}{session.join_seq}"
        leg.remote = strip_tag(msg.get("From") or "")
        leg.session = session
        session.joiners.append(leg)
        self.answer(leg, 200, headers={P.HDR_TOKEN: token})

    def pickup(self, leg: Leg, token: str, msg: Request) -> None:
        """Another device picks the ringing call up: answer it and A, bridge them (when
        the picker's leg is confirmed, as for a joiner), CANCEL the ringing B-leg."""
        session = self.sessions.get(token) if token else None
        if session is None:
            self.refuse(leg, 481, "No Such Call Here")
            return
        a = session.a
        if session.answered or session.ending or a is None or not a.alive():
            self.refuse(leg, 481, "Call Not Ringing")
            return
        session.answered = True
        session.answered_at = time.monotonic()
        session.join_seq += 1
        leg.name = f"p{session.join_seq}"
        leg.remote = strip_tag(msg.get("From") or "")
        leg.session = session
        session.joiners.append(leg)
        self.answer(leg, 200, headers={P.HDR_TOKEN: token})
        self.answer(a, 200, headers={P.HDR_TOKEN: token, P.HDR_PAI: leg.remote})
        self.hangup(session.b)  # CANCEL: the edge's fork cancels the ringing devices
        self.out.emit(P.EV_CALL_ANSWERED, token=token, answered_by=leg.remote, picked_up=True,
                      codecs={P.LEG_A: a.codec(), leg.name: leg.codec()})

    def on_call_state(self, leg: Leg, prm: Any) -> None:
        info = leg.getInfo()
        state = info.state
        code = int(info.lastStatusCode)
        reason = str(info.lastReason)
        if state in (pj.PJSIP_INV_STATE_EARLY, pj.PJSIP_INV_STATE_CONNECTING,
                     pj.PJSIP_INV_STATE_CONFIRMED) and self.dialog_incomplete(leg, code):
            self.note_dialog(leg, rx_message(prm.e) or tx_message(prm.e))
        if state == pj.PJSIP_INV_STATE_DISCONNECTED and leg.name == P.LEG_B and not leg.established:
            self.note_voicemail(leg, rx_message(prm.e))  # only a final answer to the INVITE says so
        if state in (pj.PJSIP_INV_STATE_CONNECTING, pj.PJSIP_INV_STATE_CONFIRMED):
            leg.established = True
        if state == pj.PJSIP_INV_STATE_DISCONNECTED:
            leg.disconnected = True
            leg.port = None  # pjsua destroys the stream
            leg.code = code
            leg.reason = reason
            self.dirty = True
        elif state == pj.PJSIP_INV_STATE_CONFIRMED:
            leg.confirmed = True
        session = leg.session
        if session is not None:
            self.later(lambda: self.leg_state(session, leg, state, code, reason))

    @staticmethod
    def placed_by_us(leg: Leg) -> bool:
        return leg.name == P.LEG_B or leg.name.startswith(P.TRANSFER_LEG_PREFIX)

    def dialog_incomplete(self, leg: Leg, code: int) -> bool:
        """:meth:`note_dialog` has something left to learn from the state's message `code`
        (else the message is not parsed: a leg changes state four times, and a parse is a
        good part of a state's cost).  A leg we placed learns only from a 2xx."""
        if self.placed_by_us(leg):
            return 200 <= code < 300 and (not leg.identity or leg.dialog is None)
        return leg.dialog is not None and not leg.dialog.local_tagged

    def note_dialog(self, leg: Leg, msg: Request | Response | None) -> None:
        """Keep what a direct BYE needs: the B-leg's 2xx (tags, the callee's Contact);
        on a leg we answered, our tag from the 18x/2xx we sent or the ACK we got."""
        if self.placed_by_us(leg):
            if isinstance(msg, Response) and 200 <= msg.status < 300:
                if not leg.identity:
                    leg.identity = msg.get(P.HDR_PAI) or strip_tag(msg.get("To") or "")
                if leg.dialog is None:
                    leg.dialog = direct_bye.outgoing(msg)
        elif msg is not None and leg.dialog is not None:
            direct_bye.learn_local_tag(leg.dialog, msg)

    def leg_state(self, s: Session, leg: Leg, state: int, code: int, reason: str) -> None:
        if leg.session is not s:
            return
        if leg is s.transfer:
            self.transfer_state(s, leg, state, code)
        elif leg is s.b:
            self.b_state(s, leg, state, code, reason)
        elif leg is s.a:
            if state == pj.PJSIP_INV_STATE_DISCONNECTED and self.transferor_left(s, leg):
                return
            if state == pj.PJSIP_INV_STATE_DISCONNECTED:
                if s.answered:
                    self.out.emit(P.EV_LEG_LEFT, token=s.token, leg=leg.name, code=code)
                    s.set_reason(P.REASON_CALLER_HANGUP)
                else:
                    s.set_reason(P.REASON_CANCELLED, code)
                s.ending = True
                for other in s.legs():
                    self.hangup(other)
        elif state == pj.PJSIP_INV_STATE_CONFIRMED:
            self.out.emit(P.EV_LEG_JOINED, token=s.token, leg=leg.name, **{"from": leg.remote})
            self.connect_bridge(s)
        elif state == pj.PJSIP_INV_STATE_DISCONNECTED:
            if leg.confirmed:
                self.out.emit(P.EV_LEG_LEFT, token=s.token, leg=leg.name, code=code)
            self.party_left(s)

    def b_state(self, s: Session, b: Leg, state: int, code: int, reason: str) -> None:
        a = s.a
        if a is None:
            if state == pj.PJSIP_INV_STATE_DISCONNECTED:
                self.party_left(s)
            else:
                self.hangup(b)
            return
        if state == pj.PJSIP_INV_STATE_EARLY:
            if not s.ringing_sent and a.alive() and not s.ending:
                s.ringing_sent = True
                self.answer(a, 180, headers={P.HDR_TOKEN: s.token})
                self.out.emit(P.EV_CALL_RINGING, token=s.token, code=code)
        elif state == pj.PJSIP_INV_STATE_CONFIRMED:
            if s.answered:
                return
            if not a.alive() or s.ending:
                self.hangup(b)
                return
            s.answered = True
            s.answered_at = time.monotonic()
            headers = {P.HDR_TOKEN: s.token}
            if b.identity:
                headers[P.HDR_PAI] = b.identity
            self.answer(a, 200, headers=headers)
            self.connect_bridge(s)
            self.out.emit(
                P.EV_CALL_ANSWERED,
                token=s.token,
                answered_by=b.identity,
                codecs={P.LEG_A: a.codec(), P.LEG_B: b.codec()},
            )
        elif state == pj.PJSIP_INV_STATE_DISCONNECTED:
            if not s.answered:
                if b.voicemail is not None and a.alive() and not s.ending and self.args.voicemail_dir:
                    self.start_voicemail(s, a, *b.voicemail)
                    return
                if a.alive():
                    final = code if 300 <= code <= 699 else 500
                    phrase = reason if 300 <= code <= 699 else "B-leg Failed"
                    s.set_reason(P.REASON_REJECTED, final)
                    s.ending = True
                    self.answer(a, final, phrase, headers={P.HDR_TOKEN: s.token})
                return
            if b.confirmed:
                self.out.emit(P.EV_LEG_LEFT, token=s.token, leg=b.name, code=code)
            self.party_left(s)

    def party_left(self, s: Session) -> None:
        """A party hung up.  With only a ringing transfer target left (the caller left for
        it, maybe not reaped yet when both hang-ups came in one poll) the call ends;
        with the caller alone, too."""
        t = s.transfer
        if t is not None and not s.ending and not any(leg.alive() for leg in s.legs() if leg is not t):
            self.nobody_left(s)
        else:
            self.check_alone(s)

    def nobody_left(self, s: Session) -> None:
        """A transfer's parties are gone: the call ends, every leg still there is hung up."""
        s.set_reason(P.REASON_CALLEE_HANGUP)
        s.ending = True
        for other in s.legs():
            self.hangup(other)

    def check_alone(self, s: Session) -> None:
        """A with nobody else left is hung up: the call is over."""
        if s.a is not None and s.a.alive() and not any(leg.alive() for leg in s.legs() if leg is not s.a):
            s.set_reason(P.REASON_CALLEE_HANGUP)
            s.ending = True
            self.hangup(s.a)

    def on_call_media_state(self, leg: Leg) -> None:
        leg.port = leg.audio_media()
        leg.port_id = leg.port.getPortId() if leg.port is not None else -1
        session = leg.session
        if session is not None:
            # A re-INVITE may have re-created the stream (and its bridge port, maybe
            # under the same port number): forget this leg's links and connect anew.
            session.links = {k for k in session.links if leg.name not in (k[0], k[2])}
            if leg.media_active:
                self.later(lambda: self.connect_bridge(session))
                if session.machine is not None and leg is session.a:
                    self.later(lambda: self.machine_media(session, leg))

    def connect_bridge(self, s: Session) -> None:
        """Everyone hears everyone else (not themselves): both directions of every pair
        of answered legs with active audio.  Re-running it is harmless."""
        ports = [leg for leg in s.legs()
                 if leg.port is not None and leg.alive() and (leg.confirmed or (leg is s.a and s.answered))]
        for source in ports:
            src_name, src = source.name, source.port
            for listener in ports:
                key = (src_name, source.port_id, listener.name, listener.port_id)
                if listener.name != src_name and key not in s.links:
                    src.startTransmit(listener.port)
                    s.links.add(key)
            # Every stream also feeds the null sound device (port 0), so the bridge reads
            # it on every tick even while nobody else listens (the other party on hold).
            # The bridge skips a port without listeners: its jitter buffer would fill
            # with what its party keeps sending, and after the resume play that backlog
            # late, shedding frames for seconds (a tone heard at -20 dB).
            if self.null_sink is None:
                self.null_sink = self.ep.audDevManager().getPlaybackDevMedia()
            key = (src_name, source.port_id, NULL_SINK, 0)
            if key not in s.links:
                src.startTransmit(self.null_sink)
                s.links.add(key)

    def on_dtmf(self, leg: Leg, digit: str) -> None:
        session = leg.session
        if session is not None and session.machine is not None:
            machine = session.machine
            self.later(lambda: self.guard("machine", machine.on_digit, digit))
        elif session is not None:
            self.later(lambda: self.relay_dtmf(session, leg, digit))

    def relay_dtmf(self, s: Session, source: Leg, digit: str) -> None:
        """RFC 4733 in on one leg, RFC 4733 out on every other answered leg (SIP INFO
        when the other side did not negotiate telephone-event)."""
        for leg in s.legs():
            if leg is source or not leg.alive() or not leg.media_active:
                continue
            try:
                leg.dialDtmf(digit)
            except pj.Error:
                prm = pj.CallSendDtmfParam()
                prm.method = pj.PJSUA_DTMF_METHOD_SIP_INFO
                prm.digits = digit
                with contextlib.suppress(pj.Error):
                    leg.sendDtmf(prm)

    # -- answering machine and mailbox menu (appliance.media.answering) ------------------------
    def note_voicemail(self, b: Leg, msg: Request | Response | None) -> None:
        """The edge's final answer to the B-leg sends the call to an answering machine."""
        if not isinstance(msg, Response) or msg.status < 300:
            return
        number = (msg.get(P.HDR_VOICEMAIL) or "").strip()
        if not number.isdigit():
            return
        try:
            longest = int(msg.get(P.HDR_VOICEMAIL_MAX) or P.VOICEMAIL_MAX_S)
        except ValueError:
            longest = P.VOICEMAIL_MAX_S
        b.voicemail = (number, max(1, longest))

    def start_voicemail(self, s: Session, a: Leg, number: str, longest: int) -> None:
        """Answer A for `number`'s answering machine: greeting, beep, record (answering.py)."""
        try:
            s.machine = answering.AnsweringMachine(self, Path(self.args.voicemail_dir), s.token, number,
                                                   s.caller, a, longest)
        except Exception as exc:  # the store unreadable: the caller gets the failure as before
            self.out.emit(P.EV_ERROR, where="voicemail", message=str(exc))
            s.set_reason(P.REASON_REJECTED, 480)
            s.ending = True
            self.answer(a, 480, "Temporarily Unavailable", headers={P.HDR_TOKEN: s.token})
            return
        s.answered = True
        s.answered_at = time.monotonic()
        self.answer(a, 200, headers={P.HDR_TOKEN: s.token})
        self.out.emit(P.EV_CALL_ANSWERED, token=s.token, answered_by=f"voicemail:{number}",
                      codecs={P.LEG_A: a.codec()})
        self.after(0.1, lambda: self.machine_media(s, a))

    def open_mailbox(self, leg: Leg, token: str, msg: Request) -> None:
        """The mailbox code: answer at once, then the menu (answering.py)."""
        if len(self.sessions) >= self.capacity or token in self.sessions:
            self.refuse(leg, 486, "Busy Here")
            return
        number = (msg.get(P.HDR_MAILBOX) or "").strip()
        if not token or not number.isdigit() or not self.args.voicemail_dir:
            self.refuse(leg, 400 if not token else 404, "No Mailbox Here")
            return
        try:
            menu = answering.MailboxMenu(self, Path(self.args.voicemail_dir), number, leg)
        except Exception as exc:
            self.out.emit(P.EV_ERROR, where="mailbox", message=str(exc))
            self.refuse(leg, 500, "Mailbox Unreadable")
            return
        session = self.begin_session(leg, token, msg, "", "", shown_target="mailbox")
        session.machine = menu
        session.answered = True
        session.answered_at = time.monotonic()
        self.answer(leg, 200, headers={P.HDR_TOKEN: token})
        self.after(0.1, lambda: self.machine_media(session, leg))

    def machine_media(self, s: Session, leg: Leg) -> None:
        """Once A's audio is up, the machine starts (harmless to call again)."""
        machine = s.machine
        if machine is None or leg.session is not s or leg.disconnected:
            return
        port = leg.port
        if port is not None:
            self.guard("machine", machine.media_ready, port)

    def close_machine(self, s: Session) -> None:
        machine, s.machine = s.machine, None
        if machine is not None:
            self.guard("machine", machine.close)

    def emit(self, event: str, **fields: Any) -> None:
        self.out.emit(event, **fields)

    def hang_up(self, leg: Any) -> None:
        """The answering machine's longest message is reached: BYE the caller."""
        s = leg.session if isinstance(leg, Leg) else None
        if s is not None:
            s.set_reason(P.REASON_CALLEE_HANGUP)
        self.hangup(leg)

    # -- transfer (REFER) and Replaces -------------------------------------------------------
    def on_transfer_request(self, x: Leg, prm: Any) -> None:
        """A REFER on leg `x` (in a callback): take it on a Leg of our own, or refuse it.
        pjsua answers 202, sends the INVITE to the Refer-To (which the edge wrote: see
        the protocol's "Transfer") and NOTIFYs `x` of its progress."""
        s = x.session
        if s is None or x not in s.legs() or not s.answered or s.ending or not x.confirmed:
            prm.statusCode = 603
            return
        if s.transfer is not None:
            prm.statusCode = 491  # one transfer at a time
            return
        assert self.acc is not None
        # The codec order is the endpoint's, last set by whichever call began last: the
        # transfer INVITE pjsua sends after this callback leads with this call's codecs.
        # (Only the codec manager's priorities change here, no call or dialog.)
        self.set_codec_order(s.codecs)
        s.transfer_seq += 1
        t = Leg(self, self.acc)
        t.name = f"{P.TRANSFER_LEG_PREFIX}{s.transfer_seq}"
        t.session = s
        t.stands_for = x
        t.remote = str(prm.dstUri)
        s.transfer = t
        self.legs.append(t)
        prm.newCall = t
        prm.statusCode = 202
        self.out.emit(P.EV_TRANSFER, token=s.token, leg=x.name, new_leg=t.name, target=str(prm.dstUri))

    def on_replace_request(self, old: Leg, prm: Any) -> None:
        """An INVITE with Replaces naming leg `old` (in a callback): answered on a Leg of ours."""
        s = old.session
        if s is None or old not in s.legs() or not s.answered or s.ending:
            prm.statusCode = 481
            return
        if s.transfer is not None:
            prm.statusCode = 486
            return
        assert self.acc is not None
        s.transfer_seq += 1
        r = Leg(self, self.acc)
        r.name = f"{P.REPLACING_LEG_PREFIX}{s.transfer_seq}"
        r.session = s
        r.stands_for = old
        msg = parse_sip(str(prm.rdata.wholeMsg))
        if isinstance(msg, Request):
            r.dialog = direct_bye.incoming(msg)
        s.transfer = r
        self.legs.append(r)
        prm.newCall = r
        prm.statusCode = 200
        self.out.emit(P.EV_TRANSFER, token=s.token, leg=old.name, new_leg=r.name, target="replaces")

    def on_replaced(self, old: Leg, prm: Any) -> None:
        """pjsua replaced `old` with the new call; the new leg's CONFIRMED state does the work."""
        new = prm.newCall
        if not isinstance(new, Leg) or new.stands_for is not old:
            self.out.emit(P.EV_ERROR, where="onCallReplaced", leg=old.name, message="unexpected new call")

    def transferor_left(self, s: Session, leg: Leg) -> bool:
        """The leg a transfer runs for hung up before the target answered: the call waits
        for the target (a phone may hang up right after the REFER's 202)."""
        t = s.transfer
        if t is None or t.stands_for is not leg or not t.alive():
            return False
        self.out.emit(P.EV_LEG_LEFT, token=s.token, leg=leg.name, code=0)
        return True

    def transfer_state(self, s: Session, t: Leg, state: int, code: int) -> None:
        x = t.stands_for  # None: it hung up and is reaped already
        if state == pj.PJSIP_INV_STATE_CONFIRMED:
            s.transfer = None
            if s.ending:
                self.hangup(t)
                return
            name = x.name if x is not None else s.vacated
            self.take_place(s, x, t)
            self.out.emit(P.EV_TRANSFERRED, token=s.token, leg=name, new_leg=t.name, remote=t.identity or t.remote)
            self.connect_bridge(s)
            self.check_alone(s)  # the other party may have hung up as the target answered
            if x is not None:
                # Weakly: a Leg kept past its reaping could outlive the reuse of its call id.
                released = weakref.ref(x)
                self.after(P.TRANSFER_RELEASE_S, lambda: self.hangup(released()))
        elif state == pj.PJSIP_INV_STATE_DISCONNECTED:
            s.transfer = None
            s.vacated = ""
            self.out.emit(P.EV_TRANSFER_FAILED, token=s.token, leg=x.name if x else "", code=code)
            if (x is None or not x.alive()) and not s.ending:
                # The transferring party is gone too: nobody is left for the other side.
                self.nobody_left(s)
            else:
                self.check_alone(s)

    def take_place(self, s: Session, x: Leg | None, new: Leg) -> None:
        """`new` takes the role of `x` in the session; `x` leaves the bridge and the session
        (so its hang-up no longer counts as a party leaving)."""
        if x is not None and s.a is x:
            s.a = new
        elif x is not None and s.b is x:
            s.b = new
        elif x is not None and x in s.joiners:
            s.joiners[s.joiners.index(x)] = new
        elif s.vacated == "a" and s.a is None:  # `x` is gone and reaped already
            s.a = new
        elif s.vacated == "b" and s.b is None:
            s.b = new
        else:
            s.joiners.append(new)
        s.vacated = ""
        new.stands_for = None
        new.confirmed = True
        if x is None:
            return
        port = x.port
        if port is not None:
            for other in s.legs():
                theirs = other.port if other is not x else None
                if theirs is not None:
                    with contextlib.suppress(pj.Error):
                        port.stopTransmit(theirs)
                    with contextlib.suppress(pj.Error):
                        theirs.stopTransmit(port)
        s.links = {k for k in s.links if x.name not in (k[0], k[2])}
        x.session = None
        x.name = f"{x.name}-released"


def rx_message(e: Any) -> Request | Response | None:
    """The message received with a SipEvent, parsed, or None."""
    try:
        if e.type == pj.PJSIP_EVENT_TSX_STATE and e.body.tsxState.type == pj.PJSIP_EVENT_RX_MSG:
            return parse_sip(str(e.body.tsxState.src.rdata.wholeMsg))
        if e.type == pj.PJSIP_EVENT_RX_MSG:
            return parse_sip(str(e.body.rxMsg.rdata.wholeMsg))
    except Exception:
        pass
    return None


def tx_message(e: Any) -> Request | Response | None:
    """The message sent with a SipEvent (a response pjsua2 sent for us), parsed, or None."""
    try:
        if e.type == pj.PJSIP_EVENT_TSX_STATE and e.body.tsxState.type == pj.PJSIP_EVENT_TX_MSG:
            return parse_sip(str(e.body.tsxState.src.tdata.wholeMsg))
    except Exception:
        pass
    return None


# ------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sip-port", type=int, default=0, help="UDP port on 127.0.0.1; 0 = ephemeral")
    parser.add_argument("--rtp-ports", required=True, help="LOW-HIGH: RTP/RTCP ports of this worker only")
    parser.add_argument(
        "--rtp-address",
        default=P.LOOPBACK,
        help="IPv4 address RTP is bound to (0.0.0.0: every address, SDP then names 127.0.0.1)",
    )
    parser.add_argument("--edge", required=True, help="HOST:PORT of the edge (B-leg next hop)")
    parser.add_argument("--log-level", type=int, default=1, help="pjsua log level to stderr (4 shows SIP)")
    parser.add_argument("--clock-rate", type=int, default=16000, help="conference bridge rate (Hz)")
    parser.add_argument(
        "--quality",
        type=int,
        default=2,
        help="pjmedia quality: 1-2 linear resampler (cheapest; exact for 8 kHz legs on the 16 kHz bridge),"
        " 3-4 small filter, 5-10 large filter",
    )
    parser.add_argument("--media-thread", action=argparse.BooleanOptionalAction, default=True,
                        help="RTP on pjmedia's own thread (default); --no-media-thread: on the main loop's ioqueue")
    parser.add_argument("--calls", type=int, default=1,
                        help="calls taken at once (cut to what the build's PJSUA_MAX_CALLS holds, 4 pjsua calls each)")
    parser.add_argument("--voicemail-dir", default="",
                        help="the mailbox store's root (<state_dir>/voicemail); empty: no answering machine")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--zygote"]:
        return zygote_main(_probe_arg(raw[1:]))
    if raw[:1] == ["--probe-calls"]:
        # Exec'd pools (no zygote): the build's calls per process, one JSON line.
        wanted = _probe_arg(raw)
        sys.stdout.write(json.dumps({"event": P.EV_CAPACITY, "calls": probe_in_child(wanted)}) + "\n")
        sys.stdout.flush()
        os._exit(0)
    args = parse_args(raw)
    # Blocked in every thread (pjsua's included, they inherit the mask): taken by the
    # host's signal thread only.
    block_signals()
    gc.disable()
    # Keep fd 1 for JSON only: anything native code prints goes to stderr.
    out = private_stdout(batched=True)  # flushed once per pass of the loop (PjHost.run)
    worker = Worker(args, out)
    try:
        worker.start()
    except Exception as exc:
        out.emit(P.EV_ERROR, where="start", message=pj_error_text(exc))
        out.emit(P.EV_BYE, reason="start failed")
        out.flush()
        sys.stderr.flush()
        os._exit(1)
    # What start() made lives as long as the worker: out of the collection each call's end
    # runs (as the zygote's objects are), which then only walks what calls left behind.
    gc.collect()
    gc.freeze()
    code = worker.run()
    sys.stderr.flush()
    # Skip interpreter teardown: SWIG finalisers after libDestroy are not safe.
    os._exit(code)


# ------------------------------------------------------------------------------------------
# zygote: a fork server, so workers share the ~13 MB of imported pjsua2 bindings


def _probe_arg(args: list[str]) -> int:
    """``--probe-calls N`` -> N (0: not asked)."""
    if args[:1] == ["--probe-calls"] and len(args) > 1 and args[1].isdigit():
        return int(args[1])
    return 0


def probe_in_child(wanted: int) -> int:
    """:func:`probe_calls` in a forked child, so this process creates no pjsua2 endpoint
    (nor its threads) and stays safe to fork; 1 if the probe fails."""
    if wanted <= 1:
        return 1
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.write(write_end, str(probe_calls(wanted)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return int(answer) if answer.isdigit() else 1


def zygote_main(probe: int = 0) -> int:
    """``python -m appliance.media.worker --zygote [--probe-calls N]``, stdin a SOCK_SEQPACKET socket.

    Each message on stdin is ``{"cmd": "spawn", "id": N, "argv": [...]}`` carrying one
    file descriptor (SCM_RIGHTS): the new worker's channel, a stream socket that becomes
    its stdin and stdout.  The zygote forks, the child runs :func:`main` with `argv`,
    and the zygote reports ``{"event": "spawned", "id": N, "pid": P}`` and, when a child
    exits, ``{"event": "exited", "pid": P, "rc": RC}`` (negative for a signal) on stdout.
    EOF on stdin ends the zygote; its workers live on until their own channels close.
    With ``--probe-calls N`` its ``ready`` says how many calls (at most N) a worker of
    this build takes (``calls``, :func:`probe_in_child`), before any worker starts.

    Why: a worker exec'd from scratch holds ~14 MB private (most of it the SWIG bindings'
    Python objects); forked from here after ``gc.freeze()`` it shares them, which halves
    the PSS of a pool with 8 calls and skips ~50 ms of start-up.  Nothing here has
    created a pjsua2 Endpoint or a thread, so forking is safe.
    """
    import selectors

    ctl = socket.socket(fileno=os.dup(0))
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    gc.collect()
    gc.freeze()  # the children's gc.collect() then never touches (and copies) these pages

    def emit(**fields: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            out.write(json.dumps(fields) + "\n")
            out.flush()

    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    if probe:
        emit(event=P.EV_READY, pid=os.getpid(), calls=probe_in_child(probe))
    else:
        emit(event=P.EV_READY, pid=os.getpid())
    while True:
        for key, _ in sel.select():
            if key.fileobj is not ctl:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
                continue
            msg, fds, _, _ = socket.recv_fds(ctl, 65536, 1)
            if not msg:
                return 0
            try:
                req = P.decode(msg)
                argv = [str(a) for a in req["argv"]]
            except (ValueError, KeyError, TypeError):
                req, argv = {}, []
            if not fds or not argv:
                for fd in fds:
                    os.close(fd)
                emit(event=P.EV_ERROR, message="bad spawn request")
                continue
            pid = os.fork()
            if pid == 0:
                _zygote_child(fds[0], argv)
            os.close(fds[0])
            emit(event="spawned", id=req.get("id"), pid=pid)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            emit(event="exited", pid=pid, rc=os.waitstatus_to_exitcode(status))


def _zygote_child(channel: int, argv: list[str]) -> None:
    """In the forked child: the channel becomes stdin and stdout, every other inherited
    descriptor is closed, signal state is the default, then the worker runs."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(channel, 0)
        os.dup2(channel, 1)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        main(argv)
    finally:
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
