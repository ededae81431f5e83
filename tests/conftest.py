"""Refuse to test a stale compiled build.

`make` compiles the SIP core and the edge's hot path with mypyc (setup.py). Python imports
a compiled module in preference to its source, and mypyc also bakes constants of the
modules a compiled one imports into it: after an edit to any module of the daemon the
tests would silently run old code. `make` recompiles on its own; a bare `pytest` stops
here and says what to run.
"""

from __future__ import annotations

import fcntl
import importlib.machinery
import os
from collections.abc import Iterator
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


# --------------------------------------------------------------------------- parallel runs

# `make test` runs the suite in two pytest-xdist workers (`-n 2 --dist loadgroup
# --no-loadscope-reorder`). Every file is one group, so its tests stay together on one
# worker, in their order, with their module fixtures; the groups go out in the order sorted
# below. The files that load the machine heavily form one group of their own with the files
# whose point is a measurement such load would spoil: they run one after the other on one
# worker, never beside each other. That group starts first, a disk image first of all, as
# the images take longest and the rest of the suite runs beside them.
#
# With both images on (`make test`), the arm64 image heads that group (its build under
# emulation is the longest task of all) and the amd64 image is a group of its own, the
# first on the other worker, so the two run side by side rather than one after the other.
# The heavy and measuring files then never run beside an image either: each holds the lock
# below exclusively, each image test holds it shared, so a heavy file waits for an image
# still running on the other worker (the amd64 image ends minutes before the arm64 one, so
# in practice nobody waits).
LOAD_GROUP = "heavy-load"
IMAGES = "tests/image/"  # builds a Debian system, then boots it emulated (QEMU TCG, both cores)
HEAVY = (
    IMAGES,
    "tests/e2e/test_burst.py",  # 300 calls through SIPp, up to 64 media workers
    "tests/e2e/test_fuzz.py",  # the mutation fuzzer flat out against the daemon
)
MEASURING = (
    "tests/e2e/test_levels.py",  # the tone's level the same at both ends within 1 dB
    "tests/e2e/test_daemon_crash.py",  # both BYEs within 4 s of a kill -9
    # Other people's phones (baresip, linphone) measured by tone: starved of CPU beside an
    # emulated image build, they slip frames, and a clean tone reads -10 dB (two CI flakes).
    "tests/e2e/test_compat_baresip_features.py",
    "tests/e2e/test_compat_baresip_tcp.py",
    "tests/e2e/test_compat_linphone.py",
)
ORDER = (IMAGES, *HEAVY, *MEASURING, "tests/e2e/", "tests/tui/", "tests/unit/")


def _file(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def _image_arch(item: pytest.Item) -> str | None:
    """"amd64" or "arm64" for a test of the disk images (tests/image: every test takes the
    module's `arch` parameter), else None."""
    callspec = getattr(item, "callspec", None)
    arch = callspec.params.get("arch") if callspec is not None else None
    return getattr(arch, "name", None) if _file(item).startswith(IMAGES) else None


def both_images() -> bool:
    return os.environ.get("HOMEPBX_IMAGE_TEST") == "1" and os.environ.get("HOMEPBX_IMAGE_TEST_ARM64") == "1"


def _rank(item: pytest.Item) -> tuple[int, int]:
    path = _file(item)
    rank = next((i for i, prefix in enumerate(ORDER) if path.startswith(prefix)), len(ORDER))
    return rank, (0 if _image_arch(item) == "arm64" else 1)  # the arm64 image first


def _group(item: pytest.Item) -> str:
    path = _file(item)
    if both_images() and _image_arch(item) == "amd64":
        return f"{IMAGES}amd64"
    return LOAD_GROUP if path.startswith(HEAVY + MEASURING) else path


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):
        return  # not an xdist worker: the plain order
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(_group(item)))
    items.sort(key=_rank)  # stable: each file's tests keep their order


@pytest.fixture(scope="module", autouse=True)
def _heavy_files_alone(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under xdist, a heavy or measuring file runs only when no image test runs on another
    worker (a lock file shared by the run's workers: exclusive for those files, shared for
    the images). Nothing to do in one process, or for the other files."""
    path = str(request.path.relative_to(REPO)) if request.path.is_relative_to(REPO) else ""
    if not hasattr(request.config, "workerinput") or not path.startswith(HEAVY + MEASURING):
        yield
        return
    lock = tmp_path_factory.getbasetemp().parent / "heavy-load.lock"  # the run's, shared by its workers
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if path.startswith(IMAGES) else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
