"""Tags and branches come from a pool of system random bytes, refilled 4 kB at a time."""

from __future__ import annotations

import os

from appliance.sip.message import RANDOM, RandomPool, new_tag


def test_the_pool_hands_out_each_byte_once_and_refills() -> None:
    pool = RandomPool(size=64)
    drawn = [pool.take(6) for _ in range(40)]  # past the 64 bytes: refilled
    assert all(len(d) == 6 for d in drawn)
    assert len(set(drawn)) == len(drawn)
    assert len(pool.take(100)) == 100  # more than the pool's size at once
    assert len({new_tag() for _ in range(2000)}) == 2000


def test_a_forked_child_does_not_repeat_its_parents_tags() -> None:
    RANDOM.take(1)  # the parent holds a filled buffer
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next tag, then out without pytest's teardown
        os.write(write, new_tag().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert child and child != new_tag()
