"""Which devices are offered SHA-256: every one, except those that give up on it (sans-I/O).

RFC 8760 has a server offer SHA-256 first and MD5 after it, and a client answer the first
it supports. Real software does not always: baresip before 3.11 (libre) aborts on any
challenge that is not MD5 wherever it stands, and pjsip before 2.10, SIPp 3.6 and sipsak
read only the first challenge and give up on SHA-256. Asterisk, Kamailio and FreeSWITCH
sidestep this by challenging with MD5 alone. homepbx keeps SHA-256 for every device that
can use it and learns, device by device, those that cannot:

- before it authenticates, a device is known by its User-Agent (the same firmware behaves
  the same everywhere), else by its address;
- a User-Agent on `KNOWN_MD5_ONLY` (the software above) is offered MD5 alone at once;
- any other device offered SHA-256 that does not answer within `ABANDON_AFTER` seconds
  gave up: it is reported once (`expire` returns it; the edge logs `auth_abandoned`) and
  offered MD5 alone from then on. Giving up is not a wrong password: the throttle does
  not count it. A device that answers any challenge is simply forgotten.

What was learned is kept by the caller across restarts (`learned`, and the constructor).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

ABANDON_AFTER = 3.0
"""Seconds a device has to answer a challenge: a handset answers in milliseconds, and one
that retries later (baresip retries after a minute or more) has given up long before."""
MAX_PENDING = 10_000
"""Unanswered challenges remembered at once (a scanner's requests are dropped oldest first)."""
MAX_LEARNED = 1_000

KNOWN_MD5_ONLY = re.compile(
    r"^(?:baresip v?(?:[0-2]\.|3\.(?:[0-9]|10)\.)"  # libre before 3.11: any non-MD5 challenge aborts
    r"|(?:PJSUA|PJSIP|pjsip)[ /-]?v?(?:[01]\.|2\.[0-9](?!\d))"  # pjsip before 2.10 reads the first only
    r"|sipsak|sipp\b)",
    re.IGNORECASE,
)
"""User-Agents of software known to give up on a SHA-256 challenge."""


@dataclass(frozen=True, slots=True)
class Abandoned:
    """A device that gave up on a SHA-256 challenge (now offered MD5 alone)."""

    key: str
    number: str
    source: str
    user_agent: str


def device_key(user_agent: str | None, source: str) -> str:
    """How a device is known before it authenticates: its User-Agent, else its address."""
    agent = (user_agent or "").strip()
    return f"ua:{agent}" if agent else f"addr:{source}"


class DigestFallback:
    def __init__(self, learned: Iterable[str] = ()) -> None:
        self._learned: dict[str, None] = dict.fromkeys(learned)  # insertion-ordered set
        self._pending: dict[str, tuple[float, str, str, str]] = {}  # key -> (since, number, source, ua)

    @property
    def learned(self) -> list[str]:
        return list(self._learned)

    def offer(self, key: str, user_agent: str | None, configured: tuple[str, ...]) -> tuple[str, ...]:
        """The challenges for this device: the configured ones, or MD5 alone if it needs it."""
        if "MD5" not in configured or configured == ("MD5",):
            return configured
        if key in self._learned or KNOWN_MD5_ONLY.match((user_agent or "").strip()):
            return ("MD5",)
        return configured

    def challenged(self, key: str, offered: tuple[str, ...], number: str, source: str, user_agent: str | None,
                   now: float) -> None:
        """A challenge went out; if it offered SHA-256 the device now has ABANDON_AFTER to answer."""
        if "SHA-256" not in offered or offered == ("MD5",) or key in self._pending:
            return  # the first unanswered challenge is the one that counts
        self._pending[key] = (now, number, source, (user_agent or "").strip())
        if len(self._pending) > MAX_PENDING:
            del self._pending[next(iter(self._pending))]

    def answered(self, key: str) -> None:
        """The device sent credentials: it copes with what it was offered."""
        self._pending.pop(key, None)

    def expire(self, now: float) -> list[Abandoned]:
        """Devices that let a SHA-256 challenge go unanswered: learned, and returned once."""
        gone = [(key, info) for key, info in self._pending.items() if now - info[0] >= ABANDON_AFTER]
        out = []
        for key, (_, number, source, agent) in gone:
            del self._pending[key]
            self._learned[key] = None
            out.append(Abandoned(key, number, source, agent))
        while len(self._learned) > MAX_LEARNED:
            del self._learned[next(iter(self._learned))]
        return out
