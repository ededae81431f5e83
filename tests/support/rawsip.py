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
    def __init__(self, server_port: int, transport: str = "udp", timeout: float = 3.0) -> None:
        self.server = ("127.0.0.1", server_port)
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
        self.send(self.request("REGISTER", "sip:home.arpa", number, headers=headers))
        first = self.recv()
        if first.status != 401:
            return first
        challenge = first.get("WWW-Authenticate") or ""
        auth = authorization_value(challenge, username=number, password=password, method="REGISTER",
                                   uri="sip:home.arpa", cnonce=os.urandom(4).hex())
        self.send(self.request("REGISTER", "sip:home.arpa", number,
                               headers=[*headers, ("Authorization", auth)]))
        return self.recv()
