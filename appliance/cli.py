"""Command line: `homepbx run | check-config` (also `python -m appliance`)."""

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
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
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
    edge = Edge(config)
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


def reload(edge: Edge, path: Path) -> None:
    sdnotify.notify("RELOADING=1")
    try:
        _reload(edge, path)
    finally:
        sdnotify.notify("READY=1")


def _reload(edge: Edge, path: Path) -> None:
    try:
        fill_missing_passwords_logged(path)
        config = load_config(path)
    except ConfigError as err:
        log.error("event=reload_refused %s", fields(error=str(err), action="keeping_last_good_config"))
        return
    edge.apply_config(config)
    log.info("event=config_reloaded %s", fields(users=len(config.users)))


if __name__ == "__main__":
    sys.exit(main())
