"""The daemon's device lifecycle against a fake sysfs/configfs tree and FakeKernel rings."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.daemon.control import query_status
from tcmu_py.daemon.netlink import DeviceEvent, TcmuCmd
from tcmu_py.daemon.serve import Daemon
from tcmu_py.device.block import open_block_device
from tcmu_py.errors import DeviceUnavailable, TcmuError
from tcmu_py.handlers.null import NullBackend, NullHandler
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.testing import FakeKernel, FakeUio, cdbs, wait_until
from tcmu_py.testing.fake_uio import RelayedKicks
from tcmu_py.testing.harness import Result

MIB = 1 << 20


class Host:
    """A fake /sys/class/uio + configfs with FakeKernel devices behind each uio node."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uio_class = root / "sys/class/uio"
        self.configfs = root / "configfs"
        self.uio_class.mkdir(parents=True)
        self.kernels: dict[str, FakeKernel] = {}
        self.lock = threading.Lock()

    def add(self, node: str, hba: int, dev: str, dev_config: str, size: int,
            *, configured: bool = True) -> None:
        """A device; not `configured`: still inside the kernel's enable (`enable` reads 0, and
        writes to block_dev and reset_ring fail, as the kernel's EINVAL does)."""
        (self.uio_class / node).mkdir()
        (self.uio_class / node / "name").write_text(f"tcm-user/{hba}/{dev}/{dev_config}\n")
        d = self.configfs / f"user_{hba}" / dev
        for sub in ("attrib", "action", "wwn"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "enable").write_text("1\n" if configured else "0\n")
        if not configured:
            for action in ("block_dev", "reset_ring"):
                (d / "action" / action).mkdir()  # a write to a directory fails
        (d / "attrib/dev_size").write_text(f"{size}\n")
        (d / "attrib/hw_block_size").write_text("512\n")
        (d / "attrib/hw_max_sectors").write_text("1024\n")
        (d / "attrib/emulate_write_cache").write_text("0\n")
        (d / "attrib/cmd_time_out").write_text("30\n")
        (d / "wwn/vpd_unit_serial").write_text(f"T10 VPD Unit Serial Number: serial-{dev}\n")
        self.kernels[node] = FakeKernel(cmdr_size=16384, data_size=MIB)

    def action(self, hba: int, dev: str, name: str) -> str:
        return (self.configfs / f"user_{hba}" / dev / "action" / name).read_text()

    def open_uio(self, dev_path: str, sysfs_dir: str) -> FakeUio:
        return LockedFakeUio(FakeUio(self.kernels[Path(sysfs_dir).name]), self.lock)

    def run(self, node: str, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Result:
        with self.lock:
            p = self.kernels[node].submit(cdb, data_out, data_in_len)
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.lock:
                if p.done:
                    return Result(p.status, p.sense, p.data_in)
            time.sleep(0.005)
        raise AssertionError(f"{node}: command {cdb.hex()} not completed")


class LockedFakeUio(RelayedKicks):
    def __init__(self, uio: FakeUio, lock: threading.Lock) -> None:
        self.uio, self.lock, self.buffer = uio, lock, uio.buffer

    def fileno(self) -> int:
        return self.uio.fileno()

    def clear_event(self) -> None:
        self.uio.clear_event()

    def kick(self) -> None:
        with self.lock:
            self.uio.kick()

    def close(self) -> None:
        self._close_relay()
        self.uio.close()


@pytest.fixture
def host(tmp_path):
    return Host(tmp_path)


def make_daemon(host: Host, tmp_path: Path, handlers: dict[str, Any] | None = None) -> Daemon:
    return Daemon(
        handlers={"raw": RawHandler, "null": NullHandler} if handlers is None else handlers,
        configfs_root=host.configfs,
        uio_class=host.uio_class,
        run_dir=tmp_path / "run",
        use_netlink=False,
        use_udev=False,
        uio_opener=host.open_uio,
    )


def test_serves_found_devices_and_skips_foreign_subtypes(host, tmp_path):
    host.add("uio0", 0, "disk0", f"raw/{tmp_path}/d0.img", 4 * MIB)
    host.add("uio1", 1, "foreign", "qcow//x.qcow2", 4 * MIB)  # tcmu-runner's: not ours
    d = make_daemon(host, tmp_path)
    d.start()
    try:
        assert set(d.served) == {"uio0"}
        # Recovery on open: blocked, ring reset, unblocked.
        assert host.action(0, "disk0", "block_dev") == "0"
        assert host.action(0, "disk0", "reset_ring") == "1"
        assert host.run("uio0", cdbs.test_unit_ready()).sense_codes == (6, 0x29, 0)
        data = bytes(range(256)) * 2
        assert host.run("uio0", cdbs.write10(7, 1), data_out=data).good
        assert host.run("uio0", cdbs.read10(7, 1), data_in_len=512).data == data
        # VPD 80h carries LIO's serial from configfs.
        r = host.run("uio0", cdbs.inquiry(evpd=True, page_code=0x80), data_in_len=64)
        assert b"serial-disk0" in r.data
        st = d.status()
        assert st["devices"][0]["name"] == "disk0"
        assert st["devices"][0]["counters"]["writes"] == 1
        # On by default: the WRITE and the READ were served by the C data plane.
        assert st["devices"][0]["data_plane"] == {"declared": True, "commands": 2, "native": True,
                                                  "mapped": False}
    finally:
        d.shutdown()
    # Blocked while draining, then unblocked: a blocked device would hang LUN removal.
    assert host.action(0, "disk0", "block_dev") == "0"


def test_failed_handler_is_not_ready_and_others_keep_working(host, tmp_path, caplog):
    host.add("uio0", 0, "broken", "raw/relative/path.img", 4 * MIB)
    host.add("uio1", 1, "good", "null/", 4 * MIB)
    d = make_daemon(host, tmp_path)
    d.start()
    try:
        assert set(d.served) == {"uio0", "uio1"}
        host.run("uio0", cdbs.test_unit_ready())  # power-on UA
        r = host.run("uio0", cdbs.test_unit_ready())
        assert r.sense_codes == (2, 0x04, 0x03)
        r = host.run("uio0", cdbs.inquiry(), data_in_len=96)
        assert r.good  # still visible to the initiator
        assert "absolute path" in caplog.text
        host.run("uio1", cdbs.test_unit_ready())
        assert host.run("uio1", cdbs.read10(0, 8), data_in_len=4096).good
    finally:
        d.shutdown()


def test_rescan_follows_removal(host, tmp_path):
    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    d = make_daemon(host, tmp_path)
    d.start()
    try:
        assert "uio0" in d.served
        (host.uio_class / "uio0" / "name").unlink()
        (host.uio_class / "uio0").rmdir()
        d.rescan()
        assert d.served == {}
    finally:
        d.shutdown()


def test_single_instance(host, tmp_path):
    d = make_daemon(host, tmp_path)
    d.start()
    try:
        with pytest.raises(TcmuError, match="another tcmu-py daemon"):
            make_daemon(host, tmp_path).start()
    finally:
        d.shutdown()


@contextlib.contextmanager
def serving(host: Host, tmp_path: Path,
            handlers: dict[str, Any] | None = None) -> Iterator[Daemon]:
    """A started daemon running its loop on a thread; stopped (and checked gone) on exit."""
    d = make_daemon(host, tmp_path, handlers)
    d.start()
    t = threading.Thread(target=d.run, kwargs={"install_signals": False})
    t.start()
    try:
        yield d
    finally:
        d.stop()
        t.join(timeout=30)
    assert not t.is_alive()


def test_control_socket_status(host, tmp_path):
    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    with serving(host, tmp_path):
        st = query_status(tmp_path / "run")
        assert [x["name"] for x in st["devices"]] == ["disk0"]
    with pytest.raises(TcmuError, match="no tcmu-py daemon"):
        query_status(tmp_path / "run", timeout=1)


def test_status_shows_thin_pools(host, tmp_path):
    from tcmu_py.daemon.status import render_status
    from tcmu_py.handlers.thin import ThinHandler, create_pool

    pool_dir = tmp_path / "pool"
    create_pool(str(pool_dir), "main", 64 * MIB, 50)
    host.add("uio0", 0, "t0", f"thin/pool={pool_dir};disk=t0", 16 * MIB)
    d = Daemon(
        handlers={"thin": ThinHandler},
        configfs_root=host.configfs,
        uio_class=host.uio_class,
        run_dir=tmp_path / "run",
        use_netlink=False,
        use_udev=False,
        uio_opener=host.open_uio,
    )
    d.start()
    try:
        host.run("uio0", cdbs.test_unit_ready())
        assert host.run("uio0", cdbs.write10(0, 128), data_out=bytes(range(256)) * 256).good
        st = d.status()
        (pool,) = st["pools"]
        assert pool["name"] == "main" and pool["capacity"] == 64 * MIB
        assert pool["used"] > 0 and pool["disks"][0]["name"] == "t0"
        text = render_status(st)
        assert "thin pools" in text and "main" in text and "t0=" in text
    finally:
        d.shutdown()


def test_status_rates_over_a_window(host, tmp_path, capsys):
    """`tcmu-py status` reports IOPS, throughput and latency between two snapshots."""
    from tcmu_py import cli
    from tcmu_py.daemon.status import add_windows, percentile, render_status
    from tcmu_py.device.latency import latency_bucket, latency_bucket_upper

    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    with serving(host, tmp_path) as d:
        host.run("uio0", cdbs.test_unit_ready())  # the power-on UA
        for lba in range(10):
            assert host.run("uio0", cdbs.write10(lba, 8), data_out=bytes(4096)).good
        earlier = d.status()
        for lba in range(30):
            assert host.run("uio0", cdbs.read10(lba, 2), data_in_len=1024).good
        now = d.status()
        add_windows(now, earlier)
        w = now["devices"][0]["window"]
        assert w["iops"] == pytest.approx(30 / w["seconds"])
        assert w["read_bps"] == pytest.approx(30 * 1024 / w["seconds"])
        assert w["write_bps"] == 0 and w["errors"] == 0
        assert 0 < w["mean_s"] <= w["p99_s"] * 1.2
        add_windows(earlier, None)  # since start: the writes and the UA too
        assert earlier["devices"][0]["window"]["write_bps"] > 0
        text = render_status(now)
        assert "over the last" in text and "p99 ms" in text
        assert cli.main(["status", "--run-dir", str(tmp_path / "run"), "-i", "0.05"]) == 0
        out = capsys.readouterr().out
        assert "disk0" in out and "over the last" in out
        assert cli.main(["status", "--run-dir", str(tmp_path / "run"), "-i", "0", "--json"]) == 0
        js = json.loads(capsys.readouterr().out)
        assert js["devices"][0]["window"]["iops"] > 0
    # The histogram's buckets: four per doubling, percentiles read at the bucket's upper edge.
    assert latency_bucket(0.5e-6) == 0
    for seconds in (1e-6, 3e-6, 100e-6, 0.25, 30.0):
        i = latency_bucket(seconds)
        assert latency_bucket_upper(i - 1) <= seconds < latency_bucket_upper(i) * 1.0000001
    hist = [0] * 128
    hist[latency_bucket(100e-6)] = 99
    hist[latency_bucket(0.5)] = 1
    assert percentile(hist, 0.99) == latency_bucket_upper(latency_bucket(100e-6))
    assert percentile(hist, 1.0) == latency_bucket_upper(latency_bucket(0.5))
    assert percentile([0] * 128, 0.99) == 0.0


# ---------------------------------------------------------------------------------------------
# The control socket (D8): any bytes get an answer or are dropped; nobody blocks the main loop.


def _ask(path: Path, payload: bytes, *, shut: bool = True, timeout: float = 10.0) -> bytes:
    """Send `payload` on a fresh connection, read until the daemon closes it."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(payload)
        if shut:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe\xfd\n",  # not UTF-8: used to raise UnicodeDecodeError out of Daemon.run()
        b"stat\xc3us\n",
        b"\x00\x01\x02",
        b"status" * 100 + b"\n",  # longer than a request can be
        b"",
        b"{\"json\": [1, 2]}\n",
    ],
)
def test_control_socket_answers_garbage_and_keeps_serving(host, tmp_path, payload):
    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    sock = tmp_path / "run" / "control.sock"
    with serving(host, tmp_path) as d:
        reply = json.loads(_ask(sock, payload))
        assert "error" in reply and "devices" not in reply
        # The daemon still answers, and still serves its devices.
        assert [x["name"] for x in query_status(tmp_path / "run")["devices"]] == ["disk0"]
        host.run("uio0", cdbs.test_unit_ready())
        assert host.run("uio0", cdbs.read10(0, 1), data_in_len=512).good
        assert not d._stopping


def test_control_socket_idle_clients_do_not_block_anyone(host, tmp_path, monkeypatch):
    """Connections that never send (or send half a line) cost the others nothing."""
    import socket
    import time

    from tcmu_py.daemon import control

    # Idle clients are held up to 10 s each: an answer that waits for one comes no sooner.
    monkeypatch.setattr(control, "CONTROL_TIMEOUT", 10.0)
    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    sock = tmp_path / "run" / "control.sock"
    with serving(host, tmp_path), contextlib.ExitStack() as stack:
        idle = []
        for i in range(5):
            s = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            s.connect(str(sock))
            if i % 2:
                s.sendall(b"sta")  # half a request, never finished
            idle.append(s)
        start = time.monotonic()
        assert query_status(tmp_path / "run", timeout=30)["devices"][0]["name"] == "disk0"
        # The old loop read each idle client for up to 2 s, one after the other, in the main
        # thread: five of them held the answer back by 10 s. One that waited for an idle
        # client at all (its CONTROL_TIMEOUT) would take 10 s: half of that is the bound.
        assert time.monotonic() - start < control.CONTROL_TIMEOUT / 2


def test_control_socket_deadline_closes_idle_clients(host, tmp_path, monkeypatch):
    import socket

    from tcmu_py.daemon import control

    monkeypatch.setattr(control, "CONTROL_TIMEOUT", 0.2)
    with serving(host, tmp_path), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(tmp_path / "run" / "control.sock"))
        got = b""
        while chunk := s.recv(4096):  # the daemon closes it (with an error reply)
            got += chunk
        assert b"timed out" in got


def test_control_socket_many_clients(host, tmp_path):
    """Many simultaneous clients (more than the connection cap, some idle): every complete
    request is answered or refused with an error, none hangs, the daemon keeps serving."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    sock = tmp_path / "run" / "control.sock"
    with serving(host, tmp_path), contextlib.ExitStack() as stack:
        for _ in range(72):  # idle: more than the daemon's connection cap (64)
            s = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            s.connect(str(sock))

        def ask(i: int) -> dict:
            return json.loads(_ask(sock, b"status\n" if i % 3 else b"\xff\n") or b"{}")

        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(ask, range(48)))
        assert len(replies) == 48
        assert all(r.get("devices") or r.get("error") for r in replies)
        stack.close()  # the idle ones go away: full service again
        assert query_status(tmp_path / "run")["devices"][0]["name"] == "disk0"
        host.run("uio0", cdbs.test_unit_ready())
        assert host.run("uio0", cdbs.read10(0, 1), data_in_len=512).good


