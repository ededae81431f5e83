"""The TUI's model: the daemon's snapshot and events, applied; device states derived from calls."""

from __future__ import annotations

import pytest

from appliance.state import LiveState
from tests.tui import fixtures
from tui.messages import ModelChanged
from tui.model import DeviceState, PbxModel, ProtocolError
from tui.screens.setup_dialog import handset_settings

pytestmark = pytest.mark.tui


def record(state: LiveState) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    state.subscribe(events.append)
    return events


def test_states_follow_the_daemons_rules() -> None:
    _, _, state = fixtures.house()
    events = record(state)
    model = PbxModel()
    model.load_snapshot(fixtures.snapshot(state))
    assert [d.label for d in model.devices_of("200")] == ["Living room", "Kitchen", "Bathroom"]
    assert model.numbers["200"].device_limit == 3 and model.numbers["100"].device_limit == 1

    fixtures.in_conference(state)
    for event in events:
        model.apply(event)
    for device in ("d1", "d2", "d3", "d4"):  # the client derives what the daemon computes
        assert model.device_state(device).value == state.device_state(device).value
    assert model.device_state("d1") is DeviceState.CONFERENCE
    assert model.device_state("d3") is DeviceState.IDLE
    assert model.outgoing_in_use("100") == 1 and model.outgoing_in_use("300") == 0  # c2 has no device of ours

    state.call_ended("c1", "hangup")
    model.apply(events[-1])
    assert model.device_state("d1") is DeviceState.IDLE
    assert list(model.calls) == ["c2"]


def test_events_are_idempotent_and_a_snapshot_replaces_all() -> None:
    _, _, state = fixtures.house()
    events = record(state)
    state.call_started("c1", "100", "200", "d4")
    state.device_ringing("c1", "d1")
    model = PbxModel()
    model.load_snapshot(fixtures.snapshot(state))
    before = (dict(model.calls), dict(model.devices))
    model.apply(events[-1])  # the latest event, already in the snapshot: no change
    model.apply(events[-1])
    assert (model.calls, model.devices) == before
    model.apply({"event": "snapshot", "numbers": [], "calls": []})
    assert not model.devices and not model.calls and not model.numbers


@pytest.mark.parametrize("event", [
    {"event": "device_registered", "device": "d1"},
    {"event": "device_registered", "device": {"id": 3}},
    {"event": "call_started", "call": {"id": "c", "ringing": "d1"}},
    {"event": "snapshot", "numbers": {"200": {}}},
    {"event": "snapshot", "numbers": [{"number": "200", "one_number": "yes"}]},
    {"event": 5},
])
def test_malformed_events_raise_protocol_error(event: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        PbxModel().apply(event)


def test_unknown_events_are_ignored() -> None:
    model = PbxModel()
    assert model.apply({"event": "voicemail_left", "box": "200"}) == "voicemail_left"


def test_redraw_messages_coalesce_keeping_every_kind_and_the_oldest_time() -> None:
    handled_first = ModelChanged({"device_ringing"}, 10.0)
    waiting = ModelChanged({"call_answered"}, 11.0)
    assert handled_first.can_replace(waiting)
    assert waiting.kinds == {"device_ringing", "call_answered"}
    assert waiting.first_event_time == 10.0


def test_blocked_addresses_come_from_snapshot_and_events_and_expire() -> None:
    _, _, state = fixtures.house()
    events = record(state)
    state.address_blocked("203.0.113.7", 60.0, "auth_failures")
    model = PbxModel()
    model.load_snapshot(fixtures.snapshot(state))
    until = model.blocked["203.0.113.7"]
    state.address_blocked("198.51.100.1", 600.0, "auth_failures")
    model.apply(events[-1])
    assert [a for a, _ in model.blocked_now(until - 1)] == ["198.51.100.1", "203.0.113.7"]
    assert [a for a, _ in model.blocked_now(until + 1)] == ["198.51.100.1"]


def test_the_box_is_reached_at_its_addresses_not_the_wildcard() -> None:
    _, _, state = fixtures.house()
    model = PbxModel()
    model.load_snapshot(fixtures.snapshot(state))
    assert model.listen == ("0.0.0.0:5060",)
    assert model.reachable_at == ("192.168.1.2:5060",)
    model.load_snapshot({"event": "snapshot", "listen": ["0.0.0.0:5060"]})  # an older daemon: no addresses
    assert model.reachable_at == ("0.0.0.0:5060",)
    with pytest.raises(ProtocolError):
        model.load_snapshot({"event": "snapshot", "addresses": "192.168.1.2:5060"})


@pytest.mark.parametrize(("addresses", "server", "port"), [
    (["192.168.1.2:5060"], ["192.168.1.2"], "5060"),
    (["192.168.1.2:5060", "10.0.0.5:5060", "[fd00::2]:5060"], ["192.168.1.2", "or 10.0.0.5", "or fd00::2"], "5060"),
    (["192.168.1.2:5060", "[fd00::2]:5070"], ["192.168.1.2:5060", "or [fd00::2]:5070"], "the one after each address"),
    (["0.0.0.0:5062"], ["this box's address"], "5062"),  # the daemon found no interface address
    ([], ["this box's address"], "5060"),
])
def test_handset_settings(addresses: list[str], server: list[str], port: str) -> None:
    rows = handset_settings("200", addresses)
    assert [value for _, value in rows[:len(server)]] == server
    assert rows[0][0] == "SIP server" and all(name == "" for name, _ in rows[1:len(server)])
    fields = dict(rows)
    assert fields["Port"] == port
    assert fields["User name"] == "200" and fields["Auth name"].startswith("200")
    assert fields["Transport"] == "UDP or TCP"
