"""The narrow seams between the edge's components: each receives only what it uses.

Small Protocols, passed in at construction by the composition root (appliance.daemon):
a component never reaches into another through a shared `Edge`, and a test hands it a
fake of the one or two things it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from appliance.sip.registrar import Binding, Flow, RegistrarEvent


class Network(Protocol):
    """The transports as the components see them: send along a flow (or open one), and our
    own addresses."""

    @property
    def addresses(self) -> list[str]:
        """The listeners, `host:port`, in config order (the first one is where workers reach us)."""
        ...

    def send(self, data: bytes, flow: Flow) -> bool: ...

    def local_address(self, flow: Flow) -> tuple[str, int]:
        """The address to put in our own Via/Contact/Record-Route when talking along `flow`."""
        ...

    def local_ips(self) -> set[str]: ...

    def flow_open(self, flow: Flow) -> bool:
        """Can we reach `flow` now (always for UDP; TCP: its connection is still there)?"""
        ...

    def connect(self, flow: Flow, then: Callable[[Flow | None, str], None]) -> None:
        """Open a TCP connection to `flow` (bounded in time and by the caps), then tell
        `then` the new connection's flow, or None and why not."""
        ...


class Bindings(Protocol):
    """The registrar's bindings, read-only."""

    def bindings(self, number: str) -> list[Binding]: ...


class DeviceLookup(Bindings, Protocol):
    """The registrar's bindings by number and by id (whose number a device is), read-only."""

    def get(self, binding_id: str) -> Binding | None: ...


PublishDeviceEvents = Callable[[list[RegistrarEvent]], None]
"""Where registrar events go: the log, the state file, the live state (edge.device_events)."""


class CallEvents(Protocol):
    """What the live state (hence the TUI), the busy lamps and the call history are told about calls."""

    def call_started(self, call_id: str, caller: str, callee: str, caller_device: str | None, *,
                     trunk: str | None = None, caller_name: str = "") -> None:
        """A call begins. `trunk`: the trunk it came in on (then `caller` is the outside
        number and `caller_name` what the provider calls it) or leaves by (then `callee`
        is the outside number)."""
        ...

    def device_ringing(self, call_id: str, binding_id: str) -> None: ...

    def device_stopped(self, call_id: str, binding_id: str) -> None: ...

    def call_answered(self, call_id: str, binding_id: str | None) -> None: ...

    def call_joined(self, call_id: str, binding_id: str) -> None: ...

    def call_left(self, call_id: str, binding_id: str) -> None: ...

    def call_ended(self, call_id: str, reason: str) -> None: ...

    def call_forwarded(self, call_id: str, number: str, to: str, condition: str) -> None:
        """`number` forwards the call to `to` (an extension or an outside number) on
        `condition` (always, busy, no_answer, unreachable, dnd)."""
        ...

    def call_transferred(self, call_id: str, caller: str, callee: str, binding_id: str | None) -> None:
        """A transfer (or a call pull) put a new party in: the call is now between `caller`
        and `callee`, whose device `binding_id` answered."""
        ...

    def call_to_voicemail(self, call_id: str, number: str) -> None:
        """The call goes to `number`'s answering machine."""
        ...


class CallEventsFanOut:
    """One `CallEvents` for the router that tells several sinks (the live state, the busy
    lamps), in the order given."""

    def __init__(self, *sinks: CallEvents) -> None:
        self.sinks = sinks

    def call_started(self, call_id: str, caller: str, callee: str, caller_device: str | None, *,
                     trunk: str | None = None, caller_name: str = "") -> None:
        for sink in self.sinks:
            sink.call_started(call_id, caller, callee, caller_device, trunk=trunk, caller_name=caller_name)

    def device_ringing(self, call_id: str, binding_id: str) -> None:
        for sink in self.sinks:
            sink.device_ringing(call_id, binding_id)

    def device_stopped(self, call_id: str, binding_id: str) -> None:
        for sink in self.sinks:
            sink.device_stopped(call_id, binding_id)

    def call_answered(self, call_id: str, binding_id: str | None) -> None:
        for sink in self.sinks:
            sink.call_answered(call_id, binding_id)

    def call_joined(self, call_id: str, binding_id: str) -> None:
        for sink in self.sinks:
            sink.call_joined(call_id, binding_id)

    def call_left(self, call_id: str, binding_id: str) -> None:
        for sink in self.sinks:
            sink.call_left(call_id, binding_id)

    def call_ended(self, call_id: str, reason: str) -> None:
        for sink in self.sinks:
            sink.call_ended(call_id, reason)

    def call_forwarded(self, call_id: str, number: str, to: str, condition: str) -> None:
        for sink in self.sinks:
            sink.call_forwarded(call_id, number, to, condition)

    def call_transferred(self, call_id: str, caller: str, callee: str, binding_id: str | None) -> None:
        for sink in self.sinks:
            sink.call_transferred(call_id, caller, callee, binding_id)

    def call_to_voicemail(self, call_id: str, number: str) -> None:
        for sink in self.sinks:
            sink.call_to_voicemail(call_id, number)


class TrunkLookup(Protocol):
    """Which trunk's provider a request comes from, by its source address alone (edge.trunks)."""

    def trunk_at(self, flow: Flow) -> str | None:
        """The name of the trunk whose resolved server address `flow` comes from, else None."""
        ...

    def provider_flow(self, name: str) -> Flow | None:
        """Where a call out through trunk `name` is sent (None: its server is not resolved yet)."""
        ...


class MediaAnchor(Protocol):
    """The media workers as the call router sees them (edge.media_link.MediaLink)."""

    @property
    def edge_address(self) -> str:
        """`host:port` the workers send their SIP to."""
        ...

    @property
    def available(self) -> bool:
        """False once the media engine proved it does not load here (pjsua2 missing)."""
        ...

    def is_worker(self, flow: Flow) -> bool: ...

    def anchor(self, token: str, then: Callable[[int | None], None]) -> None:
        """Find a worker for call `token`, then continue with its SIP port (None: all busy)."""
        ...

    def call_over(self, token: str) -> None: ...


class VoicemailEvents(Protocol):
    """What the media link tells of the answering machine (edge.voicemail.Voicemail: the
    store and the message lamps; the call history listens too)."""

    def voicemail_recorded(self, token: str, number: str, caller: str, path: str, seconds: float) -> None:
        """Call `token` left `number` a message: the finished recording at `path` (made by
        `Mailbox.recording_path`), `seconds` long, from `caller`."""
        ...

    def mailbox_changed(self, number: str) -> None:
        """A worker's mailbox menu changed `number`'s messages (heard, deleted, greeting)."""
        ...


class UserSettings(Protocol):
    """Change a user's settings from a handset's feature code (call forwarding, DND): saved
    in config.toml atomically and put in force, as the control socket's set_user does."""

    def change_user(self, number: str, changes: dict[str, object], then: Callable[[str | None], None]) -> None:
        """Apply `changes` to user `number`, then tell `then` None (done) or why not."""
        ...
