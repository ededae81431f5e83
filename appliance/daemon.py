"""The composition root: builds every component of the running PBX and owns its life.

Nothing imports this module back (`cli` calls `run`). Here the one timer wheel, the
registrar and digest gate, the transports, the live state, the media link, the call
router, the qualifier, the edge, the control server and persistence are made, and each is
handed the few things it uses. This module also owns what belongs to the whole process:
start and stop, reload (SIGHUP and the control socket's `reload`), signals, sd_notify
and the garbage collector's settings. The map of it all is docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from appliance import sdnotify
from appliance.config import Config, ConfigError, LiveConfig, fill_missing_passwords, load_config, update_user
from appliance.control import ControlServer
from appliance.edge.auth_gate import AuthGate
from appliance.edge.calls import CallRouter
from appliance.edge.device_events import DeviceEvents
from appliance.edge.media_link import MediaLink
from appliance.edge.persistence import BindingStore, load_digest_fallback, load_secret, save_digest_fallback
from appliance.edge.qualify import Qualifier
from appliance.edge.seams import CallEventsFanOut
from appliance.edge.server import Edge, policy_for
from appliance.edge.subscriptions import Subscriptions
from appliance.edge.tcp_limits import TcpLimits
from appliance.edge.timers import Deadline, TimerWheel
from appliance.edge.transport import Transports
from appliance.edge.trunks import TrunkRegistrar
from appliance.edge.voicemail import Voicemail
from appliance.history.recorder import HistoryRecorder
from appliance.history.service import CallHistory
from appliance.history.store import FILE_NAME as HISTORY_FILE
from appliance.logs import fields
from appliance.sip.auth import NonceManager
from appliance.sip.authenticator import Authenticator
from appliance.sip.digest_fallback import DigestFallback
from appliance.sip.registrar import Flow, Registrar
from appliance.sip.throttle import FailureThrottle
from appliance.sip.transaction import ServerTransactions
from appliance.state import LiveState
from appliance.voicemail.mailbox import Mailbox

log = logging.getLogger("homepbx")


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim: hands freed heap pages back to the system (None elsewhere: musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()

HOUSEKEEPING_INTERVAL = 1.0
TRIM_AFTER_DIALOGS = 500
"""Once this many dialogs were followed at once and seven eighths of them are gone (a
burst of calls over, their 32-s linger too), the housekeeping gives the memory back."""
"""Registrations expire, server transactions are forgotten, throttle entries swept."""
NONCE_SWEEP_INTERVAL = 60.0
"""The nonce table drops expired entries as it goes; the full O(n) sweep is only a backstop."""


class Daemon:
    """The running PBX: every component, built once and wired here."""

    def __init__(self, config: Config, config_path: Path | None = None, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.config_path = config_path
        self.wall = wall
        self.settings = settings = LiveConfig(config)
        self.timers = timers = TimerWheel(clock)
        state_dir = config.server.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.nonces = NonceManager(load_secret(state_dir / "nonce.key"))
        self.throttle = FailureThrottle()
        reg = config.registration
        self.registrar = registrar = Registrar(reg.min_expires, reg.max_expires, reg.default_expires)
        self.store = BindingStore(state_dir / "bindings.json", registrar, timers)
        self.state = state = LiveState(registrar, settings, wall=wall)
        self.device_events = DeviceEvents(self.store.mark_dirty, state.device_event)
        self.authenticator = Authenticator(config.server.realm, self.nonces, self.throttle,
                                           config.server.digest_algorithms)
        self.fallback_path = state_dir / "digest.json"
        self.fallback = DigestFallback(load_digest_fallback(self.fallback_path))
        auth = AuthGate(self.authenticator, settings, state.address_blocked, self.fallback)
        # Lost TCP connections go to the qualifier and the trunks, both made below (`_tcp_lost`).
        self.transports = network = Transports(timers, TcpLimits.of(config.server), has_binding=self._tcp_bound,
                                               on_lost=self._tcp_lost)
        # The answering machine's store of messages and the lamps that show it: the lamps
        # (message-summary subscriptions) read the counts the store keeps.
        voicemail: Voicemail
        self.subscriptions = Subscriptions(settings, network, auth, registrar, timers,
                                           mailbox=lambda number: voicemail.counts(number))
        self.voicemail = voicemail = Voicemail(settings, Mailbox(state_dir / "voicemail"), timers,
                                               self.subscriptions, publish=state.emit, wall=wall)
        router: CallRouter  # the media link reports to the router, made just below
        self.media = MediaLink(
            config.media,
            on_call_ended=lambda token, reason: router.worker_call_ended(token, reason),
            on_worker_died=lambda token: router.worker_died(token),
            voicemail=voicemail, voicemail_dir=state_dir / "voicemail",
        ) if config.media.max_calls else None
        # The trunks are made before the router: it asks them which requests come from a provider.
        self.trunks = trunks = TrunkRegistrar(settings, network, timers, state, wall=wall)
        self.edit_lock = asyncio.Lock()  # one edit of config.toml at a time (control socket, feature codes)
        # The call history: a row per call, committed by its own thread, then announced.
        self.history = CallHistory(state_dir / HISTORY_FILE, max_days=config.history.max_days,
                                   max_rows=config.history.max_rows, on_committed=self._history_committed, wall=wall)
        self.history_recorder = HistoryRecorder(settings, registrar, self.history, wall=wall)
        events = CallEventsFanOut(state, self.subscriptions, self.history_recorder)
        self.calls = router = CallRouter(settings, network, registrar, auth, events, timers, self.media, trunks,
                                         user_settings=self)
        self.qualifier = Qualifier(settings, network, registrar, timers, self.device_events.publish)
        self.server_tx = ServerTransactions()
        self.edge = Edge(settings, network, auth, registrar, self.throttle, self.server_tx, router, self.qualifier,
                         self.device_events.publish, clock=timers.now, wall=wall, trunks=self.trunks,
                         subscriptions=self.subscriptions)
        # The control socket edits the config file: none without one (tests of the edge alone).
        self.control = ControlServer(state, settings, self, config_path, edit_lock=self.edit_lock,
                                     messages=voicemail, history=self.history) if config_path is not None else None
        self._edits: set[asyncio.Task[None]] = set()
        self._housekeeping: Deadline | None = None
        self._dialog_peak = self._nonce_peak = 0
        self._trim_again = False
        self._next_nonce_sweep = 0.0

    @property
    def config(self) -> Config:
        return self.settings.current

    @property
    def addresses(self) -> list[str]:
        return self.transports.addresses

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.history.open)
            await self.history.start()
        except (sqlite3.Error, OSError, RuntimeError) as err:  # the calls go on; only their rows are missing
            log.error("event=history_unavailable %s", fields(path=self.history.path, error=err,
                                                             action="running_without_history"))
        kept = self.store.load(self.wall())
        if kept:
            log.info("event=bindings_restored %s", fields(count=kept))
        self._enforce_users()  # a user removed (or limited) while the daemon was down
        for address in self.config.server.listen:
            await self.transports.listen(address.host, address.port, self.edge)
        self._next_nonce_sweep = self.timers.now() + NONCE_SWEEP_INTERVAL
        self._housekeeping = self.timers.every(HOUSEKEEPING_INTERVAL, self._housekeep)
        self.qualifier.start()
        self.trunks.start()
        self.voicemail.start()
        if self.media is not None:
            host, _, port = self.addresses[0].rpartition(":")
            await self.media.start(host.strip("[]"), int(port))
        if self.control is not None:
            await self.control.start()

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.stop()
        if self.media is not None:
            await self.media.stop()  # workers BYE their calls and exit
        await self.voicemail.stop()  # a message being stored lands first
        self.qualifier.stop()
        self.trunks.stop()  # unregisters at the providers while the sockets are still open
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        self.timers.cancel()
        self.store.flush_now()
        await self.transports.close()
        await self.history.close()

    def _history_committed(self, calls: list[str]) -> None:
        """The writer committed rows: only now are they shown (the TUI re-reads its History view)."""
        self.state.emit({"event": "history_changed", "calls": calls})

    def _housekeep(self, now: float) -> None:
        self.device_events.publish(self.registrar.expire(self.wall()))
        self.server_tx.expire(now)
        self.throttle.sweep(now)
        self._note_abandoned(now)
        if now >= self._next_nonce_sweep:
            self.nonces.sweep(now)
            self._next_nonce_sweep = now + NONCE_SWEEP_INTERVAL
        self._give_memory_back(now)

    def _give_memory_back(self, now: float) -> None:
        """After a burst of calls: without this the process keeps its high-water RSS for
        good (the router's dicts keep the tables they grew to; glibc keeps freed pages).

        Twice: when the calls' dialogs are gone (32 s after), and when the nonces they used
        are (300 s): one used nonce per call, made among the call's objects, keeps Python's
        allocator pages of the burst in use until then."""
        dialogs, nonces = self.calls.dialog_count, len(self.nonces)
        self._dialog_peak = max(self._dialog_peak, dialogs)
        self._nonce_peak = max(self._nonce_peak, nonces)
        if self._dialog_peak >= TRIM_AFTER_DIALOGS and dialogs <= self._dialog_peak // 8:
            self._dialog_peak = dialogs
            self._trim_again = dialogs > 0  # and once more when the last of them are gone
        elif self._trim_again and dialogs == 0:
            self._trim_again = False
        elif self._nonce_peak >= TRIM_AFTER_DIALOGS and nonces <= self._nonce_peak // 8:
            self._nonce_peak = nonces
        else:
            return
        gc.collect()
        self.calls.compact(now)
        self.timers.compact()
        if _malloc_trim is not None:
            _malloc_trim(0)

    def _note_abandoned(self, now: float) -> None:
        """Devices that gave up on a SHA-256 challenge: said once, offered MD5 from now on."""
        abandoned = self.fallback.expire(now)
        if not abandoned:
            return
        for a in abandoned:
            log.warning("event=auth_abandoned %s", fields(
                number=a.number, peer=a.source, ua=a.user_agent or "-", action="offer_md5_only"))
            self.state.auth_abandoned(a.number, a.source, a.user_agent)
        try:
            save_digest_fallback(self.fallback_path, self.fallback.learned)
        except OSError as err:
            log.warning("event=state_write_failed %s", fields(path=self.fallback_path, error=err))

    def _tcp_lost(self, flow: Flow) -> None:
        """A TCP connection closed: the qualifier reaches the devices that lived on it again,
        a trunk registered over it registers again."""
        self.qualifier.flow_lost(flow)
        self.trunks.flow_lost(flow)

    def _tcp_bound(self, flow: Flow) -> bool:
        """A binding lives on this TCP flow, or it is a trunk's connection to its provider:
        the connection stays however quiet it is.

        Asked only of a connection idle for tcp_idle_timeout, so a scan of the (few) bindings
        of a home box is cheaper than an index kept up to date on every REGISTER.
        """
        return self.trunks.holds(flow) or any(binding.flow == flow for binding in self.registrar.all_bindings())

    # -- configuration -----------------------------------------------------------------------
    def apply_config(self, config: Config) -> None:
        """Take a new, already validated config live (SIGHUP or a control command)."""
        old = self.config
        if [str(a) for a in old.server.listen] != [str(a) for a in config.server.listen]:
            log.warning("event=listen_changed action=restart_needed")
        self.settings.current = config
        self.authenticator.realm = config.server.realm
        self.authenticator.algorithms = config.server.digest_algorithms
        reg = config.registration
        self.registrar.min_expires = reg.min_expires
        self.registrar.max_expires = reg.max_expires
        self.registrar.default_expires = reg.default_expires
        self._enforce_users()
        self.qualifier.reschedule()
        self.trunks.reconfigure()
        self.history.configure(config.history.max_days, config.history.max_rows)
        self.state.emit({"event": "config_changed"})

    def change_user(self, number: str, changes: dict[str, object], then: Callable[[str | None], None]) -> None:
        """A feature code's change (`UserSettings`): config.toml edited atomically off the
        event loop, the new config put in force, then `then` told (None, or the error)."""
        path = self.config_path
        if path is None:
            then("no config file to save in")
            return

        async def edit() -> None:
            async with self.edit_lock:
                try:
                    config = await asyncio.to_thread(update_user, path, number, changes)
                except ConfigError as err:
                    then(str(err))
                    return
                self.apply_config(config)
            then(None)

        task = asyncio.get_running_loop().create_task(edit())
        self._edits.add(task)
        task.add_done_callback(self._edits.discard)

    def _enforce_users(self) -> None:
        """Bindings follow the config: a number no longer configured loses its devices, and
        a lowered device limit is applied."""
        for number in self.registrar.numbers():
            user = self.config.user(number)
            self.device_events.publish(self.registrar.enforce(number, policy_for(user) if user else None))

    def reload(self) -> ConfigError | None:
        """Re-read the config file (SIGHUP, or the control socket's reload); the error if refused."""
        assert self.config_path is not None
        sdnotify.notify("RELOADING=1")
        try:
            try:
                fill_missing_passwords_logged(self.config_path)
                config = load_config(self.config_path)
            except ConfigError as err:
                # The user's mistake, answered (file:line: key), not a fault of the daemon: a warning.
                log.warning("event=reload_refused %s", fields(error=str(err), action="keeping_last_good_config"))
                return err
            self.apply_config(config)
            log.info("event=config_reloaded %s", fields(users=len(config.users)))
            return None
        finally:
            sdnotify.notify("READY=1")


def fill_missing_passwords_logged(path: Path) -> None:
    """Generate passwords for users that have none, and log each one once, so the owner can
    read it (journal, console) and type it into the handset."""
    changed = fill_missing_passwords(path)
    if not changed:
        return
    config = load_config(path)
    for number in changed:
        user = config.user(number)
        password = user.password if user else ""
        log.warning("event=password_generated %s", fields(number=number, password=password, config=path))


async def run(path: Path) -> int:
    """`homepbx run`: the daemon in the foreground until SIGTERM or SIGINT."""
    try:
        fill_missing_passwords_logged(path)
        config = load_config(path)
    except ConfigError as err:
        log.error("event=config_invalid %s", fields(error=str(err)))
        return 2
    daemon = Daemon(config, path)
    try:
        await daemon.start()
    except OSError as err:
        log.error("event=listen_failed %s", fields(error=err))
        await daemon.stop()
        return 3
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    # Everything loaded so far lives as long as the process: keep it out of the collector's
    # way, and collect young objects less often (calls make many short-lived ones). The
    # middle generation is collected every fourth young collection, so it holds at most
    # ~80,000 objects: at 1,000+ calls/s (finished calls linger 32 s for retransmissions) a
    # middle collection with a threshold of 20 took ~120 ms, now ~15 ms (bench/calls.py max).
    gc.freeze()
    gc.set_threshold(20_000, 2, 20)
    log.info("event=ready %s", fields(listen=",".join(daemon.addresses), config=path, pid=os.getpid()))
    sdnotify.notify(f"READY=1\nSTATUS=listening on {', '.join(daemon.addresses)}\nMAINPID={os.getpid()}")
    watchdog = asyncio.create_task(sdnotify.watchdog())
    await stop.wait()
    log.info("event=stopping")
    sdnotify.notify("STOPPING=1")
    watchdog.cancel()
    await daemon.stop()
    log.info("event=stopped")
    return 0
