"""Handset agent: one real pjsua2 SIP user agent, steered over JSON lines.

Run as ``python -m appliance.simulator.agent``.  Commands arrive on stdin, one
JSON object per line; everything that happens is reported on stdout as JSON
events, one per line.  The parent side lives in :mod:`.handset`.

The endpoint, the main loop, stdin, signals and shutdown are the shared pjsua2
host's (:class:`appliance.pjhost.PjHost`): pjsua2 only ever runs on the main
thread, which sleeps in ``libHandleEvents`` until SIP, RTP, the next timer
(delayed answers, reaping, recordings being finalised) or a command wakes it.
RTP shares the SIP ioqueue, as in the media worker.  An idle registered handset
costs ~0.015 % of a core, where its old 10 ms polling loop took 1.2 % (figures
in :mod:`appliance.pjhost`).  Every ``Call`` is strongly referenced until it is
disconnected and dropped on a later loop pass, because pjsua2 aborts the process
when a call object dies at the wrong time.

Commands (any may carry "id"; call_created, media_stopped, pong and error
echo it): register, unregister, set_registration, call, answer, hangup,
hangup_all, hold, unhold, transfer, transfer_mode, auto_answer, play_tone,
record, stop_media, dtmf, calls, ping, quit.  Events: ready, reg_state,
call_created, incoming_call, call_state, call_request, media, dtmf,
media_stopped, recorded, transfer_request, transfer_status, replace_request,
call_replaced, sip (with --trace), error, bye.

``play_tone`` with ``monitor`` also records the tone itself (the level the handset
sends); ``stop_media`` names that file in ``monitor`` and reports it ``recorded`` too.
G.722 runs at the standard level of real phones (:func:`appliance.pjhost.set_g722_pcm_shift`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pjsua2 as pj

from appliance.jsonlines import Emitter, private_stdout
from appliance.pjerrors import pj_error_text
from appliance.pjhost import LogWriter, PjHost, block_signals, set_g722_pcm_shift

LOOPBACK = "127.0.0.1"
REAP_DELAY_S = 0.01
"""A disconnected call is dropped on a loop pass at least this much later."""
RECORDING_POLL_S = 0.01
"""How often a stopped recording is checked for its finished WAV header."""
DEFAULT_CODECS = "PCMU,PCMA,G722"

_STATE_NAMES = {
    pj.PJSIP_INV_STATE_NULL: "NULL",
    pj.PJSIP_INV_STATE_CALLING: "CALLING",
    pj.PJSIP_INV_STATE_INCOMING: "INCOMING",
    pj.PJSIP_INV_STATE_EARLY: "EARLY",
    pj.PJSIP_INV_STATE_CONNECTING: "CONNECTING",
    pj.PJSIP_INV_STATE_CONFIRMED: "CONFIRMED",
    pj.PJSIP_INV_STATE_DISCONNECTED: "DISCONNECTED",
}
_MEDIA_STATUS = {
    pj.PJSUA_CALL_MEDIA_NONE: "none",
    pj.PJSUA_CALL_MEDIA_ACTIVE: "active",
    pj.PJSUA_CALL_MEDIA_LOCAL_HOLD: "local_hold",
    pj.PJSUA_CALL_MEDIA_REMOTE_HOLD: "remote_hold",
    pj.PJSUA_CALL_MEDIA_ERROR: "error",
}
# RFC 3261 compact header forms, so parsed headers use one spelling.
_COMPACT = {
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    "o": "Event",
    "r": "Refer-To",
    "b": "Referred-By",
    "x": "Session-Expires",
    "u": "Allow-Events",
}
_LOG_MSG_RE = re.compile(
    r"(RX|TX) (\d+) bytes (.*?) (?:from|to) (\S+) (\S+):\r?\n(.*)\n--end msg--", re.DOTALL
)
_TAG_RE = re.compile(r";\s*tag=([^;>\s,]+)", re.IGNORECASE)


# --------------------------------------------------------------------------
# output


# --------------------------------------------------------------------------
# SIP text helpers (we only ever see whole messages as text in pjsua2)


def parse_sip(text: str) -> tuple[str, dict[str, str]]:
    """Return (start line, headers) of a SIP message; repeated headers are
    joined with ', ' and compact names expanded.  Deliberately not the PBX's own
    parser: the handset checks what the PBX put on the wire, so it must not share
    the PBX's reading of it."""
    head = text.split("\r\n\r\n", 1)[0].split("\n\n", 1)[0]
    lines = head.replace("\r\n", "\n").split("\n")
    start = lines[0].strip() if lines else ""
    unfolded: list[str] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and unfolded:
            unfolded[-1] += " " + line.strip()
        elif line.strip():
            unfolded.append(line)
    headers: dict[str, str] = {}
    for line in unfolded:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name = name.strip()
        name = _COMPACT.get(name.lower(), name) if len(name) == 1 else name
        value = value.strip()
        existing = next((k for k in headers if k.lower() == name.lower()), None)
        if existing is None:
            headers[name] = value
        else:
            headers[existing] += ", " + value
    return start, headers


