"""Where the registrar's news goes: one log line each, the state file, the live state."""

from __future__ import annotations

import logging
from collections.abc import Callable

from appliance.logs import fields
from appliance.sip.registrar import EventKind, RegistrarEvent

log = logging.getLogger("homepbx.edge")


class DeviceEvents:
    def __init__(self, mark_dirty: Callable[[], None], live_state: Callable[[RegistrarEvent], None]) -> None:
        self.mark_dirty = mark_dirty
        self.live_state = live_state

    def publish(self, events: list[RegistrarEvent]) -> None:
        for event in events:
            # Refreshes are routine (every device, every few minutes): debug, not info.
            level = logging.DEBUG if event.kind is EventKind.REFRESHED else logging.INFO
            if log.isEnabledFor(level):
                b = event.binding
                log.log(level, "event=device_%s %s", event.kind.value, fields(
                    number=b.number, device=b.id, contact=b.contact,
                    flow=f"{b.flow.transport}:{b.flow.host}:{b.flow.port}", ua=b.user_agent,
                    reason=event.reason or "-",
                ))
            self.mark_dirty()
            self.live_state(event)
