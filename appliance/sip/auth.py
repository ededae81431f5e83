"""HTTP Digest authentication for SIP (RFC 3261 §22, RFC 7616, RFC 8760).

Sans-I/O: no sockets, no clocks. Callers pass ``now`` (seconds, any monotonic
or wall clock, used consistently) and get plain values back.

Server side: :class:`NonceManager` issues stateless, HMAC-signed nonces bound to
the user they were issued for; :func:`challenge_values` builds the
WWW-Authenticate/Proxy-Authenticate values; :func:`verify` checks an
Authorization value parsed with :func:`parse_credentials`.

Client side: :func:`authorization_value` answers a challenge (tests, load
generators).

Only ``qop=auth`` with MD5 or SHA-256 is accepted: ``auth-int`` needs the body
and ``-sess`` variants add nothing for a PBX, so both are refused rather than
half-supported.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import struct
from collections import deque
from collections.abc import Callable, Iterable
from enum import Enum
from functools import lru_cache
from typing import NamedTuple

from appliance.sip.message import RANDOM

__all__ = [
    "ALGORITHMS",
    "Credentials",
    "NonceCheck",
    "NonceManager",
    "Verdict",
    "authorization_value",
    "challenge_values",
    "compute_response",
    "find_credentials",
    "parse_credentials",
    "parse_digest",
    "verify",
]

#: Offered in this order: RFC 8760 §2.4 says the preferred (strongest) first.
ALGORITHMS: tuple[str, ...] = ("SHA-256", "MD5")

# Header values longer than this are refused outright: a real Digest header is
# a few hundred bytes, and a cap keeps parsing cost bounded for hostile input.
_MAX_HEADER_LEN = 8192

# Scheme token followed by whitespace (or end). Linear: disjoint classes.
_SCHEME_RE = re.compile(r"[ \t\r\n]*([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)(?:[ \t\r\n]+|\Z)")
# One auth-param with its leading separators and trailing comma, or else (group 4) all
# that is left of the value. The quoted-string uses the "unrolled loop" form and every
# quantifier is possessive, so each character is examined a bounded number of times and
# a hostile value (e.g. a missing closing quote) fails in linear time. findall() from the
# end of the scheme thus yields the params back to back, as a match() loop would, then
# at most one remainder: one pass in C instead of a Python loop over match objects.
_PARAM_RE = re.compile(
    r"""[\s,]*+([^\s=,"\\]++)[ \t\r\n]*+=[ \t\r\n]*+"""
    r"""(?:"([^"\\]*+(?:\\.[^"\\]*+)*+)"|([^\s,"\\]*+))[ \t\r\n]*+(?:,|\Z)|(.+)""",
    re.DOTALL,
)
_TRAILER_RE = re.compile(r"[\s,]*+")
_UNESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)
_HEX8_RE = re.compile(r"[0-9A-Fa-f]{1,8}")


def parse_digest(value: str) -> dict[str, str] | None:
    """Parse a Digest challenge or credentials header value into a dict.

    Keys are lower-cased; quoted values are unescaped. Returns None when the
    scheme is not Digest, the syntax is broken, or a directive is repeated
    (a duplicate is ambiguous, and ambiguity in auth headers is an attack
    surface). A header holding several comma-joined challenges is refused:
    send one challenge per header value.
    """
    if len(value) > _MAX_HEADER_LEN:
        return None
    m = _SCHEME_RE.match(value)
    if m is None or m.group(1).lower() != "digest":
        return None
    found = _PARAM_RE.findall(value, m.end())
    # Only stray separators may be left after the last param; anything else is malformed.
    if found and found[-1][3]:
        rest = found.pop()[3]
        if _TRAILER_RE.fullmatch(rest) is None:
            return None
    # A quoted value can be empty like a bare one, and only a quoted one holds a backslash.
    params = {key.lower(): quoted or bare for key, quoted, bare, _ in found}
    if len(params) != len(found):
        return None  # a repeated directive
    if "\\" in value:
        params = {key: _UNESCAPE_RE.sub(r"\1", text) for key, text in params.items()}
    return params


