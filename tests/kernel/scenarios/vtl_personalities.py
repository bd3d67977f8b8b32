"""Library personalities through the real kernel: for each non-default personality a library is
declared in YAML with ``personality:`` (drives without a model: the personality's usual drive),
served by `tcmu-py serve -c` over tcm_loop, and checked the way an administrator meets it:

* `mtx inquiry` shows the product's vendor and product; `lsscsi` the drives' identity;
* `mtx status` shows the element layout (2 drives, 8 + 2 slots, the import/export ones last);
* READ ELEMENT STATUS and MODE SENSE page 1Dh sent with sg_raw carry the product's
  element addresses (`mtx` numbers elements 1..N whatever their addresses: what it implies is
  only the order, checked by a load whose report names the slot's real address as source);
* Bacula's own autochanger test (`btape` ``auto``, through Bacula's mtx-changer script as the
  bacula scenario configures it) passes.

The personalities are served one after the other (one daemon each, stopped and taken down
before the next), each on its own state and library directory.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from guestlib import Context, log, run, scenario, tcmu_py

from scenarios.vtl import BACULA_SD, BTAPE_FAILURES, load, mtx_status, serve_library, sh

YAML = """\
state_dir: {{state}}
libraries:
  - name: lab
    personality: {personality}
    changer: vtl-ch
    drives:
      - {{{{name: vtl-d0}}}}
      - {{{{name: vtl-d1}}}}
    slots: 8
    import_export: 2
    cartridges: ["ABC000L8..ABC003L8"]
    media_dir: {{library}}
exports:
  loopback:
    - {{{{device: vtl-ch, lun: 0}}}}
    - {{{{device: vtl-d0, lun: 1}}}}
    - {{{{device: vtl-d1, lun: 2}}}}
