"""`serve --metrics` (Prometheus text format, read back with prometheus_client's own parser) and
`tcmu-py log-level` (the control socket's request with an argument)."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import MIB, Host, make_daemon, serving

from tcmu_py import cli
from tcmu_py.daemon.control import request
from tcmu_py.daemon.metrics import parse_address
from tcmu_py.daemon.serve import Daemon
from tcmu_py.errors import ConfigError
from tcmu_py.handlers.null import NullHandler
from tcmu_py.handlers.thin import ThinHandler, create_pool
from tcmu_py.testing import cdbs

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


@contextmanager
def served(host: Host, tmp_path: Path) -> Iterator[Daemon]:
    with serving(host, tmp_path, {"null": NullHandler, "thin": ThinHandler}) as d:
        yield d


def scrape(addr: tuple[str, int]) -> Samples:
    """GET /metrics, parsed by prometheus_client's parser (which refuses malformed text)."""
    with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_move_with_commands_and_the_histogram_is_consistent(host, tmp_path):
    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    with served(host, tmp_path) as d:
        addr = d.serve_metrics("127.0.0.1", 0)
        host.run("uio0", cdbs.test_unit_ready())  # the power-on unit attention: an error
        before = scrape(addr)
        dev = (("device", "disk0"), ("handler", "null"))
        for lba in range(5):
            assert host.run("uio0", cdbs.write10(lba, 8), data_out=bytes(4096)).good
        for lba in range(3):
            assert host.run("uio0", cdbs.read10(lba, 2), data_in_len=1024).good
        after = scrape(addr)
    assert after[("tcmu_py_write_commands_total", dev)] - before[
        ("tcmu_py_write_commands_total", dev)] == 5
    assert after[("tcmu_py_read_commands_total", dev)] - before[
        ("tcmu_py_read_commands_total", dev)] == 3
    assert after[("tcmu_py_written_bytes_total", dev)] - before[
        ("tcmu_py_written_bytes_total", dev)] == 5 * 4096
    assert after[("tcmu_py_read_bytes_total", dev)] - before[
        ("tcmu_py_read_bytes_total", dev)] == 3 * 1024
    assert after[("tcmu_py_check_conditions_total", dev)] >= 1
    assert after[("tcmu_py_device_up", dev)] == 1.0
    assert after[("tcmu_py_device_size_bytes", dev)] == 4 * MIB
    commands = after[("tcmu_py_commands_total", dev)]
    assert after[("tcmu_py_command_latency_seconds_count", dev)] == commands
    inf = after[("tcmu_py_command_latency_seconds_bucket", dev + (("le", "+Inf"),))]
    assert inf == commands
    edges = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == "tcmu_py_command_latency_seconds_bucket" and dict(labels)["le"] != "+Inf"
    )
    assert len(edges) == 32 and edges[0][0] == pytest.approx(1e-6)
    counts = [v for _, v in edges]
    assert counts == sorted(counts) and counts[-1] <= inf  # cumulative


def test_thin_pool_gauges(host, tmp_path):
    pool_dir = tmp_path / "pool"
    create_pool(str(pool_dir), "main", 64 * MIB, 50)
    host.add("uio0", 0, "t0", f"thin/pool={pool_dir};disk=t0", 16 * MIB)
    with served(host, tmp_path) as d:
        addr = d.serve_metrics("127.0.0.1", 0)
        host.run("uio0", cdbs.test_unit_ready())
        pool = (("path", str(pool_dir)), ("pool", "main"))
        assert scrape(addr)[("tcmu_py_thin_pool_used_bytes", pool)] == 0
        assert host.run("uio0", cdbs.write10(0, 128), data_out=bytes(range(256)) * 256).good
        samples = scrape(addr)
        used = d.status()["pools"][0]["used"]
    assert used > 0
    assert samples[("tcmu_py_thin_pool_capacity_bytes", pool)] == 64 * MIB
    assert samples[("tcmu_py_thin_pool_used_bytes", pool)] == used
    assert samples[("tcmu_py_thin_pool_above_threshold", pool)] == 0
    assert samples[("tcmu_py_thin_disk_used_bytes", (("disk", "t0"),) + pool)] == used


