"""`tcmu-py serve` with the real target_core_user: a raw disk through tcm_loop, checked with the
Linux sd driver, sg3_utils, ext4 + fsck, fio with verification, resize and kill -9 recovery."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from guestlib import (
    Context,
    Daemon,
    create_loopback_lun,
    create_user_backstore,
    log,
    read_attr,
    run,
    scenario,
    wait_for,
    write_attr,
)

MIB = 1 << 20
CONTROL = {"hw_max_sectors": 1024, "max_data_area_mb": 64}


def start_daemon(ctx: Context, *extra: str, name: str = "daemon") -> tuple[Daemon, Path]:
    run_dir = ctx.workdir / "run"
    ready = ctx.workdir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    d = Daemon(
        [
            sys.executable,
            "-m",
            "tcmu_py.cli",
            "-v",
            "serve",
            "--run-dir",
            str(run_dir),
            "--ready-file",
            str(ready),
            *extra,
        ],
        ctx.artifacts / f"{name}.log",
    )
    ctx.cleanup.callback(d.stop)
    # The first start in a boot imports everything over the VM's share of the host filesystem,
    # under software emulation: allow minutes, not seconds (it returns as soon as it is ready).
    d.start(ready=ready.exists, timeout=ctx.remaining(240))
    return d, run_dir


def served(run_dir: Path, device: str) -> bool:
    from tcmu_py.daemon.control import query_status
    from tcmu_py.errors import TcmuError

    try:
        st = query_status(run_dir, timeout=2)
    except TcmuError:
        return False
    return any(d["name"] == device and not d["failed"] for d in st["devices"])


def daemon_log_tail(ctx: Context, lines: int = 25) -> str:
    """The last non-DEBUG lines of the daemon's log (`start_daemon`), for a failure message:
    the artifacts directory is not always at hand where the failure is read (CI's output)."""
    path = ctx.artifacts / "daemon.log"
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"no daemon log ({exc.strerror})"
    kept = [line for line in text.splitlines() if " DEBUG " not in line][-lines:]
    return f"{path} ends:\n" + "\n".join(kept)


def raw_disk(ctx: Context, name: str, size: int, run_dir: Path, cmd_time_out: int | None = None):
    """A raw-handler backstore served by the daemon, exported through tcm_loop; returns
    (backstore, loopback LUN, /dev/sdX)."""
    img = ctx.workdir / f"{name}.img"
    bs = create_user_backstore(name, f"raw/{img}", size, control=CONTROL, cleanup=ctx.cleanup)
    if cmd_time_out is not None:
        bs.set_attrib("cmd_time_out", cmd_time_out)  # only while not exported
    try:
        wait_for(lambda: served(run_dir, name), ctx.remaining(30), f"daemon serving {name}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; {daemon_log_tail(ctx)}") from None
    lun = create_loopback_lun(bs, cleanup=ctx.cleanup)
    dev = lun.wait_device("block", ctx.remaining(90))
    log(f"{name}: {dev}")
    return bs, lun, dev


def sg(*argv: str, ctx: Context) -> str:
    return run(list(argv), timeout=ctx.remaining(60)).stdout


@scenario(timeout=420)
def sg_identity(ctx: Context) -> None:
    """lsscsi, sg_inq, sg_vpd 0x83/0xb0, sg_readcap -l, sg_opcodes, sg_requests: field by field."""
    _, run_dir = start_daemon(ctx)
    size = 64 * MIB
    bs, lun, dev = raw_disk(ctx, "ident0", size, run_dir)
    # The unit serial is LIO's (wwn/vpd_unit_serial) when one is set, else derived from the name.
    from tcmu_py.scsi.spc import serial_from_name

    lio_serial = read_attr(bs.path / "wwn" / "vpd_unit_serial").split(":", 1)[1].strip()
    serial = lio_serial or serial_from_name("ident0")
    assert serial, "no serial to look for"

    out = sg("lsscsi", ctx=ctx)
    line = next((ln for ln in out.splitlines() if str(dev) in ln), "")
    assert re.search(r"\bdisk\s+TCMU-PY\s+RAW DISK\b", line), f"lsscsi line: {line!r}\n{out}"

    out = sg("sg_inq", str(dev), ctx=ctx)
    assert re.search(r"Vendor identification:\s+TCMU-PY", out), out
    assert re.search(r"Product identification:\s+RAW DISK", out), out
    assert re.search(r"\[SPC-4\]", out) or "version=0x06" in out, out
    assert re.search(r"PQual=0\s+PDT=0\b", out) or "Device_type=0" in out, out

    out = sg("sg_vpd", "-p", "0x80", str(dev), ctx=ctx)
    assert serial in out, f"unit serial {serial!r} not in:\n{out}"
    out = sg("sg_vpd", "-p", "0x83", str(dev), ctx=ctx)
    assert "NAA" in out and "T10 vendor identification" in out, out
    assert "TCMU-PY" in out, out

    out = sg("sg_vpd", "-p", "0xb0", str(dev), ctx=ctx)
    # MAXIMUM TRANSFER LENGTH: what one command can carry in the ring's data area
    # (max_data_area_mb); OPTIMAL TRANSFER LENGTH: hw_max_sectors.
    data_blocks = CONTROL["max_data_area_mb"] * MIB // 512
    m = re.search(r"Maximum transfer length:\s+(\d+)", out)
    assert m and int(m.group(1)) == data_blocks, f"max transfer ({data_blocks}):\n{out}"
    m = re.search(r"Optimal transfer length:\s+(\d+)", out)
    assert m and int(m.group(1)) == CONTROL["hw_max_sectors"], f"optimal transfer:\n{out}"
    assert re.search(r"Maximum unmap LBA count:\s+0\b", out), out

    out = sg("sg_readcap", "-l", str(dev), ctx=ctx)
    m = re.search(r"Last LBA=(\d+)", out)
    assert m and int(m.group(1)) == size // 512 - 1, out
    assert re.search(r"Logical block length=512", out), out
    assert re.search(r"Logical block provisioning: lbpme=0, lbprz=0", out), out

    out = sg("sg_opcodes", str(dev), ctx=ctx)
    for op in (
        "Read(10)",
        "Write(16)",
        "Compare and write",
        "Synchronize cache(10)",
        "Report supported operation codes",
        "Request sense",
        "Write same(16)",
    ):
        assert op.lower() in out.lower(), f"{op} missing from sg_opcodes:\n{out}"
    assert "Unmap" not in out, f"raw cannot unmap, yet sg_opcodes lists it:\n{out}"

    req = run(["sg_requests", str(dev)], timeout=ctx.remaining(30), check=False)
    text = req.stdout + req.stderr
    assert req.returncode == 0, text
    assert re.search(r"no (additional )?sense", text, re.IGNORECASE), text
    ctx.details["serial"] = serial


@scenario(timeout=600)
def ext4_fsck(ctx: Context) -> None:
    """mkfs.ext4, mount, write and read back a tree of files, unmount, fsck -f clean."""
    _, run_dir = start_daemon(ctx)
    _, _, dev = raw_disk(ctx, "fs0", 96 * MIB, run_dir)
    run(["mkfs.ext4", "-q", "-F", str(dev)], timeout=ctx.remaining(180))
    mnt = ctx.workdir / "mnt"
    mnt.mkdir()
    run(["mount", str(dev), str(mnt)], timeout=ctx.remaining(60))
    ctx.cleanup.callback(lambda: run(["umount", "-l", str(mnt)], check=False, timeout=30))
    files = {}
    for i in range(40):
        sub = mnt / f"d{i % 5}"
        sub.mkdir(exist_ok=True)
        data = os.urandom(1000 + 7919 * i)
        (sub / f"f{i}").write_bytes(data)
        files[sub / f"f{i}"] = data
    run(["sync"], timeout=ctx.remaining(60))
    run(["umount", str(mnt)], timeout=ctx.remaining(60))
    run(["mount", str(dev), str(mnt)], timeout=ctx.remaining(60))
    for path, data in files.items():
        assert path.read_bytes() == data, f"{path} differs after remount"
    run(["umount", str(mnt)], timeout=ctx.remaining(60))
    out = run(["fsck.ext4", "-f", "-n", str(dev)], timeout=ctx.remaining(120), check=False)
    assert out.returncode == 0, f"fsck exit {out.returncode}:\n{out.stdout}{out.stderr}"
    ctx.details["files"] = len(files)


def fio(ctx: Context, dev: Path, name: str, *args: str, check: bool = True) -> dict:
    out_json = ctx.workdir / f"{name}.json"
    argv = [
        "fio",
        f"--name={name}",
        f"--filename={dev}",
        "--direct=1",
        "--ioengine=libaio",
        "--output-format=json",
        f"--output={out_json}",
        *args,
    ]
    res = run(argv, timeout=ctx.remaining(), check=False)
    text = out_json.read_text() if out_json.exists() else ""
    (ctx.artifacts / f"{name}.json").write_text(text)
    if check:
        assert res.returncode == 0, f"fio {name} exit {res.returncode}: {res.stderr[-3000:]}"
    data = json.loads(text[text.index("{") :]) if "{" in text else {}
    return data


METRICS = "127.0.0.1:9571"


def scrape(ctx: Context, *, quiet: bool = False) -> dict[tuple[str, str], float]:
    """`curl` of the daemon's metrics endpoint (with ``quiet``: urllib, nothing logged), parsed
    by prometheus_client's own parser (which refuses malformed text): {(sample name, device
    label): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{METRICS}/metrics"
    if quiet:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
    else:
        text = run(["curl", "-sS", "--max-time", "10", url], timeout=ctx.remaining(30)).stdout
    return {
        (s.name, s.labels.get("device", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@scenario(timeout=600)
def fio_verify(ctx: Context) -> None:
    """fio verify=crc32c: 4 KiB random and 1 MiB sequential writes at queue depth 16; the
    daemon's metrics endpoint (`serve --metrics`) scraped with curl while fio runs, and
    `tcmu-py log-level` changed without a restart."""
    _, run_dir = start_daemon(ctx, "--metrics", METRICS)
    _, _, dev = raw_disk(ctx, "fio0", 64 * MIB, run_dir)
    before = scrape(ctx)
    written = ("tcmu_py_written_bytes_total", "fio0")
    moved: list[float] = []

    def watch() -> None:  # scrapes while fio runs, until the write counter moved
        deadline = time.monotonic() + 120
        while not moved and time.monotonic() < deadline:
            now = scrape(ctx, quiet=True)[written]
            if now > before[written]:
                moved.append(now)
            else:
                time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for name, bs, rw in (("rand4k", "4k", "randwrite"), ("seq1m", "1M", "write")):
            data = fio(
                ctx,
                dev,
                name,
                f"--bs={bs}",
                f"--rw={rw}",
                "--iodepth=16",
                "--size=24M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--verify_state_save=0",
            )
            job = data["jobs"][0]
            assert job["error"] == 0, job
            ctx.details[name] = {
                "write_iops": round(job["write"]["iops"]),
                "read_iops": round(job["read"]["iops"]),
            }
    finally:
        watcher.join(timeout=ctx.remaining(130))
    after = scrape(ctx)
    assert moved, "the metrics' write counter did not move while fio ran"
    for key in (written, ("tcmu_py_read_bytes_total", "fio0")):
        assert after[key] - before[key] >= 48 * MIB, (key, before[key], after[key])
    count = after[("tcmu_py_command_latency_seconds_count", "fio0")]
    assert count == after[("tcmu_py_commands_total", "fio0")] > 0
    ctx.details["metrics"] = {k[0]: v for k, v in after.items() if k[1] == "fio0"
                              and not k[0].endswith("_bucket")}
    out = run([sys.executable, "-m", "tcmu_py.cli", "log-level", "warning", "--run-dir",
               str(run_dir)], timeout=ctx.remaining(60)).stdout
    assert "log level: warning (was debug)" in out, out
    out = run([sys.executable, "-m", "tcmu_py.cli", "log-level", "info", "--run-dir",
               str(run_dir)], timeout=ctx.remaining(60)).stdout
    assert "log level: info (was warning)" in out, out


@scenario(timeout=420)
def resize(ctx: Context) -> None:
    """Resize through configfs: the daemon gets RECONFIG over netlink and the initiator sees the
    new size after a rescan."""
    _, run_dir = start_daemon(ctx)
    bs, _, dev = raw_disk(ctx, "grow0", 32 * MIB, run_dir)
    sysblk = Path("/sys/block") / dev.name
    assert int(read_attr(sysblk / "size")) * 512 == 32 * MIB
    write_attr(bs.path / "attrib" / "dev_size", 48 * MIB)

    def grown() -> bool:
        write_attr(sysblk / "device" / "rescan", 1)
        return int(read_attr(sysblk / "size")) * 512 == 48 * MIB

    wait_for(grown, ctx.remaining(60), "the new size after rescan")
    out = sg("sg_readcap", "-l", str(dev), ctx=ctx)
    assert f"Last LBA={48 * MIB // 512 - 1}" in out, out


@scenario(timeout=900)
def kill9_restart(ctx: Context) -> None:
    """kill -9 of the daemon during fio with verification, then restart: fio finishes, the
    verification passes, no task is left hung."""
    daemon, run_dir = start_daemon(ctx, name="first")
    # TCMU fails commands a daemon leaves in flight once cmd_time_out (30 s by default) passes.
    # Restarting takes well under that on real hardware but not under emulation on a busy
    # machine, so this device tolerates a longer outage, as an operator would configure it.
    _, lun, dev = raw_disk(ctx, "crash0", 64 * MIB, run_dir, cmd_time_out=600)
    out_json = ctx.workdir / "crash.json"
    argv = [
        "fio",
        "--name=crash",
        f"--filename={dev}",
        "--direct=1",
        "--ioengine=libaio",
        "--bs=4k",
        "--rw=randwrite",
        "--iodepth=16",
        "--size=16M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--verify_state_save=0",
        "--output-format=json",
        f"--output={out_json}",
    ]
    fio_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    def stop_fio() -> None:
        if fio_proc.poll() is None:
            fio_proc.kill()

    ctx.cleanup.callback(stop_fio)
    # Let some writes complete, then kill the daemon with commands in flight.
    wait_for(lambda: served_writes(run_dir, "crash0") > 200, ctx.remaining(120), "fio to get going")
    assert daemon.proc is not None
    os.killpg(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait()
    log("daemon killed with -9; restarting")
    time.sleep(0)  # no fixed wait: the restart below must cope with whatever is in flight
    restarted, restarted_wall = time.monotonic(), time.time()
    start_daemon(ctx, name="second")
    # Restart-to-serving (issue 11): the daemon serves the rings before anything slower; its
    # log's "serving" line for the device comes first. Measured from the exec of the second
    # daemon to that line and to --ready-file (everything, LIO included).
    ctx.details["restart_ready_s"] = round(time.monotonic() - restarted, 2)
    first_log = ctx.artifacts / "second.log"
    wait_for(
        lambda: "crash0: serving" in first_log.read_text(errors="replace"),
        ctx.remaining(60),
        "the restarted daemon's serving line",
    )
    serving_at = _log_time(first_log, "crash0: serving")
    if serving_at is not None:
        ctx.details["restart_serving_s"] = round(serving_at - restarted_wall, 2)
    try:
        _, err = fio_proc.communicate(timeout=ctx.remaining(600))
    except subprocess.TimeoutExpired:
        fio_proc.kill()
        raise AssertionError("fio did not finish after the daemon restarted") from None
    text = out_json.read_text()
    (ctx.artifacts / "crash.json").write_text(text)
    assert fio_proc.returncode == 0, f"fio exit {fio_proc.returncode}: {err.decode()[-3000:]}"
    job = json.loads(text[text.index("{") :])["jobs"][0]
    assert job["error"] == 0, job
    dmesg = run(["dmesg"], timeout=30).stdout
    assert "blocked for more than" not in dmesg, "a task hung:\n" + dmesg[-3000:]
    ctx.details["fio_write_iops"] = round(job["write"]["iops"])
    # Remove the LUN while the restarted daemon still serves it: cleanup would stop that daemon
    # first (it started last), and the removal's SYNCHRONIZE CACHE would then wait out the
    # 600 s cmd_time_out.
    lun.unlink()


def _log_time(log_file: Path, needle: str) -> float | None:
    """Wall-clock time (time.time() scale) of the first daemon log line containing `needle`
    (lines start with logging's default asctime, local time); None if there is none."""
    import datetime

    for line in log_file.read_text(errors="replace").splitlines():
        if needle in line:
            try:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            except ValueError:
                return None
            return stamp.timestamp()
    return None


def served_writes(run_dir: Path, device: str) -> int:
    from tcmu_py.daemon.control import query_status
    from tcmu_py.errors import TcmuError

    try:
        st = query_status(run_dir, timeout=2)
    except TcmuError:
        return 0
    return sum(d["counters"]["writes"] for d in st["devices"] if d["name"] == device)


@scenario(timeout=420)
def failed_handler_and_neighbour(ctx: Context) -> None:
    """A device whose image directory does not exist answers NOT READY with a log line saying
    why; a second device served by the same daemon keeps working."""
    daemon, run_dir = start_daemon(ctx)
    bad = create_user_backstore(
        "bad0", "raw//nonexistent/dir/x.img", 16 * MIB, control=CONTROL, cleanup=ctx.cleanup
    )
    wait_for(
        lambda: "bad0" in daemon.output() and "failed" in daemon.output(),
        ctx.remaining(30),
        "the daemon to report bad0",
    )
    lun = create_loopback_lun(bad, cleanup=ctx.cleanup)
    sgdev = lun.wait_device("scsi_generic", ctx.remaining(90))
    res = run(["sg_turs", "-v", str(sgdev)], timeout=ctx.remaining(30), check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "not ready" in text.lower(), text
    assert "manual intervention required" in text.lower(), text
    assert "/nonexistent/dir" in daemon.output(), daemon.output()[-2000:]
    _, _, dev = raw_disk(ctx, "good0", 16 * MIB, run_dir)
    run(
        ["dd", f"if={dev}", "of=/dev/null", "bs=1M", "count=4", "iflag=direct"],
        timeout=ctx.remaining(60),
    )
