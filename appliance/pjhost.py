"""One pjsua2 host loop, shared by the media worker and the simulated handsets.

A :class:`PjHost` owns what every pjsua2 child process of ours needs around its own
logic: the endpoint, the main loop, the command channel on stdin, signals and shutdown.
The worker (:mod:`appliance.media.worker`) and the handset agent
(:mod:`appliance.simulator.agent`) subclass it and fill in its hooks.

Why it is built this way:

- pjsua2 runs on the main thread only (``threadCnt = 0``, ``mainThreadOnly``): every
  pjsua2 call, callback and destructor happens there, so nothing needs a lock.
- The main thread sleeps in ``libHandleEvents`` until SIP, RTP, a pjsip timer, the next
  host timer (:meth:`PjHost.after`) or at most ``IDLE_WAIT_MS``.  Stdin and signals are
  read by two small threads that never touch pjsua2: they queue the work and wake the
  main loop by sending a CRLF keep-alive (RFC 5626 §4.4.1, which pjsip ignores) to the
  host's own loopback UDP SIP port (a process whose SIP runs over TCP gets a loopback
  UDP transport just for that).  No polling anywhere.  CPU over 20 s idle (schedstat
  of every thread, as ``bench/media.py`` measures; 2 shared cores): a registered
  handset took 1.2 % of a core when it polled every 10 ms, 0.3 % with this loop, and
  0.015 % with its RTP on the SIP ioqueue too (UDP or TCP alike); a warm media worker
  0.03 %, as before.
- Signals are blocked in every thread (:func:`block_signals`, first thing in ``main``,
  so pjsua's threads inherit the mask) and taken by the signal thread: a SIGTERM stops
  the loop at once instead of after its sleep.
- Callbacks only record facts and queue jobs (:meth:`PjHost.later`); jobs and due
  timers run right after ``libHandleEvents`` returns, so no pjsua2 operation is nested
  inside a callback.  :meth:`PjHost.guard` turns an exception in a callback or job into
  an error event: one escaping into the SWIG director could abort the process.
- Shutdown drops every pjsua2 object before ``libDestroy`` (a Call still referenced
  then aborts the process when it is finally freed), and a watchdog exits hard (status
  3) when it takes longer than ``watchdog_s`` rather than hang.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import heapq
import itertools
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pjsua2 as pj

from appliance.jsonlines import Emitter
from appliance.pjerrors import pj_error_text

LOOPBACK = "127.0.0.1"
IDLE_WAIT_MS = 1000
"""Longest sleep in libHandleEvents; SIP, RTP, pjsip timers and the wake datagram all
end it early, so this only bounds the damage of a lost wake-up."""
PUMP_SLICE_MS = 10
"""libHandleEvents slice of :meth:`PjHost.pump` (shutdown windows, a few seconds at most)."""
FINAL_PUMP_S = 0.05
"""Events handled after every object is dropped, before libDestroy (last ACKs, unREGISTER)."""
WAKE = b"\r\n\r\n"
"""A SIP keep-alive: pjsip drops it silently, and it ends libHandleEvents at once."""
STDIN_CLOSED = "stdin closed"
"""The stop reason when the command channel ends (for the worker: its edge is gone)."""
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LOG_DECOR = pj.PJ_LOG_HAS_TIME | pj.PJ_LOG_HAS_MICRO_SEC | pj.PJ_LOG_HAS_SENDER


def block_signals() -> None:
    """Block SIGTERM/SIGINT/SIGHUP in this thread and every thread started after (pjsua's
    included): the host's signal thread takes them.  Call before anything starts a thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def signals_blocked() -> bool:
    return set(SIGNALS) <= signal.pthread_sigmask(signal.SIG_BLOCK, [])


def create_library() -> Any:
    """A new Endpoint after libCreate, whose banner (logged at full verbosity before any
    config applies) is hidden."""
    ep = pj.Endpoint()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        ep.libCreate()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    return ep


G722_PCM_SHIFT = 1
"""pjmedia's G.722 level adjustment as standard G.722 ends use it (real phones, baresip):
16-bit PCM halved into the codec, doubled out of it.  pjmedia's default is 2 (a quarter,
four times), which is 6 dB off against any other implementation; its clipping detector
then drops the shift of one codec instance but not of another, so the error depended on
the leg and on the loudness (homepbx issue 12)."""


