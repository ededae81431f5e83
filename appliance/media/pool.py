"""The media worker pool: spawns, hands out, health-checks and replaces worker processes.

asyncio only, and never imports pjsua2: a worker is a child process spoken to in JSON
lines (see :mod:`.protocol`).  One worker carries one call, so ``max_calls`` is also the
most worker processes alive at once.  A worker takes ~100 ms to start (more on a busy box),
far more than the call-setup budget, so the pool keeps workers warm ahead of demand: at
least ``min_idle``, and as many as the recent arrival rate would use up while one starts
(:func:`warm_target`).  A call that still finds none idle waits for one (``acquire`` is
bounded by ``acquire_timeout``); only ``max_calls`` calls in progress refuse it.  At most
``max_starting`` workers start at once, so a burst does not starve the box's few cores.

Life of a worker: STARTING -> IDLE -> BUSY (acquired) -> COOLING (its ``call_ended``) ->
IDLE ... -> RETIRING (recycled after ``recycle_after`` calls, or the pool stops) -> DEAD.  A worker
that exits on its own, or stops answering pings and is killed, is reported through
``worker_died(worker, tokens)`` (so the edge can BYE the parties it still can) and
replaced.  Each worker owns a fixed slice of the RTP range, so workers never collide on
a port, not even a new one starting while a dead one's sockets linger.

COOLING exists because pjlib frees a closed socket's ioqueue slot only 500 ms later
(PJ_IOQUEUE_KEY_FREE_DELAY) out of 64: a worker given ~16 short calls inside half a
second aborts on an assertion.  After a call it rests ``cooldown`` seconds.
"""

from __future__ import annotations

import asyncio
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
from pathlib import Path
from typing import IO, Any, Final

from appliance.media import protocol as P

__all__ = ["Worker", "WorkerPool", "WorkerState", "arrival_rate", "warm_target"]

log = logging.getLogger("homepbx.media")

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
SPARE_SLOTS: Final = 2
"""Port slices beyond max_calls: room for replacements while old workers exit."""
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
RATE_WINDOWS: Final = (1.0, 10.0)
"""Arrival rate: the higher of the last second's and the last ten seconds' (see arrival_rate)."""
WARM_HEADROOM: Final = 2.0
"""Keep warm what arrives in this many worker start times (see warm_target)."""


def arrival_rate(arrivals: Sequence[float], now: float, windows: Sequence[float] = RATE_WINDOWS) -> float:
    """Calls per second lately, from the arrival times (oldest first): the highest rate
    over each window ending `now`, so a burst is seen within a second and a steady trickle
    is not forgotten between two calls."""
    best = 0.0
    for window in windows:
        count = 0
        for t in reversed(arrivals):
            if now - t > window:
                break
            count += 1
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


class WorkerState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    COOLING = "cooling"
    RETIRING = "retiring"
    DEAD = "dead"


