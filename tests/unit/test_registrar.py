"""Tests for appliance.sip.registrar: RFC 3261 §10.3 and the device rules, with a fake clock."""

from __future__ import annotations

import json

import pytest

from appliance.sip.headers import parse_name_addr
from appliance.sip.message import Request, Response, parse_message
from appliance.sip.registrar import (
    QUALIFY_MISSES_TO_REMOVE,
    Binding,
    DevicePolicy,
    EventKind,
    Flow,
    Registrar,
    RegistrarEvent,
)

MIN, MAX, DEFAULT = 60, 3600, 600
T0 = 1_700_000_000.0
FAMILY = DevicePolicy(limit=3, one_number=True)
SINGLE = DevicePolicy(limit=1, one_number=False)
FLOW = Flow("udp", "192.168.1.21", 5060, "192.168.1.2:5060")


def instance(n: int) -> str:
    return f'+sip.instance="<urn:uuid:00000000-0000-0000-0000-{n:012d}>"'


def request(
    *contacts: str,
    call_id: str = "cid-1",
    cseq: int = 1,
    expires: int | str | None = None,
    number: str = "200",
    user_agent: str | None = "Phone/1.0",
) -> Request:
    lines = [
        "REGISTER sip:home.arpa SIP/2.0",
        f"Via: SIP/2.0/UDP 192.168.1.21:5060;branch=z9hG4bK{call_id}{cseq};rport",
        "Max-Forwards: 70",
        f"From: <sip:{number}@home.arpa>;tag=from{call_id}",
        f"To: <sip:{number}@home.arpa>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
    ]
    lines += [f"Contact: {c}" for c in contacts]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if user_agent is not None:
        lines.append(f"User-Agent: {user_agent}")
    lines += ["Content-Length: 0", "", ""]
    msg = parse_message("\r\n".join(lines).encode())
    assert isinstance(msg, Request)
    return msg


def contact(n: int, host: str = "192.168.1", **params: object) -> str:
    text = f"<sip:200@{host}.{20 + n}:5060>"
    return text + "".join(f";{k}={v}" for k, v in params.items())


class Fixture:
    """A registrar, a clock and shorthands."""

    def __init__(self) -> None:
        self.reg = Registrar(MIN, MAX, DEFAULT)
        self.now = T0

    def send(
        self, req: Request, policy: DevicePolicy = FAMILY, number: str = "200", flow: Flow = FLOW
    ) -> tuple[Response, list[RegistrarEvent]]:
        return self.reg.register(req, number, policy, flow, self.now)

    def ok(self, req: Request, policy: DevicePolicy = FAMILY, number: str = "200",
           flow: Flow = FLOW) -> list[RegistrarEvent]:
        response, events = self.send(req, policy, number, flow)
        assert (response.status, response.reason) == (200, "OK"), response.reason
        return events

    def device(self, n: int, policy: DevicePolicy = FAMILY, expires: int | None = None) -> Binding:
        """Register device n (own Call-ID and contact) and return its binding."""
        events = self.ok(request(contact(n), call_id=f"cid-{n}", expires=expires), policy)
        assert [e.kind for e in events][-1] == EventKind.REGISTERED
        return events[-1].binding

    def contacts(self, number: str = "200") -> list[str]:
        return sorted(b.contact for b in self.reg.bindings(number))


@pytest.fixture
def fx() -> Fixture:
    return Fixture()


def kinds(events: list[RegistrarEvent]) -> list[tuple[EventKind, str]]:
    return [(e.kind, e.reason) for e in events]


# -- basic REGISTER -----------------------------------------------------------------------


def test_first_registration(fx: Fixture) -> None:
    response, events = fx.send(request(contact(1), expires=300))
    assert response.status == 200
    assert kinds(events) == [(EventKind.REGISTERED, "")]
    b = events[0].binding
    assert (b.number, b.contact, b.call_id, b.cseq) == ("200", contact(1), "cid-1", 1)
    assert b.expires_at == T0 + 300
    assert b.registered_at == T0
    assert b.flow == FLOW
    assert b.user_agent == "Phone/1.0"
    assert b.instance is None
    assert b.reachable and b.missed == 0
    assert fx.reg.get(b.id) is b
    assert len(fx.reg) == 1
    assert fx.reg.numbers() == ["200"]
    # the 200 lists the bindings with their remaining time, and the request's dialog headers
    assert response.get_all("Contact") == [f"{contact(1)};expires=300"]
    assert response.call_id == "cid-1"
    assert response.get("CSeq") == "1 REGISTER"


