"""Tests for appliance.sip.auth: RFC vectors, round trips, nonce lifecycle, parser robustness."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.sip.auth import (
    ALGORITHMS,
    Credentials,
    NonceCheck,
    NonceManager,
    Verdict,
    authorization_value,
    challenge_values,
    compute_response,
    find_credentials,
    parse_credentials,
    parse_digest,
    verify,
)

REALM = "home.arpa"
URI = "sip:home.arpa"
SECRET = b"k" * 32
T0 = 1000.0


def make_nonces(**kw: float) -> NonceManager:
    return NonceManager(SECRET, **kw)  # type: ignore[arg-type]


def answer(
    nonce: str,
    *,
    algorithm: str = "SHA-256",
    user: str = "200",
    password: str = "s3cret",
    nc: int = 1,
    cnonce: str = "abc123",
    realm: str = REALM,
) -> Credentials:
    challenge = next(v for v in challenge_values(realm, nonce) if f"algorithm={algorithm}," in v)
    value = authorization_value(
        challenge, username=user, password=password, method="REGISTER", uri=URI, cnonce=cnonce, nc=nc
    )
    creds = parse_credentials(value)
    assert creds is not None
    return creds


def check(
    creds: Credentials, nonces: NonceManager, now: float, *, password: str | None = "s3cret"
) -> Verdict:
    return verify(
        creds, expected_user="200", password=password, realm=REALM, method="REGISTER", nonces=nonces, now=now
    )


# --- RFC 7616 §3.9.1 -------------------------------------------------------------------------------

RFC_ARGS = {
    "username": "Mufasa",
    "realm": "http-auth@example.org",
    "password": "Circle of Life",
    "method": "GET",
    "uri": "/dir/index.html",
    "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    "qop": "auth",
    "nc": "00000001",
    "cnonce": "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
}


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
        ("sha-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_vectors(algorithm: str, expected: str) -> None:
    assert compute_response(algorithm, **RFC_ARGS) == expected


def test_rfc7616_vector_via_authorization_value() -> None:
    challenge = (
        'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=SHA-256, '
        'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
        'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
    )
    value = authorization_value(
        challenge,
        username="Mufasa",
        password="Circle of Life",
        method="GET",
        uri="/dir/index.html",
        cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    )
    creds = parse_credentials(value)
    assert creds is not None
    assert creds.response == "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    assert creds.qop == "auth" and creds.nc == "00000001"
    assert creds.opaque == "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"


def test_rfc2069_form_without_qop() -> None:
    # RFC 2617 §3.5 example: response without qop uses H(HA1:nonce:HA2).
    got = compute_response("MD5", "Mufasa", "r", "pw", "GET", "/", "n")
    assert len(got) == 32
    assert got != compute_response("MD5", "Mufasa", "r", "pw", "GET", "/", "n", "auth", "00000001", "c")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"algorithm": "MD5-sess"},
        {"algorithm": "SHA-256-sess"},
        {"algorithm": "SHA-512-256"},
        {"qop": "auth-int"},
        {"qop": "auth", "nc": None},
        {"qop": "auth", "cnonce": None},
    ],
)
def test_compute_response_rejects_unsupported(kwargs: dict[str, str | None]) -> None:
    args: dict[str, str | None] = {"algorithm": "MD5", **RFC_ARGS, **kwargs}
    with pytest.raises(ValueError):
        compute_response(**args)  # type: ignore[arg-type]


# --- challenges --------------------------------------------------------------------------------


def test_challenge_values_order_and_shape() -> None:
    values = challenge_values(REALM, "NONCE")
    assert ALGORITHMS == ("SHA-256", "MD5")
    assert values == [
        'Digest realm="home.arpa", nonce="NONCE", algorithm=SHA-256, qop="auth"',
        'Digest realm="home.arpa", nonce="NONCE", algorithm=MD5, qop="auth"',
    ]
    stale = challenge_values(REALM, "N", stale=True, opaque='o"p')
    for v in stale:
        p = parse_digest(v)
        assert p is not None
        assert p["stale"] == "true" and p["opaque"] == 'o"p' and p["qop"] == "auth"


def test_challenge_values_follow_the_configured_algorithms() -> None:
    assert challenge_values(REALM, "N", algorithms=("MD5",)) == [
        'Digest realm="home.arpa", nonce="N", algorithm=MD5, qop="auth"'
    ]
    values = challenge_values(REALM, "N", algorithms=("MD5", "SHA-256"))
    assert [parse_digest(v)["algorithm"] for v in values] == ["MD5", "SHA-256"]  # type: ignore[index]


@pytest.mark.parametrize(("allowed", "used", "verdict"), [
    (("MD5",), "MD5", Verdict.OK),
    (("MD5",), "SHA-256", Verdict.MISSING),  # not offered, so not accepted: challenged again
    (("SHA-256",), "MD5", Verdict.MISSING),  # an MD5-free box refuses MD5 answers
    (("SHA-256",), "SHA-256", Verdict.OK),
])
def test_verify_accepts_only_offered_algorithms(allowed: tuple[str, ...], used: str, verdict: Verdict) -> None:
    nonces = make_nonces()
    creds = answer(nonces.issue("200", T0), algorithm=used)
    got = verify(creds, expected_user="200", password="s3cret", realm=REALM, method="REGISTER", nonces=nonces,
                 now=T0 + 1, algorithms=allowed)
    assert got is verdict


# --- round trips and verdicts -------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_round_trip_ok(algorithm: str) -> None:
    nonces = make_nonces()
    nonce = nonces.issue("200", T0)
    creds = answer(nonce, algorithm=algorithm)
    assert creds.algorithm == algorithm
    assert check(creds, nonces, T0 + 1) is Verdict.OK


def test_missing_algorithm_means_md5() -> None:
    nonces = make_nonces()
    nonce = nonces.issue("200", T0)
    resp = compute_response("MD5", "200", REALM, "s3cret", "REGISTER", URI, nonce, "auth", "00000001", "c")
    creds = parse_credentials(
        f'Digest username="200", realm="{REALM}", nonce="{nonce}", uri="{URI}", '
        f'response="{resp}", qop=auth, nc=00000001, cnonce="c"'
    )
    assert creds is not None and creds.algorithm == "MD5"
    assert check(creds, nonces, T0) is Verdict.OK


def test_wrong_password_failed() -> None:
    nonces = make_nonces()
    creds = answer(nonces.issue("200", T0), password="guess")
    assert check(creds, nonces, T0) is Verdict.FAILED


def test_unknown_user_failed() -> None:
    nonces = make_nonces()
    creds = answer(nonces.issue("200", T0))
    assert check(creds, nonces, T0, password=None) is Verdict.FAILED


def test_other_users_nonce_failed() -> None:
    nonces = make_nonces()
    nonce_for_201 = nonces.issue("201", T0)
    assert nonces.check(nonce_for_201, "200", "00000001", T0) is NonceCheck.INVALID
    creds = answer(nonce_for_201)  # user 200, right password, but 201's nonce
    assert check(creds, nonces, T0) is Verdict.FAILED


def test_username_must_match_expected_user() -> None:
    nonces = make_nonces()
    creds = answer(nonces.issue("201", T0), user="201")
    assert check(creds, nonces, T0) is Verdict.FAILED


def test_nonce_from_other_secret_invalid() -> None:
    other = NonceManager(b"x" * 32)
    nonces = make_nonces()
    assert nonces.check(other.issue("200", T0), "200", "00000001", T0) is NonceCheck.INVALID
    assert check(answer(other.issue("200", T0)), nonces, T0) is Verdict.FAILED


def test_expired_nonce_right_password_stale() -> None:
    nonces = make_nonces(lifetime=300.0)
    creds = answer(nonces.issue("200", T0))
    assert check(creds, nonces, T0 + 300.0) is Verdict.OK
    creds2 = answer(creds.nonce, nc=2)
    assert check(creds2, nonces, T0 + 300.5) is Verdict.STALE


def test_expired_nonce_wrong_password_failed() -> None:
    nonces = make_nonces(lifetime=300.0)
    creds = answer(nonces.issue("200", T0), password="guess")
    assert check(creds, nonces, T0 + 301) is Verdict.FAILED


def test_nonce_from_the_future_is_stale() -> None:
    nonces = make_nonces()
    creds = answer(nonces.issue("200", T0 + 100))
    assert check(creds, nonces, T0) is Verdict.STALE


def test_replayed_nc_failed_increasing_nc_ok() -> None:
    nonces = make_nonces()
    nonce = nonces.issue("200", T0)
    c1 = answer(nonce, nc=1)
    assert check(c1, nonces, T0) is Verdict.OK
    assert check(c1, nonces, T0 + 1) is Verdict.FAILED  # exact replay
    c2 = answer(nonce, nc=2)
    assert check(c2, nonces, T0 + 2) is Verdict.OK
    c5 = answer(nonce, nc=5)
    assert check(c5, nonces, T0 + 3) is Verdict.OK
    assert check(answer(nonce, nc=3), nonces, T0 + 4) is Verdict.FAILED
    assert nonces.check(nonce, "200", "00000005", T0 + 4) is NonceCheck.REPLAY
    assert nonces.check(nonce, "200", "00000006", T0 + 4) is NonceCheck.VALID


def test_failed_attempt_does_not_burn_nc() -> None:
    nonces = make_nonces()
    nonce = nonces.issue("200", T0)
    assert check(answer(nonce, nc=1, password="guess"), nonces, T0) is Verdict.FAILED
    assert check(answer(nonce, nc=1), nonces, T0) is Verdict.OK


def test_realm_mismatch_is_missing() -> None:
    nonces = make_nonces()
    creds = answer(nonces.issue("200", T0), realm="elsewhere")
    assert check(creds, nonces, T0) is Verdict.MISSING


def test_find_credentials_picks_our_realm() -> None:
    ours = 'Digest username="200", realm="home.arpa", nonce="n", uri="u", response="r"'
    theirs = 'Digest username="x", realm="proxy", nonce="n", uri="u", response="r"'
    got = find_credentials([theirs, "Basic Zm9v", ours], REALM)
    assert got is not None and got.username == "200"
    assert find_credentials([theirs], REALM) is None


@pytest.mark.parametrize(
    "change",
    [
        {"qop": None},
        {"qop": "auth-int"},
        {"nc": None},
        {"cnonce": None},
        {"algorithm": "MD5-SESS"},
        {"algorithm": "SHA-512"},
        {"response": "zz"},
        {"response": "é" * 64},
        {"nc": "0000000g"},
        {"nc": "00000000"},
        {"nonce": "garbage"},
        {"uri": "sip:other"},
    ],
)
def test_malformed_credentials_failed(change: dict[str, str | None]) -> None:
    nonces = make_nonces()
    creds = answer(nonces.issue("200", T0))
    assert check(creds._replace(**change), nonces, T0) is Verdict.FAILED


def test_uppercase_response_accepted() -> None:
    nonces = make_nonces()
    creds = answer(nonces.issue("200", T0))
    assert check(creds._replace(response=creds.response.upper()), nonces, T0) is Verdict.OK


# --- NonceManager ------------------------------------------------------------------------------


def test_nonce_is_printable_base64url() -> None:
    nonces = make_nonces()
    n = nonces.issue("200", T0)
    assert n.isascii() and "=" not in n and '"' not in n
    assert set(n) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert nonces.issue("200", T0) != n


def test_nonce_tampering_invalid() -> None:
    nonces = make_nonces()
    n = nonces.issue("200", T0)
    for i in range(len(n)):
        flipped = n[:i] + ("A" if n[i] != "A" else "B") + n[i + 1 :]
        assert nonces.check(flipped, "200", "00000001", T0) is NonceCheck.INVALID
    for bad in ["", n + "A", n[:-1], n.replace(n[0], "+", 1), "é" * 43]:
        assert nonces.check(bad, "200", "00000001", T0) is NonceCheck.INVALID


def test_nonce_without_nc_single_use() -> None:
    nonces = make_nonces()
    n = nonces.issue("200", T0)
    assert nonces.check(n, "200", None, T0) is NonceCheck.VALID
    nonces.accept(n, None, T0)
    assert nonces.check(n, "200", None, T0) is NonceCheck.REPLAY
    assert nonces.check(n, "200", "00000001", T0) is NonceCheck.VALID


def test_tracking_expires_and_is_bounded() -> None:
    nonces = make_nonces(lifetime=10.0, max_tracked=5)
    issued = [nonces.issue("200", T0 + i * 0.1) for i in range(20)]
    for n in issued:
        nonces.accept(n, "00000001", T0 + 2)
        assert len(nonces) <= 5
    # An evicted, still-live nonce must not become replayable: it reads STALE.
    assert nonces.check(issued[0], "200", "00000001", T0 + 2) is NonceCheck.STALE
    assert nonces.check(issued[-1], "200", "00000001", T0 + 2) is NonceCheck.REPLAY
    # Fresh nonces issued after the eviction are unaffected.
    assert nonces.check(nonces.issue("200", T0 + 3), "200", "00000001", T0 + 3) is NonceCheck.VALID
    nonces.sweep(T0 + 100)
    assert len(nonces) == 0


def test_tracking_drops_expired_entries_on_the_way() -> None:
    nonces = make_nonces(lifetime=10.0)
    for i in range(1000):
        now = T0 + i
        nonces.accept(nonces.issue("200", now), "00000001", now)
    assert len(nonces) <= 15


def test_tracking_table_is_compact() -> None:
    """Every nonce used in the last `lifetime` seconds is tracked: 100,000 under 500
    registrations a second. About 100 bytes each (it was 260, issue 10)."""
    import tracemalloc

    nonces = make_nonces(lifetime=1e9)
    issued = [nonces.issue("200", T0 + i * 0.001) for i in range(20000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in issued:
            nonces.accept(n[:1] + n[1:], "00000001", T0 + 20)  # a copy, as parsed from a request
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / len(issued)
    finally:
        tracemalloc.stop()
    assert len(nonces) == len(issued)
    assert per_entry < 150, per_entry
    assert nonces.check(issued[0], "200", "00000001", T0 + 20) is NonceCheck.REPLAY
    assert nonces.check(issued[-1], "200", "00000002", T0 + 20) is NonceCheck.VALID


def test_nonce_manager_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        NonceManager(b"")
    with pytest.raises(ValueError):
        NonceManager(SECRET, lifetime=0)


# --- parse_digest ------------------------------------------------------------------------------


def test_parse_digest_basic() -> None:
    v = (
        'Digest username="200", realm="home.arpa", nonce="abc", uri="sip:home.arpa", '
        'response="0123", algorithm=MD5, qop=auth, nc=00000001, cnonce="xyz"'
    )
    assert parse_digest(v) == {
        "username": "200",
        "realm": "home.arpa",
        "nonce": "abc",
        "uri": "sip:home.arpa",
        "response": "0123",
        "algorithm": "MD5",
        "qop": "auth",
        "nc": "00000001",
        "cnonce": "xyz",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('digest realm="a"', {"realm": "a"}),
        ('DIGEST Realm="a",NONCE="b"', {"realm": "a", "nonce": "b"}),
        ('  Digest   realm = "a" ,  ,nonce= b ,', {"realm": "a", "nonce": "b"}),
        ('Digest realm="a\\"b\\\\c"', {"realm": 'a"b\\c'}),
        ('Digest realm="with, comma and = sign"', {"realm": "with, comma and = sign"}),
        ('Digest realm=""', {"realm": ""}),
        ("Digest\trealm=a,\r\n nonce=b", {"realm": "a", "nonce": "b"}),
        ('Digest qop="auth,auth-int"', {"qop": "auth,auth-int"}),
        ("Digest", {}),
    ],
)
def test_parse_digest_edge_cases(value: str, expected: dict[str, str]) -> None:
    assert parse_digest(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        'Basic realm="a"',
        'Digestrealm="a"',
        'Digest realm="unterminated',
        "Digest realm",
        'Digest realm="a" nonce="b"',
        'Digest realm="a", realm="b"',
        'Digest ="a"',
        'Digest realm="a"x',
        'Digest realm="a' + "\\" * 5001 + '"',
        "Digest realm=" + "a" * 9000,
    ],
)
def test_parse_digest_rejects(value: str) -> None:
    assert parse_digest(value) is None


def test_parse_credentials_requires_fields() -> None:
    assert parse_credentials('Digest username="200", realm="r", nonce="n", uri="u"') is None
    c = parse_credentials(
        'Digest username="200", realm="r", nonce="n", uri="u", response="x", algorithm=sha-256'
    )
    assert c is not None and c.algorithm == "SHA-256" and c.qop is None and c.opaque is None


def test_authorization_value_without_qop_offer() -> None:
    value = authorization_value(
        'Digest realm="r", nonce="n"', username="u", password="p", method="REGISTER", uri="sip:r", cnonce="c"
    )
    p = parse_digest(value)
    assert p is not None and "qop" not in p and "nc" not in p
    assert p["response"] == compute_response("MD5", "u", "r", "p", "REGISTER", "sip:r", "n")


def test_authorization_value_rejects_unusable_challenge() -> None:
    for bad in ['Digest nonce="n"', 'Digest realm="r", nonce="n", qop="auth-int"', "Basic realm=x"]:
        with pytest.raises(ValueError):
            authorization_value(bad, username="u", password="p", method="M", uri="x", cnonce="c")


@given(st.text(max_size=300))
def test_parse_digest_never_raises(text: str) -> None:
    parse_digest(text)
    parse_digest("Digest " + text)
    parse_credentials("Digest " + text)


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
        st.text(st.characters(exclude_categories=["Cs"]), max_size=30),
        max_size=8,
    )
)
def test_parse_digest_round_trips_quoted_values(params: dict[str, str]) -> None:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    value = "Digest " + ", ".join(f"{k}={q(v)}" for k, v in params.items())
    assert parse_digest(value) == params


_field = st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["auth", "MD5", "SHA-256", "00000001"]))


@given(
    st.text(max_size=40),
    st.text(max_size=40),
    st.text(max_size=60),
    st.text(max_size=40),
    st.text(max_size=70),
    st.sampled_from(["MD5", "SHA-256", "md5", "SHA-512", ""]),
    _field,
    _field,
    _field,
)
def test_verify_never_raises(
    username: str,
    realm: str,
    nonce: str,
    uri: str,
    response: str,
    algorithm: str,
    qop: str | None,
    nc: str | None,
    cnonce: str | None,
) -> None:
    nonces = make_nonces()
    creds = Credentials(username, realm, nonce, uri, response, algorithm, qop, nc, cnonce, None)
    for user, realm_ in [(username, realm), ("200", REALM)]:
        verdict = verify(
            creds, expected_user=user, password="pw", realm=realm_, method="REGISTER", nonces=nonces, now=T0
        )
        assert verdict in (Verdict.FAILED, Verdict.MISSING)
