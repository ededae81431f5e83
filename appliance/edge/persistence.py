"""Bindings and secrets on disk: survive a restart and a kill -9.

Writes are atomic (temp file, fsync, rename) and coalesced: a burst of registrations
becomes one write a fraction of a second later (a deadline in the edge's timer wheel),
done off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from appliance.edge.timers import TimerWheel
from appliance.fileio import atomic_write
from appliance.logs import fields
from appliance.sip.registrar import Registrar

log = logging.getLogger("homepbx.state")

FLUSH_DELAY = 1.0
FORMAT_VERSION = 1


def load_secret(path: Path) -> bytes:
    """The nonce key: kept across restarts so a phone's current nonce stays good."""
    try:
        secret = path.read_bytes()
        if len(secret) >= 32:
            return secret
    except FileNotFoundError:
        pass
    secret = os.urandom(32)
    atomic_write(path, secret, mode=0o600)
    return secret


class BindingStore:
    def __init__(self, path: Path, registrar: Registrar, timers: TimerWheel) -> None:
        self.path = path
        self.registrar = registrar
        self.timers = timers
        self._dirty = False
        self._scheduled = False
        self._writing = False

    def load(self, now: float) -> int:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as err:
            log.error("event=state_unreadable %s", fields(path=self.path, error=err))
            return 0
        items = data.get("bindings", []) if isinstance(data, dict) else []
        return self.registrar.load([i for i in items if isinstance(i, dict)], now)

    def _payload(self) -> bytes:
        return json.dumps(
            {"version": FORMAT_VERSION, "bindings": self.registrar.dump()}, separators=(",", ":")
        ).encode()

    def mark_dirty(self) -> None:
        self._dirty = True
        if self._scheduled:
            return
        self._scheduled = True
        self.timers.call_later(FLUSH_DELAY, self._flush_soon)

    def _flush_soon(self, _now: float) -> None:
        self._scheduled = False
        if self._writing:
            self.mark_dirty()  # one write at a time; try again after this one
            return
        if not self._dirty:
            return
        self._dirty = False
        payload = self._payload()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven by a test's clock, no event loop: write here and now
            atomic_write(self.path, payload, mode=0o600)
            return
        self._writing = True
        future = loop.run_in_executor(None, atomic_write, self.path, payload, 0o600)
        future.add_done_callback(self._written)

    def _written(self, future: asyncio.Future[None]) -> None:
        self._writing = False
        if future.exception() is not None:
            log.error("event=state_write_failed %s", fields(path=self.path, error=future.exception()))
            self._dirty = True
            self.mark_dirty()

    def flush_now(self) -> None:
        """Synchronous write, for shutdown."""
        atomic_write(self.path, self._payload(), mode=0o600)
        self._dirty = False


def load_digest_fallback(path: Path) -> list[str]:
    """Devices learned to need MD5 alone (sip/digest_fallback.py), kept across restarts."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        log.warning("event=state_unreadable %s", fields(path=path, error=err, action="relearn"))
        return []
    keys = data.get("md5_only", []) if isinstance(data, dict) else []
    return [k for k in keys if isinstance(k, str)]


def save_digest_fallback(path: Path, keys: list[str]) -> None:
    """Written when a device is learned (rare, a few hundred bytes): atomic, like all state."""
    atomic_write(path, json.dumps({"version": 1, "md5_only": keys}, indent=1).encode(), mode=0o600)

