#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Build homepbx-<version>-<arch>.img: a raw GPT disk, UEFI-bootable (systemd-boot), Debian 12
# with homepbx in a venv, its units enabled, DHCP on the wired interface and SSH. The arm64
# image also carries the Raspberry Pi 4 firmware's boot files on the same FAT partition.
#
# Runs as root on a Debian 12 x86_64 machine and needs no loop device, no mount of the image
# and no KVM: mmdebstrap makes the root tree (for arm64 through qemu-user-static and
# binfmt_misc), `mkfs.ext4 -d` turns it into a file system, mtools fills the EFI system
# partition, sfdisk writes the partition table and dd puts the two file systems in place.
# See image/README.md.
#
# Usage: image/build.sh [--arch amd64|arm64] [--output DIR] [--check]
#   --arch ARCH   the image's architecture (default amd64)
#   --output DIR  where the image goes (default: build/image in the repository)
#   --check       only check that everything the build needs is there
# Environment:
#   HOMEPBX_DEBIAN_MIRROR  Debian mirror (default http://deb.debian.org/debian)
#   HOMEPBX_SECURITY_MIRROR  (default http://deb.debian.org/debian-security)
#   HOMEPBX_APT_CACHE      downloaded .debs are kept here between builds
#                          (default /var/cache/homepbx-image/apt; "" to keep none)
#   HOMEPBX_PJSUA2_WHEEL_ARM64  a pjsua2 wheel for the arm64 image (default: the one in
#                          build/pjsua2/arm64/ if there is one); without it the arm64 image
#                          has no media engine and its config has `[media] max_calls = 0`
set -euo pipefail

IMAGE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$IMAGE_DIR/.." && pwd)
# shellcheck source=lib.sh
. "$IMAGE_DIR/lib.sh"

SUITE=bookworm
ARCH=amd64
ESP_MIB=256
MIRROR=${HOMEPBX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${HOMEPBX_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
APT_CACHE=${HOMEPBX_APT_CACHE-/var/cache/homepbx-image/apt}
OUTPUT=$REPO/build/image
CHECK_ONLY=0
VENV=$REPO/.venv
PJSUA2_DIR=$REPO/build/pjsua2/amd64 # the venv's (amd64 images only)

# What goes into the image besides Debian's minimal base (the kernel comes with the
# architecture, below).
PACKAGES=(
    systemd systemd-sysv udev dbus systemd-resolved systemd-timesyncd
    systemd-boot initramfs-tools zstd firmware-realtek
    openssh-server python3 python3-venv ca-certificates iproute2 netbase kmod less
    libssl3 libsrtp2-1 libsamplerate0 # what our pjsua2 wheel links (image/pjsua2/build.sh)
)

usage() {
    sed -n '3,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

while (($#)); do
    case $1 in
        --arch) [ $# -ge 2 ] || die "--arch needs amd64 or arm64"; ARCH=$2; shift 2 ;;
        --arch=*) ARCH=${1#--arch=}; shift ;;
        --output) [ $# -ge 2 ] || die "--output needs a directory"; OUTPUT=$2; shift 2 ;;
        --output=*) OUTPUT=${1#--output=}; shift ;;
        --check) CHECK_ONLY=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

case $ARCH in x86_64) ARCH=amd64 ;; aarch64) ARCH=arm64 ;; esac # the kernel's names for them
# What differs between the architectures: the kernel, the boot loader's file name on the ESP,
# the root partition's GPT type, the serial console, the wheels pip fetches and whether the
# hot path is compiled (mypyc builds for the build machine, x86_64, only).
case $ARCH in
    amd64)
        PACKAGES+=(linux-image-amd64)
        EFI_BOOT_FILE=BOOTX64.EFI
        ROOT_TYPE=$ROOT_X86_64_TYPE
        SERIAL_CONSOLE=ttyS0
        PIP_ARCH=x86_64
        NATIVE=1
        ;;
    arm64)
        # raspi-firmware: the Raspberry Pi's boot firmware (start4.elf, fixup4.dat) and the
        # kernel hook that puts the kernel, initramfs, DTBs, config.txt and cmdline.txt into
        # /boot/firmware (the FAT partition, shared with the ESP: customize.sh).
        PACKAGES+=(linux-image-arm64 raspi-firmware)
        EFI_BOOT_FILE=BOOTAA64.EFI
        ROOT_TYPE=$ROOT_ARM64_TYPE
        SERIAL_CONSOLE=ttyAMA0
        PIP_ARCH=aarch64
        NATIVE=0
        # The kernel and initramfs are on the FAT partition twice (systemd-boot's entry and
        # the Pi's copy), about 75 MB each time, and a kernel update holds two versions.
        ESP_MIB=512
        ;;
    *) usage >&2; die "unknown architecture: $ARCH (amd64 or arm64)" ;;
