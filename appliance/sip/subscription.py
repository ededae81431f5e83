"""The notifier's side of a SUBSCRIBE dialog (RFC 6665), as data and time passed in (sans-I/O).

A SUBSCRIBE from a handset creates one `Subscription`: its dialog (Call-ID, the
subscriber's From tag, our To tag, its Contact as the target of our NOTIFYs), the
granted expiry (`granted_expires`: 423 below `MIN_EXPIRES`, cut to `MAX_EXPIRES`), the
CSeq of our NOTIFYs, and the version counter of a dialog-info document. A refresh
inside the dialog moves the expiry; `Expires: 0` ends it (the last NOTIFY says
`terminated`). `next_deadline()` is the expiry, for the edge's timer wheel; the edge
(`edge/subscriptions.py`) sends what `notify()` builds and carries the transactions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.sip.errors import SipSyntaxError
from appliance.sip.headers import parse_name_addr
from appliance.sip.message import Request, Response, make_response, new_tag
from appliance.sip.registrar import Flow

EVENT_PACKAGES = ("dialog", "presence", "message-summary")
"""What the box answers; any other Event gets 489 Bad Event."""
MIN_EXPIRES = 60
MAX_EXPIRES = 3600
DEFAULT_EXPIRES = 3600
"""RFC 4235 and RFC 3856 suggest 3600 s when the subscriber names none."""


class SubscribeRefused(Exception):
    """Answer the SUBSCRIBE with `status reason` (and `headers`), change nothing."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or []

    def response(self, request: Request) -> Response:
        return make_response(request, self.status, self.reason, headers=self.headers)


def event_package(request: Request) -> str:
    """The Event header's package, lower case, without parameters ("" when absent)."""
    value = request.get("Event") or ""
    return value.split(";", 1)[0].strip().lower()


def granted_expires(value: str | None, *, minimum: int = MIN_EXPIRES, maximum: int = MAX_EXPIRES,
                    default: int = DEFAULT_EXPIRES) -> int:
    """The expiry the box grants for a requested `Expires` (0 stays 0: a fetch or an end)."""
    if value is None:
        return default
    text = value.strip()
    if not text.isdigit():
        raise SubscribeRefused(400, "Bad Expires")
    requested = int(text)
    if requested == 0:
        return 0
    if requested < minimum:
        raise SubscribeRefused(423, "Interval Too Brief", [("Min-Expires", str(minimum))])
    return min(requested, maximum)


def _without_tag(value: str) -> str:
    addr = parse_name_addr(value)
    addr.params.pop("tag", None)
    return str(addr)


