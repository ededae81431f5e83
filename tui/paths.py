"""Where to find the daemon's control socket when the user does not say."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.config import ConfigError, control_socket_path, load_config

SYSTEMD_SOCKET = Path("/run/homepbx/control.sock")
"""The service's RuntimeDirectory: what a family user's TUI finds over SSH."""


def find_socket(explicit: Path | None, config: Path | None) -> Path:
    """--socket, else $HOMEPBX_SOCKET, else the first existing of: the config's socket (as
    the daemon computes it, if the config is readable), the systemd one; else the first."""
    if explicit is not None:
        return explicit
    env = os.environ.get("HOMEPBX_SOCKET")
    if env:
        return Path(env)
    candidates: list[Path] = []
    if config is not None:
        try:
            candidates.append(control_socket_path(load_config(config)))
        except ConfigError:
            pass  # not readable by this user (it holds passwords), or broken: try the others
    candidates.append(SYSTEMD_SOCKET)
    for path in candidates:
        if path.exists():
            return path
    return candidates[0]
