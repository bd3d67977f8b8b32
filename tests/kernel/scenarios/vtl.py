"""The virtual tape library through the real kernel: a library declared in YAML, served by
`tcmu-py serve -c`, exported through tcm_loop, driven by st/ch with mt-st, mtx, tar and dd.

Every scenario starts its own daemon on its own state directory and library directory; cleanup
stops the daemon and runs `tcmu-py down`. The library (YAML below) has a changer, two IBM LTO-8
drives, 8 storage slots and 2 import/export elements, holding ABC000L8..ABC003L8 (slots 1..4)
and the LTO-8 WORM cartridge WRM000LY (slot 5).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from guestlib import CORE, Context, Daemon, LoopbackLun, log, run, scenario, tcmu_py, wait_for

KIB = 1 << 10
MIB = 1 << 20

YAML = """\
state_dir: {state}
libraries:
  - name: lab
    changer: vtl-ch
    drives:
      - {{name: vtl-d0, model: IBM-LTO8}}
      - {{name: vtl-d1, model: IBM-LTO8}}
    slots: 8
    import_export: 2
    cartridges: ["ABC000L8..ABC003L8", "WRM000LY"]
    media_dir: {library}
exports:
  loopback:
    - {{device: vtl-ch, lun: 0}}
    - {{device: vtl-d0, lun: 1}}
    - {{device: vtl-d1, lun: 2}}
