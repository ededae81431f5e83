"""Where this code lives: child processes (`python -m appliance....`) start there."""

from __future__ import annotations

from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
"""The directory that holds the `appliance` package (the checkout, or site-packages)."""
