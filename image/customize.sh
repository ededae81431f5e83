#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# mmdebstrap customize hook of build.sh: turns the Debian tree in $1 into the homepbx
# appliance. Runs on the build machine, as root, with /proc, /sys and /dev mounted in the
# tree; commands for the image run in it through chroot. Idempotent: every step replaces
# what a previous run left.
set -euo pipefail

ROOT=${1:?usage: customize.sh ROOT_TREE}
IMAGE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$IMAGE_DIR/lib.sh"
for var in HOMEPBX_REPO HOMEPBX_ESP_TREE HOMEPBX_WHEELS HOMEPBX_CONFIG HOMEPBX_VERSION HOMEPBX_ROOT_PARTUUID HOMEPBX_ESP_PARTUUID; do
    [ -n "${!var:-}" ] || die "customize.sh: $var is not set (run image/build.sh, not this script)"
done
ARCH=${HOMEPBX_ARCH:-amd64}
SERIAL_CONSOLE=${HOMEPBX_SERIAL_CONSOLE:-ttyS0}
NATIVE=${HOMEPBX_NATIVE:-1}
PJSUA2=${HOMEPBX_PJSUA2:-1}
SYSTEMD_SRC=$HOMEPBX_REPO/systemd
ROOTFS_SRC=$IMAGE_DIR/rootfs

# in_root CMD...: CMD inside the image, with a clean environment (nothing of the build
# machine's pip or locale settings leaks in).
in_root() {
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LC_ALL=C.UTF-8 SYSTEMD_RELAX_ESP_CHECKS=1 "$@"
}

log "customize: files of the appliance"
cp -a --no-preserve=ownership "$ROOTFS_SRC/." "$ROOT/"
install -D -m 0644 -t "$ROOT/usr/lib/systemd/system" \
    "$SYSTEMD_SRC/homepbx.service" "$SYSTEMD_SRC/homepbx-firstboot.service" "$SYSTEMD_SRC/homepbx-console.service"
install -D -m 0644 "$SYSTEMD_SRC/sysusers.d/homepbx.conf" "$ROOT/usr/lib/sysusers.d/homepbx.conf"
install -D -m 0644 "$SYSTEMD_SRC/tmpfiles.d/homepbx.conf" "$ROOT/usr/lib/tmpfiles.d/homepbx.conf"
install -D -m 0644 "$SYSTEMD_SRC/sshd_config.d/homepbx.conf" "$ROOT/etc/ssh/sshd_config.d/homepbx.conf"
install -D -m 0755 "$SYSTEMD_SRC/bin/pbx-shell" "$ROOT/opt/homepbx/bin/pbx-shell"
install -D -m 0755 "$SYSTEMD_SRC/bin/homepbx-firstboot" "$ROOT/opt/homepbx/bin/homepbx-firstboot"
install -D -m 0755 "$SYSTEMD_SRC/bin/homepbx_console.py" "$ROOT/opt/homepbx/bin/homepbx-console"
install -D -m 0644 "$HOMEPBX_REPO/README.md" "$ROOT/opt/homepbx/README.md"
grep -qx /opt/homepbx/bin/pbx-shell "$ROOT/etc/shells" || echo /opt/homepbx/bin/pbx-shell >>"$ROOT/etc/shells"
if [ "$ARCH" = arm64 ]; then
    # systemd-repart grows the root partition of the image's own type.
    sed -i 's/^Type=root-x86-64$/Type=root-arm64/' "$ROOT/etc/repart.d/50-root.conf"
    # The initramfs with the storage modules of the boards the image is for, not every
    # module (MODULES=most): see image/README.md, "The initramfs".
    cp -a --no-preserve=ownership "$IMAGE_DIR/rootfs-arm64/." "$ROOT/"
fi

log "customize: homepbx $HOMEPBX_VERSION in /opt/homepbx/venv (Debian's python3.11)"
rm -rf "$ROOT/opt/homepbx/venv" "$ROOT/tmp/wheels"
cp -r "$HOMEPBX_WHEELS" "$ROOT/tmp/wheels"
in_root python3 -m venv /opt/homepbx/venv
if ((PJSUA2)); then
    in_root /opt/homepbx/venv/bin/pip install --quiet --no-cache-dir --no-index --find-links /tmp/wheels \
        "homepbx==$HOMEPBX_VERSION"
    in_root /opt/homepbx/venv/bin/python -c 'import appliance.cli, pjsua2, uvloop, tomlkit'