def test_dedup_pool_gauges(host, tmp_path):
    from tcmu_py.handlers.dedup import DedupHandler
    from tcmu_py.handlers.dedup import create_pool as create_dedup_pool

    pool_dir = tmp_path / "dpool"
    create_dedup_pool(str(pool_dir), "dd", 64 * MIB, 50)
    for i in range(2):
        host.add(f"uio{i}", i, f"d{i}", f"dedup/pool={pool_dir};disk=d{i}", 16 * MIB)
    with serving(host, tmp_path, {"dedup": DedupHandler}) as d:
        addr = d.serve_metrics("127.0.0.1", 0)
        block = bytes(range(256)) * 16  # one 4 KiB chunk, written to both disks
        for node in ("uio0", "uio1"):
            host.run(node, cdbs.test_unit_ready())
            assert host.run(node, cdbs.write10(0, 8), data_out=block).good
            assert host.run(node, cdbs.synchronize_cache10()).good
        samples = scrape(addr)
        (pool,) = d.status()["dedup_pools"]
    labels = (("path", str(pool_dir)), ("pool", "dd"))
    assert samples[("tcmu_py_dedup_pool_capacity_bytes", labels)] == 64 * MIB
    assert samples[("tcmu_py_dedup_pool_used_bytes", labels)] == pool["used"] > 0
    assert samples[("tcmu_py_dedup_pool_logical_bytes", labels)] == 2 * 4096
    assert samples[("tcmu_py_dedup_pool_unique_bytes", labels)] == 4096
    assert samples[("tcmu_py_dedup_pool_dedup_ratio", labels)] == 2.0
    assert samples[("tcmu_py_dedup_pool_above_threshold", labels)] == 0


class _Broken(NullHandler):
    subtype = "null"

    @classmethod
    def metrics(cls, status: Any) -> list[Any]:
        raise RuntimeError("boom")


def test_a_failing_handler_metrics_leaves_the_device_figures(host, tmp_path, caplog):
    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"null": _Broken})
    d.start()
    try:
        addr = d.serve_metrics("127.0.0.1", 0)
        samples = scrape(addr)
        assert samples[("tcmu_py_device_up", (("device", "disk0"), ("handler", "null")))] == 1
        assert "metrics failed" in caplog.text
    finally:
        d.shutdown()


def test_metrics_address_errors(host, tmp_path):
    assert parse_address("127.0.0.1:9571") == ("127.0.0.1", 9571)
    assert parse_address("[::1]:9571") == ("::1", 9571)
    assert parse_address(":9571") == ("0.0.0.0", 9571)
    for bad in ("9571", "host:", "host:port", "h:0", "h:70000"):
        with pytest.raises(ConfigError, match="--metrics: .* is not ADDR:PORT"):
            parse_address(bad)
    d = make_daemon(host, tmp_path, {})
    d.start()
    try:
        addr = d.serve_metrics("127.0.0.1", 0)
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{addr[1]}"):
            Daemon.serve_metrics(d, "127.0.0.1", addr[1])
    finally:
        d.shutdown()


def test_log_level_changes_at_runtime(host, tmp_path, capsys):
    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    root = logging.getLogger()
    saved = root.level
    run = tmp_path / "run"
    try:
        root.setLevel(logging.INFO)
        with served(host, tmp_path):
            runner_log = logging.getLogger("tcmu_py.device.runner")
            assert not runner_log.isEnabledFor(logging.DEBUG)
            assert cli.main(["log-level", "debug", "--run-dir", str(run)]) == 0
            assert "log level: debug (was info)" in capsys.readouterr().out
            assert runner_log.isEnabledFor(logging.DEBUG)
            assert request(run, "log-level loud") == {
                "error": "log-level: log level 'loud': expected one of debug, info, warning, "
                "error"}
            assert "expected 'log-level LEVEL'" in request(run, "log-level")["error"]
            assert "expected 'status'" in request(run, "status now")["error"]
            assert cli.main(["log-level", "info", "--run-dir", str(run)]) == 0
            assert not runner_log.isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved)


