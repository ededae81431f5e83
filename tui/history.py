"""The call history as the History view shows it: pure formatting, no Textual."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tui import format

OUTCOME_WORDS = {
    "answered": "answered", "missed": "MISSED", "declined": "declined", "busy": "busy",
    "forwarded": "forwarded", "voicemail": "voicemail", "failed": "failed", "cancelled": "cancelled",
}
CONDITION_WORDS = {"always": "always", "busy": "busy", "no_answer": "no ans", "unreachable": "unreach", "dnd": "dnd"}
"""Why a call was forwarded, short (the Outcome column is narrow)."""
DIRECTION_MARKS = {"incoming": "←", "outgoing": "→", "internal": "·"}


@dataclass(frozen=True)
class HistoryLine:
    """One row of the History view."""

    id: int
    missed: bool
    when: str
    who: str
    to: str
    outcome: str
    answered_by: str
    duration: str


WIDTHS = {"who": 17, "to": 11, "outcome": 12, "answered_by": 10}
"""Columns clipped to fit 80 terminal columns."""


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def party(number: str, name: str) -> str:
    return f"{number} {name}".strip() if name and name != number else number


def when(stamp: float, now: float) -> str:
    """Today's calls by clock time; older ones by day, month and time (15.11. 09:30)."""
    then = time.localtime(stamp)
    if time.strftime("%Y-%m-%d", then) == time.strftime("%Y-%m-%d", time.localtime(now)):
        return time.strftime("%H:%M", then)
    return time.strftime("%d.%m. %H:%M", then)


def outcome_text(row: Mapping[str, Any]) -> str:
    word = OUTCOME_WORDS.get(str(row.get("outcome", "")), str(row.get("outcome", "")))
    if row.get("outcome") == "forwarded" and row.get("forwarded_to"):
        condition = CONDITION_WORDS.get(str(row.get("condition") or ""), "")
        return f"→ {row['forwarded_to']}" + (f" {condition}" if condition else "")
    return word


def history_lines(rows: Sequence[Mapping[str, Any]], now: float) -> list[HistoryLine]:
    """Missed calls first (newest first), then the others (newest first)."""
    ordered = sorted(rows, key=lambda r: (r.get("outcome") != "missed", -float(r.get("started") or 0)))
    lines = []
    for row in ordered:
        answered = str(row.get("answered_by") or "")
        number = str(row.get("answered_number") or "")
        by = f"{answered} ({number})" if answered and number and number != row.get("callee") else answered or number
        if row.get("answered") is None:
            by = ""
        mark = DIRECTION_MARKS.get(str(row.get("direction")), "·")
        lines.append(HistoryLine(
            id=int(row.get("id") or 0),
            missed=row.get("outcome") == "missed",
            when=when(float(row.get("started") or 0), now),
            who=clip(f"{mark} {party(str(row.get('caller', '')), str(row.get('caller_name', '')))}", WIDTHS["who"]),
            to=clip(party(str(row.get("callee", "")), str(row.get("callee_name", ""))), WIDTHS["to"]),
            outcome=clip(outcome_text(row), WIDTHS["outcome"]),
            answered_by=clip(by or "-", WIDTHS["answered_by"]),
            duration=format.duration(float(row.get("duration") or 0)) if row.get("answered") is not None else "-",
        ))
    return lines