# ---------------------------------------------------------------------------------------------
# The run directory and its lock (D9)


def test_lock_file_symlink_is_refused_and_victim_untouched(host, tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious data\n")
    (run / "daemon.lock").symlink_to(victim)
    with pytest.raises(TcmuError, match=r"daemon\.lock.*symbolic link"):
        make_daemon(host, tmp_path).start()
    assert victim.read_text() == "precious data\n"


def test_lock_file_hard_link_is_refused(host, tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious data\n")
    os.link(victim, run / "daemon.lock")
    with pytest.raises(TcmuError, match=r"daemon\.lock.*links"):
        make_daemon(host, tmp_path).start()
    assert victim.read_text() == "precious data\n"


def test_run_dir_symlink_is_refused(host, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").symlink_to(elsewhere)
    with pytest.raises(TcmuError, match=r"run.*symbolic link"):
        make_daemon(host, tmp_path).start()
    assert list(elsewhere.iterdir()) == []


def test_run_dir_of_another_user_is_refused(host, tmp_path, monkeypatch):
    (tmp_path / "run").mkdir(mode=0o700)
    real_uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real_uid + 1)
    with pytest.raises(TcmuError, match=r"run.*owned by uid"):
        make_daemon(host, tmp_path).start()


def test_run_dir_open_to_others_is_tightened(host, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)
    d = make_daemon(host, tmp_path)
    d.start()
    try:
        assert run.stat().st_mode & 0o777 == 0o700
    finally:
        d.shutdown()


# ---------------------------------------------------------------------------------------------
# Restart: the rings are served before anything slow is imported


def _restart_bench():  # benchmarks/restart_time.py: the fake host and the timed child
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "restart_time.py"
    spec = importlib.util.spec_from_file_location("restart_time", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("with_config", [False, True])
def test_restarted_daemon_serves_before_importing_netlink_udev_yaml_rtslib(tmp_path, with_config):
    """`tcmu-py serve` (the real command line, against the fake host) completes a command left
    on a ring before it imports pyroute2, pyudev, yaml or rtslib-fb: under emulation those
    imports took long enough for the kernel's command timeout to fail in-flight writes."""
    bench = _restart_bench()
    config = bench.make_host(tmp_path, 2)
    result = bench.run_once(tmp_path, config if with_config else None)
    assert result["imported"] == []


def test_netlink_failure_does_not_stop_the_daemon(host, tmp_path, caplog):
    """A netlink socket that fails (receive raises) is dropped; the devices stay served."""

    class BrokenNetlink:
        def __init__(self) -> None:
            self.r, self.w = os.pipe()
            os.write(self.w, b"x")  # readable at once

        def fileno(self) -> int:
            return self.r

        def receive(self) -> list:
            raise OSError(5, "Input/output error")

        def close(self) -> None:
            os.close(self.r)
            os.close(self.w)

    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    d = make_daemon(host, tmp_path)
    d.start()
    d._netlink = BrokenNetlink()
    t = threading.Thread(target=d.run, kwargs={"install_signals": False})
    t.start()
    try:
        deadline = time.monotonic() + 10
        while d._netlink is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert query_status(tmp_path / "run")["devices"][0]["name"] == "disk0"
        host.run("uio0", cdbs.test_unit_ready())
        assert host.run("uio0", cdbs.read10(0, 1), data_in_len=512).good
        assert t.is_alive() and d._netlink is None
        assert "netlink TCM-USER failed" in caplog.text
    finally:
        d.stop()
        t.join(timeout=30)


def test_wwn_from_dev_config_is_the_vpd83_naa_designator(host, tmp_path):
    """A YAML `wwn:` travels in the dev_config (last item); the daemon strips it before the
    handler parses its options and the device reports it as its NAA designator (VPD 83h)."""
    host.add("uio0", 0, "disk0", f"raw/{tmp_path}/d0.img;wwn=naa.5001405000000abc", 4 * MIB)
    host.add("uio1", 1, "nul0", "null/wwn=naa.6001405000000000000000000000abcd", 4 * MIB)
    host.add("uio2", 2, "plain", "null/", 4 * MIB)
    d = make_daemon(host, tmp_path)
    d.start()
    try:
        assert all(s.failed is None for s in d.served.values())
        assert (tmp_path / "d0.img").exists()  # the handler got the path alone
        pages = {}
        for node in ("uio0", "uio1", "uio2"):
            host.run(node, cdbs.test_unit_ready())
            r = host.run(node, cdbs.inquiry(evpd=True, page_code=0x83), data_in_len=255)
            assert r.good
            pages[node] = r.data
        # Designation descriptor: code set 1 (binary), type 3 (NAA), length, designator.
        assert bytes([0x01, 0x03, 0x00, 8]) + bytes.fromhex("5001405000000abc") in pages["uio0"]
        assert bytes([0x01, 0x03, 0x00, 16]) + bytes.fromhex(
            "6001405000000000000000000000abcd") in pages["uio1"]
        from tcmu_py.scsi.spc import naa_from_serial

        assert naa_from_serial("serial-plain") in pages["uio2"]  # from the serial, as before
    finally:
        d.shutdown()


def test_reopen_failed_gives_a_device_failed_at_start_a_second_chance(host, tmp_path):
    """`serve -c` serves the rings before reading the YAML: a device that fails to open then
    (its image's directory is made later, as a pool or library the YAML declares would be)
    is opened again by `reopen_failed` and serves; a device that still fails stays NOT READY."""
    late = tmp_path / "late"
    host.add("uio0", 0, "disk0", f"raw/{late}/d0.img", 4 * MIB)
    host.add("uio1", 1, "disk1", "raw/relative.img", 4 * MIB)
    d = make_daemon(host, tmp_path)
    d.start()
    try:
        assert d.served["uio0"].failed and d.served["uio1"].failed
        late.mkdir()
        d.reopen_failed()
        assert d.served["uio0"].failed is None
        assert d.served["uio1"].failed is not None
        host.run("uio0", cdbs.test_unit_ready())  # power-on UA
        data = bytes(range(256)) * 2
        assert host.run("uio0", cdbs.write10(3, 1), data_out=data).good
        assert host.run("uio0", cdbs.read10(3, 1), data_in_len=512).data == data
        host.run("uio1", cdbs.test_unit_ready())
        assert host.run("uio1", cdbs.test_unit_ready()).sense_codes == (2, 0x04, 0x03)
    finally:
        d.shutdown()


def test_copy_domain_from_dev_config_groups_devices_for_extended_copy(host, tmp_path):
    """Issue 19: devices whose dev_config names one ``copy_domain`` may EXTENDED COPY to each
    other; a device outside it (its own domain) is COPY TARGET DEVICE NOT REACHABLE and is not
    written. The daemon strips the item before the handler sees the config string."""
    from tcmu_py.scsi import xcopy as x

    wwns = ["5001405000000a01", "5001405000000a02", "5001405000000a03"]
    host.add("uio0", 0, "a", f"raw/{tmp_path}/a.img;copy_domain=lab;wwn=naa.{wwns[0]}", 4 * MIB)
    host.add("uio1", 1, "b", f"raw/{tmp_path}/b.img;copy_domain=lab;wwn=naa.{wwns[1]}", 4 * MIB)
    host.add("uio2", 2, "c", f"raw/{tmp_path}/c.img;wwn=naa.{wwns[2]}", 4 * MIB)
    d = make_daemon(host, tmp_path)
    d.start()
    try:
        assert all(s.failed is None for s in d.served.values())
        assert sorted(p.name for p in tmp_path.glob("*.img")) == ["a.img", "b.img", "c.img"]
        assert sorted(dev.config.name for dev in d.copy_domains["lab"].devices()) == ["a", "b"]
        for node in ("uio0", "uio1", "uio2"):
            host.run(node, cdbs.test_unit_ready())
        pattern = os.urandom(8 * 512)
        assert host.run("uio0", cdbs.write10(16, 8), data_out=pattern).good

        def plist(dst: str) -> bytes:
            header = x.ParameterHeader(0, False, x.ListIdUsage.NONE, 0, 0, 0, 0)
            cscds = (x.IdentificationCscd(bytes.fromhex(wwns[0]), 512),
                     x.IdentificationCscd(bytes.fromhex(dst), 512))
            seg = x.BlockToBlockSegment(0, 1, 8, 16, 32)
            return x.ParameterList(header, cscds, (seg,)).build()

        ok = plist(wwns[1])
        assert host.run("uio0", cdbs.extended_copy(len(ok)), data_out=ok).good
        r = host.run("uio1", cdbs.read10(32, 8), data_in_len=8 * 512)
        assert r.good and r.data == pattern
        refused = plist(wwns[2])
        r = host.run("uio0", cdbs.extended_copy(len(refused)), data_out=refused)
        assert not r.good and (r.sense[2] & 0x0F, r.sense[12], r.sense[13]) == (0x0A, 0x0D, 0x02)
        r = host.run("uio2", cdbs.read10(32, 8), data_in_len=8 * 512)
        assert r.good and r.data == bytes(8 * 512)
    finally:
        d.shutdown()


def test_a_device_still_being_configured_is_served_without_block_or_reset(host, tmp_path):
    """Netlink's ADDED_DEVICE (and often udev's add) reaches the daemon while the kernel's
    enable is still running, when block_dev and reset_ring are refused: such a device has
    queued nothing, so it is served without them (it used to fail, unserved until a rescan)."""
    host.add("uio0", 0, "new0", "null/", 4 * MIB, configured=False)
    d = make_daemon(host, tmp_path)
    d.start()
    try:
        assert set(d.served) == {"uio0"} and d.served["uio0"].failed is None
        assert host.run("uio0", cdbs.test_unit_ready()).sense_codes == (6, 0x29, 0)
        assert host.run("uio0", cdbs.read10(0, 1), data_in_len=512).good
    finally:
        d.shutdown()


def test_a_device_that_failed_to_open_is_tried_again_within_seconds(host, tmp_path, caplog):
    """A failed open is retried after ADD_RETRY_SECONDS, not at the next rescan (10 s here,
    60 s with udev); the uio opened before the failure is closed, or the kernel would refuse
    every later open of it (EBUSY)."""
    import tcmu_py.daemon.serve as serve

    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    opened: list[LockedFakeUio] = []
    closed: list[LockedFakeUio] = []

    def opener(dev_path: str, sysfs_dir: str) -> LockedFakeUio:
        uio = host.open_uio(dev_path, sysfs_dir)
        real_close = uio.close

        def close() -> None:
            closed.append(uio)
            real_close()

        uio.close = close  # type: ignore[method-assign]
        opened.append(uio)
        return uio

    real_runner = serve.DeviceRunner
    calls = []

    def flaky_runner(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(24, "Too many open files")
        return real_runner(*args, **kwargs)

    d = make_daemon(host, tmp_path)
    d._open_uio = opener
    serve.DeviceRunner = flaky_runner  # type: ignore[misc]
    try:
        d.start_serving()  # one scan (`start` scans twice)
        assert not d.served and closed == opened[:1]
        assert "disk0: cannot serve uio0" in caplog.text
        t = threading.Thread(target=d.run, kwargs={"install_signals": False})
        t.start()
        try:
            deadline = time.monotonic() + 5  # < RESCAN_SECONDS: only the retry can make it
            while "uio0" not in d.served and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "uio0" in d.served, "not tried again within 5 s"
            assert len(opened) == 2 and closed == opened[:1]
            assert host.run("uio0", cdbs.test_unit_ready()).sense_codes == (6, 0x29, 0)
            assert host.run("uio0", cdbs.read10(0, 1), data_in_len=512).good
            assert serve.RESCAN_SECONDS > 5
        finally:
            d.stop()
            t.join(timeout=30)
    finally:
        serve.DeviceRunner = real_runner  # type: ignore[misc]


def test_a_device_whose_block_size_is_not_set_yet_is_tried_again_not_failed(host, tmp_path):
    """The kernel registers a new device's uio (udev announces it) before it gives
    hw_block_size its default (target_core_user.c, tcmu_configure_device): a daemon that read
    the attributes then opened the handler with block size 0 and left the device FAILED (seen
    in the VM lab). Now it is tried again, and served once the attribute is set."""
    host.add("uio0", 0, "new0", "null/", 4 * MIB, configured=False)
    attr = host.configfs / "user_0" / "new0" / "attrib" / "hw_block_size"
    attr.write_text("0\n")
    d = make_daemon(host, tmp_path)
    try:
        d.start_serving()
        assert "uio0" not in d.served
        attr.write_text("512\n")
        d.add("uio0")  # the retry, or the kernel's ADDED_DEVICE
        assert set(d.served) == {"uio0"} and d.served["uio0"].failed is None
        assert host.run("uio0", cdbs.test_unit_ready()).sense_codes == (6, 0x29, 0)
        assert host.run("uio0", cdbs.read10(0, 1), data_in_len=512).good
    finally:
        d.shutdown()


class _Recording(NullHandler):
    """A null disk that keeps the DeviceConfig of each open."""

    subtype = "rec"
    configs: list[Any] = []

    @classmethod
    def open(cls, config: Any) -> Any:
        cls.configs.append(config)
        return super().open(config)


def test_the_handler_is_told_the_kernels_command_timeout(host, tmp_path):
    """DeviceConfig.cmd_time_out is the device's attrib/cmd_time_out (a backend keeps its own
    timeouts below it: `ceph`'s osd_op_timeout)."""
    _Recording.configs = []
    host.add("uio0", 0, "disk0", "rec/", 4 * MIB)
    (host.configfs / "user_0" / "disk0" / "attrib" / "cmd_time_out").write_text("12\n")
    host.add("uio1", 1, "disk1", "rec/", 4 * MIB)
    (host.configfs / "user_1" / "disk1" / "attrib" / "cmd_time_out").write_text("0\n")
    d = make_daemon(host, tmp_path, {"rec": _Recording})
    d.start_serving()
    try:
        assert sorted((c.name, c.cmd_time_out) for c in _Recording.configs) == [
            ("disk0", 12), ("disk1", 0)]
    finally:
        d.shutdown()


class _Flaky(NullHandler):
    """A null disk whose backing store is unreachable until `reachable` is set: `open` raises
    DeviceUnavailable (after waiting on `gate`, so a test can hold an open in progress), or
    `broken` when set."""

    subtype = "flaky"
    reachable = threading.Event()
    gate = threading.Event()
    broken: Exception | None = None
    opens: list[float] = []
    closed: list[Any] = []

    @classmethod
    def reset(cls) -> None:
        cls.reachable, cls.gate, cls.broken, cls.opens, cls.closed = (
            threading.Event(), threading.Event(), None, [], [])
        cls.gate.set()

    @classmethod
    def open(cls, config: Any) -> Any:
        cls.opens.append(time.monotonic())
        assert cls.gate.wait(10)
        if cls.broken is not None:
            raise cls.broken
        if not cls.reachable.is_set():
            raise DeviceUnavailable("cluster not answering")
        device = super().open(config)
        real_close = device.close

        def close() -> None:
            cls.closed.append(device)
            real_close()

        device.close = close  # type: ignore[method-assign]
        return device



@pytest.fixture
def flaky(monkeypatch):
    import tcmu_py.daemon.serve as serve

    monkeypatch.setattr(serve, "ADD_RETRY_SECONDS", 0.05)
    _Flaky.reset()
    return _Flaky


def test_an_unavailable_device_says_becoming_ready_and_serves_once_it_opens(
        host, tmp_path, flaky, caplog):
    """A handler that raises DeviceUnavailable (a cluster down when the daemon starts): the
    device answers NOT READY 04h/01h (initiators retry, unlike 04h/03h), status says
    UNAVAILABLE, the daemon opens it again in the background — outside its lock: status
    answers while an open hangs — and once it opens the device serves, the ring recovered."""
    caplog.set_level("INFO", logger="tcmu_py.daemon")
    host.add("uio0", 0, "disk0", "flaky/", 4 * MIB)
    host.add("uio1", 1, "other", "null/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"flaky": flaky, "null": NullHandler})
    d.start_serving()
    try:
        assert d.served["uio0"].failed and d.served["uio1"].failed is None
        host.run("uio0", cdbs.test_unit_ready())  # power-on UA
        assert host.run("uio0", cdbs.test_unit_ready()).sense_codes == (2, 0x04, 0x01)
        assert host.run("uio0", cdbs.read10(0, 1), data_in_len=512).sense_codes == (2, 4, 1)
        row = next(r for r in d.status()["devices"] if r["name"] == "disk0")
        assert row["unavailable"] and "cluster not answering" in row["failed"]
        assert wait_until(lambda: len(flaky.opens) >= 3), "not opened again"
        flaky.gate.clear()  # the next open hangs inside the handler
        n = len(flaky.opens)
        assert wait_until(lambda: len(flaky.opens) > n), "no open in progress"
        # The daemon's lock is not held by the open: status answers while it hangs (which
        # it does until the gate opens, below: a status that waited would never return).
        status: Future[dict[str, Any]] = Future()
        threading.Thread(target=lambda: status.set_result(d.status()), daemon=True).start()
        assert len(status.result(timeout=10)["devices"]) == 2
        host.run("uio1", cdbs.test_unit_ready())
        assert host.run("uio1", cdbs.read10(0, 1), data_in_len=512).good
        flaky.reachable.set()
        flaky.gate.set()
        assert wait_until(lambda: "uio0" in d.served and d.served["uio0"].failed is None)
        assert host.run("uio0", cdbs.test_unit_ready()).sense_codes == (6, 0x29, 0)
        assert host.run("uio0", cdbs.read10(0, 1), data_in_len=512).good
        row = next(r for r in d.status()["devices"] if r["name"] == "disk0")
        assert not row["unavailable"] and row["failed"] is None
        opens = len(flaky.opens)
        time.sleep(0.3)  # several retry periods: no open after the one that succeeded
        assert len(flaky.opens) == opens and not flaky.closed
        assert "disk0: available again" in caplog.text
    finally:
        flaky.gate.set()
        d.shutdown()
    assert len(flaky.closed) == 1  # the served device, at shutdown


def test_an_unavailable_device_that_then_fails_for_good_needs_intervention(
        host, tmp_path, flaky):
    """Unavailable, then a failure that is not (bad credentials, say): NOT READY 04h/03h and
    no more opens."""
    host.add("uio0", 0, "disk0", "flaky/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"flaky": flaky})
    d.start_serving()
    try:
        assert wait_until(lambda: len(flaky.opens) >= 2)
        flaky.broken = PermissionError(13, "auth refused")
        assert wait_until(lambda: d.served["uio0"].failed is not None
                      and "auth refused" in d.served["uio0"].failed)
        opens = len(flaky.opens)
        time.sleep(0.3)
        assert len(flaky.opens) == opens
        host.run("uio0", cdbs.test_unit_ready())  # power-on UA
        assert host.run("uio0", cdbs.test_unit_ready()).sense_codes == (2, 0x04, 0x03)
        row = d.status()["devices"][0]
        assert not row["unavailable"] and "auth refused" in row["failed"]
        # Now a failure like any other: `reopen_failed` (after `serve -c` prepared the YAML)
        # gives it its second chance.
        assert d.served["uio0"].retrying is None
        flaky.broken = None
        flaky.reachable.set()
        d.reopen_failed()
        assert d.served["uio0"].failed is None
        host.run("uio0", cdbs.test_unit_ready())  # power-on UA
        assert host.run("uio0", cdbs.read10(0, 1), data_in_len=512).good
    finally:
        d.shutdown()


def test_removing_an_unavailable_device_ends_its_retries(host, tmp_path, flaky):
    """The device goes away while its handler is being opened again: the retries end, and a
    device the last open returned is closed, not served."""
    host.add("uio0", 0, "disk0", "flaky/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"flaky": flaky})
    d.start_serving()
    try:
        assert wait_until(lambda: len(flaky.opens) >= 2)
        flaky.gate.clear()
        n = len(flaky.opens)
        assert wait_until(lambda: len(flaky.opens) > n)  # an open hangs in the handler
        retrying = d.served["uio0"].retrying
        assert retrying is not None
        import shutil

        shutil.rmtree(host.uio_class / "uio0")
        d.rescan()
        assert "uio0" not in d.served
        flaky.reachable.set()
        flaky.gate.set()  # that open now succeeds, too late
        retrying.join(10)
        assert not retrying.is_alive()
        assert len(flaky.closed) == 1 and "uio0" not in d.served
        opens = len(flaky.opens)
        time.sleep(0.3)
        assert len(flaky.opens) == opens
    finally:
        flaky.gate.set()
        d.shutdown()


class _Stuck(NullHandler):
    """A null disk whose READs complete asynchronously (a Future, as librbd's completions do)
    once `read_gate` is set, and whose close waits for `close_gate` (a backend still busy when
    the daemon is told to stop); `closed` lists the devices whose close returned."""

    subtype = "stuck"
    #: READs wait for `read_gate` in `execute` itself (a synchronous backend stuck in I/O:
    #: the runner's drain waits for them) instead of completing a Future later
    sync_reads = False
    read_gate = threading.Event()
    close_gate = threading.Event()
    reading = threading.Event()
    closing = threading.Event()
    closed: list[Any] = []

    @classmethod
    def reset(cls) -> None:
        cls.read_gate, cls.close_gate = threading.Event(), threading.Event()
        cls.reading, cls.closing, cls.closed = threading.Event(), threading.Event(), []
        cls.sync_reads = False
        cls.read_gate.set()
        cls.close_gate.set()

    @classmethod
    def open(cls, config: Any) -> Any:
        backend = NullBackend(config.size, config.block_size)
        backend.blocking = True  # READ is not run inline: its Future resolves on its own
        device = open_block_device(config, backend)
        real_execute, real_close = device.execute, device.close

        def execute(cmd: Any) -> Any:
            if cmd.cdb[0] != 0x28:  # READ(10)
                return real_execute(cmd)
            if cls.sync_reads:
                cls.reading.set()
                assert cls.read_gate.wait(30)
                return real_execute(cmd)
            done: Future[Any] = Future()

            def complete() -> None:
                assert cls.read_gate.wait(30)
                done.set_result(real_execute(cmd))

            threading.Thread(target=complete, name="test-aio", daemon=True).start()
            cls.reading.set()
            return done

        def close() -> None:
            cls.closing.set()
            assert cls.close_gate.wait(30)
            real_close()
            cls.closed.append(device)

        device.execute = execute  # type: ignore[method-assign]
        device.close = close  # type: ignore[method-assign]
        return device


@pytest.fixture
def stuck():
    _Stuck.reset()
    yield _Stuck
    _Stuck.read_gate.set()
    _Stuck.close_gate.set()


def _shutdown_held_until(d: Daemon, stuck: type[_Stuck], gate: threading.Event,
                         why: str) -> None:
    """`d.shutdown()` on a thread of its own must still be waiting (nothing closed) until
    `gate` is set; it then returns, the device closed once."""
    t = threading.Thread(target=d.shutdown, name="test-shutdown")
    t.start()
    try:
        t.join(0.5)
        assert t.is_alive(), f"shutdown returned {why}"
        assert not stuck.closed
    finally:
        gate.set()
    t.join(10)
    assert not t.is_alive() and len(stuck.closed) == 1


def _daemon_with_a_read_in_the_backend(host: Host, tmp_path: Path, stuck: type[_Stuck],
                                       disks: int = 1) -> tuple[Daemon, list[Any]]:
    """A daemon serving `disks` `stuck` disks (disk0 on uio0, ...), each with a READ(10)
    waiting in its backend (the READs' Pendings)."""
    for i in range(disks):
        host.add(f"uio{i}", i, f"disk{i}", "stuck/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"stuck": stuck})
    d.start_serving()
    stuck.read_gate.clear()
    pendings = []
    for i in range(disks):
        host.run(f"uio{i}", cdbs.test_unit_ready())  # power-on UA
        stuck.reading.clear()
        with host.lock:
            pendings.append(host.kernels[f"uio{i}"].submit(cdbs.read10(0, 8), b"", 8 * 512))
        assert stuck.reading.wait(10), f"the READ of disk{i} did not reach the backend"
    return d, pendings


def test_shutdown_waits_for_a_close_another_thread_began(host, tmp_path, stuck):
    """A backstore deleted just before SIGTERM: the udev observer's "remove" is closing the
    handler on its thread (a mirror writing its clean flag) when the main thread shuts down.
    `shutdown` must not return (and the process exit) before that close has."""
    host.add("uio0", 0, "disk0", "stuck/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"stuck": stuck})
    d.start_serving()
    stuck.close_gate.clear()
    observer = threading.Thread(target=d.remove, args=("uio0",), name="test-udev")
    observer.start()
    assert stuck.closing.wait(10), "the close did not begin"
    _shutdown_held_until(d, stuck, stuck.close_gate, "under a handler's close")
    observer.join(10)


def test_shutdown_waits_for_a_command_still_in_the_backend_then_closes(host, tmp_path, stuck):
    """An asynchronous READ still in the backend when the daemon stops (the loop thread has
    returned; librbd has not answered): the close is deferred until it completes
    (`DeviceRunner.close`), and `shutdown` waits for that close instead of letting the process
    exit without it. The READ completes GOOD."""
    d, (pending,) = _daemon_with_a_read_in_the_backend(host, tmp_path, stuck)
    _shutdown_held_until(d, stuck, stuck.read_gate, "with a command in the backend, unclosed")
    with host.lock:
        assert pending.done and pending.status == 0


def test_shutdown_gives_up_on_a_stuck_close_after_its_bound(host, tmp_path, stuck, monkeypatch,
                                                             caplog):
    """A command that never leaves its backend does not hold the daemon past
    SHUTDOWN_SECONDS: shutdown returns and the log names the device."""
    _shutdown_bounded(host, tmp_path, stuck, monkeypatch, caplog, disks=1)


def test_shutdown_bound_is_shared_by_devices_stuck_in_synchronous_io(host, tmp_path, stuck,
                                                                      monkeypatch, caplog):
    """Three disks each with a READ stuck in a synchronous backend (a hung NFS file): the
    runners' drains do not add up (they were 60 s each, one after another, past systemd's
    TimeoutStopSec): shutdown returns within its one bound, naming every disk."""
    stuck.sync_reads = True
    _shutdown_bounded(host, tmp_path, stuck, monkeypatch, caplog, disks=3)


def _shutdown_bounded(host: Host, tmp_path: Path, stuck: type[_Stuck], monkeypatch: Any,
                      caplog: Any, disks: int) -> None:
    import tcmu_py.daemon.serve as serve

    monkeypatch.setattr(serve, "SHUTDOWN_SECONDS", 0.5)
    d, pendings = _daemon_with_a_read_in_the_backend(host, tmp_path, stuck, disks)
    t = threading.Thread(target=d.shutdown, name="test-shutdown")
    t.start()
    t.join(10)
    assert not t.is_alive(), "shutdown waited past its bound"
    for i in range(disks):
        assert f"disk{i}: its handler is still closing" in caplog.text
    stuck.read_gate.set()
    assert wait_until(lambda: len(stuck.closed) == disks), "not closed once the commands finished"
    with host.lock:
        assert all(p.done and p.status == 0 for p in pendings)


def _first_open_hanging(d: Daemon, host: Host, flaky: type[_Flaky]) -> threading.Thread:
    """A `flaky` disk uio0 appears while `d` runs; the udev observer's `add` of it (the thread
    returned) hangs inside the handler's open until `flaky.gate` is set."""
    flaky.reachable.set()
    flaky.gate.clear()
    host.add("uio0", 0, "disk0", "flaky/", 4 * MIB)
    observer = threading.Thread(target=d.add, args=("uio0",), name="test-udev")
    observer.start()
    assert wait_until(lambda: flaky.opens), "the open did not begin"
    return observer


def test_a_first_open_that_hangs_holds_neither_status_nor_other_devices(host, tmp_path, flaky):
    """A device created while the daemon runs whose handler's open hangs (a Ceph cluster that
    does not answer: up to its timeout): the udev observer's `add` waits in it, outside the
    daemon's lock — status answers and another device is served meanwhile; once the open
    returns the device is served."""
    host.add("uio1", 1, "other", "null/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"flaky": flaky, "null": NullHandler})
    d.start_serving()
    try:
        observer = _first_open_hanging(d, host, flaky)
        asked: list[Any] = []
        status = threading.Thread(target=lambda: asked.append(d.status()), daemon=True)
        status.start()
        status.join(5)
        assert asked, "status waited for another device's open"
        assert [r["name"] for r in asked[0]["devices"]] == ["other"]
        (opening,) = asked[0]["opening"]  # listed, not served yet
        assert (opening["name"], opening["uio"], opening["handler"]) == ("disk0", "uio0", "flaky")
        from tcmu_py.daemon.status import render_status

        line = next(ln for ln in render_status(asked[0], handlers={}).splitlines()
                    if ln.startswith("disk0"))
        assert "OPENING (for " in line and "uio0" in line, line
        host.add("uio2", 2, "third", "null/", 4 * MIB)
        adder = threading.Thread(target=d.add, args=("uio2",), daemon=True)
        adder.start()
        adder.join(5)
        assert "uio2" in d.served, "another device's add waited for this open"
        assert "uio0" not in d.served
        flaky.gate.set()
        observer.join(10)
        assert d.served["uio0"].failed is None and d.status()["opening"] == []
        host.run("uio0", cdbs.test_unit_ready())  # power-on UA
        assert host.run("uio0", cdbs.read10(0, 1), data_in_len=512).good
        assert len(flaky.opens) == 1
    finally:
        flaky.gate.set()
        d.shutdown()
    assert len(flaky.closed) == 1


def test_removal_and_shutdown_wait_for_a_first_open_in_progress(host, tmp_path, flaky):
    """The device goes away, then the daemon stops, while its first open hangs: neither
    returns before the open does, and what it opened is closed, never served."""
    d = make_daemon(host, tmp_path, {"flaky": flaky})
    d.start_serving()
    observer = _first_open_hanging(d, host, flaky)
    remover = threading.Thread(target=d.remove, args=("uio0",), name="test-netlink")
    remover.start()
    stopper = threading.Thread(target=d.shutdown, name="test-shutdown")
    stopper.start()
    try:
        remover.join(0.5)
        stopper.join(0.1)
        assert remover.is_alive() and stopper.is_alive(), "returned under an open in progress"
    finally:
        flaky.gate.set()
    for t in (observer, remover, stopper):
        t.join(10)
        assert not t.is_alive(), t.name
    assert "uio0" not in d.served and len(flaky.opens) == 1 and len(flaky.closed) == 1


class _SlowOpen(NullHandler):
    """A handler whose open takes `hold` seconds (a cluster that does not answer, a hung
    mount) unless `release` is set first."""

    subtype = "slow"
    opening = threading.Event()
    release = threading.Event()
    hold = 30.0

    @classmethod
    def open(cls, config: Any) -> Any:
        cls.opening.set()
        cls.release.wait(cls.hold)
        return NullHandler.open(config)


def test_a_slow_open_holds_up_no_other_device(host, tmp_path):
    """Before: the opens of a rescan ran one after another, so a (re)started daemon served
    the null disk on uio1 only once the slow open of uio0 was over."""
    _SlowOpen.opening.clear()
    _SlowOpen.release.clear()
    host.add("uio0", 0, "gw0", "slow/x", 4 * MIB)
    host.add("uio1", 1, "fast1", "null/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"slow": _SlowOpen, "null": NullHandler})
    starting = threading.Thread(target=d.start, daemon=True)
    starting.start()
    try:
        assert _SlowOpen.opening.wait(10)
        t0 = time.monotonic()
        r = host.run("uio1", cdbs.test_unit_ready())  # the power-on unit attention: answered
        assert r.status == 2 and time.monotonic() - t0 < 10, r
        assert starting.is_alive()  # uio0 is still being opened
    finally:
        _SlowOpen.release.set()
        starting.join(30)
        d.shutdown()


def test_stop_is_not_held_by_an_open_the_run_loop_started(host, tmp_path, monkeypatch):
    """Before: a device found by the run loop's rescan was opened on the run loop's thread,
    and a stop (SIGTERM) was not looked at until that open returned."""
    import tcmu_py.daemon.serve as serve

    monkeypatch.setattr(serve, "SHUTDOWN_SECONDS", 1.0)
    monkeypatch.setattr(serve, "RESCAN_SECONDS", 0.2)
    _SlowOpen.opening.clear()
    _SlowOpen.release.clear()
    d = make_daemon(host, tmp_path, {"slow": _SlowOpen, "null": NullHandler})
    d.start()
    running = threading.Thread(target=lambda: d.run(install_signals=False), daemon=True)
    running.start()
    try:
        host.add("uio0", 0, "gw0", "slow/x", 4 * MIB)  # made while the daemon runs
        assert _SlowOpen.opening.wait(10)
        t0 = time.monotonic()
        d.stop()
        running.join(15)
        assert not running.is_alive() and time.monotonic() - t0 < 10
    finally:
        _SlowOpen.release.set()
        running.join(30)


def test_a_close_that_hangs_holds_up_neither_the_stop_nor_another_device(host, tmp_path,
                                                                         monkeypatch):
    """Before: shutdown closed the devices one after another on its own thread, with no bound
    on a close: a handler whose close hung (its storage not answering) held the stop past its
    deadline and left the next device blocked in the kernel."""
    import tcmu_py.daemon.serve as serve

    release = threading.Event()

    class HangingClose(NullBackend):
        def close(self) -> None:
            release.wait(30)

    class HangClose(NullHandler):
        subtype = "hang"

        @classmethod
        def open(cls, config: Any) -> Any:
            return open_block_device(config, HangingClose(config.size, config.block_size))

    monkeypatch.setattr(serve, "SHUTDOWN_SECONDS", 1.0)
    host.add("uio0", 0, "a", "hang/", 4 * MIB)
    host.add("uio1", 1, "b", "null/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"hang": HangClose, "null": NullHandler})
    d.start()
    try:
        for node in ("uio0", "uio1"):
            assert host.run(node, cdbs.test_unit_ready()).status == 2  # power-on attention
        t0 = time.monotonic()
        stopping = threading.Thread(target=d.shutdown, daemon=True)
        stopping.start()
        stopping.join(15)
        assert not stopping.is_alive() and time.monotonic() - t0 < 10
        assert host.action(1, "b", "block_dev").strip() == "0"
    finally:
        release.set()


class FakeNetlink:
    """The kernel's side of TCM-USER netlink: `send` queues events (the socket turns readable);
    the daemon's answers are recorded in `replies` as (event, status), from any thread."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.lock = threading.Lock()
        self.events: list[DeviceEvent] = []
        self.replies: list[tuple[DeviceEvent, int]] = []

    def send(self, *events: DeviceEvent) -> None:
        with self.lock:
            self.events.extend(events)
        os.write(self.w, b"x")

    def fileno(self) -> int:
        return self.r

    def receive(self) -> list[DeviceEvent]:
        with contextlib.suppress(BlockingIOError):
            os.read(self.r, 512)
        with self.lock:
            out, self.events = self.events, []
        return out

    def reply(self, event: DeviceEvent, status: int = 0) -> None:
        with self.lock:
            self.replies.append((event, status))

    def answers(self, device_id: int) -> list[tuple[TcmuCmd, int]]:
        """The (command, status) answers the daemon gave for device `device_id`, in order."""
        with self.lock:
            return [(e.cmd, st) for e, st in self.replies if e.device_id == device_id]

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _event(cmd: TcmuCmd, host: Host, node: str, dev_id: int) -> DeviceEvent:
    """The kernel's `cmd` event for the device on uio `node` (its name as `Host.add` wrote it),
    whose LIO device index is `dev_id`."""
    name = (host.uio_class / node / "name").read_text().strip()
    return DeviceEvent(cmd, name, int(node.removeprefix("uio")), dev_id)


def _waits_for_replies(host: Host, hba: int, dev: str) -> None:
    """The kernel waits for our answer to this device's events (nl_reply_supported 1, as it
    is copied from the module's switch at enable once `serve` turned replies on)."""
    (host.configfs / f"user_{hba}" / dev / "attrib/nl_reply_supported").write_text("1\n")


@contextlib.contextmanager
def serving_netlink(host: Host, tmp_path: Path,
                    handlers: dict[str, Any]) -> Iterator[tuple[Daemon, FakeNetlink,
                                                                threading.Thread]]:
    """A started daemon whose run loop (on the thread yielded) reads a `FakeNetlink`; stopped
    on exit."""
    d = make_daemon(host, tmp_path, handlers)
    d.start()
    fake = FakeNetlink()
    d._netlink = fake
    running = threading.Thread(target=d.run, kwargs={"install_signals": False},
                               name="test-run", daemon=True)
    running.start()
    try:
        yield d, fake, running
    finally:
        d.stop()
        running.join(30)
        fake.close()
    assert not running.is_alive()


def test_a_netlink_added_open_that_hangs_holds_up_no_other_event(host, tmp_path, flaky):
    """Before: a device the kernel announced by netlink (ADDED_DEVICE, from inside its configfs
    `enable`) was opened on the run loop: a handler open that hung held every other device's
    events. Now it is opened on a thread of its own and answered when the open ends; a REMOVED
    of it that comes meanwhile is handled after the open (the device then not left served), and
    answered too."""
    flaky.reachable.set()
    flaky.gate.clear()  # the open of disk0 hangs
    host.add("uio1", 1, "served", "null/", 4 * MIB)
    _waits_for_replies(host, 1, "served")
    with serving_netlink(host, tmp_path, {"flaky": flaky, "null": NullHandler}) as (d, fake, _):
        try:
            host.add("uio0", 0, "disk0", "flaky/", 4 * MIB, configured=False)
            _waits_for_replies(host, 0, "disk0")
            host.add("uio2", 2, "third", "null/", 4 * MIB, configured=False)
            _waits_for_replies(host, 2, "third")
            fake.send(_event(TcmuCmd.ADDED_DEVICE, host, "uio0", 10))
            assert wait_until(lambda: flaky.opens), "the open did not begin"
            fake.send(_event(TcmuCmd.ADDED_DEVICE, host, "uio2", 12))
            assert wait_until(lambda: fake.answers(12), timeout=5), (
                "another device's ADDED_DEVICE waited for an open that hangs")
            assert fake.answers(12) == [(TcmuCmd.ADDED_DEVICE, 0)] and "uio2" in d.served
            # A REMOVED of the device being opened, then one of a served device.
            fake.send(_event(TcmuCmd.REMOVED_DEVICE, host, "uio0", 10),
                      _event(TcmuCmd.REMOVED_DEVICE, host, "uio1", 11))
            assert wait_until(lambda: fake.answers(11), timeout=5), (
                "a REMOVED_DEVICE waited for another device's open")
            assert fake.answers(11) == [(TcmuCmd.REMOVED_DEVICE, 0)] and "uio1" not in d.served
            assert fake.answers(10) == [] and "uio0" not in d.served
            flaky.gate.set()  # the open ends: answered, then removed and answered
            assert wait_until(lambda: len(fake.answers(10)) == 2), fake.answers(10)
            assert fake.answers(10) == [(TcmuCmd.ADDED_DEVICE, 0), (TcmuCmd.REMOVED_DEVICE, 0)]
            assert "uio0" not in d.served and len(flaky.opens) == 1 and len(flaky.closed) == 1
            host.run("uio2", cdbs.test_unit_ready())  # power-on UA
            assert host.run("uio2", cdbs.read10(0, 1), data_in_len=512).good
        finally:
            flaky.gate.set()


def test_stop_is_not_held_by_a_netlink_added_open_that_hangs(host, tmp_path, flaky,
                                                              monkeypatch, caplog):
    """Before: a SIGTERM during the run loop's open of a netlink-announced device was not looked
    at until the open returned. Now the daemon stops within its deadline; the open is abandoned
    (the device not served) and the kernel, which waits for the answer inside `enable`, is
    answered -EINTR before the exit — once, also when the open ends later."""
    import errno

    import tcmu_py.daemon.serve as serve

    monkeypatch.setattr(serve, "SHUTDOWN_SECONDS", 1.0)
    flaky.reachable.set()
    flaky.gate.clear()
    d = make_daemon(host, tmp_path, {"flaky": flaky})
    d.start()
    fake = FakeNetlink()
    d._netlink = fake
    running = threading.Thread(target=d.run, kwargs={"install_signals": False}, daemon=True)
    running.start()
    try:
        host.add("uio0", 0, "disk0", "flaky/", 4 * MIB, configured=False)
        _waits_for_replies(host, 0, "disk0")
        fake.send(_event(TcmuCmd.ADDED_DEVICE, host, "uio0", 10))
        assert wait_until(lambda: flaky.opens), "the open did not begin"
        t0 = time.monotonic()
        d.stop()
        running.join(15)
        # The open hangs until the gate opens (below): a stop that waited for it would
        # not return at all; 10 s is ten times the stop's deadline.
        assert not running.is_alive() and time.monotonic() - t0 < 10, "the stop waited"
        assert fake.answers(10) == [(TcmuCmd.ADDED_DEVICE, -errno.EINTR)]
        assert "uio0" not in d.served
        assert "disk0: its ADDED_DEVICE still being handled" in caplog.text
        flaky.gate.set()  # the open ends after the exit: closed, not served, not answered again
        assert wait_until(lambda: not d._handling), "the event's thread did not end"
        assert fake.answers(10) == [(TcmuCmd.ADDED_DEVICE, -errno.EINTR)]
        assert "uio0" not in d.served and len(flaky.closed) == 1
    finally:
        flaky.gate.set()
        d.stop()
        running.join(30)
        fake.close()


class _HangClose(NullHandler):
    """A null disk whose close hangs (its storage not answering) until `release` is set;
    `closing` is set once a close began."""

    subtype = "hang"
    release = threading.Event()
    closing = threading.Event()

    @classmethod
    def open(cls, config: Any) -> Any:
        release, closing = cls.release, cls.closing

        class HangingClose(NullBackend):
            def close(self) -> None:
                closing.set()
                release.wait(30)

        return open_block_device(config, HangingClose(config.size, config.block_size))


@pytest.fixture
def hang_close():
    _HangClose.release, _HangClose.closing = threading.Event(), threading.Event()
    yield _HangClose
    _HangClose.release.set()


def test_a_netlink_removal_whose_close_hangs_holds_up_no_other_event(host, tmp_path,
                                                                    hang_close, monkeypatch,
                                                                    caplog):
    """Before: a netlink REMOVED_DEVICE (`targetcli ... delete`) closed the handler on the run
    loop: a close that hung held every other device's events, and the kernel's rmdir for good.
    Now the device is retired on a thread of its own and the kernel answered once it closed or
    after REMOVE_SECONDS; the close goes on."""
    import tcmu_py.daemon.serve as serve

    monkeypatch.setattr(serve, "REMOVE_SECONDS", 0.5, raising=False)
    host.add("uio0", 0, "a", "hang/", 4 * MIB)
    host.add("uio1", 1, "b", "null/", 4 * MIB)
    for hba, dev in ((0, "a"), (1, "b")):
        _waits_for_replies(host, hba, dev)
    with serving_netlink(host, tmp_path, {"hang": hang_close, "null": NullHandler}) as (
            d, fake, _):
        try:
            for node in ("uio0", "uio1"):
                assert host.run(node, cdbs.test_unit_ready()).status == 2  # power-on attention
            fake.send(_event(TcmuCmd.REMOVED_DEVICE, host, "uio0", 20))
            assert hang_close.closing.wait(10), "the close did not begin"
            fake.send(_event(TcmuCmd.REMOVED_DEVICE, host, "uio1", 21))
            assert wait_until(lambda: fake.answers(21), timeout=5), (
                "another device's REMOVED_DEVICE waited for a close that hangs")
            assert fake.answers(21) == [(TcmuCmd.REMOVED_DEVICE, 0)] and "uio1" not in d.served
            assert wait_until(lambda: fake.answers(20), timeout=5), "the kernel waits for good"
            assert fake.answers(20) == [(TcmuCmd.REMOVED_DEVICE, 0)] and "uio0" not in d.served
            assert not hang_close.release.is_set()  # answered while the close still hangs
            assert "a: its handler is still closing" in caplog.text
        finally:
            hang_close.release.set()


def _udev_observer(d: Daemon, monkeypatch: Any) -> Callable[[str, str], None]:
    """Start `d`'s udev observer on a stand-in for pyudev; returns a function that delivers
    one udev event (action, uio node) to it as the observer's thread would."""
    import sys
    import types

    callbacks: list[Callable[[str, Any], None]] = []

    class Monitor:
        @staticmethod
        def from_netlink(context: Any) -> Monitor:
            return Monitor()

        def filter_by(self, subsystem: str) -> None:
            pass

    class MonitorObserver:
        def __init__(self, monitor: Monitor, callback: Callable[[str, Any], None],
                     name: str) -> None:
            callbacks.append(callback)

        def start(self) -> None:
            pass

        def send_stop(self) -> None:
            pass

    pyudev = types.SimpleNamespace(Context=lambda: None, Monitor=Monitor,
                                   MonitorObserver=MonitorObserver)
    monkeypatch.setitem(sys.modules, "pyudev", pyudev)
    d._start_udev()
    (callback,) = callbacks
    return lambda action, node: callback(action, types.SimpleNamespace(sys_name=node))


def test_a_udev_removal_whose_close_hangs_holds_up_no_later_udev_event(host, tmp_path,
                                                                     hang_close, monkeypatch):
    """Before: the udev observer's "remove" closed the handler on the observer's thread: a
    close that hung held every later udev event. Now the close runs on a thread of its own;
    shutdown still waits for it."""
    host.add("uio0", 0, "a", "hang/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"hang": hang_close, "null": NullHandler})
    d.start_serving()
    deliver = _udev_observer(d, monkeypatch)
    try:
        observer = threading.Thread(target=deliver, args=("remove", "uio0"),
                                    name="test-udev", daemon=True)
        observer.start()
        assert hang_close.closing.wait(10), "the close did not begin"
        observer.join(5)
        assert not observer.is_alive(), "the udev observer waits for a close that hangs"
        host.add("uio1", 1, "b", "null/", 4 * MIB)  # the next udev event
        deliver("add", "uio1")  # handled on a thread of its own
        assert wait_until(lambda: set(d.served) == {"uio1"})
    finally:
        hang_close.release.set()
        d.shutdown()
    assert not d._closing


def test_a_vanished_device_whose_close_hangs_holds_up_no_rescan(host, tmp_path, hang_close):
    """Before: a rescan (the run loop's) that found a device's uio gone closed its handler
    itself: a close that hung held the run loop (netlink, later rescans, a SIGTERM). Now the
    close runs on a thread of its own; shutdown still waits for it."""
    import shutil

    host.add("uio0", 0, "a", "hang/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"hang": hang_close})
    d.start_serving()
    try:
        shutil.rmtree(host.uio_class / "uio0")
        scanning = threading.Thread(target=d.rescan, name="test-rescan", daemon=True)
        scanning.start()
        assert hang_close.closing.wait(10), "the close did not begin"
        scanning.join(5)
        assert not scanning.is_alive(), "the rescan waits for a close that hangs"
        assert "uio0" not in d.served
    finally:
        hang_close.release.set()
        d.shutdown()
    assert not d._closing


def test_a_udev_add_whose_open_hangs_holds_up_no_later_udev_event(host, tmp_path, flaky,
                                                                  monkeypatch):
    """Before: the udev observer's "add" opened the handler on the observer's thread: an open
    that hung (a Ceph cluster not answering, a plugin handler stuck) held every later udev
    event, other devices' adds and removes. Now each is handled on a thread of its own, in
    order per uio node: a "remove" of the device being opened is carried out once the open
    ended."""
    host.add("uio2", 2, "gone", "null/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"flaky": flaky, "null": NullHandler})
    d.start_serving()
    deliver = _udev_observer(d, monkeypatch)
    flaky.reachable.set()
    flaky.gate.clear()  # the open of disk0 hangs
    try:
        host.add("uio0", 0, "disk0", "flaky/", 4 * MIB)
        observer = threading.Thread(target=deliver, args=("add", "uio0"), name="test-udev",
                                    daemon=True)
        observer.start()
        assert wait_until(lambda: flaky.opens), "the open did not begin"
        observer.join(5)
        assert not observer.is_alive(), "the udev observer waits for an open that hangs"
        host.add("uio1", 1, "other", "null/", 4 * MIB)
        deliver("add", "uio1")
        deliver("remove", "uio2")
        deliver("remove", "uio0")  # the device being opened goes: after its open
        assert wait_until(lambda: set(d.served) == {"uio1"}, timeout=5), (
            "another device's udev event waited for an open that hangs")
        assert not flaky.closed and "uio0" not in d.served
        flaky.gate.set()  # the open ends: served, then removed
        assert wait_until(lambda: len(flaky.closed) == 1 and not d._udev_handling)
        assert set(d.served) == {"uio1"} and len(flaky.opens) == 1
    finally:
        flaky.gate.set()
        d.shutdown()


@pytest.mark.parametrize("opener", ["rescan", "udev"])
def test_an_open_that_hangs_holds_up_neither_the_rescans_nor_netlink(host, tmp_path, flaky,
                                                                     monkeypatch, opener):
    """Before: the run loop's rescan waited for the opens it began, and for an open another
    thread had begun (a udev "add"): a device whose handler open hung — found by a rescan (made
    while no event announced it, or tried again after a failure) or announced by udev — held
    the run loop: every other device's netlink events (the kernel waiting for their answers
    inside configfs writes) and the later rescans. Now the run loop waits for no open, and
    later rescans leave the node to the open in progress."""
    import tcmu_py.daemon.serve as serve

    monkeypatch.setattr(serve, "RESCAN_SECONDS", 0.1)
    flaky.reachable.set()
    flaky.gate.clear()
    with serving_netlink(host, tmp_path, {"flaky": flaky, "null": NullHandler}) as (d, fake, _):
        try:
            host.add("uio0", 0, "disk0", "flaky/", 4 * MIB)  # made while the daemon runs
            if opener == "udev":
                threading.Thread(target=d._udev_event, args=("add", "uio0"),
                                 name="test-udev", daemon=True).start()
            assert wait_until(lambda: flaky.opens), "the open did not begin"
            scan = d._next_scan
            assert wait_until(lambda: d._next_scan > scan), (
                "the run loop's rescans stopped: held by an open that hangs")
            host.add("uio2", 2, "third", "null/", 4 * MIB, configured=False)
            _waits_for_replies(host, 2, "third")
            fake.send(_event(TcmuCmd.ADDED_DEVICE, host, "uio2", 12))
            assert wait_until(lambda: fake.answers(12), timeout=5), (
                "an ADDED_DEVICE waited for another device's open that hangs")
            assert fake.answers(12) == [(TcmuCmd.ADDED_DEVICE, 0)] and "uio2" in d.served
            flaky.gate.set()
            assert wait_until(lambda: "uio0" in d.served)
            assert len(flaky.opens) == 1
        finally:
            flaky.gate.set()


def test_a_netlink_event_waits_for_an_earlier_one_that_hangs_only_so_long(
        host, tmp_path, flaky, monkeypatch, caplog):
    """Before: a netlink event waited for the earlier event of its uio node without a limit —
    and so did the kernel, inside the configfs write, for its answer: an ADDED whose open hung
    and which the kernel then gave up on (`reset_netlink`) left a resize and the backstore's
    rmdir after it hanging as long. Now, after EARLIER_EVENT_SECONDS, a RECONFIG is answered
    -EBUSY (and not carried out), a REMOVED 0 (carried out once the open ended)."""
    import errno

    import tcmu_py.daemon.serve as serve

    monkeypatch.setattr(serve, "EARLIER_EVENT_SECONDS", 0.3, raising=False)
    flaky.reachable.set()
    flaky.gate.clear()
    with serving_netlink(host, tmp_path, {"flaky": flaky}) as (d, fake, _):
        try:
            host.add("uio0", 0, "disk0", "flaky/", 4 * MIB, configured=False)
            _waits_for_replies(host, 0, "disk0")
            fake.send(_event(TcmuCmd.ADDED_DEVICE, host, "uio0", 10))
            assert wait_until(lambda: flaky.opens), "the open did not begin"
            resize = _event(TcmuCmd.RECONFIG_DEVICE, host, "uio0", 10)
            fake.send(DeviceEvent(resize.cmd, resize.device, resize.minor, resize.device_id,
                                  dev_size=8 * MIB))
            assert wait_until(lambda: fake.answers(10), timeout=5), (
                "the kernel waits for the RECONFIG as long as the open hangs")
            assert fake.answers(10) == [(TcmuCmd.RECONFIG_DEVICE, -errno.EBUSY)]
            fake.send(_event(TcmuCmd.REMOVED_DEVICE, host, "uio0", 10))
            assert wait_until(lambda: len(fake.answers(10)) == 2, timeout=5), (
                "the kernel waits for the REMOVED as long as the open hangs")
            assert fake.answers(10)[1] == (TcmuCmd.REMOVED_DEVICE, 0)
            assert not flaky.gate.is_set() and "disk0: its REMOVED_DEVICE waited" in caplog.text
            flaky.gate.set()  # the open ends: ADDED answered, then the removal carried out
            assert wait_until(lambda: len(flaky.closed) == 1 and not d._handling)
            assert fake.answers(10) == [(TcmuCmd.RECONFIG_DEVICE, -errno.EBUSY),
                                        (TcmuCmd.REMOVED_DEVICE, 0), (TcmuCmd.ADDED_DEVICE, 0)]
            assert "uio0" not in d.served and "resized" not in caplog.text
        finally:
            flaky.gate.set()


def test_a_netlink_removal_waits_for_another_threads_open_only_so_long(
        host, tmp_path, flaky, monkeypatch):
    """Before: a netlink REMOVED_DEVICE of a device a udev "add" or a rescan was opening waited
    for that open without a limit, and the kernel's rmdir with it. Now it is answered after
    REMOVE_SECONDS; the removal is carried out once the open ended."""
    import tcmu_py.daemon.serve as serve

    monkeypatch.setattr(serve, "REMOVE_SECONDS", 0.3)
    flaky.reachable.set()
    flaky.gate.clear()
    with serving_netlink(host, tmp_path, {"flaky": flaky}) as (d, fake, _):
        try:
            host.add("uio0", 0, "disk0", "flaky/", 4 * MIB)
            _waits_for_replies(host, 0, "disk0")
            opener = threading.Thread(target=d.add, args=("uio0",), name="test-udev",
                                      daemon=True)
            opener.start()
            assert wait_until(lambda: flaky.opens), "the open did not begin"
            fake.send(_event(TcmuCmd.REMOVED_DEVICE, host, "uio0", 10))
            assert wait_until(lambda: fake.answers(10), timeout=5), (
                "the kernel waits for the REMOVED as long as the open hangs")
            assert fake.answers(10) == [(TcmuCmd.REMOVED_DEVICE, 0)] and not flaky.gate.is_set()
            flaky.gate.set()
            assert wait_until(lambda: len(flaky.closed) == 1), "the removal was not carried out"
            assert "uio0" not in d.served
        finally:
            flaky.gate.set()
