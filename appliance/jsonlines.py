"""JSON-lines stdout for the pjsua2 child processes (media workers, simulated handsets).

Their parent reads one JSON event per line on stdout, but native code (pjlib's banner,
stray prints) also writes to fd 1. `private_stdout()` keeps a private copy of fd 1 for
JSON and points fd 1 and `sys.stdout` at stderr, so nothing else can corrupt the stream.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any, TextIO


class Emitter:
    """JSON events on the private stdout descriptor, one per line (thread-safe)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, default=str)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # parent gone: stdin EOF ends us shortly


def private_stdout() -> Emitter:
    """Keep fd 1 for JSON only; anything else printed goes to stderr."""
    json_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return Emitter(os.fdopen(json_fd, "w", encoding="utf-8", buffering=1))
