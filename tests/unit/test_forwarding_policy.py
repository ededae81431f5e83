"""Call forwarding and do-not-disturb as pure decisions (appliance/call_policy.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.call_policy import (
    CallInProgress,
    ChangeSettings,
    Forward,
    Refuse,
    RingNumber,
    RouteToTrunk,
    decide_feature_code,
    decide_forward,
    decide_new_call,
    decide_worker_leg,
    forward_condition_of,
    ring_targets,
)
from appliance.config import Config, ConfigError, UserConfig, device_id, parse_config

BASE = """
[server]
listen = ["127.0.0.1:5060"]
[[users]]
number = "100"
password = "a"
{u100}
[[users]]
number = "200"
password = "b"
one_number = true
max_outgoing_calls = 1
{u200}
[[users]]
number = "300"
password = "c"
ring_timeout = 40
{u300}
[[trunks]]
name = "provider"
server = "sip.example.net"
username = "4930123456"
password = "p"
outgoing_prefix = "0"
max_channels = 2
"""

DEVICES = {"100": ["d100"], "200": ["d1", "d2"], "300": ["d3"]}
IDS = {"d1": "urn:uuid:one", "d2": "kitchen@192.0.2.7", "d3": "d3@x", "d100": "d100@x"}


def make(u100: str = "", u200: str = "", u300: str = "") -> Config:
    return parse_config(BASE.format(u100=u100, u200=u200, u300=u300), Path("/etc/homepbx/config.toml"))


def reachable(number: str) -> list[str]:
    return DEVICES.get(number, [])


def ids(number: str, binding: str) -> str:
    return IDS[binding]


def user(config: Config, number: str) -> UserConfig:
    found = config.user(number)
    assert found is not None
    return found


def forward(config: Config, number: str, condition: str, *, hops: tuple[tuple[str, str], ...] = (),
            outgoing: dict[str, int] | None = None,
            calls: list[CallInProgress] | None = None) -> Forward | Refuse | None:
    return decide_forward(user(config, number), condition, hops, config, reachable, ids, outgoing or {},
                          calls or [], "d100")


def worker_leg(config: Config, dialled: str) -> object:
    anchoring = CallInProgress("t1", "100", dialled, "d100", False, 40000, 2)
    return decide_worker_leg(anchoring, 40000, dialled, config, reachable, device_ids=ids)


def test_forward_always_to_an_extension_rings_its_devices_and_says_who_forwarded() -> None:
    config = make(u200='forward_always = "300"')
    decision = worker_leg(config, "200")
    assert decision == Forward(RingNumber("300", ("d3",), 40.0, False, False), (("200", "always"),))
    assert isinstance(decision, Forward) and decision.number == "200"


@pytest.mark.parametrize(("condition", "field"), [("busy", "forward_busy"), ("no_answer", "forward_no_answer"),
                                                  ("unreachable", "forward_unreachable"), ("dnd", "forward_busy")])
def test_each_condition_uses_its_own_target(condition: str, field: str) -> None:
    config = make(u200=f'{field} = "300"')
    decision = forward(config, "200", condition)
    assert isinstance(decision, Forward) and decision.to.number == "300"
    assert decision.hops == (("200", condition),)


def test_no_forwarding_set_is_none_but_dnd_without_it_is_486() -> None:
    config = make()
    assert forward(config, "200", "busy") is None
    assert forward(config, "200", "no_answer") is None
    refused = forward(config, "200", "dnd")
    assert isinstance(refused, Refuse) and refused.status == 486


def test_a_number_in_dnd_refuses_486_before_anything_rings() -> None:
    config = make(u200="dnd = true")
    decision = decide_new_call(user(config, "100"), "d100", "200", config, reachable, {}, [], True, ids)
    assert isinstance(decision, Refuse) and decision.status == 486


def test_a_number_in_dnd_with_forward_busy_forwards() -> None:
    config = make(u200='dnd = true\nforward_busy = "300"')
    decision = worker_leg(config, "200")
    assert isinstance(decision, Forward) and decision.hops == (("200", "dnd"),) and decision.to.number == "300"


def test_a_device_in_dnd_is_not_rung_and_all_devices_in_dnd_is_dnd() -> None:
    config = make(u200='dnd_devices = ["urn:uuid:one"]')
    assert ring_targets(user(config, "200"), ["d1", "d2"], ids) == ("d2",)
    assert worker_leg(config, "200") == RingNumber("200", ("d2",), 30.0, False, False)
    config = make(u200='dnd_devices = ["urn:uuid:one", "kitchen@192.0.2.7"]')
    decision = worker_leg(config, "200")
    assert isinstance(decision, Refuse) and decision.status == 486


def test_unreachable_forwards_only_when_set() -> None:
    config = make(u300='forward_unreachable = "200"')
    DEVICES["300"] = []
    try:
        decision = worker_leg(config, "300")
        assert isinstance(decision, Forward) and decision.hops == (("300", "unreachable"),)
        assert isinstance(worker_leg(make(), "300"), Refuse)
    finally:
        DEVICES["300"] = ["d3"]


def test_a_target_that_forwards_always_is_followed() -> None:
    config = make(u200='forward_busy = "300"', u300='forward_always = "0301234"')
    decision = forward(config, "200", "busy")
    assert isinstance(decision, Forward) and isinstance(decision.to, RouteToTrunk)
    assert decision.hops == (("200", "busy"), ("300", "always"))
    assert decision.number == "300"  # the last forwarding number: its outgoing limit counts
    # the calling device itself is never the target's ring target
    config = make(u200='forward_busy = "100"')
    refused = forward(config, "200", "busy")
    assert isinstance(refused, Refuse) and refused.status == 480


def test_a_loop_across_users_is_refused_482() -> None:
    config = make(u200='forward_always = "300"', u300='forward_always = "200"')
    decision = worker_leg(config, "200")
    assert isinstance(decision, Refuse) and decision.status == 482 and decision.why == "forward_loop"
    # and at the A-leg, before any worker is taken
    call = decide_new_call(user(config, "100"), "d100", "200", config, reachable, {}, [], True, ids)
    assert isinstance(call, Refuse) and call.status == 482


def test_a_chain_back_to_a_number_already_passed_is_a_loop() -> None:
    config = make(u200='forward_no_answer = "300"', u300='forward_busy = "200"')
    decision = forward(config, "300", "busy", hops=(("200", "no_answer"),))
    assert isinstance(decision, Refuse) and decision.status == 482


def test_forward_out_counts_on_the_forwarding_numbers_limit() -> None:
    config = make(u200='forward_always = "0301234"')
    decision = worker_leg(config, "200")
    assert isinstance(decision, Forward)
    assert decision.to == RouteToTrunk("provider", "301234", "4930123456", emergency=False)
    refused = forward(config, "200", "always", outgoing={"200": 1})
    assert isinstance(refused, Refuse) and refused.status == 403
    # the caller's own calls do not count: only the forwarding number's
    assert isinstance(forward(config, "200", "always", outgoing={"100": 5}), Forward)


def test_forward_out_with_every_line_busy_is_503() -> None:
    config = make(u200='forward_always = "0301234"')
    calls = [CallInProgress(f"t{i}", "100", "0", None, True, None, 2, outgoing_trunk="provider") for i in range(2)]
    refused = forward(config, "200", "always", calls=calls)
    assert isinstance(refused, Refuse) and refused.status == 503


def test_no_answer_after_replaces_the_ring_timeout_while_forwarding_on_no_answer() -> None:
    config = make(u300='forward_no_answer = "200"\nno_answer_after = 7')
    assert user(config, "300").ring_seconds == 7
    decision = worker_leg(config, "300")
    assert isinstance(decision, RingNumber) and decision.ring_timeout == 7.0
    assert user(make(), "300").ring_seconds == 40


def test_fork_failures_map_to_conditions() -> None:
    assert forward_condition_of(486) == "busy"
    assert forward_condition_of(600) == "busy"
    assert forward_condition_of(480) == "no_answer"
    assert forward_condition_of(408) == "no_answer"
    assert forward_condition_of(603) is None
    assert forward_condition_of(404) is None


# -- feature codes ----------------------------------------------------------------------------
@pytest.mark.parametrize(("dialled", "changes"), [
    ("*72300", {"forward_always": "300"}), ("*73", {"forward_always": ""}),
    ("*90300", {"forward_busy": "300"}), ("*91", {"forward_busy": ""}),
    ("*52300", {"forward_no_answer": "300"}), ("*53", {"forward_no_answer": ""}),
    ("*78", {"dnd": True}), ("*79", {"dnd": False}), ("*76", {"dnd": True}),
    ("*720301234", {"forward_always": "0301234"}),
])
def test_feature_codes_change_the_callers_settings(dialled: str, changes: dict[str, object]) -> None:
    config = make()
    decision = decide_feature_code(user(config, "200"), dialled, config)
    assert isinstance(decision, ChangeSettings) and decision.number == "200"
    assert dict(decision.changes) == changes
    via_call = decide_new_call(user(config, "200"), "d1", dialled, config, reachable, {}, [], True, ids)
    assert via_call == decision


def test_dnd_toggle_turns_it_off_when_on() -> None:
    config = make(u200="dnd = true")
    decision = decide_feature_code(user(config, "200"), "*76", config)
    assert isinstance(decision, ChangeSettings) and dict(decision.changes) == {"dnd": False}


@pytest.mark.parametrize(("dialled", "code"), [("*72", 484), ("*72200", 403), ("*72555", 404), ("*72112", 404)])
def test_bad_forwarding_codes_are_refused(dialled: str, code: int) -> None:
    config = make()
    decision = decide_feature_code(user(config, "200"), dialled, config)
    assert isinstance(decision, Refuse) and decision.status == code


def test_join_and_pickup_are_no_settings_codes() -> None:
    config = make()
    for dialled in ("*74", "*8", "**200", "200"):
        assert decide_feature_code(user(config, "200"), dialled, config) is None


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "message"), [
    ('forward_always = "200"', "cannot forward to itself"),
    ('forward_busy = "555"', "no such extension"),
    ('forward_busy = "0112"', ""),  # routed out: accepted
    ('forward_no_answer = "x"', "must be a number"),
    ("no_answer_after = 2", "must be"),
    ("dnd = 1", "boolean"),
    ('dnd_devices = "a"', "array of device ids"),
])
def test_forwarding_settings_are_validated_with_file_and_line(extra: str, message: str) -> None:
    if not message:
        make(u200=extra)
        return
    with pytest.raises(ConfigError) as err:
        make(u200=extra)
    assert message in str(err.value) and "config.toml:" in str(err.value) and "users[1]" in str(err.value)


def test_unknown_feature_service_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown service 'divert'"):
        parse_config('[feature_codes]\n"*70" = "divert"\n', Path("c.toml"))


def test_a_code_hidden_behind_a_prefix_code_is_refused() -> None:
    with pytest.raises(ConfigError, match="starts with '\\*72'"):
        parse_config('[feature_codes]\n"*72" = "forward_always"\n"*721" = "dnd_on"\n', Path("c.toml"))


def test_device_id_is_the_instance_else_contact_user_at_host() -> None:
    assert device_id('"<urn:uuid:abc>"', "<sip:x@1.2.3.4:5060>") == "urn:uuid:abc"
    assert device_id(None, "<sip:kitchen@192.0.2.7:5062;transport=tcp>") == "kitchen@192.0.2.7:5062"
    assert device_id(None, "<sip:kitchen@192.0.2.7>") == "kitchen@192.0.2.7"
