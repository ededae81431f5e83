"""`homepbx demo`: a whole small house on one machine, so a newcomer sees every state live.

A daemon on a temporary config and loopback port, four simulated pjsua2 handsets (three
share number 200 "Family", one is Grandpa's 100), and a scene that repeats: someone
outside calls the family's number and the family's phones ring; then Grandpa calls, the
family's phones ring, one answers, another joins with *74, Grandpa hangs up.
The TUI runs in the foreground as its own process (the daemon never imports it).

The telephone provider is simulated too, by a second homepbx daemon on 127.0.0.2 with
a config of its own: its user 4930123456 is the family's account (the demo's box
registers to it as its `[[trunks]]`), and its user 4930999999 is an "outside" handset.
When the outside handset calls 4930123456, the provider rings what is registered under
that number, the box, which routes the number to 200 as for any real provider.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from appliance.ports import free_port
from appliance.simulator.handset import Handset, HandsetError, close_all

log = logging.getLogger("homepbx.demo")

DEMO_CONFIG = """\
# homepbx demo configuration (temporary; removed when the demo ends).
[server]
listen = ["127.0.0.1:{port}"]
realm = "home.arpa"
state_dir = "state"

[registration]
min_expires = 60
qualify_interval = 15
qualify_timeout = 2

[control]
socket = "control.sock"

[feature_codes]
"*74" = "join"

[[users]]
number = "100"
name = "Grandpa"
password = "demo-100"

[[users]]
number = "200"
name = "Family"
password = "demo-200"
one_number = true   # the three family handsets ring together
max_devices = 3
max_outgoing_calls = 2

[[users]]
number = "300"
name = "Office"
password = "demo-300"

[[trunks]]
name = "provider"
server = "{provider_host}:{provider_port}"
username = "{did}"
password = "{trunk_password}"
incoming = {{ "{did}" = "200" }}
outgoing_prefix = "0"
"""

PROVIDER_HOST = "127.0.0.2"
DID = "4930123456"
"""The family's number at the provider (the box's trunk account)."""
TRUNK_PASSWORD = "demo-trunk"
OUTSIDE = "4930999999"
"""Someone outside, a user of the provider."""
OUTSIDE_PASSWORD = "demo-outside"

PROVIDER_CONFIG = """\
# The demo's simulated telephone provider: a second homepbx (temporary).
[server]
listen = ["{host}:{port}"]
realm = "provider.example"
state_dir = "state"

[registration]
min_expires = 60
qualify_interval = 30
qualify_timeout = 2

[media]
rtp_ports = "11000-11999"

[control]
socket = "provider.sock"

[[users]]
number = "{did}"
name = "Family (trunk)"
password = "{trunk_password}"

