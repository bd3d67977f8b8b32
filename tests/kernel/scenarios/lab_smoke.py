"""Scenarios that prove the VM lab itself: TCMU devices appear, and a ring served from userspace
turns into a working SCSI disk through tcm_loop. Independent of tcmu_py's own modules."""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from pathlib import Path

from guestlib import (
    Context,
    Daemon,
    create_loopback_lun,
    create_user_backstore,
    have,
    log,
    read_attr,
    run,
    scenario,
    wait_for,
)

RESPONDER = Path(__file__).with_name("_zero_responder.py")
MIB = 1 << 20


@scenario(timeout=60)
def uio_appears(ctx: Context) -> None:
    """Enabling a user backstore creates /dev/uioN named tcm-user/<hba>/<name>/<config> whose
    mapping starts with a version-2 mailbox."""
    bs = create_user_backstore("probe0", "probe/cfg", 16 * MIB, cleanup=ctx.cleanup)
    dev, sysfs = bs.wait_uio(ctx.remaining(10))
    size = int(read_attr(sysfs / "maps" / "map0" / "size"), 16)
    fd = os.open(dev, os.O_RDWR)
    try:
        with mmap.mmap(fd, size) as buf:
            version, flags, cmdr_off, cmdr_size = struct.unpack_from("<HHII", buf, 0)
    finally:
        os.close(fd)
    ctx.details.update(
        uio=str(dev), map_size=size, version=version, flags=flags, cmdr_off=cmdr_off,
        cmdr_size=cmdr_size,
    )
    log(f"{dev}: {ctx.details}")
    assert version == 2, f"mailbox version {version}, expected 2 (TCMU_MAILBOX_VERSION)"
    assert cmdr_off == 128, f"cmdr_off {cmdr_off}, expected 128 (sizeof tcmu_mailbox)"
    assert 0 < cmdr_size < size, f"cmdr_size {cmdr_size} outside the {size:#x} mapping"


@scenario(timeout=240)
def zero_disk_loopback(ctx: Context) -> None:
    """A standalone userspace responder (standard library only) serves a 64 MiB read-only disk
    of zeros through tcm_loop: the sd driver binds it, lsscsi lists it, dd reads zeros,
    sg_readcap reports the size, and the responder saw the scan's INQUIRY and READ CAPACITY
    plus our READs."""
    _zero_disk(ctx, [], read_mib=8)


@scenario(timeout=240)
def zero_disk_tcmu_py_ring(ctx: Context) -> None:
    """The same disk served through tcmu_py.uio.UioDevice + tcmu_py.ring.Ring, completing each
    batch in reverse order (slot stealing) against the real kernel; a 4 MiB direct read is split
    into 512 KiB commands that must complete out of order and still return zeros."""
    stats = _zero_disk(ctx, ["--tcmu-py"], read_mib=16, block="4M")
    assert stats["max_reversed_batch"] >= 2, f"no batch completed out of order: {stats}"


def _zero_disk(ctx: Context, mode: list[str], *, read_mib: int, block: str = "1M") -> dict:
    """Serve the zero disk with the responder in ``mode``, check it end to end from the
    initiator side; return the responder's final statistics."""
    size = 64 * MIB
    bs = create_user_backstore("zero0", "zero/lab", size, cleanup=ctx.cleanup)
    dev, sysfs = bs.wait_uio(ctx.remaining(10))
    responder = Daemon(
        [sys.executable, str(RESPONDER), *mode, str(dev), str(sysfs), str(size // 512)],
        ctx.artifacts / "responder.log",
    )
    ctx.cleanup.callback(responder.stop)
    # Serve the ring before the LUN exists: the kernel scans the LUN immediately.
    responder.start(ready=lambda: "ready" in responder.output(), timeout=ctx.remaining(30))

    # Registered after the responder's stop, so (LIFO) the LUN goes first on cleanup, while
    # the responder still answers.
    lun = create_loopback_lun(bs, cleanup=ctx.cleanup)
    disk = lun.wait_device("block", timeout=ctx.remaining(90))
    ctx.details["scsi_address"] = lun.scsi_address()
    ctx.details["devices"] = lun.scsi_devices()
    log(f"disk {disk} at {ctx.details['scsi_address']}")

    sysfs_size = int(read_attr(Path("/sys/class/block") / disk.name / "size")) * 512
    assert sysfs_size == size, f"/sys/class/block/{disk.name}/size says {sysfs_size}, want {size}"

    if have("lsscsi"):
        out = run(["lsscsi"], timeout=ctx.remaining(30)).stdout
        line = next((ln for ln in out.splitlines() if str(disk) in ln), "")
        assert "TCMUPY" in line and "ZERO-RESPONDER" in line, f"lsscsi: {out!r}"
        ctx.details["lsscsi"] = line.strip()

    # O_DIRECT so the data comes from the ring, not the page cache filled by the partition scan.
    image = ctx.workdir / "read.bin"
    count = read_mib * MIB // _parse_size(block)
    run(
        ["dd", f"if={disk}", f"of={image}", f"bs={block}", f"count={count}", "iflag=direct",
         "status=none"],
        timeout=ctx.remaining(120),
    )
    data = image.read_bytes()
    assert len(data) == read_mib * MIB, f"dd read {len(data)} bytes, want {read_mib * MIB}"
    assert data.count(0) == len(data), "dd read non-zero bytes from the zero disk"

    if have("sg_readcap"):
        out = run(["sg_readcap", "--16", "--readonly", str(disk)], timeout=ctx.remaining(30)).stdout
        assert f"Last LBA={size // 512 - 1}" in out, f"sg_readcap: {out!r}"

    # Remove the LUN first (commands may still be in flight), then stop the responder.
    lun.unlink()
    wait_for(lambda: not Path("/sys/class/block", disk.name).exists(), ctx.remaining(30),
             f"{disk} to disappear after unlinking the LUN")
    status = responder.stop(timeout=ctx.remaining(10))
    assert status == 0, f"responder exited with {status}"
    stats: dict = json.loads(responder.output().strip().splitlines()[-1])
    counts = stats["opcodes"]
    ctx.details["responder"] = stats
    for op, what in (("12", "INQUIRY"), ("28", "READ(10)")):
        assert counts.get(op), f"responder never saw {what} ({op}h): {counts}"
    assert counts.get("25") or counts.get("9e"), f"no READ CAPACITY reached the ring: {counts}"
    return stats


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
