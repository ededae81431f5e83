"""decide_transfer: a transfer is authorised as a call the transferring extension places itself."""

from __future__ import annotations

from pathlib import Path

from appliance.call_policy import Refuse, RingNumber, RouteToTrunk, decide_transfer
from appliance.config import Config, UserConfig, parse_config

CONFIG = """
[server]
listen = ["127.0.0.1:5060"]
[feature_codes]
"*74" = "join"
[[users]]
number = "100"
password = "a"
max_outgoing_calls = 1
[[users]]
number = "200"
password = "b"
[[users]]
number = "300"
password = "c"
[[trunks]]
name = "out"
server = "sip.example.org"
username = "acct"
password = "p"
outgoing_prefix = "0"
"""

DEVICES = {"100": ["d100"], "200": ["d200"], "300": ["d300a", "d300b"]}


def config() -> Config:
    return parse_config(CONFIG, Path("/etc/homepbx/config.toml"))


def user(cfg: Config, number: str) -> UserConfig:
    found = cfg.user(number)
    assert found is not None
    return found


def reachable(number: str) -> list[str]:
    return DEVICES.get(number, [])


def transfer(number: str, dialled: str, in_use: dict[str, int] | None = None, *, counted: bool = False,
             device: str | None = None) -> Refuse | RingNumber | RouteToTrunk:
    cfg = config()
    return decide_transfer(user(cfg, number), device, dialled, cfg, reachable, in_use or {}, [],
                           counted_call=counted)


def test_internal_target_rings_its_devices() -> None:
    decision = transfer("200", "300")
    assert isinstance(decision, RingNumber)
    assert decision.number == "300" and decision.devices == ("d300a", "d300b")


def test_the_transferring_device_is_not_rung() -> None:
    decision = transfer("300", "300", device="d300a")
    assert isinstance(decision, RingNumber) and decision.devices == ("d300b",)


def test_unknown_number_is_404() -> None:
    decision = transfer("200", "555")
    assert isinstance(decision, Refuse) and decision.status == 404


def test_feature_code_is_no_target() -> None:
    decision = transfer("200", "*74")
    assert isinstance(decision, Refuse) and (decision.status, decision.why) == (404, "transfer_to_feature_code")


def test_outgoing_limit_of_the_transferring_extension() -> None:
    # 100 may place one call; one other call of its own is up: the transfer is refused.
    decision = transfer("100", "300", {"100": 1})
    assert isinstance(decision, Refuse) and (decision.status, decision.why) == (403, "outgoing_limit")


def test_the_call_being_transferred_is_not_counted_twice() -> None:
    # 100's one call is the one it transfers: it leaves it, so the transfer is allowed.
    decision = transfer("100", "300", {"100": 1}, counted=True)
    assert isinstance(decision, RingNumber) and decision.number == "300"


def test_outside_number_goes_through_the_trunk_as_from_the_extension() -> None:
    decision = transfer("200", "0301234567")
    assert isinstance(decision, RouteToTrunk)
    assert (decision.trunk, decision.number, decision.emergency) == ("out", "301234567", False)


def test_outside_number_respects_the_limit() -> None:
    decision = transfer("100", "0301234567", {"100": 2}, counted=True)
    assert isinstance(decision, Refuse) and decision.status == 403
