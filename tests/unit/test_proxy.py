"""Tests for appliance.sip.proxy: the forking proxy core, with fake destinations and clock."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from appliance.sip.headers import parse_via
from appliance.sip.invite_transaction import TIMER_B, Send
from appliance.sip.message import Request, Response, make_response, parse_message
from appliance.sip.proxy import (
    ANSWERED_ELSEWHERE,
    FAILED,
    LOST,
    WON,
    Branch,
    BranchState,
    Fork,
    ForkAction,
    ForkEvent,
    ForkSettings,
    SendRequest,
    Target,
    best_response,
    make_upstream_failure,
)

T0 = 2000.0
CALLER = "caller-flow"
PROXY_VIA_HOST = "192.0.2.1:5060"
RECORD_ROUTE = "<sip:192.0.2.1:5060;lr>"
CALLER_VIA = "SIP/2.0/UDP 192.168.1.10:5062;branch=z9hG4bKcaller1;rport"
SDP = b"v=0\r\no=- 1 1 IN IP4 192.168.1.10\r\ns=-\r\nc=IN IP4 192.168.1.10\r\nt=0 0\r\n"
EXACT_REASON = 'SIP;cause=200;text="Call completed elsewhere"'


def caller_invite(max_forwards: str | None = "70") -> Request:
    text = (
        "INVITE sip:200@home.arpa SIP/2.0\r\n"
        f"Via: {CALLER_VIA}\r\n"
        + (f"Max-Forwards: {max_forwards}\r\n" if max_forwards is not None else "")
        + 'From: "Grandpa" <sip:100@home.arpa>;tag=callertag\r\n'
        "To: <sip:200@home.arpa>\r\n"
        "Call-ID: fork-call-1\r\n"
        "CSeq: 2 INVITE\r\n"
        "Contact: <sip:100@192.168.1.10:5062>\r\n"
        'Proxy-Authorization: Digest username="100", realm="home.arpa", nonce="n", uri="sip:200@home.arpa", '
        'response="00000000000000000000000000000000"\r\n'
        "Route: <sip:192.0.2.1:5060;lr>\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(SDP)}\r\n\r\n"
    )
    msg = parse_message(text.encode() + SDP)
    assert isinstance(msg, Request)
    return msg


def target(n: int, reliable: bool = False) -> Target[str]:
    return Target(f"b{n}", f"sip:200@192.168.1.2{n}:5060;ob", f"dev{n}", reliable)


def via_for(t: Target[str], branch: str) -> str:
    proto = "TCP" if t.reliable else "UDP"
    return f"SIP/2.0/{proto} {PROXY_VIA_HOST};branch={branch};rport"


class Harness:
    """A Fork of the caller's INVITE to dev1..devN, with helpers to play each device."""

    def __init__(self, n: int = 3, *, ring_timeout: float = 30.0, decline_all: bool = False,
                 reliable: Sequence[int] = (), request: Request | None = None) -> None:
        self.request = request or caller_invite()
        self.fork: Fork[str] = Fork(
            self.request, CALLER, False, ForkSettings(ring_timeout, decline_all=decline_all), T0,
            via_for=via_for, record_route=lambda t: RECORD_ROUTE,
            extra_headers=[("P-Asserted-Identity", '"Grandpa" <sip:100@home.arpa>')],
        )
        self.start_actions = self.fork.start([target(i, i in reliable) for i in range(1, n + 1)], T0)

    def branch(self, dest: str) -> tuple[str, Branch[str]]:
        for branch_id, branch in self.fork.branches.items():
            if branch.target.dest == dest:
                return branch_id, branch
        raise KeyError(dest)

    def reply(self, dest: str, status: int, now: float = T0 + 0.1, tag: str | None = None,
              contact: bool = True) -> list[ForkAction[str]]:
        """The device `dest` answers its branch request, as bytes over the wire would bring it."""
        branch_id, branch = self.branch(dest)
        headers = [("Contact", f"<sip:200@{dest}.example:5060>")] if contact and status < 300 else []
        built = make_response(branch.tx.request, status, to_tag=tag or f"tag-{dest}", headers=headers)
        response = parse_message(built.to_bytes())
        assert isinstance(response, Response)
        return self.fork.on_response(branch_id, response, now)

    def ring_all(self, now: float = T0 + 0.1) -> None:
        for dest in self.dests():
            self.reply(dest, 180, now)

    def dests(self) -> list[str]:
        return [b.target.dest for b in self.fork.branches.values()]

    def run_timers(self, until: float) -> list[ForkAction[str]]:
        actions: list[ForkAction[str]] = []
        for _ in range(10_000):
            deadline = self.fork.next_deadline()
            if deadline is None or deadline > until:
                return actions
            actions += self.fork.on_timer(deadline)
        raise AssertionError("timers never settle")


# -- action helpers ------------------------------------------------------------------------


def sent_to(actions: Sequence[ForkAction[str]], dest: str) -> list[Request | Response]:
    """Messages sent (Send, retransmissions and ACKs included) to `dest`, parsed."""
    return [parse_message(a.data) for a in actions if isinstance(a, Send) and a.dest == dest]


def upstream(actions: Sequence[ForkAction[str]]) -> list[Response]:
    out = []
    for msg in sent_to(actions, CALLER):
        assert isinstance(msg, Response)
        out.append(msg)
    return out


