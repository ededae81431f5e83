"""TUI fixtures: the real daemon with a control socket, real handsets, and screen reading."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from textual.app import App

from tests.e2e.conftest import handset_factory  # noqa: F401 - a fixture, re-exported here
from tests.support.control import control_block
from tests.support.pbx import Daemon, write_config
from tests.support.ports import free_port


class Pbx(Daemon):
    @property
    def socket(self) -> Path:
        return self.config.parent / "ctl.sock"


PbxFactory = Callable[..., Pbx]


@pytest.fixture
def pbx_factory(tmp_path: Path) -> Iterator[PbxFactory]:
    """Start a daemon with the given [[users]] blocks and a control socket in tmp_path."""
    started: list[Pbx] = []

    def start(users: list[str], *, run: bool = True, **options: object) -> Pbx:
        port = free_port()
        config = write_config(tmp_path, port, users, extra=control_block(), **options)  # type: ignore[arg-type]
        daemon = Pbx(config, port)
        if run:
            daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def screen_text(app: App[object]) -> str:
    """What the terminal would show, as plain text lines."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def wait_screen(app: App[object], predicate: Callable[[str], bool], timeout: float = 5.0,
                      what: str = "") -> str:
    """Poll the rendered screen until predicate(text) holds; fail with the screen shown."""
    deadline = time.monotonic() + timeout
    while True:
        text = screen_text(app)
        if predicate(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"screen never showed {what or predicate}:\n{text}")
        await asyncio.sleep(0.02)
