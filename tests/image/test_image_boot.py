"""The disk images, built and booted: QEMU with TCG (no KVM), UEFI firmware, user networking.

amd64: qemu-system-x86_64 -machine q35 with OVMF; arm64: qemu-system-aarch64 -M virt -cpu max
with AAVMF (Debian's qemu-efi-aarch64), the image built on this x86_64 machine through
qemu-user-static. The same checks run on both. Each is a switch of its own, as each builds a
Debian system and boots it emulated; `make test` turns both on (HOMEPBX_IMAGE_TEST=0 there
leaves both out, HOMEPBX_IMAGE_TEST_ARM64=0 the arm64 one), a bare pytest neither:

    HOMEPBX_IMAGE_TEST=1 .venv/bin/python -m pytest -s -m image tests/image          # amd64
    HOMEPBX_IMAGE_TEST_ARM64=1 .venv/bin/python -m pytest -s -m image tests/image    # arm64

Under `make test` (pytest-xdist) the two run side by side on the two workers
(tests/conftest.py).

As root, with image/build.sh's tools plus qemu-system-x86, ovmf, qemu-system-arm,
qemu-efi-aarch64, qemu-user-static, qemu-utils, sshpass and openssh-client.
HOMEPBX_IMAGE=path/to/homepbx-*-amd64.img (HOMEPBX_IMAGE_ARM64=...-arm64.img) boots an image
already built instead of building one. The guest's network is QEMU's user mode with port
forwards, inside a network namespace that has nothing but a loopback interface: the guest
reaches nothing else.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
READY_TIMEOUT = float(os.environ.get("HOMEPBX_IMAGE_BOOT_TIMEOUT", "1200"))
READY_LINE = re.compile(r"homepbx\.service: ready \(([^)]*)\)")
FAILED_LINE = re.compile(r"homepbx\.service: (failed|inactive)|Kernel panic|end Kernel panic")

pytestmark = [pytest.mark.image, pytest.mark.timeout(7200)]


@dataclass(frozen=True)
class Arch:
    """What differs between the two images and their emulated machines."""

    name: str
    root_type: str  # the root partition's GPT type (Discoverable Partitions Specification)
    efi_boot: str  # the removable-media boot loader on the ESP
    qemu: str
    firmware_code: Path
    firmware_vars: Path
    packages: str  # what to apt-get install for the emulator and its firmware
    switch: str  # the environment variable that turns this image's test on
    given: str  # the environment variable naming an image already built


AMD64 = Arch("amd64", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "BOOTX64.EFI", "qemu-system-x86_64",
             Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
             "qemu-system-x86 ovmf", "HOMEPBX_IMAGE_TEST", "HOMEPBX_IMAGE")
ARM64 = Arch("arm64", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE", "BOOTAA64.EFI", "qemu-system-aarch64",
             Path("/usr/share/AAVMF/AAVMF_CODE.fd"), Path("/usr/share/AAVMF/AAVMF_VARS.fd"),
             "qemu-system-arm qemu-efi-aarch64 qemu-user-static", "HOMEPBX_IMAGE_TEST_ARM64", "HOMEPBX_IMAGE_ARM64")


def arch_param(arch: Arch) -> object:
    return pytest.param(arch, id=arch.name, marks=pytest.mark.skipif(
        os.environ.get(arch.switch) != "1", reason=f"builds and boots the {arch.name} disk image: set {arch.switch}=1"))


@pytest.fixture(scope="module", params=[arch_param(AMD64), arch_param(ARM64)])
def arch(request: pytest.FixtureRequest) -> Arch:
    chosen: Arch = request.param
    return chosen


def need(*tools: str, arch: Arch | None = None) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        packages = arch.packages if arch else f"{AMD64.packages} {ARM64.packages}"
        pytest.fail(f"the image test needs {', '.join(missing)} (apt-get install {packages} "
                    "qemu-utils sshpass openssh-client, and image/build.sh --check)")


@dataclass
class Built:
    path: Path
    arch: Arch
    seconds: float | None


@pytest.fixture(scope="module")
def image(arch: Arch, tmp_path_factory: pytest.TempPathFactory) -> Built:
    given = os.environ.get(arch.given)
    if given:  # absolute: the VM's overlay names it as its backing file
        return Built(Path(given).resolve(), arch, None)
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (image/build.sh); run make test as root")
    out = tmp_path_factory.mktemp(f"image-{arch.name}")
    start = time.monotonic()
    result = subprocess.run([str(REPO / "image" / "build.sh"), "--arch", arch.name, "--output", str(out)],
                            capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - start
    # The build's log (its table of steps and seconds at the end) stays, as the serial log does.
    (REPO / "build").mkdir(exist_ok=True)
    (REPO / "build" / f"image-test-build-{arch.name}.log").write_text(result.stderr)
    assert result.returncode == 0, result.stderr[-5000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    size = path.stat().st_size
    print(f"\nimage build: {seconds:.0f} s, {path.name} {size / 2**20:.0f} MiB "
          f"({int(subprocess.run(['du', '-k', path], capture_output=True, text=True).stdout.split()[0]) // 1024}"
          " MiB on disk)")
    steps = result.stderr.rpartition("build.sh: the steps and their seconds:\n")[2]
    print(steps.rstrip())
    return Built(path, arch, seconds)


# --------------------------------------------------------------------------- the image, not booted


def partitions(path: Path) -> list[dict[str, object]]:
    out = subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True).stdout
    parts: list[dict[str, object]] = json.loads(out)["partitiontable"]["partitions"]
    return parts


@pytest.fixture(scope="module")
def root_fs(image: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = next(p for p in partitions(image.path) if str(p["type"]).upper() == image.arch.root_type)
    out = tmp_path_factory.mktemp("rootfs") / "root.img"
    subprocess.run(["dd", f"if={image.path}", f"of={out}", "bs=512", f"skip={root['start']}",
                    f"count={root['size']}", "conv=sparse", "status=none"], check=True)
    return out


def debugfs(fs: Path, command: str) -> str:
    return subprocess.run(["debugfs", "-R", command, str(fs)], capture_output=True, text=True, check=True).stdout


def test_image_is_a_uefi_gpt_disk(image: Built) -> None:
    parts = partitions(image.path)
    assert [str(p["type"]).upper() for p in parts] == [ESP_TYPE, image.arch.root_type]
    assert re.fullmatch(rf"homepbx-\d+\.\d+\.\d+.*-{image.arch.name}\.img", image.path.name)


def test_nothing_secret_is_baked_in(root_fs: Path) -> None:
    listing = debugfs(root_fs, "ls -l /etc/ssh")
    assert "ssh_host_" not in listing
    config = debugfs(root_fs, "cat /etc/homepbx/config.toml")
    passwords = re.findall(r'^\s*password\s*=\s*"(.*)"', config, re.M)
    assert passwords and all(p == "" for p in passwords)
    assert debugfs(root_fs, "cat /etc/machine-id").strip() == ""
    shadow = {line.split(":")[0]: line.split(":")[1] for line in debugfs(root_fs, "cat /etc/shadow").splitlines()}
    for user in ("root", "pbx", "homepbx"):
        assert shadow[user].startswith(("!", "*")), f"{user} has a password in the image"
    assert "pbx-password" not in debugfs(root_fs, "ls /var/lib")


@pytest.fixture(scope="module")
def esp(image: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    part = partitions(image.path)[0]
    out = tmp_path_factory.mktemp("esp") / "esp.img"
    subprocess.run(["dd", f"if={image.path}", f"of={out}", "bs=512", f"skip={part['start']}",
                    f"count={part['size']}", "status=none"], check=True)
    return out


MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def test_esp_has_no_random_seed(image: Built, esp: Path) -> None:
    """systemd-boot's seed is made on the box; a shipped one would be the same on every box."""
    listing = subprocess.run(["mdir", "-/", "-b", "-i", str(esp), "::/"], capture_output=True, text=True,
                             env=MTOOLS_ENV, check=True).stdout
    assert f"::/EFI/BOOT/{image.arch.efi_boot}" in listing
    assert "random-seed" not in listing


