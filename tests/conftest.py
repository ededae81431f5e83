"""Refuse to test a stale compiled build.

`make` compiles the SIP core and the edge's hot path with mypyc (setup.py). Python imports
a compiled module in preference to its source, and mypyc also bakes constants of the
modules a compiled one imports into it: after an edit to any module of the daemon the
tests would silently run old code. `make` recompiles on its own; a bare `pytest` stops
here and says what to run.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_LIBRARY = "_compiled__mypyc"  # mypyc's runtime for all compiled modules (setup.py)


def stale_build(root: Path = REPO) -> list[str]:
    """Daemon sources newer than the compiled build, and compiled modules without a source."""
    package = root / "appliance"
    compiled = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in package.rglob(f"*{suffix}")]
    if not compiled:
        return []  # plain Python: nothing can be stale
    built = min(p.stat().st_mtime for p in compiled)  # `make native` stamps them all at the end
    stale = [str(p.relative_to(root)) for p in package.rglob("*.py") if p.stat().st_mtime > built]
    for p in compiled:
        name = p.name.split(".", 1)[0]
        if name != SHARED_LIBRARY and not p.with_name(f"{name}.py").exists():
            stale.append(f"{p.relative_to(root)} (its source is gone)")
    return sorted(stale)


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = stale_build()
    if stale:
        pytest.exit(
            f"the compiled build is older than: {', '.join(stale)}. Run `make native` to recompile "
            "(or `make native HOMEPBX_NATIVE=0` for plain Python).",
            returncode=4,
        )