def requests(actions: Sequence[ForkAction[str]], method: str, dest: str | None = None) -> list[Request]:
    """New requests (SendRequest) of `method`, to `dest` if given."""
    return [a.request for a in actions if isinstance(a, SendRequest) and a.request.method == method
            and (dest is None or a.dest == dest)]


def events(actions: Sequence[ForkAction[str]], kind: str) -> list[ForkEvent]:
    return [a for a in actions if isinstance(a, ForkEvent) and a.kind == kind]


def branch_of(msg: Request | Response) -> str:
    return parse_via(msg.get("Via") or "").branch or ""


# -- forking ---------------------------------------------------------------------------------


def test_every_target_gets_its_own_invite() -> None:
    h = Harness(3)
    invites = {}
    for n in (1, 2, 3):
        [msg] = sent_to(h.start_actions, f"dev{n}")
        assert isinstance(msg, Request)
        invites[n] = msg
    branches = {branch_of(m) for m in invites.values()}
    assert len(branches) == 3
    assert branches == set(h.fork.branches)
    assert all(b.startswith("z9hG4bK") for b in branches)
    for n, msg in invites.items():
        assert msg.method == "INVITE"
        assert msg.uri == f"sip:200@192.168.1.2{n}:5060;ob"  # R-URI = the device's Contact
        vias = msg.get_all("Via")
        assert vias[0].startswith(f"SIP/2.0/UDP {PROXY_VIA_HOST};branch=z9hG4bK")
        assert vias[1:] == [CALLER_VIA]
        assert msg.get("Max-Forwards") == "69"
        assert msg.get("Proxy-Authorization") is None
        assert msg.get("Route") is None  # it pointed at us
        assert msg.get_all("Record-Route") == [RECORD_ROUTE]
        assert msg.get("P-Asserted-Identity") == '"Grandpa" <sip:100@home.arpa>'
        assert msg.call_id == "fork-call-1"
        assert msg.get("From") == '"Grandpa" <sip:100@home.arpa>;tag=callertag'
        assert msg.get("To") == "<sip:200@home.arpa>"
        assert msg.cseq == (2, "INVITE")
        assert msg.body == SDP
        assert msg.get("Content-Type") == "application/sdp"


def test_missing_max_forwards_becomes_69() -> None:
    h = Harness(1, request=caller_invite(max_forwards=None))
    [msg] = sent_to(h.start_actions, "dev1")
    assert msg.get_all("Max-Forwards") == ["69"]


def test_100_trying_goes_upstream_at_once() -> None:
    h = Harness(2)
    first = h.start_actions[0]
    assert isinstance(first, Send) and first.dest == CALLER
    [trying] = upstream(h.start_actions)
    assert trying.status == 100
    assert trying.get_all("Via") == [CALLER_VIA]
    assert trying.get("To") == "<sip:200@home.arpa>"  # no tag on 100


def test_a_100_already_sent_is_not_sent_again_but_answers_retransmissions() -> None:
    fork: Fork[str] = Fork(caller_invite(), CALLER, False, ForkSettings(30.0), T0, via_for=via_for)
    actions = fork.start([target(1)], T0, trying_sent=True)
    assert upstream(actions) == []  # the router's own 100 went out while a worker was found
    assert [m.method for m in sent_to(actions, "dev1") if isinstance(m, Request)] == ["INVITE"]
    assert [r.status for r in upstream(fork.on_request_retransmission())] == [100]


def test_caller_retransmission_is_answered_with_last_provisional() -> None:
    h = Harness(2)
    assert [r.status for r in upstream(h.fork.on_request_retransmission())] == [100]
    h.reply("dev1", 180)
    assert [r.status for r in upstream(h.fork.on_request_retransmission())] == [180]


def test_180_is_relayed_upstream_without_our_via() -> None:
    h = Harness(3)
    actions = h.reply("dev1", 180)
    assert events(actions, "ringing") == [ForkEvent("ringing", "b1")]
    [ringing] = upstream(actions)
    assert ringing.status == 180
    assert ringing.get_all("Via") == [CALLER_VIA]
    assert ringing.get("To") == "<sip:200@home.arpa>;tag=tag-dev1"
    assert ringing.get_all("Record-Route") == [RECORD_ROUTE]
    assert h.branch("dev1")[1].state is BranchState.RINGING
    # A 100 from a device is hop by hop: neither relayed nor an event.
    trying = h.reply("dev2", 100)
    assert upstream(trying) == [] and events(trying, "ringing") == []
    assert h.branch("dev2")[1].state is BranchState.TRYING


def test_provisional_stops_branch_retransmission() -> None:
    h = Harness(2)
    h.reply("dev1", 180, now=T0 + 0.2)
    actions = h.run_timers(T0 + 4)
    assert sent_to(actions, "dev1") == []
    assert len(sent_to(actions, "dev2")) == 3  # Timer A at 0.5, 1.5, 3.5 for the silent one


def test_no_retransmission_to_a_tcp_device() -> None:
    h = Harness(2, reliable=(2,))
    actions = h.run_timers(T0 + 10)
    assert sent_to(actions, "dev2") == []
    assert len(sent_to(actions, "dev1")) == 4


# -- answered --------------------------------------------------------------------------------