def test_fat_partition_boots_a_raspberry_pi_4(image: Built, esp: Path) -> None:
    """The arm64 image's FAT partition is also the Pi's boot partition: its firmware, the
    board's DTB, and config.txt/cmdline.txt naming a kernel, an initramfs and the root
    partition that are there. (Checked on the files only: no Pi was booted.)"""
    if image.arch is not ARM64:
        pytest.skip("the Raspberry Pi boot files are in the arm64 image only")
    listing = subprocess.run(["mdir", "-b", "-i", str(esp), "::/"], capture_output=True, text=True,
                             env=MTOOLS_ENV, check=True).stdout
    names = {line.rsplit("/", 1)[-1] for line in listing.split()}
    assert {"start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb", "config.txt", "cmdline.txt"} <= names, names

    def read(name: str) -> str:
        return subprocess.run(["mtype", "-i", str(esp), f"::/{name}"], capture_output=True, text=True,
                              env=MTOOLS_ENV, check=True).stdout

    config = read("config.txt")
    assert re.search(r"^arm_64bit=1$", config, re.M), config
    kernel = re.search(r"^kernel=(\S+)$", config, re.M)
    initramfs = re.search(r"^initramfs (\S+)", config, re.M)
    assert kernel and initramfs, config
    assert {kernel.group(1), initramfs.group(1)} <= names
    root = str(partitions(image.path)[1]["uuid"]).lower()
    cmdline = read("cmdline.txt")
    assert f"root=partuuid={root} " in cmdline.lower(), cmdline
    assert "cma=" not in cmdline, cmdline  # a cma= setting keeps a Pi 4 from booting (raspi-firmware)


