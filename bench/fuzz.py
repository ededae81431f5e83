"""Mutation fuzzer: real SIP messages, mutated, thrown at the real daemon over UDP and TCP.

The corpus (bench/corpus/*.sip) holds messages as real clients send them: REGISTER, INVITE
with SDP, ACK, BYE, CANCEL, OPTIONS, SUBSCRIBE, MESSAGE and responses, in several
clients' styles. Each message sent is a corpus entry with one to three mutations: bit and
byte flips, header duplication and deletion, huge/negative/garbage Content-Length,
truncation, line-ending changes, NUL and non-ASCII bytes, garbage Via/To/From/CSeq/Call-ID,
two messages spliced, random method names. Over TCP several go down one connection, whole
or in pieces, and connections end with a close, a reset, or half a message then a reset.

Every `--check-every` messages an OPTIONS must be answered (`--liveness-ms`); at the end a
REGISTER with digest must succeed over UDP and TCP. Prints what was sent and what the
daemon did: exits, tracebacks and ERROR lines in its log, descriptors and RSS at start and
end. Seeded: one seed, one sequence of messages (timing aside). It is not a test;
tests/e2e/test_fuzz.py runs it briefly and asserts on the figures.

Fuzz traffic comes from random 127.x.y.z source addresses, so the auth-failure throttle
blocking one of them never silences the liveness checks (from 127.0.0.1). Nothing leaves
loopback: a response the daemon would relay statelessly (§16.11) to a Via that does not
name a 127.x address is not sent (counted as `skipped`).

    .venv/bin/python bench/fuzz.py [--seconds 50] [--count N] [--seed 1] [--transport both]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.ports import free_port  # noqa: E402
from appliance.sip.message import SipParseError  # noqa: E402
from bench.register import rss_kib  # noqa: E402
from tests.support.pbx import Daemon, user_block, write_config  # noqa: E402
from tests.support.rawsip import RawClient  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "corpus"
NUMBER, PASSWORD = "200", "fuzzpw"
ERROR_LINE = re.compile(r" (ERROR|CRITICAL) \S+: ")
_STATELESS = re.compile(rb"z9hg4bksl", re.IGNORECASE)  # edge/relay.py STATELESS_PREFIX, any case to be safe
_DOTTED = re.compile(rb"[0-9.]+")
_UVLOOP = importlib.util.find_spec("uvloop") is not None  # the daemon runs on it when it can
_CONTENT_LENGTH = re.compile(rb"^(content-length|l)[ \t]*:[ \t]*\d*", re.IGNORECASE | re.MULTILINE)


def load_corpus(directory: Path = CORPUS) -> list[bytes]:
    """The corpus files as wire messages: CRLF line ends, Content-Length set to the body's length.

    The files are kept with plain newlines (editors and git leave those alone) and without
    counting body bytes by hand.
    """
    messages = []
    for path in sorted(directory.glob("*.sip")):
        text = path.read_bytes()
        head, _, body = text.partition(b"\n\n")
        body = body.rstrip(b"\n")
        wire_body = body.replace(b"\n", b"\r\n") + (b"\r\n" if body else b"")
        wire_head = head.replace(b"\n", b"\r\n")
        length = str(len(wire_body)).encode()
        wire_head = _CONTENT_LENGTH.sub(lambda m, n=length: m.group(0).rstrip(b"0123456789") + n, wire_head)
        messages.append(wire_head + b"\r\n\r\n" + wire_body)
    return messages


# -- mutations ---------------------------------------------------------------------------------

GARBAGE_VALUES = [
    b"", b" ", b";", b",", b"<", b">", b"<sip:", b"sip:", b"sip:@", b"<sip:@>", b'"unterminated', b";tag=",
    b";tag=a;tag=b", b"<sip:200@home.arpa", b"<sip:200@[::1>", b"<sip:200@[::1]:99999>", b"<tel:+1>",
    b"SIP/2.0/UDP", b"SIP/2.0/UDP ", b"SIP/2.0/UDP [::1", b"SIP/2.0/UDP 127.0.0.1:99999999;rport",
    b"SIP/2.0/UDP 127.0.0.1:-1;branch=z9hG4bKx", b"SIP/2.0/UDP 127.0.0.1;branch=;rport=;received=",
    b"SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK;rport=abc", b"SIP/3.0/UDP 127.0.0.1", b"SIP/2.0/ 127.0.0.1",
    b"SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK" + b"a" * 3000, b"SIP/2.0/UDP 127.0.0.1;;;;;;;",
    b"SIP/2.0/UDP 127.0.0.1:5060 ;branch = z9hG4bK1 ; rport", b"0", b"-1", b"1", b"4294967296",
    b"99999999999999999999999", b"1 ", b" REGISTER", b"-1 REGISTER", b"99999999999999999999 INVITE",
    b"abc INVITE", b"1 INVITE extra", b"1\tBYE", b"%00", b"\x00", b"\xff\xfe", b"\xc3\x28", b"\xe2\x82",
    "Ωμέγα 😀".encode(), b"x" * 9000, b"a" * 300 + b"@" + b"b" * 300, b"<sip:200@home.arpa>;expires=-5",
    b"<sip:200@home.arpa>;expires=999999999999999999", b"*", b"*, <sip:200@127.0.0.1>", b"<*>",
    b"Digest", b"Digest ,,,,", b'Digest username="200", realm="home.arpa", nonce="', b"Basic abc",
    b'Digest username="200", realm="home.arpa", nonce="x", uri="sip:home.arpa", response="1", nc=zz',
]
METHODS = [b"REGISTER", b"INVITE", b"ACK", b"BYE", b"CANCEL", b"OPTIONS", b"SUBSCRIBE", b"NOTIFY", b"PRACK",
           b"UPDATE", b"INFO", b"MESSAGE", b"REFER", b"PUBLISH", b"register", b"INVITE ", b"", b"GET",
           b"FROBNICATE", b"X" * 200, b"INV\x00ITE", b"SIP/2.0", b"\xc3\xa9T\xc3\xa9"]
TARGETED = [b"Via", b"v", b"To", b"t", b"From", b"f", b"CSeq", b"Call-ID", b"i", b"Contact", b"m",
            b"Expires", b"Max-Forwards", b"Authorization", b"Proxy-Authorization", b"Route", b"Record-Route",
            b"Content-Type", b"Content-Length", b"l"]


def _split(data: bytes) -> tuple[list[bytes], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body if sep else b""


def _join(lines: list[bytes], body: bytes) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Mutator:
    """Seeded mutations of wire messages; each returns new bytes."""

    def __init__(self, rng: random.Random, corpus: list[bytes]) -> None:
        self.rng = rng
        self.corpus = corpus
        self.ops: list[Callable[[bytes], bytes]] = [
            self.bit_flips, self.byte_set, self.dup_header, self.delete_header, self.content_length,
            self.truncate, self.line_endings, self.non_ascii, self.garbage_header, self.garbage_header,
            self.splice, self.method, self.start_line, self.long_header, self.fold,
        ]

    def message(self) -> bytes:
        data = self.rng.choice(self.corpus)
        for _ in range(self.rng.choice((1, 1, 1, 2, 2, 3))):
            data = self.rng.choice(self.ops)(data)
        return data

    def _line_index(self, lines: list[bytes]) -> int:
        return self.rng.randrange(1, len(lines)) if len(lines) > 1 else 0

    def bit_flips(self, data: bytes) -> bytes:
        if not data:
            return data
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 8)):
            out[self.rng.randrange(len(out))] ^= 1 << self.rng.randrange(8)
        return bytes(out)

    def byte_set(self, data: bytes) -> bytes:
        if not data:
            return data
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            out[self.rng.randrange(len(out))] = self.rng.choice((0, 0xFF, 0x80, 0x0D, 0x0A, 0x3A, 0x3B, 0x22,
                                                                  0x3C, 0x20, self.rng.randrange(256)))
        return bytes(out)

    def dup_header(self, data: bytes) -> bytes:
        lines, body = _split(data)
        if len(lines) < 2:
            return data
        i = self._line_index(lines)
        copies = self.rng.choice((1, 1, 2, 50, 400))
        return _join(lines[: i + 1] + [lines[i]] * copies + lines[i + 1 :], body)

    def delete_header(self, data: bytes) -> bytes:
        lines, body = _split(data)
        if len(lines) < 2:
            return data
        del lines[self._line_index(lines)]
        return _join(lines, body)

    def content_length(self, data: bytes) -> bytes:
        lines, body = _split(data)
        lines = [line for line in lines if not re.match(rb"(?i)(content-length|l)\s*:", line)]
        value = self.rng.choice((b"-1", b"-999999", b"99999999", b"18446744073709551617", b"1e3", b"0x10",
                                 b" 5 5", b"", b"abc", b"+4", b"\xd9\xa3", str(len(body) + 1).encode(),
                                 str(max(0, len(body) - 3)).encode(), b"0", b"4294967295"))
        lines.append(b"Content-Length: " + value)
        if self.rng.random() < 0.3:
            lines.append(b"l: " + str(len(body)).encode())  # two disagreeing lengths
        return _join(lines, body)

    def truncate(self, data: bytes) -> bytes:
        return data[: self.rng.randrange(len(data) + 1)]

    def line_endings(self, data: bytes) -> bytes:
        choice = self.rng.randrange(5)
        if choice == 0:
            return data.replace(b"\r\n", b"\n")
        if choice == 1:
            return data.replace(b"\r\n", b"\r")
        if choice == 2:  # some lines one way, some the other
            return b"".join(p + self.rng.choice((b"\r\n", b"\n", b"\n\r")) for p in data.split(b"\r\n"))[:-2]
        if choice == 3:
            return b"\r\n" * self.rng.randint(1, 5) + data  # keep-alive CRLFs first
        return data.replace(b"\r\n\r\n", b"\r\n\r\n\r\n", 1)

    def non_ascii(self, data: bytes) -> bytes:
        at = self.rng.randrange(len(data) + 1)
        junk = self.rng.choice((b"\x00", b"\x00" * 10, b"\xff", b"\xc0\x80", "é".encode(), "😀".encode(),
                                b"\xed\xa0\x80", b"\x1b[31m", b"\x7f", "\u2028".encode()))
        return data[:at] + junk + data[at:]

    def garbage_header(self, data: bytes) -> bytes:
        lines, body = _split(data)
        name = self.rng.choice(TARGETED)
        value = self.rng.choice(GARBAGE_VALUES)
        for i, line in enumerate(lines[1:], 1):
            if line.split(b":", 1)[0].strip().lower() == name.lower():
                if self.rng.random() < 0.5:
                    lines[i] = line.split(b":", 1)[0] + b": " + value
                else:  # garbage appended to the real value
                    lines[i] = line + value
                return _join(lines, body)
        lines.insert(self._line_index(lines) or 1, name + b": " + value)
        return _join(lines, body)

    def splice(self, data: bytes) -> bytes:
        other = self.rng.choice(self.corpus)
        return data[: self.rng.randrange(len(data) + 1)] + other[self.rng.randrange(len(other) + 1) :]

    def method(self, data: bytes) -> bytes:
        lines, body = _split(data)
        parts = lines[0].split(b" ")
        new = self.rng.choice(METHODS) if self.rng.random() < 0.7 else bytes(
            self.rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-._!%*+`'~") for _ in range(self.rng.randint(1, 20)))
        if parts[0].startswith(b"SIP/"):  # a response: make it a request, or keep it one with a new method
            lines[0] = new + b" sip:home.arpa SIP/2.0"
        else:
            parts[0] = new
            lines[0] = b" ".join(parts)
        for i, line in enumerate(lines):  # the CSeq method too, sometimes
            if line.lower().startswith(b"cseq:") and self.rng.random() < 0.5:
                lines[i] = line.rsplit(b" ", 1)[0] + b" " + new
        return _join(lines, body)

    def start_line(self, data: bytes) -> bytes:
        lines, body = _split(data)
        lines[0] = self.rng.choice((
            b"SIP/2.0 0 Zero", b"SIP/2.0 999 Big", b"SIP/2.0 99999999999999999999 Huge", b"SIP/2.0 200",
            b"SIP/2.0 -1 Minus", b"SIP/2.0 abc OK", b"SIP/3.0 200 OK", b"SIP/2.0  200  OK", b"SIP/2.0 100 Trying",
            b"SIP/2.0 401 Unauthorized", b"SIP/2.0 487 Request Terminated", b"OPTIONS sip:home.arpa SIP/3.0",
            b"REGISTER  sip:home.arpa  SIP/2.0", b"REGISTER sip:home.arpa", b"REGISTER SIP/2.0",
            b"INVITE <sip:200@home.arpa> SIP/2.0", b"INVITE sip:%00@home.arpa SIP/2.0", b"INVITE tel:+1 SIP/2.0",
            b"BYE sip:[::1 SIP/2.0", b"INVITE sip:" + b"9" * 5000 + b"@home.arpa SIP/2.0", b"", b" ",
        ))
        return _join(lines, body)

    def long_header(self, data: bytes) -> bytes:
        lines, body = _split(data)
        size = self.rng.choice((1000, 8000, 16000, 17000, 70000))
        lines.insert(1, b"X-Long: " + b"y" * size)
        return _join(lines, body)

    def fold(self, data: bytes) -> bytes:
        """Obsolete line folding (§7.3.1) or a header line starting with white space."""
        lines, body = _split(data)
        if len(lines) < 2:
            return data
        i = self._line_index(lines)
        name, _, value = lines[i].partition(b":")
        lines[i : i + 1] = [name + b":", self.rng.choice((b" ", b"\t", b"   ")) + value]
        return _join(lines, body)


# -- safety: nothing leaves loopback -------------------------------------------------------------

def relays_off_loopback(data: bytes) -> bool:
    """True if the daemon might relay this (a datagram, or all a TCP connection carries) off loopback.

    A response whose top Via has the stateless branch is relayed (§16.11) to the address in
    the next Via. How the daemon frames a TCP stream of mutated messages is not ours to
    guess, so this looks at the bytes: with the branch prefix anywhere, any dotted quad
    outside 127/8 is refused. Host names are harmless on uvloop (it never resolves, it
    refuses); without uvloop a name would be looked up, so then nothing with the prefix goes.
    """
    if _STATELESS.search(data) is None:
        return False
    if not _UVLOOP:
        return True
    for run in _DOTTED.findall(data):
        parts = run.split(b".")
        if len(parts) == 4 and all(0 < len(p) <= 3 for p in parts) and parts[0] != b"127":
            return True
    return False


# -- the run ---------------------------------------------------------------------------------------

@dataclass
class Report:
    udp_sent: int = 0
    tcp_sent: int = 0
    tcp_connections: int = 0
    tcp_resets: int = 0
    skipped: int = 0
    answers: int = 0  # responses the fuzz sockets got back (UDP) or reads that returned data (TCP)
    checks: int = 0
    late: int = 0  # answered, but after the liveness limit
    unanswered: int = 0
    latency_max_ms: float = 0.0
    crashed: bool = False
    exit_code: int | None = None
    tracebacks: int = 0
    error_lines: list[str] = field(default_factory=list)
    traceback_kinds: dict[str, int] = field(default_factory=dict)  # signature -> how many
    traceback_examples: dict[str, str] = field(default_factory=dict)  # signature -> one whole traceback
    traceback_headers: dict[str, str] = field(default_factory=dict)  # its ERROR line -> signature
    fds_start: int = 0
    fds_end: int = 0
    rss_start_kib: int = 0
    rss_end_kib: int = 0
    register_udp: int | None = None
    register_tcp: int | None = None
    seconds: float = 0.0

    @property
    def fd_growth(self) -> int:
        return self.fds_end - self.fds_start

    def lines(self) -> list[str]:
        total = self.udp_sent + self.tcp_sent
        return [
            f"messages fuzzed: {total} in {self.seconds:.1f} s (UDP {self.udp_sent}, TCP {self.tcp_sent} over "
            f"{self.tcp_connections} connections, {self.tcp_resets} ended by a reset; {self.skipped} skipped: "
            f"would be relayed off loopback); the daemon answered {self.answers}",
            f"daemon: {'EXITED with ' + str(self.exit_code) if self.crashed else 'alive'}; "
            f"tracebacks {self.tracebacks}; ERROR lines {len(self.error_lines)}",
            f"liveness: {self.checks} OPTIONS checks, {self.late} late, {self.unanswered} unanswered, "
            f"slowest {self.latency_max_ms:.0f} ms",
            f"final REGISTER with digest: UDP {self.register_udp}, TCP {self.register_tcp}",
            f"descriptors: {self.fds_start} at start, {self.fds_end} at end ({self.fd_growth:+d})",
            f"RSS: {self.rss_start_kib / 1024:.1f} MB at start, {self.rss_end_kib / 1024:.1f} MB at end",
        ]


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def random_loopback(rng: random.Random) -> str:
    """A source address in 127/8 other than 127.0.0.1 (the liveness checks' own)."""
    return f"127.{rng.randrange(1, 255)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


class Liveness:
    """OPTIONS from 127.0.0.1 over UDP: the daemon must answer within `limit` seconds."""

    def __init__(self, port: int, limit: float, report: Report) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.server = ("127.0.0.1", port)
        self.limit = limit
        self.report = report
        self.seq = 0

    def check(self, patience: float = 5.0) -> bool:
        """True if answered at all (within `patience`); late answers are counted apart."""
        self.seq += 1
        me = self.sock.getsockname()[1]
        options = (
            f"OPTIONS sip:home.arpa SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bKlive{self.seq};rport\r\n"
            f"From: <sip:live@home.arpa>;tag=live\r\nTo: <sip:home.arpa>\r\nCall-ID: live-{me}\r\n"
            f"CSeq: {self.seq} OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        self.report.checks += 1
        sent = time.monotonic()
        self.sock.sendto(options, self.server)
        deadline = sent + patience
        want = f"z9hG4bKlive{self.seq};".encode()
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                break
            if data.startswith(b"SIP/2.0 200") and want in data:
                took = time.monotonic() - sent
                self.report.latency_max_ms = max(self.report.latency_max_ms, took * 1000)
                if took > self.limit:
                    self.report.late += 1
                return True
        self.report.unanswered += 1
        return False


class UdpFuzzer:
    """Mutated datagrams from a rotating set of 127.x source addresses."""

    def __init__(self, port: int, rng: random.Random, report: Report) -> None:
        self.server = ("127.0.0.1", port)
        self.rng = rng
        self.report = report
        self.socks: list[socket.socket] = []

    def _sock(self) -> socket.socket:
        if len(self.socks) < 8 or self.rng.random() < 0.02:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((random_loopback(self.rng), 0))
            sock.setblocking(False)
            self.socks.append(sock)
            if len(self.socks) > 8:
                self.socks.pop(0).close()
        return self.rng.choice(self.socks)

    def send(self, data: bytes) -> None:
        sock = self._sock()
        try:
            sock.sendto(data[:65507], self.server)
        except (BlockingIOError, ConnectionRefusedError):
            pass
        self.drain()

    def drain(self) -> None:
        for sock in self.socks:
            while True:
                try:
                    sock.recv(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                self.report.answers += 1

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def tcp_session(port: int, rng: random.Random, messages: list[bytes], report: Report) -> None:
    """One connection: the messages whole or in pieces, then a close, a reset, or a torn message."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((random_loopback(rng), 0))
        sock.settimeout(1.0)
        sock.connect(("127.0.0.1", port))
        report.tcp_connections += 1
        stream = b"".join(messages)
        ending = rng.randrange(4)
        if ending == 3:  # the last message torn in half
            stream = stream[: len(stream) - rng.randrange(1, max(2, len(messages[-1])))]
        if rng.random() < 0.5:
            sock.sendall(stream)
        else:
            at = 0
            while at < len(stream):
                step = rng.choice((1, 7, 64, 500, 1400))
                sock.sendall(stream[at : at + step])
                at += step
        report.tcp_sent += len(messages)
        # One connection in ten waits a moment for the answers, so the daemon writes to a
        # live peer as well as to one that is gone.
        sock.settimeout(0.02 if rng.random() < 0.1 else 0.0)
        try:
            while sock.recv(65535):
                report.answers += 1
        except (TimeoutError, BlockingIOError, ConnectionError):
            pass
        if ending >= 2:
            # SO_LINGER 0: close() sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            report.tcp_resets += 1
        elif ending == 1:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the daemon may close on garbage; that is its right
    finally:
        sock.close()


def final_register(port: int, transport: str) -> int | None:
    client = RawClient(port, transport, timeout=3.0)
    try:
        return client.register(NUMBER, PASSWORD).status
    except (OSError, ConnectionError, SipParseError):
        return None
    finally:
        client.close()


def fuzz(*, seconds: float, count: int | None, seed: int, transport: str = "both", check_every: int = 100,
         liveness_ms: float = 200.0, tcp_share: float = 0.4, say: Callable[[str], None] = print,
         log_path: Path | None = None) -> Report:
    """Start a daemon, fuzz it, and return what happened (the daemon is stopped after)."""
    rng = random.Random(seed)
    corpus = load_corpus()
    mutator = Mutator(rng, corpus)
    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = write_config(Path(tmp), port, [user_block(NUMBER, PASSWORD, one_number=True)], qualify_interval=0,
                              extra="[media]\nmax_calls = 0\nmin_idle = 0\n\n")
        daemon = Daemon(config, port).start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        try:
            liveness = Liveness(port, liveness_ms / 1000, report)
            liveness.check()
            time.sleep(0.2)
            report.fds_start, report.rss_start_kib = fd_count(pid), rss_kib(pid)
            phases = {"udp": ["udp"], "tcp": ["tcp"], "both": ["udp", "tcp"]}[transport]
            shares = {"udp": 1.0 - tcp_share, "tcp": tcp_share} if len(phases) == 2 else {phases[0]: 1.0}
            started = time.monotonic()
            for phase in phases:
                phase_end = time.monotonic() + seconds * shares[phase]
                budget = None if count is None else int(count * shares[phase])
                say(f"{phase.upper()}: fuzzing for {seconds * shares[phase]:.0f} s"
                    + (f" or {budget} messages" if budget is not None else ""))
                _phase(phase, port, rng, mutator, liveness, report, phase_end, budget, check_every)
                if not daemon.alive():
                    break
            report.seconds = time.monotonic() - started
            if daemon.alive():
                liveness.check()
                report.register_udp = final_register(port, "udp")
                report.register_tcp = final_register(port, "tcp")
                time.sleep(0.5)  # the daemon sees the last connections go
                report.fds_end, report.rss_end_kib = fd_count(pid), rss_kib(pid)
            liveness.sock.close()
        finally:
            report.crashed = not daemon.alive()
            report.exit_code = daemon.stop()
            lines = daemon.lines
            if log_path is not None:
                log_path.write_text("\n".join(lines) + "\n")
            report.error_lines = [line for line in lines if ERROR_LINE.search(line)]
            _tracebacks(lines, report)
    return report


def _tracebacks(lines: list[str], report: Report) -> None:
    """Count the tracebacks in the log (a chain counts once), grouped by signature: the
    innermost frame and the exception of the last traceback in the chain."""
    i = 0
    while i < len(lines):
        if "Traceback (most recent call last)" not in lines[i]:
            i += 1
            continue
        start, frame, exception = i, "", "?"
        i += 1
        while i < len(lines):
            line = lines[i]
            if line.startswith(" "):
                if line.lstrip().startswith("File "):
                    frame = line.strip()
            elif not line or line.startswith(("During handling", "The above exception", "Traceback (most")):
                pass
            else:
                exception = line
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                if not (nxt == "" and i + 2 < len(lines) and lines[i + 2].startswith(("During", "The above"))):
                    i += 1
                    break
            i += 1
        report.tracebacks += 1
        signature = f"{frame} -> {exception}"
        report.traceback_kinds[signature] = report.traceback_kinds.get(signature, 0) + 1
        report.traceback_examples.setdefault(signature, "\n".join(lines[max(0, start - 1) : i]))
        for head in lines[max(0, start - 3) : start]:  # asyncio puts a "handle:" line in between
            if ERROR_LINE.search(head):
                report.traceback_headers[head] = signature


def _phase(phase: str, port: int, rng: random.Random, mutator: Mutator, liveness: Liveness, report: Report,
           end: float, budget: int | None, check_every: int) -> None:
    sent = 0
    since_check = 0
    udp = UdpFuzzer(port, rng, report) if phase == "udp" else None
    try:
        while time.monotonic() < end and (budget is None or sent < budget):
            if phase == "udp":
                assert udp is not None
                data = mutator.message()
                if relays_off_loopback(data):
                    report.skipped += 1
                    continue
                udp.send(data)
                report.udp_sent += 1
                n = 1
            else:
                batch = [mutator.message() for _ in range(rng.choice((1, 2, 3, 5, 8)))]
                if relays_off_loopback(b"".join(batch)):  # keep the rest of the batch if that is enough
                    kept = [m for m in batch if _STATELESS.search(m) is None]
                    report.skipped += len(batch) - len(kept)
                    batch = kept
                if not batch or relays_off_loopback(b"".join(batch)):
                    report.skipped += len(batch)
                    continue
                tcp_session(port, rng, batch, report)
                n = len(batch)
            sent += n
            since_check += n
            if since_check >= check_every:
                since_check = 0
                if not liveness.check():
                    return  # stalled or gone: the report says which
    finally:
        if udp is not None:
            udp.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=50.0, help="fuzzing time in all (default 50)")
    parser.add_argument("--count", type=int, default=None, help="stop after this many messages in all")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--transport", choices=("udp", "tcp", "both"), default="both")
    parser.add_argument("--tcp-share", type=float, default=0.4, help="share of time and count for TCP (both)")
    parser.add_argument("--check-every", type=int, default=100, help="messages between liveness checks")
    parser.add_argument("--liveness-ms", type=float, default=200.0, help="an OPTIONS answered later is late")
    parser.add_argument("--log", type=Path, default=None, help="write the daemon's whole log here")
    args = parser.parse_args()
    report = fuzz(seconds=args.seconds, count=args.count, seed=args.seed, transport=args.transport,
                  check_every=args.check_every, liveness_ms=args.liveness_ms, tcp_share=args.tcp_share,
                  log_path=args.log)
    for line in report.lines():
        print(line)
    for signature, n in report.traceback_kinds.items():
        print(f"\n{n} traceback(s) ending: {signature}\n{report.traceback_examples[signature]}")
    other = [line for line in report.error_lines if "Exception in callback" not in line]
    for line in other[:10]:
        print("ERROR line:", line)


if __name__ == "__main__":
    main()