else
    # No pjsua2 wheel for this architecture (build.sh): every other requirement, then
    # homepbx without its dependency check; its config runs no media workers.
    in_root /opt/homepbx/venv/bin/pip install --quiet --no-cache-dir --no-index --find-links /tmp/wheels \
        -r /tmp/wheels/requirements.txt
    in_root /opt/homepbx/venv/bin/pip install --quiet --no-cache-dir --no-index --find-links /tmp/wheels --no-deps \
        "homepbx==$HOMEPBX_VERSION"
    in_root /opt/homepbx/venv/bin/python -c 'import appliance.cli, uvloop, tomlkit'
fi
rm -rf "$ROOT/tmp/wheels"
if ((NATIVE)); then
    # The compiled hot path must load on Debian's python3.11, not fall back to the sources.
    in_root /opt/homepbx/venv/bin/python -c \
        'import sys, appliance.sip.message as m, appliance.edge.calls as c; sys.exit(not all(x.__file__.endswith(".so") for x in (m, c)))'
fi

log "customize: users, /etc/homepbx, units"
in_root systemd-sysusers
in_root systemd-tmpfiles --create /usr/lib/tmpfiles.d/homepbx.conf
install -m 0600 "$HOMEPBX_CONFIG" "$ROOT/etc/homepbx/config.toml"
in_root chown homepbx:homepbx /etc/homepbx/config.toml
in_root /opt/homepbx/venv/bin/homepbx check-config --config /etc/homepbx/config.toml
in_root systemctl enable homepbx.service homepbx-firstboot.service homepbx-console.service \
    systemd-networkd.service systemd-resolved.service systemd-timesyncd.service ssh.service
# The root account stays locked; the family logs in as pbx, whose shell is the terminal UI.
in_root passwd --lock root >/dev/null

log "customize: sshd drop-in check"
keydir=$(mktemp -d "$ROOT/tmp/sshkey.XXXXXX")
in_root ssh-keygen -q -t ed25519 -N '' -f "/tmp/${keydir##*/}/key"
mkdir -p "$ROOT/run/sshd"
sshd_pbx=$(in_root /usr/sbin/sshd -T -h "/tmp/${keydir##*/}/key" -C user=pbx,host=client,addr=192.0.2.1)
rm -rf "$keydir" "$ROOT/run/sshd"
grep -qx 'forcecommand /opt/homepbx/bin/pbx-shell' <<<"$sshd_pbx" || die "sshd: pbx is not forced into the TUI"
grep -qx 'allowtcpforwarding no' <<<"$sshd_pbx" || die "sshd: pbx may forward TCP"

if [ -e "$ROOT/usr/sbin/update-initramfs.homepbx" ]; then
    # build.sh diverted update-initramfs while the packages installed (arm64: it is slow
    # under emulation); the real one back, and the one initramfs made now.
    log "customize: initramfs (once)"
    rm -f "$ROOT/usr/sbin/update-initramfs"
    in_root dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs
    in_root update-initramfs -c -k all
fi

log "customize: boot loader (systemd-boot) and kernel"
cat >"$ROOT/etc/fstab" <<EOF
# <file system> <mount point> <type> <options> <dump> <pass>
PARTUUID=$HOMEPBX_ROOT_PARTUUID / ext4 defaults,errors=remount-ro,x-systemd.growfs 0 1
PARTUUID=$HOMEPBX_ESP_PARTUUID /boot/efi vfat umask=0077,nofail 0 2
EOF
if [ "$ARCH" = arm64 ]; then
    # The Raspberry Pi's firmware reads the same FAT partition: raspi-firmware's hooks keep
    # its copy of the kernel, initramfs and DTBs in /boot/firmware up to date.
    echo "/boot/efi /boot/firmware none bind,nofail,x-systemd.requires-mounts-for=/boot/efi 0 0" >>"$ROOT/etc/fstab"
