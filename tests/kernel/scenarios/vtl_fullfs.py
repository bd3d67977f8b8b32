"""Cartridges whose backing filesystem is smaller than one cartridge, through the real kernel.

The lab library (scenarios/vtl.py) with each of ABC000L8..ABC003L8 moved onto a tmpfs of its
own of `FS_SIZE` (an LTO-8 cartridge is 12 TB): a drive writing there must give early warning
and then end of medium when the filesystem's room runs out, so that an application asks for the
next tape, instead of MEDIUM ERROR (03/0C/00, EIO) in the middle of the archive. GNU tar's
multi-volume mode with a new-volume script that runs `mtx next` is that application.
"""

from __future__ import annotations

import shutil
import time

from guestlib import Context, log, run, scenario, tcmu_py

from scenarios.vtl import MIB, load, random_tree, serve_library, sh, tree_digest

#: Size of each cartridge's filesystem: room for ~8 MiB of records before early warning.
FS_SIZE = 12 * MIB
CARTRIDGES = [f"ABC{i:03d}L8" for i in range(4)]

SCRIPT = """\
#!/bin/sh
# GNU tar's new-volume script: the next cartridge into drive 0 (slot order), then wait for it.
echo "volume $TAR_VOLUME $TAR_SUBCOMMAND" >> {log}
mtx -f {changer} next 0 || exit 1
# st learns about the new medium from the UNIT ATTENTION; its open waits for the drive.
mt -f {tape} rewind || exit 1
"""


@scenario(timeout=600)
def tar_multivolume_small_filesystems(ctx: Context) -> None:
    """tar -M over cartridges on 12 MiB filesystems: ~17.5 MiB of files span three or more
    cartridges, each ending in early warning (st: ENOSPC, tar asks for the next volume), none in
    EIO; the archive extracts byte-identical through the same script; the daemon never met
    ENOSPC from the filesystem (it stopped at the room it computed) and `tcmu-py status` warns
    that the filesystems written are LOW."""
    t0 = time.monotonic()
    lab = serve_library(ctx)
    media = lab.library / "media"
    for barcode in CARTRIDGES:  # none is loaded: nothing holds their files open
        d = media / barcode
        keep = ctx.workdir / f"keep-{barcode}"
        shutil.copytree(d, keep)
        run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", str(d)],
            timeout=ctx.remaining(30))
        ctx.cleanup.callback(run, ["umount", "-l", str(d)], check=False, timeout=30)
        for f in keep.iterdir():
            shutil.copy2(f, d / f.name)
    src = random_tree(ctx.workdir / "src", 32, 7)
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    tape = lab.tapes[0]
    volumes = ctx.workdir / "volumes.log"
    script = ctx.workdir / "next-volume.sh"
    script.write_text(SCRIPT.format(log=volumes, changer=lab.changer_sg, tape=tape))
    script.chmod(0o755)
    load(ctx, lab, 1, 0)
    t1 = time.monotonic()
    sh(ctx, "tar", "-c", "-M", "-F", str(script), "-b", "128", "-f", str(tape), "-C", str(src),
       ".", cap=300)
    t_write = time.monotonic() - t1
    switches = volumes.read_text().splitlines()
    sizes = [(media / b / "data").stat().st_size for b in CARTRIDGES]
    log(f"tar -M wrote {total} bytes; volume switches {switches}; cartridge data sizes {sizes}")
    used = [s for s in sizes if s > 64]
    assert len(used) >= 3 and len(switches) == len(used) - 1, (switches, sizes)
    assert all(s <= FS_SIZE for s in sizes), sizes
    status = sh(ctx, *tcmu_py("status", "--run-dir", str(lab.run_dir)),
                check=False)
    (ctx.artifacts / "status.txt").write_text(status)

    sh(ctx, "mtx", "-f", str(lab.changer_sg), "unload")
    load(ctx, lab, 1, 0)
    volumes.write_text("")
    out = ctx.workdir / "out"
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
        fs_size=FS_SIZE, archive_bytes=total, cartridge_data_bytes=sizes,
        volume_switches=len(switches), tar_write_s=round(t_write, 1),
        tar_extract_s=round(t_read, 1), scenario_s=round(time.monotonic() - t0, 1),
        status_warns="WARNING" in status,
    )
    assert "WARNING" in status and "LOW" in status, status