"""

#: personality -> (changer vendor, product, drive vendor, drive product,
#:                 first address of transport, storage, import/export, data transfer)
EXPECTED = {
    "stk-sl150": ("STK", "SL150", "HPE", "Ultrium 8-SCSI", 0, 1000, 10, 500),
    "quantum-scalar-i500": ("QUANTUM", "Scalar i500", "IBM", "ULT3580-TD8",
                            0x0001, 0x1000, 0x0010, 0x0100),
}


Element = tuple[int, int, bool, int | None, bytes]  # type, address, full, source, vendor bytes


def read_element_status(ctx: Context, sg: Path, out: Path) -> list[Element]:
    """[(element type, address, full, source, vendor specific bytes)] of every element: READ
    ELEMENT STATUS (B8h) with VOLTAG, element type 0 (all), from address 0, sent raw with sg_raw
    and parsed with our SMC parser."""
    from tcmu_py.scsi.smc import ElementStatus

    cdb = bytes([0xB8, 0x10, 0, 0, 0xFF, 0xFF, 0, 0, 0xFF, 0xFF, 0, 0])
    sh(ctx, "sg_raw", "-r", "65535", "-o", str(out), str(sg), *(f"{b:02x}" for b in cdb))
    es = ElementStatus.parse(out.read_bytes())
    return [(int(p.element_type), d.address, d.full, d.source, d.vendor_specific)
            for p in es.pages for d in p.descriptors]


def page_1d(ctx: Context, sg: Path, out: Path) -> tuple[int, ...]:
    """The eight fields of the element address assignment page: MODE SENSE(6) DBD=1 page 1Dh,
    allocation 255, sent raw with sg_raw (as mtx and ch ask for it)."""
    cdb = bytes([0x1A, 0x08, 0x1D, 0, 0xFF, 0])
    sh(ctx, "sg_raw", "-r", "255", "-o", str(out), str(sg), *(f"{b:02x}" for b in cdb))
    raw = out.read_bytes()
    page = raw[4 + raw[3]:]  # mode parameter header (6), block descriptors (none with DBD)
    assert page[0] & 0x3F == 0x1D and page[1] == 0x12, raw.hex()
    return tuple(int.from_bytes(page[i:i + 2], "big") for i in range(2, 18, 2))


def check_personality(ctx: Context, key: str) -> dict[str, object]:
    ch_vendor, ch_product, d_vendor, d_product, mt, st, ie, dt = EXPECTED[key]
    root = ctx.workdir / key
    root.mkdir()
    lab = serve_library(ctx, f"daemon-{key}", root=root, yaml=YAML.format(personality=key))
    sg = str(lab.changer_sg)
    inq = sh(ctx, "mtx", "-f", sg, "inquiry")
    (ctx.artifacts / f"{key}-mtx-inquiry.txt").write_text(inq)
    assert "Product Type: Medium Changer" in inq, inq
    assert re.search(rf"Vendor ID: '{ch_vendor}\s*'", inq), inq
    assert re.search(rf"Product ID: '{ch_product}\s*'", inq), inq
    lsscsi = sh(ctx, "lsscsi", "-g")
    for tape_sg in lab.tape_sgs:
        line = next((ln for ln in lsscsi.splitlines() if str(tape_sg) in ln.split()), "")
        assert re.search(rf"\btape\s+{d_vendor}\s+{re.escape(d_product)}\b", line), lsscsi

    status_text = sh(ctx, "mtx", "-f", sg, "status")
    (ctx.artifacts / f"{key}-mtx-status.txt").write_text(status_text)
    st_ = mtx_status(ctx, lab)
    assert st_.header == (2, 10, 2), status_text
    assert st_.ie_slots == {9, 10}, status_text
    assert [st_.slots[s] for s in range(1, 5)] == ["ABC000L8", "ABC001L8", "ABC002L8",
                                                  "ABC003L8"], status_text

    assert page_1d(ctx, lab.changer_sg, root / "page1d.bin") == (mt, 1, st, 8, ie, 2, dt, 2)
    elements = read_element_status(ctx, lab.changer_sg, ctx.workdir / f"{key}-res.bin")
    by_type: dict[int, list[int]] = {}
    for etype, addr, *_ in elements:
        by_type.setdefault(etype, []).append(addr)
    assert by_type == {1: [mt], 2: list(range(st, st + 8)), 3: [ie, ie + 1],
                       4: [dt, dt + 1]}, by_type
    # StorageTek's MEDIA DOMAIN / MEDIA TYPE after each descriptor ('L', '8' for ABC000L8),
    # which mtx stepped over by the page's descriptor length above.
    first_slot = next(e for e in elements if e[:2] == (2, st))
    assert first_slot[4] == (b"L8\x00\x00" if key == "stk-sl150" else b""), first_slot

    # mtx's slot 2 is the second storage element: a load reports that address as the source.
    load(ctx, lab, 2, 1)
    elements = read_element_status(ctx, lab.changer_sg, ctx.workdir / f"{key}-res2.bin")
    drive1 = next(e for e in elements if e[:2] == (4, dt + 1))
    assert drive1[2] and drive1[3] == st + 1, elements
    sh(ctx, "mtx", "-f", sg, "unload", "2", "1")

    # Bacula's autochanger test, drive 0 loaded from slot 1 as in the bacula scenario.
    load(ctx, lab, 1, 0)
    work = root / "bacula"
    work.mkdir()
    conf = root / "bacula-sd.conf"
    conf.write_text(BACULA_SD.format(work=work, changer=lab.changer_sg, tape=lab.tapes[0]))
    res = run(["btape", "-c", str(conf), "Drive-0"], input=b"auto\nyes\nquit\n",
              timeout=ctx.remaining(300), check=False)
    out = res.stdout + res.stderr
    (ctx.artifacts / f"{key}-btape-auto.log").write_text(out)
    failures = [ln for ln in out.splitlines() if any(f in ln for f in BTAPE_FAILURES)]
    assert "=== Autochanger test ===" in out and "The test autochanger worked!!" in out \
        and not failures and res.returncode == 0, (
            f"{key}: btape exit {res.returncode}; failure lines {failures[:10]}\n{out[-3000:]}")

    # Stop this library's daemon and take its LIO objects down before the next one.
    lab.daemon.stop()
    run(tcmu_py("down", "-c", str(lab.config)), timeout=ctx.remaining(120))
    log(f"{key}: mtx inquiry {ch_vendor}/{ch_product}, status {st_.header}, "
        f"addresses MT {mt} ST {st} IE {ie} DT {dt}, btape auto passed")
    return {"vendor": ch_vendor, "product": ch_product, "mtx_header": list(st_.header),
            "first_addresses": [mt, st, ie, dt], "drive": f"{d_vendor} {d_product}"}


@scenario(timeout=900)
def personalities_mtx_and_bacula_autochanger(ctx: Context) -> None:
    """For stk-sl150 and quantum-scalar-i500: mtx inquiry shows the product, mtx status the
    layout, READ ELEMENT STATUS / page 1Dh the product's element addresses, a load reports the
    real source address, and Bacula's `btape` autochanger test (``auto``) passes."""
    assert shutil.which("btape"), "btape missing (bacula-sd; scripts/bootstrap.sh installs it)"
    assert shutil.which("sg_raw"), "sg_raw missing (sg3-utils)"
    for key in EXPECTED:
        ctx.details[key] = check_personality(ctx, key)