def set_g722_pcm_shift(shift: int = G722_PCM_SHIFT) -> None:
    """Set pjmedia's G.722 PCM shift for every codec opened from now on (after
    ``libInit``, which resets it).  pjsua2 does not wrap ``pjmedia_codec_g722_set_pcm_shift``
    (the codec params have no such field), so it is called in the loaded module itself."""
    module = getattr(pj, "_pjsua2", None)
    path = getattr(module, "__file__", None)
    if not path:
        raise RuntimeError("pjsua2's native module not found: cannot set the G.722 level")
    lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW)  # the copy already loaded
    set_shift = lib.pjmedia_codec_g722_set_pcm_shift
    set_shift.argtypes = [ctypes.c_uint]
    set_shift.restype = ctypes.c_int
    status = set_shift(shift)
    if status != 0:
        raise RuntimeError(f"pjmedia_codec_g722_set_pcm_shift({shift}) failed: status {status}")


class LogWriter(pj.LogWriter):  # type: ignore[misc]
    """pjsua log lines up to `max_level` (None: all) to stderr; fd 1 carries the JSON events."""

    def __init__(self, max_level: int | None = None) -> None:
        super().__init__()
        self.max_level = max_level

    def write(self, entry: Any) -> None:
        try:
            self.log(entry)
        except Exception:
            pass  # an exception here would surface inside pjsua's logging

    def log(self, entry: Any) -> None:
        if self.max_level is not None and int(entry.level) > self.max_level:
            return
        msg = str(entry.msg)
        sys.stderr.write(msg if msg.endswith("\n") else msg + "\n")
        sys.stderr.flush()


@dataclass(frozen=True)
class Stop:
    """Queued by the stdin and signal threads: stop the loop for `reason`."""

    reason: str