class Worker:
    """The pool's handle on one worker process."""

    def __init__(self, wid: int, slot: int, ports: tuple[int, int]) -> None:
        self.id = wid
        self.slot = slot
        self.rtp_ports = ports
        self.state = WorkerState.STARTING
        self.proc: asyncio.subprocess.Process | None = None
        """Set when the worker was exec'd; None when forked by the zygote."""
        self.writer: asyncio.StreamWriter | None = None
        self.pid = 0
        self.sip_port = 0
        self.token: str | None = None
        """The call this worker is acquired for (or reported by call_started)."""
        self.in_call = False
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
        return f"Worker(#{self.id} pid={self.pid} port={self.sip_port} {self.state.value} token={self.token})"

    @property
    def address(self) -> tuple[str, int]:
        """Where the edge relays the INVITE: (host, SIP UDP port)."""
        return P.LOOPBACK, self.sip_port

    @property
    def warm(self) -> bool:
        """Idle, or soon to be: starting, or resting after a call."""
        return self.state in (WorkerState.IDLE, WorkerState.STARTING, WorkerState.COOLING)

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
        if max_calls < 1 or min_idle < 0:
            raise ValueError("need max_calls >= 1 and min_idle >= 0")
        ports = P.parse_port_range(rtp_ports) if isinstance(rtp_ports, str) else rtp_ports
        self.slots = P.split_port_range(ports, max_calls + SPARE_SLOTS)
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
        self.start_seconds = 0.2
        """How long a worker takes to become ready, smoothed over the last starts."""
        self._start_failures = 0

    # -- public ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the warm workers and wait until they are ready (failures are logged and
        retried in the background; start() itself does not fail for them)."""
        self._started = True
        starting = [self._spawn() for _ in range(self.min_idle)]
        spawned = [w for w in starting if w is not None]
        if spawned:
            await asyncio.wait([asyncio.ensure_future(self._wait_ready(w)) for w in spawned])
        self._health = asyncio.get_running_loop().create_task(self._health_loop(), name="media-health")
        self._plan()

    async def acquire(self, token: str | None = None) -> Worker | None:
        """A worker for a new call, marked BUSY.  Returns at once when one is idle, else
        waits (first come first served) until one is ready, at most `acquire_timeout`
        (FULL_GRACE when max_calls calls are already held or waiting); None when the wait
        runs out (the edge answers 503 with Retry-After).  Cancelling the caller's task
        drops the wait (a worker handed over meanwhile goes back to the pool)."""
        if self._stopping or not self._started:
            return None
        loop = asyncio.get_running_loop()
        self._arrivals.append(time.monotonic())
        if not self._waiters:
            worker = next((w for w in self.workers if w.state is WorkerState.IDLE), None)
            if worker is not None:
                self._assign(worker, token)
                self._plan()
                return worker
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
        worker.state = WorkerState.BUSY
        worker.token = token
        worker.in_call = False

    def _hand_over(self, worker: Worker) -> bool:
        """An idle worker goes to the first call still waiting; False when none waits."""
        while self._waiters:
            token, future = self._waiters.popleft()
            if future.done():
                continue
            self._assign(worker, token)
            future.set_result(worker)
            return True
        return False

    def release(self, worker: Worker, token: str | None = None) -> None:
        """Give back a worker whose call never reached it (or that should be ended);
        ignored when `token` names another call.  A worker in a call becomes idle on its
        call_ended; it is told to end the call only if it has not within END_GRACE (the
        edge releases on the BYE it relays to the worker: an end_all sent at once raced
        that BYE, and the worker BYEd a caller that had just hung up).  Idempotent."""
        if worker.state is not WorkerState.BUSY:
            return
        if token is not None and worker.token is not None and token != worker.token:
            return
        if worker.in_call:
            asyncio.get_running_loop().call_later(END_GRACE, self._end_if_still, worker, worker.token)
            return
        self._to_idle(worker, self.cooldown)

    def _end_if_still(self, worker: Worker, token: str | None) -> None:
        if worker.state is WorkerState.BUSY and worker.in_call and worker.token == token:
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
                worker.state = WorkerState.RETIRING
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
        return sum(1 for w in self.workers if w.state is WorkerState.IDLE)

    @property
    def busy_count(self) -> int:
        return sum(1 for w in self.workers if w.state is WorkerState.BUSY)

    def stats(self) -> dict[str, Any]:
        """For logs and the TUI."""
        return {
            "idle": self.idle_count,
            "busy": self.busy_count,
            "starting": sum(1 for w in self.workers if w.state is WorkerState.STARTING),
            "cooling": sum(1 for w in self.workers if w.state is WorkerState.COOLING),
            "waiting": len(self._waiters),
            "max_calls": self.max_calls,
            "pids": [w.pid for w in self.workers if w.pid],
        }

    def worker_for(self, token: str) -> Worker | None:
        """The busy worker carrying call `token` (for relaying a join)."""
        return next((w for w in self.workers if w.state is WorkerState.BUSY and w.token == token), None)

    # -- spawning --------------------------------------------------------------------------
    def _live_count(self) -> int:
        """Workers that count against max_calls (retiring ones carry no call)."""
        live = (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY, WorkerState.COOLING)
        return sum(1 for w in self.workers if w.state in live)

    def _spawn(self) -> Worker | None:
        free = [i for i in range(len(self.slots)) if i not in self._used_slots]
        if not free or self._stopping:
            log.warning("event=media_spawn_refused reason=%s", "stopping" if self._stopping else "no port slot")
            return None
        slot = free[0]
        self._used_slots.add(slot)
        worker = Worker(next(self._ids), slot, self.slots[slot])
        self.workers.append(worker)
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
            *self.worker_args,
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    async def _start_process(self, worker: Worker) -> asyncio.StreamReader:
        """Fork the worker from the zygote (or exec it); returns its event stream."""
        zygote = await self._get_zygote() if self.use_zygote else None
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

    # -- zygote ----------------------------------------------------------------------------
    async def _get_zygote(self) -> _Zygote | None:
        """The running zygote, started on first use; None (exec instead) if it cannot start."""
        async with self._zygote_lock:
            if self._zygote is not None and self._zygote.alive:
                return self._zygote
            if self._stopping:
                return None
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.worker_command, "--zygote",
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
                    zygote.ready.set_result(None)
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
            if not self._stopping:
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
        if self._stopping or not self._started or self._topup_pending:
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
        counts = dict.fromkeys(WorkerState, 0)
        for w in self.workers:
            counts[w.state] += 1
        starting, busy = counts[WorkerState.STARTING], counts[WorkerState.BUSY]
        warm = starting + counts[WorkerState.IDLE] + counts[WorkerState.COOLING]
        live = warm + busy
        waiting = sum(1 for _, f in self._waiters if not f.done())
        rate = arrival_rate(self._arrivals, time.monotonic())
        want = waiting + warm_target(rate, self.start_seconds, self.min_idle, self.max_calls - busy - waiting)
        spawn = min(want - warm, self.max_calls - live, self.max_starting - starting,
                    len(self.slots) - len(self._used_slots))
        for _ in range(max(spawn, 0)):
            if self._spawn() is None:
                break

    # -- events ----------------------------------------------------------------------------
    def _on_event(self, worker: Worker, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == P.EV_READY:
            worker.sip_port = int(event.get("sip_port", 0))
            worker.pid = int(event.get("pid", worker.pid))
            took = time.monotonic() - worker.started_at
            self.start_seconds = 0.7 * self.start_seconds + 0.3 * min(took, self.ready_timeout)
            if self._start_failures:
                log.info("event=media_worker_start_recovered failures=%s", self._start_failures)
                self._start_failures = 0
            if worker.state is WorkerState.STARTING:
                worker.state = WorkerState.IDLE
                worker.idle_since = time.monotonic()
                self._hand_over(worker)
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
        if kind == P.EV_CALL_STARTED:
            worker.in_call = True
            if worker.state in (WorkerState.IDLE, WorkerState.COOLING):  # relayed without acquire()
                worker.state = WorkerState.BUSY
            if worker.token is None:
                worker.token = event.get("token")
        elif kind == P.EV_CALL_ENDED:
            worker.in_call = False
            worker.calls += 1
        elif kind == P.EV_ERROR:
            log.warning("event=media_worker_error worker=%s pid=%s detail=%r", worker.id, worker.pid, event)
        if self.on_event is not None:
            try:
                self.on_event(worker, event)
            except Exception:
                log.exception("event=media_on_event_failed worker=%s", worker.id)
        if (
            kind == P.EV_CALL_ENDED
            and worker.state is WorkerState.BUSY
            and (worker.token is None or event.get("token") in (None, worker.token))
        ):
            self._to_idle(worker, self.cooldown)

    def _to_idle(self, worker: Worker, cooldown: float = 0.0) -> None:
        worker.token = None
        worker.in_call = False
        if self._stopping:
            return
        if cooldown > 0:
            worker.state = WorkerState.COOLING
            asyncio.get_running_loop().call_later(cooldown, self._cooled, worker)
            return
        if self.recycle_after and worker.calls >= self.recycle_after:
            self._retire(worker, f"recycled after {worker.calls} calls")
        else:
            worker.state = WorkerState.IDLE
            worker.idle_since = time.monotonic()
            self._hand_over(worker)
        self._plan()

    def _shrink(self, now: float) -> None:
        """Retire workers idle for `idle_retire_after` beyond the warm_target kept warm: a
        burst of calls should not hold 8 MB and 0.3 % of a core (pjmedia's thread polls
        every 10 ms) per idle worker for long; warm_target still covers the recent rate."""
        idle = sorted((w for w in self.workers if w.state is WorkerState.IDLE), key=lambda w: w.idle_since)
        keep = warm_target(arrival_rate(self._arrivals, now), self.start_seconds, self.min_idle, self.max_calls)
        for worker in idle[: max(0, len(idle) - keep)]:
            if now - worker.idle_since >= self.idle_retire_after:
                self._retire(worker, f"idle for {now - worker.idle_since:.0f}s")

    def _cooled(self, worker: Worker) -> None:
        if worker.state is WorkerState.COOLING and not self._stopping:
            self._to_idle(worker)

    def _retire(self, worker: Worker, reason: str) -> None:
        worker.state = WorkerState.RETIRING
        worker.exit_reason = reason
        worker.send(P.CMD_QUIT)
        worker.close_stdin()

    def _on_exit(self, worker: Worker) -> None:
        previous = worker.state
        worker.state = WorkerState.DEAD
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
        tokens = [worker.token] if worker.token and (previous is WorkerState.BUSY) else []
        now = time.monotonic()
        if now - worker.started_at < CRASH_WINDOW:
            self._backoff = min(max(self._backoff * 2, 0.5), MAX_BACKOFF)
            self._respawn_at = now + self._backoff
        else:
            self._backoff = 0.0
        if previous is WorkerState.STARTING:
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