esac

# binfmt_misc with qemu-aarch64 registered (with the F flag, Debian's qemu-user-static
# default), so that the arm64 tree's programs run in the chroot.
ensure_binfmt() {
    local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
    [ -e /proc/sys/fs/binfmt_misc/register ] ||
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
    if ! grep -qx enabled "$entry" 2>/dev/null; then
        if command -v update-binfmts >/dev/null && [ -e /usr/share/binfmts/qemu-aarch64 ]; then
            update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
            update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
        fi
        if ! grep -qx enabled "$entry" 2>/dev/null && [ -e /usr/lib/binfmt.d/qemu-aarch64.conf ]; then
            /usr/lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf || true
        fi
    fi
    grep -qx enabled "$entry" 2>/dev/null || die "qemu-aarch64 is not registered with binfmt_misc (apt-get install qemu-user-static)"
    grep -q '^flags:.*F' "$entry" || die "qemu-aarch64 is registered without the F flag: it cannot run in a chroot"
}

check_requirements() {
    local ok=1
    [ "$(uname -m)" = x86_64 ] || { echo "build.sh: this builds the image on an x86_64 machine" >&2; ok=0; }
    if [ "$(id -u)" != 0 ]; then
        echo "build.sh: run as root (mmdebstrap installs packages into a chroot): sudo $0" >&2
        ok=0
    fi
    if ! grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then
        echo "build.sh: warning: written for a Debian 12 (bookworm) build machine" >&2
    fi
    need_tools mmdebstrap=mmdebstrap mkfs.ext4=e2fsprogs mkfs.vfat=dosfstools mcopy=mtools \
        sfdisk=fdisk python3=python3 du=coreutils truncate=coreutils espeak-ng=espeak-ng || ok=0
    if [ "$ARCH" = arm64 ]; then
        need_tools qemu-aarch64-static=qemu-user-static || ok=0
    fi
    if ! [ -x "$VENV/bin/pip" ] || ! [ -x "$VENV/bin/homepbx" ]; then
        echo "build.sh: the project's venv ($VENV) is missing: run \`make venv\` first (or \`make image\`)" >&2
        ok=0
    fi
    # Our pjsua2 wheel, as `make venv` built it for the current inputs (image/pjsua2/build.sh).
    if [ "$ARCH" = amd64 ] && { [ "$(cat "$PJSUA2_DIR/KEY" 2>/dev/null)" != "$(ARCH=amd64 "$IMAGE_DIR/pjsua2/build.sh" --key)" ] ||
        ! compgen -G "$PJSUA2_DIR/homepbx_pjsua2-*.whl" >/dev/null; }; then
        echo "build.sh: the pjsua2 wheel in $PJSUA2_DIR is missing or stale: run \`make venv\` first (or \`make image\`)" >&2
        ok=0
    fi
    ((ok))
}

