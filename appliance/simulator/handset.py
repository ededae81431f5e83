"""Parent-side controller for a handset agent process.

A :class:`Handset` spawns ``python -m appliance.simulator.agent`` (a real
pjsua2 user agent), sends it JSON commands and collects its JSON events on a
reader thread.  Tests wait for events with :meth:`Handset.wait_for`; every
event ever seen stays in :attr:`Handset.events` for later assertions.

This module is pure stdlib on purpose: it never imports pjsua2, so a test
process stays free of the library's threads and global state.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

from appliance.jsonlines import Event, EventReader, StreamEnded, matches
from appliance.source import REPO_ROOT

__all__ = ["Handset", "HandsetError", "HandsetGone", "close_all", "handsets"]


READY_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 5.0

_live: weakref.WeakSet[Handset] = weakref.WeakSet()


class HandsetError(RuntimeError):
    """The agent reported an error for a command we sent."""


class HandsetGone(TimeoutError):
    """The agent exited while we were waiting for an event."""


def _kill_leftovers() -> None:
    """Last resort at interpreter exit: never leave an agent behind."""
    for handset in list(_live):
        handset.kill()


atexit.register(_kill_leftovers)


class Handset:
    """One SIP phone in a child process, driven synchronously.

    Field values given to :meth:`wait_for` / :meth:`events_of` must equal the
    event's field, or be a one-argument predicate.
    """

    def __init__(
        self,
        *,
        transport: str = "udp",
        name: str = "",
        trace: bool = False,
        user_agent: str | None = None,
        python: str = sys.executable,
        log_path: Path | None = None,
        log_level: int = 3,
        codecs: Sequence[str] | None = None,
        port: int = 0,
        bind: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.transport = transport
        self.port = 0
        self.pid = 0
        self._closed = False
        self._ids = itertools.count(1)
        self._log: IO[bytes] | None = None

        argv = [
            python,
            "-m",
            "appliance.simulator.agent",
            "--transport",
            transport,
            "--port",
            str(port),
            "--bind",
            bind,
            "--log-level",
            str(log_level),
        ]
        if name:
            argv += ["--name", name]
        if user_agent:
            argv += ["--user-agent", user_agent]
        if trace:
            argv.append("--trace")
        if codecs:
            argv += ["--codecs", ",".join(codecs)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        stderr: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
            stderr = self._log
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=str(REPO_ROOT),
        )
        self.pid = self.proc.pid
        _live.add(self)
        assert self.proc.stdout is not None
        self._reader = EventReader(self.proc.stdout, f"handset-{name or self.pid}")
        try:
            ready = self.wait_for("ready", timeout=READY_TIMEOUT)
        except BaseException:
            self.kill()
            raise
        self.port = int(ready["port"])

    # -- plumbing ----------------------------------------------------------
    def __repr__(self) -> str:
        return f"Handset({self.name or '?'} pid={self.pid} port={self.port} {self.transport})"

    @property
    def events(self) -> list[Event]:
        """Every event the agent has sent so far, consumed by a wait or not."""
        return self._reader.events

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def send(self, cmd: str, **fields: object) -> None:
        """Send one command; failures to write mean the agent is gone."""
        line = json.dumps({"cmd": cmd, **fields}) + "\n"
        stdin = self.proc.stdin
        if stdin is None or stdin.closed:
            raise HandsetGone(f"{self!r}: stdin closed")
        try:
            stdin.write(line.encode())
            stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise HandsetGone(f"{self!r}: agent not reading ({exc})") from exc

    def _take(self, pred: Callable[[Event], bool], timeout: float, what: str) -> Event:
        try:
            return self._reader.take(pred, timeout, what)
        except TimeoutError as exc:
            raise TimeoutError(f"{self!r}: {exc}") from None
        except StreamEnded:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1.0)  # stdout closed: exit is imminent
            raise HandsetGone(
                f"{self!r}: agent exited (rc={self.proc.poll()}) while waiting for {what}; "
                f"recent events:\n  {self._reader.recent()}"
            ) from None

    def wait_for(self, event: str, timeout: float = 5.0, **match: object) -> Event:
        """Next not-yet-consumed event of kind `event` whose fields match.

        Non-matching events stay queued for other waits.  Raises TimeoutError
        (HandsetGone if the agent died) listing the recent events.
        """
        desc = event + (f" {match}" if match else "")
        return self._take(lambda e: matches(e, event, match), timeout, desc)

    def events_of(self, event: str, **match: object) -> list[Event]:
        """All events of that kind seen so far (consumed or not)."""
        return self._reader.events_of(event, **match)

    def drain(self) -> list[Event]:
        """Drop and return every queued (unconsumed) event."""
        return self._reader.drain()

    def request(self, cmd: str, reply: str, timeout: float = 5.0, **fields: object) -> Event:
        """Send a command tagged with an id and wait for its reply event;
        an error event for the same id raises HandsetError."""
        req = next(self._ids)
        self.send(cmd, id=req, **fields)
        got = self._take(
            lambda e: e.get("id") == req and e.get("event") in (reply, "error"),
            timeout,
            f"{reply} for {cmd} #{req}",
        )
        if got["event"] == "error":
            raise HandsetError(f"{self!r}: {cmd} failed: {got.get('message')}")
        return got

    def ping(self, timeout: float = 5.0) -> None:
        """Round-trip through the agent's command loop (all earlier commands
        have been executed once this returns)."""
        self.request("ping", "pong", timeout)

    # -- registration -----------------------------------------------------------
    def register(
        self,
        registrar: str,
        number: str,
        password: str,
        *,
        expires: int = 300,
        instance: str | None = None,
        realm: str = "*",
        domain: str = "home.arpa",
        proxy: str | None = None,
        wait: bool = True,
        timeout: float = 5.0,
    ) -> Event:
        """Create the registering account; returns the first reg_state event
        (or {} when wait is False)."""
        self.send(
            "register",
            registrar=registrar,
            number=number,
            password=password,
            realm=realm,
            domain=domain,
            expires=expires,
            instance=instance,
            transport=self.transport,
            proxy=proxy,
        )
        if not wait:
            return {}
        return self.wait_for("reg_state", timeout=timeout, aor=f"sip:{number}@{domain}")

    def unregister(self, *, wait: bool = True, timeout: float = 5.0) -> Event:
        self.send("unregister")
        return self.wait_for("reg_state", timeout=timeout) if wait else {}

    # -- calls ------------------------------------------------------------------
    def call(
        self,
        uri: str,
        *,
        headers: Mapping[str, str] | None = None,
        target: str | None = None,
        timeout: float = 5.0,
    ) -> str:
        """Start a call; returns its stable id ("c1", ...)."""
        fields: dict[str, object] = {"uri": uri}
        if headers:
            fields["headers"] = dict(headers)
        if target:
            fields["target"] = target
        created = self.request("call", "call_created", timeout, **fields)
        return str(created["call"])

    def answer(
        self, call: str, code: int = 200, *, reason: str = "", headers: Mapping[str, str] | None = None
    ) -> None:
        self.send("answer", call=call, code=code, reason=reason, headers=dict(headers or {}))

    def hangup(
        self, call: str, code: int = 0, *, reason: str = "", headers: Mapping[str, str] | None = None
    ) -> None:
        self.send("hangup", call=call, code=code, reason=reason, headers=dict(headers or {}))

    def auto_answer(
        self, mode: str = "answer", code: int | None = None, delay_ms: int = 0, reason: str = ""
    ) -> None:
        fields: dict[str, object] = {"mode": mode, "delay_ms": delay_ms, "reason": reason}
        if code is not None:
            fields["code"] = code
        self.send("auto_answer", **fields)
        self.wait_for("auto_answer", mode=mode)

    def wait_state(self, call: str, state: str, timeout: float = 5.0) -> Event:
        """Next call_state event of that call reaching `state`."""
        return self.wait_for("call_state", timeout=timeout, call=call, state=state)

    def wait_incoming(self, timeout: float = 5.0, **match: object) -> Event:
        return self.wait_for("incoming_call", timeout=timeout, **match)

    def play_tone(self, call: str, freq: float | Sequence[float], *, monitor: str | Path | None = None) -> None:
        """Play a tone into the call; with `monitor`, also record the tone itself there
        (what this handset sends, before its encoder: see :meth:`monitor_recorded`)."""
        fields: dict[str, object] = {"call": call, "freq": list(freq) if isinstance(freq, Sequence) else freq}
        if monitor is not None:
            fields["monitor"] = str(monitor)
        self.send("play_tone", **fields)

    def monitor_recorded(self, call: str, path: str | Path, timeout: float = 5.0) -> str:
        """After :meth:`stop_media`: the finished monitor recording of the tone."""
        return str(self.wait_for("recorded", timeout=timeout, call=call, path=str(Path(path).resolve()))["path"])

    def record(self, call: str, path: str | Path) -> None:
        self.send("record", call=call, path=str(path))

    def stop_media(self, call: str, *, wait_recorded: bool = True, timeout: float = 5.0) -> Event:
        """Stop tone and recorder.  Returns the `recorded` event when a
        recording was running (and wait_recorded), else `media_stopped`."""
        stopped = self.request("stop_media", "media_stopped", timeout, call=call)
        if stopped.get("recording") is None or not wait_recorded:
            return stopped
        return self.wait_for("recorded", timeout=timeout, call=call, path=stopped["recording"])

    def dtmf(self, call: str, digits: str) -> None:
        self.send("dtmf", call=call, digits=digits)

    def sip_messages(self, direction: str | None = None, contains: str | None = None) -> list[str]:
        """Traced SIP messages (needs trace=True), optionally filtered by
        direction ("rx"/"tx") and substring."""
        out = []
        for ev in self.events_of("sip"):
            if direction is not None and ev.get("dir") != direction:
                continue
            msg = str(ev.get("msg", ""))
            if contains is None or contains in msg:
                out.append(msg)
        return out

    def wait_sip(self, direction: str, prefix: str, timeout: float = 5.0, **match: object) -> str:
        """Next traced message (needs trace=True) in `direction` ("rx"/"tx")
        starting with `prefix`, e.g. wait_sip("tx", "CANCEL ").  The trace
        of a message can arrive after the state change it caused."""
        event = self.wait_for(
            "sip", timeout=timeout, dir=direction, msg=lambda m: str(m).startswith(prefix), **match
        )
        return str(event["msg"])

    # -- lifecycle -------------------------------------------------------------
    def kill(self) -> None:
        """SIGKILL the agent: the phone vanishes without a word."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=CLOSE_TIMEOUT)
        self._release()

    def begin_close(self) -> None:
        """Ask the agent to quit without waiting (see close_all)."""
        if self._closed or self.proc.poll() is not None:
            return
        with contextlib.suppress(HandsetGone):
            self.send("quit")
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Quit cleanly, wait up to `timeout`, then kill; idempotent."""
        if self._closed:
            return
        self.begin_close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._release()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        self._reader.join(timeout=2.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Handset:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def close_all(phones: Sequence[Handset], timeout: float = CLOSE_TIMEOUT) -> None:
    """Quit several handsets in parallel (each shutdown takes a moment)."""
    for phone in phones:
        phone.begin_close()
    deadline = time.monotonic() + timeout
    for phone in phones:
        phone.close(timeout=max(deadline - time.monotonic(), 0.1))


@contextlib.contextmanager
def handsets(
    n: int, *, names: Sequence[str] | None = None, log_dir: Path | None = None, **kw: Any
) -> Iterator[list[Handset]]:
    """Spawn `n` handsets (keyword arguments go to Handset) and always close
    them all, even when spawning one of them fails."""
    phones: list[Handset] = []
    try:
        for i in range(n):
            name = names[i] if names else f"h{i + 1}"
            log_path = log_dir / f"{name}.log" if log_dir is not None else None
            phones.append(Handset(name=name, log_path=log_path, **kw))
        yield phones
    finally:
        close_all(phones)