def test_response_lists_every_binding_with_remaining_time(fx: Fixture) -> None:
    fx.device(1, expires=300)
    fx.now += 100
    response, _ = fx.send(request(contact(2), call_id="cid-2", expires=600))
    assert sorted(response.get_all("Contact")) == sorted(
        [f"{contact(1)};expires=200", f"{contact(2)};expires=600"]
    )


def test_query_without_contact_changes_nothing(fx: Fixture) -> None:
    b = fx.device(1, expires=300)
    fx.now += 50
    response, events = fx.send(request(call_id="other", cseq=9))
    assert response.status == 200
    assert events == []
    assert response.get_all("Contact") == [f"{contact(1)};expires=250"]
    assert fx.reg.bindings("200") == [b]


def test_default_expires_when_none_given(fx: Fixture) -> None:
    b = fx.device(1)
    assert b.expires_at == T0 + DEFAULT


def test_expires_clamped_to_max(fx: Fixture) -> None:
    response, events = fx.send(request(contact(1), expires=99999))
    assert events[0].binding.expires_at == T0 + MAX
    assert response.get("Contact") == f"{contact(1)};expires={MAX}"


def test_expires_below_min_gets_423_with_min_expires(fx: Fixture) -> None:
    response, events = fx.send(request(contact(1), expires=MIN - 1))
    assert (response.status, response.reason) == (423, "Interval Too Brief")
    assert response.get("Min-Expires") == str(MIN)
    assert events == []
    assert len(fx.reg) == 0
    # exactly the minimum is fine
    assert fx.send(request(contact(1), expires=MIN))[0].status == 200


def test_423_for_a_contact_parameter_too(fx: Fixture) -> None:
    response, _ = fx.send(request(contact(1), contact(2, expires=5), expires=300))
    assert response.status == 423
    assert response.get("Min-Expires") == "60"
    assert len(fx.reg) == 0  # nothing of the request was applied


def test_contact_expires_parameter_beats_header(fx: Fixture) -> None:
    events = fx.ok(request(contact(1, expires=120), contact(2), expires=3000))
    by_contact = {e.binding.contact: e.binding.expires_at for e in events}
    # the parameter is not kept in the stored contact
    assert by_contact == {contact(1): T0 + 120, contact(2): T0 + 3000}


def test_contact_expires_zero_beats_header(fx: Fixture) -> None:
    fx.ok(request(contact(1), contact(2), expires=300))
    events = fx.ok(request(contact(1, expires=0), contact(2), cseq=2, expires=300))
    assert kinds(events) == [(EventKind.REMOVED, "unregistered"), (EventKind.REFRESHED, "")]
    assert fx.contacts() == [contact(2)]


def test_several_contacts_in_one_request(fx: Fixture) -> None:
    events = fx.ok(request(contact(1), f"{contact(2)};q=0.5", expires=300))
    assert kinds(events) == [(EventKind.REGISTERED, ""), (EventKind.REGISTERED, "")]
    assert fx.contacts() == [contact(1), f"{contact(2)};q=0.5"]
    assert {b.q for b in fx.reg.bindings("200")} == {None, "0.5"}
    # one Call-ID, one device: two more devices still fit under a limit of 3
    fx.device(5)
    fx.device(6)
    assert len(fx.reg) == 4
    # and a refresh of both contacts refreshes both bindings
    events = fx.ok(request(contact(1), f"{contact(2)};q=0.5", cseq=2, expires=300))
    assert kinds(events) == [(EventKind.REFRESHED, ""), (EventKind.REFRESHED, "")]
    assert len(fx.reg) == 4


def test_several_instances_in_one_request_over_the_limit_refused(fx: Fixture) -> None:
    contacts = [f"{contact(n)};{instance(n)}" for n in range(1, 5)]
    response, events = fx.send(request(*contacts))
    assert response.status == 403
    assert "Device limit reached" in response.reason
    assert events == []
    assert len(fx.reg) == 0


