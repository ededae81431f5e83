"""The trunk registration state machine with a fake clock: a provider played by the test."""

from __future__ import annotations

import itertools

import pytest

from appliance.sip.auth import NonceManager, challenge_values, parse_credentials, verify
from appliance.sip.headers import parse_via
from appliance.sip.message import Request, Response, make_response, parse_message
from appliance.sip.trunk_registration import (
    KEEPALIVE_TIMEOUT,
    PING,
    REGISTER_TIMEOUT,
    AddressLearned,
    Resolve,
    Send,
    Status,
    StatusChanged,
    Target,
    TrunkAccount,
    TrunkRegistration,
    pick_challenge,
    refresh_delay,
    retry_delay,
)

PROVIDER = Target("udp", "192.0.2.10", 5060)
LOCAL = ("192.168.1.2", 5060)
PASSWORD = "s3cret"
REALM = "provider.example"


def account(**kw: object) -> TrunkAccount:
    values: dict[str, object] = dict(name="provider", domain="provider.example", username="4930123456",
                                     auth_username="4930123456", password=PASSWORD, expires=600,
                                     keepalive_interval=25)
    values.update(kw)
    return TrunkAccount(**values)  # type: ignore[arg-type]


def machine(**kw: object) -> TrunkRegistration:
    counter = itertools.count()
    return TrunkRegistration(account(**kw), rand=lambda: 1.0, token=lambda: f"t{next(counter)}")


def sends(actions: list[object]) -> list[Request]:
    out = []
    for a in actions:
        if isinstance(a, Send):
            message = parse_message(a.data)
            assert isinstance(message, Request)
            out.append(message)
    return out


def one_request(actions: list[object], method: str = "REGISTER") -> Request:
    requests = [r for r in sends(actions) if r.method == method]
    assert len(requests) == 1, actions
    return requests[0]


def answer(request: Request, status: int, *, received: tuple[str, int] | None = None,
           headers: list[tuple[str, str]] | None = None) -> Response:
    """The provider's response; `received` is where it saw the request come from."""
    response = make_response(request, status, {200: "OK", 401: "Unauthorized", 403: "Forbidden",
                                               407: "Proxy Authentication Required", 503: "Service Unavailable",
                                               423: "Interval Too Brief"}.get(status, "X"),
                             headers=headers or [])
    if received is not None:
        via = parse_via(response.get("Via") or "")
        via.params["received"] = received[0]
        via.params["rport"] = str(received[1])
        response.set("Via", str(via))
    if status == 200 and request.method == "REGISTER":
        contacts = [c for c in request.get_all("Contact") if not c.endswith("expires=0")]
        for c in contacts:
            response.add("Contact", c)
    return parse_message(response.to_bytes())  # type: ignore[return-value]


def started(m: TrunkRegistration, now: float = 0.0) -> Request:
    actions = m.start(now)
    assert any(isinstance(a, Resolve) for a in actions)
    return one_request(m.resolved([(PROVIDER, LOCAL)], now))


def register(m: TrunkRegistration, now: float = 0.0) -> Request:
    """Start and pass the digest challenge; returns the REGISTER that was accepted."""
    first = started(m, now)
    nonces = NonceManager(b"k" * 32)
    challenge = answer(first, 401, headers=[("WWW-Authenticate", v) for v in challenge_values(
        REALM, nonces.issue("4930123456", now))])
    second = one_request(m.on_response(challenge, now) or [])
    assert m.on_response(answer(second, 200), now) == [StatusChanged(Status.REGISTERED, "")]
    return second


def test_registers_with_sha256_when_offered_both() -> None:
    m = machine()
    first = started(m)
    assert first.uri == "sip:provider.example"
    assert first.get("Authorization") is None
    assert "<sip:4930123456@192.168.1.2:5060>;expires=600" in (first.get("Contact") or "")
    nonces = NonceManager(b"k" * 32)
    nonce = nonces.issue("4930123456", 0.0)
    challenge = answer(first, 401, headers=[("WWW-Authenticate", v) for v in challenge_values(
        REALM, nonce, algorithms=("MD5", "SHA-256"))])  # the weaker one first: we still pick SHA-256
    second = one_request(m.on_response(challenge, 0.0) or [])
    creds = parse_credentials(second.get("Authorization") or "")
    assert creds is not None and creds.algorithm == "SHA-256"
    assert verify(creds, expected_user="4930123456", password=PASSWORD, realm=REALM, method="REGISTER",
                  nonces=nonces, now=0.0).value == "ok"
    assert second.get("Call-ID") == first.get("Call-ID")
    assert second.cseq[0] == first.cseq[0] + 1
    assert m.on_response(answer(second, 200), 0.0) == [StatusChanged(Status.REGISTERED, "")]
    assert m.status is Status.REGISTERED and m.expires_at == 600.0


def test_407_answered_with_proxy_authorization_and_md5_alone() -> None:
    m = machine(auth_username="auth-name")
    first = started(m)
    challenge = answer(first, 407, headers=[("Proxy-Authenticate", 'Digest realm="p", nonce="abc", qop="auth"')])
    second = one_request(m.on_response(challenge, 0.0) or [])
    creds = parse_credentials(second.get("Proxy-Authorization") or "")
    assert creds is not None and creds.algorithm == "MD5" and creds.username == "auth-name"


