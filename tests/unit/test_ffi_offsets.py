"""The pure-Python layout constants in tcmu_py.ring agree with the compiled kernel header."""

import pytest

from tcmu_py import ring
from tcmu_py._tcmu_ring import ffi, lib

MB = "struct tcmu_mailbox"
HDR = "struct tcmu_cmd_entry_hdr"
ENT = "struct tcmu_cmd_entry"
TMR = "struct tcmu_tmr_entry"

OFFSETS = [
    ("MB_VERSION", MB, ("version",)),
    ("MB_FLAGS", MB, ("flags",)),
    ("MB_CMDR_OFF", MB, ("cmdr_off",)),
    ("MB_CMDR_SIZE", MB, ("cmdr_size",)),
    ("MB_CMD_HEAD", MB, ("cmd_head",)),
    ("MB_CMD_TAIL", MB, ("cmd_tail",)),
    ("HDR_LEN_OP", HDR, ("len_op",)),
    ("HDR_CMD_ID", HDR, ("cmd_id",)),
    ("HDR_KFLAGS", HDR, ("kflags",)),
    ("HDR_UFLAGS", HDR, ("uflags",)),
    ("REQ_IOV_CNT", ENT, ("req", "iov_cnt")),
    ("REQ_IOV_BIDI_CNT", ENT, ("req", "iov_bidi_cnt")),
    ("REQ_IOV_DIF_CNT", ENT, ("req", "iov_dif_cnt")),
    ("REQ_CDB_OFF", ENT, ("req", "cdb_off")),
    ("REQ_IOV", ENT, ("req", "iov")),
    ("RSP_SCSI_STATUS", ENT, ("rsp", "scsi_status")),
    ("RSP_READ_LEN", ENT, ("rsp", "read_len")),
    ("RSP_SENSE", ENT, ("rsp", "sense_buffer")),
    ("TMR_TYPE", TMR, ("tmr_type",)),
    ("TMR_CMD_CNT", TMR, ("cmd_cnt",)),
    ("TMR_CMD_IDS", TMR, ("cmd_ids",)),
]

SIZES = [
    ("MAILBOX_SIZE", MB),
    ("HDR_SIZE", HDR),
    ("CMD_ENTRY_SIZE", ENT),
    ("TMR_ENTRY_SIZE", TMR),
    ("IOVEC_SIZE", "struct iovec"),
]

CONSTANTS = [
    ("MAILBOX_VERSION", "TCMU_MAILBOX_VERSION"),
    ("OP_MASK", "TCMU_OP_MASK"),
    ("OP_ALIGN_SIZE", "TCMU_OP_ALIGN_SIZE"),
    ("SENSE_BUFFERSIZE", "TCMU_SENSE_BUFFERSIZE"),
]


@pytest.mark.parametrize(("name", "ctype", "path"), OFFSETS, ids=[o[0] for o in OFFSETS])
def test_offset_matches_header(name: str, ctype: str, path: tuple[str, ...]) -> None:
    assert getattr(ring, name) == ffi.offsetof(ctype, *path)


@pytest.mark.parametrize(("name", "ctype"), SIZES, ids=[s[0] for s in SIZES])
def test_size_matches_header(name: str, ctype: str) -> None:
    assert getattr(ring, name) == ffi.sizeof(ctype)


@pytest.mark.parametrize(("name", "cname"), CONSTANTS, ids=[c[0] for c in CONSTANTS])
def test_constant_matches_header(name: str, cname: str) -> None:
    assert getattr(ring, name) == getattr(lib, cname)


def test_iovec_fields_are_u64() -> None:
    assert ffi.offsetof("struct iovec", "iov_len") == 8
    assert ffi.sizeof(ffi.typeof("struct iovec").fields[0][1].type) == 8


def test_sense_buffer_fills_the_entry() -> None:
    entry = ffi.new(f"{ENT} *")
    assert ffi.sizeof(entry.rsp.sense_buffer) == ring.SENSE_BUFFERSIZE
    assert ring.RSP_SENSE + ring.SENSE_BUFFERSIZE == ring.CMD_ENTRY_SIZE


@pytest.mark.parametrize("member", list(ring.RingOp), ids=lambda m: m.name)
def test_opcodes_match_header(member: ring.RingOp) -> None:
    assert member == getattr(lib, f"TCMU_OP_{member.name}")


@pytest.mark.parametrize("member", list(ring.UFlag), ids=lambda m: m.name)
def test_uflags_match_header(member: ring.UFlag) -> None:
    assert member == getattr(lib, f"TCMU_UFLAG_{member.name}")


@pytest.mark.parametrize("member", list(ring.MailboxFlag), ids=lambda m: m.name)
def test_mailbox_flags_match_header(member: ring.MailboxFlag) -> None:
    assert member == getattr(lib, f"TCMU_MAILBOX_FLAG_{member.name}")


@pytest.mark.parametrize("member", list(ring.TmrType), ids=lambda m: m.name)
def test_tmr_types_match_header(member: ring.TmrType) -> None:
    assert member == getattr(lib, f"TCMU_TMR_{member.name}")


def test_entry_sizing_matches_kernel_formula() -> None:
    # target_core_user.c tcmu_cmd_get_base_cmd_size: max(offsetof(req.iov[n]), sizeof(entry))
    for n in range(12):
        iovs = ffi.offsetof(ENT, "req", "iov") + n * ffi.sizeof("struct iovec")
        base = max(iovs, ffi.sizeof(ENT))
        for cdb_len in (6, 10, 12, 16, 32, 263):
            assert ring.command_entry_size(n, cdb_len) == base + (cdb_len + 7) // 8 * 8


def test_entry_descriptor_layout_matches_ring_struct() -> None:
    # ring.py reads the tcmu_py_entry array with one struct.Struct
    fields = ["cdb_off", "array_off", "offset", "length", "op", "cmd_id", "iov_cnt",
              "iov_bidi_cnt", "cdb_len", "reserved", "error", "retried", "arrived_ns"]
    offsets = [ffi.offsetof("struct tcmu_py_entry", f) for f in fields]
    assert offsets == [0, 8, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56]
    assert ffi.sizeof("struct tcmu_py_entry") == ring._ENTRY.size == 64


def test_completion_record_layout_matches_ring_struct() -> None:
    fields = ["cmd_id", "scsi_status", "sense_len", "has_read_len", "read_len", "sense"]
    offsets = [ffi.offsetof("struct tcmu_py_rsp", f) for f in fields]
    assert offsets == [0, 4, 8, 12, 16, 20]
    assert ffi.sizeof("struct tcmu_py_rsp") == ring._RSP.size == 116