def test_malformed_contact_and_expires(fx: Fixture) -> None:
    response, _ = fx.send(request("<sip:200@192.168.1.21"))
    assert (response.status, response.reason) == (400, "Malformed Contact")
    response, _ = fx.send(request("<tel:+123>"))
    assert response.status == 400
    for bad in ("soon", "-5", "²"):
        response, _ = fx.send(request(contact(1), expires=bad))
        assert (response.status, response.reason) == (400, "Bad Expires value")
    response, _ = fx.send(request(contact(1, expires="x")))
    assert (response.status, response.reason) == (400, "Bad Expires value")
    assert len(fx.reg) == 0


def test_numbers_are_independent(fx: Fixture) -> None:
    fx.ok(request(contact(1), number="100"), SINGLE, number="100")
    fx.ok(request(contact(2), call_id="x", number="200"), SINGLE, number="200")
    assert [b.contact for b in fx.reg.bindings("100")] == [contact(1)]
    assert [b.contact for b in fx.reg.bindings("200")] == [contact(2)]
    assert sorted(fx.reg.numbers()) == ["100", "200"]
    assert fx.reg.bindings("300") == []


# -- refresh and device recognition -------------------------------------------------------


def test_refresh_same_call_id_higher_cseq(fx: Fixture) -> None:
    b = fx.device(1, expires=300)
    fx.now += 200
    new_flow = Flow("udp", "192.168.1.21", 5099)
    events = fx.ok(request(contact(1), call_id="cid-1", cseq=2, expires=300), flow=new_flow)
    assert kinds(events) == [(EventKind.REFRESHED, "")]
    assert events[0].binding is b
    assert fx.reg.bindings("200") == [b]
    assert b.expires_at == fx.now + 300
    assert b.registered_at == T0
    assert b.cseq == 2
    assert b.flow == new_flow


def test_refreshes_are_never_new_devices_at_the_limit(fx: Fixture) -> None:
    devices = [fx.device(n) for n in (1, 2, 3)]
    for step in range(2, 5):
        fx.now += 100
        for n in (1, 2, 3):
            events = fx.ok(request(contact(n), call_id=f"cid-{n}", cseq=step))
            assert kinds(events) == [(EventKind.REFRESHED, "")]
    assert fx.reg.bindings("200") == devices


@pytest.mark.parametrize("cseq", [5, 1, 0])
def test_out_of_order_cseq_refused(fx: Fixture, cseq: int) -> None:
    b = fx.device(1, expires=300)
    fx.ok(request(contact(1), call_id="cid-1", cseq=5, expires=300))
    fx.now += 10
    response, events = fx.send(request(contact(1), call_id="cid-1", cseq=cseq, expires=0))
    assert (response.status, response.reason) == (400, "Out-of-order CSeq")
    assert events == []
    assert fx.reg.bindings("200") == [b]
    assert b.cseq == 5


def test_refresh_by_instance_with_new_call_id_and_contact(fx: Fixture) -> None:
    events = fx.ok(request(f"{contact(1)};{instance(7)}", call_id="boot-1", cseq=10))
    b = events[0].binding
    assert b.instance == "<urn:uuid:00000000-0000-0000-0000-000000000007>"
    fx.device(2)
    fx.device(3)
    # new address (DHCP), new Call-ID, lower CSeq: still the same device
    events = fx.ok(request(f"<sip:200@10.9.9.9:5062>;{instance(7)}", call_id="boot-2", cseq=1))
    assert kinds(events) == [(EventKind.REFRESHED, "")]
    assert events[0].binding is b
    assert b.contact == f"<sip:200@10.9.9.9:5062>;{instance(7)}"
    assert b.call_id == "boot-2"
    assert b.cseq == 1
    assert len(fx.reg) == 3


def test_refresh_by_contact_uri_after_reboot(fx: Fixture) -> None:
    b = fx.ok(request("<sip:200@phone.home.arpa:5060;transport=udp>", call_id="before", cseq=50))[0].binding
    fx.device(2)
    fx.device(3)
    # rebooted: new Call-ID, CSeq restarts; the URI is equal by §19.1.4 though not as text
    again = "<sip:%32%30%30@PHONE.Home.Arpa:5060;Transport=UDP;newparam=1>"
    events = fx.ok(request(again, call_id="after", cseq=1))
    assert kinds(events) == [(EventKind.REFRESHED, "")]
    assert events[0].binding is b
    assert b.call_id == "after"
    assert len(fx.reg) == 3