[[users]]
number = "{outside}"
name = "Outside"
password = "{outside_password}"
"""

FAMILY = ("Living room", "Kitchen", "Bathroom")
READY_TIMEOUT = 15.0


class Demo:
    """The daemon, the handsets and the scene; :meth:`close` undoes it all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.provider_port = free_port(PROVIDER_HOST)
        self.config = directory / "config.toml"
        self.config.write_text(DEMO_CONFIG.format(
            port=self.port, provider_host=PROVIDER_HOST, provider_port=self.provider_port, did=DID,
            trunk_password=TRUNK_PASSWORD))
        self.provider_dir = directory / "provider"
        self.provider_dir.mkdir()
        self.provider_config = self.provider_dir / "config.toml"
        self.provider_config.write_text(PROVIDER_CONFIG.format(
            host=PROVIDER_HOST, port=self.provider_port, did=DID, trunk_password=TRUNK_PASSWORD,
            outside=OUTSIDE, outside_password=OUTSIDE_PASSWORD))
        self.socket = directory / "control.sock"
        self.log_path = directory / "demo.log"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.provider: subprocess.Popen[bytes] | None = None
        self.phones: list[Handset] = []
        self.stop = threading.Event()
        self._scene: threading.Thread | None = None
        self._log: IO[str] = open(self.log_path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def say(self, message: str) -> None:
        self._log.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    @property
    def registrar(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    @property
    def provider_server(self) -> str:
        return f"{PROVIDER_HOST}:{self.provider_port}"

    def _run_daemon(self, config: Path, log_path: Path, socket: Path, what: str) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as daemon_log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "appliance", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=daemon_log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while not socket.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the demo's {what} did not start; see {log_path}")
            time.sleep(0.05)
        return daemon

    def _wait_trunk_registered(self) -> None:
        log_path = self.directory / "daemon.log"
        deadline = time.monotonic() + READY_TIMEOUT
        while "event=trunk_registered" not in log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the demo's box did not register at its provider; see {log_path}")
            time.sleep(0.05)

    def start(self) -> None:
        self.provider = self._run_daemon(self.provider_config, self.provider_dir / "provider.log",
                                         self.provider_dir / "provider.sock", "provider")
        self.daemon = self._run_daemon(self.config, self.directory / "daemon.log", self.socket, "daemon")
        for label in FAMILY:
            phone = Handset(name=label.lower().replace(" ", "-"), user_agent=label,
                            log_path=self.directory / f"{label.lower().replace(' ', '-')}.log")
            self.phones.append(phone)
        grandpa = Handset(name="grandpa", user_agent="Grandpa's phone", log_path=self.directory / "grandpa.log")
        self.phones.append(grandpa)
        for phone in self.phones[:3]:
            phone.register(self.registrar, "200", "demo-200", expires=120)
        grandpa.register(self.registrar, "100", "demo-100", expires=120)
        outside = Handset(name="outside", user_agent="Outside phone", log_path=self.directory / "outside.log",
                          codecs=["PCMA/8000"], bind=PROVIDER_HOST)
        self.phones.append(outside)
        outside.register(f"sip:{self.provider_server}", OUTSIDE, OUTSIDE_PASSWORD, expires=120,
                         domain=self.provider_server)
        self._wait_trunk_registered()
        self.say(f"registered: 3 family handsets on 200, Grandpa on 100; the box at the provider as {DID}, "
                 f"an outside phone there as {OUTSIDE}")
        self._scene = threading.Thread(target=self._scene_loop, name="demo-scene", daemon=True)
        self._scene.start()

    # -- the scene --------------------------------------------------------------------------
    def _scene_loop(self) -> None:
        family, grandpa, outside = self.phones[:3], self.phones[3], self.phones[4]
        round_ = 0
        while not self.stop.is_set():
            try:
                self._outside_call(outside, family, round_)
                if self.stop.is_set():
                    return
                self._one_call(grandpa, family, round_)
            except (TimeoutError, HandsetError, OSError) as err:
                self.say(f"scene: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                with contextlib.suppress(Exception):
                    for phone in self.phones:
                        phone.send("hangup_all")
                self.stop.wait(5.0)
            round_ += 1

    def _answered_call(self, caller: Handset, uri: str, answerer: Handset) -> str | None:
        """`caller` calls `uri`; `answerer` picks up after a ring. The call, or None if the demo is stopping."""
        call = caller.call(uri)
        incoming = answerer.wait_incoming(timeout=5.0)
        if self.stop.wait(3.0):
            return None
        answerer.answer(str(incoming["call"]))
        caller.wait_state(call, "CONFIRMED", timeout=5.0)
        if self.stop.wait(3.0):
            return None
        return call

    def _outside_call(self, outside: Handset, family: list[Handset], round_: int) -> None:
        """Someone outside calls the family's number at the provider: the family's phones ring."""
        answerer = family[(round_ + 2) % 3]
        for phone in (*family, outside):
            phone.drain()
        for phone in family:
            phone.auto_answer("ring")
        self.say(f"scene: {OUTSIDE} calls the family's number {DID} at the provider; {answerer.name} will answer")
        call = self._answered_call(outside, f"sip:{DID}@{self.provider_server}", answerer)
        if call is None:
            return
        outside.hangup(call)
        with contextlib.suppress(TimeoutError):
            outside.wait_state(call, "DISCONNECTED", timeout=5.0)
        for phone in family:
            phone.send("hangup_all")
        self.stop.wait(2.0)

    def _one_call(self, grandpa: Handset, family: list[Handset], round_: int) -> None:
        answerer, joiner = family[round_ % 3], family[(round_ + 1) % 3]
        for phone in (*family, grandpa):
            phone.drain()
        for phone in family:
            phone.auto_answer("ring")
        self.say(f"scene: Grandpa calls 200; {answerer.name} will answer, {joiner.name} will join")
        call = self._answered_call(grandpa, "sip:200@home.arpa", answerer)
        if call is None:
            return
        joined = joiner.call("sip:*74@home.arpa")
        with contextlib.suppress(TimeoutError):
            joiner.wait_state(joined, "CONFIRMED", timeout=5.0)
        if self.stop.wait(5.0):
            return
        grandpa.hangup(call)
        with contextlib.suppress(TimeoutError):
            grandpa.wait_state(call, "DISCONNECTED", timeout=5.0)
        for phone in family:
            phone.send("hangup_all")
        self.stop.wait(4.0)

    # -- the end -------------------------------------------------------------------------------
    def close(self) -> None:
        self.stop.set()
        if self._scene is not None:
            self._scene.join(timeout=10.0)
        close_all(self.phones)
        for daemon in (self.daemon, self.provider):
            if daemon is not None and daemon.poll() is None:
                daemon.terminate()
        for daemon in (self.daemon, self.provider):
            if daemon is None:
                continue
            try:
                daemon.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self._log.close()


def run_demo(*, tui: bool = True, duration: float = 0.0, keep: bool = False) -> int:
    directory = Path(tempfile.mkdtemp(prefix="homepbx-demo-"))
    demo = Demo(directory)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    try:
        print(f"homepbx demo: starting a daemon on 127.0.0.1:{demo.port}, a provider on {demo.provider_server} "
              f"and five handsets ({directory})", flush=True)
        demo.start()
        if tui:
            from appliance.tui_launch import tui_argv

            child = subprocess.Popen(tui_argv(demo.socket, daemon_log=directory / "daemon.log"))
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the TUI's key
            signal.signal(signal.SIGTERM, lambda s, f: child.terminate())
            signal.signal(signal.SIGHUP, lambda s, f: child.terminate())
            code = child.wait()
        else:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, on_signal)
            print(f"control socket: {demo.socket}\nattach with: homepbx tui --socket {demo.socket}", flush=True)
            stopping.wait(duration if duration > 0 else None)
            code = 0
    except (RuntimeError, OSError, TimeoutError, HandsetError) as err:
        print(f"homepbx demo: {err}", file=sys.stderr)
        code = 1
    finally:
        demo.close()
        if keep or os.environ.get("HOMEPBX_DEMO_KEEP"):
            print(f"demo files kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return code
