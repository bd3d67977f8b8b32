"""Conformance checks any block handler can run: `check_block_handler(make_device)`.

They drive a fresh device through `run_command` and check what SPC-5/SBC-4 require of every disk.
They do not import pytest: call them from any test runner. On failure they raise `AssertionError`
listing every check that failed, not just the first.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from tcmu_py.device.core import ScsiDevice
from tcmu_py.scsi.constants import Status
from tcmu_py.testing import cdbs
from tcmu_py.testing.harness import Result, run_command

ILLEGAL_REQUEST = 0x05
UNIT_ATTENTION = 0x06


class _Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def sense(self, r: Result, key: int, asc: int, what: str) -> None:
        k, a, _ = r.sense_codes
        self.expect(
            r.status == Status.CHECK_CONDITION and (k, a) == (key, asc),
            f"{what}: expected CHECK CONDITION {key:X}/{asc:02X}, got {r!r}",
        )


def _well_formed(r: Result) -> bool:
    if r.status == Status.GOOD:
        return not r.sense
    if r.status == Status.CHECK_CONDITION:
        return len(r.sense) >= 8 and (r.sense[0] & 0x7F) in (0x70, 0x71, 0x72, 0x73)
    return r.status in (Status.BUSY, Status.TASK_SET_FULL, Status.TASK_ABORTED, 0x04, 0x18)


def check_any_device(make_device: Callable[[], ScsiDevice], *, seed: int = 0) -> list[str]:
    """SPC checks for any device type; returns the failures (empty when conformant)."""
    c = _Checks()
    dev = make_device()
    try:
        # SAM-5 5.14: the first command after power on reports POWER ON OCCURRED (29h/00h) ...
        r = run_command(dev, cdbs.test_unit_ready())
        c.sense(r, UNIT_ATTENTION, 0x29, "first TEST UNIT READY")
        # ... but INQUIRY never reports it (SPC-5 5.14 exemption).
        dev2 = make_device()
        try:
            r = run_command(dev2, cdbs.inquiry(), data_in_len=96)
            c.expect(r.good and len(r.data) >= 36, f"INQUIRY before the UA: {r!r}")
        finally:
            dev2.close()

        r = run_command(dev, cdbs.inquiry(), data_in_len=255)
        c.expect(r.good and len(r.data) >= 36, f"standard INQUIRY: {r!r}")
        if r.good:
            c.expect(r.data[0] & 0x1F == dev.peripheral_type, "INQUIRY peripheral device type")
            c.expect(
                r.data[4] + 5 == len(r.data) or len(r.data) == 255, "INQUIRY additional length"
            )
        r = run_command(dev, cdbs.inquiry(evpd=True, page_code=0), data_in_len=255)
        c.expect(r.good and len(r.data) >= 4, f"VPD 00h: {r!r}")
        pages = list(r.data[4 : 4 + r.data[3]]) if r.good else []
        for page in (0x00, 0x80, 0x83):
            c.expect(page in pages, f"VPD {page:02X}h listed in 00h")
        for page in pages:
            rp = run_command(dev, cdbs.inquiry(evpd=True, page_code=page), data_in_len=1024)
            c.expect(
                rp.good and rp.data[1] == page, f"VPD {page:02X}h listed but not returned: {rp!r}"
            )
        r = run_command(dev, cdbs.inquiry(evpd=True, page_code=0x7E), data_in_len=255)
        c.sense(r, ILLEGAL_REQUEST, 0x24, "INQUIRY for an absent VPD page")

        r = run_command(dev, cdbs.request_sense(), data_in_len=252)
        c.expect(r.good and len(r.data) >= 18 and r.data[0] & 0x7F == 0x70, f"REQUEST SENSE: {r!r}")

        # REPORT SUPPORTED OPERATION CODES lists exactly what executes.
        r = run_command(dev, cdbs.report_supported_operation_codes(), data_in_len=65536)
        c.expect(r.good and len(r.data) >= 4, f"REPORT SUPPORTED OPERATION CODES: {r!r}")
        listed: set[tuple[int, int | None]] = set()
        if r.good:
            (length,) = struct.unpack_from(">I", r.data)
            pos = 4
            while pos + 8 <= min(4 + length, len(r.data)):
                op, sa, flags = (
                    r.data[pos],
                    struct.unpack_from(">H", r.data, pos + 2)[0],
                    r.data[pos + 5],
                )
                listed.add((op, sa if flags & 1 else None))
                pos += 8 + (12 if flags & 2 else 0)
        for op, sa in listed:
            one = run_command(
                dev,
                cdbs.report_supported_operation_codes(
                    reporting_options=2 if sa is not None else 1,
                    requested_opcode=op,
                    requested_service_action=sa or 0,
                ),
                data_in_len=64,
            )
            c.expect(
                one.good and one.data[1] & 7 == 3, f"RSOC one-command for {op:02X}/{sa}: {one!r}"
            )
        for op in range(256):
            if any(o == op for o, _ in listed):
                continue
            cdb = bytes([op]) + bytes(15)
            r = run_command(dev, cdb, data_in_len=512)
            c.sense(r, ILLEGAL_REQUEST, 0x20, f"opcode {op:02X}h not listed by RSOC")

        # Random CDBs for every opcode: always a well-formed answer, never an escape.
        rng = random.Random(seed)
        for op in range(256):
            for _ in range(4):
                cdb = bytes([op]) + rng.randbytes(15)
                data = rng.randbytes(rng.choice((0, 8, 512)))
                r = run_command(dev, cdb, data_out=data, data_in_len=0 if data else 512)
                c.expect(_well_formed(r), f"random CDB {cdb.hex()}: malformed answer {r!r}")
    finally:
        dev.close()
    return c.failures


def _supported(dev: ScsiDevice, opcode: int, service_action: int | None = None) -> bool:
    """Whether REPORT SUPPORTED OPERATION CODES lists the command (SPC-5 6.35.3: SUPPORT 011b)."""
    r = run_command(
        dev,
        cdbs.report_supported_operation_codes(
            reporting_options=1 if service_action is None else 2,
            requested_opcode=opcode,
            requested_service_action=service_action or 0,
        ),
        data_in_len=64,
    )
    return r.good and r.data[1] & 7 == 3


def _unmapped_reads(
    c: _Checks, dev: ScsiDevice, lba: int, n: int, bs: int, lbprz: bool, rng: random.Random
) -> None:
    """Fill [lba, lba+n) with random data, UNMAP it and check what it reads against LBPRZ."""
    data = rng.randbytes(n * bs)
    w = run_command(dev, cdbs.write10(lba, n), data_out=data)
    c.expect(w.good, f"WRITE before UNMAP at {lba} x{n}: {w!r}")
    r = run_command(dev, cdbs.unmap(24), data_out=cdbs.unmap_parameters([(lba, n)]))
    c.expect(r.good, f"UNMAP {lba} x{n} with LBPME=1: {r!r}")
    got = run_command(dev, cdbs.read10(lba, n), data_in_len=n * bs)
    if not (w.good and r.good and got.good):
        return
    zeros = got.data == bytes(n * bs)
    if lbprz:
        # SBC-4 4.7.4.2 / 6.6.4: LBPRZ=1 -- an unmapped LBA reads as zeros.
        c.expect(zeros, f"LBPRZ=1 but unmapped blocks {lba} x{n} do not read as zeros")
    else:
        c.expect(
            not zeros,
            f"unmapped blocks {lba} x{n} read as zeros but the device reports LBPRZ=0: declare "
            "`lbprz = True` on the backend (tcmu_py.backend.Unmap) so initiators may rely on it",
        )


def _check_provisioning(
    c: _Checks, dev: ScsiDevice, blocks: int, bs: int, lbpme: bool, rng: random.Random
) -> None:
    """UNMAP, LBPRZ and GET LBA STATUS: the pages agree and the promises hold."""
    rc = run_command(dev, cdbs.read_capacity16(), data_in_len=32)
    lbprz = bool(rc.data[14] & 0x40) if rc.good else False
    unmap_listed = _supported(dev, 0x42)
    # SBC-4 6.6.4: LBPU=1 iff UNMAP is supported; LBPME=1 iff logical block provisioning
    # management is implemented (here: iff the backend can unmap).
    c.expect(unmap_listed == lbpme, f"LBPME={lbpme:d} but RSOC lists UNMAP: {unmap_listed}")
    c.expect(not lbprz or lbpme, "LBPRZ=1 with LBPME=0")
    b0 = run_command(dev, cdbs.inquiry(evpd=True, page_code=0xB0), data_in_len=255)
    b2 = run_command(dev, cdbs.inquiry(evpd=True, page_code=0xB2), data_in_len=255)
    granule, alignment = 1, 0
    if b0.good and len(b0.data) >= 36:
        max_unmap, _, granule, uga = struct.unpack_from(">IIII", b0.data, 20)
        # SBC-4 6.6.3: MAXIMUM UNMAP LBA COUNT 0 says UNMAP is not supported.
        c.expect(
            (max_unmap > 0) == lbpme,
            f"VPD B0h MAXIMUM UNMAP LBA COUNT {max_unmap}, LBPME={lbpme:d}",
        )
        granule = max(granule, 1)
        alignment = uga & 0x7FFFFFFF if uga & 0x80000000 else 0
    c.expect(b2.good == lbpme, f"VPD B2h answered {b2.good}, LBPME={lbpme:d}: {b2!r}")
    if b2.good and len(b2.data) >= 8:
        c.expect(bool(b2.data[5] & 0x80) == unmap_listed, "VPD B2h LBPU disagrees with RSOC")
        c.expect(bool(b2.data[5] & 0x04) == lbprz, "VPD B2h LBPRZ disagrees with READ CAPACITY(16)")
    if lbpme:
        # A range inside one granule, then whole granules where they fit.
        _unmapped_reads(c, dev, 8, 4, bs, lbprz, rng)
        start = alignment if alignment < granule else 0
        if start + granule <= min(blocks, 0xFFFF):
            _unmapped_reads(c, dev, start, granule, bs, lbprz, rng)
    else:
        r = run_command(dev, cdbs.unmap(24), data_out=cdbs.unmap_parameters([(8, 4)]))
        c.sense(r, ILLEGAL_REQUEST, 0x20, "UNMAP without LBPME")
    if _supported(dev, 0x9E, 0x12):
        w = run_command(dev, cdbs.write10(blocks - 1, 1), data_out=rng.randbytes(bs))
        r = run_command(dev, cdbs.get_lba_status(blocks - 1), data_in_len=4096)
        ok = w.good and r.good and len(r.data) >= 24
        first = struct.unpack_from(">QIB", r.data, 8) if ok else None
        # SBC-4 5.8.2: the first descriptor starts at the requested LBA; a written LBA is mapped.
        c.expect(
            first is not None and first[0] == blocks - 1 and first[1] >= 1 and first[2] & 0xF == 0,
            f"GET LBA STATUS of a just-written LBA: expected mapped from {blocks - 1}, got {first}",
        )


def check_block_handler(make_device: Callable[[], ScsiDevice], *, seed: int = 0) -> None:
    """Run the SPC checks and the SBC checks on devices from `make_device`; raise on failure.

    `make_device` must return a fresh, empty block device of at least 64 blocks each call.
    Besides the SPC/SBC rules every disk obeys, the backend's declared capabilities
    (`tcmu_py.backend`) are checked against its behaviour: LBPRZ=1 must read zeros after UNMAP,
    and a backend whose unmapped blocks read as zeros must declare ``lbprz = True``; the pages
    that advertise unmapping (READ CAPACITY(16), VPD B0h/B2h, REPORT SUPPORTED OPERATION CODES)
    must agree; a written block must be reported mapped by GET LBA STATUS.
    """
    failures = check_any_device(make_device, seed=seed)
    c = _Checks()
    c.failures = failures
    dev = make_device()
    try:
        run_command(dev, cdbs.test_unit_ready())  # consume the power-on UA
        r = run_command(dev, cdbs.read_capacity16(), data_in_len=32)
        c.expect(r.good and len(r.data) == 32, f"READ CAPACITY(16): {r!r}")
        if not r.good:
            raise AssertionError("\n".join(c.failures))
        last_lba, bs = struct.unpack_from(">QI", r.data)
        blocks = last_lba + 1
        r10 = run_command(dev, cdbs.read_capacity10(), data_in_len=8)
        c.expect(
            r10.good and struct.unpack(">II", r10.data) == (min(last_lba, 0xFFFFFFFF), bs),
            f"READ CAPACITY(10) agrees with (16): {r10!r}",
        )
        lbpme = bool(r.data[14] & 0x80)

        rng = random.Random(seed)
        for lba in (0, 1, blocks // 2, blocks - 2):
            data = rng.randbytes(2 * bs)
            for write, read in ((cdbs.write10, cdbs.read10), (cdbs.write16, cdbs.read16)):
                w = run_command(dev, write(lba, 2), data_out=data, split=3, rng=rng)
                c.expect(w.good, f"WRITE at {lba}: {w!r}")
                rd = run_command(dev, read(lba, 2), data_in_len=2 * bs, split=3, rng=rng)
                c.expect(rd.good and rd.data == data, f"READ back at {lba}: {rd!r}")
        # SBC-4 4.5: out of range, and partly out of range.
        for lba, n in ((blocks, 1), (blocks - 1, 2), (2**64 - 1, 1)):
            rd = run_command(dev, cdbs.read16(lba, n), data_in_len=n * bs)
            c.sense(rd, ILLEGAL_REQUEST, 0x21, f"READ(16) lba {lba} x{n}")
            w = run_command(dev, cdbs.write16(lba, n), data_out=bytes(n * bs))
            c.sense(w, ILLEGAL_REQUEST, 0x21, f"WRITE(16) lba {lba} x{n}")
        # Transfer length zero is not an error (SBC-4 5.16).
        c.expect(run_command(dev, cdbs.read10(0, 0)).good, "READ(10) of zero blocks")
        c.expect(run_command(dev, cdbs.write10(0, 0)).good, "WRITE(10) of zero blocks")
        c.expect(run_command(dev, cdbs.synchronize_cache10()).good, "SYNCHRONIZE CACHE(10)")
        # COMPARE AND WRITE: miscompare leaves the data alone and points at the byte.
        cur = run_command(dev, cdbs.read10(3, 1), data_in_len=bs).data
        bad = bytearray(cur)
        bad[17] ^= 0xFF
        r = run_command(dev, cdbs.compare_and_write(3, 1), data_out=bytes(bad) + bytes(bs))
        c.sense(r, 0x0E, 0x1D, "COMPARE AND WRITE miscompare")
        c.expect(r.information == 17, f"miscompare offset 17, got {r.information}")
        c.expect(
            run_command(dev, cdbs.read10(3, 1), data_in_len=bs).data == cur,
            "COMPARE AND WRITE miscompare changed data",
        )
        new = rng.randbytes(bs)
        r = run_command(dev, cdbs.compare_and_write(3, 1), data_out=cur + new)
        c.expect(
            r.good and run_command(dev, cdbs.read10(3, 1), data_in_len=bs).data == new,
            f"COMPARE AND WRITE match: {r!r}",
        )
        # WRITE SAME fills every block.
        pattern = rng.randbytes(bs)
        r = run_command(dev, cdbs.write_same16(8, 4), data_out=pattern)
        got = run_command(dev, cdbs.read10(8, 4), data_in_len=4 * bs).data
        c.expect(r.good and got == pattern * 4, f"WRITE SAME(16): {r!r}")
        # VERIFY with BYTCHK=1 compares.
        r = run_command(dev, cdbs.verify16(8, 1, bytchk=1), data_out=pattern)
        c.expect(r.good, f"VERIFY(16) BYTCHK=1 match: {r!r}")
        r = run_command(dev, cdbs.verify16(8, 1, bytchk=1), data_out=bytes(bs))
        if any(pattern):
            c.sense(r, 0x0E, 0x1D, "VERIFY(16) BYTCHK=1 mismatch")
        _check_provisioning(c, dev, blocks, bs, lbpme, rng)
    finally:
        dev.close()
    if c.failures:
        raise AssertionError("block handler conformance failures:\n  " + "\n  ".join(c.failures))
