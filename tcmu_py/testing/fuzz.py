"""Fuzz a device with generated CDBs and parameter lists, through the production ring.

Public and pytest-free like the rest of `tcmu_py.testing`: the author of a handler fuzzes it with

    report = fuzz(Target("mydisk", lambda: MyHandler.open(config)), seed=1, commands=2000)
    assert not report.escapes, report.describe()

and replays a failing case (the report prints `seed`, `start` and `index`) with `replay`.

Theory of operation
-------------------
A `Target` opens a fresh device each time it is called. `fuzz` serves the device as the daemon
does — a `DeviceRunner` looping in its own thread over a `FakeUio`, so commands travel through the
production ring code and the runner's thread pool — and plays the initiator from the calling
thread, one command at a time:

1. It learns the device through SCSI, as an initiator would (`probe`): INQUIRY, REPORT SUPPORTED
   OPERATION CODES with the CDB usage data of every command, READ CAPACITY(16) and the Block
   Limits VPD page of a disk, READ BLOCK LIMITS of a tape, the element address assignment page of
   a changer, and every mode page with its changeable mask.
2. A disk gets a known pattern written over its first `PATTERN_BLOCKS` blocks.
3. Case `i` is `generate(profile, seed, i)`: it depends on nothing else, so any case can be built
   again. Strategies: well-formed CDBs of the commands the device reports (random fields, boundary
   values of LBA, transfer and allocation lengths, element addresses), structured parameter lists
   (MODE SELECT, UNMAP, WRITE ATTRIBUTE, PERSISTENT RESERVE OUT, SEND DIAGNOSTIC, COMPARE AND WRITE,
   WRITE SAME, EXTENDED COPY, SECURITY PROTOCOL OUT, LOG SELECT, WRITE BUFFER) valid and broken,
   bit flips of well-formed CDBs (the kernel sizes a CDB by its opcode group, so a flipped opcode
   cuts or extends it), opcodes the device does not report and vendor opcodes, random bytes, and
   CDBs cut shorter than their group (these the ring cannot carry: they go to `device.execute`
   directly). The Data-Out the initiator sends is usually what the CDB announces, sometimes
   shorter, longer or empty — the kernel hands userspace whatever the initiator sent.
4. Each answer goes through the oracle below; after the run a disk's pattern is read back and the
   device must still answer TEST UNIT READY and INQUIRY.

Device state depends on the cases before, so `replay` runs a prefix of the run again on a fresh
device (`start` is where the device of the failing case was opened: a case that kills the device
ends it, and the run goes on with a fresh one).

The oracle (what counts as an escape)
-------------------------------------
- every command is completed, exactly once, within `timeout` (the fake kernel checks "exactly
  once" and every write into the data area);
- the status is one SAM-5 5.3 defines for a completed command; CONDITION MET only for PRE-FETCH,
  TASK ABORTED never (the fuzzer sends no task management functions), ACA ACTIVE never;
- CHECK CONDITION carries well-formed sense data (checked here independently of the project's own
  parser, and the project's `parse_sense` must accept it too): fixed or descriptor format, a
  defined sense key, ADDITIONAL SENSE LENGTH within the 96 bytes TCMU carries, descriptors that
  tile it exactly, a CDB field pointer inside the CDB;
- HARDWARE ERROR 44/00 (INTERNAL TARGET FAILURE) is an escape: it is the engine's answer to a
  handler exception other than `ScsiError`;
- the runner records no failure (an exception out of `ScsiDevice.execute`, answered BUSY) and its
  loop thread stays alive;
- GOOD is never the answer to a command whose Data-Out was shorter than its CDB announces, nor
  (for READ/WRITE-class data CDBs: WRITE, WRITE AND VERIFY, COMPARE AND WRITE, a tape's WRITE(6))
  longer: LIO's target_cmd_size_check rejects both for its own backstores, and TCMU hands the
  mismatch to us unchecked;
- the peak resident memory while one command runs grows by at most `memory_limit` bytes;
- pattern blocks no write could have touched read back unchanged (a write that failed with
  ILLEGAL REQUEST for its CDB must not have touched anything: SPC-5 4.4.8);
- no exception escapes the runner, the device's `close`, or the fuzzer itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tcmu_py.device.command import Command
from tcmu_py.device.core import ScsiDevice
from tcmu_py.device.runner import DeviceRunner
from tcmu_py.ring import SENSE_BUFFERSIZE, scsi_command_size
from tcmu_py.scsi.constants import PeripheralType, Status
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing.fake_kernel import FakeKernel, FakeKernelError, Pending
from tcmu_py.testing.fake_uio import FakeUio
from tcmu_py.testing.harness import _SerialisedUio

__all__ = [
    "Case",
    "Escape",
    "FuzzError",
    "FuzzReport",
    "Profile",
    "RingEscape",
    "RingFuzzReport",
    "Target",
    "builtin_targets",
    "check_sense",
    "fuzz",
    "fuzz_ring",
    "generate",
    "pattern_block",
    "probe",
    "replay",
]

#: Bytes of the fake kernel's data area: the largest Data-In or Data-Out a case may carry.
DATA_AREA = 2 * 1024 * 1024
#: Blocks of a disk written with the known pattern before the run and read back after it.
PATTERN_BLOCKS = 2048
#: Default growth of the resident set allowed while one command runs.
MEMORY_LIMIT = 32 * 1024 * 1024
#: Default growth of the resident set allowed over a whole run on one device (leaks).
LEAK_LIMIT = 256 * 1024 * 1024
#: Escapes kept (with their case) per (kind, opcode); the rest are only counted.
KEPT_ESCAPES = 50

GOOD, CHECK_CONDITION, CONDITION_MET = Status.GOOD, Status.CHECK_CONDITION, Status.CONDITION_MET
#: SAM-5 5.3: the statuses a completed command may have, by name.
STATUS_NAMES = {int(s): s.name.replace("_", " ") for s in Status}
#: SPC-5 4.4.8 table 54: defined sense keys (0Ch is obsolete).
VALID_SENSE_KEYS = frozenset(range(0x0C)) | {0x0D, 0x0E, 0x0F}

_DISK, _TAPE, _CHANGER = PeripheralType.DISK, PeripheralType.TAPE, PeripheralType.CHANGER


# ------------------------------------------------------------------------------------------------
# What the fuzzer knows about a device


@dataclass(frozen=True)
class Target:
    """A device under test. `open()` returns a fresh device each call (its own files).

    `pattern`: a disk whose blocks keep what is written (not `null`): fill the first
    `PATTERN_BLOCKS` with a known pattern and check it after the run. `workers`: the runner's pool.
    """

    name: str
    open: Callable[[], ScsiDevice]
    pattern: bool = True
    workers: int = 4


@dataclass
class Profile:
    """What `probe` learned about a device through SCSI."""

    peripheral_type: int
    #: (opcode, service action or None) -> CDB USAGE DATA (SPC-5 6.35.4), from RSOC.
    commands: dict[tuple[int, int | None], bytes] = field(default_factory=dict)
    num_blocks: int = 0
    block_size: int = 512
    max_transfer: int = 0  # blocks (VPD B0h MAXIMUM TRANSFER LENGTH; 0 = not reported)
    max_block_length: int = 0  # tape (READ BLOCK LIMITS)
    min_block_length: int = 0
    #: changer: [(first address, count)] of MT, ST, IE, DT (mode page 1Dh).
    elements: list[tuple[int, int]] = field(default_factory=list)
    #: Mode pages as MODE SENSE(10) returns them: (current bytes, changeable mask bytes).
    mode_pages: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: (density, blocks, block length) of the mode parameter block descriptor, if any.
    block_descriptor: tuple[int, int, int] | None = None
    pattern_blocks: int = 0  # disk blocks holding the known pattern (0: none)
    pattern_tag: int = 0
    #: False: REPORT SUPPORTED OPERATION CODES failed, `commands` is the fuzzer's own list.
    rsoc: bool = True

    @property
    def opcodes(self) -> set[int]:
        return {op for op, _ in self.commands}

    def pattern(self, lba: int) -> bytes:
        """The known content of pattern block `lba`."""
        return pattern_block(self.pattern_tag, lba, self.block_size)


def pattern_block(tag: int, lba: int, block_size: int) -> bytes:
    unit = struct.pack(">QQ", tag & (2**64 - 1), lba & (2**64 - 1))
    return (unit * (block_size // 16 + 1))[:block_size]


@dataclass(frozen=True)
class Case:
    """One generated command. `expected_out`: the Data-Out bytes its CDB announces (None when
    the fuzzer cannot tell); `data_cdb`: a READ/WRITE-class data CDB, where any Data-Out length
    mismatch must be refused; `direct`: run through `device.execute` (a CDB shorter than its
    opcode group, which the ring cannot carry)."""

    index: int
    strategy: str
    cdb: bytes
    data_out: bytes = b""
    data_in_len: int = 0
    expected_out: int | None = None
    data_cdb: bool = False
    direct: bool = False

    def describe(self, data_out_length: int | None = None) -> str:
        via = " (direct execute)" if self.direct else ""
        n = len(self.data_out) if data_out_length is None else data_out_length
        return (
            f"case {self.index} [{self.strategy}] cdb={self.cdb.hex()} "
            f"data_out={n}B data_in={self.data_in_len}B{via}"
        )


@dataclass(frozen=True)
class Escape:
    """One violation of the oracle. `start`: where the device of this case was opened (replay
    from there); `kind`: which rule (see the module docstring). `case` keeps at most the first
    4 KiB of its Data-Out (`replay` builds it again whole); `data_out_length` is the real size."""

    target: str
    seed: int
    start: int
    case: Case
    kind: str
    detail: str
    status: int | None = None
    sense: bytes = b""
    data_out_length: int = 0

    def __str__(self) -> str:
        return (
            f"{self.target} seed={self.seed} index={self.case.index} [{self.kind}] {self.detail}; "
            f"{self.case.describe(self.data_out_length)}; replay(target, seed={self.seed}, "
            f"index={self.case.index}, start={self.start})"
        )


@dataclass
class FuzzReport:
    target: str
    seed: int
    commands: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    senses: Counter[str] = field(default_factory=Counter)
    strategies: Counter[str] = field(default_factory=Counter)
    #: opcode -> statuses of the cases sent with it (coverage: which commands ever succeed).
    opcodes: dict[int, Counter[str]] = field(default_factory=dict)
    #: Opcodes the device reported in REPORT SUPPORTED OPERATION CODES.
    supported: list[int] = field(default_factory=list)
    #: The first `KEPT_ESCAPES` escapes of each (kind, opcode); `escape_counts` counts them all.
    escapes: list[Escape] = field(default_factory=list)
    escape_counts: Counter[tuple[str, int]] = field(default_factory=Counter)
    restarts: int = 0
    rejected_by_kernel: int = 0
    duration: float = 0.0
    max_memory_growth: int = 0

    @property
    def escape_total(self) -> int:
        return sum(self.escape_counts.values())

    def describe(self, limit: int = 5) -> str:
        lines = [
            f"{self.target}: seed {self.seed}, {self.commands} commands in {self.duration:.1f} s, "
            f"{self.escape_total} escapes, {self.restarts} restarts",
            "  statuses: " + ", ".join(f"{k} {v}" for k, v in self.statuses.most_common()),
        ]
        by_kind: Counter[str] = Counter()
        for (kind, _), n in self.escape_counts.items():
            by_kind[kind] += n
        if by_kind:
            lines.append("  escapes: " + ", ".join(f"{k} {v}" for k, v in by_kind.most_common()))
        lines += [f"  {e}" for e in self.escapes[:limit]]
        if len(self.escapes) > limit:
            lines.append(f"  ... and {len(self.escapes) - limit} more")
        return "\n".join(lines)


class FuzzError(Exception):
    """The device could not even be set up for fuzzing (probe or pattern failed)."""


# ------------------------------------------------------------------------------------------------
# The sense data check (independent of tcmu_py.scsi.sense, which it also cross-checks)


def check_sense(sense: bytes, cdb_len: int) -> str | None:
    """What is wrong with the sense data of a CHECK CONDITION, or None (SPC-5 4.4)."""
    if not sense:
        return "CHECK CONDITION without sense data"
    code = sense[0] & 0x7F
    if code not in (0x70, 0x71, 0x72, 0x73):
        return f"response code {code:02X}h is neither fixed (70h/71h) nor descriptor (72h/73h)"
    if len(sense) < 8:
        return f"sense data of {len(sense)} bytes (the header alone is 8)"
    total = 8 + sense[7]
    if total > SENSE_BUFFERSIZE:
        return (f"ADDITIONAL SENSE LENGTH {sense[7]} runs past the {SENSE_BUFFERSIZE} bytes "
                "TCMU carries")
    flags_fm = False
    sks: bytes | None = None
    if code in (0x70, 0x71):
        if total < 14:
            return f"fixed sense of {total} bytes stops before the ASC/ASCQ"
        key = sense[2] & 0x0F
        if sense[2] & 0x10:
            return "fixed sense byte 2 bit 4 (reserved) set"
        flags_fm = bool(sense[2] & 0xE0)
        asc, ascq = sense[12], sense[13]
        if total >= 18:
            sks = sense[15:18]
    else:
        key, asc, ascq = sense[1] & 0x0F, sense[2], sense[3]
        if sense[1] & 0xF0:
            return "descriptor sense byte 1 bits 7..4 (reserved) set"
        pos = 8
        while pos < total:
            if pos + 2 > total:
                return f"sense descriptor header at byte {pos} cut by ADDITIONAL SENSE LENGTH"
            dtype, dlen = sense[pos], sense[pos + 1]
            if pos + 2 + dlen > total:
                return f"sense descriptor {dtype:02X}h at byte {pos} runs past the sense data"
            body = sense[pos : pos + 2 + dlen]
            if dtype == 0x00 and (dlen != 0x0A or not body[2] & 0x80):
                return "information descriptor: length must be 0Ah and VALID one (SPC-5 4.4.2.2)"
            if dtype == 0x02:
                if dlen != 0x06:
                    return "sense key specific descriptor length must be 06h (SPC-5 4.4.2.4)"
                sks = body[4:7]
            if dtype == 0x04:
                if dlen != 0x02:
                    return "stream commands descriptor length must be 02h (SPC-5 4.4.2.6)"
                flags_fm = bool(body[3] & 0xE0)
            pos += 2 + dlen
    if key not in VALID_SENSE_KEYS:
        return f"sense key {key:X}h is not defined"
    if key == 0 and not (asc or ascq or flags_fm):
        return "CHECK CONDITION with NO SENSE and nothing to report"
    if key == 0x05 and sks is not None and sks[0] & 0x80 and sks[0] & 0x40:
        pointer = int.from_bytes(sks[1:3], "big")
        if pointer >= cdb_len:
            return f"field pointer {pointer} is outside the {cdb_len}-byte CDB"
    try:
        parse_sense(sense)
    except ValueError as exc:
        return f"tcmu_py.scsi.sense.parse_sense rejects it: {exc}"
    return None


# ------------------------------------------------------------------------------------------------
# Case generation


def _put(cdb: bytearray, off: int, size: int, value: int) -> None:
    cdb[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "big")


def _cdb(opcode: int, length: int | None = None) -> bytearray:
    cdb = bytearray(length or scsi_command_size(bytes([opcode, 0, 0, 0, 0, 0, 0, 0])))
    cdb[0] = opcode
    return cdb


@dataclass
class _Built:
    cdb: bytearray
    direction: str = "none"  # "none", "in" (Data-In) or "out" (Data-Out)
    length: int = 0  # bytes of data the CDB announces
    data: bytes | None = None  # a structured Data-Out (parameter list)
    data_cdb: bool = False
    exact: bool = True  # `length` is what the CDB really announces (the oracle may use it)


#: Disk opcodes by family.
_RW6 = {0x08: "in", 0x0A: "out"}
_RW10 = {0x28: "in", 0x2A: "out", 0x2E: "out", 0x2F: "verify", 0x34: "none", 0x35: "none"}
_RW12 = {0xA8: "in", 0xAA: "out", 0xAE: "out", 0xAF: "verify"}
_RW16 = {0x88: "in", 0x8A: "out", 0x8E: "out", 0x8F: "verify", 0x90: "none", 0x91: "none"}
_WRITE_CLASS = {0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x89}

#: Opcodes every device type is offered (supported or not): SPC-5 and commands LIO may pass.
_COMMON = [
    0x00, 0x03, 0x12, 0x15, 0x16, 0x17, 0x1A, 0x1C, 0x1D, 0x1E, 0x3B, 0x3C, 0x4C, 0x4D, 0x55,
    0x56, 0x57, 0x5A, 0x5E, 0x5F, 0x7F, 0x83, 0x84, 0xA0, 0xA2, 0xA3, 0xA4, 0xB5,
]
_DISK_OPS = [
    0x04, 0x08, 0x0A, 0x1B, 0x25, 0x28, 0x2A, 0x2E, 0x2F, 0x34, 0x35, 0x41, 0x42, 0x88, 0x89,
    0x8A, 0x8E, 0x8F, 0x90, 0x91, 0x93, 0x9E, 0xA8, 0xAA, 0xAE, 0xAF,
]
_TAPE_OPS = [
    0x01, 0x04, 0x05, 0x08, 0x0A, 0x10, 0x11, 0x13, 0x19, 0x1B, 0x2B, 0x34, 0x44, 0x82, 0x8C,
    0x8D, 0x91, 0x92, 0x93,
]
_CHANGER_OPS = [0x07, 0x1B, 0x2B, 0x37, 0xA5, 0xA6, 0xB8]
_OPS_BY_TYPE: dict[int, list[int]] = {_DISK: _DISK_OPS, _TAPE: _TAPE_OPS, _CHANGER: _CHANGER_OPS}


class _Gen:
    """Builds one case; `boundary` picks edge values instead of typical ones."""

    def __init__(self, profile: Profile, rng: random.Random, boundary: bool) -> None:
        self.p = profile
        self.rng = rng
        self.boundary = boundary

    # --- value pickers

    def _edge(self, values: Sequence[int], bits: int) -> int:
        top = (1 << bits) - 1
        v = self.rng.choice([*values, 0, 1, top, top - 1, 1 << (bits - 1)])
        return max(0, min(v, top))

    def lba(self, bits: int) -> int:
        p, r = self.p, self.rng
        n = max(p.num_blocks, 1)
        if self.boundary:
            t = max(p.max_transfer, 1)
            return self._edge([n - 1, n, n + 1, n - t, n + t, p.pattern_blocks - 1,
                               p.pattern_blocks, 1 << 32, (1 << 32) - 1], bits)
        if p.pattern_blocks and r.random() < 0.85:
            return min(r.randrange(p.pattern_blocks + 64), (1 << bits) - 1)
        return min(r.randrange(n), (1 << bits) - 1)

    def blocks(self, lba: int, bits: int) -> int:
        p, r = self.p, self.rng
        t = max(p.max_transfer, 1)
        if self.boundary:
            n = max(p.num_blocks, 1)
            return self._edge([t, t + 1, 2 * t, n - lba, n - lba + 1, n, 255, 256], bits)
        x = r.random()
        if x < 0.7:
            return r.randint(1, 8)
        if x < 0.95:
            return min(r.randint(1, t), (1 << bits) - 1)
        return 0

    def alloc(self, bits: int) -> int:
        if self.boundary:
            return self._edge([2, 3, 4, 7, 8, 12, 16, 36, 64, 255, 256, 4096, DATA_AREA], bits)
        return min(self.rng.choice([0, 8, 36, 252, 255, 512, 1024, 4096, 65535]), (1 << bits) - 1)

    def element(self) -> int:
        p, r = self.p, self.rng
        if not p.elements:
            return r.randrange(0x10000)
        if self.boundary or r.random() < 0.15:
            edges = [0, 0xFFFF]
            for first, count in p.elements:
                edges += [first - 1, first, first + count - 1, first + count]
            return max(0, min(r.choice(edges), 0xFFFF))
        first, count = r.choice([e for e in p.elements if e[1]] or p.elements)
        return first + r.randrange(max(count, 1))

    def flags(self, usage: int) -> int:
        """Random bits inside a CDB usage mask byte (mostly zero)."""
        return usage & self.rng.getrandbits(8) if self.rng.random() < 0.3 else 0

    def count(self, bits: int, signed: bool = False) -> int:
        r = self.rng
        if self.boundary:
            v = r.choice([0, 1, 2, -1, -2, (1 << (bits - 1)) - 1, -(1 << (bits - 1)), 1 << 20])
        else:
            v = r.choice([0, 1, 1, 1, 2, 3, -1, -2, r.randint(-16, 16)])
        return v if signed else abs(v)

    def bulk(self, n: int) -> bytes:
        """`n` bytes of Data-Out: a random block repeated (cheap, still distinct per case)."""
        if n <= 0:
            return b""
        unit = self.rng.randbytes(min(n, 509))
        return (unit * (n // len(unit) + 1))[:n]

    def usage(self, op: int, sa: int | None = None) -> bytes:
        return self.p.commands.get((op, sa), b"")

    # --- builders by command (return the CDB, its data direction and announced length)

    def build(self, op: int) -> _Built:
        pt = self.p.peripheral_type
        table: dict[int, Callable[[int], _Built]] = {
            0x00: lambda o: _Built(_cdb(o)),
            0x03: self._request_sense,
            0x12: self._inquiry,
            0x15: self._mode_select,
            0x55: self._mode_select,
            0x1A: self._mode_sense,
            0x5A: self._mode_sense,
            0x16: lambda o: _Built(_cdb(o)),
            0x17: lambda o: _Built(_cdb(o)),
            0x56: lambda o: _Built(_cdb(o)),
            0x57: lambda o: _Built(_cdb(o)),
            0x1C: self._receive_diagnostic,
            0x1D: self._send_diagnostic,
            0x1E: self._prevent,
            0x3B: self._write_buffer,
            0x3C: self._read_buffer,
            0x4C: self._log_select,
            0x4D: self._log_sense,
            0x5E: self._pr_in,
            0x5F: self._pr_out,
            0x7F: self._variable,
            0x83: self._extended_copy,
            0x84: self._receive_copy_results,
            0xA0: self._report_luns,
            0xA2: self._security_in,
            0xB5: self._security_out,
            0xA3: self._maintenance_in,
            0xA4: self._maintenance_out,
        }
        if pt == _TAPE:
            table.update({
                0x01: self._immed_only, 0x04: self._immed_only, 0x05: self._read_block_limits,
                0x08: self._tape_rw, 0x0A: self._tape_rw, 0x10: self._write_filemarks,
                0x11: self._space, 0x91: self._space, 0x13: self._tape_verify,
                0x19: self._immed_only, 0x1B: self._load_unload, 0x2B: self._locate,
                0x92: self._locate, 0x34: self._read_position, 0x44: self._report_density,
                0x82: self._allow_overwrite, 0x8C: self._read_attribute,
                0x8D: self._write_attribute, 0x93: self._erase16,
            })
        elif pt == _CHANGER:
            table.update({
                0x07: lambda o: _Built(_cdb(o)), 0x1B: self._open_close_ie,
                0x2B: self._position, 0x37: self._init_range, 0xA5: self._move,
                0xA6: self._exchange, 0xB8: self._read_element_status,
            })
        else:
            for o in (*_RW6, *_RW10, *_RW12, *_RW16):
                table[o] = self._disk_rw
            table.update({
                0x04: self._format_unit, 0x1B: self._start_stop, 0x25: lambda o: _Built(
                    _cdb(o), "in", 8), 0x41: self._write_same, 0x93: self._write_same,
                0x42: self._unmap, 0x89: self._compare_and_write, 0x9E: self._sa_in16,
            })
        builder = table.get(op)
        if builder is None:
            return self._generic(op)
        return builder(op)

    def _generic(self, op: int) -> _Built:
        """An opcode the fuzzer has no builder for: random bits where the CDB usage data allows,
        random data direction and length."""
        sa_keys = [sa for o, sa in self.p.commands if o == op]
        cdb = _cdb(op)
        usage = self.usage(op, self.rng.choice(sa_keys) if sa_keys else None)
        for i in range(1, len(cdb)):
            mask = usage[i] if i < len(usage) else 0xFF
            cdb[i] = mask & self.rng.getrandbits(8)
        direction = self.rng.choice(["none", "in", "out"])
        return _Built(cdb, direction, self.rng.choice([0, 8, 512, 4096]), exact=False)

    def _request_sense(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.getrandbits(1)
        cdb[4] = self.alloc(8)
        return _Built(cdb, "in", cdb[4])

    def _inquiry(self, op: int) -> _Built:
        cdb = _cdb(op)
        evpd = self.rng.random() < 0.6
        cdb[1] = int(evpd)
        if evpd or self.boundary:
            cdb[2] = self.rng.choice([0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2, 0xB3, 0xC0,
                                      self.rng.randrange(256)])
        _put(cdb, 3, 2, self.alloc(16))
        return _Built(cdb, "in", int.from_bytes(cdb[3:5], "big"))

    def _mode_sense(self, op: int) -> _Built:
        cdb = _cdb(op)
        ten = op == 0x5A
        cdb[1] = self.rng.choice([0, 0x08, 0x10, 0x18]) if ten else self.rng.choice([0, 0x08])
        pages = [pg[0][0] & 0x3F for pg in self.p.mode_pages] or [0x3F]
        page = self.rng.choice([*pages, 0x3F, 0x3F, self.rng.randrange(64)])
        cdb[2] = (self.rng.randrange(4) << 6) | page
        cdb[3] = self.rng.choice([0, 0, 0, 0xFF, self.rng.randrange(256)])
        if ten:
            _put(cdb, 7, 2, self.alloc(16))
            return _Built(cdb, "in", int.from_bytes(cdb[7:9], "big"))
        cdb[4] = self.alloc(8)
        return _Built(cdb, "in", cdb[4])

    def _plist(self, cdb: bytearray, off: int, size: int, data: bytes) -> _Built:
        """A Data-Out command whose CDB announces `len(data)` (mostly) at cdb[off:off+size]."""
        n = len(data)
        if self.boundary or self.rng.random() < 0.1:
            n = self._edge([n - 1, n + 1, n + 512, 0], 8 * size)
        _put(cdb, off, size, n)
        return _Built(cdb, "out", n, data)

    def _mode_select(self, op: int) -> _Built:
        ten = op == 0x55
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0x10, 0x10, 0x10, 0x00, 0x11, 0x01])  # PF, SP
        return self._plist(cdb, 7 if ten else 4, 2 if ten else 1, self.mode_parameters(ten))

    def mode_parameters(self, ten: bool) -> bytes:
        """SPC-5 7.5.4-7.5.6: header, block descriptors, pages; varied and broken."""
        r = self.rng
        descs = b""
        longlba = ten and r.random() < 0.1
        if self.p.block_descriptor is not None and r.random() < 0.5:
            density, blocks, length = self.p.block_descriptor
            if r.random() < 0.4:
                length = r.choice([0, 1, 512, 4096, 65536, 0xFFFFFF, r.randrange(1 << 24)])
            if r.random() < 0.2:
                density = r.randrange(256)
            if longlba:
                descs = struct.pack(">QII", blocks, 0, length)
            else:
                descs = struct.pack(">II", (density << 24) | min(blocks, 0xFFFFFF), length)
        elif r.random() < 0.05:
            descs = r.randbytes(r.choice([4, 8, 12, 16]))
        pages = bytearray()
        for _ in range(r.choice([0, 1, 1, 1, 2, 3])):
            pages += self._mode_page()
        bdl = len(descs) if r.random() < 0.9 else r.randrange(0x100)
        if ten:
            header = struct.pack(">HBBBBH", 0, 0, 0, 0x01 if longlba else 0, 0, bdl)
        else:
            header = struct.pack(">BBBB", 0, 0, 0, min(bdl, 255))
        if r.random() < 0.05:
            header = r.randbytes(len(header))
        return header + descs + bytes(pages)

    def _mode_page(self) -> bytes:
        r = self.rng
        if not self.p.mode_pages or r.random() < 0.1:
            code = r.randrange(0x3F)
            body = r.randbytes(r.choice([0, 1, 2, 6, 10, 14]))
            return bytes([code, len(body)]) + body
        current, mask = r.choice(self.p.mode_pages)
        page = bytearray(current)
        page[0] &= 0x7F  # PS is reserved in MODE SELECT (SPC-5 7.5.7)
        x = r.random()
        if x < 0.5:  # a legal change: random values in the changeable bits
            for i in range(2, len(page)):
                m = mask[i] if i < len(mask) else 0
                page[i] = (page[i] & ~m & 0xFF) | (r.getrandbits(8) & m)
        elif x < 0.7:  # change bits that are not changeable
            i = r.randrange(len(page))
            page[i] ^= 1 << r.randrange(8)
        elif x < 0.8:  # wrong page length
            lo = 3 if page[0] & 0x40 else 1
            page[lo] = r.choice([0, page[lo] + 1, max(page[lo] - 1, 0), 0xFF])
        elif x < 0.9:  # truncated
            page = page[: r.randrange(len(page))]
        else:  # PS set
            page[0] |= 0x80
        return bytes(page)

    def _log_sense(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0, 1, 2])
        cdb[2] = (self.rng.randrange(4) << 6) | self.rng.choice(
            [0x00, 0x0C, 0x0D, 0x2E, 0x31, self.rng.randrange(64)])
        cdb[3] = self.rng.choice([0, 0, 0xFF, self.rng.randrange(256)])
        _put(cdb, 5, 2, self.rng.choice([0, 0, 1, 0xFFFF]))
        _put(cdb, 7, 2, self.alloc(16))
        return _Built(cdb, "in", int.from_bytes(cdb[7:9], "big"))

    def _log_select(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 1, 2, 3])  # PCR, SP
        cdb[2] = (self.rng.randrange(4) << 6) | self.rng.randrange(64)
        params = bytearray()
        for _ in range(self.rng.randrange(3)):
            value = self.rng.randbytes(self.rng.choice([0, 1, 2, 4, 8]))
            params += struct.pack(">HBB", self.rng.randrange(0x10000), 0x03, len(value)) + value
        page = struct.pack(">BBH", cdb[2] & 0x3F, 0, len(params)) + params
        return self._plist(cdb, 7, 2, page if self.rng.random() < 0.8 else b"")

    def _receive_diagnostic(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.getrandbits(1)
        cdb[2] = self.rng.randrange(256)
        _put(cdb, 3, 2, self.alloc(16))
        return _Built(cdb, "in", int.from_bytes(cdb[3:5], "big"))

    def _send_diagnostic(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0x04, 0x10, 0x14, self.rng.randrange(256)])  # SELFTEST, PF
        body = self.rng.randbytes(self.rng.choice([0, 4, 12]))
        page = struct.pack(">BBH", self.rng.randrange(256), 0, len(body)) + body
        return self._plist(cdb, 3, 2, page if self.rng.random() < 0.7 else b"")

    def _prevent(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[4] = self.rng.choice([0, 1, 0, 1, 2, 3])
        return _Built(cdb)

    def _write_buffer(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0x02, 0x05, 0x07, 0x0A, 0x1C, self.rng.randrange(32)])
        cdb[2] = self.rng.randrange(4)
        _put(cdb, 3, 3, self.rng.choice([0, 512, self.rng.randrange(1 << 24)]))
        return self._plist(cdb, 6, 3, self.bulk(self.rng.choice([0, 16, 512, 4096])))

    def _read_buffer(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0x00, 0x02, 0x03, 0x0A, 0x1C, self.rng.randrange(32)])
        _put(cdb, 6, 3, self.alloc(24))
        return _Built(cdb, "in", int.from_bytes(cdb[6:9], "big"))

    def _pr_in(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 1, 2, 3, self.rng.randrange(32)])
        _put(cdb, 7, 2, self.alloc(16))
        return _Built(cdb, "in", int.from_bytes(cdb[7:9], "big"))

    def _pr_out(self, op: int) -> _Built:
        """SPC-5 6.16: the 24-byte basic parameter list, sometimes with TransportIDs."""
        r = self.rng
        cdb = _cdb(op)
        cdb[1] = r.choice([0, 1, 2, 3, 4, 5, 6, 7, r.randrange(32)])
        cdb[2] = r.choice([0x01, 0x03, 0x05, 0x06, 0x07, 0x08, r.randrange(256)])
        flags = r.choice([0, 0x01, 0x04, 0x08, r.randrange(16)])  # APTPL, ALL_TG_PT, SPEC_I_PT
        data = struct.pack(">QQIBBH", r.getrandbits(64), r.getrandbits(64), 0, flags, 0, 0)
        if flags & 0x08 or r.random() < 0.1:
            tids = r.randbytes(r.choice([0, 24, 40]))
            data += struct.pack(">I", len(tids)) + tids
        return self._plist(cdb, 5, 4, data)

    def _variable(self, op: int) -> _Built:
        """7Fh: 8 + ADDITIONAL CDB LENGTH bytes (the kernel sizes it from byte 7)."""
        extra = self.rng.choice([0, 1, 2, 8, 0x18, 0x18, self.rng.randrange(0x100)])
        cdb = bytearray(8 + extra)
        cdb[0] = 0x7F
        cdb[7] = extra
        for i in range(8, len(cdb)):
            cdb[i] = self.rng.getrandbits(8)
        if len(cdb) >= 10:
            _put(cdb, 8, 2, self.rng.choice([0x0009, 0x000B, 0x000C, 0x000A, 0x0800, 0xFFFF]))
        return _Built(cdb, self.rng.choice(["none", "in", "out"]), self.rng.choice([0, 512]),
                      exact=False)

    def _extended_copy(self, op: int) -> _Built:
        """SPC-4 6.4 (LID1) header: CSCD and segment descriptor lists, some inline data."""
        r = self.rng
        cdb = _cdb(op)
        cdb[1] = r.choice([0x00, 0x01, r.randrange(32)])
        cscd = b"".join(
            bytes([0xE4, 0, 0, 0]) + r.randbytes(28) for _ in range(r.choice([0, 1, 2]))
        )
        segs = b"".join(
            bytes([0x02, 0]) + struct.pack(">H", 0x18) + r.randbytes(0x18)
            for _ in range(r.choice([0, 1, 2]))
        )
        inline = r.randbytes(r.choice([0, 0, 4]))
        header = struct.pack(">BBHIII", r.randrange(256), r.randrange(256), len(cscd), len(segs),
                             len(inline), 0)[:16]
        return self._plist(cdb, 10, 4, header + cscd + segs + inline)

    def _receive_copy_results(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 1, 3, 4, self.rng.randrange(32)])
        _put(cdb, 10, 4, self.alloc(32))
        return _Built(cdb, "in", int.from_bytes(cdb[10:14], "big"))

    def _report_luns(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[2] = self.rng.choice([0, 1, 2, 0x10, 0x11, 0x12, self.rng.randrange(256)])
        _put(cdb, 6, 4, self.alloc(32))
        return _Built(cdb, "in", int.from_bytes(cdb[6:10], "big"))

    def _security_in(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0x00, 0x20, 0xEF, self.rng.randrange(256)])
        # SPC-5 7.7.1 / SSC-5 8.5.2: the pages protocols 00h and 20h define, or any
        _put(cdb, 2, 2, self.rng.choice([0x0000, 0x0001, 0x0010, 0x0020, 0x0021,
                                         self.rng.randrange(0x10000)]))
        cdb[4] = self.rng.choice([0, 0x80])
        _put(cdb, 6, 4, self.alloc(32))
        n = int.from_bytes(cdb[6:10], "big") * (512 if cdb[4] & 0x80 else 1)
        return _Built(cdb, "in", n)

    def _security_out(self, op: int) -> _Built:
        cdb = _cdb(op)
        r = self.rng
        if r.random() < 0.3:
            # SSC-5 8.5.3.2 Set Data Encryption page: scope PUBLIC or ALL I_T NEXUS, modes
            # disabled or encrypt/decrypt with a 32-byte key of algorithm 01h, or mangled.
            cdb[1], page = 0x20, 0x0010
            on = r.random() < 0.5
            body = bytes([r.choice([0x00, 0x40, 0x20, 0x41]), 0, 2 if on else 0, 2 if on else 0,
                          1, 0]) + bytes(8) + (b"\x00\x20" + r.randbytes(32) if on else b"\x00\x00")
            data = bytearray(page.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body)
            if r.random() < 0.2:
                data[r.randrange(len(data))] ^= 1 << r.randrange(8)
            _put(cdb, 2, 2, page)
            return self._plist(cdb, 6, 4, bytes(data))
        cdb[1] = r.choice([0x00, 0x20, 0xEF, r.randrange(256)])
        _put(cdb, 2, 2, r.randrange(0x10000))
        built = self._plist(cdb, 6, 4, self.bulk(r.choice([0, 16, 512])))
        if self.rng.random() < 0.1:
            cdb[4] = 0x80  # INC_512: the length counts 512-byte units
            built.length *= 512
        return built

    def _maintenance_in(self, op: int) -> _Built:
        r = self.rng
        cdb = _cdb(op)
        sa = r.choice([0x05, 0x0A, 0x0B, 0x0C, 0x0C, 0x0D, 0x0E, 0x0F, r.randrange(32)])
        cdb[1] = sa
        if sa == 0x0C:  # REPORT SUPPORTED OPERATION CODES
            cdb[2] = r.choice([0, 1, 2, 3, 0x80, 0x81, 0x83, r.randrange(256)])
            ops = sorted(self.p.opcodes) or [0]
            cdb[3] = r.choice([*ops, r.randrange(256)])
            _put(cdb, 4, 2, r.choice([0, 0x10, 0x12, r.randrange(0x10000)]))
        _put(cdb, 6, 4, self.alloc(32))
        return _Built(cdb, "in", int.from_bytes(cdb[6:10], "big"))

    def _maintenance_out(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0x06, 0x0A, 0x0E, 0x0F, self.rng.randrange(32)])
        return self._plist(cdb, 6, 4, self.rng.randbytes(self.rng.choice([0, 4, 8, 12])))

    # --- disks (SBC-4)

    def _extent(self, lba_bits: int, block_bits: int) -> tuple[int, int]:
        """(LBA, blocks) of a medium-access command; boundary cases sometimes span the whole
        device (the largest range a device must refuse or handle without holding it all)."""
        if self.boundary and self.rng.random() < 0.25:
            lba = min(self.rng.choice([0, 1, self.p.pattern_blocks]), (1 << lba_bits) - 1)
            return lba, min(max(self.p.num_blocks - lba, 0), (1 << block_bits) - 1)
        lba = self.lba(lba_bits)
        return lba, self.blocks(lba, block_bits)

    def _disk_rw(self, op: int) -> _Built:
        bs = self.p.block_size
        cdb = _cdb(op)
        usage = self.usage(op)
        if op in _RW6:
            lba, blocks = self._extent(21, 8)
            _put(cdb, 1, 3, lba)
            cdb[4] = blocks & 0xFF
            blocks = blocks or 256  # SBC-4 5.15: READ(6)/WRITE(6) TRANSFER LENGTH 0 = 256 blocks
            kind = _RW6[op]
        elif op in _RW10:
            lba, blocks = self._extent(32, 16)
            cdb[1] = self.flags(usage[1] if len(usage) > 1 else 0x1A)
            _put(cdb, 2, 4, lba)
            _put(cdb, 7, 2, blocks)
            kind = _RW10[op]
        elif op in _RW12:
            lba, blocks = self._extent(32, 32)
            cdb[1] = self.flags(usage[1] if len(usage) > 1 else 0x1A)
            _put(cdb, 2, 4, lba)
            _put(cdb, 6, 4, blocks)
            kind = _RW12[op]
        else:
            lba, blocks = self._extent(64, 32)
            cdb[1] = self.flags(usage[1] if len(usage) > 1 else 0x1A)
            _put(cdb, 2, 8, lba)
            _put(cdb, 10, 4, blocks)
            kind = _RW16[op]
        if kind == "in":
            return _Built(cdb, "in", blocks * bs)
        if kind == "out":
            return _Built(cdb, "out", blocks * bs, data_cdb=op in _WRITE_CLASS)
        if kind == "verify":
            bytchk = self.rng.choice([0, 0, 0, 1, 3] if self.boundary else [0, 0, 1, 1, 2, 3])
            cdb[1] = (cdb[1] & ~0x06 & 0xFF) | (bytchk << 1)
            if bytchk in (1, 3):
                # SBC-4 5.33: BYTCHK 01b sends the blocks, 11b one block for them all; a
                # VERIFICATION LENGTH of zero verifies nothing and transfers nothing.
                n = (blocks if bytchk == 1 else 1) * bs if blocks else 0
                return _Built(cdb, "out", n, self._known(lba, n // bs))
            return _Built(cdb)
        return _Built(cdb)

    def _known(self, lba: int, blocks: int) -> bytes | None:
        """The pattern of `blocks` blocks from `lba` (what an untouched region holds), or None
        to let the caller send random bytes."""
        if not self.p.pattern_blocks or self.rng.random() < 0.3:
            return None
        blocks = min(blocks, DATA_AREA // self.p.block_size)
        return b"".join(self.p.pattern(lba + i) for i in range(blocks))

    def _compare_and_write(self, op: int) -> _Built:
        bs = self.p.block_size
        cdb = _cdb(op)
        lba = self.lba(64)
        blocks = self.blocks(lba, 8) if self.boundary else self.rng.choice([0, 1, 1, 2, 8])
        cdb[1] = self.flags(0x18)
        _put(cdb, 2, 8, lba)
        cdb[13] = blocks & 0xFF
        verify = self._known(lba, blocks)
        data = None
        if verify is not None and len(verify) == blocks * bs:
            data = verify + self.bulk(blocks * bs)
        return _Built(cdb, "out", 2 * blocks * bs, data, data_cdb=True)

    def _write_same(self, op: int) -> _Built:
        bs = self.p.block_size
        cdb = _cdb(op)
        sixteen = op == 0x93
        lba = self.lba(64 if sixteen else 32)
        blocks = self.blocks(lba, 32 if sixteen else 16)
        if not self.boundary and self.rng.random() < 0.3:
            blocks = self.rng.choice([64, 1024, 8192])
        flags = self.rng.choice([0, 0, 0x08, 0x08, 0x10, 0x01, 0x09, 0x02])  # UNMAP ANCHOR NDOB
        if not sixteen:
            flags &= ~0x01
        cdb[1] = flags
        if sixteen:
            _put(cdb, 2, 8, lba)
            _put(cdb, 10, 4, blocks)
        else:
            _put(cdb, 2, 4, lba)
            _put(cdb, 7, 2, blocks)
        if flags & 0x01:  # NDOB: no Data-Out (SBC-4 5.50)
            return _Built(cdb)
        block = bytes(bs) if self.rng.random() < 0.4 else self.bulk(bs)
        return _Built(cdb, "out", bs, block)

    def _unmap(self, op: int) -> _Built:
        """SBC-4 5.32.2: 8-byte header + 16-byte descriptors; overlapping, huge, wrong lengths."""
        r = self.rng
        cdb = _cdb(op)
        cdb[1] = r.choice([0, 0, 0, 1])  # ANCHOR
        descs = bytearray()
        n = r.choice([0, 1, 1, 2, 3, 8]) if not self.boundary else r.choice([255, 256, 257, 300])
        for _ in range(n):
            lba = self.lba(64)
            count = self.blocks(lba, 32) if r.random() < 0.8 else r.choice([0, 0xFFFFFFFF])
            descs += struct.pack(">QI4x", lba, count)
        data_len, desc_len = 6 + len(descs), len(descs)
        x = r.random()
        if x < 0.1:
            data_len = r.randrange(0x10000)
        elif x < 0.2:
            desc_len = r.choice([desc_len - 1, desc_len + 16, 15, 0xFFFF])
        data = struct.pack(">HH4x", data_len & 0xFFFF, desc_len & 0xFFFF) + bytes(descs)
        if r.random() < 0.05:
            data = data[: r.randrange(len(data) + 1)]
        return self._plist(cdb, 7, 2, data)

    def _format_unit(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0x10, 0x18, self.rng.randrange(256)])  # FMTDATA, CMPLST
        if cdb[1] & 0x10:
            return _Built(cdb, "out", 4, struct.pack(">BBH", 0, 0x02, 0), exact=False)
        return _Built(cdb)

    def _start_stop(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.getrandbits(1)
        cdb[4] = self.rng.choice([0, 1, 2, 3, 0x10, 0x20, 0x30, 0xA0, self.rng.randrange(256)])
        return _Built(cdb)

    def _sa_in16(self, op: int) -> _Built:
        cdb = _cdb(op)
        sa = self.rng.choice([0x10, 0x10, 0x12, 0x12, 0x11, 0x13, self.rng.randrange(32)])
        cdb[1] = sa
        if sa == 0x12:
            _put(cdb, 2, 8, self.lba(64))
        _put(cdb, 10, 4, self.alloc(32))
        return _Built(cdb, "in", int.from_bytes(cdb[10:14], "big"))

    # --- tapes (SSC-5)

    def _immed_only(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0, 1, 2, 3, self.rng.randrange(256)])
        return _Built(cdb)

    def _read_block_limits(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0, 1])  # MLOI
        return _Built(cdb, "in", 20 if cdb[1] else 6, exact=False)

    def _tape_length(self) -> int:
        p, r = self.p, self.rng
        top = max(p.max_block_length, 1)
        if self.boundary:
            return self._edge([top, top + 1, p.min_block_length, 512, 65536, DATA_AREA], 24)
        return r.choice([1, 2, 80, 512, 1024, 4096, 10240, 65536, r.randint(1, 70000)])

    def _tape_rw(self, op: int) -> _Built:
        cdb = _cdb(op)
        fixed = self.rng.random() < 0.15
        sili = op == 0x08 and self.rng.random() < 0.3
        cdb[1] = int(fixed) | (int(sili) << 1)
        length = self._tape_length() if not fixed else self.rng.choice([0, 1, 2, 4])
        _put(cdb, 2, 3, length)
        if fixed:
            size = self.p.block_descriptor[2] if self.p.block_descriptor else 0
            n, exact = length * max(size, 1), False  # MODE SELECT may change the block size
        else:
            n, exact = length, True
        if op == 0x08:
            return _Built(cdb, "in", n)
        return _Built(cdb, "out", n, data_cdb=True, exact=exact)

    def _write_filemarks(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0, 1, 2, 3])
        _put(cdb, 2, 3, self.count(24))
        return _Built(cdb)

    def _space(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0, 1, 1, 2, 3, 4, 5, 8, 9, self.rng.randrange(16)])
        if op == 0x11:
            _put(cdb, 2, 3, self.count(24, signed=True))
        else:
            _put(cdb, 4, 8, self.count(64, signed=True))
            _put(cdb, 12, 2, self.rng.choice([0, 0, 0, 1]))
        return _Built(cdb)

    def _tape_verify(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0x01, 0x02, 0x03, 0x04, self.rng.randrange(256)])
        _put(cdb, 2, 3, self._tape_length())
        if cdb[1] & 0x02:  # BYTCMP: compare with the Data-Out
            n = int.from_bytes(cdb[2:5], "big")
            return _Built(cdb, "out", n, exact=not cdb[1] & 0x01)
        return _Built(cdb)

    def _load_unload(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0, 1])
        cdb[4] = self.rng.choice([1, 1, 1, 0, 2, 3, 4, 5, 8, 9, self.rng.randrange(256)])
        return _Built(cdb)

    def _locate(self, op: int) -> _Built:
        cdb = _cdb(op)
        if op == 0x2B:
            cdb[1] = self.rng.choice([0, 0, 2, 4, 6, 1])
            _put(cdb, 3, 4, abs(self.count(32)))
            cdb[8] = self.rng.choice([0, 0, 0, 1])
        else:
            cdb[1] = self.rng.choice([0, 0, 0x08, 0x10, 0x18, 2, 1])
            cdb[3] = self.rng.choice([0, 0, 0, 1])
            _put(cdb, 4, 8, abs(self.count(64)))
        return _Built(cdb)

    def _read_position(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0, 1, 6, 8, self.rng.randrange(32)])
        _put(cdb, 7, 2, self.alloc(16))
        n = int.from_bytes(cdb[7:9], "big") if cdb[1] in (6, 8) else 20
        return _Built(cdb, "in", n, exact=False)

    def _report_density(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.randrange(4)
        _put(cdb, 7, 2, self.alloc(16))
        return _Built(cdb, "in", int.from_bytes(cdb[7:9], "big"))

    def _allow_overwrite(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[2] = self.rng.choice([0, 1, 2, 3, 15])
        cdb[3] = self.rng.choice([0, 0, 1])
        _put(cdb, 4, 8, abs(self.count(64)))
        return _Built(cdb)

    def _erase16(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 1, 2, 3, 0x08, 0x0C])
        cdb[3] = self.rng.choice([0, 0, 1])
        _put(cdb, 4, 8, abs(self.count(64)))
        return _Built(cdb)

    def _read_attribute(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0, 1, 2, 3, 5, self.rng.randrange(32)])
        cdb[5] = self.rng.choice([0, 0, 0, 1])
        cdb[7] = self.rng.choice([0, 0, 0, 1])
        first = self.rng.choice([0, 0, 0x0400, 0x0800, 0x0401, self.rng.randrange(0x10000)])
        _put(cdb, 8, 2, first)
        _put(cdb, 10, 4, self.alloc(32))
        return _Built(cdb, "in", int.from_bytes(cdb[10:14], "big"))

    def _write_attribute(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0, 1])  # WTC
        cdb[5] = self.rng.choice([0, 0, 0, 1])
        cdb[7] = self.rng.choice([0, 0, 0, 1])
        return self._plist(cdb, 10, 4, self.attribute_list())

    def attribute_list(self) -> bytes:
        """SPC-5 7.4: PARAMETER DATA LENGTH + attributes (id, format, length, value)."""
        r = self.rng
        body = bytearray()
        if r.random() < 0.1:
            # A long list whose last attribute is refused: its offset is past 64 KiB.
            big = r.randrange(0xFFF8, 0x10000)
            body += struct.pack(">HBH", 0x1400, 0x00, big) + self.bulk(big)
            body += struct.pack(">HBH", 0x0000, 0x00, 8) + bytes(8)
        else:
            for _ in range(r.choice([0, 1, 1, 2, 3])):
                ident = r.choice([0x0800, 0x0801, 0x0802, 0x0803, 0x0804, 0x0805, 0x0806,
                                  0x0808, 0x080C, 0x0820, 0x1400, 0x17FF, 0x0000, 0x0401,
                                  r.randrange(0x10000)])
                fmt = r.choice([0, 1, 2, 3])
                size = r.choice([0, 1, 8, 12, 32, 33, 160, 161, r.randrange(600)])
                value = bytes(r.choice(b"ABCXYZ019 ") for _ in range(size)) if fmt else (
                    r.randbytes(size))
                body += struct.pack(">HBH", ident, fmt, size) + value
        length = len(body) if r.random() < 0.9 else r.choice([0, len(body) + 3, 0xFFFFFFFF])
        return struct.pack(">I", length & 0xFFFFFFFF) + bytes(body)

    # --- changers (SMC-3)

    def _open_close_ie(self, op: int) -> _Built:
        cdb = _cdb(op)
        _put(cdb, 2, 2, self.element())
        cdb[4] = self.rng.choice([0, 1, 2, 3, self.rng.randrange(256)])
        return _Built(cdb)

    def _position(self, op: int) -> _Built:
        cdb = _cdb(op)
        _put(cdb, 2, 2, self.element())
        _put(cdb, 4, 2, self.element())
        cdb[8] = self.rng.choice([0, 0, 1])
        return _Built(cdb)

    def _init_range(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 1, 1, 3])
        _put(cdb, 2, 2, self.element())
        _put(cdb, 6, 2, self.count(16))
        return _Built(cdb)

    def _move(self, op: int) -> _Built:
        cdb = _cdb(op)
        _put(cdb, 2, 2, self.element() if self.rng.random() < 0.3 else 0)
        _put(cdb, 4, 2, self.holder())
        _put(cdb, 6, 2, self.holder())
        cdb[10] = self.rng.choice([0, 0, 0, 1])  # INVERT
        return _Built(cdb)

    def holder(self) -> int:
        """An element that can hold a cartridge (not the transport), mostly."""
        holders = [e for e in self.p.elements[1:] if e[1]]
        if self.boundary or not holders or self.rng.random() < 0.2:
            return self.element()
        first, count = self.rng.choice(holders)
        return first + self.rng.randrange(count)

    def _exchange(self, op: int) -> _Built:
        cdb = _cdb(op)
        _put(cdb, 2, 2, self.element() if self.rng.random() < 0.3 else 0)
        source = self.holder()
        second = source if self.rng.random() < 0.5 else self.holder()
        for off, address in ((4, source), (6, self.holder()), (8, second)):
            _put(cdb, off, 2, address)
        cdb[10] = self.rng.choice([0, 0, 0, 0, 1, 2, 3])
        return _Built(cdb)

    def _read_element_status(self, op: int) -> _Built:
        cdb = _cdb(op)
        cdb[1] = self.rng.choice([0, 0x10]) | self.rng.choice([0, 0, 1, 2, 3, 4, 5, 7])
        _put(cdb, 2, 2, self.element() if self.rng.random() < 0.6 else 0)
        _put(cdb, 4, 2, self.count(16) if self.rng.random() < 0.5 else 0xFFFF)
        cdb[6] = self.rng.choice([0, 1, 2, 3])  # DVCID, CURDATA
        _put(cdb, 7, 3, self.alloc(24))
        return _Built(cdb, "in", int.from_bytes(cdb[7:10], "big"))


def _vary(rng: random.Random, n: int, boundary: bool) -> int:
    """The buffer the initiator really provides for a command announcing `n` bytes."""
    x = rng.random()
    if boundary:
        x = x * 0.6 + 0.4  # boundary cases vary the buffer more often
    if x < 0.72:
        m = n
    elif x < 0.82:
        m = rng.randrange(n) if n else rng.choice([0, 1, 512])
    elif x < 0.9:
        m = n + rng.choice([1, 7, 511, 512, 4096, rng.randrange(1, 65536)])
    elif x < 0.96:
        m = 0
    else:
        m = rng.randrange(DATA_AREA)
    return max(0, min(m, DATA_AREA))


def _finish(rng: random.Random, built: _Built, index: int, strategy: str, g: _Gen) -> Case:
    cdb = bytes(built.cdb)
    if built.direction == "in":
        return Case(index, strategy, cdb, data_in_len=_vary(rng, min(built.length, DATA_AREA),
                                                              g.boundary))
    if built.direction == "out":
        data = built.data if built.data is not None else g.bulk(min(built.length, DATA_AREA))
        n = _vary(rng, len(data), g.boundary)
        data = data[:n] if n <= len(data) else data + g.bulk(n - len(data))
        expected = built.length if built.exact else None
        return Case(index, strategy, cdb, data, 0, expected, built.data_cdb)
    # A command without data: sometimes the initiator sends data anyway.
    if rng.random() < 0.05:
        if rng.random() < 0.5:
            return Case(index, strategy, cdb, g.bulk(rng.choice([1, 512, 4096])), 0, None)
        return Case(index, strategy, cdb, data_in_len=rng.choice([1, 512, 4096]))
    return Case(index, strategy, cdb)


def _candidates(profile: Profile) -> tuple[list[int], list[int]]:
    """(opcodes the device reports, opcodes it does not report that the fuzzer knows)."""
    supported = sorted(profile.opcodes)
    known = set(_COMMON) | set(_OPS_BY_TYPE.get(profile.peripheral_type, _DISK_OPS))
    return supported, sorted(known - set(supported))


_STRATEGIES = ("valid", "boundary", "param", "mutate", "unsupported", "random", "truncated")
_WEIGHTS = (34, 20, 16, 16, 6, 4, 4)
_PARAM_OPS = {0x15, 0x55, 0x42, 0x8D, 0x5F, 0x1D, 0x89, 0x41, 0x93, 0x83, 0xB5, 0x4C, 0x3B,
              0x2F, 0xAF, 0x8F, 0xA4}


def generate(profile: Profile, seed: int, index: int) -> Case:
    """Case `index` of the run with `seed` on a device described by `profile` (pure)."""
    rng = random.Random(f"tcmu-py-fuzz:{seed}:{index}")
    strategy = rng.choices(_STRATEGIES, _WEIGHTS)[0]
    supported, unsupported = _candidates(profile)
    g = _Gen(profile, rng, boundary=strategy == "boundary")
    if strategy == "random":
        op = rng.randrange(256)
        cdb = bytearray(rng.randbytes(32))
        cdb[0] = op
        if op == 0x7F:
            cdb[7] = rng.randrange(0x19)  # 8 + ADDITIONAL CDB LENGTH <= 32
        cdb = cdb[: scsi_command_size(cdb)]
        built = _Built(cdb, rng.choice(["none", "in", "out"]), rng.choice([0, 8, 512, 4096]),
                       exact=False)
        return _finish(rng, built, index, strategy, g)
    if strategy == "unsupported":
        pool = unsupported + [rng.randrange(0xC0, 0x100)] * 4
        return _finish(rng, g.build(rng.choice(pool)), index, strategy, g)
    if strategy == "param":
        pool = [op for op in supported if op in _PARAM_OPS] or supported or unsupported
        op = rng.choice(pool)
        return _finish(rng, g.build(op), index, strategy, g)
    op = rng.choice(supported or unsupported)
    built = g.build(op)
    if strategy in ("valid", "boundary"):
        return _finish(rng, built, index, strategy, g)
    if strategy == "truncated":
        whole = bytes(built.cdb)
        cut = whole[: rng.randrange(1, len(whole))] if len(whole) > 1 else whole
        case = _finish(rng, built, index, strategy, g)
        return Case(index, strategy, cut, case.data_out, case.data_in_len, None, False, True)
    # mutate: flip bits of a well-formed CDB; the kernel sizes the result by its opcode group.
    cdb = bytearray(built.cdb)
    for _ in range(rng.choice([1, 1, 2, 3])):
        i = rng.randrange(len(cdb)) if rng.random() < 0.85 else 0
        cdb[i] ^= 1 << rng.randrange(8)
    size = scsi_command_size(cdb) if len(cdb) > 7 or cdb[0] != 0x7F else 8
    cdb = cdb[:size] if len(cdb) >= size else cdb + bytes(size - len(cdb))
    if cdb[0] == 0x7F and len(cdb) != 8 + cdb[7]:
        cdb = cdb[:8] + bytes(cdb[7])
    # The flipped bits may sit in a length field: what the CDB announces is no longer known.
    built.cdb, built.exact, built.data_cdb = cdb, False, False
    return _finish(rng, built, index, strategy, g)


# ------------------------------------------------------------------------------------------------
# Memory watch: the peak resident set while one command runs (Linux /proc)


class _MemoryWatch:
    """Resets the kernel's peak-RSS mark (``clear_refs`` 5) and reads it back (``VmHWM``)."""

    def __init__(self) -> None:
        self._clear: int | None = None
        self._status: int | None = None
        with contextlib.suppress(OSError):
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
            self._status = os.open("/proc/self/status", os.O_RDONLY)
            self.reset()

    @property
    def available(self) -> bool:
        return self._status is not None

    def reset(self) -> int:
        """Start a new peak window; returns the resident set now (bytes)."""
        if self._clear is None or self._status is None:
            return 0
        os.write(self._clear, b"5")
        return self.peak()

    def peak(self) -> int:
        """The largest resident set since `reset` (bytes)."""
        return self._field(b"VmHWM:")

    def current(self) -> int:
        """The resident set now (bytes)."""
        return self._field(b"VmRSS:")

    def _field(self, name: bytes) -> int:
        if self._status is None:
            return 0
        data = os.pread(self._status, 8192, 0)
        i = data.find(name)
        return int(data[i + len(name) : data.index(b"kB", i)]) * 1024 if i >= 0 else 0

    def close(self) -> None:
        for fd in (self._clear, self._status):
            if fd is not None:
                os.close(fd)
        self._clear = self._status = None


