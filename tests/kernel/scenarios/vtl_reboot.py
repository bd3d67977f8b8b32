"""The library across a power loss: the VM is reset mid-work, with no sync and the daemon running,
and the next boot serves the same library from the same disk.

The library lives on an ext4 file system on /dev/vdc, a virtio-blk disk backed by a host image
file (``tests/kernel/conftest.py``'s power-loss chain attaches it to both boots). Unlike the 9p
shares, what the guest has not flushed to that disk is gone after the reset, as after a power
cut: only what the daemon made durable survives. These two scenarios need boots of their own
(``own_boot``), so the shared boot of every other scenario leaves them out.

- ``before_power_loss``: fresh file system; two tar archives and a file of dd blocks on
  ABC000L8 in drive 0 (each closed, so each ends with a filemark), cartridges moved by the
  changer, then blocks written to drive 1 and left without a filemark (the device still open);
  the expected state goes to the host (9p, synchronous), then ``sysrq b``: an immediate reset.
- ``after_power_loss``: the journal replays, ``e2fsck -fn`` finds nothing; `tcmu-py serve -c`
  with the same YAML recreates the LIO objects the reset took away; the changer reports the same
  inventory, both archives extract byte-identical, the dd blocks read back, end of data follows
  the last filemark; on drive 1 what survived of the unterminated blocks is a prefix of them,
  and the cartridge takes new data after it.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from guestlib import Context, log, power_cut, run, save_expected, scenario

from scenarios.vtl import (
    KIB,
    MIB,
    load,
    mt,
    mt_tell,
    mtx_status,
    random_tree,
    read_blocks,
    serve_library,
    sh,
    tcmu_py,
    tree_digest,
    write_block,
)

DISK = Path("/dev/vdc")  # conftest.POWER_LOSS_DISKS
MOUNT = Path("/tmp/vtl-disk")
EXPECTED = "expected.json"
TAR_BLOCKING = "128"  # tar -b 128: 64 KiB records


def _mount(ctx: Context) -> Path:
    assert DISK.exists(), f"{DISK} missing: the host test attaches the library disk"
    MOUNT.mkdir(parents=True, exist_ok=True)
    sh(ctx, "mount", "-t", "ext4", str(DISK), str(MOUNT))
    ctx.cleanup.callback(lambda: run(["umount", str(MOUNT)], timeout=60, check=False))
    return MOUNT


def _read_to_end_of_data(tape: Path) -> list[bytes]:
    """Blocks up to end of data where no filemark ends them. st answers the drive's BLANK CHECK
    with EIO unless a filemark came just before (as with a real drive): EIO ends the read here,
    and the caller checks with READ POSITION that it was end of data and not an error."""
    fd = os.open(tape, os.O_RDONLY)
    out: list[bytes] = []
    try:
        while b := os.read(fd, 1 * MIB):
            out.append(b)
    except OSError as exc:
        if exc.errno != errno.EIO:
            raise
    finally:
        os.close(fd)
    return out


@scenario(timeout=900, own_boot=True)
def before_power_loss(ctx: Context) -> None:
    """Write to the library on a fresh disk, record what must survive, reset the VM."""
    sh(ctx, "mkfs.ext4", "-q", "-F", str(DISK))
    root = _mount(ctx)
    lab = serve_library(ctx, "before", root=root)
    tape = lab.tapes[0]
    load(ctx, lab, 1, 0)
    trees = [random_tree(ctx.workdir / f"tree{t}", 10, t) for t in range(2)]
    for src in trees:
        sh(ctx, "tar", "-c", "-b", TAR_BLOCKING, "-f", str(tape), "-C", str(src), ".")
    blocks = [os.urandom(n) for n in (1000, 256 * KIB, 3000, 70 * KIB + 1)]
    write_block(tape, *blocks)
    objects = mt_tell(ctx, tape)
    changer = str(lab.changer_sg)
    sh(ctx, "mtx", "-f", changer, "transfer", "2", "6")
    sh(ctx, "mtx", "-f", changer, "load", "3", "1")
    inventory = mtx_status(ctx, lab)
    assert inventory.drives == {0: ("ABC000L8", 1), 1: ("ABC002L8", 3)}, inventory
    mt(ctx, lab.tapes[1], "rewind")

    # Blocks with no filemark after them, the device left open: st and the daemon may still
    # hold some of them when the power goes.
    pending = [os.urandom(64 * KIB) for _ in range(8)]
    fd = os.open(lab.tapes[1], os.O_WRONLY)
    for b in pending:
        assert os.write(fd, b) == len(b)

    expected = {
        "trees": [tree_digest(src) for src in trees],
        "blocks": [b.hex() for b in blocks],
        "objects": objects,
        "drives": {str(k): list(v) for k, v in inventory.drives.items()},
        "slots": {str(k): v for k, v in inventory.slots.items()},
        "pending": [b.hex() for b in pending],
    }
    save_expected(ctx, EXPECTED, expected)
    power_cut("with blocks unterminated on a drive")


@scenario(timeout=900, own_boot=True)
def after_power_loss(ctx: Context) -> None:
    """Serve the same library after the reset; everything acknowledged as durable is there."""
    before = ctx.artifacts.parent / "vtl_reboot.before_power_loss" / EXPECTED
    expected = json.loads(before.read_text())
    # Mounting replays the journal; the file system is then clean.
    MOUNT.mkdir(parents=True, exist_ok=True)
    sh(ctx, "mount", "-t", "ext4", str(DISK), str(MOUNT))
    sh(ctx, "umount", str(MOUNT))
    fsck = run(["e2fsck", "-fn", str(DISK)], timeout=ctx.remaining(300), check=False)
    assert fsck.returncode == 0, f"e2fsck -fn: exit {fsck.returncode}\n{fsck.stdout}"
    root = _mount(ctx)
    lab = serve_library(ctx, "after", root=root)

    inventory = mtx_status(ctx, lab)
    assert {str(k): list(v) for k, v in inventory.drives.items()} == expected["drives"], inventory
    assert {str(k): v for k, v in inventory.slots.items()} == expected["slots"], inventory

    tape = lab.tapes[0]
    for n, digest in enumerate(expected["trees"]):
        mt(ctx, tape, "rewind")
        if n:
            mt(ctx, tape, "fsf", str(n))
        out = ctx.workdir / f"out{n}"
        out.mkdir()
        sh(ctx, "tar", "-x", "-b", TAR_BLOCKING, "-f", str(tape), "-C", str(out))
        assert tree_digest(out) == digest, f"archive {n} differs after the reset"
    mt(ctx, tape, "rewind")
    mt(ctx, tape, "fsf", "2")
    assert read_blocks(tape, 1 * MIB) == [bytes.fromhex(b) for b in expected["blocks"]]
    mt(ctx, tape, "eod")
    assert mt_tell(ctx, tape) == expected["objects"]

    # Drive 1: whatever reached the cartridge of the unterminated blocks, in order, then end
    # of data; the cartridge appends after it.
    tape1 = lab.tapes[1]
    pending = [bytes.fromhex(b) for b in expected["pending"]]
    mt(ctx, tape1, "rewind")
    survived = _read_to_end_of_data(tape1)
    assert survived == pending[: len(survived)], (
        f"{len(survived)} blocks read back, not a prefix of the {len(pending)} written")
    assert mt_tell(ctx, tape1) == len(survived), "the read stopped short of end of data"
    mt(ctx, tape1, "eod")
    assert mt_tell(ctx, tape1) == len(survived)
    ctx.details["unterminated_blocks_written"] = len(pending)
    ctx.details["unterminated_blocks_survived"] = len(survived)
    log(f"drive 1: {len(survived)} of {len(pending)} unterminated blocks survived")
    more = [os.urandom(10 * KIB), os.urandom(20 * KIB)]
    write_block(tape1, *more)
    mt(ctx, tape1, "rewind")
    assert read_blocks(tape1, 1 * MIB) == survived + more  # one file: no filemark between

    dump = sh(ctx, *tcmu_py("vtl", "dump", str(lab.library), "ABC000L8"))
    assert dump.count("filemark") == 3, dump