class Credentials(NamedTuple):
    """The fields of an Authorization/Proxy-Authorization Digest value.

    ``algorithm`` is upper-cased and defaults to "MD5" when absent (RFC 7616
    §3.4). ``qop`` is kept as sent because it is part of the hashed data.
    """

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str
    qop: str | None
    nc: str | None
    cnonce: str | None
    opaque: str | None


def parse_credentials(value: str) -> Credentials | None:
    """Parse an Authorization value; None if unparseable or a required field is missing."""
    p = parse_digest(value)
    if p is None:
        return None
    try:
        return Credentials(  # positional: keyword arguments cost more, once per request
            p["username"],
            p["realm"],
            p["nonce"],
            p["uri"],
            p["response"],
            p.get("algorithm", "MD5").upper(),
            p.get("qop"),
            p.get("nc"),
            p.get("cnonce"),
            p.get("opaque"),
        )
    except KeyError:
        return None


def find_credentials(values: Iterable[str], realm: str) -> Credentials | None:
    """Pick the credentials for ``realm`` among several Authorization values.

    A request may carry credentials for more than one realm (RFC 3261
    §22.3); None means the MISSING case: challenge, don't count a failure.
    """
    for v in values:
        c = parse_credentials(v)
        if c is not None and c.realm == realm:
            return c
    return None


class NonceCheck(Enum):
    """Outcome of :meth:`NonceManager.check`."""

    VALID = "valid"
    STALE = "stale"  # genuine and for this user, but expired: re-challenge with stale=true
    INVALID = "invalid"  # forged, for another user, malformed, or a bad nc
    REPLAY = "replay"  # nc not above the highest already accepted for this nonce


# Nonce layout (before base64url): issued-at (IEEE double) | random | truncated HMAC.
_TS = struct.Struct(">d")
_RAND_LEN = 8
_MAC_LEN = 16
_RAW_LEN = _TS.size + _RAND_LEN + _MAC_LEN  # 32 bytes
_NONCE_LEN = 43  # len(base64url(32 bytes)) without padding
_NONCE_DOMAIN = b"homepbx-sip-nonce-v1\x00"
# Canonical spelling: 43 base64url characters, the last of which carries two padding
# bits that must be zero (so only every fourth letter of the alphabet may end a nonce).
_NONCE_RE = re.compile(f"[A-Za-z0-9_-]{{{_NONCE_LEN - 1}}}[AEIMQUYcgkosw048]")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = str.maketrans("-_", "+/")
_HMAC_BLOCK = 64  # SHA-256 block size
# Tolerated clock skew for a nonce that seems issued in the future (e.g. the
# caller's monotonic clock restarted); beyond it the nonce is treated as stale.
_FUTURE_SKEW = 1.0


