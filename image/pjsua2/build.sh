#!/bin/bash
# Build homepbx's pjsua2 wheel (the SWIG Python bindings of PJSIP) from the pjproject tarball
# that Debian's `asterisk` source package carries, against Debian 12's OpenSSL 3, libsrtp2
# and libsamplerate, with our limits and features (config_site.h).
#
# Usage: image/pjsua2/build.sh [--key] [--print-wheel]
#   (no argument)  make sure the wheel for the current inputs exists and copy it to
#                  build/pjsua2/<arch>/ in the repository (removing older wheels there)
#   --key          print the cache key (hash of the inputs) and exit
#   --print-wheel  like no argument, then print the wheel's path
# Environment:
#   ARCH                 Debian architecture to build for (default: the machine's, amd64);
#                        another one cross-compiles with CROSS_PREFIX (default <triplet>-),
#                        against that architecture's -dev packages (dpkg multiarch)
#   JOBS                 parallel make jobs (default: the number of processors)
#   PJSUA2_CACHE         built wheels, one directory per cache key, and the verified
#                        tarball (default ${XDG_CACHE_HOME:-$HOME/.cache}/homepbx/pjsua2)
#   PJSUA2_TARBALL       a local copy of the pinned tarball to use instead of downloading
#                        (its sha256 is checked all the same)
#   HOMEPBX_DEBIAN_MIRROR  Debian mirror (default http://deb.debian.org/debian)
#
# The build is cached by content: the key hashes this script, config_site.h, mkwheel.py,
# patches/*.patch, the pinned tarball's sha256 and the architecture. A cold build takes a few minutes on two
# cores; with the key's wheel in the cache this script only copies it (well under a second).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

# --- the pin -------------------------------------------------------------------------------
# pjproject 2.17 (upstream git 6852b24), as Asterisk 22.10.1 bundles it: the orig tarball of
# Debian's asterisk 1:22.10.1+dfsg+~cs6.17.60671434-* (sid and forky). Debian's copy has the
# third-party sources removed (dfsg): SRTP and the resampler come from Debian's own packages.
PJ_TARBALL='asterisk_22.10.1+dfsg+~cs6.17.60671434.orig-Xpjproject.tar.xz'
PJ_SHA256=6860c2f7604b4eee75f38151a9ef69774eb3f0c5286fc1d14bc1db2dc5a9e8aa
PJ_SHA1=9cbc54943839c75a8d626e84d3562074bc766222 # snapshot.debian.org addresses files by sha1
PJ_VERSION=2.17
PJ_COMMIT=6852b24
# Our build number: raise it whenever this script or config_site.h changes what is built.
# The wheel's version is <pjproject version>+g<commit>.<build number> (pyproject.toml pins it).
BUILD_NUMBER=4
DIST_NAME=homepbx-pjsua2
WHEEL_VERSION=$PJ_VERSION+g$PJ_COMMIT.$BUILD_NUMBER
MIRROR=${HOMEPBX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
POOL_URL=$MIRROR/pool/main/a/asterisk/$PJ_TARBALL
SNAPSHOT_URL=https://snapshot.debian.org/file/$PJ_SHA1

# configure: audio only, null sound device, G.711 and G.722, SRTP (Debian's libsrtp2) and
# TLS (Debian's OpenSSL 3), libsamplerate for the bridge's resampling (pjproject's own
# libresample is not in Debian's tarball).
CONFIGURE_FLAGS=(
    --disable-shared
    --disable-video --disable-v4l2 --disable-sdl --disable-ffmpeg --disable-openh264 --disable-vpx
    --disable-libyuv --disable-libwebrtc --disable-android-mediacodec
    --disable-sound
    --disable-speex-aec --disable-speex-codec --disable-gsm-codec --disable-ilbc-codec
    --disable-g7221-codec --disable-l16-codec --disable-opus --disable-silk --disable-bcg729
    --disable-lyra --disable-opencore-amr --disable-ipp
    --disable-upnp --disable-libuuid
    --enable-libsamplerate --with-external-srtp --with-ssl=/usr
)

die() { echo "pjsua2/build.sh: $*" >&2; exit 1; }
log() { echo "pjsua2/build.sh: $*" >&2; }

MODE=build
case ${1:-} in
    "") ;;
    --key) MODE=key ;;
    --print-wheel) MODE=print ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1" ;;