@dataclass(eq=False)
class Subscription:
    """One subscription: `subscriber` watches `resource` for `event`."""

    event: str
    resource: str
    subscriber: str
    call_id: str
    remote_tag: str
    remote_uri: str
    """The subscriber's From (no tag): our NOTIFY's To."""
    local_uri: str
    """The SUBSCRIBE's To (no tag): our NOTIFY's From."""
    target: str
    """The subscriber's Contact URI: our NOTIFY's Request-URI."""
    routes: list[str]
    """The SUBSCRIBE's Record-Route, in order: our NOTIFY's Route set (a UAS keeps the order)."""
    flow: Flow
    remote_cseq: int
    expires_at: float
    local_tag: str = field(default_factory=new_tag)
    cseq: int = 0
    version: int = -1
    """The last dialog-info version sent (the first NOTIFY carries 0)."""
    terminated: bool = False
    last_body: bytes | None = None
    """What the last NOTIFY said: a change of state is only sent when the body changes."""

    @classmethod
    def from_subscribe(cls, request: Request, resource: str, subscriber: str, flow: Flow, expires: int,
                       now: float) -> Subscription:
        """A new subscription from an initial SUBSCRIBE; SubscribeRefused(400) when it lacks a dialog's parts."""
        try:
            sender = parse_name_addr(request.get("From") or "")
            contact = parse_name_addr((request.get("Contact") or "").split(",", 1)[0])
            remote_uri = _without_tag(request.get("From") or "")
            local_uri = _without_tag(request.get("To") or "")
            cseq = request.cseq[0]
        except SipSyntaxError as err:
            raise SubscribeRefused(400, "Malformed From, To, Contact or CSeq") from err
        if not sender.tag or not request.call_id:
            raise SubscribeRefused(400, "Missing From tag or Call-ID")
        routes = [v.strip() for value in request.get_all("Record-Route") for v in value.split(",") if v.strip()]
        return cls(event_package(request), resource, subscriber, request.call_id, sender.tag, remote_uri,
                   local_uri, str(contact.uri), routes, flow, cseq, now + expires)

    def matches(self, request: Request) -> bool:
        """Is this in-dialog request (a refresh or an end) ours?"""
        try:
            to_tag = parse_name_addr(request.get("To") or "").tag
            from_tag = parse_name_addr(request.get("From") or "").tag
        except SipSyntaxError:
            return False
        return request.call_id == self.call_id and to_tag == self.local_tag and from_tag == self.remote_tag

    def refresh(self, request: Request, now: float, *, minimum: int = MIN_EXPIRES,
                maximum: int = MAX_EXPIRES) -> int:
        """A SUBSCRIBE inside the dialog: the new expiry (0 ends the subscription)."""
        try:
            cseq = request.cseq[0]
        except SipSyntaxError as err:
            raise SubscribeRefused(400, "Malformed CSeq") from err
        if cseq <= self.remote_cseq:
            raise SubscribeRefused(500, "CSeq Out of Order")
        expires = granted_expires(request.get("Expires"), minimum=minimum, maximum=maximum)
        self.remote_cseq = cseq
        self.expires_at = now + expires
        try:
            contact = request.get("Contact")
            if contact:
                self.target = str(parse_name_addr(contact.split(",", 1)[0]).uri)  # §4.1.2.1: target refresh
        except SipSyntaxError:
            pass
        return expires

    def accept(self, request: Request, expires: int, contact: str) -> Response:
        """The 200 OK to a SUBSCRIBE (initial or refresh): our To tag, the granted Expires, our Contact."""
        return make_response(request, 200, "OK", to_tag=self.local_tag,
                             headers=[("Expires", str(expires)), ("Contact", contact)])

    def remaining(self, now: float) -> int:
        return max(0, int(self.expires_at - now + 0.5))

    def next_version(self) -> int:
        """The dialog-info version of the next document (RFC 4235 §4.1.2: one up per NOTIFY)."""
        self.version += 1
        return self.version

    def notify(self, via: str, contact: str, content_type: str, body: bytes, now: float, *,
               reason: str | None = None) -> Request:
        """The next NOTIFY: `Subscription-State: active;expires=N`, or `terminated;reason=...`
        when `reason` is given or the subscription has run out (after which it is over)."""
        remaining = self.remaining(now)
        if reason is None and remaining == 0:
            reason = "timeout"
        if reason is not None:
            state = f"terminated;reason={reason}"
            self.terminated = True
        else:
            state = f"active;expires={remaining}"
        self.cseq += 1
        self.last_body = body
        headers = [
            ("Via", via),
            ("Max-Forwards", "70"),
            *[("Route", r) for r in self.routes],
            ("From", f"{self.local_uri};tag={self.local_tag}"),
            ("To", f"{self.remote_uri};tag={self.remote_tag}"),
            ("Call-ID", self.call_id),
            ("CSeq", f"{self.cseq} NOTIFY"),
            ("Contact", contact),
            ("Event", self.event),
            ("Subscription-State", state),
            ("Content-Type", content_type),
        ]
        return Request("NOTIFY", self.target, headers, body)

    def next_deadline(self) -> float | None:
        return None if self.terminated else self.expires_at

    def expired(self, now: float) -> bool:
        return not self.terminated and now >= self.expires_at
