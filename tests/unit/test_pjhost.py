"""The shared pjsua2 host loop (appliance/pjhost): it sleeps instead of polling, wakes at
once for a command or a signal (UDP or TCP SIP), runs timers on time, keeps running
through a failing job, and stops on stdin EOF, a signal or its watchdog.

A real endpoint runs in a child process (this module with ``--child``): pjsua2 keeps
global state and threads, which the test process must stay free of.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.jsonlines import Emitter, Event, EventReader, private_stdout
from appliance.pjhost import IDLE_WAIT_MS, STDIN_CLOSED, LogWriter, PjHost, block_signals

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(30)


# -- the child: a host with nothing but probes ----------------------------------------------
class ProbeHost(PjHost):
    """Answers `ping` with its loop count; `after` sets a timer; `fail` queues a failing
    job and a failing timer; `hang` makes shutdown hang."""

    def __init__(self, out: Emitter, transport: str, watchdog: float) -> None:
        super().__init__(out)
        self.transport = transport
        self.watchdog_s = watchdog
        self.hang = False
        self.after_events_calls = 0

    def start(self) -> None:
        import pjsua2 as pj

        cfg = self.create_endpoint(LogWriter(), 1, msg_logging=False)
        self.init_endpoint(cfg)
        tcfg = pj.TransportConfig()
        tcfg.boundAddress = "127.0.0.1"
        kind = pj.PJSIP_TRANSPORT_TCP if self.transport == "tcp" else pj.PJSIP_TRANSPORT_UDP
        _, self.sip_port = self.create_transport(kind, tcfg)
        self.start_library()

    def ready(self) -> None:
        self.out.emit("ready", sip_port=self.sip_port, wake_port=self.wake_port)

    def handle_line(self, line: bytes) -> None:
        cmd: dict[str, Any] = json.loads(line)
        name = cmd["cmd"]
        if name == "ping":
            self.out.emit("pong", passes=self.passes, after_events=self.after_events_calls)
        elif name == "after":
            start = time.monotonic()
            seconds = float(cmd["seconds"])
            self.after(seconds, lambda: self.out.emit("fired", late=time.monotonic() - start - seconds))
        elif name == "fail":

            def fail() -> None:
                raise ZeroDivisionError("job")

            self.later(fail)
            self.after(0, fail)
        elif name == "hang":
            self.hang = True
            self.request_stop("hang")

    def after_events(self) -> None:
        self.after_events_calls += 1

    def wind_down(self) -> None:
        if self.hang:
            time.sleep(30)


def child_main(transport: str, watchdog: float) -> None:
    block_signals()
    out = private_stdout(batched=True)  # as a media worker: the loop flushes once per pass
    host = ProbeHost(out, transport, watchdog)
    host.start()
    code = host.run()
    sys.stderr.flush()
    os._exit(code)


# -- the parent side ------------------------------------------------------------------------
class Child:
    def __init__(self, transport: str = "udp", watchdog: float = 8.0) -> None:
        self.transport = transport
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.unit.test_pjhost", "--child", transport, str(watchdog)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.reader = EventReader(self.proc.stdout, "pjhost-child")
        self.ready = self.reader.wait_for("ready", timeout=10)

    def send(self, cmd: str, **fields: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
        self.proc.stdin.flush()

    def ask(self, cmd: str, reply: str, **fields: object) -> tuple[Event, float]:
        """Send, wait for the reply; the reply and the round trip in seconds."""
        started = time.monotonic()
        self.send(cmd, **fields)
        event = self.reader.wait_for(reply, timeout=5)
        return event, time.monotonic() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture(params=["udp", "tcp"])
def child(request: pytest.FixtureRequest) -> Iterator[Child]:
    c = Child(transport=request.param)
    yield c
    c.close()


def test_sleeps_when_idle_and_wakes_at_once_for_a_command(child: Child) -> None:
    # A TCP-only host gets a loopback UDP transport of its own for the wake datagrams.
    assert child.ready["wake_port"]
    assert (child.ready["wake_port"] == child.ready["sip_port"]) == (child.transport == "udp")
    first, _ = child.ask("ping", "pong")
    time.sleep(1.5)
    # Idle for 1.5 s: a couple of passes (IDLE_WAIT_MS = 1000), not one every 10 ms.
    second, _ = child.ask("ping", "pong")
    assert second["passes"] - first["passes"] <= 4
    assert second["after_events"] >= second["passes"] - 1
    # Yet every command is handled at once, not after the sleep.
    trips = [child.ask("ping", "pong")[1] for _ in range(5)]
    assert max(trips) < IDLE_WAIT_MS / 1000 / 4, trips


def test_timers_fire_on_time_without_polling(child: Child) -> None:
    before, _ = child.ask("ping", "pong")
    child.send("after", seconds=0.3)
    child.send("after", seconds=1.6)
    lates = [float(child.reader.wait_for("fired", timeout=5)["late"]) for _ in range(2)]
    assert all(0 <= late < 0.1 for late in lates), lates
    after, _ = child.ask("ping", "pong")
    assert after["passes"] - before["passes"] <= 8


def test_a_failing_job_or_timer_is_an_error_event_and_the_loop_goes_on() -> None:
    c = Child()
    try:
        c.send("fail")
        errors = {str(c.reader.wait_for("error")["where"]) for _ in range(2)}
        assert errors == {"job", "timer"}
        assert "ZeroDivisionError" in json.dumps(c.reader.events)
        c.ask("ping", "pong")
    finally:
        c.close()


@pytest.mark.parametrize("how", ["eof", "sigterm"])
def test_stops_at_once_on_stdin_eof_or_a_signal(how: str) -> None:
    c = Child()
    try:
        c.ask("ping", "pong")
        time.sleep(0.2)  # asleep in libHandleEvents, for another 0.8 s without a wake-up
        started = time.monotonic()
        if how == "eof":
            assert c.proc.stdin is not None
            c.proc.stdin.close()
        else:
            c.proc.send_signal(signal.SIGTERM)
        bye = c.reader.wait_for("bye", timeout=5)
        assert bye["reason"] == (STDIN_CLOSED if how == "eof" else "SIGTERM")
        assert c.proc.wait(5) == 0
        assert time.monotonic() - started < 0.5
    finally:
        c.close()


def test_a_hanging_shutdown_is_cut_short_by_the_watchdog() -> None:
    c = Child(watchdog=0.5)
    try:
        started = time.monotonic()
        c.send("hang")
        assert c.proc.wait(5) == 3
        assert time.monotonic() - started < 3
        assert not c.reader.events_of("bye")
    finally:
        c.close()


# -- in-process: the loop's arithmetic, no endpoint -----------------------------------------
class Quiet(PjHost):
    def __init__(self) -> None:
        super().__init__(Emitter(open(os.devnull, "w")))  # noqa: SIM115 - lives with the test


def test_wait_is_zero_with_work_queued_else_until_the_next_timer() -> None:
    host = Quiet()
    assert host.wait_ms() == IDLE_WAIT_MS
    host.after(0.25, lambda: None)
    assert 200 <= host.wait_ms() <= 250
    host.after(5.0, lambda: None)
    assert 200 <= host.wait_ms() <= 250
    host.later(lambda: None)
    assert host.wait_ms() == 0
    host.clear_timers()
    host.commands.append(b"{}")
    assert host.wait_ms() == 0


def test_timers_run_in_deadline_order_and_one_set_for_now_waits_a_pass() -> None:
    host = Quiet()
    ran: list[str] = []
    host.after(0.02, lambda: ran.append("second"))
    def first() -> None:
        ran.append("first")
        host.after(0, lambda: ran.append("next pass"))

    host.after(0.01, first)
    host.after(10, lambda: ran.append("not yet"))
    time.sleep(0.03)
    host.run_timers()
    assert ran == ["first", "second"]
    host.run_timers()
    assert ran == ["first", "second", "next pass"]
    assert len(host.timers) == 1


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    child_main(sys.argv[2], float(sys.argv[3]))


def test_a_batched_emitter_holds_its_threads_events_until_flushed() -> None:
    """One write per pass of a worker's loop, in order; another thread's event (a log line
    from a pjsua thread) is not held back."""
    stream = io.StringIO()
    out = Emitter(stream, batched=True)
    out.emit("call_started", token="t1")
    out.emit("call_answered", token="t1")
    assert stream.getvalue() == ""
    other = threading.Thread(target=lambda: out.emit("log", line="from pjsua"))
    other.start()
    other.join()
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["log"]
    out.flush()
    events = [json.loads(x)["event"] for x in stream.getvalue().splitlines()]
    assert events == ["log", "call_started", "call_answered"]
    out.flush()  # nothing held: nothing written
    assert len(stream.getvalue().splitlines()) == 3
    unbatched = io.StringIO()
    Emitter(unbatched).emit("ready")  # a simulated handset's: every event at once
    assert json.loads(unbatched.getvalue()) == {"event": "ready"}