def initramfs_files(data: bytes) -> list[str]:
    """The paths in an initramfs: newc cpio archives, each compressed (zstd, lz4, gzip) or
    not, one after the other."""
    names: list[str] = []
    while data:
        if data[:4] == b"\x28\xb5\x2f\xfd" or data[:4] == b"\x02\x21\x4c\x18":  # zstd, lz4 (legacy)
            tool = "zstd" if data[0] == 0x28 else "lz4"
            data = subprocess.run([tool, "-dc"], input=data, capture_output=True, check=True).stdout
            continue
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
            continue
        assert data[:6] == b"070701", data[:16]
        offset = 0
        while True:
            header = data[offset:offset + 110]
            size, name_size = int(header[54:62], 16), int(header[94:102], 16)
            name = data[offset + 110:offset + 110 + name_size - 1].decode()
            offset = (offset + 110 + name_size + 3) & ~3
            offset = (offset + size + 3) & ~3
            if name == "TRAILER!!!":
                break
            names.append(name)
        data = data[offset:].lstrip(b"\0")
    return names


# What the arm64 initramfs must hold for the boards the image is for (image/README.md):
# ext4; QEMU's virtio disk; the Pi 4's SD card host with its regulators and its USB (xHCI
# behind PCIe, its reset line); USB disks; NVMe and SATA drives of UEFI boards.
ARM64_INITRAMFS_MODULES = (
    "ext4", "virtio_pci", "virtio_blk", "sdhci-iproc", "bcm2835", "fixed", "gpio-regulator", "reset-raspberrypi",
    "xhci-pci", "xhci-plat-hcd", "dwc2", "dwc3", "usb-storage", "uas", "sd_mod", "nvme", "ahci",
    "ahci_platform", "usbhid",
)