"""


@dataclass
class Lab:
    """A served library: config file, library directory, the daemon and the device nodes."""

    config: Path
    library: Path
    run_dir: Path
    daemon: Daemon
    changer_sg: Path  # /dev/sgN of the changer (mtx)
    changer: Path  # /dev/schN
    tapes: list[Path]  # /dev/nstN of drive0, drive1
    tape_sgs: list[Path]


def serve_library(ctx: Context, name: str = "daemon", *, first: bool = True,
                  root: Path | None = None, yaml: str = YAML) -> Lab:
    """Write the YAML (on the first call), start `tcmu-py serve -c`, wait for ready and for st,
    ch and sg to bind the three LUNs. The state and library directories are under ``root``
    (default: the scenario's scratch directory); ``yaml`` is the configuration template
    (``{state}``, ``{library}``: a changer and two drives exported as LUNs 0..2, as `YAML`)."""
    root = ctx.workdir if root is None else root
    state = root / "state"
    library = root / "library"
    config = ctx.workdir / "vtl.yaml"
    run_dir = ctx.workdir / "run"
    if first:
        config.write_text(yaml.format(state=state, library=library))
        # Registered before the daemon's stop, so it runs after it (LIFO).
        ctx.cleanup.callback(lambda: run(tcmu_py("down", "-c", str(config)), timeout=120,
                                         check=False))
    ready = ctx.workdir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    d = Daemon(
        tcmu_py("-v", "serve", "-c", str(config), "--run-dir", str(run_dir),
                "--ready-file", str(ready)),
        ctx.artifacts / f"{name}.log",
    )
    ctx.cleanup.callback(d.stop)
    # The first start in a boot imports everything over the VM's share of the host
    # filesystem, under emulation: minutes, not seconds (it returns as soon as it is ready).
    d.start(ready=ready.exists, timeout=ctx.remaining(240))
    from tcmu_py.daemon.lio import loopback_wwn

    wwn = loopback_wwn(str(state))
    luns = [LoopbackLun(wwn, n, None) for n in range(3)]  # type: ignore[arg-type]
    lab = Lab(
        config,
        library,
        run_dir,
        d,
        luns[0].wait_device("scsi_generic", ctx.remaining(120)),
        luns[0].wait_device("scsi_changer", ctx.remaining(60)),
        [lun.wait_device("scsi_tape", ctx.remaining(60)) for lun in luns[1:]],
        [lun.wait_device("scsi_generic", ctx.remaining(60)) for lun in luns[1:]],
    )
    log(f"changer {lab.changer_sg} {lab.changer}, drives {lab.tapes} {lab.tape_sgs}")
    for sg in (lab.changer_sg, *lab.tape_sgs):
        settle(ctx, sg)
    for tape in lab.tapes:
        wait_tape_free(tape, ctx.remaining(60))
    return lab


def wait_tape_free(tape: Path, timeout: float) -> None:
    """Wait until `tape` can be opened: st allows one open at a time, and udev's probe of a new
    tape device (scsi_id on the node) holds it for a moment (EBUSY meanwhile)."""

    def free() -> bool:
        try:
            fd = os.open(tape, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise
        os.close(fd)
        return True

    wait_for(free, timeout, f"{tape} to be free (udev probing it)")


def settle(ctx: Context, sg: Path) -> None:
    """TEST UNIT READY until it passes on the changer, or reports only NOT READY / no medium on
    a drive: a pending UNIT ATTENTION (power on, a daemon restart, an operator change) is
    consumed here instead of failing the first mtx call."""

    def ok() -> bool:
        res = run(["sg_turs", str(sg)], timeout=ctx.remaining(30), check=False)
        text = (res.stdout + res.stderr).lower()
        return res.returncode == 0 or ("not ready" in text and "attention" not in text)

    wait_for(ok, ctx.remaining(60), f"{sg} to answer TEST UNIT READY without UNIT ATTENTION")


def sh(ctx: Context, *argv: str, check: bool = True, cap: float = 120) -> str:
    res = run(list(argv), timeout=ctx.remaining(cap), check=check)
    return res.stdout + res.stderr


# --------------------------------------------------------------------------------------------
# mtx and mt parsing


@dataclass(frozen=True)
class MtxStatus:
    drives: dict[int, tuple[str | None, int | None]]  # drive -> (barcode, source slot)
    slots: dict[int, str | None]  # slot -> barcode (None: empty)
    ie_slots: set[int]
    header: tuple[int, int, int]  # drives, slots (incl. import/export), import/export


_HEADER = re.compile(r"Storage Changer \S+:(\d+) Drives, (\d+) Slots \( (\d+) Import/Export \)")
_DRIVE = re.compile(r"Data Transfer Element (\d+):(Empty|Full)"
                    r"(?: \(Storage Element (\d+) Loaded\))?(?::VolumeTag = (\S+))?")
_SLOT = re.compile(r"Storage Element (\d+)( IMPORT/EXPORT)?:(Empty|Full)(?: :VolumeTag=(\S+))?")


def mtx_status(ctx: Context, lab: Lab) -> MtxStatus:
    out = sh(ctx, "mtx", "-f", str(lab.changer_sg), "status")
    m = _HEADER.search(out)
    assert m, out
    drives = {}
    for d in _DRIVE.finditer(out):
        full = d.group(2) == "Full"
        drives[int(d.group(1))] = (d.group(4) if full else None,
                                   int(d.group(3)) if d.group(3) else None)
    slots, ie = {}, set()
    for s in _SLOT.finditer(out):
        slots[int(s.group(1))] = s.group(4) if s.group(3) == "Full" else None
        if s.group(2):
            ie.add(int(s.group(1)))
    return MtxStatus(drives, slots, ie, (int(m.group(1)), int(m.group(2)), int(m.group(3))))


_POS = re.compile(r"File number=(-?\d+), block number=(-?\d+)")


def mt(ctx: Context, tape: Path, *args: str, check: bool = True) -> str:
    return sh(ctx, "mt", "-f", str(tape), *args, check=check)


def mt_pos(ctx: Context, tape: Path) -> tuple[int, int, str]:
    """(file number, block number, status text) from `mt status`."""
    out = mt(ctx, tape, "status")
    m = _POS.search(out)
    assert m, out
    return int(m.group(1)), int(m.group(2)), out


def mt_tell(ctx: Context, tape: Path) -> int:
    """The logical object number READ POSITION reports (blocks and filemarks counted)."""
    out = mt(ctx, tape, "tell")
    m = re.search(r"At block (\d+)\.", out)
    assert m, out
    return int(m.group(1))


def write_block(tape: Path, *blocks: bytes) -> None:
    """One open: each bytes object one write() = one variable-length block; the close then
    writes a filemark (st does after writing)."""
    fd = os.open(tape, os.O_WRONLY)
    try:
        for b in blocks:
            assert os.write(fd, b) == len(b)
    finally:
        os.close(fd)


def read_blocks(tape: Path, bufsize: int, limit: int = 1 << 30) -> list[bytes]:
    """Read blocks up to the next filemark (read returns 0), each with a `bufsize` buffer."""
    fd = os.open(tape, os.O_RDONLY)
    out: list[bytes] = []
    try:
        while len(out) < limit:
            b = os.read(fd, bufsize)
            if not b:
                break
            out.append(b)
    finally:
        os.close(fd)
    return out


def slot_of(st: MtxStatus, barcode: str) -> int:
    return next(s for s, b in st.slots.items() if b == barcode)


def load(ctx: Context, lab: Lab, slot: int, drive: int) -> None:
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "load", str(slot), str(drive))
    # st learns about the new medium from the UNIT ATTENTION; its open waits for the drive.
    mt(ctx, lab.tapes[drive], "rewind")


# --------------------------------------------------------------------------------------------
# Scenarios


@scenario(timeout=900)
def changer_and_drive_commands(ctx: Context) -> None:
    """lsscsi lists the drives and the mediumx changer; mtx inquiry/status/load/unload/
    transfer/first/next; mt status/setblk/weof/fsf/bsf/fsr/bsr/eod/tell/seek/rewind/offline;
    then partitions (`partitions_round_trip`)."""
    lab = serve_library(ctx)
    out = sh(ctx, "lsscsi", "-g")
    ch_line = next((ln for ln in out.splitlines() if str(lab.changer_sg) in ln), "")
    assert re.search(r"\bmediumx\s+TCMU-PY\s+VTL LIBRARY\b", ch_line), out
    for tape in lab.tapes:
        st_dev = f"/dev/st{tape.name[3:]}"
        line = next((ln for ln in out.splitlines() if st_dev in ln.split()), "")
        assert re.search(r"\btape\s+IBM\s+ULT3580-TD8\b", line), f"{st_dev}:\n{out}"
    assert lab.changer.name.startswith("sch") and lab.changer.exists()

    inq = sh(ctx, "mtx", "-f", str(lab.changer_sg), "inquiry")
    assert "Product Type: Medium Changer" in inq, inq
    assert re.search(r"Vendor ID: 'TCMU-PY\s*'", inq), inq
    assert re.search(r"Product ID: 'VTL LIBRARY\s*'", inq), inq

    st = mtx_status(ctx, lab)
    # 8 storage + 2 import/export slots; mtx numbers the I/E slots after the storage ones.
    assert st.header == (2, 10, 2), st
    assert st.drives == {0: (None, None), 1: (None, None)}, st
    assert st.ie_slots == {9, 10}, st
    assert [st.slots[s] for s in range(1, 11)] == [
        "ABC000L8", "ABC001L8", "ABC002L8", "ABC003L8", "WRM000LY", None, None, None, None,
        None], st

    sh(ctx, "mtx", "-f", str(lab.changer_sg), "load", "1", "0")
    st = mtx_status(ctx, lab)
    assert st.drives[0] == ("ABC000L8", 1) and st.slots[1] is None, st
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload", "1", "0")
    st = mtx_status(ctx, lab)
    assert st.drives[0] == (None, None) and st.slots[1] == "ABC000L8", st
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "transfer", "2", "7")
    st = mtx_status(ctx, lab)
    assert st.slots[2] is None and st.slots[7] == "ABC001L8", st
    # Moving onto a full slot fails and changes nothing.
    res = run(["mtx", "-f", str(lab.changer_sg), "transfer", "3", "4"],
              timeout=ctx.remaining(60), check=False)
    assert res.returncode != 0, res
    assert mtx_status(ctx, lab).slots[3] == "ABC002L8"
    # first: the first full slot (1) into drive 0; next: back to slot 1, then the next full
    # slot after it (3, since 2 is now empty).
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "first", "0")
    assert mtx_status(ctx, lab).drives[0] == ("ABC000L8", 1)
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "next", "0")
    st = mtx_status(ctx, lab)
    assert st.drives[0] == ("ABC002L8", 3) and st.slots[1] == "ABC000L8", st
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload")
    st = mtx_status(ctx, lab)
    assert st.drives[0] == (None, None) and st.slots[3] == "ABC002L8", st

    # ---- mt on drive 0 with ABC000L8
    tape = lab.tapes[0]
    load(ctx, lab, 1, 0)
    f, b, text = mt_pos(ctx, tape)
    assert (f, b) == (0, 0) and "BOT" in text and "ONLINE" in text, text
    assert re.search(r"Tape block size 0 bytes\. Density code 0x5e", text), text
    assert mt_tell(ctx, tape) == 0
    # Layout: file 0 = 3 blocks, file 1 = 2 blocks, files 2 and 3 empty (weof 2), file 4 =
    # 1 block; st writes the filemark closing a file when the device is closed after writing.
    blocks = [os.urandom(64 * KIB + i) for i in range(6)]
    write_block(tape, *blocks[0:3])
    assert mt_pos(ctx, tape)[:2] == (1, 0)
    write_block(tape, *blocks[3:5])
    mt(ctx, tape, "weof", "2")
    assert mt_pos(ctx, tape)[:2] == (4, 0)
    write_block(tape, blocks[5])
    # objects: B0 B1 B2 FM | B3 B4 FM | FM | FM | B5 FM  -> EOD at 11
    assert mt_tell(ctx, tape) == 11
    mt(ctx, tape, "rewind")
    assert mt_pos(ctx, tape)[:2] == (0, 0) and mt_tell(ctx, tape) == 0
    mt(ctx, tape, "fsf", "1")
    assert mt_pos(ctx, tape)[:2] == (1, 0) and mt_tell(ctx, tape) == 4
    mt(ctx, tape, "fsr", "1")
    assert mt_pos(ctx, tape)[:2] == (1, 1) and mt_tell(ctx, tape) == 5
    assert read_blocks(tape, 1 * MIB, limit=1) == [blocks[4]]
    mt(ctx, tape, "bsr", "2")
    assert mt_tell(ctx, tape) == 4
    assert read_blocks(tape, 1 * MIB, limit=1) == [blocks[3]]
    mt(ctx, tape, "rewind")
    mt(ctx, tape, "fsf", "4")
    assert mt_pos(ctx, tape)[:2] == (4, 0) and mt_tell(ctx, tape) == 9
    mt(ctx, tape, "bsf", "1")  # to the BOT side of the filemark ending file 3
    assert mt_tell(ctx, tape) == 8
    assert mt_pos(ctx, tape)[0] == 3
    mt(ctx, tape, "fsf", "1")
    assert read_blocks(tape, 1 * MIB) == [blocks[5]]
    mt(ctx, tape, "eod")
    f, b, text = mt_pos(ctx, tape)
    # st spaces filemarks to end of data (fast_mteom off): file 5, block unknown.
    assert f == 5 and "EOD" in text and mt_tell(ctx, tape) == 11, text
    mt(ctx, tape, "seek", "1")
    assert mt_tell(ctx, tape) == 1
    assert read_blocks(tape, 1 * MIB) == blocks[1:3]
    # Reading past the last filemark hits end of data (BLANK CHECK): an error, not data.
    mt(ctx, tape, "seek", "10")
    res = run(["dd", f"if={tape}", "of=/dev/null", "bs=1M", "count=1"],
              timeout=ctx.remaining(60), check=False)
    assert "0+0 records in" in res.stderr, res.stderr
    mt(ctx, tape, "setblk", "512")
    assert "Tape block size 512 bytes" in mt_pos(ctx, tape)[2]
    mt(ctx, tape, "setblk", "0")
    assert "Tape block size 0 bytes" in mt_pos(ctx, tape)[2]
    mt(ctx, tape, "offline")
    text = mt(ctx, tape, "status", check=False)
    bits = text.split("General status bits on", 1)[-1]
    assert "ONLINE" not in bits and "Density code 0x0 " in text, text
    # Unloaded, the cartridge stays in the drive until the changer takes it.
    assert mtx_status(ctx, lab).drives[0] == ("ABC000L8", 1)
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload", "1", "0")
    assert mtx_status(ctx, lab).slots[1] == "ABC000L8"
    partitions_round_trip(ctx, lab, 1, "ABC000L8")


@scenario(timeout=900)
def tar_dd_capacity_worm(ctx: Context) -> None:
    """tar: two archives, the second extracted byte-identical after fsf 1; dd with variable
    and fixed blocks; a small cartridge ends in ENOSPC after early warning with everything
    before readable; a WORM cartridge refuses overwrite and takes appends; tar -M spans
    cartridges on filesystems smaller than one (`multivolume_on_small_filesystems`)."""
    lab = serve_library(ctx)
    tape = lab.tapes[0]
    load(ctx, lab, 1, 0)

    # ---- tar, two archives
    trees = [random_tree(ctx.workdir / f"tree{t}", 12, t) for t in range(2)]
    for src in trees:
        sh(ctx, "tar", "-c", "-b", "128", "-f", str(tape), "-C", str(src), ".")
    assert mt_pos(ctx, tape)[:2] == (2, 0)
    mt(ctx, tape, "rewind")
    mt(ctx, tape, "fsf", "1")
    out = ctx.workdir / "out1"
    out.mkdir()
    sh(ctx, "tar", "-x", "-b", "128", "-f", str(tape), "-C", str(out))
    assert tree_digest(out) == tree_digest(trees[1]), "second archive differs"
    mt(ctx, tape, "rewind")
    out0 = ctx.workdir / "out0"
    out0.mkdir()
    sh(ctx, "tar", "-x", "-b", "128", "-f", str(tape), "-C", str(out0))
    assert tree_digest(out0) == tree_digest(trees[0]), "first archive differs"

    # ---- dd, variable blocks: a larger buffer returns the short block, a smaller one fails
    mt(ctx, tape, "rewind")
    sizes = [1000, 65536, 3000, 262144, 17]
    blocks = [os.urandom(n) for n in sizes]
    write_block(tape, *blocks)
    mt(ctx, tape, "rewind")
    assert read_blocks(tape, 1 * MIB) == blocks
    mt(ctx, tape, "rewind")
    res = run(["dd", f"if={tape}", f"of={ctx.workdir / 'first'}", "bs=1M", "count=1"],
              timeout=ctx.remaining(60))
    assert "0+1 records in" in res.stderr, res.stderr
    assert (ctx.workdir / "first").read_bytes() == blocks[0]
    mt(ctx, tape, "rewind")
    fd = os.open(tape, os.O_RDONLY)
    try:
        os.read(fd, 100)
        raise AssertionError("a 100-byte read of a 1000-byte block succeeded")
    except OSError as exc:
        assert exc.errno == 12, exc  # st: ENOMEM, the block is larger than the buffer
    finally:
        os.close(fd)

    # ---- fixed-block mode
    mt(ctx, tape, "rewind")
    mt(ctx, tape, "setblk", "512")
    data = os.urandom(64 * 512)
    src = ctx.workdir / "fixed.bin"
    src.write_bytes(data)
    sh(ctx, "dd", f"if={src}", f"of={tape}", "bs=4096")
    assert mt_tell(ctx, tape) == 65  # 64 blocks of 512 and the filemark
    mt(ctx, tape, "rewind")
    back = ctx.workdir / "fixed.back"
    res = run(["dd", f"if={tape}", f"of={back}", "bs=512"], timeout=ctx.remaining(60))
    assert "64+0 records in" in res.stderr, res.stderr
    assert back.read_bytes() == data
    mt(ctx, tape, "setblk", "0")

    # ---- a small cartridge: ENOSPC after early warning, what was written reads back
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload", "1", "0")
    sh(ctx, *tcmu_py("vtl", "create-cartridges", str(lab.library), "SML000L8",
                     "--capacity", "16M"))
    st = wait_for(lambda: mtx_status_with(ctx, lab, "SML000L8"), ctx.remaining(60),
                  "the changer to report the new cartridge")
    sml_slot = slot_of(st, "SML000L8")
    load(ctx, lab, sml_slot, 0)
    big = ctx.workdir / "big.bin"
    big.write_bytes(os.urandom(24 * MIB))
    res = run(["dd", f"if={big}", f"of={tape}", "bs=256k"], timeout=ctx.remaining(300),
              check=False)
    assert res.returncode != 0 and "No space left on device" in res.stderr, res.stderr
    m = re.search(r"(\d+) bytes .* copied", res.stderr)
    assert m, res.stderr
    written = int(m.group(1))
    ctx.details["small_cartridge_bytes_written"] = written
    # 16 MiB, early warning 4 MiB before the end: st reports ENOSPC once it is reached.
    assert 12 * MIB - 256 * KIB <= written <= 16 * MIB, written
    mt(ctx, tape, "rewind")
    back_blocks = read_blocks(tape, 256 * KIB)
    readback = b"".join(back_blocks)
    log(f"small cartridge: dd wrote {written}, read back {len(readback)} in "
        f"{len(back_blocks)} blocks")
    # st: the write that meets early warning completes (EOM, NO SENSE, nothing undone); the
    # next write returns ENOSPC. So exactly what dd counted is on the tape.
    assert len(readback) == written and readback == big.read_bytes()[:written]
    ctx.details["small_cartridge_bytes_read"] = len(readback)

    # ---- WORM: drive 1
    worm_tape = lab.tapes[1]
    worm_slot = slot_of(mtx_status(ctx, lab), "WRM000LY")
    load(ctx, lab, worm_slot, 1)
    first, second = os.urandom(40 * KIB), os.urandom(50 * KIB)
    write_block(worm_tape, first)
    mt(ctx, worm_tape, "rewind")
    res = run(["dd", f"if={big}", f"of={worm_tape}", "bs=64k", "count=1"],
              timeout=ctx.remaining(60), check=False)
    assert res.returncode != 0, f"WORM overwrite at BOT was accepted: {res.stderr}"
    # The same through sg: WRITE(6) of one 512-byte variable block at BOT, and its sense.
    one = ctx.workdir / "one.bin"
    one.write_bytes(os.urandom(512))
    mt(ctx, worm_tape, "rewind")
    res = run(["sg_raw", "-s", "512", "-i", str(one), str(lab.tape_sgs[1]),
               "0a", "00", "00", "02", "00", "00"], timeout=ctx.remaining(60), check=False)
    text = (res.stdout + res.stderr).lower()
    assert res.returncode != 0 and "data protect" in text, text
    assert "overwrite attempted" in text, text  # SSC-5: ASC 30h ASCQ 0Ch
    mt(ctx, worm_tape, "rewind")
    assert read_blocks(worm_tape, 1 * MIB) == [first], "WORM data changed"
    mt(ctx, worm_tape, "eod")
    write_block(worm_tape, second)
    mt(ctx, worm_tape, "rewind")
    assert read_blocks(worm_tape, 1 * MIB) == [first]
    assert read_blocks(worm_tape, 1 * MIB) == [second]

    # ---- tar -M over cartridges on filesystems smaller than a cartridge
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload", str(worm_slot), "1")
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload", str(sml_slot), "0")
    multivolume_on_small_filesystems(ctx, lab, ["ABC001L8", "ABC002L8", "ABC003L8"])


#: Size of the filesystem each cartridge of `multivolume_on_small_filesystems` lives on (an
#: LTO-8 cartridge holds 12 TB): room for 7 MiB of records, early warning 2 MiB before that.
SMALL_FS = 8 * MIB

NEXT_VOLUME = """\
#!/bin/sh
# GNU tar's new-volume script: the next cartridge into drive 0 (slot order), then wait for it.
echo "volume $TAR_VOLUME $TAR_SUBCOMMAND" >> {log}
mtx -f {changer} next 0 || exit 1
# st learns about the new medium from the UNIT ATTENTION; its open waits for the drive.
mt -f {tape} rewind || exit 1
"""


def multivolume_on_small_filesystems(ctx: Context, lab: Lab, barcodes: list[str]) -> None:
    """`barcodes` (consecutive slots, none loaded) each moved onto a tmpfs of `SMALL_FS`: a
    drive writing there gives early warning and then end of medium when the filesystem's room
    runs out, not MEDIUM ERROR (EIO) mid-archive. GNU tar -M with a new-volume script running
    `mtx next` spans ~11 MB over the three cartridges (st returns ENOSPC after the early
    warning, tar asks for the next volume) and extracts byte-identical through the same
    script; the daemon never met ENOSPC (it stopped at the room it computed) and `tcmu-py
    status` reports the filesystems written LOW."""
    t0 = time.monotonic()
    media = lab.library / "media"
    for barcode in barcodes:
        d = media / barcode
        keep = ctx.workdir / f"keep-{barcode}"
        shutil.copytree(d, keep)
        run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS},mode=0700", "tmpfs", str(d)],
            timeout=ctx.remaining(30))
        ctx.cleanup.callback(run, ["umount", "-l", str(d)], check=False, timeout=30)
        for f in keep.iterdir():
            shutil.copy2(f, d / f.name)
    src = random_tree(ctx.workdir / "multi", 25, 3)
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    tape = lab.tapes[0]
    volumes = ctx.workdir / "volumes.log"
    script = ctx.workdir / "next-volume.sh"
    script.write_text(NEXT_VOLUME.format(log=volumes, changer=lab.changer_sg, tape=tape))
    script.chmod(0o755)
    first = slot_of(mtx_status(ctx, lab), barcodes[0])
    load(ctx, lab, first, 0)
    t1 = time.monotonic()
    sh(ctx, "tar", "-c", "-M", "-F", str(script), "-b", "128", "-f", str(tape), "-C", str(src),
       ".", cap=300)
    t_write = time.monotonic() - t1
    switches = volumes.read_text().splitlines()
    sizes = [(media / b / "data").stat().st_size for b in barcodes]
    log(f"tar -M wrote {total} bytes; volume switches {switches}; cartridge data sizes {sizes}")
    assert len(switches) == 2 and all(s > 64 for s in sizes), (switches, sizes)
    assert all(s <= SMALL_FS - 1 * MIB for s in sizes[:2]), sizes
    status = sh(ctx, *tcmu_py("status", "-i", "0", "--run-dir", str(lab.run_dir)))
    (ctx.artifacts / "status.txt").write_text(status)
    assert "WARNING" in status, status
    low = [line.split()[1] for line in status.splitlines() if line.split()[-1:] == ["LOW"]]
    assert low == [str(media / b) for b in barcodes[:2]], status

    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload")
    load(ctx, lab, first, 0)
    volumes.write_text("")
    out = ctx.workdir / "multi.out"
    out.mkdir()
    t1 = time.monotonic()
    sh(ctx, "tar", "-x", "-M", "-F", str(script), "-b", "128", "-f", str(tape), "-C", str(out),
       cap=300)
    t_read = time.monotonic() - t1
    assert tree_digest(out) == tree_digest(src), "the multi-volume archive extracted differently"
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload")
    daemon_log = (ctx.artifacts / "daemon.log").read_text(errors="replace")
    assert "backing filesystem full" not in daemon_log, "the drive wrote into ENOSPC"
    assert "writing cartridge" not in daemon_log, "a write failed (MEDIUM ERROR)"
    ctx.details.update(
        small_fs=SMALL_FS, multivolume_bytes=total, multivolume_cartridge_bytes=sizes,
        multivolume_tar_write_s=round(t_write, 1), multivolume_tar_extract_s=round(t_read, 1),
        multivolume_s=round(time.monotonic() - t0, 1),
    )


def check_tape(ctx: Context, tape: Path, files: list[list[bytes]]) -> None:
    """From BOT: each file's blocks, then end of data right after the last filemark."""
    mt(ctx, tape, "rewind")
    for blocks in files:
        assert read_blocks(tape, 1 * MIB) == blocks
    mt(ctx, tape, "eod")
    assert mt_tell(ctx, tape) == sum(len(b) + 1 for b in files)


def mtx_status_with(ctx: Context, lab: Lab, barcode: str) -> MtxStatus | None:
    # The changer answers the first command after an operator change with UNIT ATTENTION;
    # mtx then fails once.
    try:
        st = mtx_status(ctx, lab)
    except Exception as exc:  # noqa: BLE001 - retried by wait_for
        log(f"mtx status: {exc}")
        return None
    return st if barcode in st.slots.values() else None


_PARTITION = re.compile(r"partition=(\d+)")


def mt_partition(ctx: Context, tape: Path) -> int:
    """The partition `mt status` reports (st's idea of the active partition)."""
    out = mt(ctx, tape, "status")
    m = _PARTITION.search(out)
    assert m, out
    return int(m.group(1))


def partitions_round_trip(ctx: Context, lab: Lab, slot: int, barcode: str) -> None:
    """mt-st partitions on the LTO-8 cartridge `barcode` in `slot` (loaded into drive 0 and
    unloaded again): `mkpartition` (MODE SELECT page 11h, FORMAT MEDIUM), a tar archive into
    partition 1 and another into partition 0 (`setpartition`: LOCATE with CP), both extracted
    byte-identical after an mtx unload/load; `partseek` and `tell`; the cartridge directory
    records the two partitions (meta.json format 2, partition1/). Runs inside
    `changer_and_drive_commands` to share its daemon (a daemon start is most of a scenario's
    time on a loaded machine)."""
    started = time.monotonic()
    tape = lab.tapes[0]
    load(ctx, lab, slot, 0)
    # st only uses partitions when told the drive has them (an st option of this device).
    mt(ctx, tape, "stsetoptions", "can-partitions")
    ctx.cleanup.callback(lambda: run(["mt", "-f", str(tape), "stclearoptions",
                                      "can-partitions"], timeout=60, check=False))
    mt(ctx, tape, "mkpartition", "100")  # partition 1: 100 MB, partition 0: the rest
    assert mt_partition(ctx, tape) == 0
    trees = [random_tree(ctx.workdir / f"ptree{t}", 6, t) for t in range(2)]
    for partition in (1, 0):
        mt(ctx, tape, "setpartition", str(partition))
        sh(ctx, "tar", "-c", "-b", "128", "-f", str(tape), "-C", str(trees[partition]), ".")
        assert mt_partition(ctx, tape) == partition
    tell0 = mt_tell(ctx, tape)
    assert tell0 > 1, tell0  # the archive's blocks and its filemark, in partition 0

    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload", str(slot), "0")
    load(ctx, lab, slot, 0)
    assert mt_partition(ctx, tape) == 0  # a load starts in partition 0
    for partition in (1, 0):
        mt(ctx, tape, "setpartition", str(partition))
        out = ctx.workdir / f"pout{partition}"
        out.mkdir()
        sh(ctx, "tar", "-x", "-b", "128", "-f", str(tape), "-C", str(out))
        assert tree_digest(out) == tree_digest(trees[partition]), f"partition {partition}"
    mt(ctx, tape, "partseek", "1", "2")
    assert mt_partition(ctx, tape) == 1 and mt_tell(ctx, tape) == 2
    mt(ctx, tape, "partseek", "0", "0")
    mt(ctx, tape, "eod")
    assert mt_partition(ctx, tape) == 0 and mt_tell(ctx, tape) == tell0  # partition 0's EOD
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload", str(slot), "0")
    cart = lab.library / "media" / barcode
    meta = json.loads((cart / "meta.json").read_text())
    assert meta["format"] == 2 and meta["partitions"][1] == 100_000_000, meta
    assert (cart / "partition1" / "data").stat().st_size > 9 * 64 * KIB
    ctx.details["partitions_seconds"] = round(time.monotonic() - started, 1)


def random_tree(root: Path, files: int, seed: int) -> Path:
    """`files` files of random bytes (0.5 KiB to ~400 KiB, sizes varied by `seed`) in three
    directories under `root`, for tar."""
    for i in range(files):
        p = root / f"d{i % 3}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(500 + 37_000 * i + seed))
    return root


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@scenario(timeout=1500)
def kill9_keeps_data_and_inventory(ctx: Context) -> None:
    """Data written, filemarks and the library inventory survive kill -9 of the daemon, and
    what a reboot leaves (the library directory, no LIO objects): stop, `down`, `serve -c`."""
    lab = serve_library(ctx, "first")
    tape = lab.tapes[0]
    load(ctx, lab, 1, 0)
    files = [[os.urandom(100 * KIB + i) for i in range(n)] for n in (3, 1, 2)]
    for blocks in files:
        write_block(tape, *blocks)
    assert mt_tell(ctx, tape) == 3 + 1 + 1 + 1 + 2 + 1
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "transfer", "2", "6")
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "load", "3", "1")
    before = mtx_status(ctx, lab)
    inventory = sh(ctx, *tcmu_py("vtl", "list", str(lab.library)))
    assert lab.daemon.proc is not None
    os.killpg(lab.daemon.proc.pid, signal.SIGKILL)
    lab.daemon.proc.wait()
    log("daemon killed with -9; restarting")
    assert sh(ctx, *tcmu_py("vtl", "list", str(lab.library))) == inventory
    lab2 = serve_library(ctx, "second", first=False)
    assert (lab2.changer_sg, lab2.tapes) == (lab.changer_sg, lab.tapes)
    after = mtx_status(ctx, lab2)
    assert after == before, f"before:\n{before}\nafter:\n{after}"
    assert after.drives == {0: ("ABC000L8", 1), 1: ("ABC002L8", 3)}, after
    assert after.slots[2] is None and after.slots[6] == "ABC001L8", after
    check_tape(ctx, tape, files)

    # A reboot, as far as one VM boot can show it: LIO objects gone, the files kept.
    assert lab2.daemon.stop(timeout=60) == 0, "serve did not exit cleanly on SIGTERM"
    sh(ctx, *tcmu_py("down", "-c", str(lab.config)), cap=300)
    assert not list(CORE.glob("user_*/vtl-*")), "down left backstores"
    lab3 = serve_library(ctx, "third", first=False)
    assert mtx_status(ctx, lab3) == before
    check_tape(ctx, lab3.tapes[0], files)
    dump = sh(ctx, *tcmu_py("vtl", "dump", str(lab.library), "ABC000L8"))
    total = sum(len(b) for blocks in files for b in blocks)
    assert f"end of data ({total} data bytes)" in dump, dump
    assert dump.count("filemark") == 3, dump
    ctx.details["dump_tail"] = textwrap.shorten(dump[-400:], 400)


