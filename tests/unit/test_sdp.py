"""The SDP address rewrite, on bodies real user agents sent."""

from __future__ import annotations

import pytest

from appliance.sip.sdp import addresses, is_sdp, rewrite_address

# The media worker's answer (pjsua2 2.x, traced), CRLF line endings.
PJSUA2 = (
    b"v=0\r\n"
    b"o=- 4005398878 4005398879 IN IP4 127.0.0.1\r\n"
    b"s=pjmedia\r\n"
    b"b=AS:84\r\n"
    b"t=0 0\r\n"
    b"a=X-nat:0\r\n"
    b"m=audio 34850 RTP/AVP 0 120\r\n"
    b"c=IN IP4 127.0.0.1\r\n"
    b"b=TIAS:64000\r\n"
    b"a=rtcp:34851 IN IP4 127.0.0.1\r\n"
    b"a=sendrecv\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:120 telephone-event/8000\r\n"
    b"a=fmtp:120 0-16\r\n"
    b"a=ssrc:1060967204 cname:30c1835352fbee84\r\n"
)

# baresip 1.0.0 (Debian 12), its INVITE as captured: session-level c=, LF endings.
BARESIP = (
    b"v=0\n"
    b"o=- 1321463284 1338378792 IN IP4 192.0.2.2\n"
    b"s=-\n"
    b"c=IN IP4 192.0.2.2\n"
    b"t=0 0\n"
    b"a=tool:baresip 1.0.0\n"
    b"m=audio 42064 RTP/AVP 0 8 9 101\n"
    b"a=rtpmap:0 PCMU/8000\n"
    b"a=rtpmap:8 PCMA/8000\n"
    b"a=rtpmap:9 G722/8000\n"
    b"a=rtpmap:101 telephone-event/8000\n"
    b"a=fmtp:101 0-15\n"
    b"a=sendrecv\n"
    b"a=label:1\n"
    b"a=rtcp-rsize\n"
    b"a=ssrc:2629248472 cname:sip:300@127.0.0.1:43211\n"
    b"a=minptime:20\n"
    b"a=ptime:20\n"
)

# linphone (belle-sip's own test SDP): a user name in o=, audio and video.
LINPHONE = (
    b"v=0\r\n"
    b"o=jehan-mac 1239 1239 IN IP4 192.168.0.18\r\n"
    b"s=Talk\r\n"
    b"c=IN IP4 192.168.0.18\r\n"
    b"t=0 0\r\n"
    b"m=audio 7078 RTP/AVP 111 110 3 0 8 101\r\n"
    b"a=rtpmap:111 speex/16000\r\n"
    b"a=fmtp:111 vbr=on\r\n"
    b"a=rtpmap:110 speex/8000\r\n"
    b"a=fmtp:110 vbr=on\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-11\r\n"
    b"m=video 8078 RTP/AVP 99 97 98\r\n"
    b"a=rtpmap:99 MP4V-ES/90000\r\n"
    b"a=fmtp:99 profile-level-id=3\r\n"
    b"a=rtpmap:97 theora/90000\r\n"
    b"a=rtpmap:98 H263-1998/90000\r\n"
    b"a=fmtp:98 CIF=1;QCIF=1\r\n"
)


def test_pjsua2_answer_names_the_box() -> None:
    out = rewrite_address(PJSUA2, "127.0.0.1", "192.168.1.20")
    assert addresses(out) == ["192.168.1.20"] * 3  # o=, c= and a=rtcp:
    assert b"o=- 4005398878 4005398879 IN IP4 192.168.1.20\r\n" in out
    assert b"a=rtcp:34851 IN IP4 192.168.1.20\r\n" in out
    # Nothing else moved: the body is the same with the address swapped back.
    assert out.replace(b"192.168.1.20", b"127.0.0.1") == PJSUA2
    assert len(out) == len(PJSUA2) + 3 * (len("192.168.1.20") - len("127.0.0.1"))


@pytest.mark.parametrize("body, old", [(BARESIP, "192.0.2.2"), (LINPHONE, "192.168.0.18")])
def test_other_agents_bodies(body: bytes, old: str) -> None:
    out = rewrite_address(body, old, "10.0.0.1")
    assert addresses(out) == ["10.0.0.1", "10.0.0.1"]
    assert out.replace(b"10.0.0.1", old.encode()) == body  # line endings and the rest kept


def test_other_addresses_are_left_alone() -> None:
    assert rewrite_address(BARESIP, "127.0.0.1", "10.0.0.1") is BARESIP  # nothing matched: same object
    hold = PJSUA2.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 0.0.0.0")  # RFC 2543 hold
    out = rewrite_address(hold, "127.0.0.1", "10.0.0.1")
    assert b"c=IN IP4 0.0.0.0\r\n" in out and b"o=- 4005398878 4005398879 IN IP4 10.0.0.1" in out
    multicast = b"v=0\r\nc=IN IP4 224.2.1.1/127\r\nm=audio 5004 RTP/AVP 0\r\n"
    assert rewrite_address(multicast, "224.2.1.1", "10.0.0.1") is multicast
    # An address that only starts like ours is another address; a=tool or cname lines never count.
    other = PJSUA2.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 127.0.0.10")
    assert b"c=IN IP4 127.0.0.10\r\n" in rewrite_address(other, "127.0.0.1", "10.0.0.1")
    assert b"cname:sip:300@127.0.0.1:43211" in rewrite_address(BARESIP, "192.0.2.2", "10.0.0.1")


def test_address_type_follows_the_new_address() -> None:
    out = rewrite_address(PJSUA2, "127.0.0.1", "fd00::20")
    assert b"c=IN IP6 fd00::20\r\n" in out and b"IN IP6 fd00::20\r\n" in out
    back = rewrite_address(out, "fd00::20", "127.0.0.1")
    assert back == PJSUA2


def test_not_sdp_or_malformed() -> None:
    assert is_sdp("application/sdp") and is_sdp("Application/SDP; charset=utf-8")
    assert not is_sdp("multipart/mixed;boundary=x") and not is_sdp(None) and not is_sdp("")
    junk = b"c=IN\r\no=short line\r\nc=IN IP4\r\n\xff\xfe\r\n"
    assert rewrite_address(junk, "127.0.0.1", "10.0.0.1") is junk
    assert addresses(junk) == []
    assert rewrite_address(b"", "127.0.0.1", "10.0.0.1") == b""
