"""Make the appliance's /etc/homepbx/config.toml from the repository's config.toml.

Comments and layout are kept (tomlkit). What changes for the appliance:
- every SIP password is emptied, so the daemon generates new ones at first boot and nothing
  secret is baked into the image (`make run` writes generated passwords into config.toml);
- `server.state_dir` is `/var/lib/homepbx` (systemd's StateDirectory=);
- `[control]` puts the socket in `/run/homepbx` (RuntimeDirectory=) for group `homepbx`, the
  group of the `pbx` login.

With --no-media (an image without pjsua2, the media engine: arm64 without a pjsua2 wheel),
`[media] max_calls = 0`: the daemon starts no media workers, calls go between the handsets
without it (no join, no answering machine, no feature-code tones).

Usage: python appliance_config.py [--no-media] SOURCE DEST
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomlkit

STATE_DIR = "/var/lib/homepbx"
CONTROL_SOCKET = "/run/homepbx/control.sock"
CONTROL_GROUP = "homepbx"


NO_MEDIA_COMMENT = "this image has no pjsua2: no media workers, calls go handset to handset (image/README.md)"


def appliance_config(text: str, *, media: bool = True) -> str:
    doc = tomlkit.parse(text)
    server = doc.setdefault("server", tomlkit.table())
    server["state_dir"] = STATE_DIR
    control = doc.get("control")
    if control is None:
        control = tomlkit.table()
        control.add(tomlkit.comment("The terminal UI (`ssh pbx@box`) talks to the daemon here."))
        doc["control"] = control
    control["socket"] = CONTROL_SOCKET
    control["group"] = CONTROL_GROUP
    for user in doc.get("users", []):
        user["password"] = ""
    if not media:
        section = doc.setdefault("media", tomlkit.table())
        section["max_calls"] = tomlkit.integer(0).comment(NO_MEDIA_COMMENT)
        section["min_idle"] = 0
    return tomlkit.dumps(doc)


def main(argv: list[str]) -> int:
    media = "--no-media" not in argv
    argv = [a for a in argv if a != "--no-media"]
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    source, dest = map(Path, argv)
    dest.write_text(appliance_config(source.read_text(encoding="utf-8"), media=media), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