def header(headers: dict[str, str], name: str) -> str | None:
    """Case-insensitive header lookup."""
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def header_tag(value: str | None) -> str | None:
    if not value:
        return None
    match = _TAG_RE.search(value)
    return match.group(1) if match else None


def wav_complete(path: str) -> bool:
    """True when the WAV header's sizes agree with the file (pjmedia patches
    the header when the writer port is finally destroyed)."""
    try:
        with open(path, "rb") as f:
            head = f.read(44)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 44 or head[:4] != b"RIFF":
        return False
    riff_size = struct.unpack("<I", head[4:8])[0]
    return bool(riff_size == size - 8)


# --------------------------------------------------------------------------
# pjsua2 subclasses


class AgentLogWriter(LogWriter):
    """Routes pjsua logs to stderr and, with tracing, SIP messages to events."""

    def __init__(self, agent: Agent, level: int, trace: bool) -> None:
        super().__init__(level)
        self.agent = agent
        self.trace = trace

    def log(self, entry: Any) -> None:
        msg = str(entry.msg)
        if self.trace and ("RX " in msg or "TX " in msg) and "--end msg--" in msg:
            match = _LOG_MSG_RE.search(msg)
            if match:
                self.agent.out.emit(
                    "sip",
                    dir=match.group(1).lower(),
                    transport=match.group(4),
                    peer=match.group(5),
                    info=match.group(3),
                    msg=match.group(6),
                )
        super().log(entry)


class AgentAccount(pj.Account):  # type: ignore[misc]
    """Account that hands incoming calls and registration results to the agent."""

    def __init__(self, agent: Agent, kind: str) -> None:
        super().__init__()
        self.agent = agent
        self.kind = kind
        self.registrar = ""
        self.domain = ""
        self.proxy = ""
        self.aor = ""

    def onRegState(self, prm: Any) -> None:
        self.agent.guard("onRegState", self.agent.on_reg_state, self, prm)

    def onIncomingCall(self, prm: Any) -> None:
        self.agent.guard("onIncomingCall", self.agent.on_incoming_call, self, prm)


class AgentCall(pj.Call):  # type: ignore[misc]
    """A call plus the media objects attached to it, known by a stable id."""

    def __init__(self, agent: Agent, acc: AgentAccount, cid: str, call_id: int | None = None) -> None:
        if call_id is None:
            super().__init__(acc)
        else:
            super().__init__(acc, call_id)
        self.agent = agent
        self.acc_ref = acc
        self.cid = cid
        self.disconnected = False
        self.disconnect_pass = -1
        self.remote_tag: str | None = None
        self.end_request: str | None = None
        self.end_reason_header: str | None = None
        self.tone: Any = None
        self.tone_freq: list[float] | None = None
        self.recorder: Any = None
        self.rec_path: str | None = None
        self.monitor: Any = None
        """Records the tone generator itself: the level this handset sends."""
        self.monitor_path: str | None = None
        self.media_active = False

    # callbacks -----------------------------------------------------------
    def onCallState(self, prm: Any) -> None:
        self.agent.guard("onCallState", self.agent.on_call_state, self, prm)

    def onCallTsxState(self, prm: Any) -> None:
        self.agent.guard("onCallTsxState", self.agent.on_call_tsx_state, self, prm)

    def onCallMediaState(self, prm: Any) -> None:
        self.agent.guard("onCallMediaState", self.agent.on_call_media_state, self, prm)

    def onDtmfDigit(self, prm: Any) -> None:
        self.agent.out.emit("dtmf", call=self.cid, digit=prm.digit, method=int(prm.method))

    def onCallTransferRequest(self, prm: Any) -> None:
        self.agent.guard("onCallTransferRequest", self.agent.on_transfer_request, self, prm)

    def onCallTransferStatus(self, prm: Any) -> None:
        self.agent.out.emit(
            "transfer_status",
            call=self.cid,
            code=int(prm.statusCode),
            reason=prm.reason,
            final=bool(prm.finalNotify),
        )

    def onCallReplaceRequest(self, prm: Any) -> None:
        self.agent.guard("onCallReplaceRequest", self.agent.on_replace_request, self, prm)

    def onCallReplaced(self, prm: Any) -> None:
        new = self.agent.call_by_object(prm.newCall)
        self.agent.out.emit("call_replaced", call=self.cid, new_call=new.cid if new else None)

    # media ----------------------------------------------------------------
    def audio_media(self) -> Any:
        """The active audio stream's bridge port, or None."""
        try:
            info = self.getInfo()
        except pj.Error:
            return None
        for media in info.media:
            if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                return self.getAudioMedia(media.index)
        return None

    def connect_media(self) -> None:
        """(Re)connect tone and recorder to the current audio stream."""
        am = self.audio_media()
        if am is None:
            return
        # The stream also plays to the (null) sound device, as a phone's earpiece: the
        # bridge reads a port only while someone listens, so without it the jitter
        # buffer would fill between recordings and shed that backlog into the next one.
        am.startTransmit(self.agent.ep.audDevManager().getPlaybackDevMedia())
        if self.tone is not None:
            self.tone.startTransmit(am)
        if self.recorder is not None:
            am.startTransmit(self.recorder)

    def stop_tone(self) -> str | None:
        """Stop the tone; returns the path of its monitor recording, if any (finalised
        shortly after, see Agent.check_recordings)."""
        if self.tone is None:
            return None
        tone, self.tone = self.tone, None
        monitor, self.monitor = self.monitor, None
        path, self.monitor_path = self.monitor_path, None
        self.tone_freq = None
        try:
            tone.stop()
        except pj.Error:
            pass
        am = self.audio_media()
        for sink in (am, monitor):
            if sink is not None:
                with contextlib.suppress(pj.Error):
                    tone.stopTransmit(sink)
        del tone, monitor
        return path

    def stop_recorder(self) -> str | None:
        """Detach and destroy the recorder; returns its path (file finalised
        shortly after, see Agent.check_recordings)."""
        if self.recorder is None:
            return None
        rec, self.recorder = self.recorder, None
        path, self.rec_path = self.rec_path, None
        am = self.audio_media()
        if am is not None:
            try:
                am.stopTransmit(rec)
            except pj.Error:
                pass
        del rec
        return path


