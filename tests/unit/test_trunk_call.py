"""The provider's leg of a call out, sans-I/O: a Fork that answers the provider's 407 with the
trunk's credentials (appliance.sip.proxy + appliance.sip.trunk_call), and the G.711 offer."""

from __future__ import annotations

from appliance.sip.auth import parse_digest
from appliance.sip.headers import parse_via
from appliance.sip.invite_transaction import Send
from appliance.sip.message import Request, Response, make_response, parse_message
from appliance.sip.proxy import Fork, ForkAction, ForkEvent, ForkSettings, Target
from appliance.sip.trunk_call import credentials, g711_only

T0 = 100.0
SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 4000 RTP/AVP 9 0 8 101\r\na=rtpmap:9 G722/8000\r\na=rtpmap:0 PCMU/8000\r\n"
       b"a=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n")
CHALLENGE = 'Digest realm="sip.example.net", nonce="abc123", qop="auth", algorithm=MD5'


def worker_invite() -> Request:
    text = ("INVITE sip:4930999@127.0.0.1:5060 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:40000;branch=z9hG4bKworker1;rport\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:4930123456@sip.example.net>;tag=wtag\r\n"
            "To: <sip:4930999@127.0.0.1:5060>\r\nCall-ID: out-1\r\nCSeq: 7 INVITE\r\n"
            "Contact: <sip:media@127.0.0.1:40000>\r\nX-Homepbx-Token: t1\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n")
    msg = parse_message(text.encode() + SDP)
    assert isinstance(msg, Request)
    return msg


def via_for(t: Target[str], branch: str) -> str:
    return f"SIP/2.0/UDP 192.0.2.1:5060;branch={branch};rport"


def sent_invites(actions: list[ForkAction[str]]) -> list[Request]:
    out = []
    for a in actions:
        if isinstance(a, Send) and a.dest == "provider":
            msg = parse_message(a.data)
            if isinstance(msg, Request) and msg.method == "INVITE":
                out.append(msg)
    return out


def branch_of(request: Request) -> str:
    return parse_via(request.get("Via") or "").branch or ""


def upstream(actions: list[ForkAction[str]]) -> list[Response]:
    out = []
    for a in actions:
        if isinstance(a, Send) and a.dest == "worker":
            msg = parse_message(a.data)
            assert isinstance(msg, Response)
            out.append(msg)
    return out


def challenge_to(invite: Request) -> Response:
    return make_response(invite, 407, "Proxy Authentication Required", to_tag="prov",
                         headers=[("Proxy-Authenticate", CHALLENGE)])


def fork_to_provider() -> tuple[Fork[str], Request]:
    fork: Fork[str] = Fork(
        worker_invite(), "worker", False, ForkSettings(180.0), T0, via_for=via_for,
        authorize=lambda invite, challenge: credentials(invite, challenge, username="4930123456",
                                                        password="pw", cnonce="c1"))
    (invite,) = sent_invites(fork.start([Target("", "sip:4930999@sip.example.net", "provider", False)], T0))
    return fork, invite


def test_a_challenge_is_answered_with_credentials_and_a_new_cseq() -> None:
    fork, first = fork_to_provider()
    assert first.cseq == (7, "INVITE") and "X-Homepbx-Token" not in first.to_bytes().decode()
    actions = fork.on_response(branch_of(first), challenge_to(first), T0 + 0.05)
    assert not upstream(actions)  # the worker never sees the challenge
    acks = [a for a in actions if isinstance(a, Send) and a.data.startswith(b"ACK ")]
    assert len(acks) == 1  # the 407 is ACKed (hop by hop)
    (retry,) = sent_invites(actions)
    assert retry.cseq == (8, "INVITE")
    assert (retry.call_id, retry.get("From")) == (first.call_id, first.get("From"))
    assert branch_of(retry) != branch_of(first)
    digest = parse_digest(retry.get("Proxy-Authorization") or "")
    assert digest is not None and digest["username"] == "4930123456" and digest["uri"] == retry.uri
    # The provider's 200 goes to the worker with the worker's own CSeq.
    ok = make_response(retry, 200, "OK", to_tag="far")
    (answer,) = upstream(fork.on_response(branch_of(retry), ok, T0 + 1.0))
    assert answer.status == 200 and answer.cseq == (7, "INVITE")


def test_credentials_refused_is_403_upstream_never_a_challenge() -> None:
    fork, first = fork_to_provider()
    (retry,) = sent_invites(fork.on_response(branch_of(first), challenge_to(first), T0))
    actions = fork.on_response(branch_of(retry), challenge_to(retry), T0 + 0.1)
    assert not sent_invites(actions)  # only once
    (final,) = upstream(actions)
    assert final.status == 403 and final.get("Proxy-Authenticate") is None
    assert ForkEvent("failed", status=403) in actions


def test_the_offer_to_the_provider_is_g711_only() -> None:
    body = g711_only(SDP).decode()
    assert "m=audio 4000 RTP/AVP 0 8 101\r\n" in body
    assert "G722" not in body and "a=fmtp:101 0-16" in body and body.endswith("a=sendrecv\r\n")
    only_g722 = SDP.replace(b"RTP/AVP 9 0 8 101", b"RTP/AVP 9")
    assert g711_only(only_g722) == only_g722  # nothing we could keep: left to the provider to refuse


def test_only_the_audio_section_is_cut() -> None:
    """A text (T.140) or video stream after the audio keeps its own rtpmap lines: a dynamic
    payload type without one is a malformed offer (a handset answers 400 Bad SDP)."""
    sdp = ("v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
           "m=audio 4000 RTP/AVP 9 8 0 101 98\r\na=rtpmap:9 G722/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
           "a=fmtp:101 0-16\r\na=rtpmap:98 opus/48000/2\r\n"
           "m=text 4002 RTP/AVP 98 100\r\na=rtpmap:98 t140/1000\r\na=rtpmap:100 red/1000\r\na=fmtp:100 98/98/98\r\n")
    body = g711_only(sdp.encode()).decode()
    audio, text = body.split("m=text")
    assert "m=audio 4000 RTP/AVP 8 0 101\r\n" in audio
    assert "G722" not in audio and "opus" not in audio and "a=rtpmap:101 telephone-event/8000" in audio
    assert text == " 4002 RTP/AVP 98 100\r\na=rtpmap:98 t140/1000\r\na=rtpmap:100 red/1000\r\na=fmtp:100 98/98/98\r\n"
