"""An out-of-tree handler served from YAML: the example package under tests/plugin_example (the
``ramdisk`` subtype, installed into the venv by scripts/bootstrap.sh, no code of tcmu-py touched)
declares its disks in its own ``ramdisks:`` section; ``tcmu-py serve -c`` creates them and
exports them through tcm_loop, Linux's sd driver binds them, ext4 works on them, ``tcmu-py
status`` shows the handler's own table (text and --json) and ``tcmu-py ramdisk`` its command."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

from guestlib import CORE, Context, log, run, scenario, scsi_disk, serve_config, tcmu_py, wait_for

MIB = 1 << 20


@scenario(timeout=480)
def ramdisk_from_yaml(ctx: Context) -> None:
    cfg = ctx.workdir / "ramdisk.yaml"
    cfg.write_text(
        f"state_dir: {ctx.workdir / 'state'}\n"
        "defaults: {hw_max_sectors: 1024, max_data_area_mb: 16}\n"
        "ramdisks:\n"
        "  limit: 48M\n"
        "  disks:\n"
        "    - {name: r0, size: 32M}\n"
        "exports:\n"
        "  loopback:\n"
        "    - {device: r0, lun: 0}\n"
    )
    out = run(tcmu_py("check", "-c", str(cfg)), timeout=ctx.remaining(60)).stdout
    assert "OK (1 device(s))" in out, out
    d, run_dir = serve_config(ctx, cfg)
    dev = wait_for(lambda: scsi_disk("TCMU-PY", "RAMDISK DISK"), ctx.remaining(120),
                   "the ram disk (INQUIRY TCMU-PY RAMDISK DISK) through tcm_loop")
    size = int((Path("/sys/block") / dev.name / "size").read_text()) * 512
    assert size == 32 * MIB, f"{dev}: {size} bytes, expected 32 MiB"
    log(f"r0: {dev}")

    # Data through the page-cache-free path, then a file system.
    data = os.urandom(MIB)
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        assert os.pwritev(fd, [buf], 3 * MIB) == len(data)
        back = mmap.mmap(-1, len(data))
        assert os.preadv(fd, [back], 3 * MIB) == len(data)
        assert back[:] == data, "read-back differs"
    finally:
        os.close(fd)
    run(["mkfs.ext4", "-q", "-F", str(dev)], timeout=ctx.remaining(120))
    fsck = run(["fsck.ext4", "-f", "-n", str(dev)], timeout=ctx.remaining(120), check=False)
    assert fsck.returncode == 0, f"fsck after mkfs: exit {fsck.returncode}\n{fsck.stdout}"

    # The handler's status rows and command, through the real CLI.
    text = run(tcmu_py("status", "-i", "0", "--run-dir", str(run_dir)),
               timeout=ctx.remaining(60)).stdout
    ctx.details["status"] = text
    assert "\nram disks\n" in text and "r0" in text and "ramdisk" in text, text
    st = json.loads(run(tcmu_py("status", "-i", "0", "--json", "--run-dir", str(run_dir)),
                        timeout=ctx.remaining(60)).stdout)
    assert "ramdisk" in st["handlers"], st
    (row,) = st["ramdisks"]
    assert row["name"] == "r0" and row["size"] == 32 * MIB and row["written"] >= MIB, row
    pages = run(tcmu_py("ramdisk", "pages", "32M"), timeout=ctx.remaining(60)).stdout
    assert pages.startswith("8192 pages"), pages

    gone = run(tcmu_py("down", "-c", str(cfg)), timeout=ctx.remaining(120))
    log(gone.stdout + gone.stderr)
    assert not list(CORE.glob("user_*/r0")), "down left the backstore"
    assert d.stop(timeout=60) == 0, "serve did not exit cleanly on SIGTERM"
