"""Command line: `homepbx run | check-config | tui | demo` (also `python -m appliance`).

It parses the arguments and dispatches, nothing more: the daemon is built in
`appliance.daemon`, the TUI started by `appliance.tui_launch`.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path

from appliance.config import ConfigError, load_config
from appliance.logs import setup_logging

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
        from appliance.tui_launch import exec_tui

        return exec_tui(socket=args.socket, config=args.config)
    if args.command == "demo":
        from appliance.demo import run_demo

        return run_demo(tui=not args.no_tui, duration=args.duration)
    if args.tui and sys.stdin.isatty() and sys.stdout.isatty():
        from appliance.tui_launch import run_with_tui

        return run_with_tui(args.config, args.log_level)
    from appliance.daemon import run as run_daemon  # imported here: check-config stays light

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


if __name__ == "__main__":
    sys.exit(main())
