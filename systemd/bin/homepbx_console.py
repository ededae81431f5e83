#!/usr/bin/python3
"""homepbx-console: show how to reach the box, on its screen, its serial console and /etc/issue.

Run once per boot by homepbx-console.service, after homepbx.service is up (it has then
written generated SIP passwords into the config) and after homepbx-firstboot.service (the pbx
password and the SSH host keys exist). Secrets go to the consoles and to a root-only issue
file, never to the journal. Standard library only: it runs on Debian's python3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

CONFIG = Path("/etc/homepbx/config.toml")
PBX_PASSWORD = Path("/var/lib/homepbx-firstboot/pbx-password")
ISSUE = Path("/etc/issue.d/homepbx.issue")
SSH_DIR = Path("/etc/ssh")
ACTIVE_CONSOLES = Path("/sys/class/tty/console/active")
SERVICE = "homepbx.service"


@dataclass
class Account:
    number: str
    name: str
    password: str


@dataclass
class BoxInfo:
    hostname: str
    addresses: list[str]
    service_state: str  # "active", "failed", ...
    service_status: str  # the daemon's STATUS= text, e.g. "listening on 0.0.0.0:5060"
    pbx_password: str
    fingerprints: list[str]
    accounts: list[Account]
    sip_ports: list[str] = field(default_factory=lambda: ["5060"])


def read_accounts(path: Path) -> tuple[list[Account], list[str]]:
    """SIP accounts and listening ports from the daemon's config (empty if unreadable)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [], []
    accounts = [
        Account(str(u.get("number", "")), str(u.get("name", "")), str(u.get("password", "")))
        for u in data.get("users", [])
        if isinstance(u, dict)
    ]
    listen = data.get("server", {}).get("listen", ["0.0.0.0:5060"])
    ports = sorted({str(item).rsplit(":", 1)[-1] for item in listen if isinstance(item, str)})
    return accounts, ports


def service_ready_line(state: str, status: str) -> str:
    """The line the boot test waits for on the serial console."""
    if state == "active":
        return f"{SERVICE}: ready ({status or 'running'})"
    return f"{SERVICE}: {state or 'unknown'}; see `journalctl -u homepbx`"


def banner(info: BoxInfo) -> list[str]:
    address = info.addresses[0] if info.addresses else ""
    host = address or f"{info.hostname}.local"
    rule = "=" * 72
    lines = [service_ready_line(info.service_state, info.service_status), rule]
    lines.append(f" homepbx on {info.hostname}: "
                 + (", ".join(info.addresses) if info.addresses else "no network address yet (is the cable in?)"))
    lines += [
        "",
        " Manage it from a computer on this network:",
        f"   ssh pbx@{host}" + (f"    (or ssh pbx@{info.hostname}.local)" if address else ""),
        f"   password: {info.pbx_password or '(not generated yet)'}",
    ]
    if info.fingerprints:
        lines.append(" SSH host key fingerprints (check them at the first connection):")
        lines += [f"   {fp}" for fp in info.fingerprints]
    ports = "/".join(info.sip_ports) or "5060"
    lines += ["", f" Handsets: registrar {host}, port {ports}, UDP or TCP; user = auth name = number"]
    if info.accounts:
        width = max(len(a.name) for a in info.accounts)
        for account in info.accounts:
            password = account.password or "(generated when the PBX starts)"
            lines.append(f"   SIP {account.number:<6} {account.name:<{width}}  password: {password}")
    else:
        lines.append("   (no SIP accounts configured)")
    lines.append(rule)
    return lines


def issue_text(lines: list[str]) -> str:
    """agetty treats backslashes as escapes; double them."""
    return "\n".join(line.replace("\\", "\\\\") for line in lines) + "\n\n"


def write_consoles(text: str, names: list[str], dev: Path = Path("/dev")) -> list[str]:
    """Write to each console device; a console that cannot be written is skipped."""
    written = []
    data = text.replace("\n", "\r\n").encode()
    for name in names:
        try:
            fd = os.open(dev / name, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.write(fd, data)
            written.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return written


def active_consoles() -> list[str]:
    try:
        names = ACTIVE_CONSOLES.read_text().split()
    except OSError:
        names = []
    return names or ["console"]


def global_addresses(wait: float) -> list[str]:
    """IPv4 addresses of the box (waits up to `wait` seconds for DHCP)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            out = subprocess.run(["ip", "-j", "-4", "addr", "show", "scope", "global"],
                                 capture_output=True, text=True, timeout=5, check=True).stdout
            found = [a["local"] for link in json.loads(out or "[]") for a in link.get("addr_info", [])]
        except (OSError, subprocess.SubprocessError, ValueError, KeyError):
            found = []
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(1)


def fingerprints(ssh_dir: Path) -> list[str]:
    result = []
    for pub in sorted(ssh_dir.glob("ssh_host_*_key.pub")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True,
                                 timeout=5, check=True).stdout.split()
            # "256 SHA256:abc... root@host (ED25519)"
            result.append(f"{out[-1].strip('()')} {out[1]}")
    return result


def service_state() -> tuple[str, str]:
    try:
        out = subprocess.run(["systemctl", "show", "-p", "ActiveState", "-p", "StatusText", SERVICE],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", ""
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return props.get("ActiveState", "unknown"), props.get("StatusText", "")


def gather(config: Path, wait: float) -> BoxInfo:
    accounts, ports = read_accounts(config)
    state, status = service_state()
    try:
        pbx_password = PBX_PASSWORD.read_text().strip()
    except OSError:
        pbx_password = ""
    return BoxInfo(
        hostname=os.uname().nodename,
        addresses=global_addresses(wait),
        service_state=state,
        service_status=status,
        pbx_password=pbx_password,
        fingerprints=fingerprints(SSH_DIR),
        accounts=accounts,
        sip_ports=ports or ["5060"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for an address")
    args = parser.parse_args(argv)
    lines = banner(gather(args.config, args.wait))
    text = "\n" + "\n".join(lines) + "\n"
    written = write_consoles(text, active_consoles())
    ISSUE.parent.mkdir(parents=True, exist_ok=True)
    tmp = ISSUE.with_suffix(".tmp")
    tmp.write_text(issue_text(lines))
    tmp.chmod(0o600)
    tmp.replace(ISSUE)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["agetty", "--reload"], timeout=5, check=False)
    # The journal gets the summary, without secrets.
    print(f"{lines[0]}; shown on {', '.join(written) or 'no console'} and in {ISSUE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