def test_pick_challenge_skips_what_we_cannot_answer() -> None:
    assert pick_challenge(['Digest realm="r", nonce="n", algorithm=SHA-512-256',
                           'Digest realm="r", nonce="n", algorithm=MD5-sess']) is None
    assert pick_challenge(['Digest realm="r", nonce="n", qop="auth-int"']) is None
    assert pick_challenge(['Digest realm="r", nonce="n"']) == 'Digest realm="r", nonce="n"'


def test_refresh_before_expiry_with_the_granted_time() -> None:
    m = machine(keepalive_interval=0)
    accepted = register(m)
    assert accepted.get("Expires") == "600"
    assert m.next_deadline() == pytest.approx(refresh_delay(600)) == 540.0
    assert m.on_timer(539.0) == []
    refresh = one_request(m.on_timer(540.0))
    assert refresh.get("Call-ID") == accepted.get("Call-ID")
    # The provider grants less than we asked: the next refresh follows its figure.
    refresh_ok = answer(refresh, 200)
    refresh_ok.set("Contact", "<sip:4930123456@192.168.1.2:5060>;expires=120")
    m.on_response(refresh_ok, 540.0)
    assert m.next_deadline() == 540.0 + 60.0
    assert refresh_delay(60) == 30.0 and refresh_delay(3600) == 3240.0


def test_backoff_sequence_on_timeouts() -> None:
    m = machine()
    started(m)
    waits: list[float] = []
    for _ in range(200):
        if len(waits) == 6:
            break
        now = m.next_deadline()
        assert now is not None
        actions = m.on_timer(now)
        if StatusChanged(Status.FAILING, "timeout: no answer from the provider") in actions:
            assert m.next_attempt is not None
            waits.append(m.next_attempt - now)
            assert m.on_timer(m.next_attempt) == [Resolve()]  # looked up again, then sent
            assert len(sends(m.resolved([(PROVIDER, LOCAL)], m.next_attempt or now))) == 1
    assert waits == [5.0, 10.0, 20.0, 40.0, 80.0, 120.0]
    assert retry_delay(3, 0.0) == 10.0  # jitter: 50-100 % of the full wait


def test_register_retransmits_then_times_out() -> None:
    m = machine()
    started(m)
    sent_at = []
    now = 0.0
    while m.status is not Status.FAILING:
        now = m.next_deadline()  # type: ignore[assignment]
        if sends(m.on_timer(now)):
            sent_at.append(now)
    assert sent_at[:4] == [0.5, 1.5, 3.5, 7.5]
    assert now == REGISTER_TIMEOUT


def test_403_is_rejected_and_retried_slowly() -> None:
    m = machine()
    first = started(m)
    assert m.on_response(answer(first, 403), 0.0) == [StatusChanged(Status.REJECTED, "403 Forbidden")]
    assert m.next_attempt == 300.0
    # Over an hour: how many REGISTERs does the provider see?
    count, now = 1, 0.0
    while now < 3600:
        now = m.next_deadline()  # type: ignore[assignment]
        for request in sends(m.on_timer(now)):
            count += 1
            m.on_response(answer(request, 403), now)
    assert count <= 5  # 0, 300, 900, 2100, (4500): never a few a minute
    assert m.status is Status.REJECTED


def test_wrong_password_second_401_is_rejected() -> None:
    m = machine()
    first = started(m)
    nonces = NonceManager(b"k" * 32)

    def challenge(request: Request, stale: bool = False) -> Response:
        return answer(request, 401, headers=[("WWW-Authenticate", v) for v in challenge_values(
            REALM, nonces.issue("4930123456", 0.0), stale=stale)])

    second = one_request(m.on_response(challenge(first), 0.0) or [])
    # A stale nonce is no refusal: answered again.
    third = one_request(m.on_response(challenge(second, stale=True), 0.0) or [])
    actions = m.on_response(challenge(third), 0.0) or []
    assert sends(actions) == []
    assert m.status is Status.REJECTED and "refused the username or password" in m.reason
    assert m.next_attempt == 300.0


def test_503_retry_after_is_honoured() -> None:
    m = machine()
    first = started(m)
    m.on_response(answer(first, 503, headers=[("Retry-After", "90")]), 0.0)
    assert m.status is Status.FAILING and m.next_attempt == 90.0


def test_423_raises_expires() -> None:
    m = machine(expires=60)
    first = started(m)
    again = one_request(m.on_response(answer(first, 423, headers=[("Min-Expires", "300")]), 0.0) or [])
    assert again.get("Expires") == "300"


