"""The bodies of the NOTIFYs the box sends (sans-I/O, pure functions).

- `application/dialog-info+xml` (RFC 4235) for the `dialog` event package: what a busy
  lamp (BLF) key shows. Each dialog carries its call-id and tags, so a handset can pick a
  ringing call up with `Replaces: <call-id>;to-tag=<local-tag>;from-tag=<remote-tag>;early-only`
  (RFC 3891); the box reads the call-id back (`edge.calls`).
- `application/pidf+xml` (RFC 3863, for presence RFC 3856): open or closed, with a note
  and the RPID `on-the-phone` activity (RFC 4480) during a call.
- `application/simple-message-summary` (RFC 3842) for `message-summary`.
"""

from __future__ import annotations

from dataclasses import dataclass

DIALOG_INFO = "application/dialog-info+xml"
PIDF = "application/pidf+xml"
MESSAGE_SUMMARY = "application/simple-message-summary"

DIALOG_STATES = ("trying", "proceeding", "early", "confirmed", "terminated")


@dataclass(frozen=True, slots=True)
class DialogView:
    """One dialog of the watched number, as a busy lamp sees it."""

    id: str
    call_id: str
    local_tag: str
    remote_tag: str
    direction: str
    """"initiator" (the watched number called) or "recipient" (it is being called)."""
    state: str
    """One of DIALOG_STATES."""
    local_identity: str
    """The watched number's URI (`sip:200@realm`)."""
    remote_identity: str
    """The other party's URI."""
    remote_display: str = ""


def dialog_info(entity: str, version: int, dialogs: list[DialogView], *, full: bool = True) -> bytes:
    """The dialog-info document of `entity` (`sip:200@realm`); `version` counts up from 0
    per subscription, one per NOTIFY (RFC 4235 §4.1.2)."""
    state = "full" if full else "partial"
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        f'<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info" version="{version}" '
        f'state="{state}" entity={_attr(entity)}>\n',
    ]
    for d in dialogs:
        if d.state not in DIALOG_STATES:
            raise ValueError(f"dialog state {d.state!r}")
        if d.direction not in ("initiator", "recipient"):
            raise ValueError(f"dialog direction {d.direction!r}")
        display = f" display={_attr(d.remote_display)}" if d.remote_display else ""
        parts.append(
            f'  <dialog id={_attr(d.id)} call-id={_attr(d.call_id)} local-tag={_attr(d.local_tag)} '
            f'remote-tag={_attr(d.remote_tag)} direction="{d.direction}">\n'
            f"    <state>{d.state}</state>\n"
            f"    <local><identity>{_text(d.local_identity)}</identity>"
            f"<target uri={_attr(d.local_identity)}/></local>\n"
            f"    <remote><identity{display}>{_text(d.remote_identity)}</identity>"
            f"<target uri={_attr(d.remote_identity)}/></remote>\n"
            "  </dialog>\n"
        )
    parts.append("</dialog-info>\n")
    return "".join(parts).encode()


def pidf(entity: str, basic_open: bool, note: str = "", *, on_the_phone: bool = False) -> bytes:
    """A presence document (RFC 3863) with one tuple: `open`/`closed` and a note; with
    `on_the_phone`, the RPID activity (RFC 4480) too, which softphones show as busy."""
    status = "open" if basic_open else "closed"
    note_xml = f"<note>{_text(note)}</note>" if note else ""
    person = ""
    if on_the_phone or note:
        activity = "<rpid:activities><rpid:on-the-phone/></rpid:activities>" if on_the_phone else ""
        dm_note = f"<dm:note>{_text(note)}</dm:note>" if note else ""
        person = f'  <dm:person id="p1">{activity}{dm_note}</dm:person>\n'
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<presence xmlns="urn:ietf:params:xml:ns:pidf" xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model" '
        f'xmlns:rpid="urn:ietf:params:xml:ns:pidf:rpid" entity={_attr(entity)}>\n'
        f'  <tuple id="t1"><status><basic>{status}</basic></status>{note_xml}</tuple>\n'
        f"{person}"
        "</presence>\n"
    ).encode()


def message_summary(account: str, waiting: bool = False, new: int = 0, old: int = 0) -> bytes:
    """RFC 3842 §5.2: `Messages-Waiting: yes|no`, the account, and the voice-message counts
    `new/old (urgent new/urgent old)`, always given (0/0 included: some handsets show the
    count only from this line, and clear it only when they read 0)."""
    if new < 0 or old < 0:
        raise ValueError("negative message count")
    lines = [
        f"Messages-Waiting: {'yes' if waiting else 'no'}",
        f"Message-Account: {account}",
        f"Voice-Message: {new}/{old} (0/0)",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


_TEXT_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_TEXT = str.maketrans(_TEXT_ESCAPES)
_ATTR = str.maketrans({**_TEXT_ESCAPES, '"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})


def _text(value: str) -> str:
    return value.translate(_TEXT)


def _attr(value: str) -> str:
    """An XML attribute value, quoted (xml.sax.saxutils.quoteattr would do, but importing
    it brings urllib, http and email: 8 ms and a few MB in the edge)."""
    return '"' + value.translate(_ATTR) + '"'