def test_initramfs_has_the_boards_storage_modules_only(image: Built, esp: Path) -> None:
    """The arm64 initramfs (MODULES=list and image/rootfs-arm64's hook) holds the storage
    modules of QEMU's virt machine, the Pi 4 and UEFI boards, and not every module of the
    kernel (no network drivers: no network root)."""
    if image.arch is not ARM64:
        pytest.skip("the amd64 image's initramfs is Debian's MODULES=most")
    config = subprocess.run(["mtype", "-i", str(esp), "::/config.txt"], capture_output=True, text=True,
                            env=MTOOLS_ENV, check=True).stdout
    initramfs = re.search(r"^initramfs (\S+)", config, re.M)
    assert initramfs, config
    data = subprocess.run(["mtype", "-i", str(esp), f"::/{initramfs.group(1)}"], capture_output=True,
                          env=MTOOLS_ENV, check=True).stdout
    modules = {Path(name).name.split(".ko")[0]: name for name in initramfs_files(data) if ".ko" in name}
    missing = [m for m in ARM64_INITRAMFS_MODULES if m not in modules]
    assert not missing, (missing, sorted(modules))
    network = sorted(n for n in modules.values() if "/kernel/drivers/net/" in n)
    assert not network, network
    print(f"\narm64 initramfs: {len(data) / 2**20:.1f} MiB, {len(modules)} modules")


def test_image_without_pjsua2_runs_no_media_workers(image: Built, root_fs: Path) -> None:
    """An image without the media engine (arm64 without a pjsua2 wheel) says so in its
    config: max_calls = 0, so the daemon starts no worker that could only fail."""
    site = "/opt/homepbx/venv/lib/python3.11/site-packages"
    names = debugfs(root_fs, f"ls {site}").split()
    assert "uvloop" in names, names
    has_pjsua2 = "pjsua2" in names
    config = debugfs(root_fs, "cat /etc/homepbx/config.toml")
    max_calls = re.search(r"^max_calls\s*=\s*(\d+)", config, re.M)
    assert max_calls, config
    if image.arch is AMD64:
        assert has_pjsua2
    assert (int(max_calls.group(1)) > 0) == has_pjsua2, (has_pjsua2, max_calls.group(0))
    print(f"\n{image.arch.name} image: pjsua2 {'in' if has_pjsua2 else 'NOT in'} the image, {max_calls.group(0)}")


def test_no_package_cache_in_the_image(root_fs: Path) -> None:
    assert ".deb" not in debugfs(root_fs, "ls /var/cache/apt/archives")


def test_units_are_enabled(root_fs: Path) -> None:
    wants = debugfs(root_fs, "ls /etc/systemd/system/multi-user.target.wants")
    for unit in ("homepbx.service", "homepbx-firstboot.service", "homepbx-console.service",
                 "ssh.service", "systemd-networkd.service"):
        assert unit in wants


# --------------------------------------------------------------------------- the image, booted