def test_tape_library_state_in_status_and_gauges(tmp_path):
    """A served library's state (elements full per type, cartridges, the shelf, each drive's
    cartridge) in `tcmu-py status` and as gauges."""
    from test_vtl_library import DT, ST, make_library

    from tcmu_py.daemon.metrics import families
    from tcmu_py.daemon.status import render_status
    from tcmu_py.handlers.vtl import VtlHandler

    lib = make_library(tmp_path, cartridges=3, slots=6)
    try:
        lib.media_path("ABC009L8").write_bytes(b"")  # exists, in no element
        lib.move(ST + 1, DT + 1)

        class Dev:
            library = lib

        st = {"pid": 1, "devices": [], "handlers": ["vtl"], **VtlHandler.status([Dev(), Dev()])}
        (entry,) = st["vtl_libraries"]
        assert entry["elements"]["storage"] == {"total": 6, "full": 2}
        assert entry["elements"]["drive"] == {"total": 2, "full": 1}
        assert entry["elements"]["import_export"] == {"total": 2, "full": 0}
        assert (entry["cartridges"], entry["shelf"]) == (4, 1)
        assert [d["barcode"] for d in entry["drives"]] == [None, "ABC001L8"]
        text = render_status(st, handlers={"vtl": VtlHandler})
        assert "tape libraries" in text
        assert ["test", "2/6", "0/2", "0=-,", "1=ABC001L8", "4", "1"] in [
            line.split() for line in text.splitlines()]
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families(st, {"vtl": VtlHandler}) for s in family.samples
        }
    finally:
        lib.close()
    base = (("library", "test"), ("path", str(tmp_path / "lib")))
    assert samples[("tcmu_py_vtl_elements_full", base + (("type", "storage"),))] == 2
    assert samples[("tcmu_py_vtl_elements", base + (("type", "storage"),))] == 6
    assert samples[("tcmu_py_vtl_cartridges_on_shelf", base)] == 1
    loaded = {dict(k[1])["drive"]: v for k, v in samples.items()
              if k[0] == "tcmu_py_vtl_drive_loaded"}
    assert loaded == {"0": 0.0, "1": 1.0}
    assert any(k[0] == "tcmu_py_vtl_filesystem_free_bytes" for k in samples)


class _Standby(NullHandler):
    """A device open but refusing medium access, as a standby ceph gateway is."""

    subtype = "null"

    @classmethod
    def open(cls, config: Any) -> Any:
        from tcmu_py.device.block import BlockDevice
        from tcmu_py.handlers.null import NullBackend

        class StandbyDevice(BlockDevice):
            @property
            def not_ready_reason(self) -> str | None:
                return "the exclusive lock is held by 127.0.0.1:0/3421580341"

        return StandbyDevice(config, NullBackend(config.size, config.block_size))


def test_a_device_open_but_not_ready_is_not_up(host, tmp_path):
    """Before: a standby gateway (every medium access NOT READY) showed `ok` in `tcmu-py
    status` and `tcmu_py_device_up` 1. Now its state says NOT READY and why, and it is down."""
    from tcmu_py.daemon.status import render_status

    host.add("uio0", 0, "disk0", "null/", 4 * MIB)
    d = make_daemon(host, tmp_path, {"null": _Standby})
    d.start()
    try:
        status = d.status()
        (dev,) = status["devices"]
        assert dev["not_ready"] == "the exclusive lock is held by 127.0.0.1:0/3421580341"
        assert "NOT READY: the exclusive lock is held by 127.0.0.1:0/3421580341" in render_status(
            status, handlers={})
        samples = scrape(d.serve_metrics("127.0.0.1", 0))
        assert samples[("tcmu_py_device_up", (("device", "disk0"), ("handler", "null")))] == 0
    finally:
        d.shutdown()
