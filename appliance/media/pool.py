"""The media worker pool: spawns, hands out, health-checks and replaces worker processes.

asyncio only, and never imports pjsua2: a worker is a child process spoken to in JSON
lines (see :mod:`.protocol`).  A worker is a set of call slots: it carries up to
``capacity`` calls at once (``calls_per_worker``, cut to what the pjsua2 build holds: one
with the PyPI wheel, learnt before the first worker starts, see :meth:`WorkerPool.start`).
``max_calls`` is the most calls in all.  A new call takes a free slot of the busiest worker
that has one, so calls are packed and idle workers can retire (under a burst, of the
busiest one a core: :func:`pick_worker`).  Everything below counts
slots (calls), not processes.  A worker takes ~100 ms to start (more on a busy box),
far more than the call-setup budget, so the pool keeps workers warm ahead of demand: at
least ``min_idle``, and as many as the recent arrival rate would use up while one starts
(:func:`warm_target`).  A call that still finds none idle waits for one (``acquire`` is
bounded by ``acquire_timeout``); only ``max_calls`` calls in progress refuse it.  At most
``max_starting`` workers start at once, so a burst does not starve the box's few cores.

Life of a worker: STARTING -> running -> RETIRING (recycled after ``recycle_after`` calls
once its last call ended, idle too long, or the pool stops) -> DEAD.  While running its
state says what its slots do: BUSY (a call held), COOLING (none held, one resting after
its ``call_ended``), IDLE.  A worker that exits on its own, or stops answering pings and
is killed, is reported through ``worker_died(worker, tokens)`` with the tokens of every
call it held (so the edge can BYE their parties) and replaced; the other workers' calls
go on.  Each worker owns a fixed slice of the RTP range, ``capacity`` times a call's
ports, so workers never collide on a port, not even a new one starting while a dead
one's sockets linger.

Cooling exists because pjlib frees a closed socket's ioqueue slot only 500 ms later
(PJ_IOQUEUE_KEY_FREE_DELAY) out of a fixed number (64 in the PyPI wheel, 1024 in ours): a
worker given more short calls inside half a second than its ioqueue holds aborts on an
assertion.  After a call its slot rests ``cooldown`` seconds (the edge's choice and its
arithmetic: ``edge/media_link.py``).  Resting slots count against ``max_calls``, so the
rest also bounds a burst: ``max_calls / (call time + cooldown)`` calls a second.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import itertools
import logging
import math
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import IO, Any, Final

from appliance.media import protocol as P
from appliance.source import REPO_ROOT

__all__ = ["CallSlot", "Worker", "WorkerPool", "WorkerState", "arrival_rate", "pick_worker", "warm_target"]

log = logging.getLogger("homepbx.media")

SPARE_SLOTS: Final = 2
"""Port slices beyond what max_calls needs: room for replacements while old workers exit."""
AUTO_CALLS_CAP: Final = 16
"""calls_per_worker = 0 (auto): as many as the build allows, at most this many (a worker's
crash ends its calls, so one process never holds more than a few dozen parties)."""
CRASH_WINDOW: Final = 5.0
"""A worker dying within this many seconds of its start counts as a crash loop."""
MAX_BACKOFF: Final = 30.0
ACQUIRE_TIMEOUT: Final = 6.0
"""How long a new call waits for a worker (its 100 Trying sent) before 503."""
END_GRACE: Final = 0.5
"""How long a released worker in a call has to report its end before it is told to end it."""
FULL_GRACE: Final = 1.0
"""How long a call that finds max_calls held waits for one to end (a worker reports its
call's end a moment after the BYE went by) before 503."""
RATE_WINDOWS: Final = ((0.25, 10), (1.0, 1), (10.0, 1))
"""Arrival rate: the highest of the last quarter second's, second's and ten seconds', each
window counted from the calls it must hold (see arrival_rate).  The quarter second sees a
burst while it starts: with the second alone, a burst's first 100 ms found no worker warm
beyond the first and its calls waited 40-60 ms for one (1,000 calls at 10 in flight went
from 459-467 to 480 calls/s).  It counts from 10 calls, so a family's few calls at once
(8 in the CPU bench) do not start a worker that would idle 20 s (8.6 MB of PSS)."""
WARM_HEADROOM: Final = 2.0
"""Keep warm what arrives in this many worker start times (see warm_target)."""
SPREAD_WINDOWS: Final = ((1.0, 1),)
SPREAD_RATE: Final = 10.0
"""Calls in the last second (SPREAD_WINDOWS) from which new calls are spread over one
worker a core (pick_worker): more than a household ever places, so only a burst (a few
calls within a quarter second, which warm_target heeds, are not one).  Packed into one
worker, a burst's set-ups queue behind each other in that process while the other core
idles: at 10 calls in flight (bench/media_vs_asterisk.py) the worker's share of a call's
set-up was 2.5-5 ms a step, and spread over two workers 3,000 calls went from 463-467 to
482-485 calls/s."""


def arrival_rate(arrivals: Sequence[float], now: float,
                 windows: Sequence[tuple[float, int]] = RATE_WINDOWS) -> float:
    """Calls per second lately, from the arrival times (oldest first): the highest rate
    over each window ending `now` (seconds, and the calls it must hold to count), so a
    burst is seen within a quarter second and a steady trickle is not forgotten between two
    calls."""
    # Found by bisection, not a scan: at 300 calls/s the ten-second window holds 3,000
    # arrivals, and this runs for every call (a scan was 4 % of the edge's CPU).
    best = 0.0
    for window, least in windows:
        count = len(arrivals) - bisect.bisect_left(arrivals, now - window)
        if count >= least:
            best = max(best, count / window)
    return best


def warm_target(rate: float, start_seconds: float, min_idle: int, room: int) -> int:
    """How many workers to keep idle or starting: the calls expected to arrive while
    WARM_HEADROOM workers start one after the other (`rate` calls/s, `start_seconds` per
    start), at least `min_idle`, never more than `room` (max_calls less the calls held)."""
    want = max(min_idle, math.ceil(rate * max(start_seconds, 0.0) * WARM_HEADROOM))
    return max(0, min(want, room))


EventCallback = Callable[["Worker", dict[str, Any]], None]
DiedCallback = Callable[["Worker", list[str]], None]


class MediaUnavailable(Exception):
    """The media engine does not load here (see WorkerPool.unavailable)."""


class WorkerState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    COOLING = "cooling"
    RETIRING = "retiring"
    DEAD = "dead"


class CallSlot:
    """One call a worker is acquired for (by the edge) or reports (call_started).  A plain
    class, not a dataclass: compiled, a dataclass's __init__ stays interpreted."""

    def __init__(self, token: str | None, in_call: bool = False) -> None:
        self.token = token
        self.in_call = in_call
        """The worker reported call_started for it (and not yet call_ended)."""

    def __repr__(self) -> str:
        return f"CallSlot({self.token!r}, in_call={self.in_call})"


def pick_worker(workers: Sequence[Worker], spread: int = 1) -> Worker | None:
    """The worker a new call goes to.  Calls are packed: into the busiest worker with a
    free slot, so the others go idle and can retire (the first such in the list on a tie).
    Under a burst (`spread` > 1, see :meth:`WorkerPool.spread`) into the `spread` busiest,
    the least held of them first, so call set-ups run on each core instead of queueing in
    one process."""
    open_workers = [w for w in workers if w.free > 0]
    if not open_workers:
        return None
    if spread <= 1:
        return max(open_workers, key=lambda w: len(w.held))  # the first on a tie
    ranked = sorted(open_workers, key=lambda w: -len(w.held))[:spread]  # stable: list order on a tie
    return min(ranked, key=lambda w: len(w.held))


class Worker:
    """The pool's handle on one worker process and its call slots."""

    def __init__(self, wid: int, slot: int, ports: tuple[int, int], capacity: int = 1) -> None:
        self.id = wid
        self.slot = slot
        """Its slice of the RTP range (an index into WorkerPool.slots)."""
        self.rtp_ports = ports
        self.capacity = capacity
        """Calls it takes at once: planned by the pool, then what its `ready` said."""
        self.life = WorkerState.STARTING
        """STARTING, IDLE (running: see `state`), RETIRING or DEAD."""
        self.held: list[CallSlot] = []
        """Its slots in use: acquired, or reported by call_started."""
        self.cooling = 0
        """Slots resting after their call (see the module docstring)."""
        self.draining = False
        """recycle_after reached: no new call; retired once its last slot is free."""
        self.proc: asyncio.subprocess.Process | None = None
        """Set when the worker was exec'd; None when forked by the zygote."""
        self.writer: asyncio.StreamWriter | None = None
        self.pid = 0
        self.sip_port = 0
        self.calls = 0
        self.idle_since = time.monotonic()
        self.started_at = time.monotonic()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ping_seq = 0
        self.ping_sent: float | None = None
        self.last_pong = 0.0
        self.exit_reason = ""
        self.returncode: int | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        """Resolved with the exit status (for a forked worker, when the zygote reaps it)."""
        self.reader: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        tokens = ",".join(str(s.token) for s in self.held) or "-"
        return f"Worker(#{self.id} pid={self.pid} port={self.sip_port} {self.state.value} calls={tokens})"

    @property
    def state(self) -> WorkerState:
        """The life stage; while running, what its slots do: BUSY (a call held), COOLING
        (a slot resting) or IDLE."""
        if self.life is not WorkerState.IDLE:
            return self.life
        if self.held:
            return WorkerState.BUSY
        return WorkerState.COOLING if self.cooling else WorkerState.IDLE

    @property
    def running(self) -> bool:
        return self.life is WorkerState.IDLE

    @property
    def free(self) -> int:
        """Slots a new call may take now (none while starting, draining or retiring)."""
        if not self.running or self.draining:
            return 0
        return max(0, self.capacity - len(self.held) - self.cooling)

    @property
    def token(self) -> str | None:
        """The call it holds (the first one, when it holds several)."""
        return self.held[0].token if self.held else None

    @property
    def in_call(self) -> bool:
        return any(s.in_call for s in self.held)

    @property
    def tokens(self) -> list[str]:
        return [s.token for s in self.held if s.token]

    def slot_for(self, token: str | None) -> CallSlot | None:
        """The slot of call `token`; for None, the one slot held if there is exactly one."""
        if token is None:
            return self.held[0] if len(self.held) == 1 else None
        return next((s for s in self.held if s.token == token), None)

    @property
    def address(self) -> tuple[str, int]:
        """Where the edge relays the INVITE: (host, SIP UDP port)."""
        return P.LOOPBACK, self.sip_port

    def send(self, cmd: str, **fields: Any) -> bool:
        """Queue one command line; False when the worker can no longer be told."""
        writer = self.writer
        if writer is None or writer.is_closing():
            return False
        try:
            writer.write(P.encode("cmd", cmd, **fields))
        except (OSError, RuntimeError):
            return False
        return True

    def close_stdin(self) -> None:
        """EOF on the worker's command channel: it hangs up and exits.  For a forked
        worker this is a half-close, so its last events can still be read."""
        writer = self.writer
        if writer is None or writer.is_closing():
            return
        with contextlib.suppress(OSError, RuntimeError):
            if self.proc is None and writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()

    def kill(self) -> None:
        if self.exited.done():
            return
        if self.proc is not None:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
        elif self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class _Zygote:
    """The fork server process (``worker --zygote``) and its spawn socket."""

    def __init__(self, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.alive = True
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reader: asyncio.Task[None] | None = None
        self.workers: dict[int, Worker] = {}
        """Forked workers by id, until the zygote reports their exit."""
        self.calls = 1
        """Calls per worker the build allows (its ready's `calls`, when probed)."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        """EOF on its spawn socket: the zygote exits (its workers live on)."""
        self.alive = False
        with contextlib.suppress(OSError):
            self.sock.close()


class WorkerPool:
    """Warm media workers for the edge; see the module docstring for the life cycle."""

    def __init__(
        self,
        min_idle: int = 1,
        max_calls: int = 8,
        rtp_ports: tuple[int, int] | str = (10000, 10999),
        edge_address: tuple[str, int] | str = ("127.0.0.1", 5060),
        *,
        rtp_address: str = P.LOOPBACK,
        on_event: EventCallback | None = None,
        worker_died: DiedCallback | None = None,
        health_interval: float = 2.0,
        cooldown: float = 0.6,
        ready_timeout: float = 10.0,
        acquire_timeout: float = ACQUIRE_TIMEOUT,
        calls_per_worker: int = 1,
        max_starting: int = 0,
        recycle_after: int = 200,
        idle_retire_after: float = 20.0,
        stop_timeout: float = 5.0,
        log_level: int = 1,
        worker_args: Sequence[str] = (),
        worker_command: Sequence[str] | None = None,
        zygote: bool | None = None,
        stderr: int | IO[Any] | None = None,
    ) -> None:
        if max_calls < 1 or min_idle < 0 or calls_per_worker < 0:
            raise ValueError("need max_calls >= 1, min_idle >= 0 and calls_per_worker >= 0")
        ports = P.parse_port_range(rtp_ports) if isinstance(rtp_ports, str) else rtp_ports
        self.ports = ports
        self.slots = P.split_port_range(ports, P.workers_needed(max_calls, 1, SPARE_SLOTS))
        """The RTP range cut into one slice per worker (re-cut by start() for its capacity)."""
        self.calls_per_worker = calls_per_worker
        """Asked for: calls a worker takes at once; 0 = as many as the build allows (at
        most AUTO_CALLS_CAP); 1 = one process per call."""
        self.capacity = 1
        """Calls a new worker takes at once: calls_per_worker cut to the build's limit, to
        max_calls and to what the RTP range holds (known after start())."""
        self.edge = edge_address if isinstance(edge_address, str) else f"{edge_address[0]}:{edge_address[1]}"
        self.rtp_address = rtp_address
        """Where workers bind RTP (`protocol.rtp_address` of the edge's listener)."""
        self.min_idle = min(min_idle, max_calls)
        self.max_calls = max_calls
        self.on_event = on_event
        self.worker_died = worker_died
        self.health_interval = health_interval
        self.cooldown = cooldown
        self.ready_timeout = ready_timeout
        self.acquire_timeout = acquire_timeout
        self.max_starting = max_starting or max(2, 2 * (os.cpu_count() or 1))
        """Workers starting at once, at most (0: twice the cores, at least 2)."""
        self.recycle_after = recycle_after
        self.idle_retire_after = idle_retire_after
        self.stop_timeout = stop_timeout
        self.log_level = log_level
        self.worker_args = list(worker_args)
        default_command = [sys.executable, "-m", "appliance.media.worker"]
        self.worker_command = list(worker_command) if worker_command else default_command
        self.use_zygote = (worker_command is None) if zygote is None else zygote
        """Fork workers from a zygote that has pjsua2 imported (halves PSS, faster start);
        a custom worker_command (tests' fake workers) is exec'd."""
        self._zygote: _Zygote | None = None
        self._zygote_lock = asyncio.Lock()
        self.stderr = stderr
        self.workers: list[Worker] = []
        self._ids = itertools.count(1)
        self._used_slots: set[int] = set()
        self._stopping = False
        self._started = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._health: asyncio.Task[None] | None = None
        self._backoff = 0.0
        self._respawn_at = 0.0
        self._topup_pending = False
        self._waiters: deque[tuple[str | None, asyncio.Future[Worker | None]]] = deque()
        """Calls waiting for a worker, first come first served."""
        self._arrivals: deque[float] = deque(maxlen=4096)
        self.cores = len(os.sched_getaffinity(0))
        """Workers a burst spreads over (see spread)."""
        self.spawned = 0
        """Workers started so far (a crash loop shows as many)."""
        self.start_seconds = 0.2
        """How long a worker takes to become ready, smoothed over the last starts."""
        self._start_failures = 0
        self.unavailable: str | None = None
        """Why the media engine does not load here (a process said EV_UNAVAILABLE): then
        no worker is started again and acquire() answers None at once."""

    # -- public ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the warm workers and wait until they are ready (failures are logged and
        retried in the background; start() itself does not fail for them)."""
        self._started = True
        await self._learn_capacity()
        if self.unavailable is not None:
            return
        starting = [self._spawn() for _ in range(self._workers_for(self.min_idle))]
        spawned = [w for w in starting if w is not None]
        if spawned:  # a worker that fails to start is reported by _on_exit, not raised here
            await asyncio.gather(*(self._wait_ready(w) for w in spawned), return_exceptions=True)
        self._health = asyncio.get_running_loop().create_task(self._health_loop(), name="media-health")
        self._plan()

    async def _learn_capacity(self) -> None:
        """Before the first worker: how many calls one takes (the build's limit, asked of
        the zygote or of a probe process), and the RTP range cut for that many."""
        wanted = self.calls_per_worker or AUTO_CALLS_CAP
        wanted = min(wanted, self.max_calls)
        if wanted > 1:
            built = await self._probe(wanted)
            if self.unavailable is not None:
                return
            calls = P.fit_calls(self.ports, self.max_calls, min(wanted, built), SPARE_SLOTS)
            if calls < min(wanted, built):
                log.warning("event=media_rtp_ports_limit %s", f"calls_per_worker={calls} wanted={min(wanted, built)}"
                            f" rtp_ports={P.format_port_range(self.ports)}")
            self.capacity = calls
        if self.capacity > 1:
            self.slots = P.split_port_range(self.ports, P.workers_needed(self.max_calls, self.capacity, SPARE_SLOTS),
                                            self.capacity)
        log.info("event=media_pool_capacity calls_per_worker=%s asked=%s workers_max=%s", self.capacity,
                 self.calls_per_worker or "auto", len(self.slots) - SPARE_SLOTS)

    async def _probe(self, wanted: int) -> int:
        """Calls per worker the build allows (at most `wanted`); 1 when nobody can tell."""
        if self.use_zygote:
            zygote = await self._get_zygote(probe=wanted)
            if zygote is not None:
                return zygote.calls
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.worker_command, "--probe-calls", str(wanted), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=self.stderr, env=self._env(), cwd=str(REPO_ROOT))
            out, _ = await asyncio.wait_for(proc.communicate(), self.ready_timeout)
            answer = P.decode(out.splitlines()[-1])
            if answer.get("event") == P.EV_UNAVAILABLE:
                self._engine_unavailable(answer.get("error"))
                return 1
            return max(1, int(answer["calls"]))
        except (OSError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
            log.warning("event=media_probe_failed error=%r", exc)
            return 1

    def spread(self) -> int:
        """Over how many workers new calls go (pick_worker): one a core under a burst
        (SPREAD_RATE), else one, so idle workers can retire."""
        if arrival_rate(self._arrivals, time.monotonic(), SPREAD_WINDOWS) >= SPREAD_RATE:
            return self.cores
        return 1

    def _workers_for(self, calls: int) -> int:
        """Workers that hold `calls` calls at the pool's capacity."""
        return -(-calls // self.capacity)

    async def acquire(self, token: str | None = None) -> Worker | None:
        """A worker for a new call, one of its slots held for `token` (the busiest worker
        with a free slot).  Returns at once when a slot is free, else
        waits (first come first served) until one is ready, at most `acquire_timeout`
        (FULL_GRACE when max_calls calls are already held or waiting); None when the wait
        runs out (the edge answers 503 with Retry-After).  Cancelling the caller's task
        drops the wait (a worker handed over meanwhile goes back to the pool)."""
        worker = self.try_acquire(token)
        if worker is not None:
            return worker
        return await self.wait_for_worker(token)

    def try_acquire(self, token: str | None = None) -> Worker | None:
        """A slot held for `token` in a worker ready now, or None: then `wait_for_worker`.
        The edge's usual case (a worker is warm) needs no task and no turn of the loop."""
        if self._stopping or not self._started or self.unavailable is not None:
            return None
        self._arrivals.append(time.monotonic())
        if not self._waiters and self.busy_count < self.max_calls:
            worker = pick_worker(self.workers, self.spread())
            if worker is not None:
                self._assign(worker, token)
                self._plan()
                return worker
        return None

    async def wait_for_worker(self, token: str | None = None) -> Worker | None:
        """Wait for a slot after `try_acquire` found none (see `acquire`)."""
        if self._stopping or not self._started or self.unavailable is not None:
            return None
        loop = asyncio.get_running_loop()
        full = self.busy_count + len(self._waiters) >= self.max_calls
        future: asyncio.Future[Worker | None] = loop.create_future()
        entry = (token, future)
        self._waiters.append(entry)
        timeout = min(FULL_GRACE, self.acquire_timeout) if full else self.acquire_timeout
        timer = loop.call_later(timeout, self._wait_expired, token, future, full)
        self._plan()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and (worker := future.result()) is not None:
                self.release(worker, token)
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    def _wait_expired(self, token: str | None, future: asyncio.Future[Worker | None], full: bool) -> None:
        if not future.done():
            # max_calls held is capacity, not a fault; no worker ready in time while
            # capacity was free is worth a warning.
            log.log(logging.INFO if full else logging.WARNING, "event=media_wait_timeout token=%s full=%s stats=%s",
                    token, full, self.stats())
            future.set_result(None)

    def _assign(self, worker: Worker, token: str | None) -> None:
        worker.held.append(CallSlot(token))

    def _hand_over(self) -> None:
        """Free slots go to the calls still waiting, first come first served."""
        while self._waiters and self.busy_count < self.max_calls:
            worker = pick_worker(self.workers, self.spread())
            if worker is None:
                return
            token, future = self._waiters.popleft()
            if future.done():
                continue
            self._assign(worker, token)
            future.set_result(worker)

    def release(self, worker: Worker, token: str | None = None) -> None:
        """Give back the slot of a call that never reached its worker (or that should be
        ended); ignored when the worker holds no call `token` (None: its one call).  A slot
        in a call is freed on its call_ended; the worker is told to end that call (``end``)
        only if it has not within END_GRACE (the edge releases on the BYE it relays to the
        worker: an end sent at once raced that BYE, and the worker BYEd a caller that had
        just hung up).  Idempotent."""
        slot = worker.slot_for(token)
        if slot is None or not worker.running:
            return
        if slot.in_call:
            asyncio.get_running_loop().call_later(END_GRACE, self._end_if_still, worker, slot)
            return
        self._free(worker, slot, self.cooldown)

    def _end_if_still(self, worker: Worker, slot: CallSlot) -> None:
        if worker.running and slot.in_call and slot in worker.held:
            if slot.token is not None:
                worker.send(P.CMD_END, token=slot.token)
            else:
                worker.send(P.CMD_END_ALL)

    async def stop(self) -> None:
        """Clean shutdown of every worker (each BYEs its call and exits); whatever has not
        exited after stop_timeout is killed.  Leaves no process behind."""
        self._stopping = True
        if self._health is not None:
            self._health.cancel()
        for task in list(self._tasks):
            task.cancel()
        for _, future in self._waiters:
            if not future.done():
                future.set_result(None)
        for worker in self.workers:
            if worker.state is not WorkerState.DEAD:
                worker.life = WorkerState.RETIRING
                worker.exit_reason = worker.exit_reason or "pool stopped"
                worker.send(P.CMD_QUIT)
                worker.close_stdin()
        readers = [w.reader for w in self.workers if w.reader is not None and not w.reader.done()]
        if readers:
            _, pending = await asyncio.wait(readers, timeout=self.stop_timeout)
            if pending:
                for worker in self.workers:
                    worker.kill()
                await asyncio.wait(pending, timeout=2.0)
        # Forked workers are the zygote's children: wait until it has reaped them, so
        # no pid outlives stop(), then let the zygote go.
        if self._zygote is not None:
            zygote, self._zygote = self._zygote, None
            exits = [w.exited for w in zygote.workers.values() if not w.exited.done()]
            if exits and zygote.alive:
                await asyncio.wait(exits, timeout=2.0)
            zygote.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(zygote.proc.wait(), self.stop_timeout)
            if zygote.proc.returncode is None:
                zygote.proc.kill()
                await zygote.proc.wait()
            if zygote.reader is not None:
                await asyncio.wait([zygote.reader], timeout=1.0)
        with contextlib.suppress(asyncio.CancelledError):
            if self._health is not None:
                await self._health

    @property
    def idle_count(self) -> int:
        """Free call slots (with one call per worker: the idle workers)."""
        return sum(w.free for w in self.workers)

    @property
    def busy_count(self) -> int:
        """Calls held (slots acquired or in a call)."""
        return sum(len(w.held) for w in self.workers if w.running)

    def stats(self) -> dict[str, Any]:
        """For logs and the TUI (counts of calls, i.e. slots, except `workers`)."""
        return {
            "idle": self.idle_count,
            "busy": self.busy_count,
            "starting": sum(w.capacity for w in self.workers if w.state is WorkerState.STARTING),
            "cooling": sum(w.cooling for w in self.workers if w.running),
            "waiting": len(self._waiters),
            "max_calls": self.max_calls,
            "calls_per_worker": self.capacity,
            "workers": sum(1 for w in self.workers if w.state is not WorkerState.DEAD),
            "pids": [w.pid for w in self.workers if w.pid],
        }

    def worker_for(self, token: str) -> Worker | None:
        """The running worker carrying call `token` (for relaying a join)."""
        return next((w for w in self.workers if w.running and w.slot_for(token) is not None), None)

    # -- spawning --------------------------------------------------------------------------
    def _spawn(self) -> Worker | None:
        free = [i for i in range(len(self.slots)) if i not in self._used_slots]
        if not free or self._stopping:
            log.warning("event=media_spawn_refused reason=%s", "stopping" if self._stopping else "no port slot")
            return None
        slot = free[0]
        self._used_slots.add(slot)
        worker = Worker(next(self._ids), slot, self.slots[slot], self.capacity)
        self.workers.append(worker)
        self.spawned += 1
        # Not in self._tasks: stop() must let readers see their worker's clean exit.
        loop = asyncio.get_running_loop()
        worker.reader = loop.create_task(self._run(worker), name=f"media-worker-{worker.id}")
        loop.call_later(self.ready_timeout, self._not_ready, worker)
        return worker

    def _not_ready(self, worker: Worker) -> None:
        if worker.state is WorkerState.STARTING:
            worker.exit_reason = "not ready in time"
            worker.kill()

    def _argv(self, worker: Worker) -> list[str]:
        return [
            *self.worker_command,
            "--sip-port", "0",
            "--rtp-ports", P.format_port_range(worker.rtp_ports),
            "--rtp-address", self.rtp_address,
            "--edge", self.edge,
            "--log-level", str(self.log_level),
            *(["--calls", str(worker.capacity)] if worker.capacity > 1 else []),
            *self.worker_args,
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    async def _start_process(self, worker: Worker) -> asyncio.StreamReader:
        """Fork the worker from the zygote (or exec it); returns its event stream."""
        zygote = await self._get_zygote() if self.use_zygote else None
        if self.unavailable is not None:
            raise MediaUnavailable(self.unavailable)
        if zygote is not None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                argv = self._argv(worker)[len(self.worker_command) :]
                request = P.encode("cmd", "spawn", id=worker.id, argv=argv)
                socket.send_fds(zygote.sock, [request], [theirs.fileno()])
            except OSError:
                ours.close()
                raise
            finally:
                theirs.close()
            zygote.workers[worker.id] = worker
            reader, worker.writer = await asyncio.open_unix_connection(sock=ours, limit=1 << 20)
            return reader
        worker.proc = await asyncio.create_subprocess_exec(
            *self._argv(worker),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.stderr,
            env=self._env(),
            cwd=str(REPO_ROOT),
            start_new_session=True,  # the terminal's ^C is the edge's business
            limit=1 << 20,
        )
        worker.pid = worker.proc.pid
        worker.writer = worker.proc.stdin
        assert worker.proc.stdout is not None
        return worker.proc.stdout

    async def _run(self, worker: Worker) -> None:
        """Start the process, read its events until EOF, then account for its exit."""
        try:
            stdout = await self._start_process(worker)
            if worker.state is WorkerState.RETIRING:  # stop() came while it was starting
                worker.send(P.CMD_QUIT)
                worker.close_stdin()
            while True:
                try:
                    line = await stdout.readline()
                except ValueError:  # an over-long line: skip it
                    continue
                if not line:
                    break
                try:
                    event = P.decode(line)
                except ValueError:
                    log.warning("event=media_bad_line worker=%s line=%r", worker.id, line[:200])
                    continue
                self._on_event(worker, event)
        except asyncio.CancelledError:
            worker.kill()
            raise
        except MediaUnavailable:
            worker.exit_reason = "media engine unavailable"
        except Exception as exc:
            log.error("event=media_worker_error worker=%s error=%r", worker.id, exc)
            worker.kill()
        finally:
            if worker.writer is not None:
                worker.writer.close()
            if worker.proc is not None:
                with contextlib.suppress(Exception):
                    rc = await asyncio.shield(worker.proc.wait())
                    worker.returncode = rc
                    if not worker.exited.done():
                        worker.exited.set_result(rc)
            self._on_exit(worker)

    def _engine_unavailable(self, error: object) -> None:
        """pjsua2 does not load on this box: said once, as one line; nothing is retried
        (it will not load on the next try either) and calls go unanchored."""
        if self.unavailable is not None:
            return
        self.unavailable = str(error or "unknown")
        log.error("event=media_engine_unavailable error=%r action=calls_not_anchored hint=%r", self.unavailable,
                  "pjsua2 does not load here: reinstall homepbx, or set [media] max_calls = 0")

    # -- zygote ----------------------------------------------------------------------------
    async def _get_zygote(self, probe: int = 0) -> _Zygote | None:
        """The running zygote, started on first use; None (exec instead) if it cannot start.
        `probe` > 1: it also reports how many calls (at most `probe`) a worker takes."""
        async with self._zygote_lock:
            if self._zygote is not None and self._zygote.alive:
                return self._zygote
            if self._stopping:
                return None
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.worker_command, "--zygote", *(["--probe-calls", str(probe)] if probe > 1 else []),
                    stdin=theirs.fileno(), stdout=asyncio.subprocess.PIPE, stderr=self.stderr,
                    env=self._env(), cwd=str(REPO_ROOT), start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                ours.close()
                log.error("event=media_zygote_failed error=%r", exc)
                return None
            finally:
                theirs.close()
            zygote = _Zygote(proc, ours)
            zygote.reader = asyncio.get_running_loop().create_task(self._read_zygote(zygote), name="media-zygote")
            try:
                await asyncio.wait_for(asyncio.shield(zygote.ready), self.ready_timeout)
            except (TimeoutError, RuntimeError) as exc:
                if self.unavailable is None:  # else start() says why, once
                    log.error("event=media_zygote_failed error=%r", exc)
                zygote.close()
                return None
            if self._stopping:  # stop() ran meanwhile: do not leave it behind
                zygote.close()
                return None
            self._zygote = zygote
            log.debug("event=media_zygote_ready pid=%s", proc.pid)
            return zygote

    async def _read_zygote(self, zygote: _Zygote) -> None:
        assert zygote.proc.stdout is not None
        try:
            async for line in zygote.proc.stdout:
                try:
                    event = P.decode(line)
                except ValueError:
                    continue
                kind = event.get("event")
                if kind == P.EV_READY and not zygote.ready.done():
                    with contextlib.suppress(TypeError, ValueError):
                        zygote.calls = max(1, int(event.get("calls", 1)))
                    zygote.ready.set_result(None)
                elif kind == P.EV_UNAVAILABLE:
                    self._engine_unavailable(event.get("error"))
                elif kind == "spawned":
                    worker = zygote.workers.get(int(event.get("id", 0)))
                    if worker is not None and not worker.pid:
                        worker.pid = int(event["pid"])
                elif kind == "exited":
                    pid, rc = int(event["pid"]), int(event["rc"])
                    for wid, worker in list(zygote.workers.items()):
                        if worker.pid == pid:
                            worker.returncode = rc
                            if not worker.exited.done():
                                worker.exited.set_result(rc)
                            del zygote.workers[wid]
        finally:
            zygote.alive = False
            if not zygote.ready.done():
                zygote.ready.set_exception(RuntimeError("zygote exited"))
                zygote.ready.exception()
            with contextlib.suppress(Exception):
                await zygote.proc.wait()
            if not self._stopping and self.unavailable is None:
                log.warning("event=media_zygote_exited rc=%s", zygote.proc.returncode)

    async def _wait_ready(self, worker: Worker) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), self.ready_timeout)
        except TimeoutError:
            worker.exit_reason = "not ready in time"
            worker.kill()
            raise

    def _task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _plan(self) -> None:
        """Start workers ahead of demand: the calls waiting, plus warm_target() for the
        recent arrival rate, within max_calls, max_starting and the crash backoff."""
        if self._stopping or not self._started or self._topup_pending or self.unavailable is not None:
            return
        delay = max(self._respawn_at - time.monotonic(), 0.0)
        if delay > 0:
            self._topup_pending = True

            async def later() -> None:
                await asyncio.sleep(delay)
                self._topup_pending = False
                self._plan()

            self._task(later(), "media-topup")
            return
        # In calls (slots): warm = free, resting or starting; open = every slot of the
        # workers that may still take calls.
        starting = [w for w in self.workers if w.state is WorkerState.STARTING]
        running = [w for w in self.workers if w.running]
        busy = sum(len(w.held) for w in running)
        warm = (sum(w.capacity for w in starting)
                + sum(w.free + w.cooling for w in running if not w.draining))
        opened = sum(w.capacity for w in starting) + sum(w.capacity for w in running if not w.draining)
        waiting = sum(1 for _, f in self._waiters if not f.done())
        rate = arrival_rate(self._arrivals, time.monotonic())
        want = waiting + warm_target(rate, self.start_seconds, self.min_idle, self.max_calls - busy - waiting)
        spawn = min(self._workers_for(want - warm), self._workers_for(self.max_calls - opened),
                    self.max_starting - len(starting), len(self.slots) - len(self._used_slots))
        for _ in range(max(spawn, 0)):
            if self._spawn() is None:
                break

    # -- events ----------------------------------------------------------------------------
    def _on_event(self, worker: Worker, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == P.EV_UNAVAILABLE:
            worker.exit_reason = "media engine unavailable"
            self._engine_unavailable(event.get("error"))
            return
        if kind == P.EV_READY:
            worker.sip_port = int(event.get("sip_port", 0))
            worker.pid = int(event.get("pid", worker.pid))
            took = time.monotonic() - worker.started_at
            self.start_seconds = 0.7 * self.start_seconds + 0.3 * min(took, self.ready_timeout)
            if self._start_failures:
                log.info("event=media_worker_start_recovered failures=%s", self._start_failures)
                self._start_failures = 0
            with contextlib.suppress(TypeError, ValueError):
                worker.capacity = max(1, int(event.get("calls", 1)))
            if worker.state is WorkerState.STARTING:
                worker.life = WorkerState.IDLE
                worker.idle_since = time.monotonic()
                self._hand_over()
            if not worker.ready.done():
                worker.ready.set_result(None)
            log.debug("event=media_worker_ready worker=%s pid=%s port=%s took=%.3f", worker.id, worker.pid,
                      worker.sip_port, took)
            self._plan()
            return
        if kind == P.EV_PONG:
            if event.get("seq") == worker.ping_seq:
                worker.ping_sent = None
                worker.last_pong = time.monotonic()
            return
        token = event.get("token")
        token = str(token) if token is not None else None
        slot = worker.slot_for(token) or next((s for s in worker.held if s.token is None), None)
        if kind == P.EV_CALL_STARTED:
            if slot is None and worker.running:  # relayed without acquire()
                slot = CallSlot(token)
                worker.held.append(slot)
            if slot is not None:
                slot.in_call = True
                slot.token = slot.token or token
        elif kind == P.EV_CALL_ENDED:
            if slot is not None:
                slot.in_call = False
            worker.calls += 1
            if self.recycle_after and worker.calls >= self.recycle_after:
                worker.draining = True
        elif kind == P.EV_ERROR:
            log.warning("event=media_worker_error worker=%s pid=%s detail=%r", worker.id, worker.pid, event)
        if self.on_event is not None:
            try:
                self.on_event(worker, event)
            except Exception:
                log.exception("event=media_on_event_failed worker=%s", worker.id)
        if kind == P.EV_CALL_ENDED and slot is not None and worker.running:
            self._free(worker, slot, self.cooldown)

    def _free(self, worker: Worker, slot: CallSlot, cooldown: float = 0.0) -> None:
        """A call's slot is given back, after `cooldown` seconds of rest."""
        if slot not in worker.held:
            return
        worker.held.remove(slot)
        if self._stopping:
            return
        if cooldown > 0:
            worker.cooling += 1
            asyncio.get_running_loop().call_later(cooldown, self._cooled, worker)
            return
        self._slot_back(worker)

    def _cooled(self, worker: Worker) -> None:
        worker.cooling = max(0, worker.cooling - 1)
        if worker.running and not self._stopping:
            self._slot_back(worker)

    def _slot_back(self, worker: Worker) -> None:
        """A slot is free: a worker left without calls is idle (or recycled); waiting
        calls get the free slots."""
        if not worker.held and not worker.cooling:
            worker.idle_since = time.monotonic()
            if worker.draining:
                self._retire(worker, f"recycled after {worker.calls} calls")
        self._hand_over()
        self._plan()

    def _shrink(self, now: float) -> None:
        """Retire workers idle for `idle_retire_after` beyond the warm_target kept warm (in
        free slots): a burst of calls should not hold 8 MB and 0.3 % of a core (pjmedia's
        thread polls every 10 ms) per idle worker for long; warm_target still covers the
        recent rate.  Calls are packed into the busiest workers, so the others go idle."""
        idle = sorted((w for w in self.workers if w.state is WorkerState.IDLE and not w.draining),
                      key=lambda w: w.idle_since)
        keep = warm_target(arrival_rate(self._arrivals, now), self.start_seconds, self.min_idle, self.max_calls)
        free = self.idle_count
        for worker in idle:
            if free - worker.free < keep:
                break
            if now - worker.idle_since >= self.idle_retire_after:
                free -= worker.free
                self._retire(worker, f"idle for {now - worker.idle_since:.0f}s")

    def _retire(self, worker: Worker, reason: str) -> None:
        worker.life = WorkerState.RETIRING
        worker.exit_reason = reason
        worker.send(P.CMD_QUIT)
        worker.close_stdin()

    def _on_exit(self, worker: Worker) -> None:
        previous = worker.state
        worker.life = WorkerState.DEAD
        self._used_slots.discard(worker.slot)
        if worker in self.workers:
            self.workers.remove(worker)
        if not worker.ready.done():
            worker.ready.set_exception(RuntimeError(f"media worker exited ({worker.exit_reason or worker.returncode})"))
            worker.ready.exception()  # retrieved: no "never retrieved" warning
        expected = previous is WorkerState.RETIRING
        if expected:
            log.debug("event=media_worker_exit worker=%s pid=%s reason=%r", worker.id, worker.pid, worker.exit_reason)
            self._plan()
            return
        tokens = worker.tokens if previous is WorkerState.BUSY else []
        now = time.monotonic()
        if now - worker.started_at < CRASH_WINDOW:
            self._backoff = min(max(self._backoff * 2, 0.5), MAX_BACKOFF)
            self._respawn_at = now + self._backoff
        else:
            self._backoff = 0.0
        if previous is WorkerState.STARTING and self.unavailable is not None:
            pass  # said once by _engine_unavailable
        elif previous is WorkerState.STARTING:
            # Reported once until a worker starts again; retried after the backoff.
            self._start_failures += 1
            level = logging.WARNING if self._start_failures == 1 else logging.DEBUG
            log.log(level, "event=media_worker_start_failed worker=%s rc=%s reason=%r failures=%s retry_in=%.1f",
                    worker.id, worker.returncode, worker.exit_reason, self._start_failures,
                    max(self._respawn_at - now, 0.0))
        else:
            log.warning(
                "event=media_worker_died worker=%s pid=%s rc=%s state=%s reason=%r tokens=%s",
                worker.id, worker.pid, worker.returncode, previous.value, worker.exit_reason, tokens,
            )  # fmt: skip
        if self.worker_died is not None and previous is not WorkerState.STARTING:
            try:
                self.worker_died(worker, tokens)
            except Exception:
                log.exception("event=media_worker_died_callback_failed worker=%s", worker.id)
        self._plan()

    # -- health ----------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        """Ping every live worker each interval; one whose previous ping is still
        unanswered a full interval later is killed (and then replaced like a crash)."""
        while not self._stopping:
            await asyncio.sleep(self.health_interval)
            now = time.monotonic()
            self._shrink(now)
            for worker in list(self.workers):
                if worker.state not in (WorkerState.IDLE, WorkerState.BUSY, WorkerState.COOLING):
                    continue
                if worker.ping_sent is not None and now - worker.ping_sent >= self.health_interval * 0.9:
                    worker.exit_reason = f"no pong for {now - worker.ping_sent:.1f}s"
                    log.warning("event=media_worker_unresponsive worker=%s pid=%s", worker.id, worker.pid)
                    worker.kill()
                    continue
                if worker.ping_sent is None:
                    worker.ping_seq += 1
                    worker.ping_sent = now
                    worker.send(P.CMD_PING, seq=worker.ping_seq)
