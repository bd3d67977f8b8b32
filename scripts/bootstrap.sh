#!/usr/bin/env bash
# Idempotent setup of a Debian 12 machine for tcmu-py, as root, without standard input.
#
#   bash scripts/bootstrap.sh
#
# Installs the Debian packages the project needs (build tools, the VM lab: QEMU + Debian's
# kernel with LIO/TCMU modules + virtme-ng's static busybox, and the initiators/peers the kernel
# scenarios and benchmarks drive), then creates ./.venv and installs the package editable with its
# test and LIO extras plus virtme-ng, and the example out-of-tree handler package the unit tests
# plug in (tests/plugin_example), and builds the USB gadget fabric module usb_f_tcm for the lab
# kernel (scripts/usb_f_tcm/build.sh; kept under /var/lib/tcmu-py). Re-runs skip whatever is already in place: apt runs only if
# a package is missing, pip only if the packaging inputs changed or the install is broken.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
# The lab boots the kernel with virtme-ng's own initramfs: skip building Debian's (slow, and it
# can fail inside containers). /etc/kernel/postinst.d/initramfs-tools honours INITRD=No.
export INITRD=No

APT_PACKAGES=(
    # building the cffi extension against the kernel's uapi header
    gcc python3-dev python3-venv libffi-dev linux-libc-dev
    # the native loop's dedup journal appends: XXH3 from its header (compiled in)
    libxxhash-dev
    # the VM lab (vng needs a statically linked busybox for its initramfs)
    qemu-system-x86 linux-image-amd64 busybox-static kmod udev iproute2
    # initiators and peers used in the guest by kernel scenarios and benchmarks
    sg3-utils fio lsscsi e2fsprogs xfsprogs mt-st mtx libiscsi-bin tcmu-runner dbus curl
    # real backup applications' own drive and autochanger qualification (btape, amtapetype)
    bacula-sd amanda-server
    # amanda-common uses Encode::Locale without declaring it (Debian 12): without it every Amanda
    # tool dies at compile time
    libencode-locale-perl
    # LIO's own shell: the targetcli_dbus kernel scenario drives tcmu-py through it over D-Bus
    # (brings python3-rtslib-fb and python3-gi)
    targetcli-fb
    # the fabrics kernel scenario: SRP and iSER over soft-RoCE (rdma-core: the rxe provider and
    # the rdma tool's peers), iSER's initiator (open-iscsi: iscsiadm, iscsid), FCoE inspection
    # (fcoe-utils: fcoeadm)
    rdma-core open-iscsi fcoe-utils
    # the mirror handler's NBD legs: libnbd's C API through cffi (ABI mode), nbdkit as the test server
    libnbd0 nbdkit
    # the VTL encryption scenario sets keys with it (SECURITY PROTOCOL OUT, SSC-5 8.5)
    stenc
    # the ceph handler: librbd/librados through cffi (ABI mode; librbd-dev holds the headers the
    # binding's declarations follow), and a real cluster for its tests (tcmu_py/testing/ceph_cluster.py:
    # ceph-mon, ceph-mgr, ceph-osd; ceph-base brings monmaptool). No python3-rados: our venv's
    # Python cannot import Debian's, monitor commands go through librados' C API.
    ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev
    # the USB fabric: usb_f_tcm is not built in Debian's kernel, so scripts/usb_f_tcm/build.sh
    # builds it out of tree from the lab kernel's own source and headers (their versions must be
    # the lab kernel's: linux-headers-amd64 follows linux-image-amd64; the build checks both)
    linux-source-6.1 linux-headers-amd64 make patch xz-utils
)
VIRTME_NG="virtme-ng==1.42"
APT_LOG=/tmp/tcmu-py-bootstrap-apt.log

step() { printf '[bootstrap %4ss] %s\n' "$SECONDS" "$*"; }

missing_packages() {
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]]; then
            echo "$pkg"
        fi
    done
}

apt_install() {
    apt-get install -y \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" >>"$APT_LOG" 2>&1
}

mapfile -t MISSING < <(missing_packages)
if ((${#MISSING[@]})); then
    step "apt: installing ${MISSING[*]} (log: $APT_LOG)"
    : >"$APT_LOG"
    if ! apt-get update >>"$APT_LOG" 2>&1; then
        tail -n 30 "$APT_LOG"; echo "bootstrap: apt-get update failed" >&2; exit 1
    fi
    if ! apt_install "${MISSING[@]}"; then
        # An interrupted earlier run can leave dpkg half-configured: finish it and retry once.
        step "apt: install failed, running dpkg --configure -a and retrying"
        dpkg --configure -a >>"$APT_LOG" 2>&1 || true
        if ! apt_install "${MISSING[@]}"; then
            tail -n 40 "$APT_LOG"; echo "bootstrap: apt-get install failed" >&2; exit 1
        fi
    fi
    mapfile -t STILL < <(missing_packages)
    if ((${#STILL[@]})); then
        echo "bootstrap: still not installed: ${STILL[*]}" >&2; exit 1
    fi
else
    step "apt: all ${#APT_PACKAGES[@]} packages present"
fi

if [[ ! -x .venv/bin/python ]]; then
    step "creating .venv"
    python3 -m venv .venv
fi

# Inputs that change what `pip install -e` produces (dependencies, the compiled extension).
STAMP=.venv/.tcmu-py-bootstrap
stamp_value() {
    {
        echo "$VIRTME_NG"
        cat pyproject.toml setup.py 2>/dev/null || true
        cat tests/plugin_example/pyproject.toml 2>/dev/null || true
        cat tcmu_py/_ffi_build.py tcmu_py/_sources.py tcmu_py/*.h tcmu_py/*.c 2>/dev/null || true
    } | sha256sum | cut -d' ' -f1
}
WANT=$(stamp_value)
if [[ -f $STAMP && "$(cat "$STAMP")" == "$WANT" ]] \
    && .venv/bin/python -c 'import tcmu_py._tcmu_ring, rtslib_fb, pytest, virtme, importlinter, tcmu_py_plugin_example' 2>/dev/null \
    && [[ -x .venv/bin/vng ]]; then
    step "venv: up to date"
else
    step "venv: pip install -e '.[test,lio,lab,metrics]'"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,lio,lab,metrics]'
    # An out-of-tree handler, as a third party ships one (tests/unit/test_plugin_example.py).
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
        -e tests/plugin_example
    echo "$WANT" >"$STAMP"
fi

KERNEL=$(.venv/bin/python -c 'from tcmu_py import lab; print(lab.find_kernel())')
# The USB fabric's gadget module for that kernel (kept under /var/lib/tcmu-py; ~35 s the
# first time, nothing after): a source or headers version that is not the kernel's stops here.
step "usb_f_tcm for ${KERNEL##*/vmlinuz-}"
bash scripts/usb_f_tcm/build.sh "${KERNEL##*/vmlinuz-}"
step "ready: lab kernel $KERNEL, $(.venv/bin/python --version)"
