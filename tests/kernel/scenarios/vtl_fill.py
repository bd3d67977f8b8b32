"""A full backing store is end of medium, as a backup application sees it: Bacula's `btape fill`
on a library whose filesystem is smaller than one cartridge.

The library (vtl.py's YAML: a changer, two IBM LTO-8 drives, ABC000L8..ABC003L8 in slots
1..4) lives on a loop-mounted ext4 of `MEDIA_FS` bytes; an LTO-8 cartridge holds 12 TB, so the
first cartridge's end of medium is the filesystem's end. `btape fill`'s multiple-tape test
('m') writes Bacula records to the cartridge in slot 1 until end of medium, asks the autochanger
(Bacula's mtx-changer script) for the cartridge in slot 2, writes 1000 more blocks there, then
re-reads through the autochanger: the first 10,000 records (32 KiB each) of tape 1 and its last
block, then the first and the last block of tape 2, each compared with what was written.

The cartridge in slot 2 sits on a filesystem of its own (a `SECOND_FS` tmpfs mounted on its
directory): the first tape leaves nothing free on the library's filesystem, so a second
cartridge sharing it has no room at all, whatever the drive does (the physical limit of a shared
store, see docs/configuration.md).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from guestlib import Context, log, run, scenario

from scenarios.vtl import (
    BACULA_SD,
    MIB,
    load,
    mt,
    mtx_status,
    serve_library,
    sh,
    slot_of,
    tcmu_py,
)

#: The library's filesystem (ext4 on a loop device): far smaller than one cartridge, but more
#: than btape's re-read needs: it reads the first 10,000 records (32 KiB each, 328 MB) of the
#: first tape and then repositions to its last block, so a first tape that ends sooner makes it
#: read on into the second tape and reposition there (run of 09:29 with 48 MiB: 1036 records
#: on tape 1, "Reposition error ... at End of Tape"). 400 MiB of ext4 (5% reserved for root,
#: which `backing_space` leaves alone) holds ~11,000 records before early warning.
MEDIA_FS = 400 * MIB
#: btape's re-read count (btape.c `quickie_cb`).
BTAPE_REREAD_RECORDS = 10_000
BTAPE_RECORD = 32 * 1024
#: The filesystem under the second cartridge: btape writes 1000 blocks (62 MiB at the 64,512-
#: byte blocks of `BACULA_FILL`) there before it stops, with early warning 4 MiB before its end.
SECOND_FS = 80 * MIB
BLOCK = 64512

#: vtl.py's storage daemon with Bacula's default block size (64,512 bytes: a quarter of the
#: commands 16 KiB blocks need, which counts under emulation) and a file mark every 32 MB
#: (Bacula's default is every GB), so the filled cartridge holds several files as a real
#: backup's would.
BACULA_FILL = BACULA_SD.replace(
    "  Maximum Block Size = 4096\n",
    f"  Maximum Block Size = {BLOCK}\n  Maximum File Size = 32MB\n",
)
assert BACULA_FILL != BACULA_SD

#: What `btape fill` prints, in order, when the multiple-tape test passes.
FILL_PASSES = (
    "Multiple tape test selected.",
    "Wrote Volume label for volume \"TestVolume1\".",
    "End of tape",  # the first cartridge's end of medium: the filesystem's
    "Wrote Volume label for volume \"TestVolume2\".",
    "Wrote 1000 blocks on second tape. Done.",
    "Done filling tapes at",
    "10000 records read now at",  # the re-read stayed on tape 1
    "The last block of the first tape matches.",
    "The first block on the second tape matches.",
    "The last block on the second tape matches. Test succeeded.",
)
#: Lines that mean a part failed, or that the drive answered an error instead of end of medium.
FILL_FAILURES = ("Error", "ERR=", "error", "FAILED", "Cannot", "not OK", "Not OK",
                 "Input/output", "differ")

_END_OF_TAPE = re.compile(r"End of tape (\d+):(\d+)\. Volume Bytes=([\d,]+)")


def ext4_library(ctx: Context, size: int) -> Path:
    """A loop-mounted ext4 of `size` bytes on the scenario's library directory (where
    `serve_library` puts the library); unmounted after the daemon stopped."""
    image = ctx.workdir / "media-fs.img"
    with open(image, "wb") as f:
        f.truncate(size)
    sh(ctx, "mkfs.ext4", "-q", "-F", "-b", "4096", str(image))
    mnt = ctx.workdir / "library"
    mnt.mkdir()
    run(["modprobe", "loop"], timeout=ctx.remaining(60), check=False)
    sh(ctx, "mount", "-t", "ext4", "-o", "loop", str(image), str(mnt))
    # Registered before serve_library's, so it runs after the daemon stopped (LIFO).
    ctx.cleanup.callback(run, ["umount", "-l", str(mnt)], check=False, timeout=60)
    return mnt


def own_tmpfs(ctx: Context, directory: Path, size: int) -> None:
    """Put the cartridge `directory` (not loaded) on a tmpfs of its own of `size` bytes."""
    keep = ctx.workdir / f"keep-{directory.name}"
    shutil.copytree(directory, keep)
    sh(ctx, "mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory))
    ctx.cleanup.callback(run, ["umount", "-l", str(directory)], check=False, timeout=30)
    for f in keep.iterdir():
        shutil.copy2(f, directory / f.name)


def filesystem_states(ctx: Context, run_dir: Path) -> tuple[str, dict[str, str]]:
    """`tcmu-py status`: its text and each library filesystem's state by path."""
    out = sh(ctx, *tcmu_py("status", "-i", "0", "--run-dir", str(run_dir)))
    states = {}
    for line in out.splitlines():
        cols = line.split()
        if cols and cols[-1] in ("ok", "LOW", "FULL") and len(cols) >= 6:
            states[cols[1]] = cols[-1]
    return out, states


