"""Command line: `homepbx run | check-config | tui | demo` (also `python -m appliance`)."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import gc
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import sdnotify
from appliance.config import ConfigError, fill_missing_passwords, load_config
from appliance.logs import fields, setup_logging

if TYPE_CHECKING:
    from appliance.edge.server import Edge

log = logging.getLogger("homepbx")

DEFAULT_CONFIG = os.environ.get("HOMEPBX_CONFIG", "config.toml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="homepbx", description="homepbx, a home telephone exchange")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the PBX daemon in the foreground")
    run.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    run.add_argument("--log-level", default=os.environ.get("HOMEPBX_LOG_LEVEL", "INFO"))
    run.add_argument("--tui", action="store_true",
                     help="run the daemon as a child (log to a file) with the terminal UI attached")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    tui = sub.add_parser("tui", help="the terminal UI, attached to a running daemon")
    tui.add_argument("--socket", type=Path, help="control socket (default: found from the config)")
    tui.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    demo = sub.add_parser("demo", help="a daemon on a temporary config, simulated handsets and the TUI")
    demo.add_argument("--no-tui", action="store_true", help="run without the TUI until Ctrl+C")
    demo.add_argument("--duration", type=float, default=0.0, help="with --no-tui: stop after SECONDS")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "tui":
        return exec_tui(socket=args.socket, config=args.config)
    if args.command == "demo":
        from appliance.demo import run_demo

        return run_demo(tui=not args.no_tui, duration=args.duration)
    if args.tui and sys.stdin.isatty() and sys.stdout.isatty():
        return run_with_tui(args.config, args.log_level)
    setup_logging(args.log_level)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` dumps every thread's stack
    return run_event_loop(run_daemon(args.config))


def run_event_loop(main: Coroutine[object, object, int]) -> int:
    """Run on uvloop (libuv): it halves the per-datagram cost of the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def check_config(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{path}: ok ({len(config.users)} users, listen {', '.join(map(str, config.server.listen))})")
    return 0


async def run_daemon(path: Path) -> int:
    from appliance.edge.server import Edge  # imported here: check-config stays light

    try:
        fill_missing_passwords_logged(path)
        config = load_config(path)
    except ConfigError as err:
        log.error("event=config_invalid %s", fields(error=str(err)))
        return 2
    edge = Edge(config, config_path=path)
    try:
        await edge.start()
    except OSError as err:
        log.error("event=listen_failed %s", fields(error=err))
        await edge.stop()
        return 3
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload(edge, path))
    # Everything loaded so far lives as long as the process: keep it out of the collector's
    # way, and collect young objects less often (calls make many short-lived ones). The
    # middle generation is collected every fourth young collection, so it holds at most
    # ~80,000 objects: at 1,000+ calls/s (finished calls linger 32 s for retransmissions) a
    # middle collection with a threshold of 20 took ~120 ms, now ~15 ms (bench/calls.py max).
    gc.freeze()
    gc.set_threshold(20_000, 2, 20)
    log.info("event=ready %s", fields(listen=",".join(edge.addresses), config=path, pid=os.getpid()))
    sdnotify.notify(f"READY=1\nSTATUS=listening on {', '.join(edge.addresses)}\nMAINPID={os.getpid()}")
    watchdog = asyncio.create_task(sdnotify.watchdog())
    await stop.wait()
    log.info("event=stopping")
    sdnotify.notify("STOPPING=1")
    watchdog.cancel()
    await edge.stop()
    log.info("event=stopped")
    return 0


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


def reload(edge: Edge, path: Path) -> ConfigError | None:
    """Re-read the config (SIGHUP, or the control socket's reload); the error if refused."""
    sdnotify.notify("RELOADING=1")
    try:
        return _reload(edge, path)
    finally:
        sdnotify.notify("READY=1")


def _reload(edge: Edge, path: Path) -> ConfigError | None:
    try:
        fill_missing_passwords_logged(path)
        config = load_config(path)
    except ConfigError as err:
        # The user's mistake, answered (file:line: key), not a fault of the daemon: a warning.
        log.warning("event=reload_refused %s", fields(error=str(err), action="keeping_last_good_config"))
        return err
    edge.apply_config(config)
    log.info("event=config_reloaded %s", fields(users=len(config.users)))
    return None


# -- the terminal UI, always in its own process: the daemon never imports it -------------------
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
    import subprocess

    from appliance.control import socket_path

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
    tui = subprocess.Popen(tui_argv(socket_path(config), path, log_path))

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


if __name__ == "__main__":
    sys.exit(main())
