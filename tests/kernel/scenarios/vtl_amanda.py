"""Amanda's own check of a drive: `amtapetype -p`, the device property discovery an administrator
runs before configuring a tape device in Amanda.

It writes a label and three files through Amanda's tape device layer, then reads the label and
seeks to each file in turn, first without and then (if that failed) with an extra forward space
after each filemark, and prints the FSF_AFTER_FILEMARK setting the drive needs. A drive that
stops after a filemark as SSC says needs none: "false", with no error. (amtapetype's other
parts, capacity and compression, write for a minute before the end of the medium may come:
gigabytes, more than the lab's memory-backed scratch space holds.) Run as Amanda's user
`backup` (group tape), as an administrator would.
"""

from __future__ import annotations

import re
import shutil

from guestlib import Context, run, scenario, wait_for

from scenarios.vtl import (
    load,
    mtx_status_with,
    serve_library,
    sh,
    slot_of,
    tcmu_py,
)

CAPACITY_MIB = 64
AMANDA_LOGS = "/var/log/amanda"


@scenario(timeout=900)
def amanda_amtapetype_properties(ctx: Context) -> None:
    """`amtapetype -p -f` finds that the drive needs no FSF_AFTER_FILEMARK, without error."""
    assert shutil.which("amtapetype"), "amtapetype missing (amanda-server; bootstrap installs it)"
    # Amanda writes debug logs under /var/log/amanda as its user; the guest's /var is a
    # throw-away layer without the package's directories.
    sh(ctx, "install", "-d", "-o", "backup", "-g", "backup", "-m", "0750",
       AMANDA_LOGS, AMANDA_LOGS + "/server")
    lab = serve_library(ctx)
    sh(ctx, *tcmu_py("vtl", "create-cartridges", str(lab.library), "AMD000L8",
                     "--capacity", f"{CAPACITY_MIB}M"))
    st = wait_for(lambda: mtx_status_with(ctx, lab, "AMD000L8"), ctx.remaining(60),
                  "the changer to report the new cartridge")
    load(ctx, lab, slot_of(st, "AMD000L8"), 0)
    res = run(["runuser", "-u", "backup", "--", "amtapetype", "-p", "-f", "-b", "256k",
               str(lab.tapes[0])], timeout=ctx.remaining(600), check=False)
    out = res.stdout + res.stderr
    (ctx.artifacts / "amtapetype.log").write_text(out)
    assert res.returncode == 0, f"amtapetype exit {res.returncode}\n{out[-3000:]}"
    assert "Checking for FSF_AFTER_FILEMARK requirement" in out, out
    assert 'device-property "FSF_AFTER_FILEMARK" "false"' in out, out
    errors = [line for line in out.splitlines() if re.search(r"\berror\b", line, re.I)]
    assert not errors, errors
    ctx.details["amtapetype_tail"] = out[-800:]
