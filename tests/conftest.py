"""Refuse to test a stale compiled build.

`make` compiles the SIP core and the edge's hot path with mypyc (setup.py). Python imports
a compiled module in preference to its source, so after an edit to one of those sources the
tests would silently run the old code: `make` recompiles on its own; a bare `pytest` stops
here and says what to run.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def stale_compiled_modules(root: Path = REPO) -> list[str]:
    """Sources newer than the extension module that shadows them."""
    stale = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for compiled in (root / "appliance").rglob(f"*{suffix}"):
            source = compiled.with_name(compiled.name.removesuffix(suffix) + ".py")
            if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
                stale.append(str(source.relative_to(root)))
    return sorted(stale)


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = stale_compiled_modules()
    if stale:
        pytest.exit(
            f"compiled modules older than their source: {', '.join(stale)}. Run `make native` "
            "to recompile (or `make clean-native` to test plain Python).",
            returncode=4,
        )
