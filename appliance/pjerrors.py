"""How a pjsua2 failure reads in events and logs, for the processes that run pjsua2
(media workers, simulated handsets)."""

from __future__ import annotations

import pjsua2 as pj


def pj_error_text(exc: BaseException) -> str:
    """"title: reason (status N)" for pjsua2's own errors, "Type: message" for the rest."""
    if isinstance(exc, pj.Error):
        return f"{exc.title}: {exc.reason} (status {exc.status})"
    return f"{type(exc).__name__}: {exc}"
