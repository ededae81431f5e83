"""The answering machine as pure decisions (appliance/call_policy.py): when a call goes to
it, that forwarding wins over it, and who may open a mailbox."""

from __future__ import annotations

import pytest

from appliance.call_policy import (
    Forward,
    OpenMailbox,
    Refuse,
    RingNumber,
    ToVoicemail,
    decide_mailbox,
    decide_new_call,
    decide_voicemail,
)
from appliance.config import ConfigError
from tests.unit.test_forwarding_policy import DEVICES, forward, ids, make, reachable, user, worker_leg

VM = "voicemail = true"


@pytest.mark.parametrize("condition", ["busy", "no_answer", "unreachable", "dnd"])
def test_each_condition_reaches_the_answering_machine_without_forwarding(condition: str) -> None:
    config = make(u200=f"{VM}\nvoicemail_max_seconds = 60")
    assert forward(config, "200", condition) == ToVoicemail("200", condition, 60)


def test_off_by_default_and_never_for_always() -> None:
    assert decide_voicemail(user(make(), "200"), "no_answer") is None
    assert decide_voicemail(user(make(u200=VM), "200"), "always") is None


def test_busy_and_dnd_can_be_switched_off() -> None:
    config = make(u200=f"{VM}\nvoicemail_on_busy = false\nvoicemail_on_dnd = false")
    assert forward(config, "200", "busy") is None
    refused = forward(config, "200", "dnd")
    assert isinstance(refused, Refuse) and refused.status == 486
    assert isinstance(forward(config, "200", "no_answer"), ToVoicemail)


@pytest.mark.parametrize(("condition", "field"), [("busy", "forward_busy"), ("no_answer", "forward_no_answer"),
                                                  ("unreachable", "forward_unreachable"), ("dnd", "forward_busy")])
def test_forwarding_wins_over_the_answering_machine(condition: str, field: str) -> None:
    config = make(u200=f'{VM}\n{field} = "300"')
    decision = forward(config, "200", condition)
    assert isinstance(decision, Forward) and decision.to.number == "300"


def test_dnd_and_unreachable_go_to_it_before_anything_rings() -> None:
    config = make(u200=f"{VM}\ndnd = true")
    first = decide_new_call(user(config, "100"), "d100", "200", config, reachable, {}, [], True, ids)
    assert first == RingNumber("200", (), 20.0, False, True)  # anchored; the worker's leg decides
    assert worker_leg(config, "200") == ToVoicemail("200", "dnd", 120)
    DEVICES["300"] = []
    try:
        config = make(u300=VM)
        assert worker_leg(config, "300") == ToVoicemail("300", "unreachable", 120)
        refused = decide_new_call(user(config, "100"), "d100", "300", config, reachable, {}, [], False, ids)
        assert isinstance(refused, Refuse) and refused.status == 480  # no media workers: no answering machine
    finally:
        DEVICES["300"] = ["d3"]


def test_a_forward_target_without_devices_takes_its_answering_machine() -> None:
    DEVICES["300"] = []
    try:
        config = make(u200='forward_always = "300"', u300=VM)
        assert worker_leg(config, "200") == ToVoicemail("300", "unreachable", 120)
    finally:
        DEVICES["300"] = ["d3"]


def test_the_answering_machine_answers_after_voicemail_after_seconds() -> None:
    assert user(make(u200=f"{VM}\nvoicemail_after = 12"), "200").ring_seconds == 12
    assert user(make(u200="voicemail_after = 12"), "200").ring_seconds == 30  # off: ring_timeout
    assert user(make(u200=f'{VM}\nforward_no_answer = "300"\nno_answer_after = 9'), "200").ring_seconds == 9


def test_mailbox_code_opens_only_the_callers_own_mailbox_from_a_registered_device() -> None:
    config = make()
    assert config.feature_codes["*97"] == "voicemail"
    assert decide_mailbox(user(config, "200"), "d1", "*97", config, True) == OpenMailbox("200", "d1")
    unregistered = decide_mailbox(user(config, "200"), None, "*97", config, True)
    assert isinstance(unregistered, Refuse) and unregistered.status == 403
    no_media = decide_mailbox(user(config, "200"), "d1", "*97", config, False)
    assert isinstance(no_media, Refuse) and no_media.status == 503
    assert decide_mailbox(user(config, "200"), "d1", "300", config, True) is None


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="voicemail_after"):
        make(u200="voicemail_after = 2")
    with pytest.raises(ConfigError, match="voicemail_on_busy"):
        make(u200='voicemail_on_busy = "yes"')
