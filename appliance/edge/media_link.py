"""The edge's side of the media workers: which worker anchors which call, and their news.

The pool (`appliance.media.pool`) runs the processes; this maps them onto calls: a new
call acquires a worker, the worker's SIP address is recognised as trusted, and the
worker's `call_ended` or death is reported through the callbacks it was given.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.config import MediaConfig
from appliance.edge.seams import VoicemailEvents
from appliance.logs import fields
from appliance.media import protocol as P
from appliance.media.pool import Worker, WorkerPool
from appliance.sip.registrar import Flow

log = logging.getLogger("homepbx.media")


class MediaLink:
    def __init__(self, media: MediaConfig, *, on_call_ended: Callable[[str, str], None],
                 on_worker_died: Callable[[str], None], voicemail: VoicemailEvents | None = None,
                 voicemail_dir: Path | None = None) -> None:
        self.media = media
        self.voicemail = voicemail
        """Told of the answering machine's recordings and of mailbox changes (None: ignored)."""
        self.voicemail_dir = voicemail_dir
        """The mailbox store's root, handed to the workers (None: no answering machine)."""
        self.on_call_ended = on_call_ended
        self.on_worker_died = on_worker_died
        self._pool: WorkerPool | None = None  # made by start(), once the edge's address is known
        self._address = ""
        self._by_token: dict[str, Worker] = {}
        self._finding: dict[str, asyncio.Task[None]] = {}
        """Calls still waiting for a worker (their 100 Trying sent), by token."""
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def edge_address(self) -> str:
        return self._address

    @property
    def available(self) -> bool:
        return self._pool is None or self._pool.unavailable is None

    @property
    def pool(self) -> WorkerPool:
        assert self._pool is not None, "MediaLink.start() not called"
        return self._pool

    async def start(self, edge_host: str, edge_port: int) -> None:
        """Start the workers; they send their SIP to the edge at `edge_host:edge_port` and
        take RTP where the edge listens (`protocol.rtp_address`)."""
        host = "127.0.0.1" if edge_host in ("0.0.0.0", "::", "localhost") else edge_host
        self._address = f"{host}:{edge_port}"
        media = self.media
        store = self.voicemail_dir
        self._pool = WorkerPool(
            media.min_idle, media.max_calls, (media.rtp_port_low, media.rtp_port_high),
            self._address, rtp_address=P.rtp_address(edge_host), on_event=self._on_event, worker_died=self._died,
            # A call uses at most 8 of pjlib's socket slots (RTP and RTCP of its A and B legs,
            # a joiner and a transfer), which come back 500 ms after the call. Resting a
            # call's slot 75 ms keeps what a worker's calls hold within its ioqueue even for
            # calls that end at once: 16 slots (our build) x 8 x 0.5 s / 0.075 s = 853 of
            # its 1024 handles, less its live calls' 128 and the SIP transports; 1 slot (the
            # PyPI wheel) x 8 x 0.5 / 0.075 = 53 of 64. Each slot then takes at most ~13
            # calls a second: with the 100 ms rest before, max_calls = 64 capped a burst
            # at ~500 calls/s with the cores half idle.
            cooldown=0.075, calls_per_worker=media.calls_per_worker,
            worker_args=["--voicemail-dir", str(store.resolve())] if store is not None else [],
        )
        await self._pool.start()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._pool is not None:
            await self._pool.stop()

    def is_worker(self, flow: Flow) -> bool:
        """Is `flow` one of our workers' SIP sockets?"""
        if flow.host != P.LOOPBACK or flow.transport != "udp" or self._pool is None:
            return False
        return any(worker.sip_port == flow.port and worker.pid for worker in self._pool.workers)

    def anchor(self, token: str, then: Callable[[int | None], None]) -> None:
        """Find a worker for call `token` and continue with its SIP port (None: max_calls
        calls in progress, or none ready within the pool's acquire_timeout).  The call
        waits for a worker to start rather than being refused while capacity is free."""
        worker = self.pool.try_acquire(token)
        if worker is not None:  # a warm worker: on at once, no task
            self._got(token, worker)
            then(worker.sip_port)
            return

        async def acquire() -> None:
            worker = await self.pool.wait_for_worker(token)
            self._finding.pop(token, None)
            if worker is not None:
                self._got(token, worker)
            then(worker.sip_port if worker is not None else None)

        task = asyncio.get_running_loop().create_task(acquire())
        self._finding[token] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _got(self, token: str, worker: Worker) -> None:
        self._by_token[token] = worker
        log.info("event=media_worker_call %s", fields(token=token, pid=worker.pid, port=worker.sip_port))

    def call_over(self, token: str) -> None:
        """The edge is done with a call: a wait for its worker is dropped (the caller
        cancelled), a worker that never got it goes back to the pool."""
        finding = self._finding.pop(token, None)
        if finding is not None:
            finding.cancel()
        worker = self._by_token.pop(token, None)
        if worker is not None:
            self.pool.release(worker, token)

    def _on_event(self, worker: Worker, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind in (P.EV_VOICEMAIL_RECORDED, P.EV_MAILBOX_CHANGED):
            self._voicemail_event(event)
        if kind == P.EV_CALL_ENDED:
            token = str(event.get("token") or "")
            self._by_token.pop(token, None)
            self.on_call_ended(token, str(event.get("reason") or "ended"))

    def _voicemail_event(self, event: dict[str, Any]) -> None:
        """The answering machine's news, passed on; a sink's failure is logged, never fatal."""
        number = str(event.get("number") or "")
        try:
            if event.get("event") == P.EV_MAILBOX_CHANGED:
                if self.voicemail is not None:
                    self.voicemail.mailbox_changed(number)
                return
            seconds = float(event.get("seconds") or 0.0)
            log.info("event=voicemail_recorded %s", fields(call=event.get("token"), number=number,
                                                           caller=event.get("caller"), seconds=round(seconds, 1)))
            if self.voicemail is not None:
                self.voicemail.voicemail_recorded(str(event.get("token") or ""), number,
                                                  str(event.get("caller") or ""), str(event.get("path") or ""),
                                                  seconds)
        except Exception:
            log.exception("event=voicemail_event_failed %s", fields(event=event.get("event"), number=number))

    def _died(self, worker: Worker, tokens: list[str]) -> None:
        log.warning("event=media_worker_lost %s", fields(pid=worker.pid, calls=",".join(tokens) or "-"))
        for token in tokens:
            self._by_token.pop(token, None)
            self.on_worker_died(token)
