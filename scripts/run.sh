#!/usr/bin/env bash
# The main job of tcmu-py on this machine:
#
#   bash scripts/run.sh [-c config.yaml]
#
# Sets the machine up (scripts/bootstrap.sh), then runs `tcmu-py serve` with the embedded default
# configuration (or -c FILE): one 256 MiB raw disk under /var/lib/tcmu-py, exported through
# tcm_loop and over iSCSI on 127.0.0.1:3260. Where the running kernel has target_core_user, it
# serves right here (Ctrl-C stops it). Elsewhere (containers, CI machines) it boots Debian's
# kernel under QEMU (`tcmu-py lab`), serves there, and shows the disk working.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if modprobe -n target_core_user 2>/dev/null && [ -d /sys/kernel/config ] && [ -z "${TCMU_PY_FORCE_LAB:-}" ]; then
    modprobe -a target_core_user tcm_loop iscsi_target_mod  # -a: all are modules, not params
    mkdir -p /var/lib/tcmu-py
    exec .venv/bin/tcmu-py serve "${@:---default}"
fi
DEMO='set -x
tcmu-py status
lsscsi
dev=$(lsscsi | awk "/TCMU-PY/ {print \$NF; exit}")
sg_readcap -l "$dev"
head -c 1048576 /dev/urandom > /tmp/demo.bin
dd if=/tmp/demo.bin of="$dev" bs=1M count=1 oflag=direct status=none
dd if="$dev" of=/tmp/back.bin bs=1M count=1 iflag=direct status=none
cmp /tmp/demo.bin /tmp/back.bin && echo "tcmu-py demo: 1 MiB written and read back intact"
iscsi-inq iscsi://127.0.0.1/iqn.2025-01.org.tcmu-py:default/0 | head -5
tcmu-py status'
exec .venv/bin/python -m tcmu_py.lab "$@" -- "$DEMO"
