"""`python -m tui [--socket PATH]` (also `homepbx tui`): the terminal UI of homepbx."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tui.paths import find_socket


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="homepbx tui", description="the homepbx terminal UI")
    parser.add_argument("--socket", type=Path, help="the daemon's control socket")
    parser.add_argument("--config", type=Path, default=Path(os.environ.get("HOMEPBX_CONFIG", "config.toml")),
                        help="config file, to find the socket when --socket is not given")
    parser.add_argument("--daemon-log", type=Path, help="daemon log to quote when it is not running")
    parser.add_argument("--theme", help="a Textual theme (default: by the terminal's colours)")
    args = parser.parse_args(argv)
    from tui.app import HomePbxApp  # after argument errors: --help stays fast

    trace = os.environ.get("HOMEPBX_TUI_TRACE")
    app = HomePbxApp(find_socket(args.socket, args.config), daemon_log=args.daemon_log,
                     theme_name=args.theme, trace_path=Path(trace) if trace else None)
    try:
        app.run()
    except KeyboardInterrupt:
        return 130
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