esac

# --- the target ----------------------------------------------------------------------------
BUILD_ARCH=$(dpkg --print-architecture)
ARCH=${ARCH:-$BUILD_ARCH}
case $ARCH in
    amd64) TRIPLET=x86_64-linux-gnu PY_PLATFORM=linux_x86_64 ;;
    arm64) TRIPLET=aarch64-linux-gnu PY_PLATFORM=linux_aarch64 ;;
    *) die "unsupported ARCH=$ARCH (amd64, arm64)" ;;
esac
if [ "$ARCH" = "$BUILD_ARCH" ]; then
    CROSS_PREFIX=${CROSS_PREFIX-}
    HOST_FLAG=()
else
    CROSS_PREFIX=${CROSS_PREFIX-$TRIPLET-}
    HOST_FLAG=(--host="$TRIPLET")
fi
CC=${CROSS_PREFIX}gcc
CXX=${CROSS_PREFIX}g++
# Debian's python3.11 headers: the wheel is for Debian 12's python3.11 (the image) and loads in
# any CPython 3.11 on the same libc (the development venv's).
PY_INCLUDES=(-I/usr/include/python3.11 -I"/usr/include/$TRIPLET/python3.11")
EXT_SUFFIX=.cpython-311-$TRIPLET.so
WHEEL_TAG=cp311-cp311-$PY_PLATFORM

