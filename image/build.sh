#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Build homepbx-<version>-amd64.img: a raw GPT disk, UEFI-bootable (systemd-boot), Debian 12
# with homepbx in a venv, its units enabled, DHCP on the wired interface and SSH.
#
# Runs as root on a Debian 12 machine and needs no loop device, no mount of the image and no
# KVM: mmdebstrap makes the root tree, `mkfs.ext4 -d` turns it into a file system, mtools
# fills the EFI system partition, sfdisk writes the partition table and dd puts the two file
# systems in place. See image/README.md.
#
# Usage: image/build.sh [--output DIR] [--check]
#   --output DIR  where the image goes (default: build/image in the repository)
#   --check       only check that everything the build needs is there
# Environment:
#   HOMEPBX_DEBIAN_MIRROR  Debian mirror (default http://deb.debian.org/debian)
#   HOMEPBX_SECURITY_MIRROR  (default http://deb.debian.org/debian-security)
#   HOMEPBX_APT_CACHE      downloaded .debs are kept here between builds
#                          (default /var/cache/homepbx-image/apt; "" to keep none)
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
PJSUA2_DIR=$REPO/build/pjsua2/$ARCH

# What goes into the image besides Debian's minimal base.
PACKAGES=(
    systemd systemd-sysv udev dbus systemd-resolved systemd-timesyncd
    systemd-boot linux-image-amd64 initramfs-tools zstd firmware-realtek
    openssh-server python3 python3-venv ca-certificates iproute2 netbase kmod less
    libssl3 libsrtp2-1 libsamplerate0 # what our pjsua2 wheel links (image/pjsua2/build.sh)
)

usage() {
    sed -n '3,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

while (($#)); do
    case $1 in
        --output) [ $# -ge 2 ] || die "--output needs a directory"; OUTPUT=$2; shift 2 ;;
        --output=*) OUTPUT=${1#--output=}; shift ;;
        --check) CHECK_ONLY=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

check_requirements() {
    local ok=1
    [ "$(uname -m)" = x86_64 ] || { echo "build.sh: this builds an amd64 image on an x86_64 machine" >&2; ok=0; }
    if [ "$(id -u)" != 0 ]; then
        echo "build.sh: run as root (mmdebstrap installs packages into a chroot): sudo $0" >&2
        ok=0
    fi
    if ! grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then
        echo "build.sh: warning: written for a Debian 12 (bookworm) build machine" >&2
    fi
    need_tools mmdebstrap=mmdebstrap mkfs.ext4=e2fsprogs mkfs.vfat=dosfstools mcopy=mtools \
        sfdisk=fdisk python3=python3 du=coreutils truncate=coreutils espeak-ng=espeak-ng || ok=0
    if ! [ -x "$VENV/bin/pip" ] || ! [ -x "$VENV/bin/homepbx" ]; then
        echo "build.sh: the project's venv ($VENV) is missing: run \`make venv\` first (or \`make image\`)" >&2
        ok=0
    fi
    # Our pjsua2 wheel, as `make venv` built it for the current inputs (image/pjsua2/build.sh).
    if [ "$(cat "$PJSUA2_DIR/KEY" 2>/dev/null)" != "$(ARCH=$ARCH "$IMAGE_DIR/pjsua2/build.sh" --key)" ] ||
        ! compgen -G "$PJSUA2_DIR/homepbx_pjsua2-*.whl" >/dev/null; then
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

# 1. The application: a wheel of this repository (its hot path compiled by mypyc, setup.py)
#    plus its dependencies, exactly the versions installed in the tested venv (.venv), as
#    wheels for the image's python3.11.
log "wheels: homepbx $VERSION and its pinned dependencies"
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
"$VENV/bin/pip" wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WHEELS" "$WORK/src"
# pjsua2 is our own wheel (image/pjsua2/build.sh), the one the venv was tested with; the
# homepbx wheel pins it, pip takes it from $WHEELS.
cp "$PJSUA2_DIR"/homepbx_pjsua2-*.whl "$WHEELS/"
"$VENV/bin/pip" freeze --exclude-editable --local | grep -v '^homepbx' >"$WORK/constraints.txt"
"$VENV/bin/pip" download --quiet --only-binary=:all: --python-version 3.11 --find-links "$WHEELS" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform linux_x86_64 --platform any \
    --constraint "$WORK/constraints.txt" --dest "$WHEELS" "$WHEELS"/homepbx-"$VERSION"-*.whl
"$VENV/bin/python" "$IMAGE_DIR/appliance_config.py" "$REPO/config.toml" "$WORK/config.toml"
"$VENV/bin/homepbx" check-config --config "$WORK/config.toml" >/dev/null

# 2. The root tree: Debian 12 and everything else, put together by customize.sh in a chroot.
ROOT_PARTUUID=$(new_uuid)
ESP_PARTUUID=$(new_uuid)
ROOT_FSUUID=$(new_uuid)
ESP_VOLID=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
ESP_TREE=$WORK/esp
export HOMEPBX_REPO=$REPO HOMEPBX_ESP_TREE=$ESP_TREE HOMEPBX_WHEELS=$WHEELS HOMEPBX_CONFIG=$WORK/config.toml \
    HOMEPBX_VERSION=$VERSION HOMEPBX_ROOT_PARTUUID=$ROOT_PARTUUID HOMEPBX_ESP_PARTUUID=$ESP_PARTUUID

log "root tree: Debian $SUITE with ${#PACKAGES[@]} packages (mmdebstrap)"
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
mmdebstrap --mode=root --variant=minbase --architectures=$ARCH \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    "${cache_hooks[@]}" \
    --customize-hook="$(printf %q "$IMAGE_DIR/customize.sh") \"\$1\"" \
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
[ -f "$ESP_TREE/EFI/BOOT/BOOTX64.EFI" ] || die "no EFI/BOOT/BOOTX64.EFI: bootctl install failed"
compgen -G "$ESP_TREE/loader/entries/*.conf" >/dev/null || die "no boot loader entry: kernel-install failed"
make_esp "$ESP_TREE" "$WORK/esp.img" "$ESP_MIB" "$ESP_VOLID"

# 5. The root file system, then the disk.
ROOT_MIB=$(root_size_mib "$ROOTFS")
log "root file system (${ROOT_MIB} MiB, mkfs.ext4 -d)"
make_root "$ROOTFS" "$WORK/root.img" "$ROOT_MIB" "$ROOT_FSUUID"
rm -rf "$ROOTFS"
log "disk: $IMAGE"
assemble_disk "$WORK/image.tmp" "$WORK/esp.img" "$WORK/root.img" "$ESP_PARTUUID" "$ROOT_PARTUUID"
mv "$WORK/image.tmp" "$IMAGE"
(cd "$OUTPUT" && sha256sum "$(basename "$IMAGE")" >"$(basename "$IMAGE").sha256")

log "done in $((SECONDS - START)) s: $IMAGE ($(du -h --apparent-size "$IMAGE" | cut -f1), sha256 in $(basename "$IMAGE").sha256)"
echo "$IMAGE"
