"""Ports for the processes a test starts, a block of its own for each pytest-xdist worker.

`make test` runs the suite in two pytest processes at once (pytest-xdist workers gw0, gw1).
A port chosen by one of them must not be taken by the other before the daemon, Kamailio or
SIPp it was chosen for binds it, and two daemons' media workers must not contend for the
same RTP ports. So each worker takes its ports from a block of its own, below Linux's
ephemeral range (32768-60999 here: what the kernel hands out for port 0 and for outgoing
connections, so no kernel-chosen port lands in a block either):

    block = 12000 + 5000 * (N % 4)   worker gwN; a run without xdist is worker 0
    block + 0    .. + 999            the daemon's media workers ([media] rtp_ports, write_config)
    block + 1000 .. + 2499           free_port(): SIP listeners, Kamailio, softphones' SIP, SIPp
    block + 2500 .. + 4999           rtp_range(): RTP of baresip, linphone and the tests' own media pools

The blocks stay clear of the daemon's default RTP range (10000-10999), the demo's
(11000-11999) and the ephemeral range. More than four workers share blocks (gw4 with gw0):
free_port() still only hands out a port it could bind, and the RTP stacks skip a port in use.
"""

from __future__ import annotations

import itertools
import os
import random
import socket

FIRST_BLOCK = 12000
BLOCK_SIZE = 5000
BLOCKS = 4
MEDIA_SIZE = 1000
PORTS_OFFSET, PORTS_SIZE = 1000, 1500
RTP_OFFSET, RTP_SIZE = 2500, 2500
PORT_STRIDE = 4
"""free_port() hands out every 4th port: SIPp's media (-mp) also takes the next three."""


def worker_index() -> int:
    """N of pytest-xdist's worker gwN (PYTEST_XDIST_WORKER), 0 without xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    digits = name.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


def block() -> int:
    """The first port of this worker's block."""
    return FIRST_BLOCK + BLOCK_SIZE * (worker_index() % BLOCKS)


def media_ports() -> str:
    """The daemon's [media] rtp_ports for this worker ("LOW-HIGH")."""
    return f"{block()}-{block() + MEDIA_SIZE - 1}"


# Each starts at a random place in its area: two suites run at once (two work trees) seldom
# walk the same ports in step.
_port_turn = itertools.count(random.randrange(PORTS_SIZE // PORT_STRIDE))
_rtp_cursor = random.randrange(0, RTP_SIZE, 2)


def _bindable(host: str, port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind((host, port))
            udp.bind((host, port))
    except OSError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port of this worker's block free for both UDP and TCP on `host` (SIP listens on
    both). Successive calls go round the block, so a port just handed out (and perhaps
    not yet bound by its process) is not handed out again soon after."""
    low = block() + PORTS_OFFSET
    slots = PORTS_SIZE // PORT_STRIDE
    for _ in range(slots):
        port = low + PORT_STRIDE * (next(_port_turn) % slots)
        if _bindable(host, port):
            return port
    raise RuntimeError(f"no free port in {low}-{low + PORTS_SIZE - 1} on {host}")


def rtp_range(size: int = 200) -> str:
    """A "LOW-HIGH" range of `size` ports (LOW even) for one softphone's or one media pool's
    RTP, from this worker's block; successive calls get the next range, round the block."""
    global _rtp_cursor
    size += size % 2
    if size > RTP_SIZE:
        raise ValueError(f"at most {RTP_SIZE} RTP ports in one range")
    if _rtp_cursor + size > RTP_SIZE:
        _rtp_cursor = 0
    low = block() + RTP_OFFSET + _rtp_cursor
    _rtp_cursor += size
    return f"{low}-{low + size - 1}"
