"""How times and counts read on a small screen."""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """02:14, 1:02:14."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def uptime(seconds: float) -> str:
    """3d 4h, 5h 12m, 7m."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def expires_in(seconds: float) -> str:
    """312 s under ten minutes, then 42 min, then 2 h."""
    total = max(0, int(seconds))
    if total < 600:
        return f"{total} s"
    if total < 7200:
        return f"{total // 60} min"
    return f"{total // 3600} h"


def since(stamp: float, now: float) -> str:
    """Clock time today, else the date."""
    then = time.localtime(stamp)
    if time.strftime("%Y-%m-%d", then) == time.strftime("%Y-%m-%d", time.localtime(now)):
        return time.strftime("%H:%M", then)
    return time.strftime("%d %b", then)


def limit(value: int) -> str:
    """An outgoing limit: 0 means unlimited."""
    return "∞" if value == 0 else str(value)
