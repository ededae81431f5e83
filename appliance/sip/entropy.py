"""Random bytes from the OS, drawn a block at a time.

Every response carries a fresh To-tag and every challenge a fresh nonce: one getrandom()
system call per block of them instead of one each. The bytes are the kernel's CSPRNG
output all the same, only fetched ahead.
"""

from __future__ import annotations

import os

_BLOCK = 4096
_pool = bytearray()
# A forked child must never hand out bytes its parent hands out too.
os.register_at_fork(after_in_child=_pool.clear)


def random_bytes(n: int) -> bytes:
    """`n` bytes from the OS's cryptographically secure generator (like os.urandom)."""
    if len(_pool) < n:
        _pool[:] = os.urandom(max(_BLOCK, n))
    out = bytes(_pool[:n])
    del _pool[:n]
    return out