def test_learns_public_address_and_registers_it() -> None:
    m = machine()
    first = started(m)
    public = ("203.0.113.7", 40123)
    nonces = NonceManager(b"k" * 32)
    challenge = answer(first, 401, received=public, headers=[("WWW-Authenticate", v) for v in challenge_values(
        REALM, nonces.issue("4930123456", 0.0))])
    actions = m.on_response(challenge, 0.0) or []
    assert AddressLearned(*public) in actions
    second = one_request(actions)
    assert "<sip:4930123456@203.0.113.7:40123>" in (second.get("Contact") or "")
    assert parse_via(second.get("Via") or "").host == "192.168.1.2"  # Via: where we listen
    m.on_response(answer(second, 200, received=public), 0.0)
    assert m.status is Status.REGISTERED
    # The router's mapping changes: a keep-alive learns it, the old Contact is removed.
    options = one_request(m.on_timer(25.0), "OPTIONS")
    moved = ("203.0.113.7", 40999)
    actions = m.on_response(answer(options, 200, received=moved), 25.0) or []
    assert AddressLearned(*moved) in actions
    rereg = one_request(actions)
    contact = ", ".join(rereg.get_all("Contact"))
    assert "<sip:4930123456@203.0.113.7:40999>;expires=600" in contact
    assert "<sip:4930123456@203.0.113.7:40123>;expires=0" in contact


def test_no_nat_means_no_extra_register() -> None:
    m = machine()
    register(m)
    options = one_request(m.on_timer(25.0), "OPTIONS")
    assert sends(m.on_response(answer(options, 200, received=LOCAL), 25.0) or []) == []


def test_keepalive_cadence_and_lost_provider() -> None:
    m = machine(keepalive_interval=25)
    register(m)
    times = []
    now = 0.0
    for _ in range(4):
        now = m.next_deadline()  # type: ignore[assignment]
        for request in sends(m.on_timer(now)):
            assert request.method == "OPTIONS"
            times.append(now)
            m.on_response(answer(request, 200), now)
    assert times == [25.0, 50.0, 75.0, 100.0]
    # The provider goes away: the next keep-alive goes unanswered.
    sent = sends(m.on_timer(125.0))
    assert [r.method for r in sent] == ["OPTIONS"]
    now = 125.0
    while m.status is Status.REGISTERED:
        now = m.next_deadline()  # type: ignore[assignment]
        actions = m.on_timer(now)
    assert now == 125.0 + KEEPALIVE_TIMEOUT
    assert m.status is Status.FAILING and "keep-alive" in m.reason
    rereg = one_request(actions)  # registering again at once
    # The provider is back: its answer to a retransmission registers us again.
    assert m.on_response(answer(rereg, 200), now + 2) == [StatusChanged(Status.REGISTERED, "")]


def test_over_tcp_contact_says_so_pings_keep_it_and_a_lost_connection_backs_off() -> None:
    m = machine(keepalive_interval=25)
    m.start(0.0)
    tcp = Target("tcp", PROVIDER.host, PROVIDER.port)
    first = one_request(m.resolved([(tcp, LOCAL)], 0.0))
    assert (first.get("Via") or "").startswith("SIP/2.0/TCP 192.168.1.2:5060;")
    assert (first.get("Contact") or "").startswith("<sip:4930123456@192.168.1.2:5060;transport=tcp>")
    assert m.on_response(answer(first, 200), 0.0) == [StatusChanged(Status.REGISTERED, "")]
    # The keep-alive is a CRLF ping on the connection: nothing awaited, nothing to time out.
    assert m.on_timer(25.0) == [Send(PING, tcp)]
    assert m.next_deadline() == 50.0
    # The edge says the connection closed: failing, retried on the backoff (rand=1: the full delay).
    assert m.connection_lost("connection to the provider lost", 30.0) == [
        StatusChanged(Status.FAILING, "connection to the provider lost")]
    assert m.next_deadline() == 30.0 + retry_delay(1, 1.0)
    # As after a timeout on the last address: looked up again, then a new REGISTER (a new connection).
    assert m.on_timer(30.0 + retry_delay(1, 1.0)) == [Resolve()]
    again = one_request(m.resolved([(tcp, LOCAL)], 36.0))
    assert m.on_response(answer(again, 200), 40.0) == [StatusChanged(Status.REGISTERED, "")]
    # Over UDP there is no connection to lose.
    udp = machine()
    register(udp)
    assert udp.connection_lost("x", 1.0) == [] and udp.status is Status.REGISTERED


def test_dns_failure_is_retried_with_backoff() -> None:
    m = machine()
    m.start(0.0)
    assert m.resolve_failed("NXDOMAIN", 0.0) == [StatusChanged(Status.FAILING, "DNS: NXDOMAIN")]
    assert m.next_attempt == 5.0
    assert m.on_timer(5.0) == [Resolve()]


def test_stop_unregisters() -> None:
    m = machine()
    register(m)
    request = one_request(m.stop(10.0))
    assert request.get("Expires") == "0"
    assert m.status is Status.NOT_REGISTERING and m.next_deadline() is None


def test_responses_of_others_are_not_ours() -> None:
    m = machine()
    started(m)
    stranger = Response(200, "OK", [("Via", "SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKother"), ("CSeq", "1 REGISTER"),
                                    ("Call-ID", "x"), ("From", "<sip:a@b>;tag=1"), ("To", "<sip:a@b>")])
    assert m.on_response(stranger, 0.0) is None
