"""Kamailio (Debian's `kamailio`) as a telephone provider nobody here wrote, for the tests.

A registrar with digest auth (db_text subscriber table, plain passwords) on a loopback
address of its own (127.0.0.2) and a free port, over UDP and TCP alike; state, database, control socket and log
in a private directory. Every REGISTER and OPTIONS it receives is logged by xlog, so a
test can count them; `contacts()` asks it (`kamcmd ul.dump`) what is registered. It is
also the provider's proxy: an INVITE from one of its own users (digest, 407) goes to
whoever is registered under the Request-URI's user (`lookup("location")`, the box for its
DID), record-routed, so the rest of the dialog crosses it too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.support.ports import free_port

HOST = "127.0.0.2"
MODULES = ("kex", "corex", "tm", "sl", "pv", "maxfwd", "usrloc", "registrar", "textops", "siputils", "xlog",
           "sanity", "db_text", "auth", "auth_db", "ctl", "rr")

CONFIG = """#!KAMAILIO
debug=2
log_stderror=yes
children=1
auto_aliases=no
dns=no
rev_dns=no
server_header="Server: kamailio-test-provider"

{loadmodules}
modparam("ctl", "binrpc", "unix:{ctl}")
modparam("usrloc", "db_mode", 0)
modparam("registrar", "default_expires", 300)
modparam("registrar", "min_expires", 10)
modparam("registrar", "max_expires", 3600)
modparam("auth", "algorithm", "{algorithm}")
modparam("auth_db", "db_url", "text://{db}")
modparam("auth_db", "calculate_ha1", yes)
modparam("auth_db", "password_column", "password")
modparam("auth_db", "use_domain", 0)
modparam("auth_db", "load_credentials", "")

request_route {{
    if (is_method("OPTIONS")) {{
        xlog("L_NOTICE", "PROVIDER OPTIONS from $si:$sp\\n");
        sl_send_reply("200", "Keepalive");
        exit;
    }}
    if (is_method("REGISTER")) {{
        xlog("L_NOTICE", "PROVIDER REGISTER from $si:$sp proto=$pr contact=$ct\\n");
        if (!auth_check("$td", "subscriber", "1")) {{
            auth_challenge("$td", "1");
            exit;
        }}
        consume_credentials();
        if (save("location")) {{
            xlog("L_NOTICE", "PROVIDER SAVED $tu contact=$ct\\n");
        }}
        exit;
    }}
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (has_totag()) {{
        if (loose_route()) {{
            t_relay();
        }} else if (is_method("ACK")) {{
            if (t_check_trans()) {{
                t_relay();
            }}
        }} else {{
            sl_send_reply("404", "Not Here");
        }}
        exit;
    }}
    if (is_method("CANCEL")) {{
        if (t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}
    if (is_method("INVITE")) {{
        if (!auth_check("$fd", "subscriber", "1")) {{
            auth_challenge("$fd", "1");
            exit;
        }}
        consume_credentials();
        xlog("L_NOTICE", "PROVIDER INVITE from $fU to $rU proto=$pr\n");
        record_route();
        if (!lookup("location")) {{
            sl_send_reply("404", "Not Found");
            exit;
        }}
        t_relay();
        exit;
    }}
    sl_send_reply("405", "Method Not Allowed");
}}
"""


DID = "4930123456"
"""The family's account at the provider (its number and user name), in the trunk tests."""
PASSWORD = "provider-pw"
OUTSIDE = "4930999999"
"""An outside phone, registered at the provider."""
OUTSIDE_PASSWORD = "outside-pw"


def available() -> bool:
    return shutil.which("kamailio") is not None and shutil.which("kamcmd") is not None


class Kamailio:
    """One Kamailio process; `start()` again after `stop()` is the provider coming back."""

    def __init__(self, directory: Path, users: dict[str, str], *, port: int | None = None,
                 algorithm: str = "MD5") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.users = users
        self.port = port or free_port(HOST)
        self.algorithm = algorithm
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "kamailio.log"
        self.ctl = self.dir / "ctl.sock"
        self.cfg = self.dir / "kamailio.cfg"

    @property
    def server(self) -> str:
        return f"{HOST}:{self.port}"

    def _write(self) -> None:
        db = self.dir / "db"
        db.mkdir(exist_ok=True)
        (db / "version").write_text("table_name(string) table_version(int)\nsubscriber:7\nlocation:9\n")
        rows = ["id(int,auto) username(string) domain(string) password(string) ha1(string,null) ha1b(string,null)"]
        rows += [f"{i}:{user}:{HOST}:{password}::" for i, (user, password) in enumerate(self.users.items(), 1)]
        (db / "subscriber").write_text("\n".join(rows) + "\n")
        (self.dir / "run").mkdir(exist_ok=True)
        loadmodules = "\n".join(f'loadmodule "{m}.so"' for m in MODULES)
        self.cfg.write_text(CONFIG.format(loadmodules=loadmodules, ctl=self.ctl, db=db, algorithm=self.algorithm))

    def start(self, timeout: float = 10.0) -> Kamailio:
        self._write()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            ["kamailio", "-DD", "-E", "-f", str(self.cfg), "-l", f"udp:{HOST}:{self.port}",
             "-l", f"tcp:{HOST}:{self.port}",
             "-Y", str(self.dir / "run"), "-w", str(self.dir / "run"), "-m", "32", "-M", "8"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("kamailio failed to start:\n" + self.log()[-3000:])
            if self.ctl.exists() and self._rpc("core.version").returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError("kamailio did not come up:\n" + self.log()[-3000:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only its children
            self.proc.wait()
        self.ctl.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def count(self, what: str) -> int:
        """Requests of a kind (`REGISTER`, `OPTIONS`, `SAVED`) seen so far, over every run."""
        return len(re.findall(rf"PROVIDER {what} ", self.log()))

    def _rpc(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["kamcmd", "-s", f"unix:{self.ctl}", *command], capture_output=True, text=True,
                              timeout=5, check=False)

    def contacts(self) -> list[str]:
        """The contacts registered now (`kamcmd ul.dump`)."""
        result = self._rpc("ul.dump")
        return re.findall(r"Address:\s*(\S+)", result.stdout)

    def wait_contact(self, timeout: float, poll: float = 0.05) -> float:
        """Seconds until a contact is registered; AssertionError after `timeout`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.contacts():
                return time.monotonic() - start
            time.sleep(poll)
        raise AssertionError(f"no contact at the provider after {timeout} s:\n{self.log()[-2000:]}")
