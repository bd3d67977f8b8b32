"""ThinHandler: config strings, shared pools, and the thin disk seen through SCSI commands."""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterator

import pytest

from tcmu_py.errors import ConfigError
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.thin import (
    Pool,
    ThinBackend,
    ThinHandler,
    create_pool,
    read_pool_status,
    register_pool,
    unregister_pool,
)

UNIT = 16 * 1024
BS = 512


@pytest.fixture
def pool_dir(tmp_path: os.PathLike[str]) -> Iterator[str]:
    path = os.path.join(tmp_path, "pool")
    create_pool(path, "fast", 8 * UNIT, 50, unit=UNIT)
    register_pool("fast", path)
    yield path
    unregister_pool("fast")


def config(cfg: str, name: str = "vm1", size: int = 64 * UNIT) -> DeviceConfig:
    return DeviceConfig(name=name, subtype="thin", cfgstring=cfg, size=size, block_size=BS)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ("", "missing pool="),
        ("disk=a", "missing pool="),
        ("pool=nosuch", "declared pool name"),
        ("pool={p};size=3", "unknown key 'size'"),
        ("pool={p};unit=12345", "power of two"),
        ("pool={p};disk=../etc", "disk name"),
        ("pool={p};frob", "expected key=value"),
    ],
)
def test_check_config_errors(pool_dir: str, cfg: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ThinHandler.check_config(cfg.format(p=pool_dir))


def test_missing_pool_is_checked_at_open_not_at_check_config() -> None:
    # apply validates the whole YAML before it creates the pools it declares.
    ThinHandler.check_config("pool=/nonexistent/pool")
    with pytest.raises(ConfigError, match="pool.json"):
        ThinHandler.open(config("pool=/nonexistent/pool"))


def test_check_config_accepts_and_creates_nothing(pool_dir: str) -> None:
    before = sorted(os.listdir(pool_dir))
    for cfg in (f"pool={pool_dir}", f"pool={pool_dir};disk=a;unit=32768", "pool=fast,disk=a"):
        ThinHandler.check_config(cfg)
    assert sorted(os.listdir(pool_dir)) == before


def test_check_config_rejects_changed_unit(pool_dir: str) -> None:
    with Pool.open(pool_dir) as pool:
        pool.open_disk("a", 4 * UNIT).close()
    with pytest.raises(ConfigError, match="created with unit 16384"):
        ThinHandler.check_config(f"pool={pool_dir};disk=a;unit=65536")


def test_devices_share_the_pool(pool_dir: str) -> None:
    a = ThinHandler.open(config("pool=fast", name="a"))
    b = ThinHandler.open(config(f"pool={pool_dir};disk=other;unit=32768", name="b"))
    ba, bb = a.backend, b.backend  # type: ignore[attr-defined]
    assert isinstance(ba, ThinBackend) and isinstance(bb, ThinBackend)
    assert ba.pool is bb.pool and (ba.name, bb.name) == ("a", "other")
    assert (ba.unit, bb.unit) == (UNIT, 2 * UNIT)
    with pytest.raises(ConfigError, match="already open"):
        ThinHandler.open(config("pool=fast", name="a"))
    a.close()
    with pytest.raises(ConfigError, match="already open"):  # b still holds the pool
        Pool.open(pool_dir)
    b.close()
    Pool.open(pool_dir).close()  # the last device released it
    assert [d.name for d in read_pool_status(pool_dir).disks] == ["a", "other"]


def test_device_write_cache_follows_config(pool_dir: str) -> None:
    dev = ThinHandler.open(DeviceConfig("a", "thin", "pool=fast", 8 * UNIT, write_cache=True))
    assert dev.backend.write_cache is True  # type: ignore[attr-defined]
    dev.close()


# --------------------------------------------------------------------------------------------
# Through SCSI commands (the engine's harness)

harness = pytest.importorskip("tcmu_py.testing.harness")
cdbs = pytest.importorskip("tcmu_py.testing.cdbs")

_names = itertools.count()


def test_conformance(pool_dir: str) -> None:
    conformance = pytest.importorskip("tcmu_py.testing.conformance")
    devices = []

    def make() -> object:
        dev = ThinHandler.open(config("pool=fast", name=f"c{next(_names)}", size=4 * UNIT))
        devices.append(dev)
        return dev

    try:
        conformance.check_block_handler(make)
    finally:
        for dev in devices:
            dev.close()


def test_thin_provisioning_over_scsi(pool_dir: str) -> None:
    run = harness.run_command
    dev = ThinHandler.open(config("pool=fast", size=64 * UNIT))
    try:
        run(dev, cdbs.test_unit_ready())  # power-on unit attention
        r = run(dev, cdbs.read_capacity16(), data_in_len=32)
        assert r.good and r.data[14] & 0xC0 == 0xC0  # LBPME and LBPRZ, both true here
        bpu = UNIT // BS
        r = run(dev, cdbs.write10(0, bpu + 1), data_out=b"\x11" * (bpu + 1) * BS)
        assert r.good
        r = run(dev, cdbs.get_lba_status(1), data_in_len=4096)
        assert r.good
        descs = [struct.unpack_from(">QIB", r.data, 8 + 16 * i) for i in range(2)]
        # SBC-4 GET LBA STATUS: the first descriptor starts at the requested LBA; runs per unit.
        assert descs == [(1, 2 * bpu - 1, 0), (2 * bpu, 62 * bpu, 1)]
        params = cdbs.unmap_parameters([(0, bpu), (bpu, 1)])
        assert run(dev, cdbs.unmap(len(params)), data_out=params).good
        assert dev.backend.pool.used == 0  # type: ignore[attr-defined]
        # Fill to the soft threshold (4 of 8 units): UNIT ATTENTION 38h/07h on the next command.
        r = run(dev, cdbs.write10(0, 4 * bpu), data_out=b"\x22" * 4 * UNIT)
        assert r.good
        assert run(dev, cdbs.test_unit_ready()).sense_codes == (0x06, 0x38, 0x07)
        assert run(dev, cdbs.test_unit_ready()).good
        # Beyond the capacity: DATA PROTECT 27h/07h and nothing written.
        r = run(dev, cdbs.write10(3 * bpu, 6 * bpu), data_out=b"\x33" * 6 * UNIT)
        assert r.sense_codes == (0x07, 0x27, 0x07)
        r = run(dev, cdbs.read10(3 * bpu, 2 * bpu), data_in_len=2 * UNIT)
        assert r.data == b"\x22" * UNIT + bytes(UNIT)
        assert dev.backend.pool.used == 4 * UNIT  # type: ignore[attr-defined]
    finally:
        dev.close()
