"""The notifier's SUBSCRIBE dialog (RFC 6665) and the NOTIFY bodies (RFC 4235, 3863, 3842), sans-I/O."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from appliance.sip.event_bodies import DialogView, dialog_info, message_summary, pidf
from appliance.sip.message import Request, parse_message
from appliance.sip.registrar import Flow
from appliance.sip.subscription import SubscribeRefused, Subscription, event_package, granted_expires

FLOW = Flow("udp", "192.0.2.30", 5062, "127.0.0.1:5060")
NS = {"d": "urn:ietf:params:xml:ns:dialog-info", "p": "urn:ietf:params:xml:ns:pidf",
      "dm": "urn:ietf:params:xml:ns:pidf:data-model", "rpid": "urn:ietf:params:xml:ns:pidf:rpid"}


def subscribe(cseq: int = 1, expires: str | None = "600", to_tag: str = "", event: str = "dialog") -> Request:
    text = (f"SUBSCRIBE sip:200@home.arpa SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.30:5062;branch=z9hG4bKs{cseq}\r\n"
            "From: \"Kid\" <sip:300@home.arpa>;tag=abc\r\n"
            f"To: <sip:200@home.arpa>{';tag=' + to_tag if to_tag else ''}\r\n"
            f"Call-ID: sub1\r\nCSeq: {cseq} SUBSCRIBE\r\nContact: <sip:300@192.0.2.30:5062>\r\n"
            f"Event: {event};id=7\r\n" + (f"Expires: {expires}\r\n" if expires is not None else "")
            + "Content-Length: 0\r\n\r\n")
    message = parse_message(text.encode())
    assert isinstance(message, Request)
    return message


def test_expires_granted_refused_and_capped() -> None:
    assert granted_expires(None) == 3600
    assert granted_expires("0") == 0
    assert granted_expires("100000") == 3600
    assert granted_expires("120") == 120
    with pytest.raises(SubscribeRefused) as brief:
        granted_expires("30")
    assert brief.value.status == 423 and ("Min-Expires", "60") in brief.value.headers
    with pytest.raises(SubscribeRefused) as bad:
        granted_expires("soon")
    assert bad.value.status == 400


def test_event_package_drops_parameters() -> None:
    assert event_package(subscribe(event="Dialog")) == "dialog"


def test_dialog_refresh_unsubscribe_and_notify_headers() -> None:
    request = subscribe()
    sub = Subscription.from_subscribe(request, "200", "300", FLOW, 600, now=100.0)
    ok = sub.accept(request, 600, "<sip:200@127.0.0.1:5060>")
    assert ok.status == 200 and ok.get("Expires") == "600" and f"tag={sub.local_tag}" in (ok.get("To") or "")
    first = sub.notify("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKn1", "<sip:200@127.0.0.1:5060>",
                       "application/dialog-info+xml", b"x", now=100.0)
    assert first.uri == "sip:300@192.0.2.30:5062"
    assert first.get("Subscription-State") == "active;expires=600"
    assert first.get("From") == f"<sip:200@home.arpa>;tag={sub.local_tag}"
    assert first.get("To") == '"Kid" <sip:300@home.arpa>;tag=abc'
    assert first.get("CSeq") == "1 NOTIFY" and first.get("Event") == "dialog"
    assert sub.next_deadline() == 700.0

    refresh = subscribe(cseq=2, expires="300", to_tag=sub.local_tag)
    assert sub.matches(refresh) and not sub.matches(subscribe(cseq=2, to_tag="other"))
    assert sub.refresh(refresh, now=400.0) == 300
    assert sub.next_deadline() == 700.0 and sub.remaining(650.0) == 50
    with pytest.raises(SubscribeRefused):  # an old CSeq
        sub.refresh(subscribe(cseq=2, to_tag=sub.local_tag), now=401.0)

    assert sub.refresh(subscribe(cseq=3, expires="0", to_tag=sub.local_tag), now=500.0) == 0
    last = sub.notify("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKn2", "<sip:200@127.0.0.1:5060>",
                      "application/dialog-info+xml", b"x", now=500.0)
    assert last.get("Subscription-State") == "terminated;reason=timeout"
    assert last.get("CSeq") == "2 NOTIFY"
    assert sub.terminated and sub.next_deadline() is None


def test_expiry_is_the_deadline() -> None:
    sub = Subscription.from_subscribe(subscribe(), "200", "300", FLOW, 60, now=0.0)
    assert not sub.expired(59.9) and sub.expired(60.0)


def test_a_subscribe_without_a_from_tag_is_refused() -> None:
    request = subscribe()
    request.set("From", "<sip:300@home.arpa>")
    with pytest.raises(SubscribeRefused) as refused:
        Subscription.from_subscribe(request, "200", "300", FLOW, 60, now=0.0)
    assert refused.value.status == 400


def test_dialog_info_document() -> None:
    early = DialogView("t1", "t1", "t1-l", "t1-r", "recipient", "early", "sip:200@home.arpa", "sip:100@home.arpa",
                       remote_display="Mum & Dad")
    root = ET.fromstring(dialog_info("sip:200@home.arpa", 3, [early]))
    assert root.get("version") == "3" and root.get("state") == "full" and root.get("entity") == "sip:200@home.arpa"
    dialog = root.find("d:dialog", NS)
    assert dialog is not None
    assert (dialog.get("call-id"), dialog.get("local-tag"), dialog.get("remote-tag"), dialog.get("direction")) == \
        ("t1", "t1-l", "t1-r", "recipient")
    assert dialog.findtext("d:state", namespaces=NS) == "early"
    assert dialog.findtext("d:remote/d:identity", namespaces=NS) == "sip:100@home.arpa"
    assert ET.fromstring(dialog_info("sip:200@home.arpa", 0, [])).find("d:dialog", NS) is None  # idle
    with pytest.raises(ValueError):
        dialog_info("sip:200@home.arpa", 0, [DialogView("t", "t", "l", "r", "sideways", "early", "a", "b")])


def test_pidf_and_message_summary() -> None:
    root = ET.fromstring(pidf("sip:200@home.arpa", True, "On the phone", on_the_phone=True))
    assert root.findtext("p:tuple/p:status/p:basic", namespaces=NS) == "open"
    assert root.findtext("p:tuple/p:note", namespaces=NS) == "On the phone"
    assert root.find("dm:person/rpid:activities/rpid:on-the-phone", NS) is not None
    closed = ET.fromstring(pidf("sip:200@home.arpa", False))
    assert closed.findtext("p:tuple/p:status/p:basic", namespaces=NS) == "closed"
    assert closed.find("dm:person", NS) is None


def test_message_summary_body_rfc3842() -> None:
    assert message_summary("sip:100@home.arpa") == (
        b"Messages-Waiting: no\r\nMessage-Account: sip:100@home.arpa\r\nVoice-Message: 0/0 (0/0)\r\n")
    assert message_summary("sip:100@home.arpa", waiting=True, new=2, old=1) == (
        b"Messages-Waiting: yes\r\nMessage-Account: sip:100@home.arpa\r\nVoice-Message: 2/1 (0/0)\r\n")
    # Heard messages kept: the lamp is dark, the count of old ones still shown.
    assert message_summary("sip:100@home.arpa", waiting=False, new=0, old=3).endswith(b"Voice-Message: 0/3 (0/0)\r\n")
    with pytest.raises(ValueError):
        message_summary("sip:100@home.arpa", new=-1)
