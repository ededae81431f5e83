"""Messages the TUI's workers post to the app (dataclasses, as Textual allows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


@dataclass
class Connected(Message):
    """The control socket answered and its snapshot is in the model."""

    path: str


@dataclass
class Disconnected(Message):
    """The daemon cannot be reached (or went away); the worker retries after ``retry_in``."""

    path: str
    reason: str
    retry_in: float
    hint: str = ""


@dataclass
class ModelChanged(Message):
    """Events were applied to the model; redraw. Bursts coalesce into one redraw."""

    kinds: set[str] = field(default_factory=set)
    first_event_time: float | None = None
    """Daemon time of the oldest event not yet drawn, for the event-to-screen figure."""

    def can_replace(self, message: Message) -> bool:
        """Textual asks this of a message about to be handled when ``message`` waits behind
        it: True drops this one, so hand what it carried on to the one that stays."""
        if not isinstance(message, ModelChanged):
            return False
        message.kinds |= self.kinds
        if self.first_event_time is not None:
            later = message.first_event_time
            message.first_event_time = self.first_event_time if later is None else min(later, self.first_event_time)
        return True


@dataclass
class CommandDone(Message):
    """A command's answer: ``ok`` and a line for the person who pressed the key."""

    command: str
    ok: bool
    text: str
    reply: dict[str, Any] = field(default_factory=dict)
