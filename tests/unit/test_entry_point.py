"""`homepbx` works from any directory, on the build `make` made (compiled or not).

`make run` starts the console script, whose sys.path holds the venv, not the repository: a
compiled module that only imports from the repository's root (mypyc's shared library once
lived there) breaks the product while every test that runs `python -m appliance` from the
repository still passes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECK = (
    "import appliance.edge.server, appliance.sip.message as m\n"
    "print('compiled' if m.__file__.endswith('.so') else 'source')\n"
)


def test_daemon_modules_import_outside_the_repository(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = any((REPO / "appliance" / "sip").glob("message.*.so"))
    assert result.stdout.strip() == ("compiled" if built else "source")


def test_console_script_runs_outside_the_repository(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "homepbx"
    result = subprocess.run([str(script), "check-config", "--config", str(REPO / "config.toml")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
