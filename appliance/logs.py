"""One log line per event, as key=value fields, with journal levels under systemd.

Under systemd (JOURNAL_STREAM set) each line starts with a `<N>` syslog priority so the
journal keeps levels; elsewhere lines carry a timestamp and the level name.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import OrderedDict

_PRIORITY = {
    logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7,
}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{super().format(record)}"


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def fields(**values: object) -> LogFields:
    """key=value pairs for a log line, formatted only if the line is written (`%s`)."""
    return LogFields(values)


class LogFields:
    """key=value pairs, quoting values that contain spaces; formatted by `str()`.

    Values often come off the wire (a User-Agent, a host name): control characters and
    non-ASCII are escaped, so a hostile packet can never forge or break a log line.
    Lazy because the router logs a few lines per call: below the log level (a benchmark's
    WARNING) they cost an object, not a formatting.
    """

    __slots__ = ("values",)

    def __init__(self, values: dict[str, object]) -> None:
        self.values = values

    def __str__(self) -> str:
        out = []
        for key, value in self.values.items():
            text = str(value)
            if not text.isascii() or not text.isprintable():
                text = text.encode("unicode_escape").decode("ascii")
            if not text or any(c in text for c in ' "='):
                text = '"' + text.replace('"', '\\"') + '"'
            out.append(f"{key}={text}")
        return " ".join(out)


class PerSourceLimit:
    """Lets one log line per source through every `interval` seconds (sans-I/O: `now` passed in).

    Whatever a stranger can trigger per packet (malformed input, unroutable responses) is
    logged through this, so a flood of hostile packets costs a line per source per
    interval, not a line per packet: the journal of a small box stays readable. What was
    held back is counted and reported on the next line that gets through (`suppressed=N`).
    At most `max_sources` sources are remembered (least recent dropped first).
    """

    def __init__(self, interval: float = 10.0, max_sources: int = 4096) -> None:
        self.interval = interval
        self.max_sources = max_sources
        self._sources: OrderedDict[str, list[float]] = OrderedDict()  # source -> [next allowed, held back]

    def allow(self, source: str, now: float) -> int | None:
        """None: hold this line back. Else the number of lines held back since the last one."""
        entry = self._sources.get(source)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return None
        held = int(entry[1]) if entry is not None else 0
        self._sources[source] = [now + self.interval, 0.0]
        self._sources.move_to_end(source)
        if len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        return held


def log_limited(logger: logging.Logger, limit: PerSourceLimit, source: str, now: float, event: str,
                level: int = logging.WARNING, **values: object) -> None:
    """One `event=... key=value` line for `source`, unless `limit` holds it back."""
    held = limit.allow(source, now)
    if held is None or not logger.isEnabledFor(level):
        return
    if held:
        values["suppressed"] = held
    logger.log(level, "event=%s %s", event, fields(**values))