# ------------------------------------------------------------------------------------------------
# Serving the device: the runner's loop in its own thread, the initiator on the caller's


class _LogCapture(logging.Handler):
    """Keeps the last error logged with a traceback (the engine logs handler exceptions)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            self.last = f"{type(exc).__name__}: {exc}"

    def take(self) -> str | None:
        last, self.last = self.last, None
        return last


@contextlib.contextmanager
def _captured_errors() -> Iterator[_LogCapture]:
    handler = _LogCapture()
    logger = logging.getLogger("tcmu_py")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class _Session:
    """One device served by a DeviceRunner thread over a FakeKernel."""

    def __init__(self, target: Target) -> None:
        self.device = target.open()
        self.kernel = FakeKernel(data_size=DATA_AREA)
        self.cond = threading.Condition()
        self.uio = _SerialisedUio(FakeUio(self.kernel), self.cond)
        # Stage 1 (the plane in this thread's dequeue): the fuzzer steps the runner wake-up by
        # wake-up; the native loop's answers are held to the same by tests/unit/test_dataplane.py.
        self.runner = DeviceRunner(self.uio, self.device, workers=target.workers, name=target.name,
                                   native=False)
        self.loop_error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=f"fuzz-{target.name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:  # noqa: BLE001 - recorded: the oracle reports it
            self.loop_error = exc

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def send(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0,
             timeout: float = 10.0) -> Pending:
        """Submit one command and wait (bounded) for the fake kernel to reap it.
        Raises ValueError when the kernel itself would refuse the command."""
        with self.cond:
            p = self.kernel.submit(cdb, data_out, data_in_len)
        self.wait([p], timeout)
        return p

    def submit(self, case: Case) -> Pending:
        with self.cond:
            return self.kernel.submit(case.cdb, case.data_out, case.data_in_len)

    def wait(self, pending: Sequence[Pending], timeout: float) -> None:
        """Until every one of `pending` is reaped, the loop dies, the ring breaks or `timeout`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(p.done for p in pending) and self.thread.is_alive() and (
                not self.kernel.broken
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.05))

    def direct(self, case: Case, timeout: float) -> tuple[int, bytes]:
        """Run `case` through `device.execute` (no ring); (status, sense)."""
        buf = bytearray(case.data_out) if case.data_out else bytearray(case.data_in_len)
        cmd = Command(case.cdb, [memoryview(buf)] if buf else [])
        resp: Any = self.device.execute(cmd)
        if isinstance(resp, Future):
            resp = resp.result(timeout=timeout)
        return resp.status, resp.sense

    def close(self, timeout: float = 10.0) -> list[str]:
        """Stop the runner, check the ring is idle, close the device; problems found."""
        problems: list[str] = []
        self.runner.stop()
        self.thread.join(timeout)
        if self.thread.is_alive():
            problems.append(f"the runner loop did not stop within {timeout} s")
            return problems
        try:
            with self.cond:
                self.runner.process()
                self.kernel.assert_idle()
        except FakeKernelError as exc:
            problems.append(f"ring not idle after the run: {exc}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"final ring pass raised {type(exc).__name__}: {exc}")
        try:
            self.runner.close()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"closing the device raised {type(exc).__name__}: {exc}")
        self.uio.close()
        return problems

    def abandon(self) -> None:
        """Best-effort teardown of a session whose runner died or hangs."""
        self.runner.stop()
        self.thread.join(2.0)
        with contextlib.suppress(Exception):
            self.runner.close()
        with contextlib.suppress(Exception):
            self.uio.close()