case $OUTPUT in /*) ;; *) OUTPUT=$PWD/$OUTPUT ;; esac
check_requirements || exit 1
if ((CHECK_ONLY)); then
    echo "build.sh: everything the build needs is there"
    exit 0
fi
[ "$ARCH" = amd64 ] || ensure_binfmt

VERSION=$(project_version "$REPO/pyproject.toml")
IMAGE=$OUTPUT/homepbx-$VERSION-$ARCH.img
mkdir -p "$OUTPUT"
WORK=$(mktemp -d "$OUTPUT/.work.XXXXXX")
chmod 0755 "$WORK" # apt's _apt user downloads into it
cleanup() {
    # The root tree holds device nodes and root-owned files: remove it whatever happened.
    rm -rf "$WORK"
}
trap cleanup EXIT
START=$SECONDS
# Every log line (customize.sh's too) goes into this file with its time: the table of the
# steps and what each took ends the build's log.
export HOMEPBX_PHASE_LOG=$WORK/phases
: >"$HOMEPBX_PHASE_LOG"

# 1. The application: a wheel of this repository (its hot path compiled by mypyc, setup.py;
#    plain Python for arm64) plus its dependencies, exactly the versions installed in the
#    tested venv (.venv), as wheels for the image's python3.11 on the image's architecture.
log "wheels: homepbx $VERSION ($ARCH) and its pinned dependencies"
WHEELS=$WORK/wheels
mkdir -p "$WHEELS" "$WORK/src"
# Built from a clean copy of the sources, so nothing of the repository's own build/ (older
# compiled modules, files this root-run script would leave root-owned) gets in, and with the
# tested venv's setuptools and mypy (pinned there), which also see every dependency mypyc
# type-checks against.
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./state --exclude='*.so' \
    --exclude=__pycache__ --exclude=.mypy_cache --exclude=.pytest_cache --exclude=.ruff_cache \
    --exclude=.hypothesis -cf - . | tar -C "$WORK/src" -xf -
# The answering machine's spoken prompts, rendered here (espeak-ng) so the wheel carries them.
PYTHONPATH="$WORK/src" "$VENV/bin/python" -m appliance.media.render_prompts "$WORK/src/appliance/media/prompts" >/dev/null
HOMEPBX_NATIVE=$NATIVE "$VENV/bin/pip" wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WHEELS" "$WORK/src"
"$VENV/bin/pip" freeze --exclude-editable --local | grep -v '^homepbx' >"$WORK/constraints.txt"
PLATFORMS=(--platform "manylinux2014_$PIP_ARCH" --platform "manylinux_2_17_$PIP_ARCH" --platform "manylinux_2_28_$PIP_ARCH"
    --platform "linux_$PIP_ARCH" --platform any)
# pjsua2 is our own wheel (image/pjsua2/build.sh): for amd64 the one the venv was tested
# with; for arm64 the same sources cross-compiled, from HOMEPBX_PJSUA2_WHEEL_ARM64, else
# built here when the cross toolchain is installed (`make deps-arm64`), else the newest in
# build/pjsua2/arm64/. Without one the arm64 image gets every other dependency and no
# media engine (customize.sh sets [media] max_calls = 0). The homepbx wheel pins pjsua2:
# pip takes it from $WHEELS.
PJSUA2=1
REQUIREMENTS=("$WHEELS"/homepbx-"$VERSION"-*.whl)
if [ "$ARCH" = amd64 ]; then
    cp "$PJSUA2_DIR"/homepbx_pjsua2-*.whl "$WHEELS/"
else
    pjsua2_wheel=${HOMEPBX_PJSUA2_WHEEL_ARM64:-}
    if [ -z "$pjsua2_wheel" ] && command -v aarch64-linux-gnu-g++ >/dev/null &&
        [ -f /usr/include/aarch64-linux-gnu/python3.11/pyconfig.h ]; then
        log "wheels: pjsua2 for arm64, cross-compiled (image/pjsua2/build.sh, cached)"
        pjsua2_wheel=$(ARCH=arm64 "$IMAGE_DIR/pjsua2/build.sh" --print-wheel | tail -n 1) ||
            die "the arm64 pjsua2 build failed"
    fi
    if [ -z "$pjsua2_wheel" ]; then
        pjsua2_wheel=$(compgen -G "$REPO/build/pjsua2/arm64/*pjsua2*aarch64.whl" | tail -n 1 || true)
    fi
    if [ -n "$pjsua2_wheel" ]; then
        [ -f "$pjsua2_wheel" ] || die "HOMEPBX_PJSUA2_WHEEL_ARM64: no such file: $pjsua2_wheel"
        case ${pjsua2_wheel##*/} in *aarch64.whl) ;; *) die "not an aarch64 wheel: $pjsua2_wheel" ;; esac
        log "wheels: pjsua2 from $pjsua2_wheel"
        cp "$pjsua2_wheel" "$WHEELS/"
    else
        log "wheels: no pjsua2 wheel for arm64 (HOMEPBX_PJSUA2_WHEEL_ARM64): the image has no media engine"
        PJSUA2=0
        # homepbx's own requirements without pjsua2, for pip download here and pip install
        # in the image (customize.sh installs homepbx itself with --no-deps).
        "$VENV/bin/python" - "${REQUIREMENTS[0]}" >"$WHEELS/requirements.txt" <<'PY'