@scenario(timeout=1500)
def bacula_fill_on_small_filesystem(ctx: Context) -> None:
    """`btape fill` (multiple tapes, autochanger) on a library whose ext4 is smaller than a
    cartridge: the first tape ends where the filesystem does (early warning, then end of
    medium: st's ENOSPC, never EIO), Bacula loads the second through mtx-changer, and the
    re-read of both passes; `tcmu-py status` reports the filesystem LOW or FULL; writing on
    past Bacula's end reports early warning and then VOLUME OVERFLOW, never MEDIUM ERROR."""
    assert shutil.which("btape"), "btape missing (bacula-sd; scripts/bootstrap.sh installs it)"
    t0 = time.monotonic()
    ext4_library(ctx, MEDIA_FS)
    lab = serve_library(ctx)
    media = lab.library / "media"
    st = mtx_status(ctx, lab)
    first, second = st.slots[1], st.slots[2]
    assert first and second, st
    own_tmpfs(ctx, media / second, SECOND_FS)
    out, states = filesystem_states(ctx, lab.run_dir)
    log(out)
    assert states.get(str(media)) == "ok", out
    load(ctx, lab, slot_of(st, first), 0)

    work = ctx.workdir / "bacula"
    work.mkdir()
    conf = ctx.workdir / "bacula-sd.conf"
    conf.write_text(BACULA_FILL.format(work=work, changer=lab.changer_sg, tape=lab.tapes[0]))
    t1 = time.monotonic()
    res = run(["btape", "-c", str(conf), "Drive-0"], input=b"fill\nm\nquit\n",
              timeout=ctx.remaining(1200), check=False)
    t_fill = time.monotonic() - t1
    text = res.stdout + res.stderr
    (ctx.artifacts / "btape-fill.log").write_text(text)
    missing = [p for p in FILL_PASSES if p not in text]
    failures = [ln for ln in text.splitlines() if any(f in ln for f in FILL_FAILURES)]
    assert not missing and not failures and res.returncode == 0, (
        f"btape exit {res.returncode}; missing {missing}; failure lines {failures[:10]}; "
        f"see btape-fill.log\n{text[-3000:]}"
    )
    positions = [p for p in FILL_PASSES if p in text]
    assert [text.index(p) for p in positions] == sorted(text.index(p) for p in positions), (
        "btape's messages out of order")
    eot = _END_OF_TAPE.search(text)
    assert eot, text[-3000:]
    tape1_bytes = int(eot.group(3).replace(",", ""))
    sizes = {b: (media / b / "data").stat().st_size for b in (first, second)}
    log(f"btape fill: end of tape 1 at {eot.group(1)}:{eot.group(2)}, {tape1_bytes} bytes; "
        f"cartridge data files {sizes}; {t_fill:.1f} s")
    # The end came from the filesystem: most of it was written, nothing past it.
    assert MEDIA_FS // 2 < tape1_bytes < MEDIA_FS, tape1_bytes
    assert tape1_bytes > BTAPE_REREAD_RECORDS * BTAPE_RECORD, "MEDIA_FS too small for btape"
    assert sizes[second] >= 1000 * BLOCK, sizes

    # The library's filesystem is now within early warning of its end: Bacula stopped at the
    # first ENOSPC, st's answer once early warning came, with the zone (4 MiB) still free.
    out, states = filesystem_states(ctx, lab.run_dir)
    (ctx.artifacts / "status-after-fill.txt").write_text(out)
    assert states.get(str(media)) == "LOW" and "WARNING" in out, out

    # Writing on past Bacula's end of tape 1 as a raw initiator: early warning (NO SENSE with
    # EOM) while the filesystem has room, then VOLUME OVERFLOW; never MEDIUM ERROR.
    tape, sg = lab.tapes[0], lab.tape_sgs[0]
    if mtx_status(ctx, lab).drives[0][0] is not None:  # btape leaves the second loaded
        sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload")
    load(ctx, lab, slot_of(mtx_status(ctx, lab), first), 0)
    mt(ctx, tape, "eod")
    block = ctx.workdir / "block.bin"
    block.write_bytes(b"\xa5" * (256 * 1024))
    senses = []
    for _ in range(64):  # the early-warning zone is 4 MiB: 16 blocks, with margin
        r = run(["sg_raw", "-s", str(256 * 1024), "-i", str(block), str(sg),
                 "0a", "00", "04", "00", "00", "00"], timeout=ctx.remaining(60), check=False)
        t = (r.stdout + r.stderr).lower()
        senses.append(t)
        if "volume overflow" in t:
            break
    (ctx.artifacts / "raw-writes.txt").write_text("\n----\n".join(senses))
    assert "volume overflow" in senses[-1], senses[-1]
    # Every write before it was written and answered early warning (NO SENSE, EOM, 00h/02h);
    # the run of 09:49 took 15 such 256 KiB writes (the 4 MiB zone Bacula left) then overflowed.
    warned = [s for s in senses[:-1]
              if "no sense" in s and "end-of-partition/medium detected" in s and "eom" in s]
    assert senses[:-1] and warned == senses[:-1], senses
    assert not any("medium error" in s for s in senses), senses
    out, states = filesystem_states(ctx, lab.run_dir)
    (ctx.artifacts / "status-after-overflow.txt").write_text(out)
    # FULL: no 256 KiB block fits past the reserves any more (status.FULL_BLOCK). The run of
    # 09:40 said LOW here with 1.2 MiB free, before status took the block into account.
    assert states.get(str(media)) == "FULL" and "WARNING" in out, out
    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload")

    daemon_log = (ctx.artifacts / "daemon.log").read_text(errors="replace")
    assert "writing cartridge" not in daemon_log, "a write failed (MEDIUM ERROR)"
    ctx.details.update(
        media_fs=MEDIA_FS, second_fs=SECOND_FS, tape1_volume_bytes=tape1_bytes,
        cartridge_data_bytes=sizes, raw_writes_to_overflow=len(senses),
        state_after_overflow=states.get(str(media)),
        btape_fill_s=round(t_fill, 1), scenario_s=round(time.monotonic() - t0, 1),
    )
