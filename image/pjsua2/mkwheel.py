"""Write the pjsua2 wheel (PEP 427) from the built module, byte for byte the same for the
same inputs: entries sorted, fixed dates (SOURCE_DATE_EPOCH) and modes, no build paths.

The wheel holds the package ``pjsua2``: SWIG's ``pjsua2.py`` as ``pjsua2/__init__.py``
(it imports ``from . import _pjsua2`` inside a package) and the native ``_pjsua2`` module,
so ``import pjsua2 as pj`` works as with the PyPI wheel and ``pj._pjsua2.__file__`` is the
loaded library (appliance/pjhost.py calls into it through ctypes). No setuptools needed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import time
import zipfile
from pathlib import Path


def record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--tag", required=True, help="e.g. cp311-cp311-linux_x86_64")
    ap.add_argument("--module", required=True, type=Path, help="the built _pjsua2.<ext suffix>")
    ap.add_argument("--python", required=True, type=Path, help="SWIG's pjsua2.py")
    ap.add_argument("--source", required=True, help="what it was built from (recorded in METADATA)")
    ap.add_argument("--configure", required=True, help="pjproject's configure flags (recorded)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()

    dist = args.name.replace("-", "_")
    info = f"{dist}-{args.version}.dist-info"
    metadata = (
        "Metadata-Version: 2.1\n"
        f"Name: {args.name}\n"
        f"Version: {args.version}\n"
        "Summary: pjsua2, the Python bindings of PJSIP, as homepbx builds them (image/pjsua2/)\n"
        "License: GPL-2.0-or-later\n"
        "Requires-Python: >=3.11,<3.12\n"
        "\n"
        f"Built from: {args.source}\n"
        f"Configure: {args.configure}\n"
        "Limits and features: homepbx's image/pjsua2/config_site.h\n"
        "Links Debian 12's libssl3, libsrtp2-1 and libsamplerate0.\n"
    )
    wheel = (
        "Wheel-Version: 1.0\n"
        "Generator: homepbx image/pjsua2/mkwheel.py\n"
        "Root-Is-Purelib: false\n"
        f"Tag: {args.tag}\n"
    )
    files: list[tuple[str, bytes, int]] = [
        ("pjsua2/__init__.py", args.python.read_bytes(), 0o644),
        (f"pjsua2/{args.module.name}", args.module.read_bytes(), 0o755),
        (f"{info}/METADATA", metadata.encode(), 0o644),
        (f"{info}/WHEEL", wheel.encode(), 0o644),
        (f"{info}/top_level.txt", b"pjsua2\n", 0o644),
    ]
    record = "".join(f"{name},{record_hash(data)},{len(data)}\n" for name, data, _ in files)
    record += f"{info}/RECORD,,\n"
    files.append((f"{info}/RECORD", record.encode(), 0o644))

    epoch = max(int(os.environ.get("SOURCE_DATE_EPOCH", "315532800")), 315532800)  # zip: 1980 at least
    date = time.gmtime(epoch)[:6]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(args.out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data, mode in files:  # RECORD last, as PEP 427 recommends
            entry = zipfile.ZipInfo(name, date_time=date)
            entry.external_attr = (0o100000 | mode) << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(entry, data, compresslevel=9)


if __name__ == "__main__":
    main()
