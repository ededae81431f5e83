"""The TUI's line per trunk, from the daemon's snapshot and trunk events."""

from __future__ import annotations

from tui.model import PbxModel
from tui.widgets.trunk_lines import trunk_line

NOW = 1_795_688_600.0


def trunk(**kw: object) -> dict[str, object]:
    view: dict[str, object] = {"name": "provider", "server": "sip.provider.example", "status": "registered",
                               "reason": "", "since": NOW - 60, "next_attempt": None, "expires_at": NOW + 540}
    view.update(kw)
    return view


def test_snapshot_and_events_keep_the_trunk_lines() -> None:
    model = PbxModel()
    model.load_snapshot({"event": "snapshot", "numbers": [], "calls": [], "trunks": [trunk()]})
    assert model.trunks["provider"].status == "registered"
    line = trunk_line(model.trunks["provider"], NOW).plain
    assert line.startswith("Line provider (sip.provider.example): registered, since ")
    assert "next try" not in line
    model.apply({"event": "trunk_changed", "trunk": trunk(
        status="rejected", reason="401 Unauthorized: the provider refused the username or password",
        since=NOW, next_attempt=NOW + 300)})
    line = trunk_line(model.trunks["provider"], NOW).plain
    assert "refused by the provider: 401 Unauthorized: the provider refused the username or password" in line
    assert line.endswith("next try in 300 s")
    model.apply({"event": "trunk_removed", "name": "provider"})
    assert model.trunks == {}


def test_an_older_daemon_without_trunks() -> None:
    model = PbxModel()
    model.load_snapshot({"event": "snapshot", "numbers": [], "calls": []})
    assert model.trunks == {}