def test_different_contact_uri_and_call_id_is_a_new_device(fx: Fixture) -> None:
    fx.device(1)
    # :5061 differs from no port by §19.1.4
    events = fx.ok(request("<sip:200@192.168.1.21:5061>", call_id="new"))
    assert kinds(events) == [(EventKind.REGISTERED, "")]
    assert len(fx.reg) == 2


def test_refresh_of_unreachable_device_marks_it_reachable(fx: Fixture) -> None:
    b = fx.device(1)
    fx.reg.qualified(b.id, False)
    assert not b.reachable
    events = fx.ok(request(contact(1), call_id="cid-1", cseq=2))
    assert kinds(events) == [(EventKind.REFRESHED, ""), (EventKind.REACHABLE, "")]
    assert b.reachable and b.missed == 0


# -- removal ------------------------------------------------------------------------------


def test_unregister_with_expires_zero_frees_the_slot(fx: Fixture) -> None:
    fx.device(1)
    b2 = fx.device(2)
    fx.device(3)
    assert fx.send(request(contact(4), call_id="cid-4"))[0].status == 403
    events = fx.ok(request(contact(2), call_id="cid-2", cseq=2, expires=0))
    assert kinds(events) == [(EventKind.REMOVED, "unregistered")]
    assert events[0].binding is b2
    assert fx.reg.get(b2.id) is None
    fx.device(4)
    assert fx.contacts() == sorted([contact(1), contact(3), contact(4)])


def test_unregister_unknown_contact_is_harmless(fx: Fixture) -> None:
    fx.device(1)
    response, events = fx.send(request("<sip:200@10.0.0.99>", call_id="stranger", expires=0))
    assert response.status == 200
    assert events == []
    assert len(fx.reg) == 1


def test_contact_star_with_expires_zero_removes_all(fx: Fixture) -> None:
    for n in (1, 2, 3):
        fx.device(n)
    fx.ok(request(contact(1), call_id="x", number="100"), number="100")
    response, events = fx.send(request("*", call_id="cid-9", expires=0))
    assert response.status == 200
    assert response.get("Contact") is None
    assert kinds(events) == [(EventKind.REMOVED, "unregistered")] * 3
    assert fx.reg.bindings("200") == []
    assert len(fx.reg.bindings("100")) == 1  # other numbers untouched


def test_contact_star_keeps_binding_of_a_newer_request(fx: Fixture) -> None:
    b = fx.ok(request(contact(1), call_id="cid-1", cseq=10))[0].binding
    fx.device(2)
    events = fx.ok(request("*", call_id="cid-1", cseq=3, expires=0))
    assert [e.binding.contact for e in events] == [contact(2)]
    assert fx.reg.bindings("200") == [b]


@pytest.mark.parametrize(
    "req",
    [
        request("*"),
        request("*", expires=60),
        request("*", contact(1), expires=0),
    ],
    ids=["no-expires", "expires-60", "with-other-contact"],
)
def test_contact_star_without_expires_zero_is_400(fx: Fixture, req: Request) -> None:
    b = fx.device(1)
    response, events = fx.send(req)
    assert response.status == 400
    assert "Contact *" in response.reason
    assert events == []
    assert fx.reg.bindings("200") == [b]


def test_expire(fx: Fixture) -> None:
    b1 = fx.device(1, expires=100)
    b2 = fx.device(2, expires=200)
    assert fx.reg.expire(T0 + 99.9) == []
    events = fx.reg.expire(T0 + 100)
    assert kinds(events) == [(EventKind.REMOVED, "expired")]
    assert events[0].binding is b1
    assert fx.reg.bindings("200") == [b2]
    assert b2.expires_in(T0 + 150) == 50
    assert b2.expires_in(T0 + 999) == 0
    assert kinds(fx.reg.expire(T0 + 1000)) == [(EventKind.REMOVED, "expired")]
    assert len(fx.reg) == 0
    assert fx.reg.numbers() == []


# -- device rules -------------------------------------------------------------------------


