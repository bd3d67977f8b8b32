"""libiscsi's whole SCSI family against a tcmu-py `raw` disk and LIO's fileio, in one VM boot.

    .venv/bin/python benchmarks/libiscsi_vs_fileio.py [--suite-timeout 300] [--out DIR]

The issue 19 measurement (docs/conformance.md): ``iscsi-test-cu --test=SCSI.<suite>`` for every
suite ``iscsi-test-cu -l`` lists, each bounded, over LIO's iSCSI target on 127.0.0.1, first
against a 16 MiB tcmu-py raw disk (served by ``tcmu-py serve -c`` from YAML, as a new user
would), and a 16 MiB LIO fileio backstore on the guest's tmpfs, the two side by side (suite by
suite: both run one suite at once, each against its own target). ReceiveCopyResults runs
before ExtendedCopy on both (tcmu-py holds copy status per LUN: docs/conformance.md).

Output in DIR (default results/libiscsi/<UTC time>/): ``<target>.txt`` (the transcripts),
``<target>.json`` ({"Suite.Test": "pass" | "skip" | "fail"}), ``summary.md`` (counts, and every
test LIO fileio passes that tcmu-py does not). Not run by CI: the two runs take tens of minutes
under emulation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "kernel"))

TARGETS = {"pyraw": "iqn.2003-01.org.linux-iscsi.tcmu-py:conf-pyraw",
           "fileio": "iqn.2003-01.org.linux-iscsi.tcmu-py:conf-fileio"}
SIZE = 16 << 20  # as the CI conformance scenario
#: Suites LIO's core answers itself for every backstore (kernel-abi.md): not the device's.
KERNEL_SUITES = ("PersistentReserveIn", "PersistentReserveOut", "PersistentReserveInReadKeys",
                 "PersistentReserveInReadReservation", "PersistentReserveInServiceActions",
                 "PrinReadKeys", "PrinServiceactionRange", "PrinReportCapabilities",
                 "ProutRegister", "ProutReserve", "ProutClear", "ProutPreempt",
                 "Reserve6", "MultipathIO")
CONFIGFS = Path("/sys/kernel/config/target")


def counts(results: dict[str, str]) -> dict[str, int]:
    return {k: sum(1 for v in results.values() if v == k) for k in ("pass", "skip", "fail")}


# --- guest side ------------------------------------------------------------------------------


def sh(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def wait(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def export_fileio(scratch: Path) -> None:
    """A fileio backstore on tmpfs as LUN 0 of its own iSCSI target (configfs)."""
    img = scratch / "fileio.img"
    with img.open("wb") as f:
        f.truncate(SIZE)
    bs = CONFIGFS / "core" / "fileio_9" / "fio0"
    bs.mkdir(parents=True)
    (bs / "control").write_text(f"fd_dev_name={img},fd_dev_size={SIZE}")
    (bs / "enable").write_text("1")
    tpg = CONFIGFS / "iscsi" / TARGETS["fileio"] / "tpgt_1"
    lun = tpg / "lun" / "lun_0"
    lun.mkdir(parents=True)
    os.symlink(bs, lun / "fio0")
    (tpg / "np" / "127.0.0.1:3261").mkdir()
    for key, value in (("generate_node_acls", 1), ("demo_mode_write_protect", 0),
                       ("authentication", 0), ("cache_dynamic_acls", 1)):
        (tpg / "attrib" / key).write_text(str(value))
    (tpg / "enable").write_text("1")


def suites() -> list[str]:
    listing = sh(["iscsi-test-cu", "-l"]).stdout
    names: list[str] = []
    for line in listing.splitlines():
        parts = line.strip().split(".")
        if len(parts) >= 2 and parts[0] == "SCSI" and parts[1] not in names:
            names.append(parts[1])
    # ReceiveCopyResults.CopyStatus expects no status held for list identifier 1, which
    # ExtendedCopy's copies leave on tcmu-py (per LUN, no I_T nexus in TCMU).
    if "ReceiveCopyResults" in names:
        names.remove("ReceiveCopyResults")
        names.insert(0, "ReceiveCopyResults")
    return names


def run_suite(name: str, url: str, suite: str, out: Path, timeout: float,
              results: dict[str, str]) -> None:
    """One suite against one target, bounded; its results join `results` and `<name>.json`."""
    from scenarios.iscsi_conformance import parse_cunit

    start = time.monotonic()
    try:
        res = sh(["iscsi-test-cu", "-d", f"--test=SCSI.{suite}", url], timeout=timeout)
        text = res.stdout + res.stderr
    except subprocess.TimeoutExpired:
        text = f"*** SCSI.{suite}: no result within {timeout}s\n"
        results[f"{suite}.(timed out)"] = "fail"
    with (out / f"{name}.txt").open("a") as f:
        f.write(f"===== SCSI.{suite} ({time.monotonic() - start:.0f} s)\n{text}\n")
    results.update({f"{suite}.{k.rsplit('.', 1)[-1]}": v for k, v in parse_cunit(text).items()})
    (out / f"{name}.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"{name} SCSI.{suite} ({time.monotonic() - start:.0f} s): {counts(results)}",
          flush=True)


def guest(out: Path, timeout: float, only: list[str]) -> int:
    scratch = Path(os.environ.get("TCMU_PY_SCRATCH", "/tmp"))
    cfg = scratch / "pyraw.yaml"
    cfg.write_text(
        f"state_dir: {scratch / 'state'}\n"
        "devices:\n"
        f"  - {{name: pyraw, handler: raw, size: {SIZE}, options: {{path: {scratch}/pyraw.img}}}}\n"
        "exports:\n"
        "  iscsi:\n"
        f"    - iqn: {TARGETS['pyraw']}\n"
        "      portals: ['127.0.0.1:3260']\n"
        "      generate_node_acls: true\n"
        "      luns: [{device: pyraw, lun: 0}]\n"
    )
    ready = scratch / "ready"
    cli = [sys.executable, "-m", "tcmu_py.cli"]
    log = (out / "daemon.log").open("w")
    daemon = subprocess.Popen([*cli, "serve", "-c", str(cfg), "--run-dir", str(scratch / "run"),
                               "--ready-file", str(ready)], stdout=log, stderr=log)
    try:
        wait(ready.exists, 240, "tcmu-py serve")
        export_fileio(scratch)
        families = [f for f in suites() if not only or f in only]
        (out / "suites.json").write_text(json.dumps(families))
        print(f"{len(families)} suites: {families}", flush=True)
        urls = {name: f"iscsi://127.0.0.1:{port}/{TARGETS[name]}/0"
                for name, port in (("pyraw", 3260), ("fileio", 3261))}
        for url in urls.values():
            print(sh(["iscsi-inq", url]).stdout, flush=True)
        results: dict[str, dict[str, str]] = {name: {} for name in urls}
        for suite in families:
            threads = [threading.Thread(target=run_suite, args=(name, url, suite, out, timeout,
                                                                results[name]))
                       for name, url in urls.items()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        daemon.terminate()
        daemon.wait(60)
    return 0


# --- host side -------------------------------------------------------------------------------


def summarise(out: Path) -> str:
    res = {n: json.loads((out / f"{n}.json").read_text()) for n in TARGETS
           if (out / f"{n}.json").exists()}
    lines = ["| target | tests | pass | skip | fail |", "|---|---|---|---|---|"]
    for n, r in res.items():
        c = counts(r)
        lines.append(f"| {n} | {len(r)} | {c['pass']} | {c['skip']} | {c['fail']} |")
    py, fio = res.get("pyraw", {}), res.get("fileio", {})
    missing = sorted(t for t, v in fio.items() if v == "pass" and py.get(t) != "pass")
    own = [t for t in missing if t.split(".")[0] not in KERNEL_SUITES]
    lines += ["", f"LIO fileio passes, tcmu-py does not ({len(missing)}; "
              f"outside the kernel-owned suites: {len(own)}):"]
    lines += [f"- {t}: tcmu-py {py.get(t, 'absent')}" for t in missing]
    lines += ["", "Failures on tcmu-py:"] + [f"- {t}" for t, v in sorted(py.items()) if v == "fail"]
    lines += ["", "Failures on LIO fileio:"] + [
        f"- {t}" for t, v in sorted(fio.items()) if v == "fail"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite-timeout", type=float, default=300)
    ap.add_argument("--timeout", type=float, default=5400, help="the whole VM run, seconds")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--suites", default="", help="comma-separated suites (default: all)")
    ap.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--summarise", type=Path, help="only print the summary of an earlier run")
    args = ap.parse_args(argv)
    if args.guest:
        return guest(args.guest, args.suite_timeout, [x for x in args.suites.split(",") if x])
    if args.summarise:
        print(summarise(args.summarise), end="")
        return 0
    from tcmu_py.lab import LabError, LabTimeout, guest_prelude, run_in_vm

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or REPO / "results" / "libiscsi" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    venv_bin = shlex.quote(str(Path(sys.executable).parent))
    script = (guest_prelude() + f'export PATH={venv_bin}:"$PATH"\ncd {shlex.quote(str(REPO))}\n'
              + " ".join(shlex.quote(a) for a in [sys.executable, str(Path(__file__).resolve()),
                                                   "--guest", str(out), "--suite-timeout",
                                                   f"{args.suite_timeout:g}", "--suites",
                                                   args.suites]) + "\n")
    print(f"booting the lab VM; output in {out}", flush=True)
    try:
        proc = run_in_vm(script, rwdirs=[out], timeout=args.timeout, log=out / "console.log")
    except LabError as exc:
        print(f"libiscsi_vs_fileio: {exc}", file=sys.stderr)
        return 2
    except LabTimeout:
        print("libiscsi_vs_fileio: the VM run timed out (partial results kept)", file=sys.stderr)
        proc = None
    summary = summarise(out)
    (out / "summary.md").write_text(summary)
    print(summary, end="")
    return 0 if proc is not None and proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