class NonceManager:
    """Issues and checks nonces: HMAC-signed, time-stamped, bound to the user (number)
    they were issued for, so they expire and cannot be replayed across users.

    Issuing is stateless; only nonces that were successfully used are tracked
    (nonce -> highest accepted nc) to reject replays. The table is bounded:
    entries leave when their nonce expires, and if it is full the oldest are
    evicted. Eviction must never re-open a replay window, so the newest
    issue-time among evicted live entries becomes a floor: an untracked nonce
    issued at or before it is answered STALE (the client just re-auths).
    """

    __slots__ = ("_floor", "_inner", "_lifetime", "_max_tracked", "_order", "_outer", "_secret", "_seen")

    def __init__(self, secret: bytes, lifetime: float = 300.0, max_tracked: int = 65_536) -> None:
        if not secret:
            raise ValueError("secret must be non-empty (use 32 random bytes)")
        if lifetime <= 0:
            raise ValueError("lifetime must be positive")
        if max_tracked < 1:
            raise ValueError("max_tracked must be >= 1")
        self._secret = bytes(secret)
        # HMAC-SHA256 (RFC 2104) with both keyed pads hashed once here: hmac.digest() would
        # redo that on every nonce, and nonces are issued and checked on every REGISTER.
        key = self._secret
        if len(key) > _HMAC_BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_HMAC_BLOCK, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        self._lifetime = float(lifetime)
        self._max_tracked = max_tracked
        # Nonce key -> highest accepted nc. The key is the nonce's issue time and random part
        # as one int, which also gives the issue time back: about 100 bytes an entry, where
        # the nonce text and an (nc, issued) tuple took 260. The table holds every nonce used
        # in the last `lifetime` seconds, up to `max_tracked`: 65,536 (6.5 MB) are the last
        # 130 s under 500 fresh registrations a second (issue 10); past that the floor
        # answers an older untracked nonce STALE, a re-challenge, never a second use.
        self._seen: dict[int, int] = {}
        # The same keys in the order they were recorded (~ issue order): entries leave from
        # the front. A deque beside a plain dict, not an OrderedDict, whose links cost ~50
        # bytes an entry; and not the dict alone, whose first key is O(n) to find once many
        # have been deleted from its front.
        self._order: deque[int] = deque()
        self._floor = float("-inf")

    def _mac(self, head: bytes, user: str) -> bytes:
        inner = self._inner.copy()
        inner.update(_NONCE_DOMAIN + head + user.encode("utf-8", "surrogatepass"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:_MAC_LEN]

    def issue(self, user: str, now: float) -> str:
        """Return a fresh nonce for ``user`` (printable base64url, no padding)."""
        head = _TS.pack(now) + RANDOM.take(_RAND_LEN)
        raw = head + self._mac(head, user)
        return binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")

    @staticmethod
    def _decode(nonce: str) -> bytes | None:
        # Only the canonical spelling makes the text <-> bytes mapping 1:1, so one
        # nonce cannot be re-spelled to dodge replay tracking.
        if _NONCE_RE.fullmatch(nonce) is None:
            return None
        return binascii.a2b_base64((nonce + "=").translate(_FROM_URLSAFE))  # base64.urlsafe_b64decode, in C

    def _open(self, nonce: str, user: str) -> tuple[float, int] | None:
        """(issue time, table key) of a genuine nonce for ``user``; None if it is not one."""
        raw = self._decode(nonce)
        if raw is None:
            return None
        head = raw[: _TS.size + _RAND_LEN]
        if not hmac.compare_digest(raw[-_MAC_LEN:], self._mac(head, user)):
            return None
        issued: float = _TS.unpack_from(raw)[0]
        if issued != issued:  # NaN cannot come from issue(); treat as garbage
            return None
        return issued, int.from_bytes(head, "big")

    @staticmethod
    def _parse_nc(nc: str | None) -> int | None:
        """nc as int; 0 stands for "no nc" (legacy, no qop); None if malformed."""
        if nc is None:
            return 0
        if _HEX8_RE.fullmatch(nc) is None:
            return None
        n = int(nc, 16)
        return n if n > 0 else None

    def check(self, nonce: str, user: str, nc: str | None, now: float) -> NonceCheck:
        """Classify a nonce presented by ``user``; records nothing (see :meth:`accept`).

        ``nc`` None (no qop) makes the nonce single-use.
        """
        return self._classify(nonce, user, nc, now)[0]

    def _classify(self, nonce: str, user: str, nc: str | None, now: float) -> tuple[NonceCheck, int, int]:
        """check(), plus the parsed nc and table key that :meth:`_record` needs when VALID."""
        opened = self._open(nonce, user)
        if opened is None:
            return NonceCheck.INVALID, 0, 0
        issued, key = opened
        age = now - issued
        if age > self._lifetime or age < -_FUTURE_SKEW:
            return NonceCheck.STALE, 0, key
        n = self._parse_nc(nc)
        if n is None:
            return NonceCheck.INVALID, 0, key
        highest = self._seen.get(key)
        if highest is None:
            if issued <= self._floor:
                return NonceCheck.STALE, n, key
            return NonceCheck.VALID, n, key
        if n <= highest:
            return NonceCheck.REPLAY, n, key
        return NonceCheck.VALID, n, key

    def accept(self, nonce: str, nc: str | None, now: float) -> None:
        """Record that ``nc`` was used successfully with ``nonce``.

        Call only after the response was verified (and ``check`` said VALID),
        so failed guesses cannot burn a legitimate client's nonce counts.
        """
        n = self._parse_nc(nc)
        raw = self._decode(nonce)
        if n is None or raw is None:
            return
        self._record(int.from_bytes(raw[: _TS.size + _RAND_LEN], "big"), n, now)

    def _record(self, key: int, n: int, now: float) -> None:
        seen = self._seen
        highest = seen.get(key)
        if highest is not None:
            if n > highest:
                seen[key] = n
            return
        seen[key] = n
        self._order.append(key)
        self._trim(now)

    def _trim(self, now: float) -> None:
        # Amortised O(1): drop a couple of expired entries from the front
        # (roughly the oldest), then enforce the size cap.
        seen, order = self._seen, self._order
        horizon = now - self._lifetime
        for _ in range(2):
            if not order:
                return
            if _key_issued(order[0]) >= horizon:
                break
            del seen[order.popleft()]
        while len(order) > self._max_tracked:
            oldest = order.popleft()
            del seen[oldest]
            issued = _key_issued(oldest)
            if issued >= horizon and issued > self._floor:
                self._floor = issued

    def sweep(self, now: float) -> None:
        """Drop the expired entries at the front (run occasionally, e.g. once a minute).

        In place, not a rebuilt table: a copy of a full table every minute left the
        allocator holding both (RSS went up a step at each sweep). Recording order is
        issue order but for a nonce used a while after it was issued; such an entry leaves
        when it reaches the front, and the size cap bounds them all meanwhile.
        """
        seen, order = self._seen, self._order
        horizon = now - self._lifetime
        while order and _key_issued(order[0]) < horizon:
            del seen[order.popleft()]

    def __len__(self) -> int:
        return len(self._seen)


def _key_issued(key: int) -> float:
    """The issue time inside a nonce table key (its first 8 of 16 bytes)."""
    issued: float = _TS.unpack((key >> (8 * _RAND_LEN)).to_bytes(_TS.size, "big"))[0]
    return issued


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge_values(
    realm: str, nonce: str, stale: bool = False, opaque: str | None = None,
    algorithms: tuple[str, ...] = ALGORITHMS,
) -> list[str]:
    """One WWW-Authenticate/Proxy-Authenticate value per algorithm, in the order given
    (RFC 8760: the most preferred first)."""
    tail = ""
    if stale:
        tail += ", stale=true"
    if opaque is not None:
        tail += ", opaque=" + _quote(opaque)
    head = f"Digest realm={_quote(realm)}, nonce={_quote(nonce)}, algorithm="
    return [f'{head}{alg}, qop="auth"{tail}' for alg in algorithms]


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_HASHES: dict[str, Callable[[bytes], str]] = {"MD5": _md5_hex, "SHA-256": _sha256_hex}


def _enc(s: str) -> bytes:
    # surrogateescape restores the wire bytes if the SIP parser decoded with
    # it; any other lone surrogate must still not make verify() raise.
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass")


def compute_response(
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
) -> str:
    """The Digest ``response`` (lower-case hex): RFC 7616 §3.4.1 with qop=auth, RFC 2069/2617 without qop.

    Raises ValueError for "-sess" or unknown algorithms, qop other than
    "auth", or qop without nc/cnonce.
    """
    h = _HASHES.get(algorithm.upper())
    if h is None:
        raise ValueError(f"unsupported digest algorithm: {algorithm!r}")
    ha1 = _cached_hash(h, f"{username}:{realm}:{password}")
    ha2 = _cached_hash(h, f"{method}:{uri}")
    if qop is None:
        return h(_enc(f"{ha1}:{nonce}:{ha2}"))
    if qop.lower() != "auth":
        raise ValueError(f"unsupported qop: {qop!r}")
    if nc is None or cnonce is None:
        raise ValueError("qop=auth requires nc and cnonce")
    return h(_enc(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}"))


@lru_cache(maxsize=4096)
def _cached_hash(h: Callable[[bytes], str], text: str) -> str:
    """HA1 and HA2 repeat (per user; per method and URI): each is hashed once."""
    return h(_enc(text))


class Verdict(Enum):
    """Outcome of :func:`verify`."""

    OK = "ok"
    STALE = "stale"  # right password, expired nonce: re-challenge with stale=true, not a failure
    FAILED = "failed"  # count towards throttling
    MISSING = "missing"  # no credentials for our realm: plain challenge, not a failure


# Stand-in password for unknown users so the work done does not reveal
# whether the user exists.
_DUMMY_PASSWORD = "\x00homepbx-no-such-user\x00"


def verify(
    credentials: Credentials,
    *,
    expected_user: str,
    password: str | None,
    realm: str,
    method: str,
    nonces: NonceManager,
    now: float,
    algorithms: tuple[str, ...] = ALGORITHMS,
) -> Verdict:
    """Check Digest credentials for ``expected_user``; on OK the nc is recorded.

    ``password`` None means unknown user: FAILED after the same hashing work
    as a known one. Credentials for another realm give MISSING (they are not
    for us, so not a failure). STALE only when the response is otherwise
    right, so it never acts as a password oracle for old nonces.
    """
    c = credentials
    if c.realm != realm:
        return Verdict.MISSING
    if c.username != expected_user:
        return Verdict.FAILED
    algorithm = c.algorithm.upper()
    if algorithm not in _HASHES:
        return Verdict.FAILED
    if algorithm not in algorithms:
        # Known but no longer offered (the config changed): a fresh challenge, not a
        # failure, so a phone answering as before is not throttled for it.
        return Verdict.MISSING
    qop = c.qop
    if qop is None or qop.lower() != "auth" or c.nc is None or c.cnonce is None:
        return Verdict.FAILED
    nonce_state, nc, key = nonces._classify(c.nonce, expected_user, c.nc, now)
    expected = compute_response(
        algorithm,
        c.username,
        c.realm,
        _DUMMY_PASSWORD if password is None else password,
        method,
        c.uri,
        c.nonce,
        qop,
        c.nc,
        c.cnonce,
    )
    given = c.response.lower()
    if not given.isascii():
        given = ""
    matches = hmac.compare_digest(expected, given)  # both ASCII (hex, or "" above)
    if password is None or not matches:
        return Verdict.FAILED
    if nonce_state is NonceCheck.STALE:
        return Verdict.STALE
    if nonce_state is not NonceCheck.VALID:
        return Verdict.FAILED
    nonces._record(key, nc, now)  # what accept() would do, without decoding again
    return Verdict.OK


def authorization_value(
    challenge: str,
    *,
    username: str,
    password: str,
    method: str,
    uri: str,
    cnonce: str,
    nc: int = 1,
) -> str:
    """Answer one WWW-Authenticate value with an Authorization value (client side).

    Uses qop=auth when offered; without a qop offer it falls back to the
    RFC 2069 form. Raises ValueError if the challenge is unusable.
    """
    p = parse_digest(challenge)
    if p is None or "realm" not in p or "nonce" not in p:
        raise ValueError("not a usable Digest challenge")
    realm, nonce = p["realm"], p["nonce"]
    algorithm = p.get("algorithm", "MD5")
    qop: str | None = None
    if "qop" in p:
        offered = [q.strip().lower() for q in p["qop"].split(",")]
        if "auth" not in offered:
            raise ValueError(f"no supported qop offered: {p['qop']!r}")
        qop = "auth"
    if not 0 < nc <= 0xFFFFFFFF:
        raise ValueError("nc out of range")
    nc_text = f"{nc:08x}"
    response = compute_response(
        algorithm,
        username,
        realm,
        password,
        method,
        uri,
        nonce,
        qop,
        nc_text if qop else None,
        cnonce if qop else None,
    )
    parts = [
        f"Digest username={_quote(username)}",
        f"realm={_quote(realm)}",
        f"nonce={_quote(nonce)}",
        f"uri={_quote(uri)}",
        f"response={_quote(response)}",
        f"algorithm={algorithm}",
    ]
    if qop:
        parts += [f"qop={qop}", f"nc={nc_text}", f"cnonce={_quote(cnonce)}"]
    if "opaque" in p:
        parts.append(f"opaque={_quote(p['opaque'])}")
    return ", ".join(parts)