def test_first_200_goes_upstream_and_the_others_are_cancelled_with_reason() -> None:
    h = Harness(3)
    h.ring_all()
    actions = h.reply("dev2", 200, now=T0 + 3)
    [ok] = upstream(actions)
    assert ok.status == 200
    assert ok.get_all("Via") == [CALLER_VIA]
    assert ok.get("To") == "<sip:200@home.arpa>;tag=tag-dev2"
    assert ok.get("Contact") == "<sip:200@dev2.example:5060>"
    assert events(actions, "answered") == [ForkEvent("answered", "b2")]
    assert h.fork.answered is h.branch("dev2")[1]
    assert h.fork.final_sent
    assert sent_to(actions, "dev2") == []  # the 2xx ACK is the caller's, end to end
    assert requests(actions, "CANCEL", "dev2") == []
    for dest in ("dev1", "dev3"):
        [cancel] = requests(actions, "CANCEL", dest)
        invite = h.branch(dest)[1].tx.request
        assert cancel.get_all("Reason") == [EXACT_REASON] == [ANSWERED_ELSEWHERE]
        assert cancel.uri == invite.uri
        assert cancel.get_all("Via") == [invite.get("Via")]  # same branch as the INVITE
        assert cancel.get("To") == invite.get("To")  # no tag
        assert cancel.get("From") == invite.get("From")
        assert cancel.call_id == invite.call_id
        assert cancel.get("CSeq") == "2 CANCEL"
        wire = parse_message(cancel.to_bytes())
        assert wire.get("Reason") == EXACT_REASON
    assert {e.binding_id for e in events(actions, "stopped")} == {"b1", "b3"}
    assert h.fork.ring_deadline is None


def test_retransmitted_200_of_the_winner_is_forwarded_again() -> None:
    h = Harness(2)
    h.ring_all()
    h.reply("dev1", 200, now=T0 + 2)
    again = h.reply("dev1", 200, now=T0 + 2.5)
    assert [r.status for r in upstream(again)] == [200]
    assert requests(again, "CANCEL") == [] and requests(again, "BYE") == []


def test_a_trying_branch_is_cancelled_only_after_its_first_provisional() -> None:
    h = Harness(3)
    h.reply("dev1", 180)
    h.reply("dev2", 180)
    actions = h.reply("dev1", 200, now=T0 + 2)
    assert len(requests(actions, "CANCEL", "dev2")) == 1
    assert requests(actions, "CANCEL", "dev3") == []  # §9.1: no provisional yet, no CANCEL
    late = h.reply("dev3", 180, now=T0 + 2.5)
    [cancel] = requests(late, "CANCEL", "dev3")
    assert cancel.get("Reason") == EXACT_REASON
    assert upstream(late) == []  # its ringing is not relayed after the answer
    assert events(late, "ringing") == []
    more = h.reply("dev3", 183, now=T0 + 2.6)
    assert requests(more, "CANCEL") == [] and events(more, "ringing") == [] and upstream(more) == []


def test_a_trying_branch_cancelled_on_100_does_not_show_ringing_later() -> None:
    h = Harness(2)
    h.reply("dev1", 200, now=T0 + 1)
    first = h.reply("dev2", 100, now=T0 + 1.1)
    assert len(requests(first, "CANCEL", "dev2")) == 1
    then = h.reply("dev2", 180, now=T0 + 1.2)
    assert events(then, "ringing") == [] and requests(then, "CANCEL") == [] and upstream(then) == []


def test_two_200s_in_the_same_instant_exactly_one_wins() -> None:
    h = Harness(3)
    h.ring_all()
    now = T0 + 4
    won = h.reply("dev1", 200, now=now)
    lost = h.reply("dev2", 200, now=now)
    assert [r.status for r in upstream(won)] == [200]
    assert upstream(lost) == []  # not forwarded
    assert h.fork.answered is h.branch("dev1")[1]
    assert requests(won, "CANCEL", "dev2") != []  # it was ringing when dev1 won
    [ack] = sent_to(lost, "dev2")
    assert isinstance(ack, Request) and ack.method == "ACK"
    invite = h.branch("dev2")[1].tx.request
    assert ack.uri == "sip:200@dev2.example:5060"  # the device's Contact
    assert ack.get("To") == "<sip:200@home.arpa>;tag=tag-dev2"
    assert ack.get("CSeq") == "2 ACK"
    assert branch_of(ack) != branch_of(invite)  # the ACK of a 2xx is a new transaction
    [bye] = requests(lost, "BYE", "dev2")
    assert bye.uri == "sip:200@dev2.example:5060"
    assert bye.get("To") == "<sip:200@home.arpa>;tag=tag-dev2"
    assert bye.get("From") == invite.get("From")
    assert bye.call_id == invite.call_id
    assert bye.get("CSeq") == "3 BYE"
    assert branch_of(bye) not in (branch_of(ack), branch_of(invite))
    assert events(lost, "stopped") == [ForkEvent("stopped", "b2")]
    assert events(lost, "answered") == []
    # The loser retransmits its 200: ACK again, no second BYE, still nothing upstream.
    again = h.reply("dev2", 200, now=now + 0.5)
    assert [m.method for m in sent_to(again, "dev2") if isinstance(m, Request)] == ["ACK"]
    assert requests(again, "BYE") == [] and upstream(again) == []