class PjHost:
    """The endpoint and its main loop.  Subclasses fill in the hooks: :meth:`handle_line`
    (one stdin command), :meth:`after_events`, :meth:`ready`, :meth:`wind_down`."""

    error_field = "where"
    """The error event's field naming where it happened."""
    watchdog_s: float | None = 8.0
    """Longest shutdown before the process exits hard; None: no watchdog."""
    stdin_fd = 0

    def __init__(self, out: Emitter) -> None:
        self.out = out
        self.ep: Any = None
        self.writer: LogWriter | None = None
        self.stop_reason: str | None = None
        self.passes = 0
        """libHandleEvents calls so far (main loop and pumps)."""
        self.commands: collections.deque[bytes | Stop] = collections.deque()
        self.jobs: collections.deque[Callable[[], None]] = collections.deque()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self.wake_port = 0
        self._wake_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Bound now, on loopback: an unbound socket is bound to 0.0.0.0 by its first
        # sendto, and would then take datagrams from every interface (homepbx issue 12).
        self._wake_sock.bind((LOOPBACK, 0))

    # -- hooks -----------------------------------------------------------------------------
    def handle_line(self, line: bytes) -> None:
        """One command line from stdin (stripped, never empty), on the main thread."""
        raise NotImplementedError

    def after_events(self) -> None:
        """Chores after each libHandleEvents, commands and jobs (main loop and pumps)."""

    def ready(self) -> None:
        """The loop is about to start: announce it."""

    def wind_down(self) -> None:
        """Shutdown: end the calls, then drop every pjsua2 object.  A method of its own so
        its locals are gone before libDestroy runs."""

    # -- plumbing --------------------------------------------------------------------------
    def report_error(self, where: str, exc: BaseException) -> None:
        self.out.emit("error", **{self.error_field: where, "message": pj_error_text(exc)})

    def guard(self, where: str, fn: Callable[..., None], *args: Any) -> None:
        """Run a callback or job body; an exception becomes an error event instead of
        escaping into the SWIG director (which could abort the process)."""
        try:
            fn(*args)
        except Exception as exc:
            self.report_error(where, exc)

    def later(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the main thread once libHandleEvents has returned."""
        self.jobs.append(fn)

    def after(self, seconds: float, fn: Callable[[], None]) -> None:
        """Run `fn` on the main loop `seconds` from now (not during :meth:`pump`)."""
        deadline = time.monotonic() + max(seconds, 0.0)
        heapq.heappush(self.timers, (deadline, next(self._timer_seq), fn))

    def clear_timers(self) -> None:
        """Forget every job and timer (their closures may hold calls)."""
        self.jobs.clear()
        self.timers.clear()

    def wake(self) -> None:
        """Any thread: end the main thread's libHandleEvents now."""
        if self.wake_port:
            with contextlib.suppress(OSError):
                self._wake_sock.sendto(WAKE, (LOOPBACK, self.wake_port))

    # -- the endpoint ----------------------------------------------------------------------
    def create_endpoint(self, writer: LogWriter, level: int, msg_logging: bool) -> Any:
        """libCreate, and the EpConfig every host shares, for the subclass to complete
        and pass to :meth:`init_endpoint`."""
        self.ep = create_library()
        self.writer = writer
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.stunIgnoreFailure = True
        log = cfg.logConfig
        log.writer = writer
        log.level = level
        log.consoleLevel = level
        log.msgLogging = msg_logging
        log.decor = LOG_DECOR
        return cfg

    def init_endpoint(self, cfg: Any) -> None:
        self.ep.libInit(cfg)
        self.ep.audDevManager().setNullDev()

    def create_transport(self, kind: int, cfg: Any) -> tuple[int, int]:
        """A SIP transport: (its id, its local port).  The first loopback UDP one also
        takes the wake datagrams."""
        tid = int(self.ep.transportCreate(kind, cfg))
        port = int(str(self.ep.transportGetInfo(tid).localName).rsplit(":", 1)[1])
        if kind == pj.PJSIP_TRANSPORT_UDP and not self.wake_port and str(cfg.boundAddress) == LOOPBACK:
            self.wake_port = port
        return tid, port

    def start_library(self) -> None:
        """libStart, after a loopback UDP transport for the wake datagrams if there is none."""
        if not self.wake_port:
            cfg = pj.TransportConfig()
            cfg.port = 0
            cfg.boundAddress = LOOPBACK
            cfg.publicAddress = LOOPBACK
            self.create_transport(pj.PJSIP_TRANSPORT_UDP, cfg)
        self.ep.libStart()

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped, then shut down; the process's exit status."""
        threading.Thread(target=self.read_stdin, name="stdin", daemon=True).start()
        if signals_blocked():
            threading.Thread(target=self.wait_signals, name="signals", daemon=True).start()
        self.ready()
        self.out.flush()
        while self.stop_reason is None:
            self.ep.libHandleEvents(self.wait_ms())
            self.passes += 1
            self.drain_commands()
            self.run_jobs()
            self.run_timers()
            self.after_events()
            self.out.flush()
        self.shutdown()
        return 0

    def wait_ms(self) -> int:
        """How long libHandleEvents may sleep: not at all with work queued, else until
        the next timer, at most IDLE_WAIT_MS."""
        if self.commands or self.jobs:
            return 0
        if not self.timers:
            return IDLE_WAIT_MS
        left_ms = math.ceil((self.timers[0][0] - time.monotonic()) * 1000)
        return max(0, min(IDLE_WAIT_MS, left_ms))

    def read_stdin(self) -> None:
        """Reader thread: never touches pjsua2, only queues and wakes."""
        try:
            # A fresh reader on the descriptor: in a worker forked by the zygote, sys.stdin
            # is the zygote's object, while fd 0 is this worker's own channel.
            for raw in open(self.stdin_fd, "rb", closefd=False):  # noqa: SIM115 - lives as long as the thread
                line = raw.strip()
                if line:
                    self.commands.append(line)
                    self.wake()
        except (OSError, ValueError):
            pass
        self.commands.append(Stop(STDIN_CLOSED))
        self.wake()

    def wait_signals(self) -> None:
        """Signal thread: the signals are blocked everywhere and taken here."""
        signum = signal.sigwait(set(SIGNALS))
        self.commands.append(Stop(signal.Signals(signum).name))
        self.wake()

    def drain_commands(self) -> None:
        while self.commands and self.stop_reason is None:
            item = self.commands.popleft()
            if isinstance(item, Stop):
                self.request_stop(item.reason)
                return
            self.guard("command", self.handle_line, item)

    def run_jobs(self) -> None:
        while self.jobs:
            self.guard("job", self.jobs.popleft())

    def run_timers(self) -> None:
        """Timers due now; one a timer sets for now runs on the next pass."""
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            fn = heapq.heappop(self.timers)[2]
            self.guard("timer", fn)

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            if self.watchdog_s is not None:
                timer = threading.Timer(self.watchdog_s, lambda: os._exit(3))
                timer.daemon = True
                timer.start()

    def pump(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Handle events (and jobs, and :meth:`after_events`) for a while, outside the
        main loop, until `until()` holds."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (until is not None and until()):
            self.ep.libHandleEvents(PUMP_SLICE_MS)
            self.passes += 1
            self.run_jobs()
            self.after_events()
            self.out.flush()

    def shutdown(self) -> None:
        """End everything (:meth:`wind_down`), destroy the library, say bye."""
        try:
            self.wind_down()
            self.clear_timers()
            gc.collect()
            self.pump(FINAL_PUMP_S)
            self.ep.libDestroy(pj.PJSUA_DESTROY_NO_RX_MSG)
        except Exception as exc:
            self.report_error("shutdown", exc)
        self.out.emit("bye", reason=self.stop_reason)
        self.out.flush()