fi
echo homepbx >"$ROOT/etc/kernel/entry-token"
# The screen (tty0) is the main console; the serial port gets the kernel log and the banner.
echo "root=PARTUUID=$HOMEPBX_ROOT_PARTUUID ro rootwait console=$SERIAL_CONSOLE,115200 console=tty0" >"$ROOT/etc/kernel/cmdline"
# bootctl and kernel-install want the ESP to be a file system of its own: a tmpfs stands in
# for it (no loop device), and its contents go to build.sh, which makes the FAT32 ESP of them.
mountpoint -q "$ROOT/boot/efi" && umount "$ROOT/boot/efi"
rm -rf "$ROOT/boot/efi"
mkdir -p "$ROOT/boot/efi"
mount -t tmpfs -o mode=0755,size=512m homepbx-esp "$ROOT/boot/efi"
trap 'umount "$ROOT/boot/efi" 2>/dev/null || true' EXIT
in_root bootctl install --esp-path=/boot/efi --no-variables --make-entry-directory=yes \
    --entry-token=literal:homepbx --graceful
cat >"$ROOT/boot/efi/loader/loader.conf" <<EOF
default homepbx-*
timeout 2
editor no
EOF
for kernel in "$ROOT"/boot/vmlinuz-*; do
    kver=${kernel##*/vmlinuz-}
    in_root kernel-install add "$kver" "/boot/vmlinuz-$kver" "/boot/initrd.img-$kver"
done

if [ "$ARCH" = arm64 ]; then
    # The Raspberry Pi 4 boots from its firmware, not UEFI: start4.elf reads config.txt and
    # loads the kernel, the initramfs and the board's DTB from the FAT partition's top
    # level. raspi-firmware's hook writes them (into the ESP here, through the bind mount
    # the box also has); the Pi's serial console is ttyS1 (the mini UART, enable_uart=1).
    cat >"$ROOT/etc/default/raspi-firmware" <<EOF
# homepbx: the root partition by its PARTUUID (mmcblk0p2 on an SD card, sda2 on a USB disk).
ROOTPART=PARTUUID=$HOMEPBX_ROOT_PARTUUID
CONSOLES="ttyS1,115200 tty0"
# No cma= on the command line: built in a chroot the hook cannot tell it is for a Pi 4,
# whose kernel does not boot with the older models' cma=64M; a PBX needs no video memory.
CMA=0
EOF
    rm -rf "$ROOT/boot/firmware"
    mkdir -p "$ROOT/boot/firmware"
    mount --bind "$ROOT/boot/efi" "$ROOT/boot/firmware"
    trap 'umount "$ROOT/boot/firmware" 2>/dev/null || true; umount "$ROOT/boot/efi" 2>/dev/null || true' EXIT
    # What the package's postinst does: the firmware files, then its kernel hook.
    in_root sh -c 'cp /usr/lib/raspi-firmware/* /boot/firmware/ && DEB_MAINT_PARAMS=configure /etc/kernel/postinst.d/z50-raspi-firmware'
    umount "$ROOT/boot/firmware"
    for file in start4.elf fixup4.dat config.txt cmdline.txt bcm2711-rpi-4-b.dtb; do
        [ -f "$ROOT/boot/efi/$file" ] || die "raspi-firmware left no $file on the FAT partition"
    done
fi

# systemd-boot's random seed is made on the box (systemd-boot-random-seed), never shipped.
rm -f "$ROOT/boot/efi/loader/random-seed"
rm -rf "$HOMEPBX_ESP_TREE"
mkdir -p "$HOMEPBX_ESP_TREE"
cp -r "$ROOT/boot/efi/." "$HOMEPBX_ESP_TREE/"
umount "$ROOT/boot/efi"
trap - EXIT

log "customize: nothing secret, nothing machine-specific"
rm -f "$ROOT"/etc/ssh/ssh_host_*
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id" "$ROOT/var/lib/systemd/random-seed" "$ROOT/var/lib/systemd/credential.secret"
rm -rf "$ROOT/var/lib/homepbx-firstboot" "$ROOT/root/.cache" "$ROOT"/tmp/* "$ROOT"/var/tmp/*
find "$ROOT/var/log" -type f -delete
# Downloaded packages and package lists (build.sh keeps its own copy of the packages).
find "$ROOT/var/cache/apt" "$ROOT/var/lib/apt/lists" -type f -delete
if grep -Eq '^[[:space:]]*password[[:space:]]*=[[:space:]]*"[^"]' "$ROOT/etc/homepbx/config.toml"; then
    die "a SIP password is set in the image's config"
fi
