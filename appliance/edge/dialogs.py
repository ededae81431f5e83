"""The dialogs the call router follows, and what it reads off their messages.

A `Dialog` is one dialog through the edge, from INVITE to BYE; the dialogs of one call (the
caller's leg to its worker, the worker's leg to the devices, a joining or picking device)
share a token, the call's id. The functions read a number, a tag or a caller's identity
off a request, or edit one, the same way wherever the router and its features need it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from appliance.call_policy import RouteToTrunk
from appliance.config import TrunkConfig
from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_name_addr
from appliance.sip.message import Request, Response
from appliance.sip.proxy import Fork
from appliance.sip.registrar import Flow
from appliance.sip.uri import parse_uri


class Role(Enum):
    """What a dialog through the edge is in its call: the caller to its worker (A), the
    worker to the ringing devices (B), a joining device to the worker (JOIN), a device
    picking the ringing call up (PICKUP), or the caller straight to the devices when no
    media worker anchors calls (DIRECT)."""

    A = "a"
    B = "b"
    JOIN = "join"
    PICKUP = "pickup"
    DIRECT = "direct"



@dataclass(slots=True, init=False)
class Dialog:
    """One dialog as the edge follows it, from INVITE to BYE; the dialogs of one call
    (A and B legs, a joining device) share a token, the call's id."""

    token: str
    role: Role
    invite: Request
    caller: str
    callee: str
    caller_flow: Flow
    caller_device: str | None
    counts_outgoing: bool
    trunk: str | None
    """The trunk a call from outside came in on; `caller` is then the outside number."""
    outgoing_trunk: str | None
    """The trunk a call out leaves by; `callee` is then the outside number."""
    cseq_delta: int
    """The provider's leg re-sent with credentials: what its CSeq is ahead of the worker's."""
    worker_port: int | None
    fork: Fork[Flow] | None
    callee_flow: Flow | None
    answer: Response | None
    answered_by: str | None
    ended: bool
    joined: int
    """On a call's first dialog: devices that joined it (`*74`) and are talking now."""
    counted_as_joined: bool
    """On a JOIN dialog: it is counted in its call's `joined`."""
    hops: tuple[tuple[str, str], ...]
    """On a call's first dialog: the diversions the call took (number, condition), first first."""
    charged: list[str]
    """On a call's first dialog: numbers whose outgoing count a forward out through a trunk holds."""
    transferring: bool
    """On a call's first dialog: a transfer (or Replaces) has run in it, so a party may leave
    while the call goes on in its worker; the worker's `call_ended` ends the call."""
    caller_tag: str
    """The From tag of the INVITE: which way an in-dialog request goes (read once, not per request)."""

    def __init__(self, token: str, role: Role, invite: Request, caller: str, callee: str, caller_flow: Flow,
                 caller_device: str | None, *, counts_outgoing: bool = False, trunk: str | None = None,
                 outgoing_trunk: str | None = None) -> None:
        # Written out (a few per call): mypyc compiles this one, a dataclass's generated
        # __init__ runs interpreted.  The fields above keep the dataclass's eq and repr.
        self.token = token
        self.role = role
        self.invite = invite
        self.caller = caller
        self.callee = callee
        self.caller_flow = caller_flow
        self.caller_device = caller_device
        self.counts_outgoing = counts_outgoing
        self.trunk = trunk
        self.outgoing_trunk = outgoing_trunk
        self.cseq_delta = 0
        self.worker_port = None
        self.fork = None
        self.callee_flow = None
        self.answer = None
        self.answered_by = None
        self.ended = False
        self.joined = 0
        self.counted_as_joined = False
        self.hops = ()
        self.charged = []
        self.transferring = False
        self.caller_tag = tag_of(invite.get("From")) or ""

    @property
    def call_id(self) -> str:
        return self.invite.call_id

    def sent_by_caller(self, request: Request) -> bool:
        """Its From tag is the INVITE's. A From the same as the INVITE's (the caller's ACK
        and BYE, as phones send them) needs no parse."""
        value = request.get("From")
        if self.caller_tag and value == self.invite.get("From"):
            return True
        return tag_of(value) == self.caller_tag


class EndedDialog:
    """A dialog after its end, for the 32 s (64*T1) a retransmitted BYE, or the ACK of a
    late 2xx, is still relayed to the other party; anything else in it gets 481. Only what
    that takes: which way a request goes (the caller's tag), the two flows, the CSeq step
    towards a provider, and the call's token (a dead worker's dialogs are forgotten at once)."""

    __slots__ = ("call_id", "callee_flow", "caller_flow", "caller_tag", "cseq_delta", "token", "until")

    def __init__(self, dialog: Dialog, callee_flow: Flow, until: float) -> None:
        self.call_id = dialog.call_id
        self.token = dialog.token if dialog.role is not Role.DIRECT else ""  # no worker: none can die
        self.caller_tag = dialog.caller_tag
        self.caller_flow = dialog.caller_flow
        self.callee_flow = callee_flow
        self.cseq_delta = dialog.cseq_delta
        self.until = until


def tag_of(value: str | None) -> str | None:
    if not value or ";tag=" not in value.replace(" ", ""):
        return None
    try:
        return parse_name_addr(value).tag
    except SipSyntaxError:
        return None


def display_name(request: Request) -> str:
    """The display name in From (an outside caller's name as the provider gives it), "" if none
    or withheld."""
    if "id" in (request.get("Privacy") or "").replace(" ", "").lower().split(";"):
        return ""
    try:
        return parse_name_addr(request.get("From") or "").display[:64]
    except SipSyntaxError:
        return ""


def outside_number(request: Request) -> str:
    """The outside caller's number as the provider asserts it (P-Asserted-Identity, else From);
    "anonymous" when it is withheld (Privacy: id) or not a number."""
    if "id" in (request.get("Privacy") or "").replace(" ", "").lower().split(";"):
        return "anonymous"
    for value in (request.get("P-Asserted-Identity"), request.get("From")):
        if not value:
            continue
        try:
            user = parse_name_addr(value.split(",", 1)[0]).uri.user or ""
        except SipSyntaxError:
            continue
        if re.fullmatch(r"\+?[0-9*#]{1,32}", user):
            return user
    return "anonymous"


def as_trunk_caller(request: Request, to: RouteToTrunk, trunk: TrunkConfig) -> None:
    """A call forwarded out: the provider is told the caller is the family's line (its
    caller ID, as on a call out; a provider accepts no other From), the tag kept so the
    worker's dialog stays the same; who forwarded it is in the Diversion header."""
    try:
        tag = parse_name_addr(request.get("From") or "").tag
    except SipSyntaxError:
        tag = None
    request.set("From", f"<sip:{to.caller_id}@{trunk.server}>" + (f";tag={tag}" if tag else ""))


def shift_cseq(message: Request | Response, delta: int) -> None:
    try:
        number, method = message.cseq
    except SipSyntaxError:
        return
    message.set("CSeq", f"{number + delta} {method}")


def dialled_number(uri: str) -> str:
    return parse_uri(uri).user or ""