def test_a_200_after_the_caller_cancelled_is_hung_up() -> None:
    h = Harness(2)
    h.ring_all()
    h.fork.cancel(T0 + 1)
    late = h.reply("dev1", 200, now=T0 + 1.01)
    assert upstream(late) == []
    assert [m.method for m in sent_to(late, "dev1") if isinstance(m, Request)] == ["ACK"]
    assert len(requests(late, "BYE", "dev1")) == 1


# -- declines and failures ----------------------------------------------------------------------


def test_one_486_with_decline_this_device_keeps_the_others_ringing() -> None:
    h = Harness(3)
    h.ring_all()
    actions = h.reply("dev1", 486, now=T0 + 2)
    assert upstream(actions) == []
    assert requests(actions, "CANCEL") == []
    assert events(actions, "stopped") == [ForkEvent("stopped", "b1")]
    [ack] = sent_to(actions, "dev1")  # the transaction ACKs the 486 hop by hop
    assert isinstance(ack, Request) and ack.method == "ACK" and ack.get("CSeq") == "2 ACK"
    assert h.branch("dev2")[1].state is BranchState.RINGING
    assert not h.fork.final_sent
    answered = h.reply("dev3", 200, now=T0 + 3)
    assert [r.status for r in upstream(answered)] == [200]


def test_one_603_with_decline_this_device_keeps_the_others_ringing() -> None:
    h = Harness(2)
    h.ring_all()
    actions = h.reply("dev1", 603, now=T0 + 2)
    assert upstream(actions) == [] and requests(actions, "CANCEL") == []
    assert not h.fork.final_sent


def test_486_beats_a_device_that_times_out() -> None:
    h = Harness(3, ring_timeout=60.0)  # longer than Timer B, so each silent branch times out
    h.reply("dev1", 180)
    h.reply("dev1", 486, now=T0 + 1)  # dev1 busy; dev2 and dev3 never answer at all
    before = h.run_timers(T0 + TIMER_B - 0.01)
    assert upstream(before) == []
    actions = h.run_timers(T0 + TIMER_B)
    [final] = upstream(actions)
    assert final.status == 486
    assert final.get_all("Via") == [CALLER_VIA]
    assert final.get("To") == "<sip:200@home.arpa>;tag=tag-dev1"
    assert final.cseq == (2, "INVITE")
    assert final.call_id == "fork-call-1"
    assert events(actions, "failed") == [ForkEvent("failed", status=486)]
    assert {e.binding_id for e in events(actions, "stopped")} == {"b2", "b3"}


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ((486, 486, 486), 486),
        ((486, 603, 486), 603),  # any 6xx wins
        ((600, 486, 404), 600),
        ((503, 503, 503), 500),  # §16.7: 503 is never relayed as such
        ((480, 486, 487), 486),
        ((404, 486, 503), 404),  # the lowest class; first of equals
        ((302, 486, 603), 603),
    ],
)
def test_all_devices_fail_best_response_upstream(statuses: tuple[int, ...], expected: int) -> None:
    h = Harness(len(statuses))
    h.ring_all()
    finals: list[Response] = []
    for i, status in enumerate(statuses, start=1):
        actions = h.reply(f"dev{i}", status, now=T0 + i)
        finals += upstream(actions)
        if i < len(statuses):
            assert finals == []
    [final] = finals
    assert final.status == expected
    assert final.get_all("Via") == [CALLER_VIA]
    assert h.fork.final_sent and h.fork.answered is None


def test_a_branch_timer_b_only_ends_that_branch() -> None:
    h = Harness(3, ring_timeout=60.0)
    h.reply("dev1", 180)
    h.reply("dev2", 180)
    actions = h.run_timers(T0 + TIMER_B)
    assert len(sent_to(actions, "dev3")) == 6  # retransmitted, then given up
    assert events(actions, "stopped") == [ForkEvent("stopped", "b3")]
    assert upstream(actions) == [] and requests(actions, "CANCEL") == []
    assert h.branch("dev3")[1].state is BranchState.FAILED
    assert h.branch("dev1")[1].state is BranchState.RINGING
    assert not h.fork.final_sent
    answered = h.reply("dev1", 200, now=T0 + TIMER_B + 1)
    assert [r.status for r in upstream(answered)] == [200]
    assert requests(answered, "CANCEL") == [requests(answered, "CANCEL", "dev2")[0]]


def test_every_device_silent_gives_408() -> None:
    h = Harness(2, ring_timeout=60.0)
    actions = h.run_timers(T0 + TIMER_B)
    assert [r.status for r in upstream(actions)] == [408]


def test_decline_all_devices_603_ends_every_branch() -> None:
    h = Harness(3, decline_all=True)
    h.ring_all()
    actions = h.reply("dev2", 603, now=T0 + 2)
    [final] = upstream(actions)
    assert final.status == 603
    assert final.get("To") == "<sip:200@home.arpa>;tag=tag-dev2"
    assert events(actions, "failed") == [ForkEvent("failed", status=603)]
    for dest in ("dev1", "dev3"):
        [cancel] = requests(actions, "CANCEL", dest)
        assert cancel.get("Reason") == "SIP;cause=603"
    assert requests(actions, "CANCEL", "dev2") == []