@dataclass
class VM:
    """QEMU in a network namespace of its own that has only a loopback interface: the guest
    reaches nothing outside (its NTP or apt attempts fail at once), and the ports forwarded
    from that namespace's 127.0.0.1 are reached with nsenter."""

    process: subprocess.Popen[bytes]
    work: Path
    boot_seconds: float = 0.0
    status: str = ""
    stopped: bool = False

    @property
    def serial(self) -> Path:
        return self.work / "serial.log"

    def console(self) -> str:
        return self.serial.read_bytes().decode("utf-8", "replace").replace("\r", "")

    def netns(self, *command: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.process.pid}/ns/net", "--", *command]

    def probe(self, *args: str) -> dict[str, object]:
        result = subprocess.run(self.netns(sys.executable, "-m", "tests.image.probe", *args), cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.stdout.strip(), result.stderr
        answer: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
        return answer

    def shutdown(self, timeout: float = 300) -> None:
        """A clean power-off (ACPI button through the QEMU monitor), so the journal is on disk."""
        if self.stopped:
            return
        self.stopped = True
        with socket.socket(socket.AF_UNIX) as monitor:
            monitor.connect(str(self.work / "monitor.sock"))
            monitor.sendall(b"system_powerdown\n")
            time.sleep(1)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("the guest did not power off") from None


SIP_PORT, SSH_PORT = 5060, 2222  # in the VM's own network namespace: nothing else uses them


@pytest.fixture(scope="module")
def vm(image: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    arch = image.arch
    need(arch.qemu, "qemu-img", "unshare", "nsenter", "ip", arch=arch)
    if not arch.firmware_code.exists():
        pytest.fail(f"{arch.firmware_code} is missing: apt-get install {arch.packages}")
    if os.geteuid() != 0:
        pytest.fail("the boot test needs root (a network namespace for the guest)")
    work = tmp_path_factory.mktemp("vm")
    # A copy-on-write overlay, bigger than the image: the image stays as built, and the
    # first boot grows the root partition into the extra room.
    disk = work / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.path), str(disk), "4G"],
                   check=True)
    shutil.copy(arch.firmware_vars, work / "vars.fd")
    (work / "serial.log").touch()
    # The arm64 guest: QEMU's generic "virt" board with the most capable emulated CPU
    # (pauth-impdef: QEMU's own pointer-authentication hash, much cheaper under TCG than
    # the architected one; the guest cannot tell).
    machine_args = (["-machine", "q35"] if arch is AMD64 else
                    ["-machine", "virt", "-cpu", "max,pauth-impdef=on"])
    qemu = [
        arch.qemu, *machine_args, "-accel", "tcg", "-m", "1536", "-smp", "2",
        "-display", "none", "-serial", f"file:{work / 'serial.log'}",
        "-monitor", f"unix:{work / 'monitor.sock'},server,nowait",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={arch.firmware_code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={work / 'vars.fd'}",
        "-drive", f"if=virtio,format=qcow2,file={disk}",
        "-nic", ("user,model=virtio-net-pci,"
                 f"hostfwd=udp:127.0.0.1:{SIP_PORT}-:5060,hostfwd=tcp:127.0.0.1:{SIP_PORT}-:5060,"
                 f"hostfwd=tcp:127.0.0.1:{SSH_PORT}-:22"),
    ]
    # unshare execs: the Popen's pid is QEMU's, and /proc/PID/ns/net its namespace.
    command = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *qemu]
    start = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    machine = VM(process, work)
    try:
        while True:
            text = machine.console()
            found = READY_LINE.search(text)
            if found:
                machine.boot_seconds = time.monotonic() - start
                machine.status = found.group(1)
                break
            if FAILED_LINE.search(text):
                pytest.fail("the appliance did not come up; serial console:\n" + text[-6000:])
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"qemu exited ({process.returncode}): {output}\nserial console:\n{text[-6000:]}")
            if time.monotonic() - start > READY_TIMEOUT:
                pytest.fail(f"no ready line within {READY_TIMEOUT:.0f} s; serial console:\n" + text[-6000:])
            time.sleep(1)
        time.sleep(2)  # the banner follows the ready line in the same write
        print(f"\n{arch.name} boot to ready under TCG: {machine.boot_seconds:.0f} s ({machine.status})")
        (REPO / "build").mkdir(exist_ok=True)
        with open(REPO / "build" / f"image-test-build-{arch.name}.log", "a") as log:
            log.write(f"boot to ready under TCG: {machine.boot_seconds:.0f} s\n")
        yield machine
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        (REPO / "build").mkdir(exist_ok=True)
        log_name = "image-test-serial.log" if arch is AMD64 else f"image-test-serial-{arch.name}.log"
        shutil.copy(work / "serial.log", REPO / "build" / log_name)


def first_boot_credentials(console: str) -> tuple[str, dict[str, str]]:
    pbx = re.search(r"password: ([a-z2-9]{4}(?:-[a-z2-9]{4}){3})\s*$", console, re.M)
    sip = dict(re.findall(r"SIP (\d+)\s+.*?password: (\S+)\s*$", console, re.M))
    assert pbx and sip, "no credentials on the console:\n" + console[-4000:]
    return pbx.group(1), sip