KEY=$(
    {
        cat "$HERE/build.sh" "$HERE/config_site.h" "$HERE/mkwheel.py" "$HERE"/patches/*.patch
        echo "$PJ_SHA256 $ARCH"
    } | sha256sum | cut -c1-16
)
if [ "$MODE" = key ]; then
    echo "$KEY"
    exit 0
fi

CACHE=${PJSUA2_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/homepbx/pjsua2}
WHEEL_NAME=${DIST_NAME//-/_}-$WHEEL_VERSION-$WHEEL_TAG.whl
CACHED=$CACHE/$ARCH-$KEY/$WHEEL_NAME
OUT=$REPO/build/pjsua2/$ARCH

deliver() {
    mkdir -p "$OUT"
    find "$OUT" -maxdepth 1 -name '*.whl' ! -name "$WHEEL_NAME" -delete
    cp -p "$CACHED" "$OUT/$WHEEL_NAME"
    echo "$KEY" >"$OUT/KEY"
    if [ "$MODE" = print ]; then echo "$OUT/$WHEEL_NAME"; fi
}

if [ -f "$CACHED" ]; then
    log "cached: $CACHED (key $KEY)"
    deliver
    exit 0
fi

# --- the tarball ---------------------------------------------------------------------------
need() { command -v "$1" >/dev/null || die "$1 is missing: install the Debian package $2 (make deps)"; }
need "$CC" gcc
need "$CXX" g++
need swig swig
need make make
need patch patch
need python3 python3
for h in openssl/ssl.h srtp2/srtp.h samplerate.h; do
    [ -f "/usr/include/$h" ] || die "/usr/include/$h is missing: make deps (libssl-dev libsrtp2-dev libsamplerate0-dev)"
done
[ -f "/usr/lib/$TRIPLET/libsrtp2.so.1" ] || die "libsrtp2 for $ARCH is missing: apt-get install libsrtp2-1:$ARCH"
[ -f "/usr/include/$TRIPLET/python3.11/pyconfig.h" ] || die "python3.11 headers missing: apt-get install python3-dev"

START=$SECONDS
mkdir -p "$CACHE/src"
TARBALL=$CACHE/src/$PJ_TARBALL
sha_ok() { echo "$PJ_SHA256  $1" | sha256sum --check --status; }
fetch() { # url dest: Debian's archive only
    python3 - "$1" "$2" <<'EOF'
import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f)
EOF
}
if [ -n "${PJSUA2_TARBALL:-}" ]; then
    sha_ok "$PJSUA2_TARBALL" || die "$PJSUA2_TARBALL does not have the pinned sha256 $PJ_SHA256"
    cp "$PJSUA2_TARBALL" "$TARBALL.part" && mv "$TARBALL.part" "$TARBALL"
elif ! { [ -f "$TARBALL" ] && sha_ok "$TARBALL"; }; then
    log "downloading $POOL_URL"
    if ! fetch "$POOL_URL" "$TARBALL.part" 2>/dev/null; then
        # The pool keeps only the versions in Debian's current suites: once sid moves past
        # this asterisk, the file is still in Debian's snapshot archive, by its sha1.
        log "not in the pool (any more?); trying Debian's snapshot archive: $SNAPSHOT_URL"
        fetch "$SNAPSHOT_URL" "$TARBALL.part" || die "cannot download $PJ_TARBALL.
  It has left the pool and snapshot.debian.org did not answer. Either fetch it by hand from
  https://snapshot.debian.org/package/asterisk/ (version 1:22.10.1+dfsg+~cs6.17.60671434-*)
  and run with PJSUA2_TARBALL=/path/to/it, or move the pin (PJ_TARBALL, PJ_SHA256, PJ_SHA1,
  PJ_VERSION, PJ_COMMIT in this script, BUILD_NUMBER back to 1, the version in
  pyproject.toml) to the -Xpjproject tarball of the asterisk now in the pool, and rerun the
  media tests."
    fi
    sha_ok "$TARBALL.part" || { rm -f "$TARBALL.part"; die "downloaded $PJ_TARBALL does not have the pinned sha256 $PJ_SHA256"; }
    mv "$TARBALL.part" "$TARBALL"
fi

# --- pjproject's libraries -----------------------------------------------------------------
WORK=$REPO/build/pjsua2/work-$ARCH
rm -rf "$WORK"
mkdir -p "$WORK"
tar -C "$WORK" -xJf "$TARBALL"
SRC=$WORK/pjsip-pjproject-$PJ_COMMIT
[ -d "$SRC" ] || die "the tarball has no pjsip-pjproject-$PJ_COMMIT/ (the pin and the tarball disagree)"
grep -q "^export PJ_VERSION_MINOR  := ${PJ_VERSION#*.}\$" "$SRC/version.mak" || die "version.mak is not pjproject $PJ_VERSION"
cp "$HERE/config_site.h" "$SRC/pjlib/include/pj/config_site.h"
# Debian's tarball leaves out the BDSound device glue (non-free SDK); pjmedia's Makefile still
# lists it, and it compiles to nothing without PJMEDIA_AUDIO_DEV_HAS_BDIMAD: an empty file.
BDIMAD=$SRC/pjmedia/src/pjmedia-audiodev/bdimad_dev.c
[ -e "$BDIMAD" ] || : >"$BDIMAD"

# Debian's libsrtp2-dev cannot be installed for two architectures at once (its .so link
# collides), so the target's libsrtp2 (libsrtp2-1:$ARCH) is linked through a directory of
# ours; the headers are the same for every architecture.
LINKDIR=$WORK/lib
mkdir -p "$LINKDIR"
ln -s "/usr/lib/$TRIPLET/libsrtp2.so.1" "$LINKDIR/libsrtp2.so"

# pjproject 2.16 added real-time text (T.140): every call would offer an m=text stream on two
# more RTP ports. homepbx carries voice only: calls default to PJSUA_DEFAULT_TXT_CNT text
# streams (config_site.h), an offered one is refused (port 0), as pjsua2 2.15 did.
for patch in "$HERE"/patches/*.patch; do
    patch -d "$SRC" -p1 --forward --quiet <"$patch" >"$WORK/patch.log" 2>&1 ||
        { cat "$WORK/patch.log" >&2; die "$(basename "$patch") does not apply"; }
done
CALL_C=$SRC/pjsip/src/pjsua-lib/pjsua_call.c
[ "$(grep -c '^    opt->txt_cnt = 1;$' "$CALL_C")" = 1 ] || die "pjsua_call.c: the text stream default moved (see build.sh)"
sed -i 's/^    opt->txt_cnt = 1;$/    opt->txt_cnt = PJSUA_DEFAULT_TXT_CNT;/' "$CALL_C"

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1735689600} # 2025-01-01: nothing dates the build
FLAGS="-O2 -g0 -fPIC -ffile-prefix-map=$SRC=pjproject -fdebug-prefix-map=$SRC=pjproject"
log "configure (pjproject $PJ_VERSION, $ARCH)"
(
    cd "$SRC"
    CC=$CC CXX=$CXX CFLAGS=$FLAGS CXXFLAGS=$FLAGS LDFLAGS="-L$LINKDIR" \
        ./aconfigure "${HOST_FLAG[@]}" "${CONFIGURE_FLAGS[@]}" >"$WORK/configure.log" 2>&1 ||
        { tail -30 "$WORK/configure.log" >&2; die "configure failed ($WORK/configure.log)"; }
)
# configure falls back quietly when a library is missing: check that it took each one.
grep -q '^AC_PJMEDIA_RESAMPLE=libsamplerate' "$SRC/pjmedia/build/os-auto.mak" ||
    die "configure did not take libsamplerate ($WORK/configure.log)"
grep -q '^#define PJ_SSL_SOCK_IMP PJ_SSL_SOCK_IMP_OPENSSL' "$SRC/pjlib/include/pj/compat/os_auto.h" ||
    die "configure did not take OpenSSL ($WORK/configure.log)"
{ grep -q 'EXTERNAL_SRTP=2' "$SRC/pjmedia/build/os-auto.mak" && grep -q 'SRTP_HAS_SHUTDOWN=1' "$SRC/pjmedia/build/os-auto.mak"; } ||
    die "configure did not take libsrtp2 ($WORK/configure.log)"
JOBS=${JOBS:-$(nproc)}
log "compile the libraries (make -j$JOBS lib)"
make -C "$SRC" -j"$JOBS" lib >"$WORK/make.log" 2>&1 || { tail -30 "$WORK/make.log" >&2; die "make lib failed ($WORK/make.log)"; }

# --- the bindings --------------------------------------------------------------------------
SWIGDIR=$SRC/pjsip-apps/src/swig/python
log "swig $(swig -version | sed -n 's/^SWIG Version //p')"
(
    cd "$SWIGDIR"
    # pjproject's own flags (swig/python/Makefile), without -doxygen (docstrings only).
    swig -I../../../../pjlib/include -I../../../../pjlib-util/include -I../../../../pjmedia/include \
        -I../../../../pjsip/include -I../../../../pjnath/include -c++ -w312 -threads \
        -python -o pjsua2_wrap.cpp ../pjsua2.i
)
mapfile -t CXXFLAGS_PJ < <(make -s --no-print-directory -C "$SWIGDIR" -f helper.mak cflags)
mapfile -t LIBS_PJ < <(make -s --no-print-directory -C "$SWIGDIR" -f helper.mak libs)
mapfile -t LDFLAGS_PJ < <(make -s --no-print-directory -C "$SWIGDIR" -f helper.mak ldflags)
log "compile the module (pjsua2_wrap.cpp)"
# shellcheck disable=SC2086 # FLAGS is a list of words
(
    cd "$SWIGDIR"
    "$CXX" -shared $FLAGS -Wl,--as-needed -Wl,-s -Wl,--build-id=sha1 "${PY_INCLUDES[@]}" "${CXXFLAGS_PJ[@]}" \
        pjsua2_wrap.cpp -o "_pjsua2$EXT_SUFFIX" -L"$LINKDIR" "${LDFLAGS_PJ[@]}" "${LIBS_PJ[@]/#/-l}" \
        >"$WORK/module.log" 2>&1 || { tail -30 "$WORK/module.log" >&2; die "compiling the module failed ($WORK/module.log)"; }
)
MODULE=$SWIGDIR/_pjsua2$EXT_SUFFIX
EXPORTS=$("${CROSS_PREFIX}nm" -D --defined-only "$MODULE")
grep -q ' T pjmedia_codec_g722_set_pcm_shift$' <<<"$EXPORTS" ||
    die "the module does not export pjmedia_codec_g722_set_pcm_shift (appliance/pjhost.py calls it)"

# --- the wheel -----------------------------------------------------------------------------
mkdir -p "$CACHE/$ARCH-$KEY"
python3 "$HERE/mkwheel.py" --name "$DIST_NAME" --version "$WHEEL_VERSION" --tag "$WHEEL_TAG" \
    --module "$MODULE" --python "$SWIGDIR/pjsua2.py" --out "$CACHE/$ARCH-$KEY/.tmp.whl" \
    --source "$PJ_TARBALL sha256 $PJ_SHA256 (pjproject $PJ_VERSION, git $PJ_COMMIT)" \
    --configure "${CONFIGURE_FLAGS[*]}"
mv "$CACHE/$ARCH-$KEY/.tmp.whl" "$CACHED"
rm -rf "$WORK"
log "built $WHEEL_NAME in $((SECONDS - START)) s (key $KEY)"
deliver