# ------------------------------------------------------------------------------------------------
# Probing


def probe(send: Callable[[bytes, bytes, int], Pending]) -> Profile:
    """Learn a device through SCSI (see the module docstring). Raises FuzzError."""
    def good(cdb: bytes, n: int) -> bytes:
        p = send(cdb, b"", n)
        if p.status != GOOD:
            raise FuzzError(f"probe {cdb.hex()}: status {p.status}, sense {p.sense.hex()}")
        return p.data_in

    std = good(bytes([0x12, 0, 0, 0, 96, 0]), 96)
    profile = Profile(peripheral_type=std[0] & 0x1F)
    p = send(struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0, 0, 0, 65536, 0, 0), b"", 65536)
    if p.status == GOOD and len(p.data_in) >= 4:
        data = p.data_in
        end = min(len(data), 4 + int.from_bytes(data[:4], "big"))
        pos = 4
        while pos + 8 <= end:
            op, sa, flags = data[pos], int.from_bytes(data[pos + 2 : pos + 4], "big"), data[pos + 5]
            key = (op, sa if flags & 0x01 else None)
            pos += 8 + (12 if flags & 0x02 else 0)
            one = send(struct.pack(">BBBBHIBB", 0xA3, 0x0C, 3, op, sa, 512, 0, 0), b"", 512)
            usage = b""
            if one.status == GOOD and len(one.data_in) >= 4:
                n = int.from_bytes(one.data_in[2:4], "big")
                usage = one.data_in[4 : 4 + n]
            profile.commands[key] = usage
    pt = profile.peripheral_type
    if not profile.commands:
        # No REPORT SUPPORTED OPERATION CODES: take every command the fuzzer knows for the type
        # as a candidate (the device answers INVALID COMMAND OPERATION CODE for the others).
        ops = set(_COMMON) | set(_OPS_BY_TYPE.get(pt, _DISK_OPS))
        profile.commands = {(op, None): b"" for op in sorted(ops)}
        profile.rsoc = False
    if pt in (_DISK, 0x0E, 0x14):
        rc = good(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), 32)
        profile.num_blocks = int.from_bytes(rc[0:8], "big") + 1
        profile.block_size = int.from_bytes(rc[8:12], "big")
        b0 = send(bytes([0x12, 1, 0xB0, 0, 64, 0]), b"", 64)
        if b0.status == GOOD and len(b0.data_in) >= 12:
            profile.max_transfer = int.from_bytes(b0.data_in[8:12], "big")
    elif pt == _TAPE:
        rbl = send(bytes([0x05, 0, 0, 0, 0, 0]), b"", 6)
        if rbl.status == GOOD and len(rbl.data_in) >= 6:
            profile.max_block_length = int.from_bytes(rbl.data_in[1:4], "big")
            profile.min_block_length = int.from_bytes(rbl.data_in[4:6], "big")
    # MODE SENSE(10), all pages and subpages: current values, then the changeable masks.
    cur = send(struct.pack(">BBBB3xHB", 0x5A, 0, 0x3F, 0xFF, 0xFFFF, 0), b"", 0xFFFF)
    if cur.status != GOOD:
        cur = send(struct.pack(">BBBB3xHB", 0x5A, 0, 0x3F, 0, 0xFFFF, 0), b"", 0xFFFF)
    chg = send(struct.pack(">BBBB3xHB", 0x5A, 0, 0x7F, cur.cdb[3], 0xFFFF, 0), b"", 0xFFFF)
    if cur.status == GOOD and len(cur.data_in) >= 8:
        profile.block_descriptor, pages = _split_mode_data(cur.data_in)
        masks = _split_mode_data(chg.data_in)[1] if chg.status == GOOD else []
        by_key = {(m[0] & 0x3F, m[1] if m[0] & 0x40 else 0): m for m in masks}
        for page in pages:
            key = (page[0] & 0x3F, page[1] if page[0] & 0x40 else 0)
            profile.mode_pages.append((page, by_key.get(key, bytes(len(page)))))
            if pt == _CHANGER and key == (0x1D, 0) and len(page) >= 18:
                profile.elements = [
                    struct.unpack_from(">HH", page, 2 + 4 * i) for i in range(4)
                ]
    return profile


