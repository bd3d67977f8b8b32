"""Amanda's own checks of a drive and of a changer, run as Amanda's user `backup` (group tape),
as an administrator would.

- `amtapetype -p`: the device property discovery run before configuring a tape device. It
  writes a label and three files through Amanda's tape device layer, then reads the label and
  seeks to each file in turn, first without and then (if that failed) with an extra forward
  space after each filemark, and prints the FSF_AFTER_FILEMARK setting the drive needs. A drive
  that stops after a filemark as SSC says needs none: "false", with no error. (amtapetype's
  other parts, capacity and compression, write for a minute before the end of the medium may
  come: gigabytes, more than the lab's memory-backed scratch space holds.)
- `chg-robot`, Amanda's changer for mtx-driven libraries, with `amtape` and `amlabel`: inventory
  by barcode, labelling cartridges in slots, `show` (loads every slot into a drive and reads its
  label), loading a cartridge by label, reset. A blank cartridge reads as st reports blank tape
  on any drive (EIO from the BLANK CHECK at BOT); Amanda lists it as blank.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from guestlib import Context, run, scenario, wait_for

from scenarios.vtl import (
    load,
    mtx_status,
    mtx_status_with,
    serve_library,
    sh,
    slot_of,
    tcmu_py,
)

CAPACITY_MIB = 64
AMANDA_LOGS = "/var/log/amanda"


def amanda_log_dirs(ctx: Context) -> None:
    """Amanda writes debug logs under /var/log/amanda as its user; the guest's /var is a
    throw-away layer without the package's directories."""
    sh(ctx, "install", "-d", "-o", "backup", "-g", "backup", "-m", "0750",
       AMANDA_LOGS, AMANDA_LOGS + "/server")


def amanda(ctx: Context, *argv: str) -> str:
    """An Amanda command as its user `backup`; its output (fails the scenario on exit != 0)."""
    res = run(["runuser", "-u", "backup", "--", *argv], timeout=ctx.remaining(600), check=False)
    out = res.stdout + res.stderr
    with open(ctx.artifacts / "amanda.log", "a") as f:
        f.write(f"$ {' '.join(argv)}\n{out}\n")
    assert res.returncode == 0, f"{' '.join(argv)}: exit {res.returncode}\n{out[-3000:]}"
    return out


@scenario(timeout=900)
def amanda_amtapetype_properties(ctx: Context) -> None:
    """`amtapetype -p -f` finds that the drive needs no FSF_AFTER_FILEMARK, without error."""
    assert shutil.which("amtapetype"), "amtapetype missing (amanda-server; bootstrap installs it)"
    amanda_log_dirs(ctx)
    lab = serve_library(ctx)
    sh(ctx, *tcmu_py("vtl", "create-cartridges", str(lab.library), "AMD000L8",
                     "--capacity", f"{CAPACITY_MIB}M"))
    st = wait_for(lambda: mtx_status_with(ctx, lab, "AMD000L8"), ctx.remaining(60),
                  "the changer to report the new cartridge")
    load(ctx, lab, slot_of(st, "AMD000L8"), 0)
    out = amanda(ctx, "amtapetype", "-p", "-f", "-b", "256k", str(lab.tapes[0]))
    assert "Checking for FSF_AFTER_FILEMARK requirement" in out, out
    assert 'device-property "FSF_AFTER_FILEMARK" "false"' in out, out
    errors = [line for line in out.splitlines() if re.search(r"\berror\b", line, re.I)]
    assert not errors, errors
    ctx.details["amtapetype_tail"] = out[-800:]


AMANDA_CONF = """\
org "lab"
mailto ""
dumpuser "backup"
infofile "{state}/curinfo"
logdir "{state}"
indexdir "{state}/index"
tapelist "{state}/tapelist"
labelstr "^LAB-[0-9][0-9][0-9]$"
tapetype "lab-lto8"
define tapetype lab-lto8 {{
    length 12000 gbytes
}}
define changer lab-robot {{
    tpchanger "chg-robot:{changer}"
    property "tape-device" "0={tape0}" "1={tape1}"
    property "use-slots" "1-5"
    changerfile "{state}/changer-state"
}}
tpchanger "lab-robot"
"""


@scenario(timeout=1200)
def amanda_changer_amtape(ctx: Context) -> None:
    """Amanda's robot changer (chg-robot, driving mtx) on the library: inventory by barcode,
    labelling cartridges in slots, `show` loading every slot and reading its label, and
    loading a cartridge by its Amanda label."""
    amanda_log_dirs(ctx)
    lab = serve_library(ctx)
    state = ctx.workdir / "amanda"
    conf_dir = Path("/etc/amanda/lab")
    sh(ctx, "install", "-d", "-o", "backup", "-g", "backup", str(state), str(conf_dir))
    (conf_dir / "amanda.conf").write_text(AMANDA_CONF.format(
        state=state, changer=lab.changer_sg, tape0=f"tape:{lab.tapes[0]}",
        tape1=f"tape:{lab.tapes[1]}"))
    (state / "tapelist").write_text("")
    sh(ctx, "chown", "-R", "backup:backup", str(state), str(conf_dir))

    out = amanda(ctx, "amtape", "lab", "inventory")
    for slot, barcode in enumerate(["ABC000L8", "ABC001L8", "ABC002L8", "ABC003L8"], 1):
        assert re.search(rf"slot\s+{slot}:.*barcode {barcode}", out), out
    amanda(ctx, "amlabel", "lab", "LAB-001", "slot", "1")
    amanda(ctx, "amlabel", "lab", "LAB-002", "slot", "3")
    out = amanda(ctx, "amtape", "lab", "show")
    assert re.search(r"slot\s+1:.*label LAB-001", out), out
    assert re.search(r"slot\s+3:.*label LAB-002", out), out
    out = amanda(ctx, "amtape", "lab", "label", "LAB-002")
    assert "LAB-002" in out and "slot 3" in out, out
    st = mtx_status(ctx, lab)
    assert "ABC002L8" in [b for b, _src in st.drives.values()], st
    out = amanda(ctx, "amtape", "lab", "inventory")
    assert re.search(r"slot\s+1:.*LAB-001", out) and re.search(r"slot\s+3:.*LAB-002", out), out
    amanda(ctx, "amtape", "lab", "reset")
    ctx.details["inventory"] = out[-1500:]
