"""Checks of the appliance's systemd units and of the disk image recipe's pieces.

Everything here runs on plain files, without root and in a few seconds: `systemd-analyze
verify` and `security --offline`, sysusers/tmpfiles applied to a scratch root, shellcheck, and
the image recipe's functions (ESP with mtools, ext4 with `mkfs.ext4 -d`, GPT with sfdisk)
building a tiny disk that is then read back. The full build and a boot under QEMU are in
tests/image/ (opt-in).
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
IMAGE = REPO / "image"
UNITS = ["homepbx.service", "homepbx-firstboot.service", "homepbx-console.service"]
SHELL_SCRIPTS = [
    IMAGE / "build.sh", IMAGE / "customize.sh", IMAGE / "lib.sh",
    SYSTEMD / "bin" / "homepbx-firstboot", SYSTEMD / "bin" / "pbx-shell",
    IMAGE / "rootfs-arm64" / "etc" / "initramfs-tools" / "hooks" / "homepbx-storage",
]
MAX_EXPOSURE = 2.5


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is missing: `make deps` installs it (Makefile DEB_PACKAGES)")
    return path


def run(*args: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload, no-any-return]


def service(name: str = "homepbx.service") -> dict[str, list[str]]:
    """The unit's [Service] (and [Unit]) settings; repeated keys keep every value."""
    settings: dict[str, list[str]] = {}
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture(scope="module")
def staged_units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units with /opt/homepbx pointing at stub executables, so verify can check them
    on a machine where the appliance is not installed."""
    base = tmp_path_factory.mktemp("units")
    for exe in ("opt/homepbx/venv/bin/homepbx", "opt/homepbx/bin/homepbx-firstboot",
                "opt/homepbx/bin/homepbx-console"):
        path = base / exe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    units = base / "units"
    units.mkdir()
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/homepbx", str(base / "opt/homepbx"))
        (units / name).write_text(text)
    return units


# --------------------------------------------------------------------------- units


def test_units_verify_cleanly(staged_units: Path) -> None:
    result = run(tool("systemd-analyze"), "verify", *UNITS, cwd=staged_units)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if any(name in line for name in UNITS) or str(staged_units) in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_verify_catches_a_broken_unit(staged_units: Path, tmp_path: Path) -> None:
    """The check above can fail: a typo in a key is reported."""
    broken = tmp_path / "homepbx.service"
    broken.write_text((staged_units / "homepbx.service").read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = run(tool("systemd-analyze"), "verify", broken.name, cwd=tmp_path)
    assert "NoNewPrivilege" in result.stderr


def test_security_exposure_is_at_most_2_5(staged_units: Path) -> None:
    result = run(tool("systemd-analyze"), "security", "--offline=yes", "--no-pager",
                 f"--threshold={int(MAX_EXPOSURE * 10)}", "homepbx.service", cwd=staged_units)
    match = re.search(r"Overall exposure level for homepbx\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security homepbx.service: {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stderr


def test_service_contract() -> None:
    s = service()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] and s["WatchdogSec"][0] not in ("0", "infinity")
    assert s["ExecStart"] == ["/opt/homepbx/venv/bin/homepbx run --config /etc/homepbx/config.toml"]
    assert s["User"] == ["homepbx"] and "DynamicUser" not in s
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert s["StateDirectory"] == ["homepbx"] and s["RuntimeDirectory"] == ["homepbx"]
    assert s["ReadWritePaths"] == ["/etc/homepbx"]
    families = s["RestrictAddressFamilies"][0].split()
    assert set(families) <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert s["WantedBy"] == ["multi-user.target"]


def test_firstboot_runs_before_ssh_and_console() -> None:
    s = service("homepbx-firstboot.service")
    before = " ".join(s["Before"]).split()
    assert {"ssh.service", "homepbx-console.service", "systemd-user-sessions.service"} <= set(before)
    console = service("homepbx-console.service")
    assert {"homepbx.service", "homepbx-firstboot.service"} <= set(" ".join(console["After"]).split())


def test_sshd_drop_in_forces_the_tui_on_pbx() -> None:
    text = (SYSTEMD / "sshd_config.d" / "homepbx.conf").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines[0] == "Match User pbx"
    settings = dict(line.split(None, 1) for line in lines[1:])
    assert settings["ForceCommand"] == "/opt/homepbx/bin/pbx-shell"
    for key in ("AllowTcpForwarding", "AllowStreamLocalForwarding", "AllowAgentForwarding",
                "X11Forwarding", "PermitTunnel"):
        assert settings[key] == "no", key


def test_pbx_shell_runs_only_the_tui(tmp_path: Path) -> None:
    """Whatever command sshd passes (-c ...), the shell execs the TUI on the control socket."""
    text = (SYSTEMD / "bin" / "pbx-shell").read_text()
    assert "exec /opt/homepbx/venv/bin/homepbx tui --socket /run/homepbx/control.sock" in text
    fake = tmp_path / "pbx-shell"
    recorder = tmp_path / "homepbx"
    recorder.write_text('#!/bin/sh\necho "TUI $*"\n')
    recorder.chmod(0o755)
    fake.write_text(text.replace("/opt/homepbx/venv/bin/homepbx", str(recorder)))
    result = run("sh", fake, "-c", "id; cat /etc/shadow")
    assert result.stdout == "TUI tui --socket /run/homepbx/control.sock\n", result.stdout + result.stderr


# --------------------------------------------------------------------------- users and files


@pytest.fixture
def scratch_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / name).write_text("")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


def test_sysusers_makes_the_two_users(scratch_root: Path) -> None:
    result = run(tool("systemd-sysusers"), f"--root={scratch_root}", SYSTEMD / "sysusers.d" / "homepbx.conf")
    assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (scratch_root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (scratch_root / "etc/group").read_text().splitlines()}
    assert passwd["homepbx"][6] == "/usr/sbin/nologin"
    assert int(passwd["homepbx"][2]) < 1000  # a static system user
    assert passwd["pbx"][6] == "/opt/homepbx/bin/pbx-shell"
    # pbx is in its own group and in homepbx (the control socket's group), in no other.
    member_of = {name for name, fields in groups.items() if "pbx" in fields[3].split(",")}
    assert member_of == {"homepbx"}
    assert int(passwd["pbx"][3]) == int(groups["pbx"][2])


def test_tmpfiles_makes_config_dir_private_to_the_daemon(scratch_root: Path) -> None:
    sysusers = run(tool("systemd-sysusers"), f"--root={scratch_root}", SYSTEMD / "sysusers.d" / "homepbx.conf")
    assert sysusers.returncode == 0, sysusers.stderr
    result = run(tool("systemd-tmpfiles"), f"--root={scratch_root}", "--create",
                 SYSTEMD / "tmpfiles.d" / "homepbx.conf")
    assert result.returncode == 0, result.stderr
    passwd = (scratch_root / "etc/passwd").read_text().splitlines()
    ids = {line.split(":")[0]: int(line.split(":")[2]) for line in passwd}
    for path, user in (("etc/homepbx", "homepbx"), ("var/lib/pbx", "pbx")):
        st = (scratch_root / path).stat()
        assert st.st_mode & 0o777 == 0o700, path
        if os.geteuid() == 0:
            assert st.st_uid == ids[user], path


# --------------------------------------------------------------------------- scripts


def test_shell_scripts_pass_shellcheck() -> None:
    result = run(tool("shellcheck"), "-x", "--severity=style", *SHELL_SCRIPTS, cwd=REPO)
    assert result.returncode == 0, result.stdout


def test_scripts_are_strict() -> None:
    for path in SHELL_SCRIPTS:
        if path.name in ("lib.sh", "pbx-shell", "homepbx-storage"):  # the last: an initramfs hook, POSIX sh
            continue
        assert "set -euo pipefail" in path.read_text(), path


def test_python_pieces_are_ruff_clean() -> None:
    ruff = REPO / ".venv" / "bin" / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is in the project venv (make venv)")
    result = run(ruff, "check", SYSTEMD / "bin" / "homepbx_console.py", IMAGE / "appliance_config.py", cwd=REPO)
    assert result.returncode == 0, result.stdout


def test_build_sh_explains_what_is_missing(tmp_path: Path) -> None:
    """With tools missing from PATH, --check names each and the apt-get line to install it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "id", "uname", "grep", "dirname", "sort", "tr", "cat", "sed", "printf"):
        found = shutil.which(name)
        if found:
            (bin_dir / name).symlink_to(found)
    result = run("/bin/bash", IMAGE / "build.sh", "--check", env={"PATH": str(bin_dir)})
    assert result.returncode != 0
    for tool_name, package in (("mmdebstrap", "mmdebstrap"), ("mkfs.vfat", "dosfstools"),
                               ("mcopy", "mtools"), ("sfdisk", "fdisk"), ("mkfs.ext4", "e2fsprogs"),
                               ("espeak-ng", "espeak-ng")):
        assert f"{tool_name} (Debian package {package})" in result.stderr, result.stderr
    assert re.search(r"apt-get install .*dosfstools", result.stderr)


