"""Which devices are offered SHA-256: all but those known or seen to give up on it."""

from __future__ import annotations

from appliance.sip.digest_fallback import ABANDON_AFTER, MAX_LEARNED, DigestFallback, device_key

BOTH = ("SHA-256", "MD5")


def test_known_software_gets_md5_alone_at_once() -> None:
    fallback = DigestFallback()
    for agent in ("baresip v1.0.0 (x86_64/linux)", "baresip 3.10.1", "PJSUA v2.9 Linux-5.10/x86_64",
                  "pjsip 2.8", "sipsak 0.9.8.1", "SIPp"):
        assert fallback.offer(device_key(agent, "192.0.2.1"), agent, BOTH) == ("MD5",), agent
    for agent in ("baresip v3.11.0 (x86_64/linux)", "baresip 4.0", "PJSUA v2.10 Linux", "PJSUA v2.15.1",
                  "Linphone Desktop/5.2.6 (Debian) LinphoneCore/5.2.0", "Yealink SIP-T46S 66.86.0.15", None):
        assert fallback.offer(device_key(agent, "192.0.2.1"), agent, BOTH) == BOTH, agent


def test_a_device_that_lets_sha256_go_unanswered_is_learned_once() -> None:
    fallback = DigestFallback()
    agent = "Acme Phone 1.0"
    key = device_key(agent, "192.0.2.7")
    assert key == "ua:Acme Phone 1.0"
    fallback.challenged(key, BOTH, "200", "192.0.2.7", agent, now=100.0)
    fallback.challenged(key, BOTH, "200", "192.0.2.7", agent, now=101.0)  # the first one counts
    assert fallback.expire(100.0 + ABANDON_AFTER - 0.1) == []
    [gone] = fallback.expire(100.0 + ABANDON_AFTER)
    assert (gone.key, gone.number, gone.source, gone.user_agent) == (key, "200", "192.0.2.7", agent)
    assert fallback.expire(200.0) == []  # reported once
    assert fallback.offer(key, agent, BOTH) == ("MD5",)
    assert fallback.learned == [key]
    assert DigestFallback(fallback.learned).offer(key, agent, BOTH) == ("MD5",)  # kept across restarts


def test_a_device_that_answers_is_forgotten() -> None:
    fallback = DigestFallback()
    key = device_key(None, "192.0.2.8")
    assert key == "addr:192.0.2.8"
    fallback.challenged(key, BOTH, "200", "192.0.2.8", None, now=0.0)
    fallback.answered(key)
    assert fallback.expire(100.0) == []
    assert fallback.offer(key, None, BOTH) == BOTH


def test_only_a_sha256_offer_can_be_abandoned_and_config_limits_hold() -> None:
    fallback = DigestFallback(["ua:Old"])
    fallback.challenged("ua:X", ("MD5",), "200", "192.0.2.9", "X", now=0.0)
    assert fallback.expire(100.0) == []  # an MD5 challenge left unanswered is not about SHA-256
    assert fallback.offer("ua:Old", "Old", ("SHA-256",)) == ("SHA-256",)  # MD5 refused by config: never offered
    assert fallback.offer("ua:Old", "Old", ("MD5",)) == ("MD5",)


def test_memory_is_bounded() -> None:
    fallback = DigestFallback()
    for i in range(MAX_LEARNED + 50):
        fallback.challenged(f"addr:10.0.{i // 256}.{i % 256}", BOTH, "200", "x", None, now=0.0)
    fallback.expire(10.0)
    assert len(fallback.learned) == MAX_LEARNED