def test_decline_all_devices_486_too() -> None:
    h = Harness(2, decline_all=True)
    h.ring_all()
    actions = h.reply("dev1", 486, now=T0 + 2)
    assert [r.status for r in upstream(actions)] == [486]
    assert len(requests(actions, "CANCEL", "dev2")) == 1


def test_decline_all_devices_a_failure_is_not_a_decline() -> None:
    h = Harness(2, decline_all=True)
    h.ring_all()
    actions = h.reply("dev1", 500, now=T0 + 2)
    assert upstream(actions) == [] and requests(actions, "CANCEL") == []


# -- ring timeout and caller CANCEL --------------------------------------------------------------


def test_ring_timeout_cancels_all_and_gives_480() -> None:
    h = Harness(3, ring_timeout=30.0)
    h.ring_all()
    assert h.fork.next_deadline() == T0 + 30.0
    assert h.fork.on_timer(T0 + 29.9) == []
    actions = h.run_timers(T0 + 30.0)
    [final] = upstream(actions)
    assert final.status == 480
    assert final.get_all("Via") == [CALLER_VIA]
    assert events(actions, "failed") == [ForkEvent("failed", status=480)]
    for dest in ("dev1", "dev2", "dev3"):
        assert len(requests(actions, "CANCEL", dest)) == 1
    # The devices answer the CANCEL: 487s are ACKed and nothing more goes upstream.
    for dest in ("dev1", "dev2", "dev3"):
        ended = h.reply(dest, 487, now=T0 + 30.1)
        assert upstream(ended) == []
        assert [m.method for m in sent_to(ended, dest) if isinstance(m, Request)] == ["ACK"]


def test_ring_timeout_with_a_trying_branch_cancels_it_on_its_provisional() -> None:
    h = Harness(2, ring_timeout=10.0)
    h.reply("dev1", 180)
    h.reply("dev2", 100)  # 100 after the answer stops Timer A, no ringing yet
    actions = h.run_timers(T0 + 10.0)
    assert len(requests(actions, "CANCEL", "dev1")) == 1
    assert requests(actions, "CANCEL", "dev2") == []
    assert [r.status for r in upstream(actions)] == [480]
    late = h.reply("dev2", 180, now=T0 + 11)
    assert len(requests(late, "CANCEL", "dev2")) == 1


def test_caller_cancel_cancels_every_device_and_gives_487() -> None:
    h = Harness(3)
    h.ring_all()
    actions = h.fork.cancel(T0 + 5, 'SIP;cause=487;text="Caller hung up"')
    [final] = upstream(actions)
    assert final.status == 487
    assert final.get_all("Via") == [CALLER_VIA]
    for dest in ("dev1", "dev2", "dev3"):
        [cancel] = requests(actions, "CANCEL", dest)
        assert cancel.get("Reason") == 'SIP;cause=487;text="Caller hung up"'
    assert {e.binding_id for e in events(actions, "stopped")} == {"b1", "b2", "b3"}
    assert h.fork.cancel(T0 + 5.1) == []  # once
    for dest in ("dev1", "dev2", "dev3"):
        assert upstream(h.reply(dest, 487, now=T0 + 5.2)) == []


def test_caller_cancel_without_reason() -> None:
    h = Harness(1)
    h.ring_all()
    [cancel] = requests(h.fork.cancel(T0 + 1), "CANCEL", "dev1")
    assert cancel.get("Reason") is None


def test_cancel_after_answer_does_nothing() -> None:
    h = Harness(2)
    h.ring_all()
    h.reply("dev1", 200, now=T0 + 1)
    assert h.fork.cancel(T0 + 2) == []


# -- the end of a fork -----------------------------------------------------------------------


def test_answered_fork_is_done_after_its_timers() -> None:
    h = Harness(3)
    h.ring_all()
    h.reply("dev2", 200, now=T0 + 1)
    for dest in ("dev1", "dev3"):
        h.reply(dest, 487, now=T0 + 1.1)
    assert not h.fork.done
    h.run_timers(T0 + 1000)
    assert h.fork.done
    assert h.fork.next_deadline() is None


def test_failed_fork_is_done_after_ack_and_timers() -> None:
    h = Harness(2)
    h.ring_all()
    h.reply("dev1", 486, now=T0 + 1)
    h.reply("dev2", 486, now=T0 + 1)
    assert h.fork.on_ack(T0 + 1.2) == []
    assert h.fork.server.state.value == "confirmed"
    retransmits = h.run_timers(T0 + 1000)
    assert upstream(retransmits) == []  # ACKed: no Timer G retransmission upstream
    assert h.fork.done


def test_unacked_final_is_retransmitted_upstream_until_timer_h() -> None:
    h = Harness(1)
    h.ring_all()
    h.reply("dev1", 486, now=T0 + 1)
    actions = h.run_timers(T0 + 1000)
    statuses = [r.status for r in upstream(actions)]
    assert statuses and set(statuses) == {486}
    assert h.fork.done


def test_a_cancelled_device_that_never_answers_does_not_keep_the_fork_alive() -> None:
    h = Harness(2)
    h.ring_all()
    h.fork.cancel(T0 + 1)
    h.fork.on_ack(T0 + 1.1)
    h.reply("dev1", 487, now=T0 + 1.2)  # dev2 never answers the CANCEL nor the INVITE
    h.run_timers(T0 + 1000)
    assert h.fork.done


