"""Backend capabilities: what a backend declares is exactly what the device advertises.

The first test pins, byte for byte, every page and list a capability shows in (VPD 00h/B0h/B1h/
B2h, READ CAPACITY(16), REPORT SUPPORTED OPERATION CODES, mode and log pages) for the built-in
`raw`, `null` and `thin` handlers: the typed-capability refactor of issue 12 must not change
what an initiator sees. The digests were taken on the code before the refactor.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator

import pytest

from tcmu_py.device.core import ScsiDevice
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.null import NullHandler
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.handlers.thin import ThinHandler, create_pool
from tcmu_py.testing import cdbs
from tcmu_py.testing.harness import run_command

BS = 512
BLOCKS = 256
UNIT = 16 * 1024


def _log_sense(page: int) -> bytes:
    """LOG SENSE (SPC-5 6.8, 10 bytes), current cumulative values."""
    return struct.pack(">BBBBxHHB", 0x4D, 0, 0x40 | page, 0, 0, 1024, 0)


#: (name, CDB, Data-In length) of every query whose answer depends on backend capabilities.
QUERIES: list[tuple[str, bytes, int]] = [
    ("vpd00", cdbs.inquiry(evpd=True, page_code=0x00), 255),
    ("vpdb0", cdbs.inquiry(evpd=True, page_code=0xB0), 255),
    ("vpdb1", cdbs.inquiry(evpd=True, page_code=0xB1), 255),
    ("vpdb2", cdbs.inquiry(evpd=True, page_code=0xB2), 255),
    ("rc16", cdbs.read_capacity16(), 32),
    ("rsoc", cdbs.report_supported_operation_codes(allocation_length=65535), 65535),
    (
        "rsoc_rctd",
        cdbs.report_supported_operation_codes(rctd=True, allocation_length=65535),
        65535,
    ),
    ("rsoc_unmap", cdbs.report_supported_operation_codes(1, 0x42), 64),
    ("rsoc_lbas", cdbs.report_supported_operation_codes(2, 0x9E, 0x12), 64),
    ("rsoc_ws16", cdbs.report_supported_operation_codes(1, 0x93), 64),
    ("mode_cur", cdbs.mode_sense10(0x3F, 0xFF, allocation_length=8192), 8192),
    ("mode_chg", cdbs.mode_sense10(0x3F, 0xFF, pc=1, allocation_length=8192), 8192),
    ("log00", _log_sense(0x00), 1024),
    ("log0c", _log_sense(0x0C), 1024),
]


def replies(dev: ScsiDevice) -> dict[str, str]:
    """sha256 of (status, sense, Data-In) of every query, after the power-on unit attention."""
    run_command(dev, cdbs.test_unit_ready())
    out = {}
    for name, cdb, n in QUERIES:
        r = run_command(dev, cdb, data_in_len=n)
        blob = bytes([r.status]) + bytes(r.sense) + b"|" + bytes(r.data or b"")
        out[name] = hashlib.sha256(blob).hexdigest()[:16]
    return out


@pytest.fixture
def thin_pool(tmp_path: os.PathLike[str]) -> Iterator[str]:
    path = os.path.join(tmp_path, "pool")
    create_pool(path, "fast", 64 * UNIT, 50, unit=UNIT)
    yield path


def make(kind: str, tmp_path: os.PathLike[str], pool: str) -> ScsiDevice:
    if kind == "null":
        return NullHandler.open(DeviceConfig("n0", "null", "", BLOCKS * BS))
    if kind.startswith("raw"):
        cfg = DeviceConfig(
            "r0",
            "raw",
            os.path.join(tmp_path, "r.img"),
            BLOCKS * BS,
            write_cache=kind == "raw-wc",
        )
        return RawHandler.open(cfg)
    return ThinHandler.open(DeviceConfig("t0", "thin", f"pool={pool}", 32 * UNIT))


GOLDEN: dict[str, dict[str, str]] = {
    "null": {
        "vpd00": "67b5d0b7f6069f09",
        "vpdb0": "4cd938a10d211575",
        "vpdb1": "31f3940917acbc72",
        "vpdb2": "660ee78424b71fc8",
        "rc16": "0411058998f14bf2",
        "rsoc": "edb0f0260dae390d",
        "rsoc_rctd": "630372f5a16ad7cc",
        "rsoc_unmap": "deb7b841dd8b3516",
        "rsoc_lbas": "deb7b841dd8b3516",
        "rsoc_ws16": "156ba35e28e13b21",
        "mode_cur": "7671b04040ef49dc",
        "mode_chg": "38a7b98f50e86a4e",
        "log00": "8b2755febc8cc8b6",
        "log0c": "660ee78424b71fc8",
    },
    "raw": {
        "vpd00": "67b5d0b7f6069f09",
        "vpdb0": "4cd938a10d211575",
        "vpdb1": "31f3940917acbc72",
        "vpdb2": "660ee78424b71fc8",
        "rc16": "0411058998f14bf2",
        "rsoc": "edb0f0260dae390d",
        "rsoc_rctd": "630372f5a16ad7cc",
        "rsoc_unmap": "deb7b841dd8b3516",
        "rsoc_lbas": "deb7b841dd8b3516",
        "rsoc_ws16": "156ba35e28e13b21",
        "mode_cur": "7671b04040ef49dc",
        "mode_chg": "38a7b98f50e86a4e",
        "log00": "8b2755febc8cc8b6",
        "log0c": "660ee78424b71fc8",
    },
    "raw-wc": {
        "vpd00": "67b5d0b7f6069f09",
        "vpdb0": "4cd938a10d211575",
        "vpdb1": "31f3940917acbc72",
        "vpdb2": "660ee78424b71fc8",
        "rc16": "0411058998f14bf2",
        "rsoc": "edb0f0260dae390d",
        "rsoc_rctd": "630372f5a16ad7cc",
        "rsoc_unmap": "deb7b841dd8b3516",
        "rsoc_lbas": "deb7b841dd8b3516",
        "rsoc_ws16": "156ba35e28e13b21",
        "mode_cur": "c5ddf64c0b4d45f1",
        "mode_chg": "38a7b98f50e86a4e",
        "log00": "8b2755febc8cc8b6",
        "log0c": "660ee78424b71fc8",
    },
    "thin": {
        "vpd00": "55f927c087ed934d",
        "vpdb0": "4c3f9b492fbf899f",
        "vpdb1": "31f3940917acbc72",
        "vpdb2": "1f43d07809ee9131",
        "rc16": "5b3561650a4edf23",
        "rsoc": "1ab4d035c4c1f64c",
        "rsoc_rctd": "4a08369083e00112",
        "rsoc_unmap": "695e912e18630905",
        "rsoc_lbas": "db4b840fdb61f7f1",
        "rsoc_ws16": "156ba35e28e13b21",
        "mode_cur": "1b4b0ac6c02ab194",
        "mode_chg": "94863235e75797dc",
        "log00": "afa0f12c7279dc8f",
        "log0c": "80f1325f0c6f63f3",
    },
}


@pytest.mark.parametrize("kind", ["null", "raw", "raw-wc", "thin"])
def test_advertised_bytes_are_unchanged(kind: str, tmp_path: os.PathLike[str], thin_pool: str):
    dev = make(kind, tmp_path, thin_pool)
    try:
        got = replies(dev)
    finally:
        dev.close()
    assert got == GOLDEN[kind]
