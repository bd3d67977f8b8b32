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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from tcmu_py.device.block import BlockDevice, open_block_device
from tcmu_py.device.core import ScsiDevice
from tcmu_py.errors import TcmuError
from tcmu_py.handler import (
    Capabilities,
    CapabilityError,
    DeviceConfig,
    Handler,
    ProvisioningInfo,
)
from tcmu_py.handlers.null import NullHandler
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.handlers.thin import ThinHandler, create_pool
from tcmu_py.scsi.constants import ProvisioningType
from tcmu_py.testing import cdbs
from tcmu_py.testing.conformance import check_block_handler
from tcmu_py.testing.harness import run_command
from tcmu_py.testing.memory import MemoryDisk

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
        "vpd00": "056362243383d242",
        "vpdb0": "4cd938a10d211575",
        "vpdb1": "31f3940917acbc72",
        "vpdb2": "660ee78424b71fc8",
        "rc16": "0411058998f14bf2",
        "rsoc": "98e2a5415170d2b7",
        "rsoc_rctd": "5d54a8b8519ae76e",
        "rsoc_unmap": "deb7b841dd8b3516",
        "rsoc_lbas": "deb7b841dd8b3516",
        "rsoc_ws16": "156ba35e28e13b21",
        "mode_cur": "7671b04040ef49dc",
        "mode_chg": "38a7b98f50e86a4e",
        "log00": "8b2755febc8cc8b6",
        "log0c": "660ee78424b71fc8",
    },
    "raw": {
        "vpd00": "056362243383d242",
        "vpdb0": "4cd938a10d211575",
        "vpdb1": "31f3940917acbc72",
        "vpdb2": "660ee78424b71fc8",
        "rc16": "0411058998f14bf2",
        "rsoc": "98e2a5415170d2b7",
        "rsoc_rctd": "5d54a8b8519ae76e",
        "rsoc_unmap": "deb7b841dd8b3516",
        "rsoc_lbas": "deb7b841dd8b3516",
        "rsoc_ws16": "156ba35e28e13b21",
        "mode_cur": "7671b04040ef49dc",
        "mode_chg": "38a7b98f50e86a4e",
        "log00": "8b2755febc8cc8b6",
        "log0c": "660ee78424b71fc8",
    },
    "raw-wc": {
        "vpd00": "056362243383d242",
        "vpdb0": "4cd938a10d211575",
        "vpdb1": "31f3940917acbc72",
        "vpdb2": "660ee78424b71fc8",
        "rc16": "0411058998f14bf2",
        "rsoc": "98e2a5415170d2b7",
        "rsoc_rctd": "5d54a8b8519ae76e",
        "rsoc_unmap": "deb7b841dd8b3516",
        "rsoc_lbas": "deb7b841dd8b3516",
        "rsoc_ws16": "156ba35e28e13b21",
        "mode_cur": "c5ddf64c0b4d45f1",
        "mode_chg": "38a7b98f50e86a4e",
        "log00": "8b2755febc8cc8b6",
        "log0c": "660ee78424b71fc8",
    },
    "thin": {
        "vpd00": "0d1f0a90bdc51a79",
        "vpdb0": "4c3f9b492fbf899f",
        "vpdb1": "31f3940917acbc72",
        "vpdb2": "1f43d07809ee9131",
        "rc16": "5b3561650a4edf23",
        "rsoc": "ca22d300ba70107d",
        "rsoc_rctd": "1a20991108fcdbe4",
        "rsoc_unmap": "695e912e18630905",
        "rsoc_lbas": "0071cc56101d0e0f",  # D48: REPORT TYPE not evaluated
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


# --- the RAM disk of issue 12 ----------------------------------------------------------------


class RamDisk(MemoryDisk):
    """The 40-line RAM disk of issue 12, as a new user writes it: blocks in a bytearray, UNMAP
    zeroes them. It forgets to declare ``lbprz``, which `check_block_handler` must catch."""

    def __init__(self, size: int, block_size: int = BS) -> None:
        super().__init__(size, block_size)  # not blocking: a memory copy never waits

    def unmap(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)


class RamDiskHandler(Handler):
    subtype = "ramdisk"
    description = "blocks in memory"
    backend: type[RamDisk] = RamDisk

    @classmethod
    def open(cls, config: DeviceConfig) -> BlockDevice:
        return open_block_device(config, cls.backend(config.size, config.block_size))


class HonestRamDisk(RamDisk):
    lbprz = True  # the Unmap promise, declared


class LyingRamDisk(RamDisk):
    """Declares LBPRZ but keeps the data of unmapped blocks."""

    lbprz = True

    def unmap(self, offset: int, length: int) -> None:
        pass


def ramdisk(backend: type[RamDisk], blocks: int = BLOCKS) -> Callable[[], ScsiDevice]:
    class Sub(RamDiskHandler):
        pass

    Sub.backend = backend
    return lambda: Sub.open(DeviceConfig("m0", "ramdisk", "", blocks * BS))


def test_ramdisk_that_zeroes_on_unmap_without_declaring_lbprz_fails_conformance():
    with pytest.raises(AssertionError) as err:
        check_block_handler(ramdisk(RamDisk))
    assert "declare `lbprz = True` on the backend" in str(err.value)
    assert "LBPRZ=0" in str(err.value)


def test_ramdisk_declaring_lbprz_passes_conformance_and_advertises_it():
    check_block_handler(ramdisk(HonestRamDisk))
    dev = ramdisk(HonestRamDisk)()
    run_command(dev, cdbs.test_unit_ready())
    assert run_command(dev, cdbs.read_capacity16(), data_in_len=32).data[14] & 0xC0 == 0xC0
    b2 = run_command(dev, cdbs.inquiry(evpd=True, page_code=0xB2), data_in_len=64).data
    assert b2[5] == 0x80 | 0x40 | 0x20 | 0x04  # LBPU, LBPWS, LBPWS10, LBPRZ=001b


def test_backend_declaring_lbprz_falsely_fails_conformance():
    with pytest.raises(AssertionError, match="LBPRZ=1 but unmapped blocks 8 x4 do not read"):
        check_block_handler(ramdisk(LyingRamDisk))


# --- declarations that cannot be advertised -------------------------------------------------


def _with(**attrs: Any) -> RamDisk:
    backend = RamDisk(BLOCKS * BS)
    for name, value in attrs.items():
        setattr(backend, name, value)
    return backend


class Plain:
    """A backend with only the required part."""

    write_cache = False

    def __init__(self) -> None:
        self.size, self.block_size = BLOCKS * BS, BS

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            b[:] = bytes(len(b))

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        pass

    def flush(self) -> None:
        pass


def _plain(**attrs: Any) -> Plain:
    backend = Plain()
    for name, value in attrs.items():
        setattr(backend, name, value)
    return backend


@pytest.mark.parametrize(
    ("backend", "match"),
    [
        (_with(lbprz="yes"), r"RamDisk: lbprz: got 'yes' \(str\), expected bool"),
        (_with(lbprz=1), r"RamDisk: lbprz: got 1 \(int\), expected bool"),
        (_with(unmap_granularity=4096.0), r"unmap_granularity: got 4096.0 \(float\), expected int"),
        (_with(unmap_granularity=True), r"unmap_granularity: got True \(bool\), expected int"),
        (
            _with(unmap_granularity=1000),
            "unmap_granularity: got 1000, expected a positive multiple",
        ),
        (
            _with(unmap_granularity=8 * BS, unmap_granularity_alignment=8 * BS),
            "unmap_granularity_alignment: got 4096, expected a multiple of the block size 512 "
            "below unmap_granularity 4096",
        ),
        (_with(blocking="no"), r"blocking: got 'no' \(str\), expected bool"),
        (
            _plain(transfer_granularity=1000),
            "Plain: transfer_granularity: got 1000, expected 0 \\(not reported\\) or a positive "
            "multiple of the block size 512",
        ),
        (_plain(transfer_granularity=-BS), "transfer_granularity: got -512, expected 0"),
        (_with(write_cache=None), r"write_cache: got None \(NoneType\), expected bool"),
        (_with(block_size="512"), r"block_size: got '512' \(str\), expected int"),
        (_with(unmap=True), "RamDisk: unmap: got True, expected a method"),
        (_with(read=None), "RamDisk: read: missing, expected a method"),
        (_plain(lbprz=True), "Plain: lbprz: declared without Unmap"),
        (_plain(unmap_granularity=4096), "Plain: unmap_granularity: declared without Unmap"),
        (
            _plain(provisioning_type=ProvisioningType.THIN),
            "Plain: provisioning_type: declared without Unmap",
        ),
        (
            _with(provisioning_type=ProvisioningType.FULL),
            "RamDisk: provisioning_type: got <ProvisioningType.FULL: 0>, expected "
            "ProvisioningType.RESOURCE or ProvisioningType.THIN",
        ),
        (_with(provisioning_type="thin"), "RamDisk: provisioning_type: got 'thin', expected"),
        (_with(provisioning_type=True), "RamDisk: provisioning_type: got True, expected"),
        (_with(provisioning_type=3), "RamDisk: provisioning_type: got 3, expected"),
        (
            _plain(provisioning=lambda: None),
            "Plain: implements provisioning but not set_soft_threshold, take_threshold_event",
        ),
        (
            _plain(
                provisioning=lambda: None,
                set_soft_threshold=lambda p: None,
                take_threshold_event=lambda: False,
            ),
            "Plain: implements ThinProvisioning but not Unmap",
        ),
    ],
)
def test_undeclarable_backend_is_refused_at_build_naming_the_attribute(backend: Any, match: str):
    with pytest.raises(CapabilityError, match=match):
        BlockDevice(DeviceConfig("m0", "ramdisk", "", BLOCKS * BS), backend)


def test_capability_withdrawn_with_none_is_not_advertised():
    dev = BlockDevice(DeviceConfig("m0", "ramdisk", "", BLOCKS * BS), _with(unmap=None))
    assert dev.caps.unmap is None
    run_command(dev, cdbs.test_unit_ready())
    assert run_command(dev, cdbs.read_capacity16(), data_in_len=32).data[14] & 0xC0 == 0


# --- what is declared is what is advertised ----------------------------------------------------


def _listed(dev: ScsiDevice, opcode: int, sa: int | None = None) -> bool:
    cdb = cdbs.report_supported_operation_codes(1 if sa is None else 2, opcode, sa or 0)
    return run_command(dev, cdb, data_in_len=64).data[1] & 7 == 3


@pytest.mark.parametrize("unmap", [False, True])
@pytest.mark.parametrize("lbprz", [False, True])
@pytest.mark.parametrize("lba_status", [False, True])
def test_declared_capabilities_are_exactly_the_advertised_ones(unmap, lbprz, lba_status):
    attrs: dict[str, Any] = {}
    if unmap:
        attrs.update(
            unmap=lambda offset, length: None,
            lbprz=lbprz,
            unmap_granularity=8 * BS,
            unmap_granularity_alignment=2 * BS,
        )
    if lba_status:
        attrs["lba_status"] = lambda offset, length, *, max_runs: [(offset, length, 0)]
    dev = BlockDevice(DeviceConfig("p0", "plain", "", BLOCKS * BS), _plain(**attrs))
    run_command(dev, cdbs.test_unit_ready())
    rc = run_command(dev, cdbs.read_capacity16(), data_in_len=32).data
    assert bool(rc[14] & 0x80) == unmap  # LBPME
    assert bool(rc[14] & 0x40) == (unmap and lbprz)  # LBPRZ
    assert _listed(dev, 0x42) == unmap
    assert _listed(dev, 0x9E, 0x12) == lba_status
    assert _listed(dev, 0x93) and _listed(dev, 0x41)  # WRITE SAME: always served
    vpd00 = run_command(dev, cdbs.inquiry(evpd=True, page_code=0), data_in_len=255).data
    assert (0xB2 in vpd00[4:]) == unmap
    b0 = run_command(dev, cdbs.inquiry(evpd=True, page_code=0xB0), data_in_len=255).data
    max_lbas, max_descs, granule, uga = struct.unpack_from(">IIII", b0, 20)
    if unmap:
        assert max_lbas > 0 and max_descs > 0
        assert (granule, uga) == (8, 0x80000000 | 2)  # declared in bytes, advertised in blocks
        b2 = run_command(dev, cdbs.inquiry(evpd=True, page_code=0xB2), data_in_len=64).data
        assert b2[5] == 0xE0 | (0x04 if lbprz else 0)
        # SBC-4 4.7.3.1 / 6.6.4: with LBPME 1 the logical unit is resource or thin
        # provisioned; not declared: thin (before: 000b, fully provisioned, beside LBPME 1)
        assert b2[6] & 7 == 0b010
    else:
        assert (max_lbas, max_descs, granule, uga) == (0, 0, 0, 0)
        r = run_command(dev, cdbs.write_same16(0, 1, unmap=True), data_out=bytes(BS))
        assert r.sense_codes == (5, 0x24, 0)  # the UNMAP bit needs LBPWS (SBC-4 5.50)


def test_write_same_goes_to_the_backend_in_one_call():
    calls: list[tuple[int, int, bytes, bool]] = []
    backend = _plain(write_same=lambda o, n, block, unmap: calls.append((o, n, block, unmap)))
    dev = BlockDevice(DeviceConfig("p0", "plain", "", BLOCKS * BS), backend)
    run_command(dev, cdbs.test_unit_ready())
    assert run_command(dev, cdbs.write_same16(4, 100), data_out=b"\x5a" * BS).good
    assert calls == [(4 * BS, 100 * BS, b"\x5a" * BS, False)]


class ThinRamDisk(HonestRamDisk):
    """A RAM disk that also reports thin provisioning figures."""

    def provisioning(self) -> ProvisioningInfo:
        return ProvisioningInfo(capacity=self.size, used=0, device_used=0, soft_threshold=50)

    def set_soft_threshold(self, percent: int | None) -> None:
        pass

    def take_threshold_event(self) -> bool:
        return False


@pytest.mark.parametrize(("declared", "advertised"), [
    (None, ProvisioningType.THIN),
    (ProvisioningType.THIN, ProvisioningType.THIN),
    (ProvisioningType.RESOURCE, ProvisioningType.RESOURCE),
])
def test_an_unmap_backend_is_resource_or_thin_provisioned_as_it_declares(
        declared: ProvisioningType | None, advertised: ProvisioningType) -> None:
    """SBC-4 4.7.3.1 / 6.6.4: a logical unit with LBPME 1 is resource provisioned (001b) or thin
    provisioned (010b); 000b says fully provisioned, which contradicts LBPME 1 (before: 000b for
    every `Unmap` backend without `ThinProvisioning`). Thin unless the backend declares resource
    provisioning (its mapping resources stay reserved for every LBA)."""
    backend = HonestRamDisk(BLOCKS * BS)
    if declared is not None:
        backend.provisioning_type = declared  # type: ignore[attr-defined]
    dev = BlockDevice(DeviceConfig("p0", "ram", "", BLOCKS * BS), backend)
    run_command(dev, cdbs.test_unit_ready())
    assert run_command(dev, cdbs.read_capacity16(), data_in_len=32).data[14] & 0x80  # LBPME
    b2 = run_command(dev, cdbs.inquiry(evpd=True, page_code=0xB2), data_in_len=64).data
    assert b2[6] & 7 == advertised


def test_a_thin_provisioning_backend_cannot_declare_resource_provisioning() -> None:
    backend = ThinRamDisk(BLOCKS * BS)
    backend.provisioning_type = ProvisioningType.RESOURCE  # type: ignore[attr-defined]
    with pytest.raises(CapabilityError, match="ThinRamDisk: provisioning_type: got "
                       "<ProvisioningType.RESOURCE: 1> with ThinProvisioning"):
        BlockDevice(DeviceConfig("p0", "ram", "", BLOCKS * BS), backend)


def test_thin_provisioning_backend_is_advertised_as_thin():
    backend = ThinRamDisk(BLOCKS * BS)
    caps = Capabilities.of(backend)
    assert caps.provisioning_type == 2 and caps.thin is backend and caps.lbprz
    dev = BlockDevice(DeviceConfig("p0", "thin", "", BLOCKS * BS), backend)
    run_command(dev, cdbs.test_unit_ready())
    b2 = run_command(dev, cdbs.inquiry(evpd=True, page_code=0xB2), data_in_len=64).data
    assert b2[6] & 7 == 2 and b2[4] > 0  # PROVISIONING TYPE thin, THRESHOLD EXPONENT set
    assert run_command(dev, _log_sense(0x0C), data_in_len=1024).good
    check_block_handler(ramdisk(ThinRamDisk))


# --- resolved once -------------------------------------------------------------------------

OPTIONAL_NAMES = {
    "unmap",
    "lbprz",
    "unmap_granularity",
    "unmap_granularity_alignment",
    "write_same",
    "lba_status",
    "provisioning",
    "set_soft_threshold",
    "take_threshold_event",
    "provisioning_type",
    "resize",
    "close",
    "blocking",
}


class Counting(Plain):
    """Counts lookups of optional capability names (present or not)."""

    lookups: list[str]

    def __getattribute__(self, name: str) -> Any:
        if name in OPTIONAL_NAMES:
            object.__getattribute__(self, "lookups").append(name)
        return object.__getattribute__(self, name)


def test_capabilities_are_resolved_once_at_build_not_per_command():
    backend = Counting()
    backend.lookups = []
    dev = BlockDevice(DeviceConfig("p0", "plain", "", BLOCKS * BS), backend)
    assert backend.lookups  # the build looked
    backend.lookups.clear()
    run_command(dev, cdbs.test_unit_ready())
    for cdb, data_out, n in [
        (cdbs.write10(0, 1), bytes(BS), 0),
        (cdbs.read10(0, 1), b"", BS),
        (cdbs.write_same16(0, 4), b"\x01" * BS, 0),
        (cdbs.compare_and_write(0, 1), b"\x01" * BS * 2, 0),
        (cdbs.read_capacity16(), b"", 32),
        (cdbs.inquiry(evpd=True, page_code=0xB0), b"", 255),
        (cdbs.report_supported_operation_codes(), b"", 8192),
        (cdbs.mode_sense10(0x3F, 0xFF, allocation_length=8192), b"", 8192),
        (cdbs.unmap(24), cdbs.unmap_parameters([(0, 1)]), 0),
    ]:
        run_command(dev, cdb, data_out=data_out, data_in_len=n)
    assert backend.lookups == []
    backend.unmap = lambda offset, length: None  # type: ignore[attr-defined]
    assert not _listed(dev, 0x42)  # declared after the build: not advertised


def test_resize_is_refused_for_a_backend_that_is_not_resizable():
    dev = BlockDevice(DeviceConfig("p0", "plain", "", BLOCKS * BS), Plain())
    run_command(dev, cdbs.test_unit_ready())
    with pytest.raises(TcmuError, match="Plain: cannot be resized"):
        dev.resize(2 * BLOCKS * BS)
    assert dev.num_blocks == BLOCKS
    assert run_command(dev, cdbs.test_unit_ready()).good  # no CAPACITY DATA HAS CHANGED
    null = NullHandler.open(DeviceConfig("n0", "null", "", BLOCKS * BS))
    null.resize(2 * BLOCKS * BS)  # null follows any size
    assert null.num_blocks == 2 * BLOCKS