def test_ring_timeout_fork_is_done_eventually() -> None:
    h = Harness(2, ring_timeout=5.0)
    h.ring_all()
    h.run_timers(T0 + 5)
    h.fork.on_ack(T0 + 5.1)
    for dest in ("dev1", "dev2"):
        h.reply(dest, 487, now=T0 + 5.2)
    h.run_timers(T0 + 1000)
    assert h.fork.done


def test_response_for_unknown_branch_is_ignored() -> None:
    h = Harness(1)
    bogus = make_response(h.branch("dev1")[1].tx.request, 200, to_tag="x")
    assert h.fork.on_response("z9hG4bKnotours", bogus, T0 + 1) == []
    assert not h.fork.final_sent


# -- best_response and make_upstream_failure ---------------------------------------------------


def resp(status: int) -> Response:
    return make_response(caller_invite(), status, to_tag=f"t{status}")


def test_best_response_of_nothing_is_none() -> None:
    assert best_response([]) is None


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([486, 408], 486),  # a real answer beats a timeout
        ([408, 486], 486),
        ([487, 480, 486], 486),
        ([408, 603], 603),
        ([486, 600], 600),
        ([603, 600], 603),  # the first 6xx
        ([500, 408], 408),  # the lowest class
        ([302, 486], 302),
        ([408], 408),
        ([503], 500),
        ([502, 503], 502),  # a 5xx that is not 503 is kept
    ],
)
def test_best_response_choice(statuses: list[int], expected: int) -> None:
    best = best_response([resp(s) for s in statuses])
    assert best is not None
    assert best.status == expected


def test_best_response_503_becomes_500() -> None:
    best = best_response([resp(503)])
    assert best is not None
    assert (best.status, best.reason) == (500, "Server Internal Error")


def test_make_upstream_failure_rebases_on_the_callers_request() -> None:
    h = Harness(1)
    branch_request = h.branch("dev1")[1].tx.request
    downstream = make_response(branch_request, 486, to_tag="busy", headers=[("Retry-After", "60")])
    up = make_upstream_failure(h.request, downstream)
    assert up.status == 486
    assert up.get_all("Via") == [CALLER_VIA]
    assert up.get("To") == "<sip:200@home.arpa>;tag=busy"
    assert up.get("Retry-After") == "60"
    assert up.cseq == (2, "INVITE")


def test_ring_timeout_comes_before_timer_b_for_a_silent_device() -> None:
    h = Harness(2)  # default-like 30 s ring timeout, Timer B is 32 s
    h.reply("dev1", 180)
    actions = h.run_timers(T0 + 30.0)
    assert [r.status for r in upstream(actions)] == [480]
    h.fork.on_ack(T0 + 30.1)
    h.reply("dev1", 487, now=T0 + 30.2)
    h.run_timers(T0 + 1000)
    assert h.branch("dev2")[1].state is BranchState.FAILED  # its own Timer B ended it
    assert h.fork.done


def test_the_200_to_our_cancel_is_not_taken_for_an_answer() -> None:
    # The CANCEL shares the INVITE's branch (§9.1), so its 200 reaches the same branch id.
    h = Harness(2)
    h.ring_all()
    actions = h.reply("dev1", 200, now=T0 + 1)
    [cancel] = requests(actions, "CANCEL", "dev2")
    branch_id, branch = h.branch("dev2")
    cancel_ok = parse_message(make_response(cancel, 200).to_bytes())
    assert isinstance(cancel_ok, Response) and cancel_ok.cseq == (2, "CANCEL")
    assert h.fork.on_response(branch_id, cancel_ok, T0 + 1.1) == []  # no ACK, no BYE, no event
    assert branch.state is BranchState.RINGING
    terminated = h.reply("dev2", 487, now=T0 + 1.2)
    assert [m.method for m in sent_to(terminated, "dev2") if isinstance(m, Request)] == ["ACK"]
    assert branch.state is BranchState.FAILED
    assert requests(terminated, "BYE") == []


def test_a_response_with_a_bad_cseq_is_ignored() -> None:
    h = Harness(1)
    branch_id, branch = h.branch("dev1")
    bad = make_response(branch.tx.request, 200, to_tag="x")
    bad.set("CSeq", "x INVITE")
    assert h.fork.on_response(branch_id, bad, T0 + 1) == []
    assert not h.fork.final_sent


