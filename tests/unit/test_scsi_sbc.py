"""SBC-4 builders and parsers: READ CAPACITY, VPD B0/B1/B2, UNMAP, GET LBA STATUS."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_py.scsi import sbc
from tcmu_py.scsi.sense import InvalidFieldInParameterList, ParameterListLengthError


@pytest.mark.parametrize(
    "blocks,want",
    [(1, 0), (2048, 2047), (2**32, 0xFFFFFFFF), (2**32 + 1, 0xFFFFFFFF), (2**40, 0xFFFFFFFF)],
)
def test_read_capacity_10(blocks, want):
    assert sbc.build_read_capacity_10(blocks, 512) == struct.pack(">II", want, 512)


@given(st.integers(1, 2**64), st.sampled_from([512, 4096]), st.booleans(), st.booleans(),
       st.integers(0, 15), st.integers(0, 0x3FFF))
def test_read_capacity_16(blocks, bs, lbpme, lbprz, lbppbe, aligned):
    data = sbc.build_read_capacity_16(blocks, bs, lbpme=lbpme, lbprz=lbprz, lbppbe=lbppbe,
                                      lowest_aligned=aligned)
    assert len(data) == 32
    assert int.from_bytes(data[0:8], "big") == blocks - 1
    assert int.from_bytes(data[8:12], "big") == bs
    assert data[12] == 0x10  # RC BASIS 01b, no protection
    assert data[13] & 0x0F == lbppbe
    assert bool(data[14] & 0x80) == lbpme
    # LBPRZ is only reported together with LBPME (SBC-4 5.21.2).
    assert bool(data[14] & 0x40) == (lbpme and lbprz)
    assert int.from_bytes(data[14:16], "big") & 0x3FFF == aligned
    assert data[16:] == bytes(16)


def test_vpd_block_limits_layout():
    page = sbc.build_vpd_block_limits(
        max_compare_and_write_length=255, max_transfer_length=1024, optimal_transfer_length=128,
        max_unmap_lba_count=0xFFFFFFFF, max_unmap_descriptor_count=256,
        optimal_unmap_granularity=8, unmap_granularity_alignment=0, max_write_same_length=1 << 22,
    )
    assert len(page) == 64 and page[:4] == bytes([0, 0xB0, 0, 0x3C])
    u32 = lambda off: int.from_bytes(page[off : off + 4], "big")  # noqa: E731
    assert page[5] == 255
    assert (u32(8), u32(12), u32(20), u32(24), u32(28)) == (1024, 128, 0xFFFFFFFF, 256, 8)
    assert u32(32) == 0x80000000  # UGAVALID, alignment 0
    assert int.from_bytes(page[36:44], "big") == 1 << 22
    assert u32(32) & 0x80000000
    no_uga = sbc.build_vpd_block_limits()
    assert no_uga[4:] == bytes(60)
    with pytest.raises(ValueError):
        sbc.build_vpd_block_limits(max_compare_and_write_length=256)


def test_vpd_block_device_characteristics():
    page = sbc.build_vpd_block_device_characteristics(rotation_rate=1, nominal_form_factor=3)
    assert len(page) == 64 and page[1] == 0xB1 and page[4:6] == b"\x00\x01" and page[7] == 3


@pytest.mark.parametrize(
    "kw,b5,b6",
    [
        ({}, 0x00, 0x00),
        ({"lbpu": True, "lbpws": True, "lbpws10": True, "lbprz": True,
          "provisioning_type": sbc.ProvisioningType.THIN}, 0xE4, 0x02),
        ({"lbprz": 2, "anc_sup": True}, 0x0A, 0x00),
        ({"lbpws": True, "provisioning_group_descriptor": bytes(20)}, 0x41, 0x00),
    ],
)
def test_vpd_lbp(kw, b5, b6):
    page = sbc.build_vpd_lbp(threshold_exponent=3, **kw)
    assert page[1] == 0xB2 and page[4] == 3 and page[5] == b5 and page[6] == b6
    assert int.from_bytes(page[2:4], "big") == len(page) - 4


ranges_st = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)), max_size=20)


@given(ranges_st)
def test_unmap_round_trip(ranges):
    data = sbc.build_unmap_parameters(ranges)
    assert int.from_bytes(data[0:2], "big") == len(data) - 2
    assert sbc.parse_unmap_parameters(data, 64) == ranges


def test_unmap_empty_and_short():
    assert sbc.parse_unmap_parameters(b"", 1) == []
    assert sbc.parse_unmap_parameters(sbc.build_unmap_parameters([]), 1) == []
    for n in range(1, 8):
        with pytest.raises(ParameterListLengthError):
            sbc.parse_unmap_parameters(bytes(n), 1)


def test_unmap_partial_descriptor_and_short_data():
    data = sbc.build_unmap_parameters([(1, 2), (3, 4)])
    # the data stops inside the second descriptor: only the first is used
    assert sbc.parse_unmap_parameters(data[:-3], 8) == [(1, 2)]
    # BLOCK DESCRIPTOR DATA LENGTH covers only one descriptor plus a partial one
    shrunk = bytearray(data)
    shrunk[2:4] = (16 + 8).to_bytes(2, "big")
    assert sbc.parse_unmap_parameters(bytes(shrunk), 8) == [(1, 2)]


def test_unmap_limits():
    data = sbc.build_unmap_parameters([(0, 10), (100, 10), (200, 10)])
    with pytest.raises(InvalidFieldInParameterList) as exc:
        sbc.parse_unmap_parameters(data, 2)
    assert exc.value.field_pointer == 2 and exc.value.in_cdb is False
    with pytest.raises(InvalidFieldInParameterList) as exc:
        sbc.parse_unmap_parameters(data, 3, max_lba_count=25)
    assert exc.value.field_pointer == 8 + 32 + 8
    assert len(sbc.parse_unmap_parameters(data, 3, max_lba_count=30)) == 3


def parse_lba_status(data: bytes) -> list[tuple[int, int, int]]:
    assert int.from_bytes(data[0:4], "big") == len(data) - 4
    return [
        (int.from_bytes(data[i : i + 8], "big"), int.from_bytes(data[i + 8 : i + 12], "big"),
         data[i + 12] & 0x0F)
        for i in range(8, len(data), 16)
    ]


def merge(runs):
    out = []
    for lba, n, status in runs:
        if n <= 0:
            continue
        if out and out[-1][2] == status and out[-1][0] + out[-1][1] == lba:
            out[-1] = (out[-1][0], out[-1][1] + n, status)
        else:
            out.append((lba, n, status))
    return out


@st.composite
def contiguous_runs(draw):
    lba = draw(st.integers(0, 2**40))
    runs = []
    for _ in range(draw(st.integers(0, 6))):
        n = draw(st.integers(1, 2**33))
        runs.append((lba, n, draw(st.sampled_from(list(sbc.ProvisioningStatus)))))
        lba += n
    return runs


@given(contiguous_runs())
def test_get_lba_status_covers_same_blocks(runs):
    out = parse_lba_status(sbc.build_get_lba_status(runs))
    assert all(0 < n <= 0xFFFFFFFF for _, n, _ in out)
    assert merge(out) == merge(runs)


@given(contiguous_runs(), st.integers(0, 2**41), st.integers(1, 5))
def test_get_lba_status_start_and_limit(runs, start, limit):
    out = parse_lba_status(sbc.build_get_lba_status(runs, start_lba=start, max_descriptors=limit))
    assert len(out) <= limit
    covering = [r for r in runs if r[0] + r[1] > start]
    if not covering:
        assert out == []
        return
    # SBC-4 5.8.2: the first descriptor starts at the requested LBA when a run covers it.
    first = covering[0]
    assert out[0][0] == max(start, first[0]) and out[0][2] == first[2]
    # descriptors are contiguous, each a prefix of the merged runs
    for a, b in zip(out, out[1:], strict=False):
        assert a[0] + a[1] == b[0]


def test_get_lba_status_empty():
    assert sbc.build_get_lba_status([]) == bytes([0, 0, 0, 4, 0, 0, 0, 0])


@pytest.mark.parametrize("twelve", [False, True])
def test_read_defect_data_empty(twelve):
    data = sbc.build_read_defect_data(twelve=twelve, req_plist=True, req_glist=False,
                                      defect_list_format=3)
    assert data[1] == 0x13
    assert len(data) == (8 if twelve else 4) and not any(data[2:])


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=40))
def test_merge_ranges_covers_exactly_the_same_blocks(ranges: list[tuple[int, int]]) -> None:
    """UNMAP's descriptors merged (`sbc.merge_ranges`): the same set of blocks, in sorted,
    non-empty ranges that neither overlap nor touch."""
    merged = sbc.merge_ranges(ranges)
    blocks = {b for lba, n in ranges for b in range(lba, lba + n)}
    assert {b for lba, n in merged for b in range(lba, lba + n)} == blocks
    assert all(n > 0 for _, n in merged)
    assert all(a + n < b for (a, n), (b, _) in zip(merged, merged[1:], strict=False))


def test_merge_ranges_one_descriptor_per_block() -> None:
    assert sbc.merge_ranges([(i, 1) for i in range(256)]) == [(0, 256)]
    assert sbc.merge_ranges([(9, 2), (0, 0), (3, 4), (5, 1), (11, 1)]) == [(3, 4), (9, 3)]
