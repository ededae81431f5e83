"""The media worker reads the A-leg's offered codecs, so its own offers (the B-leg, a
transfer) lead with the caller's codec and the common case needs no transcoding."""

from __future__ import annotations

from appliance.media.worker import offered_codecs


def offer(payloads: str, *rtpmaps: str) -> str:
    lines = ["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0",
             f"m=audio 4000 RTP/AVP {payloads}", *(f"a=rtpmap:{m}" for m in rtpmaps)]
    return "\r\n".join(lines) + "\r\n"


def test_g722_is_read_from_its_8000_rtp_clock() -> None:
    # RFC 3551: G.722's rtpmap says 8000 though the audio is 16 kHz; it was read as an
    # unknown codec, so the B-leg led with PCMU for a G.722-only caller.
    assert offered_codecs(offer("9 101", "9 G722/8000", "101 telephone-event/8000")) == ["G722/16000"]
    assert offered_codecs(offer("8 9 0", "8 PCMA/8000", "9 G722/8000")) == ["PCMA/8000", "G722/16000", "PCMU/8000"]


def test_static_payloads_without_rtpmap_and_others_ignored() -> None:
    assert offered_codecs(offer("0 9 8 3")) == ["PCMU/8000", "G722/16000", "PCMA/8000"]
    assert offered_codecs(offer("96 0", "96 opus/48000/2")) == ["PCMU/8000"]
    assert offered_codecs("v=0\r\nm=video 5000 RTP/AVP 96\r\n") == []
