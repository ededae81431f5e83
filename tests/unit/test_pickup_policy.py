"""The pickup decisions (`*8`, `**<number>`, a BLF key's Replaces), as pure code."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.call_policy import CallInProgress, PickupCall, Refuse, decide_pickup, pickup_request
from appliance.config import Config, UserConfig, parse_config

CONFIG = """
[server]
listen = ["127.0.0.1:5060"]
[[users]]
number = "100"
password = "a"
[[users]]
number = "200"
password = "b"
[[users]]
number = "300"
password = "c"
"""


@pytest.fixture
def config() -> Config:
    return parse_config(CONFIG, Path("/etc/homepbx/config.toml"))


def user(config: Config, number: str) -> UserConfig:
    found = config.user(number)
    assert found is not None
    return found


def ringing(token: str, caller: str, callee: str, *, device: str | None = "d100", port: int | None = 40000,
            answered: bool = False, outgoing_trunk: str | None = None) -> CallInProgress:
    return CallInProgress(token, caller, callee, device, answered, port, 2, outgoing_trunk=outgoing_trunk)


def test_pickup_codes_are_the_defaults_and_directed_is_a_prefix(config: Config) -> None:
    assert pickup_request("*8", config) == (None,)
    assert pickup_request("**200", config) == ("200",)
    assert pickup_request("**", config) is None  # the prefix alone names nobody
    assert pickup_request("*74", config) is None
    assert pickup_request("200", config) is None


def test_star8_takes_the_oldest_call_ringing_at_another_number(config: Config) -> None:
    calls = [ringing("own", "100", "300"), ringing("t1", "100", "200", port=40002), ringing("t2", "100", "100")]
    decision = decide_pickup(user(config, "300"), "d300", None, config, calls, anchored=True)
    assert decision == PickupCall("t1", 40002, "200")  # never a call ringing at the picker's own number


def test_directed_pickup_takes_only_that_numbers_call(config: Config) -> None:
    calls = [ringing("t1", "300", "100", device="d300b"), ringing("t2", "100", "200")]
    assert decide_pickup(user(config, "300"), "d300", "200", config, calls, True) == PickupCall("t2", 40000, "200")
    nothing = decide_pickup(user(config, "300"), "d300", "200", config, calls[:1], True)
    assert isinstance(nothing, Refuse) and nothing.status == 404
    unknown = decide_pickup(user(config, "300"), "d300", "999", config, calls, True)
    assert isinstance(unknown, Refuse) and unknown.status == 404


def test_replaces_names_the_call_and_a_stale_one_is_481(config: Config) -> None:
    calls = [ringing("t1", "100", "200")]
    assert decide_pickup(user(config, "300"), "d300", None, config, calls, True, token="t1") == \
        PickupCall("t1", 40000, "200")
    stale = decide_pickup(user(config, "300"), "d300", None, config, calls, True, token="gone")
    assert isinstance(stale, Refuse) and stale.status == 481


@pytest.mark.parametrize("call", [
    ringing("t1", "100", "200", answered=True),  # answered already
    ringing("t1", "100", "200", port=None),  # not anchored in a worker
    ringing("t1", "300", "200", device="d300"),  # the picker's own outgoing call
    ringing("t1", "300", "4930123", outgoing_trunk="provider"),  # ringing outside
])
def test_nothing_to_pick_up(config: Config, call: CallInProgress) -> None:
    decision = decide_pickup(user(config, "300"), "d300", None, config, [call], True)
    assert isinstance(decision, Refuse) and decision.status == 404


def test_pickup_needs_a_registered_device_and_media_workers(config: Config) -> None:
    calls = [ringing("t1", "100", "200")]
    unregistered = decide_pickup(user(config, "300"), None, None, config, calls, True)
    assert isinstance(unregistered, Refuse) and unregistered.status == 403
    direct = decide_pickup(user(config, "300"), "d300", None, config, calls, anchored=False)
    assert isinstance(direct, Refuse) and direct.status == 404
