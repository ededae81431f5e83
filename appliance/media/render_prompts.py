"""The answering machine's spoken prompts: their texts, and rendering them to WAV files.

``python -m appliance.media.render_prompts [DIR]`` (``make prompts``; the disk image's
build does the same) renders every prompt with Debian's ``espeak-ng`` to ``DIR/<name>.wav``
(default: ``appliance/media/prompts/``, gitignored; the wheel carries them as package data,
so the appliance has them next to the worker). A prompt file that is missing is played as a
short tone (:mod:`.answering`), so nothing fails without them. Pure stdlib.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from appliance.media import protocol as P

PROMPTS_DIR = Path(__file__).resolve().parent / P.PROMPTS_DIR_NAME
PROMPTS: dict[str, str] = {
    "greeting": "The person you are calling is not available. Please leave a message after the tone.",
    "you_have": "You have",
    "new_messages": "new messages,",
    "old_messages": "and old messages.",
    "menu": "Press 1 to listen, 2 for the next message, 3 to delete it, 4 to record your greeting, "
            "0 to hear this again.",
    "after_message": "Press 1 to hear it again, 2 for the next message, 3 to delete it.",
    "message": "Message.",
    "no_messages": "There are no messages.",
    "no_more_messages": "There are no more messages.",
    "deleted": "Message deleted.",
    "record_greeting": "Record your greeting after the tone. Press hash when you are done.",
    "greeting_saved": "Your greeting is saved.",
    "greeting_not_saved": "Nothing was recorded. Your greeting is unchanged.",
    "many": "many",
    **{f"n{i}": word for i, word in enumerate((
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"))},
}
"""Prompt name -> what it says (English)."""
VOICE = ("-v", "en-us", "-s", "150")
"""A calm speed a family understands on a handset."""


def render(directory: Path = PROMPTS_DIR, espeak: str = "espeak-ng") -> list[Path]:
    """Render every prompt to `directory` (each written to a temp file, then renamed)."""
    exe = shutil.which(espeak)
    if exe is None:
        raise FileNotFoundError(f"{espeak} not found (Debian package espeak-ng)")
    directory.mkdir(parents=True, exist_ok=True)
    done = []
    for name, text in PROMPTS.items():
        target = directory / f"{name}.wav"
        tmp = directory / f".{name}.wav.tmp"
        subprocess.run([exe, *VOICE, "-w", str(tmp), text], check=True, capture_output=True, timeout=60)
        os.replace(tmp, target)
        done.append(target)
    return done


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0]) if args else PROMPTS_DIR
    try:
        done = render(directory)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"render_prompts: {exc}", file=sys.stderr)
        return 1
    print(f"render_prompts: {len(done)} prompts in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