def test_fourth_device_refused_with_403(fx: Fixture) -> None:
    devices = [fx.device(n) for n in (1, 2, 3)]
    response, events = fx.send(request(contact(4), call_id="cid-4"))
    assert response.status == 403
    assert "Device limit reached" in response.reason
    assert "3" in response.reason
    assert events == []
    assert fx.reg.bindings("200") == devices


def test_fourth_device_with_instance_refused_too(fx: Fixture) -> None:
    for n in (1, 2, 3):
        fx.ok(request(f"{contact(n)};{instance(n)}", call_id=f"cid-{n}"))
    response, _ = fx.send(request(f"{contact(4)};{instance(4)}", call_id="cid-4"))
    assert response.status == 403
    assert response.reason.startswith("Device limit reached")


def test_one_number_false_new_device_replaces_old(fx: Fixture) -> None:
    old = fx.device(1, SINGLE)
    events = fx.ok(request(contact(2), call_id="cid-2"), SINGLE)
    assert kinds(events) == [(EventKind.REMOVED, "replaced"), (EventKind.REGISTERED, "")]
    assert events[0].binding is old
    assert fx.reg.get(old.id) is None
    assert fx.contacts() == [contact(2)]


def test_one_number_false_refresh_does_not_replace(fx: Fixture) -> None:
    b = fx.device(1, SINGLE)
    events = fx.ok(request(contact(1), call_id="cid-1", cseq=2), SINGLE)
    assert kinds(events) == [(EventKind.REFRESHED, "")]
    assert fx.reg.bindings("200") == [b]


def test_one_number_false_device_with_two_contacts_stays_one_device(fx: Fixture) -> None:
    events = fx.ok(request(contact(1), contact(2)), SINGLE)
    assert kinds(events) == [(EventKind.REGISTERED, "")] * 2
    assert len(fx.reg) == 2
    events = fx.ok(request(contact(9), call_id="cid-9"), SINGLE)
    assert kinds(events) == [(EventKind.REMOVED, "replaced")] * 2 + [(EventKind.REGISTERED, "")]
    assert fx.contacts() == [contact(9)]


def test_unreachable_device_is_replaced_by_a_new_one(fx: Fixture) -> None:
    b1 = fx.device(1)
    b2 = fx.device(2)
    b3 = fx.device(3)
    assert kinds(fx.reg.qualified(b2.id, False)) == [(EventKind.UNREACHABLE, "")]
    events = fx.ok(request(contact(4), call_id="cid-4"))
    assert kinds(events) == [(EventKind.REMOVED, "replaced"), (EventKind.REGISTERED, "")]
    assert events[0].binding is b2
    assert fx.reg.bindings("200") == [b1, b3, events[1].binding]
    # only one was unreachable: a fifth is refused
    assert fx.send(request(contact(5), call_id="cid-5"))[0].status == 403


def test_most_missed_unreachable_device_is_replaced_first(fx: Fixture) -> None:
    b1 = fx.device(1)
    b2 = fx.device(2)
    fx.device(3)
    fx.reg.qualified(b1.id, False)
    fx.reg.qualified(b2.id, False)
    fx.reg.qualified(b2.id, False)
    events = fx.ok(request(contact(4), call_id="cid-4"))
    assert events[0].binding is b2
    assert fx.reg.get(b1.id) is b1


def test_qualify_three_misses_remove(fx: Fixture) -> None:
    b = fx.device(1)
    assert QUALIFY_MISSES_TO_REMOVE == 3
    assert kinds(fx.reg.qualified(b.id, False)) == [(EventKind.UNREACHABLE, "")]
    assert kinds(fx.reg.qualified(b.id, False)) == []
    assert (b.reachable, b.missed) == (False, 2)
    assert fx.reg.get(b.id) is b
    events = fx.reg.qualified(b.id, False)
    assert kinds(events) == [(EventKind.REMOVED, "unreachable")]
    assert fx.reg.get(b.id) is None
    assert fx.reg.qualified(b.id, False) == []  # unknown id: nothing


def test_qualify_answer_resets_misses(fx: Fixture) -> None:
    b = fx.device(1)
    fx.reg.qualified(b.id, False)
    fx.reg.qualified(b.id, False)
    assert kinds(fx.reg.qualified(b.id, True)) == [(EventKind.REACHABLE, "")]
    assert (b.reachable, b.missed) == (True, 0)
    assert fx.reg.qualified(b.id, True) == []
    fx.reg.qualified(b.id, False)
    fx.reg.qualified(b.id, False)
    assert fx.reg.get(b.id) is b  # the count started again