def test_ready_line_on_the_serial_console(vm: VM) -> None:
    assert "listening on" in vm.status
    assert vm.boot_seconds > 0


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sip_options_gets_200(vm: VM, transport: str) -> None:
    assert vm.probe("options", str(SIP_PORT), transport) == {"status": 200, "reason": "OK"}


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_register_with_first_boot_credential(vm: VM, transport: str) -> None:
    _, sip = first_boot_credentials(vm.console())
    password = sip["200"]
    assert len(password) >= 16
    assert vm.probe("register", str(SIP_PORT), transport, "200", password + "x")["status"] == 403
    answer = vm.probe("register", str(SIP_PORT), transport, "200", password)
    assert answer["status"] == 200, answer


def ssh_command(password: str, *remote: str) -> list[str]:
    return ["sshpass", "-p", password, "ssh", "-p", str(SSH_PORT), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "PubkeyAuthentication=no", "-o", "LogLevel=ERROR",
            "-o", "PreferredAuthentications=password", "-o", "ConnectTimeout=60", "pbx@127.0.0.1", *remote]


ANSI = re.compile(r"\x1b(\[[0-9;?<>=$]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


def in_pty(command: list[str], until: re.Pattern[str], seconds: float, keys: bytes = b"q") -> str:
    """Run `command` on a terminal (120x40) until `until` shows in its screen output, then
    type `keys`; the output with escape sequences removed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                               env={**os.environ, "TERM": "xterm-256color"})
    os.close(slave)
    raw = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and process.poll() is None:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    raw += os.read(master, 65536)
                except OSError:
                    break
                if until.search(ANSI.sub("", raw.decode("utf-8", "replace"))):
                    os.write(master, keys)
                    time.sleep(3)
                    break
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        os.close(master)
    return ANSI.sub("", raw.decode("utf-8", "replace"))


def test_ssh_host_keys_were_made_at_first_boot_and_shown(vm: VM) -> None:
    need("ssh-keyscan", "ssh-keygen")
    scan = subprocess.run(vm.netns("ssh-keyscan", "-T", "60", "-t", "ed25519", "-p", str(SSH_PORT), "127.0.0.1"),
                          capture_output=True, text=True, timeout=120)
    assert scan.stdout.strip(), scan.stderr
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=scan.stdout, capture_output=True,
                                 text=True, check=True).stdout.split()[1]
    assert f"ED25519 {fingerprint}" in vm.console()


def test_ssh_pbx_with_a_wrong_password_is_refused(vm: VM) -> None:
    need("sshpass", "ssh")
    pbx_password, _ = first_boot_credentials(vm.console())
    wrong = subprocess.run(vm.netns(*ssh_command(pbx_password + "x", "id")), capture_output=True, text=True,
                           timeout=180)
    assert wrong.returncode == 5, wrong.stderr  # sshpass: the password was refused


def test_ssh_pbx_opens_the_tui_on_the_control_socket(vm: VM) -> None:
    """`ssh pbx@box` shows the TUI, connected (it lists the numbers of the config)."""
    pbx_password, _ = first_boot_credentials(vm.console())
    screen = in_pty(vm.netns(*ssh_command(pbx_password, "-tt")), re.compile(r"Grandpa.*Family|Family.*Grandpa", re.S),
                    seconds=300)
    assert "Grandpa" in screen and "Family" in screen, screen[-3000:]


def test_ssh_pbx_runs_nothing_but_the_tui(vm: VM) -> None:
    """A command given to ssh is not run: the forced command (the TUI) runs instead."""
    pbx_password, _ = first_boot_credentials(vm.console())
    screen = in_pty(vm.netns(*ssh_command(pbx_password, "-tt", "id; echo SHELL-ESCAPE-$((6*7))")),
                    re.compile(r"Grandpa"), seconds=300)
    assert "Grandpa" in screen, screen[-3000:]
    assert "uid=" not in screen and "SHELL-ESCAPE-42" not in screen, screen[-3000:]


def test_ssh_pbx_reads_the_voice_messages_and_nothing_else(vm: VM) -> None:
    """`scp 'pbx@box:200/*.wav' .` works: the pbx login's SFTP starts in the answering
    machine's store, read-only; the config (the SIP passwords) is out of its reach."""
    need("sshpass", "sftp")
    pbx_password, _ = first_boot_credentials(vm.console())
    command = ssh_command(pbx_password)
    # sftp -b turns password logins off (BatchMode); the first -o given wins, so on again.
    sftp = ["sshpass", "-p", pbx_password, "sftp", "-P", str(SSH_PORT), *command[6:-1], "-o", "BatchMode=no",
            "-b", "-", "pbx@127.0.0.1"]
    listing = subprocess.run(vm.netns(*sftp), input="pwd\nls -la\n", capture_output=True, text=True, timeout=180)
    assert listing.returncode == 0, listing.stderr
    assert "/var/lib/homepbx/voicemail" in listing.stdout, listing.stdout
    for forbidden in ("mkdir intruder", "get /etc/homepbx/config.toml /dev/null",
                      "get /var/lib/homepbx/history.sqlite3 /dev/null"):
        tried = subprocess.run(vm.netns(*sftp), input=forbidden + "\n", capture_output=True, text=True, timeout=180)
        assert tried.returncode != 0, (forbidden, tried.stdout, tried.stderr)


# --------------------------------------------------------------------------- after a clean power-off


@pytest.fixture(scope="module")
def journal(vm: VM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest's persistent journal, read from its disk after a clean power-off."""
    need("journalctl", "debugfs", "qemu-img")
    vm.shutdown()
    out = tmp_path_factory.mktemp("journal")
    raw = out / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vm.work / "disk.qcow2"), str(raw)], check=True)
    root = partitions(raw)[1]
    fs = out / "root.img"
    subprocess.run(["dd", f"if={raw}", f"of={fs}", "bs=512", f"skip={root['start']}", f"count={root['size']}",
                    "conv=sparse", "status=none"], check=True)
    raw.unlink()
    subprocess.run(["debugfs", "-R", f"rdump /var/log/journal {out}", str(fs)], capture_output=True, check=True)
    return out / "journal"