# --------------------------------------------------------------------------
# the agent


class Agent(PjHost):
    """Owns the transport, the accounts and the calls; the endpoint and the loop are
    the host's."""

    error_field = "cmd"
    watchdog_s = 10.0
    """Above the longest shutdown: calls 2 s, unREGISTER 1.5 s, recordings 2 s."""

    def __init__(self, args: argparse.Namespace, out: Emitter) -> None:
        super().__init__(out)
        self.args = args
        self.name: str = args.name or "handset"
        self.transport: str = args.transport
        self.bind: str = args.bind
        """The address SIP and RTP are bound to and advertised (a handset on the LAN)."""
        self.calls: dict[str, AgentCall] = {}
        self.call_seq = 0
        self.auto_mode = "ring"
        self.auto_code = 200
        self.auto_delay_ms = 0
        self.auto_reason = ""
        self.transfer_mode = "accept"
        self.tid = -1
        self.port = 0
        self.local_acc: AgentAccount | None = None
        self.reg_acc: AgentAccount | None = None
        self.retired_accounts: list[AgentAccount] = []
        self.pending_recordings: list[tuple[str, str, float]] = []
        self.recordings_watched = False

    # -- helpers -----------------------------------------------------------
    def new_cid(self) -> str:
        self.call_seq += 1
        return f"c{self.call_seq}"

    def call_by_object(self, obj: Any) -> AgentCall | None:
        found: AgentCall | None = None
        for call in self.calls.values():
            if call is obj:
                found = call
        return found

    def account(self) -> AgentAccount:
        acc = self.reg_acc or self.local_acc
        assert acc is not None
        return acc

    def tp_param(self) -> str:
        return ";transport=tcp" if self.transport == "tcp" else ""

    def account_config(self, id_uri: str) -> Any:
        cfg = pj.AccountConfig()
        cfg.idUri = id_uri
        cfg.sipConfig.transportId = self.tid
        nat = cfg.natConfig
        nat.sipOutboundUse = 0
        nat.contactRewriteUse = 0
        nat.viaRewriteUse = 0
        nat.sdpNatRewriteUse = 0
        nat.sipStunUse = pj.PJSUA_STUN_USE_DISABLED
        nat.mediaStunUse = pj.PJSUA_STUN_USE_DISABLED
        nat.iceEnabled = False
        med = cfg.mediaConfig.transportConfig
        med.boundAddress = self.bind
        med.publicAddress = self.bind
        med.port = 0
        med.portRange = 0
        return cfg

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        args = self.args
        level = max(int(args.log_level), 4 if args.trace else 0)
        writer = AgentLogWriter(self, int(args.log_level), bool(args.trace))
        cfg = self.create_endpoint(writer, level, msg_logging=bool(args.trace) or int(args.log_level) >= 4)
        cfg.uaConfig.maxCalls = 8
        cfg.uaConfig.userAgent = args.user_agent or f"homepbx-handset/{self.name}"
        cfg.medConfig.noVad = True
        cfg.medConfig.ecTailLen = 0
        # The linear resampler, as in the media worker (exact for 8 kHz calls on the 16 kHz
        # bridge): pjsua's default quality takes a sinc filter, most of a handset's CPU.
        cfg.medConfig.quality = 2
        # RTP on the SIP ioqueue, as in the media worker: pjmedia's own ioqueue thread
        # polls every 10 ms, most of what an idle handset would still cost.
        cfg.medConfig.hasIoqueue = False
        cfg.medConfig.threadCnt = 0
        self.init_endpoint(cfg)
        set_g722_pcm_shift()  # G.722 at the level of real phones, not pjmedia's default

        tcfg = pj.TransportConfig()
        tcfg.port = int(args.port)
        tcfg.boundAddress = self.bind
        tcfg.publicAddress = self.bind
        tp_type = pj.PJSIP_TRANSPORT_TCP if self.transport == "tcp" else pj.PJSIP_TRANSPORT_UDP
        self.tid, self.port = self.create_transport(tp_type, tcfg)
        self.start_library()
        if args.codecs and args.codecs != "all":
            self.set_codecs([c for c in args.codecs.split(",") if c])

        self.local_acc = AgentAccount(self, "local")
        self.local_acc.create(self.account_config(f"sip:{self.name}@{self.bind}:{self.port}"), True)

    def set_codecs(self, wanted: list[str]) -> None:
        """Enable only codecs whose id starts with one of `wanted`, in order."""
        ep = self.ep
        ids = [c.codecId for c in ep.codecEnum2()]
        for cid in ids:
            ep.codecSetPriority(cid, 0)
        prio = 255
        for want in wanted:
            for cid in ids:
                if cid.lower().startswith(want.lower()):
                    ep.codecSetPriority(cid, prio)
                    prio = max(prio - 1, 1)

    def ready(self) -> None:
        self.out.emit("ready", port=self.port, transport=self.transport, name=self.name, pid=os.getpid())

    def wind_down(self) -> None:
        """Hang up, unregister, drop every pjsua2 object (the host then destroys the
        library).  A Call (or Account) still referenced at libDestroy aborts the process
        when it is finally freed, so the steps live in helper methods whose locals are
        gone before libDestroy runs."""
        self._end_calls()
        self._end_registration()
        self._drop_objects()

    def _end_calls(self) -> None:
        self.clear_timers()  # closures may hold calls
        pending = False
        for call in self.calls.values():
            if not call.disconnected:
                pending = True
                with contextlib.suppress(pj.Error):
                    call.hangup(pj.CallOpParam(True))
        if pending:
            self.pump(2.0, self._all_disconnected)
        for call in self.calls.values():
            self.finish_call_media(call)
        self.check_recordings(force=True)

    def _all_disconnected(self) -> bool:
        return all(c.disconnected for c in self.calls.values())

    def _reg_inactive(self) -> bool:
        try:
            return self.reg_acc is None or not self.reg_acc.getInfo().regIsActive
        except pj.Error:
            return True

    def _end_registration(self) -> None:
        if self._reg_inactive():
            return
        assert self.reg_acc is not None
        with contextlib.suppress(pj.Error):
            self.reg_acc.setRegistration(False)
            self.pump(1.5, self._reg_inactive)

    def _drop_objects(self) -> None:
        self.pump(0.05)
        self.calls.clear()
        for acc in (self.reg_acc, self.local_acc, *self.retired_accounts):
            if acc is not None:
                with contextlib.suppress(pj.Error):
                    acc.shutdown()
        self.reg_acc = self.local_acc = None
        self.retired_accounts = []

    # -- main-loop chores ----------------------------------------------------
    def mark_disconnected(self, call: AgentCall) -> None:
        """The call is over: drop it on a later loop pass, never in this callback."""
        call.disconnected = True
        call.disconnect_pass = self.passes
        self.after(REAP_DELAY_S, self.reap_calls)

    def reap_calls(self) -> None:
        """Drop disconnected calls one loop pass after the callback."""
        for cid, call in list(self.calls.items()):
            if call.disconnected and call.disconnect_pass < self.passes:
                self.finish_call_media(call)
                del self.calls[cid]

    def finish_call_media(self, call: AgentCall) -> None:
        for path in (call.stop_tone(), call.stop_recorder()):
            if path is not None:
                self.watch_recording(call.cid, path)

    def watch_recording(self, cid: str, path: str) -> None:
        """Report `path` as `recorded` once finished (or in 2 s at the latest)."""
        self.pending_recordings.append((cid, path, time.monotonic() + 2.0))
        if not self.recordings_watched:
            self.recordings_watched = True
            self.after(RECORDING_POLL_S, self._recordings_tick)

    def _recordings_tick(self) -> None:
        self.recordings_watched = False
        self.check_recordings()
        if self.pending_recordings:
            self.recordings_watched = True
            self.after(RECORDING_POLL_S, self._recordings_tick)

    def check_recordings(self, force: bool = False) -> None:
        """Report recordings once pjmedia has finalised the WAV header."""
        if not self.pending_recordings:
            return
        if force:
            self.pump(2.0, lambda: all(wav_complete(p) for _, p, _ in self.pending_recordings))
        still: list[tuple[str, str, float]] = []
        now = time.monotonic()
        for cid, path, deadline in self.pending_recordings:
            done = wav_complete(path)
            if done or force or now > deadline:
                size = os.path.getsize(path) if os.path.exists(path) else 0
                self.out.emit("recorded", call=cid, path=path, bytes=size, complete=done)
            else:
                still.append((cid, path, deadline))
        self.pending_recordings = still

    # -- command dispatch ----------------------------------------------------
    def handle_line(self, line: bytes) -> None:
        cmd_name = "?"
        req_id: Any = None
        try:
            cmd = json.loads(line.decode("utf-8", "replace"))
            if not isinstance(cmd, dict):
                raise ValueError("command must be a JSON object")
            cmd_name = str(cmd.get("cmd", "?"))
            req_id = cmd.get("id")
            handler = getattr(self, "cmd_" + cmd_name, None)
            if handler is None:
                raise ValueError(f"unknown command {cmd_name!r}")
            handler(cmd)
        except Exception as exc:
            fields: dict[str, Any] = {"cmd": cmd_name, "message": pj_error_text(exc)}
            if req_id is not None:
                fields["id"] = req_id
            self.out.emit("error", **fields)

    def get_call(self, cmd: dict[str, Any]) -> AgentCall:
        cid = cmd.get("call")
        if cid is None and len(self.calls) == 1:
            return next(iter(self.calls.values()))
        call = self.calls.get(str(cid))
        if call is None or call.disconnected:
            raise ValueError(f"no live call {cid!r}")
        return call

    @staticmethod
    def tx_headers(prm: Any, headers: Any) -> None:
        if not headers:
            return
        vec = pj.SipHeaderVector()
        for name, value in dict(headers).items():
            h = pj.SipHeader()
            h.hName = str(name)
            h.hValue = str(value)
            vec.append(h)
        prm.txOption.headers = vec

    # registration ------------------------------------------------------------
    def cmd_register(self, cmd: dict[str, Any]) -> None:
        number = str(cmd["number"])
        registrar = str(cmd["registrar"])
        domain = str(cmd.get("domain") or "home.arpa")
        transport = str(cmd.get("transport") or self.transport)
        if transport == "tcp" and "transport=" not in registrar:
            registrar += ";transport=tcp"
        cfg = self.account_config(f"sip:{number}@{domain}")
        cfg.regConfig.registrarUri = registrar
        cfg.regConfig.timeoutSec = int(cmd.get("expires", 300))
        cfg.regConfig.retryIntervalSec = int(cmd.get("retry_interval", 0))
        # Over TCP pjsua puts the connection's source port in the Contact by default; off,
        # the Contact names the handset's TCP listener (as baresip's does).
        cfg.natConfig.contactUseSrcPort = bool(cmd.get("contact_use_src_port", True))
        cfg.regConfig.unregWaitMsec = 1500
        cfg.regConfig.dropCallsOnFail = False
        if cmd.get("instance"):
            cfg.regConfig.contactParams = f';+sip.instance="<{cmd["instance"]}>"'
        cred = pj.AuthCredInfo(
            "digest",
            str(cmd.get("realm", "*")),
            str(cmd.get("username") or number),
            0,
            str(cmd.get("password", "")),
        )
        cfg.sipConfig.authCreds.append(cred)
        proxy = cmd.get("proxy")
        if proxy:
            proxy = str(proxy)
            if ";lr" not in proxy:
                proxy += ";lr"
            if transport == "tcp" and "transport=" not in proxy:
                proxy += ";transport=tcp"
            cfg.sipConfig.proxies.append(proxy)
        self.retire_reg_account()
        acc = AgentAccount(self, "reg")
        acc.registrar = registrar
        acc.domain = domain
        acc.proxy = proxy or ""
        acc.aor = f"sip:{number}@{domain}"
        self.reg_acc = acc
        acc.create(cfg, True)

    def retire_reg_account(self) -> None:
        if self.reg_acc is None:
            return
        old, self.reg_acc = self.reg_acc, None
        try:
            old.shutdown()
        except pj.Error:
            pass
        self.retired_accounts.append(old)  # pjsua2 may still call into it

    def cmd_unregister(self, cmd: dict[str, Any]) -> None:
        if self.reg_acc is None:
            raise ValueError("not registered")
        self.reg_acc.setRegistration(False)

    def cmd_set_registration(self, cmd: dict[str, Any]) -> None:
        if self.reg_acc is None:
            raise ValueError("not registered")
        self.reg_acc.setRegistration(bool(cmd.get("renew", True)))

    def on_reg_state(self, acc: AgentAccount, prm: Any) -> None:
        try:
            active = bool(acc.getInfo().regIsActive)
        except pj.Error:
            active = False
        contacts: list[str] = []
        msg = prm.rdata.wholeMsg if prm.rdata is not None else ""
        if msg:
            _, hdrs = parse_sip(msg)
            contact = header(hdrs, "Contact")
            if contact:
                contacts = [c.strip() for c in re.split(r",(?=\s*<)", contact)]
        self.out.emit(
            "reg_state",
            aor=acc.aor,
            code=int(prm.code),
            reason=prm.reason,
            expires=int(prm.expiration),
            active=active,
            status=int(prm.status),
            contacts=contacts,
        )

    # calls -------------------------------------------------------------------
    def cmd_call(self, cmd: dict[str, Any]) -> None:
        uri = str(cmd["uri"])
        acc = self.account()
        target = cmd.get("target")
        if not target and acc.kind == "reg" and not acc.proxy:
            # An in-domain number with no proxy would need DNS for the
            # domain; send it straight to the registrar, as a phone
            # configured with "SIP server = registrar" does.
            host = re.sub(r"^sips?:([^@]*@)?", "", uri).split(";")[0].split(":")[0]
            if host.lower() == acc.domain.lower():
                user = re.sub(r"^sips?:", "", uri).split("@")[0]
                reg_host = re.sub(r"^sips?:", "", acc.registrar).split(";")[0]
                target = f"sip:{user}@{reg_host}"
        if self.transport == "tcp":
            if target and "transport=" not in str(target):
                target = f"{target};transport=tcp"
            elif not target and "transport=" not in uri and not acc.proxy:
                target = f"{uri};transport=tcp"
        prm = pj.CallOpParam(True)
        self.tx_headers(prm, cmd.get("headers"))
        if target:
            prm.txOption.targetUri = str(target)
        cid = self.new_cid()
        call = AgentCall(self, acc, cid)
        self.calls[cid] = call
        fields: dict[str, Any] = {"call": cid, "uri": uri, "target": target}
        if cmd.get("id") is not None:
            fields["id"] = cmd["id"]
        self.out.emit("call_created", **fields)
        try:
            call.makeCall(uri, prm)
        except Exception:
            self.mark_disconnected(call)
            raise

    def cmd_answer(self, cmd: dict[str, Any]) -> None:
        call = self.get_call(cmd)
        self.answer(call, int(cmd.get("code", 200)), str(cmd.get("reason", "")), cmd.get("headers"))

    def answer(self, call: AgentCall, code: int, reason: str = "", headers: Any = None) -> None:
        prm = pj.CallOpParam(True)
        prm.statusCode = code
        if reason:
            prm.reason = reason
        self.tx_headers(prm, headers)
        call.answer(prm)

    def cmd_hangup(self, cmd: dict[str, Any]) -> None:
        call = self.get_call(cmd)
        prm = pj.CallOpParam(True)
        prm.statusCode = int(cmd.get("code", 0))
        if cmd.get("reason"):
            prm.reason = str(cmd["reason"])
        self.tx_headers(prm, cmd.get("headers"))
        call.hangup(prm)

    def cmd_hangup_all(self, cmd: dict[str, Any]) -> None:
        self.ep.hangupAllCalls()

    def cmd_hold(self, cmd: dict[str, Any]) -> None:
        self.get_call(cmd).setHold(pj.CallOpParam(True))

    def cmd_unhold(self, cmd: dict[str, Any]) -> None:
        prm = pj.CallOpParam(True)
        prm.opt.flag = pj.PJSUA_CALL_UNHOLD
        self.get_call(cmd).reinvite(prm)

    def cmd_transfer(self, cmd: dict[str, Any]) -> None:
        call = self.get_call(cmd)
        prm = pj.CallOpParam(True)
        self.tx_headers(prm, cmd.get("headers"))
        if cmd.get("replaces"):
            other = self.get_call({"call": cmd["replaces"]})
            call.xferReplaces(other, prm)
        else:
            call.xfer(str(cmd["uri"]), prm)

    def cmd_auto_answer(self, cmd: dict[str, Any]) -> None:
        mode = str(cmd.get("mode", "ring"))
        if mode not in ("off", "ring", "answer", "reject"):
            raise ValueError(f"bad auto_answer mode {mode!r}")
        self.auto_mode = mode
        self.auto_code = int(cmd.get("code", 486 if mode == "reject" else 200))
        self.auto_delay_ms = int(cmd.get("delay_ms", 0))
        self.auto_reason = str(cmd.get("reason", ""))
        self.out.emit("auto_answer", mode=mode, code=self.auto_code, delay_ms=self.auto_delay_ms)

    def cmd_transfer_mode(self, cmd: dict[str, Any]) -> None:
        mode = str(cmd.get("mode", "accept"))
        if mode not in ("accept", "reject"):
            raise ValueError(f"bad transfer mode {mode!r}")
        self.transfer_mode = mode

    def cmd_dtmf(self, cmd: dict[str, Any]) -> None:
        self.get_call(cmd).dialDtmf(str(cmd["digits"]))

    def cmd_calls(self, cmd: dict[str, Any]) -> None:
        """Report a snapshot of the live calls (handy when debugging)."""
        snapshot = []
        for call in self.calls.values():
            entry: dict[str, Any] = {"call": call.cid, "disconnected": call.disconnected}
            try:
                info = call.getInfo()
                entry.update(
                    state=_STATE_NAMES.get(info.state, str(info.state)),
                    remote=info.remoteUri,
                    call_id=info.callIdString,
                )
            except pj.Error:
                pass
            snapshot.append(entry)
        self.out.emit("calls", calls=snapshot, id=cmd.get("id"))

    def cmd_ping(self, cmd: dict[str, Any]) -> None:
        self.out.emit("pong", id=cmd.get("id"))

    def cmd_quit(self, cmd: dict[str, Any]) -> None:
        self.request_stop("quit")

    # media commands ------------------------------------------------------------
    def cmd_play_tone(self, cmd: dict[str, Any]) -> None:
        call = self.get_call(cmd)
        freq = cmd.get("freq", 440)
        freqs = [float(f) for f in freq] if isinstance(freq, list) else [float(freq)]
        old = call.stop_tone()
        if old is not None:
            self.watch_recording(call.cid, old)
        gen = pj.ToneGenerator()
        gen.createToneGenerator(16000, 1)
        vec = pj.ToneDescVector()
        desc = pj.ToneDesc()
        desc.freq1 = int(freqs[0])
        desc.freq2 = int(freqs[1] if len(freqs) > 1 else freqs[0])
        desc.on_msec = 10000
        desc.off_msec = 0
        if cmd.get("volume"):
            desc.volume = int(cmd["volume"])
        vec.append(desc)
        gen.play(vec, True)
        call.tone = gen
        call.tone_freq = freqs
        if cmd.get("monitor"):
            # The tone as this handset sends it (before its encoder): a test compares
            # the level sent with the level the other party hears.
            path = str(Path(str(cmd["monitor"])).resolve())
            rec = pj.AudioMediaRecorder()
            rec.createRecorder(path)
            gen.startTransmit(rec)
            call.monitor = rec
            call.monitor_path = path
        call.connect_media()

    def cmd_record(self, cmd: dict[str, Any]) -> None:
        call = self.get_call(cmd)
        path = str(Path(str(cmd["path"])).resolve())
        old = call.stop_recorder()
        if old is not None:
            self.watch_recording(call.cid, old)
        rec = pj.AudioMediaRecorder()
        rec.createRecorder(path)
        call.recorder = rec
        call.rec_path = path
        call.connect_media()

    def cmd_stop_media(self, cmd: dict[str, Any]) -> None:
        """Stop tone and recorder: `media_stopped` now, and `recorded` once
        the WAV file is complete (pjmedia finishes it asynchronously)."""
        call = self.get_call(cmd)
        had_tone = call.tone is not None
        monitor = call.stop_tone()
        path = call.stop_recorder()
        for done in (monitor, path):
            if done is not None:
                self.watch_recording(call.cid, done)
        self.out.emit(
            "media_stopped", call=call.cid, tone=had_tone, recording=path, monitor=monitor, id=cmd.get("id")
        )

    # callbacks -------------------------------------------------------------------
    def on_incoming_call(self, acc: AgentAccount, prm: Any) -> None:
        cid = self.new_cid()
        call = AgentCall(self, acc, cid, prm.callId)
        self.calls[cid] = call
        msg = prm.rdata.wholeMsg
        start, hdrs = parse_sip(msg)
        parts = start.split(" ")
        request_uri = parts[1] if len(parts) >= 3 else ""
        call.remote_tag = header_tag(header(hdrs, "From"))
        info = call.getInfo()
        self.out.emit(
            "incoming_call",
            call=cid,
            account=acc.kind,
            **{"from": info.remoteUri},
            to=info.localUri,
            request_uri=request_uri,
            remote_contact=info.remoteContact,
            call_id=info.callIdString,
            remote_tag=call.remote_tag,
            source=prm.rdata.srcAddress,
            headers=hdrs,
        )
        mode, code, delay = self.auto_mode, self.auto_code, self.auto_delay_ms
        reason = self.auto_reason

        def act() -> None:
            if call.disconnected:
                return
            if mode == "ring":
                self.answer(call, 180)
            elif mode == "reject":
                self.answer(call, code, reason)
            elif mode == "answer":
                if delay > 0:
                    self.answer(call, 180)
                    self.after(delay / 1000, lambda: None if call.disconnected else self.answer(call, code, reason))
                else:
                    self.answer(call, code, reason)

        if mode != "off":
            self.after(0, act)

    def on_call_state(self, call: AgentCall, prm: Any) -> None:
        info = call.getInfo()
        state = _STATE_NAMES.get(info.state, str(info.state))
        rx = self.event_rx_msg(prm.e)
        if rx and call.remote_tag is None:
            call.remote_tag = self.remote_tag_of(rx)
        fields: dict[str, Any] = {
            "call": call.cid,
            "state": state,
            "code": int(info.lastStatusCode),
            "reason": info.lastReason,
            "remote": info.remoteUri,
            "remote_contact": info.remoteContact,
            "remote_tag": call.remote_tag,
            "call_id": info.callIdString,
            "role": "uac" if info.role == pj.PJSIP_ROLE_UAC else "uas",
        }
        if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            reason_header = call.end_reason_header
            end_request = call.end_request
            if rx and reason_header is None:
                start, hdrs = parse_sip(rx)
                if not start.startswith("SIP/2.0"):
                    end_request = start.split(" ")[0]
                reason_header = header(hdrs, "Reason")
            if end_request is None and info.role == pj.PJSIP_ROLE_UAS and int(info.lastStatusCode) == 487:
                # Our 487 answered a CANCEL; on a busy machine pjsua may report the call's end
                # before the CANCEL's own transaction (`on_call_tsx_state`).
                end_request = "CANCEL"
            fields.update(
                last_status=int(info.lastStatusCode),
                last_reason=info.lastReason,
                reason_header=reason_header,
                end_request=end_request,
                duration=float(info.connectDuration.sec) + info.connectDuration.msec / 1000.0,
            )
            self.mark_disconnected(call)
        self.out.emit("call_state", **fields)

    @staticmethod
    def event_rx_msg(e: Any) -> str:
        """Text of the message received with a SipEvent, or ''."""
        try:
            if e.type == pj.PJSIP_EVENT_TSX_STATE and e.body.tsxState.type == pj.PJSIP_EVENT_RX_MSG:
                return str(e.body.tsxState.src.rdata.wholeMsg)
            if e.type == pj.PJSIP_EVENT_RX_MSG:
                return str(e.body.rxMsg.rdata.wholeMsg)
        except Exception:
            pass
        return ""

    @staticmethod
    def remote_tag_of(msg: str) -> str | None:
        start, hdrs = parse_sip(msg)
        # the peer's tag is in To of its responses, in From of its requests
        name = "To" if start.startswith("SIP/2.0") else "From"
        return header_tag(header(hdrs, name))

    def on_call_tsx_state(self, call: AgentCall, prm: Any) -> None:
        e = prm.e
        if e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        tsx_state = e.body.tsxState
        if tsx_state.type != pj.PJSIP_EVENT_RX_MSG:
            return
        msg = str(tsx_state.src.rdata.wholeMsg)
        if not msg:
            return
        if call.remote_tag is None:
            call.remote_tag = self.remote_tag_of(msg)
        start, hdrs = parse_sip(msg)
        if start.startswith("SIP/2.0") or tsx_state.tsx.role != pj.PJSIP_ROLE_UAS:
            return
        method = start.split(" ")[0]
        if method in ("CANCEL", "BYE"):
            # The DISCONNECTED callback that follows a CANCEL carries our 487,
            # not the CANCEL, so remember the request's Reason here.
            call.end_request = method
            call.end_reason_header = header(hdrs, "Reason")
        self.out.emit("call_request", call=call.cid, method=method, headers=hdrs)

    def on_call_media_state(self, call: AgentCall, prm: Any) -> None:
        info = call.getInfo()
        for media in info.media:
            if media.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            status = _MEDIA_STATUS.get(media.status, str(media.status))
            call.media_active = media.status == pj.PJSUA_CALL_MEDIA_ACTIVE
            self.out.emit("media", call=call.cid, status=status, index=int(media.index))
            if call.media_active:
                call.connect_media()
            break

    def on_transfer_request(self, call: AgentCall, prm: Any) -> None:
        target = prm.dstUri
        if self.transfer_mode == "reject":
            prm.statusCode = 603
            self.out.emit("transfer_request", call=call.cid, target=target, accepted=False)
            return
        cid = self.new_cid()
        new = AgentCall(self, call.acc_ref, cid)
        self.calls[cid] = new
        prm.newCall = new
        self.out.emit("transfer_request", call=call.cid, target=target, accepted=True, new_call=cid)

    def on_replace_request(self, call: AgentCall, prm: Any) -> None:
        cid = self.new_cid()
        new = AgentCall(self, call.acc_ref, cid)
        self.calls[cid] = new
        prm.newCall = new
        self.out.emit("replace_request", call=call.cid, new_call=cid)


# --------------------------------------------------------------------------
# entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bind", default=LOOPBACK, help="IPv4 address for SIP and RTP (default 127.0.0.1)")
    parser.add_argument("--name", default="")
    parser.add_argument("--user-agent", default=None)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--log-level", type=int, default=3)
    parser.add_argument(
        "--codecs",
        default=DEFAULT_CODECS,
        help="comma-separated codec id prefixes in preference order, or 'all' for pjsua's"
        " defaults (speex garbles tones when both ends transmit, so it is off by default)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Blocked in every thread (pjsua's included, they inherit the mask): taken by the
    # host's signal thread only.
    block_signals()
    # Keep fd 1 for JSON only: anything native code prints goes to stderr.
    out = private_stdout()

    agent = Agent(args, out)
    try:
        agent.start()
    except Exception as exc:
        out.emit("error", cmd="start", message=pj_error_text(exc))
        out.emit("bye", reason="start failed")
        os._exit(1)
    code = agent.run()
    sys.stderr.flush()
    # Skip interpreter teardown: SWIG finalisers after libDestroy are not safe.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