def test_enforce_lower_limit_keeps_most_recent(fx: Fixture) -> None:
    fx.device(1)
    fx.now += 1
    b2 = fx.device(2)
    fx.now += 1
    b3 = fx.device(3)
    events = fx.reg.enforce("200", DevicePolicy(limit=2, one_number=True))
    assert kinds(events) == [(EventKind.REMOVED, "deleted")]
    assert fx.reg.bindings("200") == [b2, b3]
    assert fx.reg.enforce("200", DevicePolicy(limit=2, one_number=True)) == []


def test_enforce_counts_devices_not_contacts(fx: Fixture) -> None:
    fx.ok(request(contact(1), contact(2)))  # one device, two contacts
    fx.now += 1
    fx.device(3)
    events = fx.reg.enforce("200", DevicePolicy(limit=1, one_number=False))
    assert len(events) == 2
    assert fx.contacts() == [contact(3)]


def test_enforce_deleted_user_removes_all(fx: Fixture) -> None:
    fx.device(1)
    fx.device(2)
    events = fx.reg.enforce("200", None)
    assert kinds(events) == [(EventKind.REMOVED, "deleted")] * 2
    assert len(fx.reg) == 0
    assert fx.reg.enforce("nobody", None) == []


# -- persistence --------------------------------------------------------------------------


def test_dump_load_round_trip(fx: Fixture) -> None:
    fx.ok(request(f"{contact(1)};{instance(1)};q=0.8", call_id="cid-1", cseq=4, expires=300))
    b2 = fx.device(2, expires=3000)
    fx.reg.qualified(b2.id, False)
    data = json.loads(json.dumps(fx.reg.dump()))  # what the edge writes to disk

    other = Registrar(MIN, MAX, DEFAULT)
    assert other.load(data, T0 + 10) == 2
    assert len(other) == 2
    for old in fx.reg.all_bindings():
        new = other.get(old.id)
        assert new is not None
        assert (new.number, new.contact, new.instance, new.call_id, new.cseq, new.expires_at,
                new.registered_at, new.flow, new.user_agent, new.q, new.reachable, new.missed) == (
            old.number, old.contact, old.instance, old.call_id, old.cseq, old.expires_at,
            old.registered_at, old.flow, old.user_agent, old.q, old.reachable, old.missed)
        assert new.name_addr.uri == parse_name_addr(old.contact).uri
    # the loaded registrar recognises the devices and keeps counting ids after them
    response, events = other.register(request(contact(2), call_id="cid-2", cseq=2), "200", FAMILY, FLOW,
                                      T0 + 10)
    assert kinds(events) == [(EventKind.REFRESHED, ""), (EventKind.REACHABLE, "")]  # it was unreachable
    response, events = other.register(request(contact(5), call_id="cid-5"), "200", FAMILY, FLOW, T0 + 10)
    assert response.status == 200
    assert events[0].binding.id not in {b["id"] for b in data}


def test_load_drops_expired_and_malformed(fx: Fixture) -> None:
    fx.device(1, expires=100)
    fx.device(2, expires=1000)
    data = fx.reg.dump()
    broken = dict(data[1], id="d99", contact="<sip:broken")
    missing = {k: v for k, v in data[1].items() if k != "flow"}
    unknown = dict(data[1], id="d98", colour="blue")
    other = Registrar(MIN, MAX, DEFAULT)
    kept = other.load([*data, broken, missing, unknown, "junk"], T0 + 100)  # type: ignore[list-item]
    assert kept == 1
    assert [b.contact for b in other.all_bindings()] == [contact(2)]
    assert data[0]["flow"] == {"transport": "udp", "host": "192.168.1.21", "port": 5060,
                               "local": "192.168.1.2:5060"}  # the input is not consumed


def test_load_skips_duplicate_ids(fx: Fixture) -> None:
    fx.device(1)
    data = fx.reg.dump()
    other = Registrar(MIN, MAX, DEFAULT)
    assert other.load(data + data, T0) == 1
    assert len(other) == 1
