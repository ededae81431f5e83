"""Build hook: the SIP core and the edge's per-datagram modules compiled with mypyc.

They are plain, fully typed Python (mypy --strict); mypyc turns them into C extension
modules, which roughly halves the daemon's CPU per message (bench/register.py,
bench/calls.py). Every other module, and every module when HOMEPBX_NATIVE=0, stays
interpreted: the code behaves the same either way, and the tests run on the compiled build.

`make` compiles in place (`setup.py build_ext --inplace`, redone whenever one of these
sources changes); a wheel (`pip wheel .`, the disk image) carries the compiled modules.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent

# Everything a SIP message goes through between the socket and the reply, and the media
# pool an anchored call takes its worker slot from (as plain Python it was a tenth of the
# edge's CPU in an anchored burst).
NATIVE_MODULES = sorted(
    [str(p.relative_to(ROOT)) for p in (ROOT / "appliance" / "sip").glob("*.py") if p.name != "__init__.py"]
    + [f"appliance/edge/{name}.py" for name in ("server", "transport", "calls", "dialogs", "routing", "transfers",
                                                 "forwarding", "pickup", "feature_codes", "relay", "timers",
                                                 "media_link", "auth_gate", "device_events", "seams",
                                                 "subscriptions")]
    + ["appliance/call_policy.py", "appliance/state.py", "appliance/history/recorder.py", "appliance/media/pool.py"]
)


def ext_modules() -> list[object]:
    if os.environ.get("HOMEPBX_NATIVE", "1") == "0":
        return []
    from mypyc.build import mypycify  # only the compiled build needs mypy installed

    os.chdir(ROOT)  # mypyc resolves module names from the working directory
    # The shared library goes inside the package (appliance/_compiled__mypyc.*.so), not at
    # the top level where an editable install (`make`) cannot import it from elsewhere.
    # With that name mypyc cannot split its C into several files (multi_file), nor
    # compile a package's __init__ (its __path__ comes out wrong): ours are empty.
    return list(mypycify(NATIVE_MODULES, opt_level="3", debug_level="0", target_dir="build/mypyc",
                         group_name="appliance._compiled"))


setup(ext_modules=ext_modules())
