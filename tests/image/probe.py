"""SIP probes for the image test, run inside the VM's network namespace (through nsenter).

    python -m tests.image.probe options PORT TRANSPORT
    python -m tests.image.probe register PORT TRANSPORT NUMBER PASSWORD

Prints one JSON object: the final response's status and reason, or the error.
"""

from __future__ import annotations

import json
import sys

from tests.support.rawsip import RawClient


def main(argv: list[str]) -> int:
    action, port, transport = argv[0], int(argv[1]), argv[2]
    client = RawClient(port, transport, timeout=20)
    try:
        if action == "options":
            client.send(client.request("OPTIONS", "sip:home.arpa", "100"))
            response = client.recv()
        elif action == "register":
            response = client.register(argv[3], argv[4])
        else:
            raise SystemExit(f"unknown probe {action!r}")
    except OSError as err:
        print(json.dumps({"error": repr(err)}))
        return 1
    finally:
        client.close()
    print(json.dumps({"status": response.status, "reason": response.reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