# --------------------------------------------------------------------------------------------
# A real backup application's own qualification of a drive and a changer

BACULA_SD = """\
Storage {{
  Name = lab-sd
  WorkingDirectory = "{work}"
  Pid Directory = "{work}"
}}
Director {{
  Name = lab-dir
  Password = "lab"
}}
Autochanger {{
  Name = lab-changer
  Changer Device = {changer}
  Changer Command = "/etc/bacula/scripts/mtx-changer %c %o %S %a %d"
  Device = Drive-0
}}
Device {{
  Name = Drive-0
  Media Type = LTO-8
  Archive Device = {tape}
  AutomaticMount = yes
  AlwaysOpen = yes
  RemovableMedia = yes
  RandomAccess = no
  Autochanger = yes
  Drive Index = 0
  # btape's test writes 2 x 10,000 blocks: at the default 64 KiB that is 1.3 GB, more than the
  # lab's tmpfs holds; 4 KiB blocks keep it at ~80 MB (the test is the same).
  Maximum Block Size = 4096
}}
Messages {{
  Name = Standard
  director = lab-dir = all, !terminate
}}
"""

#: What `btape test` prints when each part passes on a drive that needs no workaround.
BTAPE_PASSES = (
    "=== Test Succeeded. End Write, rewind, and re-read test ===",
    "Block re-read correct. Test succeeded!",
    "=== End Write, backup, and re-read test ===",
    "=== Append files test ===",
    "We should be in file 3. I am at file 3. This is correct!",  # EOM after 3 files
    "We should be in file 4. I am at file 4. This is correct!",  # appended a 4th
    "Total files=4, blocks=7, bytes = 28,224",  # its scan: 1 + 2 + 3 + 1 blocks of 4032
    "=== End Forward space files test ===",
    "=== Autochanger test ===",
    "The test autochanger worked!!",
)
#: What it prints when a part fails, or passes only after switching a workaround on (it then
#: asks the administrator to add a directive such as "Fast Forward Space File = no").
BTAPE_FAILURES = ("Please add", "FAILED", "Test failed", "test failed", "NOT correct", "ERR=")