def test_build_sh_rejects_unknown_arguments() -> None:
    result = run("/bin/bash", IMAGE / "build.sh", "--frobnicate")
    assert result.returncode != 0
    assert "unknown argument: --frobnicate" in result.stderr


# --------------------------------------------------------------------------- the disk recipe


def lib(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run("/bin/bash", "-c", f'set -euo pipefail; . "{IMAGE}/lib.sh"; {script}', env={**os.environ, **env})


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    for name in ("mkfs.vfat", "mcopy", "mkfs.ext4", "sfdisk", "debugfs"):
        tool(name)
    esp = tmp_path / "esp"
    (esp / "EFI" / "BOOT").mkdir(parents=True)
    (esp / "EFI" / "BOOT" / "BOOTX64.EFI").write_bytes(b"MZ" + b"\0" * 1000)
    (esp / "loader" / "entries").mkdir(parents=True)
    (esp / "loader" / "entries" / "homepbx-6.1.conf").write_text("title homepbx\n")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("homepbx\n")
    (root / "opt" / "homepbx" / "bin").mkdir(parents=True)
    script = root / "opt" / "homepbx" / "bin" / "pbx-shell"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    ids = {"esp": "11111111-2222-3333-4444-555555555555", "root": "66666666-7777-8888-9999-aaaaaaaaaaaa",
           "fs": "0b0c0d0e-0000-4000-8000-000000000001", "disk": "deadbeef-0000-4000-8000-000000000002"}
    disk = tmp_path / "disk.img"
    result = lib(
        f'size=$(root_size_mib "{root}"); '
        f'make_esp "{esp}" "{tmp_path}/esp.img" 40 12345678; '
        f'make_root "{root}" "{tmp_path}/root.img" "$size" {ids["fs"]}; '
        f'assemble_disk "{disk}" "{tmp_path}/esp.img" "{tmp_path}/root.img" {ids["esp"]} {ids["root"]} {ids["disk"]}; '
        'echo "$size"'
    )
    assert result.returncode == 0, result.stderr
    yield disk, {**ids, "root_mib": result.stdout.strip()}


def test_disk_has_gpt_with_esp_and_root(tiny_disk: tuple[Path, dict[str, str]]) -> None:
    disk, ids = tiny_disk
    table = json.loads(run("sfdisk", "--json", disk).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    assert table["id"].lower() == ids["disk"]
    esp, root = table["partitions"]
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    assert root["type"] == "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # root x86-64: systemd-repart grows it
    assert (esp["uuid"].lower(), root["uuid"].lower()) == (ids["esp"], ids["root"])
    assert esp["start"] == 2048 and esp["size"] == 40 * 2048
    assert root["start"] == esp["start"] + esp["size"]
    assert root["size"] == int(ids["root_mib"]) * 2048
    # Room for the backup GPT after the last partition.
    assert disk.stat().st_size >= (root["start"] + root["size"] + 33) * 512


def extract(disk: Path, start_sector: int, size_sector: int, out: Path) -> Path:
    with disk.open("rb") as src, out.open("wb") as dst:
        src.seek(start_sector * 512)
        dst.write(src.read(size_sector * 512))
    return out


def test_disk_partitions_hold_the_trees(tiny_disk: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    disk, ids = tiny_disk
    esp, root = json.loads(run("sfdisk", "--json", disk).stdout)["partitiontable"]["partitions"]
    esp_img = extract(disk, esp["start"], esp["size"], tmp_path / "esp.out")
    listing = run("mdir", "-b", "-s", "-i", esp_img, "::/", env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert "::/EFI/BOOT/BOOTX64.EFI" in listing.stdout, listing.stdout + listing.stderr
    assert "::/loader/entries/homepbx-6.1.conf" in listing.stdout
    assert esp_img.read_bytes()[82:90] == b"FAT32   "  # the FAT32 boot sector's type field
    root_img = extract(disk, root["start"], root["size"], tmp_path / "root.out")
    debugfs = tool("debugfs")
    assert run(debugfs, "-R", "cat /etc/hostname", root_img).stdout == "homepbx\n"
    stat = run(debugfs, "-R", "stat /opt/homepbx/bin/pbx-shell", root_img).stdout
    assert re.search(r"Mode:\s+0755", stat), stat
    assert re.search(r"User:\s+0\s+Group:\s+0", stat), stat  # root-owned, whoever built it
    super_block = run("dumpe2fs", "-h", root_img).stdout
    assert re.search(rf"Filesystem UUID:\s+{ids['fs']}", super_block)
    assert re.search(r"Filesystem volume name:\s+homepbx-root", super_block)


def test_root_size_leaves_headroom(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(b"x" * (10 * 1048576))
    size = int(lib(f'root_size_mib "{tmp_path}"').stdout)
    assert size % 64 == 0 and size >= 10 * 12 // 10 + 128


def test_project_version_reads_pyproject() -> None:
    result = lib(f'project_version "{REPO}/pyproject.toml"')
    import tomllib

    assert result.stdout.strip() == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# --------------------------------------------------------------------------- the appliance's config


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_appliance_config_blanks_passwords_and_is_valid(tmp_path: Path) -> None:
    appliance_config = load_module(IMAGE / "appliance_config.py", "appliance_config")
    source = (REPO / "config.toml").read_text()
    # As after `make run`: generated passwords in the repository's file must not reach the image.
    source = re.sub(r'password = ""', 'password = "Jx3-secret-from-make-run"', source)
    out = tmp_path / "config.toml"
    out.write_text(appliance_config.appliance_config(source))
    text = out.read_text()
    assert "Jx3-secret" not in text
    from appliance.config import load_config

    config = load_config(out)
    assert config.server.state_dir == Path("/var/lib/homepbx")
    assert config.control.socket == "/run/homepbx/control.sock"
    assert config.control.group == "homepbx"
    assert config.users and all(user.password == "" for user in config.users)
    assert "# One table per number." in text  # comments kept
    assert config.media.max_calls > 0


def test_appliance_config_without_media_engine(tmp_path: Path) -> None:
    """An image without pjsua2 (arm64 without a wheel) runs no media workers, and says why."""
    appliance_config = load_module(IMAGE / "appliance_config.py", "appliance_config")
    out = tmp_path / "config.toml"
    out.write_text(appliance_config.appliance_config((REPO / "config.toml").read_text(), media=False))
    from appliance.config import load_config

    config = load_config(out)
    assert (config.media.max_calls, config.media.min_idle) == (0, 0)
    assert re.search(r"^max_calls = 0 # this image has no pjsua2", out.read_text(), re.M)


def test_build_sh_rejects_unknown_architectures() -> None:
    result = run("/bin/bash", IMAGE / "build.sh", "--arch", "sparc64", "--check")
    assert result.returncode != 0
    assert "unknown architecture: sparc64" in result.stderr


# --------------------------------------------------------------------------- console banner


@pytest.fixture
def console() -> ModuleType:
    return load_module(SYSTEMD / "bin" / "homepbx_console.py", "homepbx_console")


def test_console_banner_shows_credentials(console: ModuleType, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[server]\nlisten = ["0.0.0.0:5060"]\n'
                      '[[users]]\nnumber = "100"\nname = "Grandpa"\npassword = "pw100"\n'
                      '[[users]]\nnumber = "200"\nname = "Family"\npassword = "pw\\\\200"\n')
    accounts, ports = console.read_accounts(config)
    info = console.BoxInfo(hostname="homepbx", addresses=["192.0.2.7"], service_state="active",
                           service_status="listening on 0.0.0.0:5060", pbx_password="abcd-efgh-jkmn-pqrs",
                           fingerprints=["ED25519 SHA256:xyz"], accounts=accounts, sip_ports=ports)
    lines = console.banner(info)
    assert lines[0] == "homepbx.service: ready (listening on 0.0.0.0:5060)"
    text = "\n".join(lines)
    assert "ssh pbx@192.0.2.7" in text and "password: abcd-efgh-jkmn-pqrs" in text
    assert "ED25519 SHA256:xyz" in text
    assert re.search(r"SIP 100\s+Grandpa\s+password: pw100", text)
    assert re.search(r"SIP 200\s+Family\s+password: pw\\200", text)
    assert "port 5060" in text
    # In /etc/issue a backslash is an escape: it is doubled.
    assert "pw\\\\200" in console.issue_text(lines)


def test_console_banner_when_the_service_failed(console: ModuleType, tmp_path: Path) -> None:
    accounts, _ = console.read_accounts(tmp_path / "missing.toml")
    info = console.BoxInfo(hostname="homepbx", addresses=[], service_state="failed", service_status="",
                           pbx_password="", fingerprints=[], accounts=accounts)
    lines = console.banner(info)
    assert lines[0].startswith("homepbx.service: failed")
    assert "journalctl -u homepbx" in lines[0]
    assert any("no network address yet" in line for line in lines)
    assert any("ssh pbx@homepbx.local" in line for line in lines)


def test_console_writes_to_each_console_it_can(console: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "ttyS0").write_text("")
    written = console.write_consoles("hello\n", ["ttyS0", "tty-missing"], dev=tmp_path)
    assert written == ["ttyS0"]
    assert (tmp_path / "ttyS0").read_bytes() == b"hello\r\n"


def test_firstboot_makes_keys_and_password_once(tmp_path: Path) -> None:
    """The first-boot script with ssh-keygen and chpasswd stubbed: the password is made once,
    kept on the next boot, and handed to chpasswd for the pbx user."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "calls"
    for name in ("ssh-keygen", "chpasswd"):
        stub = stubs / name
        stub.write_text(f'#!/bin/sh\necho "{name} $* $(cat 2>/dev/null)" >>"{log}"\n' if name == "chpasswd"
                        else f'#!/bin/sh\necho "{name} $*" >>"{log}"\n')
        stub.chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOMEPBX_FIRSTBOOT_DIR": str(tmp_path / "state")}
    script = SYSTEMD / "bin" / "homepbx-firstboot"
    assert run("/bin/bash", script, env=env).returncode == 0
    password = (tmp_path / "state" / "pbx-password").read_text().strip()
    assert re.fullmatch(r"([a-z2-9]{4}-){3}[a-z2-9]{4}", password)
    assert (tmp_path / "state" / "pbx-password").stat().st_mode & 0o077 == 0
    assert run("/bin/bash", script, env=env).returncode == 0
    assert (tmp_path / "state" / "pbx-password").read_text().strip() == password
    calls = log.read_text().splitlines()
    assert calls.count("ssh-keygen -A") == 2
    assert [c for c in calls if c.startswith("chpasswd")] == [f"chpasswd  pbx:{password}"]


def test_ini_files_parse() -> None:
    """The network, resolved and repart snippets are well-formed INI."""
    for path in (IMAGE / "rootfs").rglob("*"):
        if path.suffix in (".network", ".conf") and path.is_file():
            parser = configparser.ConfigParser(strict=False)
            parser.optionxform = str  # type: ignore[assignment, method-assign]
            parser.read_string(path.read_text())
            assert parser.sections(), path
