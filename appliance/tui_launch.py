"""Starting the terminal UI, always in its own process: the daemon never imports it.

`homepbx tui` becomes `python -m tui`; `homepbx run --tui` (what `make run` does) runs the
daemon as a child with its log in the state directory and the TUI in the foreground.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from appliance.config import ConfigError, control_socket_path, load_config


def tui_argv(socket: Path | None = None, config: Path | None = None, daemon_log: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "tui"]
    if socket is not None:
        argv += ["--socket", str(socket)]
    if config is not None:
        argv += ["--config", str(config)]
    if daemon_log is not None:
        argv += ["--daemon-log", str(daemon_log)]
    return argv


def exec_tui(socket: Path | None, config: Path | None) -> int:
    """`homepbx tui`: become `python -m tui` (same terminal, same pid)."""
    argv = tui_argv(socket, config)
    os.execv(argv[0], argv)
    return 1  # not reached


def run_with_tui(path: Path, log_level: str) -> int:
    """`homepbx run --tui` (`make run`): the daemon as a child with its log in the state dir,
    the TUI in the foreground; quitting the TUI stops the daemon."""
    try:
        config = load_config(path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state_dir = config.server.state_dir
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = state_dir / "daemon.log"
    with open(log_path, "ab") as daemon_log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "--config", str(path), "--log-level", log_level],
            stdin=subprocess.DEVNULL, stdout=daemon_log, stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's signals are the TUI's, not the daemon's
        )
    tui = subprocess.Popen(tui_argv(control_socket_path(config), path, log_path))

    def stop_tui(signum: int, frame: object) -> None:
        if tui.poll() is None:
            tui.terminate()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_tui)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the TUI handles Ctrl+C as a key
    code = tui.wait()
    daemon.terminate()
    try:
        daemon_code = daemon.wait(timeout=15)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon_code = daemon.wait()
    print(f"homepbx stopped (daemon exit {daemon_code}); its log: {log_path}")
    return code or (0 if daemon_code in (0, -signal.SIGTERM) else daemon_code)
