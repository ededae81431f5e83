"""Fixtures: the real daemon on a loopback port, and real pjsua2 handsets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.simulator.handset import Handset
from tests.support.baresip import baresip  # noqa: F401 - fixture for the e2e tests
from tests.support.linphone import linphone  # noqa: F401 - fixture for the e2e tests
from tests.support.pbx import Daemon, write_config
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def pbx_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Start a daemon with the given [[users]] blocks; stopped at teardown."""
    started: list[Daemon] = []

    def start(users: list[str], **options: object) -> Daemon:
        port = free_port()
        config = write_config(tmp_path, port, users, **options)  # type: ignore[arg-type]
        daemon = Daemon(config, port).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def handset_factory(tmp_path: Path) -> Iterator[Callable[..., Handset]]:
    made: list[Handset] = []

    def make(name: str = "", transport: str = "udp", **kw: object) -> Handset:
        handset = Handset(name=name or f"h{len(made) + 1}", transport=transport,
                          log_path=tmp_path / f"handset-{len(made) + 1}.log", **kw)  # type: ignore[arg-type]
        made.append(handset)
        return handset

    yield make
    for handset in made:
        handset.begin_close()
    for handset in made:
        handset.close()
