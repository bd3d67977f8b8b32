#!/usr/bin/env bash
# Build usb_f_tcm, LIO's USB gadget fabric, out of tree for the lab kernel (issue 18).
#
#   bash scripts/usb_f_tcm/build.sh [KERNEL_VERSION]     (scripts/bootstrap.sh runs it)
#
# Debian's kernels leave CONFIG_USB_CONFIGFS_F_TCM unset, so the module is built here from the
# Debian source package of the lab kernel (linux-source-X.Y) against that kernel's own headers
# (linux-headers-VERSION), with our patch (bot-ack-kref.patch: Bulk-Only commands are
# submitted with TARGET_SCF_ACK_KREF, without which BOT corrupts data, and take their data
# direction from the CBW, not from an opcode table that refuses a changer's opcodes). Result,
# kept outside the repository (shared by every checkout on the machine) and never committed:
#
#   $TCMU_PY_USB_F_TCM_DIR (default /var/lib/tcmu-py/usb_f_tcm)/<version>/usb_f_tcm.ko
#   .../<version>/BUILD-INFO   (what it was built from; the lab and the scenario print it)
#
# Not /var/cache: virtme-ng mounts an empty tmpfs there in the guest, which must see the module
# (tcmu_py.lab_fabrics.USB_F_TCM_DIR names the same directory).
#
# KERNEL_VERSION defaults to the lab kernel (tcmu_py.lab.find_kernel()). Idempotent: nothing is
# rebuilt while the kernel, the package versions and these build inputs are unchanged. Fails
# with the reason (and the apt-get line that fixes it) when the installed source or headers are
# not those of that kernel: a module built from other sources must not be loaded into it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${TCMU_PY_USB_F_TCM_DIR:-/var/lib/tcmu-py/usb_f_tcm}
# The files of drivers/usb/gadget/ the module needs (f_tcm.c includes tcm.h, u_tcm.h and
# ../configfs.h; everything else comes from the headers package).
SOURCES=(function/f_tcm.c function/tcm.h function/u_tcm.h configfs.h)

die() { echo "usb_f_tcm build: $*" >&2; exit 1; }
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
pkg_installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }

KVER=${1:-}
if [[ -z $KVER ]]; then
    [[ -x $REPO/.venv/bin/python ]] || die "no kernel version given and no $REPO/.venv to find the lab kernel"
    image=$("$REPO/.venv/bin/python" -c 'from tcmu_py import lab; print(lab.find_kernel())')
    KVER=${image##*/vmlinuz-}
fi
MAJMIN=$(cut -d. -f1,2 <<<"$KVER")
SRC_PKG=linux-source-$MAJMIN
HDR_PKG=linux-headers-$KVER
IMG_PKG=linux-image-$KVER
TARBALL=/usr/src/$SRC_PKG.tar.xz
KBUILD=/lib/modules/$KVER/build

# The three packages must come from one build of Debian's linux source package.
pkg_installed "$IMG_PKG" || die "$IMG_PKG is not installed (the kernel $KVER is not Debian's?)"
IMG_VER=$(pkg_version "$IMG_PKG")
FIX="apt-get install $HDR_PKG $SRC_PKG=$IMG_VER"
pkg_installed "$HDR_PKG" || die "$HDR_PKG (the headers of kernel $KVER) is not installed: $FIX"
pkg_installed "$SRC_PKG" || die "$SRC_PKG (the source of kernel $KVER) is not installed: $FIX"
HDR_VER=$(pkg_version "$HDR_PKG")
SRC_VER=$(pkg_version "$SRC_PKG")
[[ $HDR_VER == "$IMG_VER" ]] \
    || die "version mismatch: $HDR_PKG is $HDR_VER but $IMG_PKG is $IMG_VER: $FIX"
[[ $SRC_VER == "$IMG_VER" ]] \
    || die "version mismatch: $SRC_PKG is $SRC_VER but $IMG_PKG is $IMG_VER (kernel $KVER): $FIX"
[[ -f $TARBALL ]] || die "$TARBALL missing although $SRC_PKG is installed: apt-get install --reinstall $SRC_PKG"
[[ -f $KBUILD/Makefile ]] || die "$KBUILD/Makefile missing although $HDR_PKG is installed"

OUT=$CACHE/$KVER
STAMP=$(
    { echo "$KVER $IMG_VER"; cat "$HERE/bot-ack-kref.patch" "$HERE/Kbuild" "$HERE/build.sh"; } \
        | sha256sum | cut -d' ' -f1
)
if [[ -f $OUT/usb_f_tcm.ko && -f $OUT/BUILD-INFO ]] \
    && grep -qx "stamp=$STAMP" "$OUT/BUILD-INFO"; then
    echo "usb_f_tcm build: up to date ($OUT/usb_f_tcm.ko)"
    exit 0
fi

START=$SECONDS
mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
prefix=$SRC_PKG/drivers/usb/gadget
# xz cannot seek: this reads the whole tarball (~140 MB) but writes only these four files.
tar -xJf "$TARBALL" -C "$WORK" "${SOURCES[@]/#/$prefix/}" \
    || die "$TARBALL lacks one of ${SOURCES[*]} under $prefix"
for f in "${SOURCES[@]}"; do
    mv "$WORK/$prefix/$f" "$WORK/"
done
rm -rf "${WORK:?}/$SRC_PKG"
cp "$HERE/Kbuild" "$WORK/Kbuild"
# --fuzz=0: the patch applies to exactly the lines it was written for, or the build stops.
patch -d "$WORK" -p1 --fuzz=0 --no-backup-if-mismatch --quiet <"$HERE/bot-ack-kref.patch" \
    || die "bot-ack-kref.patch does not apply to f_tcm.c of $SRC_PKG $SRC_VER: update the patch"
make -s -C "$KBUILD" M="$WORK" modules >"$WORK/make.log" 2>&1 \
    || { tail -n 30 "$WORK/make.log" >&2; die "kbuild failed against $KBUILD"; }
vermagic=$(modinfo -F vermagic "$WORK/usb_f_tcm.ko")
[[ $vermagic == "$KVER "* ]] || die "built module has vermagic '$vermagic', not $KVER"

install -m 0644 "$WORK/usb_f_tcm.ko" "$OUT/usb_f_tcm.ko.new"
mv -f "$OUT/usb_f_tcm.ko.new" "$OUT/usb_f_tcm.ko"
SECS=$((SECONDS - START))
cat >"$OUT/BUILD-INFO.new" <<INFO
module=usb_f_tcm (out of tree; CONFIG_USB_CONFIGFS_F_TCM is not set in Debian's kernel)
kernel=$KVER
source=$SRC_PKG $SRC_VER
headers=$HDR_PKG $HDR_VER
patch=bot-ack-kref.patch (Bulk-Only: commands submitted with TARGET_SCF_ACK_KREF, data direction from the CBW; not upstream)
patch_sha256=$(sha256sum "$HERE/bot-ack-kref.patch" | cut -d' ' -f1)
built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$SECS
stamp=$STAMP
INFO
mv -f "$OUT/BUILD-INFO.new" "$OUT/BUILD-INFO"
echo "usb_f_tcm build: built $OUT/usb_f_tcm.ko from $SRC_PKG $SRC_VER + bot-ack-kref.patch in ${SECS}s"
