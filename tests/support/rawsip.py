"""A minimal SIP client on raw sockets: sends exactly the bytes a test wants to see answered.

Handsets (pjsua2) never send malformed messages; this does, and lets tests read every
byte of the answer.
"""

from __future__ import annotations

import os
import socket

from appliance.sip.auth import authorization_value
from appliance.sip.message import Response, parse_message


class RawClient:
    def __init__(self, server_port: int, transport: str = "udp", timeout: float = 3.0,
                 user_agent: str | None = None) -> None:
        self.server = ("127.0.0.1", server_port)
        self.user_agent = user_agent
        self.transport = transport
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.settimeout(timeout)
        if transport == "udp":
            self.sock.bind(("127.0.0.1", 0))
        else:
            self.sock.connect(self.server)
        self.port = int(self.sock.getsockname()[1])
        self._buffer = b""
        self.cseq = 0
        self.call_id = os.urandom(8).hex()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        if self.transport == "udp":
            self.sock.sendto(data, self.server)
        else:
            self.sock.sendall(data)

    def recv(self) -> Response:
        """The next response (requests sent to us, e.g. qualify OPTIONS, are skipped)."""
        while True:
            data = self.recv_raw()
            message = parse_message(data)
            if isinstance(message, Response):
                return message

    def recv_raw(self) -> bytes:
        if self.transport == "udp":
            return self.sock.recv(65535)
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = self._buffer[:end].decode()
                length = 0
                for line in head.split("\r\n"):
                    if line.lower().startswith(("content-length:", "l:")):
                        length = int(line.split(":", 1)[1])
                total = end + 4 + length
                if len(self._buffer) >= total:
                    data, self._buffer = self._buffer[:total], self._buffer[total:]
                    return data
            chunk = self.sock.recv(65535)
            if not chunk:
                raise ConnectionError("closed")
            self._buffer += chunk

    def request(self, method: str, uri: str, number: str, *, headers: list[tuple[str, str]] = (),
                body: bytes = b"", to_number: str | None = None) -> bytes:
        self.cseq += 1
        proto = self.transport.upper()
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/{proto} 127.0.0.1:{self.port};branch=z9hG4bK{os.urandom(6).hex()};rport",
            "Max-Forwards: 70",
            f"From: <sip:{number}@home.arpa>;tag={self.call_id[:8]}",
            f"To: <sip:{to_number or number}@home.arpa>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} {method}",
            *([f"User-Agent: {self.user_agent}"] if self.user_agent else []),
            *[f"{k}: {v}" for k, v in headers],
            f"Content-Length: {len(body)}",
            "",
            "",
        ]
        return "\r\n".join(lines).encode() + body

    def register(self, number: str, password: str, *, expires: int = 300,
                 contact: str | None = None) -> Response:
        """REGISTER with the digest round trip; returns the final response."""
        contact = contact or f"<sip:{number}@127.0.0.1:{self.port};transport={self.transport}>"
        headers = [("Contact", contact), ("Expires", str(expires))]
        return self._with_auth("REGISTER", "sip:home.arpa", number, password, headers, b"", None)

    def invite_with_auth(self, to_number: str, number: str, password: str, *, body: bytes = b"") -> Response:
        """INVITE with the 407 round trip (the 407 ACKed); returns the first final response."""
        headers = [("Contact", f"<sip:{number}@127.0.0.1:{self.port}>"), ("Content-Type", "application/sdp")]
        return self._with_auth("INVITE", f"sip:{to_number}@home.arpa", number, password, headers, body,
                               to_number)

    def final(self) -> Response:
        response = self.recv()
        while response.status < 200:
            response = self.recv()
        return response

    def ack(self, invite: bytes, response: Response) -> None:
        """ACK a non-2xx final: same branch as the INVITE (RFC 3261 §17.1.1.3)."""
        text = invite.decode()
        head = text.split("\r\n\r\n", 1)[0].split("\r\n")
        keep = [line for line in head[1:] if line.split(":", 1)[0] in ("Via", "From", "Call-ID", "Max-Forwards")]
        cseq = int(next(line for line in head if line.startswith("CSeq:")).split()[1])
        lines = [head[0].replace("INVITE", "ACK", 1), *keep, f"To: {response.get('To')}", f"CSeq: {cseq} ACK",
                 "Content-Length: 0", "", ""]
        self.send("\r\n".join(lines).encode())

    def _with_auth(self, method: str, uri: str, number: str, password: str, headers: list[tuple[str, str]],
                   body: bytes, to_number: str | None) -> Response:
        proxy = method != "REGISTER"
        first_request = self.request(method, uri, number, headers=headers, body=body, to_number=to_number)
        self.send(first_request)
        first = self.final()
        if method == "INVITE":
            self.ack(first_request, first)
        if first.status not in (401, 407):
            return first
        challenge = first.get("Proxy-Authenticate" if proxy else "WWW-Authenticate") or ""
        auth = authorization_value(challenge, username=number, password=password, method=method,
                                   uri=uri, cnonce=os.urandom(4).hex())
        name = "Proxy-Authorization" if proxy else "Authorization"
        second_request = self.request(method, uri, number, headers=[*headers, (name, auth)], body=body,
                                      to_number=to_number)
        self.send(second_request)
        final = self.final()
        if method == "INVITE" and final.status >= 300:
            self.ack(second_request, final)
        return final
