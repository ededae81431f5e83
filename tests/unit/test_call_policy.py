"""The call policy: every refusal and every route, as pure decisions (no sockets, no clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.call_policy import (
    CallInProgress,
    Decision,
    JoinCall,
    Refuse,
    RingNumber,
    RouteToTrunk,
    ToProvider,
    decide_incoming,
    decide_join,
    decide_new_call,
    decide_worker_leg,
)
from appliance.config import Config, TrunkConfig, UserConfig, parse_config

CONFIG = """
[server]
listen = ["127.0.0.1:5060"]
[feature_codes]
"*74" = "join"
[[users]]
number = "100"
password = "a"
[[users]]
number = "200"
password = "b"
one_number = true
max_devices = 3
max_outgoing_calls = 2
ring_timeout = 20
[[users]]
number = "300"
password = "c"
decline = "all_devices"
"""

TRUNKS = """
[[trunks]]
name = "exact"
server = "sip.example.net"
username = "4930123456"
password = "p"
incoming = { "4930123456" = "200", "4930123457" = "300", "+4940555" = "100" }
[[trunks]]
name = "catchall"
server = "sip.example.org"
username = "acct"
password = "p"
outgoing_prefix = "9"
incoming = { "4930123456" = "200", "*" = "100" }
"""

DEVICES = {"100": ["d100"], "200": ["d1", "d2", "d3"], "300": []}


@pytest.fixture
def config() -> Config:
    return parse_config(CONFIG, Path("/etc/homepbx/config.toml"))


@pytest.fixture
def trunked() -> Config:
    return parse_config(CONFIG + TRUNKS, Path("/etc/homepbx/config.toml"))


def trunk(config: Config, name: str) -> TrunkConfig:
    return next(t for t in config.trunks if t.name == name)


def reachable(number: str) -> list[str]:
    return DEVICES.get(number, [])


def user(config: Config, number: str) -> UserConfig:
    found = config.user(number)
    assert found is not None
    return found


def answered_call(token: str = "t1", caller: str = "100", callee: str = "200", caller_device: str | None = "d100",
                  parties: int = 2, worker_port: int | None = 40000, answered: bool = True) -> CallInProgress:
    return CallInProgress(token, caller, callee, caller_device, answered, worker_port, parties)


def new_call(config: Config, caller: str, dialled: str, *, device: str | None = "d100",
             outgoing: dict[str, int] | None = None, calls: list[CallInProgress] | None = None,
             anchored: bool = True) -> Decision:
    return decide_new_call(user(config, caller), device, dialled, config, reachable, outgoing or {},
                           calls or [], anchored)


def status(decision: object) -> int:
    assert isinstance(decision, Refuse), decision
    return decision.status


# -- routes ----------------------------------------------------------------------------------
def test_a_call_rings_every_reachable_device_of_the_number(config: Config) -> None:
    decision = new_call(config, "100", "200")
    assert decision == RingNumber("200", ("d1", "d2", "d3"), 20.0, False, True)


def test_the_calling_device_itself_is_never_rung(config: Config) -> None:
    decision = new_call(config, "200", "200", device="d2")  # a handset calls its own number
    assert isinstance(decision, RingNumber) and decision.devices == ("d1", "d3")


def test_decline_all_devices_is_carried_to_the_fork(config: Config) -> None:
    DEVICES["300"] = ["d9"]
    try:
        decision = new_call(config, "100", "300")
    finally:
        DEVICES["300"] = []
    assert isinstance(decision, RingNumber) and decision.decline_all


def test_join_code_routes_to_the_numbers_call(config: Config) -> None:
    calls = [answered_call(caller_device="d100")]
    assert new_call(config, "200", "*74", device="d2", calls=calls) == JoinCall("t1", 40000, "d2")


def test_worker_leg_rings_the_callee_but_not_the_calling_device(config: Config) -> None:
    anchoring = answered_call(caller="200", callee="200", caller_device="d1", answered=False)
    decision = decide_worker_leg(anchoring, 40000, "200", config, reachable)
    assert decision == RingNumber("200", ("d2", "d3"), 20.0, False, False)  # not counted twice


# -- refusals --------------------------------------------------------------------------------
def test_unknown_number_is_404(config: Config) -> None:
    assert new_call(config, "100", "999") == Refuse(404, "Not Found", "unknown_number")
    assert new_call(config, "100", "") == Refuse(404, "Not Found", "unknown_number")


def test_outgoing_limit_is_403_with_the_figures(config: Config) -> None:
    decision = new_call(config, "200", "100", device="d1", outgoing={"200": 2})
    assert decision == Refuse(403, "Outgoing call limit reached (2 of 2)", "outgoing_limit")
    assert isinstance(new_call(config, "200", "100", device="d1", outgoing={"200": 1}), RingNumber)
    assert isinstance(new_call(config, "100", "200", outgoing={"100": 50}), RingNumber)  # 0 = unlimited


def test_unknown_number_is_decided_before_the_limit(config: Config) -> None:
    assert status(new_call(config, "200", "999", device="d1", outgoing={"200": 2})) == 404


def test_no_reachable_device_is_480(config: Config) -> None:
    assert new_call(config, "100", "300") == Refuse(480, "Temporarily Unavailable", "no_reachable_device")
    assert new_call(config, "100", "100") == Refuse(480, "Temporarily Unavailable", "no_reachable_device")


def test_join_refusals(config: Config) -> None:
    calls = [answered_call()]
    assert status(decide_join(user(config, "100"), "d100", calls, True)) == 403
    assert decide_join(user(config, "200"), None, calls, True) == Refuse(
        403, "Not a registered device of 200", "join_unregistered_device")
    assert status(decide_join(user(config, "200"), "d2", [], True)) == 404
    assert status(decide_join(user(config, "200"), "d2", calls, False)) == 404
    ringing = [answered_call(answered=False)]
    assert status(decide_join(user(config, "200"), "d2", ringing, True)) == 404
    full = [answered_call(parties=3)]
    assert decide_join(user(config, "200"), "d2", full, True) == Refuse(
        486, "Busy Here (call already has three parties)", "join_full")
    own = [answered_call(caller="200", callee="100", caller_device="d2")]  # d2 is already in it
    assert status(decide_join(user(config, "200"), "d2", own, True)) == 404


def test_join_prefers_the_call_to_the_number(config: Config) -> None:
    calls = [answered_call("out", caller="200", callee="100", caller_device="d1"), answered_call("in")]
    assert decide_join(user(config, "200"), "d3", calls, True) == JoinCall("in", 40000, "d3")


def test_worker_leg_refusals(config: Config) -> None:
    anchoring = answered_call(worker_port=40000)
    assert status(decide_worker_leg(None, 40000, "200", config, reachable)) == 403
    assert decide_worker_leg(anchoring, 40002, "200", config, reachable) == Refuse(
        403, "Forbidden", "worker_not_anchoring")  # another worker cannot ride on this call
    assert status(decide_worker_leg(anchoring, 40000, "999", config, reachable)) == 404
    assert status(decide_worker_leg(anchoring, 40000, "300", config, reachable)) == 480


# -- calls from the provider -----------------------------------------------------------------
def test_incoming_did_rings_its_extension_and_counts_against_no_one(trunked: Config) -> None:
    decision = decide_incoming(trunk(trunked, "exact"), "4930123456", "4930123456", trunked, reachable)
    assert decision == RingNumber("200", ("d1", "d2", "d3"), 20.0, False, False)
    assert isinstance(decide_incoming(trunk(trunked, "exact"), "+4930123456", "", trunked, reachable), RingNumber)
    decision = decide_incoming(trunk(trunked, "exact"), "4940555", "", trunked, reachable)  # config has "+4940555"
    assert isinstance(decision, RingNumber) and decision.number == "100"


def test_incoming_star_takes_any_other_did(trunked: Config) -> None:
    catchall = trunk(trunked, "catchall")
    assert decide_incoming(catchall, "4930999000", "", trunked, reachable) == RingNumber(
        "100", ("d100",), 30.0, False, False)
    decision = decide_incoming(catchall, "4930123456", "", trunked, reachable)
    assert isinstance(decision, RingNumber) and decision.number == "200"  # an explicit DID wins over "*"
    decision = decide_incoming(catchall, "acct", "4930123456", trunked, reachable)
    assert isinstance(decision, RingNumber) and decision.number == "200"  # ... also when only To names it


def test_incoming_unknown_did_is_404(trunked: Config) -> None:
    exact = trunk(trunked, "exact")
    assert decide_incoming(exact, "4930999000", "4930999000", trunked, reachable) == Refuse(
        404, "Not Found", "unknown_did")
    assert status(decide_incoming(exact, "", "", trunked, reachable)) == 404
    assert status(decide_incoming(exact, "*", "", trunked, reachable)) == 404  # "*" is no number
    assert status(decide_incoming(exact, "200", "", trunked, reachable)) == 404  # nor is an extension's


def test_incoming_to_an_extension_with_no_reachable_device_is_480(trunked: Config) -> None:
    assert decide_incoming(trunk(trunked, "exact"), "4930123457", "", trunked, reachable) == Refuse(
        480, "Temporarily Unavailable", "no_reachable_device")


def test_incoming_did_from_request_uri_or_only_to(trunked: Config) -> None:
    exact = trunk(trunked, "exact")
    # The Request-URI names the DID, To something else (a forwarded call): the Request-URI decides.
    decision = decide_incoming(exact, "4930123456", "4930123457", trunked, reachable)
    assert isinstance(decision, RingNumber) and decision.number == "200"
    decision = decide_incoming(exact, "4930123457", "4930123456", trunked, reachable)
    assert status(decision) == 480  # 300's, which has no device
    # No user in the Request-URI (sip:box-address), or the account's name: the To user decides.
    decision = decide_incoming(exact, "", "4930123456", trunked, reachable)
    assert isinstance(decision, RingNumber) and decision.number == "200"
    decision = decide_incoming(exact, "account-name", "4930123456", trunked, reachable)
    assert isinstance(decision, RingNumber) and decision.number == "200"


def test_join_ignores_an_outside_caller_with_an_extensions_digits(config: Config) -> None:
    outside = CallInProgress("t9", "200", "100", None, True, 40000, 2, trunk="provider")
    assert status(decide_join(user(config, "200"), "d2", [outside], True)) == 404
    family = CallInProgress("t8", "4930999999", "200", None, True, 40000, 2, trunk="provider")
    assert decide_join(user(config, "200"), "d2", [outside, family], True) == JoinCall("t8", 40000, "d2")


# -- calls out through the provider ------------------------------------------------------------
OPEN_PREFIX = """
[[trunks]]
name = "open"
server = "sip.example.net"
username = "4930123456"
password = "p"
outgoing_prefix = ""
max_channels = 1
"""


def channel(token: str, trunk_name: str, *, outgoing: bool = True) -> CallInProgress:
    if outgoing:
        return CallInProgress(token, "100", "4930999", "d100", True, 40000, 2, outgoing_trunk=trunk_name)
    return CallInProgress(token, "4930999", "200", None, True, 40000, 2, trunk=trunk_name)


def test_the_prefix_picks_the_trunk_and_is_stripped(trunked: Config) -> None:
    assert new_call(trunked, "100", "04930999999") == RouteToTrunk("exact", "4930999999", "4930123456", False)
    assert new_call(trunked, "100", "9+4930999") == RouteToTrunk("catchall", "+4930999", "acct", False)
    assert status(new_call(trunked, "100", "0")) == 404  # the prefix alone is no number
    assert status(new_call(trunked, "100", "0abc")) == 404


def test_caller_id_is_the_extensions_else_the_trunks_username() -> None:
    config = parse_config(CONFIG.replace('password = "a"', 'password = "a"\ncaller_id = "+4930123499"') + TRUNKS,
                          Path("/etc/homepbx/config.toml"))
    decision = new_call(config, "100", "04930999999")
    assert isinstance(decision, RouteToTrunk) and decision.caller_id == "+4930123499"
    decision = new_call(config, "200", "04930999999", device="d1")
    assert isinstance(decision, RouteToTrunk) and decision.caller_id == "4930123456"


def test_a_number_without_a_prefix_that_is_no_extension_is_404(trunked: Config) -> None:
    assert new_call(trunked, "100", "4930999999") == Refuse(404, "Not Found", "unknown_number")
    assert status(new_call(trunked, "100", "777")) == 404
    assert isinstance(new_call(trunked, "100", "200"), RingNumber)  # extensions as before


def test_an_empty_prefix_routes_any_number_that_is_no_extension() -> None:
    config = parse_config(CONFIG + OPEN_PREFIX, Path("/etc/homepbx/config.toml"))
    assert new_call(config, "100", "4930999999") == RouteToTrunk("open", "4930999999", "4930123456", False)
    assert isinstance(new_call(config, "100", "200"), RingNumber)
    assert status(new_call(config, "100", "alice")) == 404
    assert status(new_call(config, "100", "")) == 404


def test_max_channels_full_is_503_counting_calls_in_and_out(trunked: Config) -> None:
    # "exact" has 2 channels (the default): one call out and one call in fill it.
    calls = [channel("t1", "exact"), channel("t2", "exact", outgoing=False), channel("t3", "catchall")]
    assert new_call(trunked, "100", "04930999999", calls=calls) == Refuse(
        503, "Service Unavailable (all 2 lines to the provider busy)", "trunk_channels_full")
    assert isinstance(new_call(trunked, "100", "04930999999", calls=calls[1:]), RouteToTrunk)
    assert isinstance(new_call(trunked, "100", "94930999999", calls=calls), RouteToTrunk)  # another trunk's


def test_calls_out_count_against_max_outgoing_calls(trunked: Config) -> None:
    decision = new_call(trunked, "200", "04930999999", device="d1", outgoing={"200": 1})
    assert isinstance(decision, RouteToTrunk) and decision.counts_outgoing
    assert new_call(trunked, "200", "04930999999", device="d1", outgoing={"200": 2}) == Refuse(
        403, "Outgoing call limit reached (2 of 2)", "outgoing_limit")


def test_emergency_numbers_go_out_as_dialled_whatever_the_limits(trunked: Config) -> None:
    full = [channel("t1", "exact"), channel("t2", "exact"), channel("t3", "catchall")]
    for dialled, route in (("112", "exact"), ("0112", "exact"), ("9110", "catchall"), ("911", "exact")):
        decision = new_call(trunked, "200", dialled, device="d1", outgoing={"200": 2}, calls=full)
        number = dialled[-3:]
        assert decision == RouteToTrunk(route, number, "4930123456" if route == "exact" else "acct", True), dialled
    custom = parse_config('emergency_numbers = ["1120"]\n' + CONFIG + TRUNKS, Path("/etc/homepbx/config.toml"))
    assert isinstance(new_call(custom, "200", "01120", device="d1", outgoing={"200": 2}), RouteToTrunk)
    assert status(new_call(custom, "200", "0112", device="d1", outgoing={"200": 2})) == 403  # not one here


def test_without_a_trunk_nothing_goes_out(config: Config) -> None:
    assert status(new_call(config, "100", "04930999999")) == 404
    assert status(new_call(config, "100", "112")) == 404


def test_the_workers_leg_of_a_call_out_goes_to_the_provider(trunked: Config) -> None:
    anchoring = CallInProgress("t1", "100", "4930999999", "d100", False, 40000, 2, outgoing_trunk="exact")
    assert decide_worker_leg(anchoring, 40000, "4930999999", trunked, reachable) == ToProvider(
        trunk(trunked, "exact"), "4930999999")
    assert status(decide_worker_leg(anchoring, 40002, "4930999999", trunked, reachable)) == 403
    gone = CallInProgress("t1", "100", "4930999999", "d100", False, 40000, 2, outgoing_trunk="removed")
    assert decide_worker_leg(gone, 40000, "4930999999", trunked, reachable) == Refuse(
        404, "Not Found", "trunk_removed")