def journal_entries(directory: Path, *args: str) -> list[dict[str, str]]:
    out = subprocess.run(["journalctl", "-D", str(directory), "-o", "json", "--no-pager", *args],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_journal_has_the_daemon_logs_with_levels(journal: Path) -> None:
    entries = journal_entries(journal, "-u", "homepbx.service")
    daemon = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "homepbx" and isinstance(e.get("MESSAGE"), str)]
    priorities = {re.search(r"event=(\w+)", e["MESSAGE"]).group(1): e["PRIORITY"]  # type: ignore[union-attr]
                  for e in daemon if "event=" in e["MESSAGE"]}
    assert priorities.get("password_generated") == "4"  # warning
    assert priorities.get("ready") == "6"  # info
    assert "stopped" in priorities  # the power-off stopped it cleanly
    errors = [e["MESSAGE"] for e in daemon if int(e["PRIORITY"]) <= 3 or "Traceback" in e["MESSAGE"]]
    assert not errors, "\n".join(errors)


def test_first_boot_grew_the_root_file_system(journal: Path) -> None:
    # systemd-growfs says so, but its line is sometimes lost that early in the boot; the
    # kernel's own line about the resize is the other witness.
    entries = journal_entries(journal, "-u", "systemd-growfs@-.service") + journal_entries(journal, "-k")
    messages = [str(e.get("MESSAGE")) for e in entries]
    resized = [m for m in messages if "Successfully resized" in m or "resized filesystem to" in m]
    assert resized, [m for m in messages if "growfs" in m.lower() or "EXT4" in m]


def test_no_unit_failed(journal: Path) -> None:
    failed = [str(e.get("MESSAGE")) for e in journal_entries(journal, "-p", "err", "_PID=1")]
    assert not failed, "\n".join(failed)