@scenario(timeout=1800)
def bacula_btape_test_and_autochanger(ctx: Context) -> None:
    """Bacula's own tape qualification, as an administrator runs it before trusting a drive:
    `btape test` (write and re-read, backspace and re-read, append files, end of medium,
    forward space files) and its autochanger test, which loads and unloads through Bacula's
    mtx-changer script. Every part must pass without btape asking for a workaround."""
    assert shutil.which("btape"), "btape missing (bacula-sd; scripts/bootstrap.sh installs it)"
    lab = serve_library(ctx)
    load(ctx, lab, 1, 0)
    work = ctx.workdir / "bacula"
    work.mkdir()
    conf = ctx.workdir / "bacula-sd.conf"
    conf.write_text(BACULA_SD.format(work=work, changer=lab.changer_sg, tape=lab.tapes[0]))
    res = run(["btape", "-c", str(conf), "Drive-0"], input=b"test\nyes\nquit\n",
              timeout=ctx.remaining(1500), check=False)
    out = res.stdout + res.stderr
    (ctx.artifacts / "btape.log").write_text(out)
    missing = [p for p in BTAPE_PASSES if p not in out]
    failures = [line for line in out.splitlines() if any(f in line for f in BTAPE_FAILURES)]
    assert not missing and not failures and res.returncode == 0, (
        f"btape exit {res.returncode}; missing {missing}; failure lines {failures[:10]}; "
        f"see btape.log\n{out[-3000:]}"
    )
    ctx.details["btape_parts"] = len(BTAPE_PASSES)