def test_relay_body_decides_each_body_that_crosses_the_fork() -> None:
    """The hook sees (message, from, to): each branch's INVITE gets its own body, and each
    answer relayed upstream (provisional, 2xx, a retransmitted 2xx) gets the hook's body."""
    seen: list[tuple[str, str, str]] = []

    def relay_body(message: Request | Response, source: str, dest: str) -> bytes:
        kind = message.method if isinstance(message, Request) else str(message.status)
        seen.append((kind, source, dest))
        return message.body.replace(b"192.168.1.10", f"10.0.0.{len(dest)}".encode()) + dest.encode()

    fork: Fork[str] = Fork(caller_invite(), CALLER, False, ForkSettings(30.0), T0, via_for=via_for,
                           relay_body=relay_body)
    actions = fork.start([target(1), target(2)], T0)
    for dest in ("dev1", "dev2"):
        (invite,) = sent_to(actions, dest)
        assert invite.body == SDP.replace(b"192.168.1.10", b"10.0.0.4") + dest.encode()
        assert invite.get("Content-Length") == str(len(invite.body))
    assert seen == [("INVITE", CALLER, "dev1"), ("INVITE", CALLER, "dev2")]
    seen.clear()
    (branch_id, branch) = next((k, b) for k, b in fork.branches.items() if b.target.dest == "dev2")
    answer_sdp = b"v=0\r\nc=IN IP4 127.0.0.1\r\n"
    for status, now in ((183, T0 + 0.1), (200, T0 + 0.2), (200, T0 + 0.3)):
        built = make_response(branch.tx.request, status, to_tag="t2", body=answer_sdp,
                              headers=[("Contact", "<sip:200@dev2.example>"), ("Content-Type", "application/sdp")])
        response = parse_message(built.to_bytes())
        assert isinstance(response, Response)
        (relayed,) = upstream(fork.on_response(branch_id, response, now))
        assert relayed.status == status
        assert relayed.body == answer_sdp + CALLER.encode()
        assert relayed.get("Content-Length") == str(len(relayed.body))
    assert seen == [("183", "dev2", CALLER), ("200", "dev2", CALLER), ("200", "dev2", CALLER)]


def test_without_relay_body_bodies_pass_untouched() -> None:
    h = Harness(n=1)
    (invite,) = sent_to(h.start_actions, "dev1")
    assert invite.body == SDP


def test_an_answered_fork_keeps_no_body_nor_whole_requests_while_it_lingers() -> None:
    """A burst of calls must not hold every INVITE and SDP for the 32 s a fork lingers."""
    h = Harness(3)
    assert h.request.body and h.fork.request.body
    h.ring_all()
    h.reply("dev2", 200, now=T0 + 3)
    assert h.fork.request.body == b"" and h.fork.request.get("Content-Type") is None
    assert h.fork.request.get_all("Via") == [CALLER_VIA]  # still answers a retransmission
    for branch in h.fork.branches.values():
        assert branch.tx.request.body == b"" and branch.tx.data == b""
    answer = h.fork.take_answer()
    assert answer is not None and answer.status == 200 and h.fork.take_answer() is None


def test_a_branch_cancelled_before_it_rang_gets_its_cancel_from_what_the_fork_kept() -> None:
    h = Harness(2)
    h.reply("dev1", 180)
    h.reply("dev1", 200, now=T0 + 1)  # dev2 has not rung yet: its CANCEL waits (§9.1)
    [cancel] = requests(h.reply("dev2", 180, now=T0 + 1.1), "CANCEL", "dev2")
    invite_via = h.branch("dev2")[1].tx.request.get("Via")
    assert cancel.get_all("Via") == [invite_via] and cancel.get("CSeq") == "2 CANCEL"
    assert cancel.get("Reason") == ANSWERED_ELSEWHERE
# -- a finished fork: what it keeps for its linger --------------------------------------------


def wire(h: Harness, dest: str, status: int, tag: str | None = None) -> tuple[str, bytes]:
    """A device's response to its branch, as bytes (sent again later: a retransmission)."""
    branch_id, branch = h.branch(dest)
    headers = [("Contact", f"<sip:200@{dest}.example:5060>")] if status < 300 else []
    return branch_id, make_response(branch.tx.request, status, to_tag=tag or f"tag-{dest}", headers=headers).to_bytes()


def answer_all(h: Harness, data: tuple[str, bytes], now: float) -> list[tuple[bytes, str]]:
    response = parse_message(data[1])
    assert isinstance(response, Response)
    return [(a.data, a.dest) for a in h.fork.on_response(data[0], response, now) if isinstance(a, Send)]


def test_a_finished_fork_answers_every_retransmission_exactly_as_the_fork_did() -> None:
    """The answer's 2xx again goes upstream, a cancelled device's 487 and a losing 2xx are
    ACKed again: the same bytes to the same place, from what the `FinishedFork` kept."""
    h = Harness(4)
    h.ring_all()
    won, lost = wire(h, "dev1", 200), wire(h, "dev2", 200)
    failed = [wire(h, dest, 487) for dest in ("dev3", "dev4")]
    late = [wire(h, "dev3", 200)]  # a 2xx for a branch already Completed: nothing
    for data in (won, lost, *failed):
        answer_all(h, data, T0 + 1)
    cancel_ok = parse_message(make_response(h.branch("dev3")[1].tx.request, 200).to_bytes()
                              .replace(b"INVITE", b"CANCEL"))
    assert isinstance(cancel_ok, Response)
    live = [answer_all(h, data, T0 + 2) for data in (won, lost, *failed, *late)]
    assert [len(sends) for sends in live] == [1, 1, 1, 1, 0]
    assert live[0][0][1] == CALLER and live[1][0][1] == "dev2" and live[2][0][1] == "dev3"
    assert h.fork.on_response(failed[0][0], cancel_ok, T0 + 2) == []

    finished = h.fork.finished()
    assert finished is not None
    assert h.fork.branches == {} and h.fork.next_deadline() is None and h.fork.done
    assert sorted(r.kind for r in finished.branches) == [WON, LOST, FAILED, FAILED]
    assert finished.until == T0 + 1 + 32  # the last of Timer L and Timer D
    buried = []
    for data in (won, lost, *failed, *late):
        response = parse_message(data[1])
        assert isinstance(response, Response)
        buried.append([(a.data, a.dest) for a in finished.on_response(data[0], response)])
    assert buried == live
    assert finished.on_response(failed[0][0], cancel_ok) == []  # the 200 to our CANCEL
    assert finished.on_response("z9hG4bKnotours", parse_message(won[1])) == []  # type: ignore[arg-type]


