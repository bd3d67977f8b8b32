#!/usr/bin/env bash
# The package as a user installs it (scripts/test.sh runs this; also by hand):
#
#   bash scripts/package_check.sh [OUTDIR]
#
# 1. builds the sdist, and the wheel from that sdist (so a file missing from the sdist fails
#    here), into OUTDIR (default: a temporary directory) with `python -m build`;
# 2. installs the wheel, without extras, into a new virtualenv outside the checkout;
# 3. from outside the checkout: `tcmu-py serve --help`, `python -m tcmu_py --help`, a FakeKernel
#    smoke test (a raw disk written and read through the production ring and runner, and the
#    conformance checks on a RAM disk), and `tcmu-py apply` without rtslib-fb naming the extra.
# Exit status non-zero on the first failure, with what failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d /tmp/tcmu-py-package.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
OUT=${1:-$WORK/dist}
fail() { echo "package_check: $*" >&2; exit 1; }

rm -rf "$OUT"
"$PY" -m build --outdir "$OUT" . >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; fail "build failed"; }
sdist=$(ls "$OUT"/tcmu_py-*.tar.gz) || fail "no sdist in $OUT"
wheel=$(ls "$OUT"/tcmu_py-*.whl) || fail "no wheel in $OUT"
echo "built: ${sdist##*/} ${wheel##*/}"

"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel" \
    || fail "pip install ${wheel##*/} into a clean venv failed"
cd "$WORK"  # nothing of the checkout on sys.path from here
"$WORK/venv/bin/tcmu-py" serve --help >/dev/null || fail "tcmu-py serve --help failed"
"$WORK/venv/bin/python" -m tcmu_py --help >/dev/null || fail "python -m tcmu_py --help failed"
"$WORK/venv/bin/python" - <<'PYEOF' || fail "FakeKernel smoke test failed"
import os
import tempfile

import tcmu_py
from tcmu_py import DeviceConfig
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.testing import MemoryDisk, RingHarness, cdbs, check_block_handler
from tcmu_py.device.block import open_block_device

assert "site-packages" in tcmu_py.__file__, tcmu_py.__file__
MIB = 1 << 20
with tempfile.TemporaryDirectory() as d:
    img = os.path.join(d, "d0.img")
    device = RawHandler.open(DeviceConfig("d0", "raw", img, size=4 * MIB))
    h = RingHarness(device)
    try:
        h.run(cdbs.test_unit_ready())  # the power-on unit attention
        data = bytes(range(256)) * 16
        assert h.run(cdbs.write10(8, 8), data_out=data).good
        assert h.run(cdbs.read10(8, 8), data_in_len=4096).data == data
    finally:
        h.close()
    with open(img, "rb") as f:
        f.seek(8 * 512)
        assert f.read(4096) == data
check_block_handler(
    lambda: open_block_device(DeviceConfig("m0", "memory", "", size=MIB), MemoryDisk(MIB)))
print("smoke: ok")
PYEOF
set +e
out=$("$WORK/venv/bin/tcmu-py" apply 2>&1); rc=$?
set -e
[[ $rc == 2 && $out == *"tcmu-py[lio]"* ]] \
    || fail "apply without rtslib-fb: expected exit 2 naming the lio extra, got $rc: $out"
echo "package_check: ok"