def _split_mode_data(data: bytes) -> tuple[tuple[int, int, int] | None, list[bytes]]:
    """(first short block descriptor, pages) of MODE SENSE(10) parameter data."""
    end = min(len(data), 2 + int.from_bytes(data[0:2], "big"))
    bdl = int.from_bytes(data[6:8], "big")
    desc = None
    if bdl >= 8 and not data[4] & 0x01 and len(data) >= 16:
        word, length = struct.unpack_from(">II", data, 8)
        desc = (word >> 24, word & 0xFFFFFF, length & 0xFFFFFF)
    pages = []
    pos = 8 + bdl
    while pos + 2 <= end:
        if data[pos] & 0x40:
            if pos + 4 > end:
                break
            n = 4 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        else:
            n = 2 + data[pos + 1]
        pages.append(bytes(data[pos : pos + n]))
        pos += n
    return desc, pages


# ------------------------------------------------------------------------------------------------
# The run


#: ILLEGAL REQUEST codes that refuse the command as sent (before it touches the medium):
#: INVALID COMMAND OPERATION CODE, LBA OUT OF RANGE, INVALID FIELD IN CDB, PARAMETER LIST LENGTH
#: ERROR, INVALID FIELD IN COMMAND INFORMATION UNIT (LIO's answer to a Data-Out length mismatch).
_CDB_ERRORS = {(0x20, 0x00), (0x21, 0x00), (0x24, 0x00), (0x1A, 0x00), (0x0E, 0x03)}