def test_a_finished_fork_keeps_no_message_and_no_body() -> None:
    h = Harness(3)
    h.ring_all()
    h.reply("dev1", 200, now=T0 + 1)
    h.reply("dev2", 487, now=T0 + 1.1)
    h.reply("dev3", 487, now=T0 + 1.1)
    finished = h.fork.finished()
    assert finished is not None
    kept = [finished.upstream, finished.relay_body, finished.cseq, finished.from_, finished.call_id,
            finished.until, *[value for r in finished.branches for value in r]]
    assert not [v for v in kept if isinstance(v, Request | Response)]
    assert not [v for v in kept if isinstance(v, bytes) and v]  # the ACKs are made again when needed


def test_a_fork_is_not_finished_while_a_transaction_still_has_work() -> None:
    h = Harness(2)
    h.ring_all()
    h.reply("dev1", 200, now=T0 + 1)
    assert h.fork.finished() is None  # dev2 was CANCELled and has not answered it
    h.reply("dev2", 487, now=T0 + 1.1)
    assert h.fork.finished() is not None

    h = Harness(1)
    h.ring_all()
    h.reply("dev1", 486, now=T0 + 1)
    assert h.fork.finished() is None  # the 486 upstream is retransmitted until its ACK
    h.fork.on_ack(T0 + 1.2)
    finished = h.fork.finished()
    assert finished is not None and [r.kind for r in finished.branches] == [FAILED]

    h = Harness(1)
    h.ring_all()
    assert h.fork.finished() is None  # still ringing


# -- call forwarding: the final held, the same transaction re-targeted ------------------------


def holding(n: int = 2, ring_timeout: float = 5.0) -> Harness:
    h = Harness(n, ring_timeout=ring_timeout)
    h.fork.settings.hold_final = True
    return h


def test_hold_final_every_device_busy_is_exhausted_not_answered_upstream() -> None:
    h = holding()
    h.ring_all()
    h.reply("dev1", 486, now=T0 + 1)
    actions = h.reply("dev2", 486, now=T0 + 2)
    assert events(actions, "exhausted") == [ForkEvent("exhausted", status=486)]
    assert upstream(actions) == [] and not h.fork.final_sent
    assert events(h.reply("dev2", 486, now=T0 + 2.1), "exhausted") == []  # said once


def test_hold_final_no_answer_cancels_the_devices_and_waits() -> None:
    h = holding()
    h.ring_all()
    actions = h.run_timers(T0 + 5.0)
    assert len(requests(actions, "CANCEL")) == 2
    assert events(actions, "exhausted") == [ForkEvent("exhausted", status=480)]
    assert upstream(actions) == [] and not h.fork.final_sent


def test_retarget_rings_new_targets_for_the_same_caller_and_their_answer_goes_up() -> None:
    h = holding()
    h.ring_all()
    h.run_timers(T0 + 5.0)
    actions = h.fork.retarget([target(9)], T0 + 5.0, ForkSettings(30.0), [("Diversion", "<sip:200@home.arpa>")])
    [invite] = sent_to(actions, "dev9")
    assert isinstance(invite, Request) and invite.get("Diversion") == "<sip:200@home.arpa>"
    assert invite.call_id == h.branch("dev1")[1].tx.request.call_id
    h.reply("dev9", 180, now=T0 + 5.1)
    answered = h.reply("dev9", 200, now=T0 + 6)
    assert [r.status for r in upstream(answered)] == [200]
    assert h.fork.answered is not None and h.fork.answered.target.dest == "dev9"


def test_retarget_target_busy_too_ends_with_its_answer_not_the_first_devices() -> None:
    h = holding(1)
    h.reply("dev1", 486, now=T0 + 1)
    h.fork.retarget([target(9)], T0 + 1, ForkSettings(30.0), [])
    actions = h.reply("dev9", 603, now=T0 + 2)
    assert [r.status for r in upstream(actions)] == [603]
    assert events(actions, "failed") == [ForkEvent("failed", status=603)]


def test_finish_sends_the_held_answer_or_a_given_one() -> None:
    h = holding(1)
    h.reply("dev1", 486, now=T0 + 1)
    assert [r.status for r in upstream(h.fork.finish(T0 + 1))] == [486]
    h = holding(1)
    h.reply("dev1", 486, now=T0 + 1)
    loop = make_response(h.request, 482, "Loop Detected")
    assert [r.status for r in upstream(h.fork.finish(T0 + 1, loop))] == [482]


def test_a_caller_cancel_is_answered_even_when_finals_are_held() -> None:
    h = holding()
    h.ring_all()
    actions = h.fork.cancel(T0 + 1)
    assert [r.status for r in upstream(actions)] == [487]
