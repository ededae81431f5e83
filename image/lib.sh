# shellcheck shell=bash
# Pieces of the homepbx image recipe, sourced by build.sh and by the unit tests. Each piece
# works on plain files: no loop devices, no mounts, and (except the Debian bootstrap) no root.

# GPT partition type GUIDs (UEFI spec; Discoverable Partitions Specification).
readonly ESP_TYPE=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
readonly ROOT_X86_64_TYPE=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709
# shellcheck disable=SC2034 # used by build.sh
readonly ROOT_ARM64_TYPE=B921B045-1DF0-41C3-AF44-4C6F280D3FAE

die() {
    printf 'build.sh: error: %s\n' "$*" >&2
    exit 1
}

# log MESSAGE: a line on stderr with the time; with HOMEPBX_PHASE_LOG set (build.sh), also
# "EPOCH MESSAGE" into that file, from which phase_table tells how long each step took.
log() {
    printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2
    if [ -n "${HOMEPBX_PHASE_LOG:-}" ]; then
        printf '%(%s)T %s\n' -1 "$*" >>"$HOMEPBX_PHASE_LOG"
    fi
}

# phase_table FILE: the steps logged in FILE with the seconds each took (until the next line).
phase_table() {
    awk '{ t[NR] = $1; $1 = ""; m[NR] = substr($0, 2) }
         END { for (i = 1; i < NR; i++) printf "%6d s  %s\n", t[i + 1] - t[i], m[i] }' "$1"
}

# need_tools TOOL=PACKAGE...: every missing command is named with the Debian package that
# has it, and one apt-get line installs them all.
need_tools() {
    local pair tool package missing=() packages=()
    for pair in "$@"; do
        tool=${pair%%=*}
        package=${pair#*=}
        if ! command -v "$tool" >/dev/null 2>&1; then
            missing+=("$tool (Debian package $package)")
            packages+=("$package")
        fi
    done
    if ((${#missing[@]})); then
        printf 'build.sh: missing tools:\n' >&2
        printf '  %s\n' "${missing[@]}" >&2
        printf 'install them with:\n  apt-get install %s\n' "$(printf '%s\n' "${packages[@]}" | sort -u | tr '\n' ' ')" >&2
        return 1
    fi
}

# new_uuid: a random UUID, without uuid-runtime.
new_uuid() {
    cat /proc/sys/kernel/random/uuid
}

# mib_ceil BYTES: the number of MiB that holds BYTES.
mib_ceil() {
    echo $(((($1) + 1048575) / 1048576))
}

# root_size_mib TREE: room for the tree plus 20% and 128 MiB, rounded up to 64 MiB; the
# partition grows to fill the disk at first boot (systemd-repart, x-systemd.growfs).
root_size_mib() {
    local used mib
    used=$(du -s --block-size=1 -x "$1" | cut -f1)
    mib=$(mib_ceil $((used * 12 / 10 + 128 * 1048576)))
    echo $(((mib + 63) / 64 * 64))
}

# make_esp TREE IMAGE SIZE_MIB VOLUME_ID: a FAT32 file system holding TREE, built with
# mtools (no mount).
make_esp() {
    local tree=$1 image=$2 size_mib=$3 volid=$4
    rm -f "$image"
    mkfs.vfat -F 32 -n HOMEPBX-ESP -i "$volid" -C "$image" $((size_mib * 1024)) >/dev/null
    local entry
    for entry in "$tree"/* "$tree"/.[!.]*; do
        [ -e "$entry" ] || continue
        MTOOLS_SKIP_CHECK=1 mcopy -s -p -Q -m -i "$image" "$entry" ::/
    done
}

# make_root TREE IMAGE SIZE_MIB UUID: an ext4 file system populated from TREE (mkfs.ext4
# -d keeps owners, modes, links and extended attributes).
make_root() {
    local tree=$1 image=$2 size_mib=$3 uuid=$4
    rm -f "$image"
    mkfs.ext4 -q -F -L homepbx-root -U "$uuid" -d "$tree" -E root_owner=0:0 "$image" "${size_mib}M" >/dev/null
}

# assemble_disk DISK ESP_IMAGE ROOT_IMAGE ESP_PARTUUID ROOT_PARTUUID [DISK_UUID]: a GPT disk
# with the ESP first (at 1 MiB) and the root partition after it, the two file systems
# copied in with dd. The root partition has the x86-64 root type (or $ROOT_PART_TYPE, e.g.
# the ARM64 one), so systemd-repart can grow it to the whole disk at first boot.
assemble_disk() {
    local disk=$1 esp=$2 root=$3 esp_uuid=$4 root_uuid=$5 disk_uuid=${6:-$(new_uuid)}
    local esp_mib root_mib total_mib
    esp_mib=$(mib_ceil "$(stat -c %s "$esp")")
    root_mib=$(mib_ceil "$(stat -c %s "$root")")
    total_mib=$((1 + esp_mib + root_mib + 1))
    rm -f "$disk"
    truncate -s "${total_mib}M" "$disk"
    sfdisk --quiet --no-reread --no-tell-kernel "$disk" <<EOF
label: gpt
label-id: $disk_uuid
unit: sectors
sector-size: 512

start=2048, size=$((esp_mib * 2048)), type=$ESP_TYPE, uuid=$esp_uuid, name="ESP"
start=$(((1 + esp_mib) * 2048)), size=$((root_mib * 2048)), type=${ROOT_PART_TYPE:-$ROOT_X86_64_TYPE}, uuid=$root_uuid, name="homepbx-root"
EOF
    dd if="$esp" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
    dd if="$root" of="$disk" bs=1M seek=$((1 + esp_mib)) conv=notrunc,sparse status=none
}

# project_version PYPROJECT: the version field of [project].
project_version() {
    python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$1"
}