import re, sys, zipfile
from email.parser import Parser
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(wheel.read(name).decode())
for requirement in metadata.get_all("Requires-Dist") or []:
    if "extra ==" not in requirement and not re.match(r"[\w.-]*pjsua2", requirement, re.I):
        print(requirement)
PY
        REQUIREMENTS=(-r "$WHEELS/requirements.txt")
    fi
fi
"$VENV/bin/pip" download --quiet --only-binary=:all: --python-version 3.11 "${PLATFORMS[@]}" --find-links "$WHEELS" \
    --constraint "$WORK/constraints.txt" --dest "$WHEELS" "${REQUIREMENTS[@]}"
"$VENV/bin/python" "$IMAGE_DIR/appliance_config.py" "$REPO/config.toml" "$WORK/config.toml"
if ((!PJSUA2)); then
    "$VENV/bin/python" "$IMAGE_DIR/appliance_config.py" --no-media "$WORK/config.toml" "$WORK/config.toml"
fi
"$VENV/bin/homepbx" check-config --config "$WORK/config.toml" >/dev/null

# 2. The root tree: Debian 12 and everything else, put together by customize.sh in a chroot.
ROOT_PARTUUID=$(new_uuid)
ESP_PARTUUID=$(new_uuid)
ROOT_FSUUID=$(new_uuid)
ESP_VOLID=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
ESP_TREE=$WORK/esp
export HOMEPBX_REPO=$REPO HOMEPBX_ESP_TREE=$ESP_TREE HOMEPBX_WHEELS=$WHEELS HOMEPBX_CONFIG=$WORK/config.toml \
    HOMEPBX_VERSION=$VERSION HOMEPBX_ROOT_PARTUUID=$ROOT_PARTUUID HOMEPBX_ESP_PARTUUID=$ESP_PARTUUID \
    HOMEPBX_ARCH=$ARCH HOMEPBX_SERIAL_CONSOLE=$SERIAL_CONSOLE HOMEPBX_NATIVE=$NATIVE HOMEPBX_PJSUA2=$PJSUA2

log "root tree: Debian $SUITE $ARCH with ${#PACKAGES[@]} packages (mmdebstrap)"
ROOTFS=$WORK/rootfs
cache_hooks=()
if [ -n "$APT_CACHE" ]; then
    mkdir -p "$APT_CACHE"
    # shellcheck disable=SC2016 # "$1" is expanded by mmdebstrap, in the hook
    cache_hooks=(
        --skip=essential/unlink
        --setup-hook='mkdir -p "$1"/var/cache/apt/archives/'
        --setup-hook="sync-in $(printf %q "$APT_CACHE") /var/cache/apt/archives/"
        --customize-hook="sync-out /var/cache/apt/archives $(printf %q "$APT_CACHE")"
    )