def _write_extent(cdb: bytes, case: Case, profile: Profile) -> list[tuple[int, int]]:
    """LBA ranges a Data-Out command may have changed (disks), from its CDB or UNMAP list."""
    op = cdb[0]
    n = profile.num_blocks
    if op == 0x0A and len(cdb) >= 6:
        lba, blocks = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF, cdb[4] or 256
    elif op in (0x2A, 0x2E, 0x41) and len(cdb) >= 10:
        lba, blocks = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
    elif op in (0xAA, 0xAE) and len(cdb) >= 12:
        lba, blocks = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[6:10], "big")
    elif op in (0x8A, 0x8E, 0x93) and len(cdb) >= 16:
        lba, blocks = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
    elif op == 0x89 and len(cdb) >= 16:
        lba, blocks = int.from_bytes(cdb[2:10], "big"), cdb[13]
    elif op == 0x42:
        out = []
        data = case.data_out[8:]
        for i in range(0, len(data) - 15, 16):
            lba, blocks = struct.unpack_from(">QI", data, i)
            out.append((lba, min(lba + blocks, n)))
        return out
    elif op == 0x04:
        return [(0, n)]
    else:
        return []
    return [(lba, min(lba + blocks, n))]


class _Run:
    def __init__(self, target: Target, seed: int, memory_limit: int | None, timeout: float,
                 report: FuzzReport, errors: _LogCapture) -> None:
        self.target = target
        self.seed = seed
        self.memory_limit = memory_limit
        self.timeout = timeout
        self.report = report
        self.errors = errors
        self.memory = _MemoryWatch()
        self.touched: bytearray = bytearray()
        self.profile: Profile | None = None

    def escape(self, start: int, case: Case, kind: str, detail: str, status: int | None = None,
               sense: bytes = b"") -> None:
        logged = self.errors.take()
        if logged and kind in ("internal-error", "runner-failure", "loop-died", "not-completed"):
            detail += f" (logged: {logged})"
        key = (kind, case.cdb[0] if case.cdb else -1)
        self.report.escape_counts[key] += 1
        if self.report.escape_counts[key] > KEPT_ESCAPES:
            return  # counted; a long run must not hold every case's data
        kept = replace(case, data_out=case.data_out[:4096])
        self.report.escapes.append(Escape(self.target.name, self.seed, start, kept, kind, detail,
                                          status, sense, len(case.data_out)))

    def prepare(self, session: _Session, start: int) -> Profile:
        """Clear pending unit attentions, probe, write the pattern. The probe's answers go
        through the oracle too (as case `start`, strategy "probe"), uncounted."""
        self.profile = None
        for _ in range(8):  # the power-on unit attention, and any other pending one
            p = session.send(bytes(6), timeout=self.timeout)
            if not p.done or p.status != CHECK_CONDITION or parse_sense(p.sense).sense_key != 6:
                break

        def judged(cdb: bytes, data: bytes, n: int) -> Pending:
            p = session.send(cdb, data, n, self.timeout)
            if p.done:
                self.judge(start, Case(start, "probe", cdb, data, n), p.status or 0, p.sense,
                           count=False)
            return p

        profile = probe(judged)
        profile.pattern_tag = self.seed
        if self.target.pattern and profile.peripheral_type == _DISK and profile.num_blocks:
            profile.pattern_blocks = min(PATTERN_BLOCKS, profile.num_blocks)
            step = max(1, min(profile.max_transfer or 256, 256, DATA_AREA // profile.block_size))
            for lba in range(0, profile.pattern_blocks, step):
                n = min(step, profile.pattern_blocks - lba)
                data = b"".join(profile.pattern(lba + i) for i in range(n))
                p = session.send(struct.pack(">BBQIBB", 0x8A, 0, lba, n, 0, 0), data,
                                 timeout=self.timeout)
                if p.status != GOOD:
                    raise FuzzError(f"writing the pattern at LBA {lba}: status {p.status}")
            self.touched = bytearray(profile.pattern_blocks)
        return profile

    def run_batch(self, session: _Session, cases: Sequence[Case], start: int) -> bool:
        """Send `cases` at once (all in flight together), then those that bypass the ring, and
        apply the oracle; True when the device must be replaced."""
        r = self.report
        before = self.memory.reset() if self.memory_limit else 0
        sent: list[tuple[Case, Pending]] = []
        for case in cases:
            if case.direct:
                continue
            try:
                sent.append((case, session.submit(case)))
            except ValueError:
                r.rejected_by_kernel += 1  # the kernel refuses it before userspace sees it
            except FakeKernelError as exc:
                self.escape(start, case, "ring", str(exc))
                return True
        session.wait([p for _, p in sent], self.timeout)
        results = [(case, p.done, p.status or 0, p.sense) for case, p in sent]
        if session.alive and not session.kernel.broken and all(done for _, done, _, _ in results):
            for case in cases:
                if not case.direct:
                    continue
                try:
                    status, sense = session.direct(case, self.timeout)
                except Exception as exc:  # noqa: BLE001
                    self.escape(start, case, "exception",
                                f"device.execute raised {type(exc).__name__}: {exc}")
                    continue
                results.append((case, True, status, sense))
        if not results:
            return False
        first = results[0][0]
        r.commands += len(results)
        r.strategies.update(case.strategy for case, _, _, _ in results)
        if self.memory_limit:
            grown = self.memory.peak() - before
            r.max_memory_growth = max(r.max_memory_growth, grown)
            if grown > self.memory_limit:
                what = "the command" if len(results) == 1 else f"these {len(results)} commands"
                self.escape(start, first, "memory",
                            f"resident set grew by {grown >> 20} MiB while {what} ran "
                            f"(limit {self.memory_limit >> 20} MiB)")
        if session.kernel.broken:
            self.escape(start, first, "ring", "the fake kernel marked the ring broken")
            return True
        if not session.alive:
            err = session.loop_error or session.runner.failed
            why = f"{type(err).__name__}: {err}" if err is not None else "no exception recorded"
            self.escape(start, first, "loop-died", f"the runner loop thread ended: {why}")
            return True
        stuck = [case for case, done, _, _ in results if not done]
        if stuck:
            self.escape(start, stuck[0], "not-completed", f"no completion within {self.timeout} s")
            return True
        if session.runner.failed is not None:
            failure = session.runner.failed
            session.runner.failed = None
            # The runner answers the command whose execute() raised with BUSY or 44/00.
            busy = [(c, st, se) for c, _, st, se in results
                    if st == Status.BUSY or se[12:14] == b"\x44\x00" or se[2:4] == b"\x44\x00"]
            busy = busy or [(first, results[0][2], results[0][3])]
            self.escape(start, busy[0][0], "runner-failure",
                        "an exception left ScsiDevice.execute: "
                        f"{type(failure).__name__}: {failure}", busy[0][1], busy[0][2])
        for case, _, status, sense in results:
            self.judge(start, case, status, sense)
        return False

    def judge(self, start: int, case: Case, status: int, sense: bytes, count: bool = True) -> None:
        r = self.report
        name = STATUS_NAMES.get(status, f"{status:#04x}")
        if count:
            r.statuses[name] += 1
            r.opcodes.setdefault(case.cdb[0], Counter())[name] += 1
        if status not in STATUS_NAMES or status == Status.ACA_ACTIVE:
            self.escape(start, case, "status", f"status {status:#04x}", status, sense)
            return
        if status == Status.TASK_ABORTED:  # SAM-5 5.3.1: only after a task management function
            self.escape(start, case, "status", "TASK ABORTED, but no TMR was sent", status)
        if status == CONDITION_MET and case.cdb[0] not in (0x34, 0x90):
            self.escape(start, case, "status", "CONDITION MET outside PRE-FETCH", status, sense)
        codes = None
        if status == CHECK_CONDITION:
            # A CDB cut short (direct execute) has no byte for a field pointer to name.
            problem = check_sense(sense, 255 if case.direct else len(case.cdb))
            if problem:
                self.escape(start, case, "sense", problem, status, sense)
                return
            s = parse_sense(sense)
            codes = (s.sense_key, s.asc, s.ascq)
            if count:
                r.senses[f"{s.sense_key:X}/{s.asc:02X}/{s.ascq:02X}"] += 1
            if codes == (0x04, 0x44, 0x00):
                self.escape(start, case, "internal-error", "HARDWARE ERROR 44/00 (a handler "
                            "raised something other than ScsiError)", status, sense)
        sent = len(case.data_out)
        if status == GOOD and case.expected_out is not None and not case.direct:
            if sent < case.expected_out:
                self.escape(start, case, "short-data-out",
                            f"GOOD with {sent} bytes of Data-Out for a CDB announcing "
                            f"{case.expected_out}", status)
            elif case.data_cdb and sent > case.expected_out:
                self.escape(start, case, "long-data-out",
                            f"GOOD with {sent} bytes of Data-Out for a data CDB announcing "
                            f"{case.expected_out}", status)
        profile = self.profile
        if profile is not None and profile.pattern_blocks:
            cdb_refused = (
                codes is not None and codes[0] == 0x05 and (codes[1], codes[2]) in _CDB_ERRORS
            )
            if status not in (GOOD, CHECK_CONDITION) or not cdb_refused:
                for lo, hi in _write_extent(case.cdb, case, profile):
                    lo = max(lo, 0)
                    hi = min(hi, profile.pattern_blocks)
                    if lo < hi:
                        self.touched[lo:hi] = b"\x01" * (hi - lo)

    def leak(self, start: int, index: int, base: int, limit: int) -> bool:
        """A "leak" escape (True) if the resident set grew by more than `limit` since `base`."""
        grown = self.memory.current() - base
        if base and grown > limit:
            self.escape(start, Case(index, "final", b"\0"), "leak",
                        f"resident set grew by {grown >> 20} MiB over cases {start}..{index - 1} "
                        f"(limit {limit >> 20} MiB)")
            return True
        return False

    def final(self, session: _Session, start: int, last: int) -> None:
        """Read the pattern back; TEST UNIT READY and INQUIRY must still be answered."""
        profile = self.profile
        assert profile is not None
        step = max(1, min(profile.max_transfer or 256, 256, DATA_AREA // profile.block_size))
        bs = profile.block_size
        for lba in range(0, profile.pattern_blocks, step):
            n = min(step, profile.pattern_blocks - lba)
            cdb = struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0)
            p = session.send(cdb, b"", n * bs, self.timeout)
            case = Case(last, "final", cdb, data_in_len=n * bs)
            if p.status != GOOD:
                self.escape(start, case, "readback", f"read-back failed: status {p.status}",
                            p.status, p.sense)
                break
            for i in range(n):
                if not self.touched[lba + i] and (
                    p.data_in[i * bs : (i + 1) * bs] != profile.pattern(lba + i)
                ):
                    self.escape(start, case, "readback",
                                f"LBA {lba + i} changed although no command could have written "
                                "it (cases from start to index)")
                    return
        for cdb, n in ((bytes(6), 0), (bytes([0x12, 0, 0, 0, 96, 0]), 96)):
            case = Case(last, "final", cdb, data_in_len=n)
            p = session.send(cdb, b"", n, self.timeout)
            if not p.done or not session.alive:
                self.escape(start, case, "unresponsive", "no answer after the run")
                return
            if cdb[0] == 0x12 and p.status != GOOD:
                self.escape(start, case, "unresponsive", f"INQUIRY answered {p.status:#04x}",
                            p.status, p.sense)
            self.judge(start, case, p.status or 0, p.sense)


def fuzz(
    target: Target,
    *,
    seed: int,
    commands: int,
    first: int = 0,
    memory_limit: int | None = MEMORY_LIMIT,
    leak_limit: int | None = LEAK_LIMIT,
    timeout: float = 10.0,
    seconds: float | None = None,
    final_checks: bool = True,
    depth: int = 1,
) -> FuzzReport:
    """Run cases `first`..`commands`-1 of `seed` against fresh devices from `target`.

    `depth` cases at a time are in flight together (queue depth; 1 attributes every escape,
    memory included, to exactly one command). `memory_limit` bounds the resident set's growth
    while one batch runs, `leak_limit` its growth over the life of one device (checked every
    1000 cases and at the end: a "leak" escape). A case that kills the device (runner loop dead,
    command never completed, ring broken) is reported and the run continues on a fresh device.
    `seconds` stops the run early. Never raises for what the device does; raises FuzzError if a
    fresh device cannot even be probed.
    """
    report = FuzzReport(target.name, seed)
    began = time.monotonic()
    index = first
    with _captured_errors() as errors:
        run = _Run(target, seed, memory_limit, timeout, report, errors)
        try:
            while index < commands:
                start = index
                session = _Session(target)
                healthy = True
                try:
                    run.profile = run.prepare(session, start)
                    report.supported = sorted(run.profile.opcodes)
                    base = run.memory.current()
                    leaked = False
                    while index < commands:
                        if leak_limit and not leaked and (index - start) % 1000 < depth:
                            leaked = run.leak(start, index, base, leak_limit)
                        if seconds is not None and time.monotonic() - began > seconds:
                            commands = index
                            break
                        batch = [generate(run.profile, seed, i)
                                 for i in range(index, min(index + depth, commands))]
                        index += len(batch)
                        if run.run_batch(session, batch, start):
                            healthy = False
                            report.restarts += 1
                            break
                    if healthy and final_checks:
                        run.final(session, start, index)
                    if leak_limit and not leaked:
                        run.leak(start, index, base, leak_limit)
                finally:
                    if healthy:
                        for problem in session.close(timeout):
                            run.escape(start, Case(index, "final", b"\0"), "teardown", problem)
                    else:
                        session.abandon()
        finally:
            run.memory.close()
    report.duration = time.monotonic() - began
    return report


def replay(
    target: Target,
    *,
    seed: int,
    index: int,
    start: int = 0,
    memory_limit: int | None = MEMORY_LIMIT,
    depth: int = 1,
) -> list[Escape]:
    """Run cases `start`..`index` of `seed` on a fresh device; the escapes of case `index`.

    `start=index` tries the case alone (a one-command reproducer if it still escapes). Replay a
    run made with `depth` > 1 with the same depth and a `start` on a batch boundary.
    """
    report = fuzz(target, seed=seed, commands=index + 1, first=start,
                  memory_limit=memory_limit, final_checks=False, depth=depth)
    return [e for e in report.escapes if e.case.index == index]


# ------------------------------------------------------------------------------------------------
# The built-in devices


def builtin_targets(workdir: str | os.PathLike[str], *, disk_size: int = 64 << 20) -> dict[
        str, Target]:
    """Targets for every built-in device type, each opening a fresh device under `workdir`:
    ``raw``, ``null``, ``thin`` (a pool smaller than the disk, so writes can run out of space),
    ``drive`` (an LTO-8 drive with a small cartridge loaded) and ``changer`` (a library with two
    drives, one of them open so moves load it)."""
    root = Path(workdir)
    counter = iter(range(1 << 30))

    def fresh(name: str) -> Path:
        path = root / f"{name}-{next(counter)}"
        path.mkdir(parents=True)
        return path

    def raw() -> ScsiDevice:
        from tcmu_py.handler import DeviceConfig
        from tcmu_py.handlers.raw import RawHandler

        image = fresh("raw") / "disk.img"
        return RawHandler.open(DeviceConfig(name="fuzz-raw", subtype="raw", cfgstring=str(image),
                                            size=disk_size, write_cache=True))

    def null() -> ScsiDevice:
        from tcmu_py.handler import DeviceConfig
        from tcmu_py.handlers.null import NullHandler

        return NullHandler.open(DeviceConfig(name="fuzz-null", subtype="null", cfgstring="",
                                             size=disk_size))

    def thin() -> ScsiDevice:
        from tcmu_py.handler import DeviceConfig
        from tcmu_py.handlers.thin import ThinHandler, create_pool

        pool = fresh("thin")
        create_pool(str(pool), "fuzzpool", capacity=disk_size // 2, soft_threshold=50)
        return ThinHandler.open(DeviceConfig(name="fuzz-thin", subtype="thin",
                                             cfgstring=f"pool={pool};disk=d0", size=disk_size))

    def library(drives: int) -> Path:
        from tcmu_py.handlers.vtl.admin import create_cartridges
        from tcmu_py.handlers.vtl.library import Library

        path = fresh("vtl") / "lib"
        lib = Library.create(path, name="fuzzlib", slots=6, import_export=2,
                             drives=[(f"FUZZDRV{i}", "IBM-LTO8") for i in range(drives)])
        create_cartridges(lib, "FUZ000L8..FUZ003L8", capacity=16 << 20)
        slot = lib.locate("FUZ000L8")
        assert slot is not None
        lib.move(slot, lib.drive_address(0))
        lib.close()
        return path

    def drive() -> ScsiDevice:
        from tcmu_py.handler import DeviceConfig
        from tcmu_py.handlers.vtl import VtlHandler

        path = library(1)
        return VtlHandler.open(DeviceConfig(name="fuzz-drive", subtype="vtl",
                                            cfgstring=f"library={path};unit=drive0", size=0))

    def changer() -> ScsiDevice:
        from tcmu_py.handler import DeviceConfig
        from tcmu_py.handlers.vtl import VtlHandler

        path = library(2)
        dev = VtlHandler.open(DeviceConfig(name="fuzz-changer", subtype="vtl",
                                           cfgstring=f"library={path};unit=changer", size=0))
        loaded = VtlHandler.open(DeviceConfig(name="fuzz-changer-d0", subtype="vtl",
                                              cfgstring=f"library={path};unit=drive0", size=0))
        inner = dev.close

        def close() -> None:
            try:
                inner()
            finally:
                loaded.close()

        dev.close = close  # type: ignore[method-assign]
        return dev

    return {
        "raw": Target("raw", raw),
        "null": Target("null", null, pattern=False),
        "thin": Target("thin", thin),
        "drive": Target("drive", drive, pattern=False),
        "changer": Target("changer", changer, pattern=False),
    }


# ------------------------------------------------------------------------------------------------
# Ring corruption: what the kernel side of the mapping may hold, against tcmu_py.ring.Ring


@dataclass(frozen=True)
class RingEscape:
    """One way the Ring mishandled a (possibly corrupted) mapping. Kinds: ``lost-in-flight``
    (dequeue raised after marking commands in flight that it never returned), ``out-of-bounds``
    (a returned CDB or buffer outside its place), ``wild-write`` (complete wrote outside the
    command ring), ``exception`` (anything but RingError), ``control`` (an uncorrupted ring
    mishandled)."""

    seed: int
    case: int
    corruption: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return (f"ring seed={self.seed} case={self.case} corruption={self.corruption} "
                f"[{self.kind}] {self.detail}")


@dataclass
class RingFuzzReport:
    """`rejected`: corrupt rings the Ring refused with RingError (at attach, dequeue or
    complete); `held`: corrupt rings it parsed without error (every command it returned was
    checked to lie inside the mapping); `clean`: uncorrupted controls, checked end to end."""

    seed: int
    cases: int = 0
    rejected: int = 0
    held: int = 0
    clean: int = 0
    guarded: bool = False
    corruptions: Counter[str] = field(default_factory=Counter)
    escapes: list[RingEscape] = field(default_factory=list)
    duration: float = 0.0

    def describe(self, limit: int = 5) -> str:
        kinds = Counter(e.kind for e in self.escapes)
        lines = [
            f"ring: seed {self.seed}, {self.cases} cases in {self.duration:.1f} s: "
            f"{self.rejected} rejected with RingError, {self.held} parsed, {self.clean} clean "
            f"controls, {len(self.escapes)} escapes"
            + (" (" + ", ".join(f"{k} {v}" for k, v in kinds.most_common()) + ")" if kinds else "")
            + ("" if self.guarded else "; NO guard pages"),
            "  corruptions: " + ", ".join(f"{k} {v}" for k, v in sorted(self.corruptions.items())),
        ]
        lines += [f"  {e}" for e in self.escapes[:limit]]
        if len(self.escapes) > limit:
            lines.append(f"  ... and {len(self.escapes) - limit} more")
        return "\n".join(lines)


_PAGE = 4096


class _GuardedMapping:
    """A buffer with an inaccessible page right before and right after it, so that a read or
    write outside it by the C ring code faults at once instead of passing unnoticed."""

    def __init__(self, size: int) -> None:
        import ctypes
        import mmap

        assert size % _PAGE == 0
        self._mm = mmap.mmap(-1, size + 2 * _PAGE)
        self._view = memoryview(self._mm)
        self.buffer = self._view[_PAGE : _PAGE + size]
        self.guarded = False
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            holder = ctypes.c_char.from_buffer(self._mm)
            base = ctypes.addressof(holder)
            del holder
            mprotect = libc.mprotect
            mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self.guarded = (
                mprotect(base, _PAGE, 0) == 0 and mprotect(base + _PAGE + size, _PAGE, 0) == 0
            )
        except (OSError, AttributeError):
            pass

    def close(self) -> None:
        self.buffer.release()
        self._view.release()
        self._mm.close()


def _address(view: memoryview) -> int:
    """Address of a writable buffer (ctypes: the compiled ring binding is tcmu_py.ring's alone)."""
    import ctypes

    return ctypes.addressof((ctypes.c_char * len(view)).from_buffer(view))


def _ring_entries(buf: bytearray | memoryview, tail: int, head: int, size: int) -> list[int]:
    """Ring offsets of the entries from `tail` to `head` (of an uncorrupted ring)."""
    out: list[int] = []
    off = tail
    while off != head and len(out) <= size // 8:
        length = struct.unpack_from("<I", buf, 128 + off)[0] & ~7
        if length < 8 or off + length > size:
            break
        out.append(off)
        off = (off + length) % size
    return out


def _random_cdb(rng: random.Random) -> bytes:
    op = rng.choice([0x00, 0x12, 0x28, 0x2A, 0x8A, 0xA3, 0x7F, 0x9E, 0xAA, rng.randrange(256)])
    if op == 0x7F:
        extra = rng.choice([0, 1, 0x18, rng.randrange(256)])
        return bytes([0x7F, 0, 0, 0, 0, 0, 0, extra]) + rng.randbytes(extra)
    return bytes([op]) + rng.randbytes(scsi_command_size(bytes([op])) - 1)


def _submit_random(k: FakeKernel, rng: random.Random) -> Pending | None:
    cdb = _random_cdb(rng)
    kind = rng.choice(["none", "out", "in", "in", "bidi"])
    n = rng.choice([1, 100, 4096, 4097, 12000, rng.randrange(1, 20000)])
    try:
        if kind == "out":
            return k.submit(cdb, rng.randbytes(n))
        if kind == "in":
            return k.submit(cdb, data_in_len=n)
        if kind == "bidi":
            return k.submit(cdb, rng.randbytes(n), bidi_in_len=rng.choice([1, 512, 8192]))
        return k.submit(cdb)
    except ValueError:
        return None


def _corrupt(buf: memoryview, rng: random.Random, k: FakeKernel, what: str) -> None:
    """Apply corruption `what` to the mapping `buf` (laid out as FakeKernel `k` built it)."""
    size, data_off, map_len = k.cmdr_size, k.data_off, len(buf)
    entries = _ring_entries(k.buffer, k.tail, k.head, size) or [k.tail]
    ent = 128 + rng.choice(entries)
    length = struct.unpack_from("<I", k.buffer, ent)[0] & ~7

    def u32(off: int, value: int) -> None:
        struct.pack_into("<I", buf, off, value & 0xFFFFFFFF)

    def u64(off: int, value: int) -> None:
        struct.pack_into("<Q", buf, off, value % 2**64)

    big = [0, 1, 7, 8, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000]
    if what == "mailbox":  # version, cmdr_off, cmdr_size (read at attach)
        off = rng.choice([0, 4, 8])
        value = rng.choice([0, 1, 3, 127, 128, size + 8, map_len, 0xFFFF, rng.randrange(0x10000)])
        if off:
            u32(off, value)
        else:
            struct.pack_into("<H", buf, 0, value & 0xFFFF)
    elif what in ("head", "tail"):
        u32(12 if what == "head" else 64, rng.choice([
            size, size + 8, size - 4, 4, 0xFFFFFFF8, 0xFFFFFFFF, (ent - 128 + 8) % size,
            rng.randrange(size) & ~7, rng.randrange(1 << 32)]))
    elif what == "len_op":
        new = rng.choice([0, 8, 16, 104, 112, length - 8, length + 8, size, size + 8,
                          0xFFFFFFF8, rng.randrange(1 << 32)])
        u32(ent, (new & 0xFFFFFFF8) | rng.randrange(8))
    elif what == "cmd_id":
        struct.pack_into("<H", buf, ent + 4, rng.choice([0, 1, 2, 0xFFFF, rng.randrange(0x10000)]))
    elif what == "iov_cnt":
        room = (length - 48) // 16
        u32(ent + rng.choice([8, 12]), rng.choice([*big, room, room + 1, 0x10000000]))
    elif what == "iovec":
        i = rng.randrange(max(1, min(4, (length - 48) // 16)))
        base = rng.choice([0, 64, 128, data_off - 1, data_off - 16, data_off, map_len - 1, map_len,
                           map_len + 1, 2**63, 2**64 - 1, 2**64 - 4096, rng.randrange(map_len)])
        u64(ent + 48 + 16 * i, base)
        u64(ent + 56 + 16 * i, rng.choice([0, 1, 4096, map_len, map_len - data_off, 2**63,
                                           2**64 - 1, 2**64 - base, rng.randrange(map_len)]))
    elif what == "cdb_off":
        u64(ent + 24, rng.choice([0, ent, ent + 47, ent + 48, ent + length - 1, ent + length,
                                  ent + length - 7, map_len, 2**64 - 1, rng.randrange(map_len)]))
    elif what == "cdb":  # opcode 7Fh claims 8 + byte 7 bytes; other groups change the size
        cdb_off = struct.unpack_from("<Q", buf, ent + 24)[0]
        if 0 <= cdb_off < map_len - 8:
            buf[cdb_off] = rng.choice([0x7F, 0x7F, 0x9F, 0xC0, 0x20, rng.randrange(256)])
            buf[cdb_off + 7] = rng.randrange(256)
    elif what == "tmr":  # the entry becomes a TMR whose cmd_cnt may not fit
        room = (length - 32) // 2
        u32(ent, (length & 0xFFFFFFF8) | 2)
        u32(ent + 12, rng.choice([*big, room, room + 1]))
    else:  # "bytes": random bytes in the unreaped part of the ring
        for _ in range(rng.randint(1, 8)):
            j = 128 + (rng.choice(entries) + rng.randrange(max(8, length))) % size
            buf[j] = rng.randrange(256)


_CORRUPTIONS = ("mailbox", "head", "tail", "len_op", "cmd_id", "iov_cnt", "iovec", "cdb_off",
                "cdb", "tmr", "bytes")


def fuzz_ring(*, seed: int, cases: int, seconds: float | None = None) -> RingFuzzReport:
    """Corrupt what the kernel writes into the mapping (mailbox, cmd_head, entry headers,
    iovecs, CDB offsets, TMR entries) and attach the production `Ring` to it.

    The Ring must raise RingError or return commands whose CDB and buffers lie inside the
    mapping's data area; a command it marks in flight must be one it returned; `complete` must
    write nowhere but the command ring and `cmd_tail`. The mapping sits between inaccessible
    pages (`RingFuzzReport.guarded`), so an out-of-bounds access by the C code crashes the
    process: a loud failure. One case in five is an uncorrupted control, checked end to end
    against the FakeKernel.
    """
    report = RingFuzzReport(seed)
    began = time.monotonic()
    for i in range(cases):
        if seconds is not None and time.monotonic() - began > seconds:
            break
        rng = random.Random(f"tcmu-py-ring:{seed}:{i}")
        report.cases += 1
        k, on_ring = _ring_setup(rng)
        control = rng.random() < 0.2
        what = "none" if control else rng.choice(_CORRUPTIONS)
        report.corruptions[what] += 1
        mapping = _GuardedMapping(len(k.buffer))
        report.guarded = mapping.guarded
        try:
            buf = mapping.buffer
            buf[:] = k.buffer
            if not control:
                for _ in range(rng.choice([1, 1, 1, 2, 3])):
                    _corrupt(buf, rng, k, what)
            problem = _ring_case(buf, k, rng, on_ring, control, report)
        finally:
            mapping.close()
        if problem:
            report.escapes.append(RingEscape(seed, i, what, *problem))
    report.duration = time.monotonic() - began
    return report


def _ring_setup(rng: random.Random) -> tuple[FakeKernel, list[Pending]]:
    """A FakeKernel whose ring has moved along (commands completed out of order through a real
    Ring), then a fresh batch of commands (and maybe a TMR) waiting on it."""
    from tcmu_py.ring import Ring

    pages = rng.choice([1, 2, 16])
    size = pages * _PAGE - 128  # mailbox + ring fill whole pages, so the guards sit flush
    k = FakeKernel(cmdr_size=size, data_size=rng.choice([16, 32]) * _PAGE,
                   ring_offset=rng.randrange(size // 8) * 8)
    warm = Ring(k.buffer)
    for _ in range(rng.randrange(4)):
        for _ in range(rng.randrange(1, 6)):
            _submit_random(k, rng)
        while k.in_flight or k.queued:  # drain: commands that waited for space come in too
            cmds, _ = warm.dequeue()
            rng.shuffle(cmds)
            for c in cmds:
                warm.complete(c.cmd_id, 0)
            k.kick()
    warm.close()
    batch = [p for p in (_submit_random(k, rng) for _ in range(rng.randint(1, 6))) if p]
    on_ring = [p for p in batch if p.cmd_id is not None]
    if on_ring and rng.random() < 0.3:
        k.submit_tmr(5, rng.sample(on_ring, rng.randint(1, len(on_ring))))
    return k, on_ring


def _ring_case(buf: memoryview, k: FakeKernel, rng: random.Random, on_ring: list[Pending],
               control: bool, report: RingFuzzReport) -> tuple[str, str] | None:
    """Attach, dequeue, check, complete: (kind, detail) of what went wrong, or None."""
    from tcmu_py.errors import RingError
    from tcmu_py.ring import Ring

    base = _address(buf)
    size = len(buf)
    batch = rng.choice([1, 2, 3, 256])  # 256: the default; small ones reach batch boundaries
    try:
        ring = Ring(buf, adopt=True, batch=batch)
    except RingError as exc:
        report.rejected += 1
        return ("control", f"the uncorrupted ring was refused: {exc}") if control else None
    except Exception as exc:  # noqa: BLE001
        return "exception", f"attach raised {type(exc).__name__}: {exc}"
    returned: list[Any] = []
    failed = False
    try:
        for _ in range(3):
            try:
                cmds, _ = ring.dequeue()
            except RingError as exc:
                if control:
                    return "control", f"dequeue on the uncorrupted ring raised {exc}"
                failed = True
                break
            returned += cmds
        for c in returned:
            if len(c.cdb) != scsi_command_size(c.cdb):
                return "out-of-bounds", f"cmd {c.cmd_id}: {len(c.cdb)}-byte CDB {c.cdb.hex()}"
            views = c.data_out if c.data_in is c.data_out else [*c.data_out, *c.data_in]
            for v in views:
                at = _address(v) - base
                if len(v) and not (ring.data_off <= at and at + len(v) <= size):
                    return "out-of-bounds", (f"cmd {c.cmd_id}: buffer [{at}, {at + len(v)}) "
                                             f"outside the data area [{ring.data_off}, {size})")
            if c.out_len != sum(len(v) for v in c.data_out):
                return "out-of-bounds", f"cmd {c.cmd_id}: out_len {c.out_len} != its buffers"
        lost = ring.in_flight_ids - {c.cmd_id for c in returned}
        if lost:
            return "lost-in-flight", (
                f"dequeue (batch {batch}) raised RingError after marking cmd_ids "
                f"{sorted(lost)} in flight without returning them: nobody will complete them")
        before = bytes(buf)
        order = list(returned)
        rng.shuffle(order)
        for c in order:
            sense = rng.choice([b"", bytes([0x70, 0, 5, 0, 0, 0, 0, 10]) + bytes(10)])
            try:
                ring.complete(c.cmd_id, 2 if sense else 0, sense,
                              rng.choice([None, 0, 1, c.in_len]))
            except RingError as exc:
                if control:
                    return "control", f"completing cmd {c.cmd_id} raised {exc}"
                failed = True
                break
        after = bytes(buf)
        for lo, hi in ((0, 64), (68, 128), (ring.data_off, size)):  # all but ring and cmd_tail
            if before[lo:hi] != after[lo:hi]:
                j = next(j for j in range(lo, hi) if before[j] != after[j])
                return "wild-write", f"complete() changed mapping byte {j}"
    except Exception as exc:  # noqa: BLE001
        return "exception", f"{type(exc).__name__}: {exc}"
    finally:
        ring.close()
    if failed:
        report.rejected += 1
    elif not control:
        report.held += 1
    else:
        report.clean += 1
        problem = _check_control(buf, k, returned, on_ring)
        return ("control", problem) if problem else None
    return None


def _check_control(buf: memoryview, k: FakeKernel, returned: list[Any],
                   on_ring: list[Pending]) -> str | None:
    """An uncorrupted ring: exactly the submitted commands came out, and the completions
    written into the mapping reap cleanly in the fake kernel."""
    by_id = {p.cmd_id: p for p in on_ring}
    if sorted(c.cmd_id for c in returned) != sorted(by_id):  # type: ignore[type-var]
        return f"returned cmd_ids {sorted(c.cmd_id for c in returned)}, expected {list(by_id)}"
    for c in returned:
        p = by_id[c.cmd_id]
        if c.cdb != p.cdb:
            return f"cmd {c.cmd_id}: CDB {c.cdb.hex()} != submitted {p.cdb.hex()}"
        if p.data_out and b"".join(bytes(v) for v in c.data_out) != p.data_out:
            return f"cmd {c.cmd_id}: Data-Out differs from what was submitted"
        if p.data_in_len and c.in_len != p.data_in_len:
            return f"cmd {c.cmd_id}: Data-In buffers of {c.in_len} bytes, expected {p.data_in_len}"
    k.buffer[:] = buf
    try:
        k.kick()
    except FakeKernelError as exc:
        return f"the fake kernel refused the completions: {exc}"
    if not all(p.done for p in on_ring):
        return "completions written but not all commands reaped"
    return None