fi
# The steps inside mmdebstrap, into the table of phases (the hooks run with sh, no log()).
# shellcheck disable=SC2016 # expanded by the hook's sh
phase_hook() {
    printf 'echo "$(date +%%s) %s" >>"$HOMEPBX_PHASE_LOG"' "$1"
}
arch_hooks=()
if [ "$ARCH" = arm64 ]; then
    # Under qemu-user, one initramfs takes minutes (mkinitramfs runs a modinfo for each of
    # the kernel's modules), and dpkg would make it twice (the kernel's hook, then the
    # triggers of the packages after it). update-initramfs is diverted to a no-op while the
    # packages install; customize.sh puts it back and makes the initramfs once.
    # shellcheck disable=SC2016 # "$1" is expanded by mmdebstrap, in the hook
    arch_hooks=(
        --essential-hook='chroot "$1" dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.homepbx --add /usr/sbin/update-initramfs'
        --essential-hook='printf "#!/bin/sh\n# homepbx build: the initramfs is made once, by customize.sh\nexit 0\n" >"$1/usr/sbin/update-initramfs" && chmod 0755 "$1/usr/sbin/update-initramfs"'
    )
fi
mmdebstrap --mode=root --variant=minbase --architectures="$ARCH" \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --setup-hook="$(phase_hook "root tree: download the packages, unpack the Essential ones")" \
    --extract-hook="$(phase_hook "root tree: configure the Essential packages")" \
    "${cache_hooks[@]}" "${arch_hooks[@]}" \
    --essential-hook="$(phase_hook "root tree: unpack and configure the other packages")" \
    --customize-hook="$(printf %q "$IMAGE_DIR/customize.sh") \"\$1\"" \
    --customize-hook="$(phase_hook "root tree: mmdebstrap's clean-up")" \
    "$SUITE" "$ROOTFS" \
    "deb $MIRROR $SUITE main non-free-firmware" \
    "deb $MIRROR $SUITE-updates main non-free-firmware" \
    "deb $SECURITY_MIRROR $SUITE-security main non-free-firmware"

# 3. Outside the chroot: what mmdebstrap sets up and takes down itself.
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$ROOTFS/etc/resolv.conf"
echo homepbx >"$ROOTFS/etc/hostname"
[ -z "$(find "$ROOTFS/etc/ssh" -name 'ssh_host_*' -print -quit)" ] || die "SSH host keys left in the root tree"

# 4. The EFI system partition: what bootctl and kernel-install put in /boot/efi (customize.sh).
log "EFI system partition (${ESP_MIB} MiB, mtools)"
[ -z "$(ls -A "$ROOTFS/boot/efi")" ] || die "files left in /boot/efi of the root tree"
[ -f "$ESP_TREE/EFI/BOOT/$EFI_BOOT_FILE" ] || die "no EFI/BOOT/$EFI_BOOT_FILE: bootctl install failed"
compgen -G "$ESP_TREE/loader/entries/*.conf" >/dev/null || die "no boot loader entry: kernel-install failed"
make_esp "$ESP_TREE" "$WORK/esp.img" "$ESP_MIB" "$ESP_VOLID"

# 5. The root file system, then the disk.
ROOT_MIB=$(root_size_mib "$ROOTFS")
log "root file system (${ROOT_MIB} MiB, mkfs.ext4 -d)"
make_root "$ROOTFS" "$WORK/root.img" "$ROOT_MIB" "$ROOT_FSUUID"
rm -rf "$ROOTFS"
log "disk: $IMAGE"
ROOT_PART_TYPE=$ROOT_TYPE assemble_disk "$WORK/image.tmp" "$WORK/esp.img" "$WORK/root.img" "$ESP_PARTUUID" "$ROOT_PARTUUID"
mv "$WORK/image.tmp" "$IMAGE"
(cd "$OUTPUT" && sha256sum "$(basename "$IMAGE")" >"$(basename "$IMAGE").sha256")

log "done in $((SECONDS - START)) s: $IMAGE ($(du -h --apparent-size "$IMAGE" | cut -f1), sha256 in $(basename "$IMAGE").sha256)"
printf 'build.sh: the steps and their seconds:\n' >&2
phase_table "$HOMEPBX_PHASE_LOG" >&2
echo "$IMAGE"
