"""EXTENDED COPY / RECEIVE COPY RESULTS on BlockDevice: random segment lists against a byte
model (one device, two devices of one copy domain, overlapping ranges), through the real ring
(RingHarness + FakeKernel) and directly; refusal across copy domains with nothing written; the
libiscsi ExtendedCopy / ReceiveCopyResults scenarios; concurrent copies between two devices."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_py.device.block import BlockDevice
from tcmu_py.device.copydomain import CopyDomain
from tcmu_py.device.xcopy_commands import LIMITS
from tcmu_py.handler import DeviceConfig
from tcmu_py.scsi import xcopy as x
from tcmu_py.scsi.constants import SenseKey
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing import cdbs
from tcmu_py.testing.harness import RingHarness, run_command
from tcmu_py.testing.memory import MemoryDisk

BS = 512
BLOCKS = 256
GOOD = (0, 0, 0)
COPY_TARGET_NOT_REACHABLE = (SenseKey.COPY_ABORTED, 0x0D, 0x02)


def disk(name: str, blocks: int = BLOCKS, bs: int = BS, *, blocking: bool = False) -> BlockDevice:
    backend = MemoryDisk(blocks * bs, bs, blocking=blocking)
    for i in range(blocks):  # every block distinct, so a misplaced block shows
        backend.data[i * bs : (i + 1) * bs] = (f"{name}:{i:05d}:".encode() * bs)[:bs]
    dev = BlockDevice(DeviceConfig(name, "mem", "", blocks * bs, bs), backend)
    run_command(dev, cdbs.test_unit_ready())  # the power-on unit attention
    return dev


def data_of(dev: BlockDevice) -> bytearray:
    backend = dev.backend
    assert isinstance(backend, MemoryDisk)
    return backend.data


def cscd(dev: BlockDevice, **kw: object) -> x.IdentificationCscd:
    return x.IdentificationCscd(dev.naa_designator(), dev.block_size, **kw)  # type: ignore[arg-type]


def param_list(
    targets: list[BlockDevice],
    segments: list[x.BlockToBlockSegment],
    *,
    list_id: int = 0,
    usage: int = x.ListIdUsage.NONE,
) -> bytes:
    header = x.ParameterHeader(list_id, False, usage, 0, 0, 0, 0)
    return x.ParameterList(header, tuple(cscd(t) for t in targets), tuple(segments)).build()


def xcopy(dev: BlockDevice, data: bytes, run=run_command):  # noqa: ANN001, ANN201
    if run is run_command:
        return run_command(dev, cdbs.extended_copy(len(data)), data)
    return run(cdbs.extended_copy(len(data)), data)


def apply(model: list[bytearray], seg: x.BlockToBlockSegment) -> None:
    """The byte model: memmove of the segment, source read whole before the write."""
    n = seg.number_of_blocks * BS
    src = model[seg.source_index][seg.source_lba * BS : seg.source_lba * BS + n]
    model[seg.destination_index][seg.destination_lba * BS : seg.destination_lba * BS + n] = src


@st.composite
def segment_lists(draw: st.DrawFn, n_devices: int) -> list[x.BlockToBlockSegment]:
    out = []
    for _ in range(draw(st.integers(1, LIMITS.max_segment_descriptors))):
        blocks = draw(st.integers(0, 64))
        src_lba = draw(st.integers(0, BLOCKS - blocks))
        # Half of the segments stay near their source, so overlaps in both directions are common.
        near = st.integers(max(0, src_lba - blocks), min(BLOCKS - blocks, src_lba + blocks))
        dst_lba = draw(st.one_of(near, st.integers(0, BLOCKS - blocks)))
        out.append(
            x.BlockToBlockSegment(
                draw(st.integers(0, n_devices - 1)),
                draw(st.integers(0, n_devices - 1)),
                blocks,
                src_lba,
                dst_lba,
                dc=draw(st.booleans()),
            )
        )
    return out


@settings(max_examples=120, derandomize=True, deadline=None)
@given(segment_lists(1))
def test_one_device_copies_match_memmove_model(segments):
    dev = disk("a")
    model = [bytearray(data_of(dev))]
    r = xcopy(dev, param_list([dev], segments))
    assert r.sense_codes == GOOD, r
    for seg in segments:
        apply(model, seg)
    assert data_of(dev) == model[0]


@settings(max_examples=120, derandomize=True, deadline=None)
@given(segment_lists(2), st.booleans())
def test_two_devices_of_one_domain_match_model(segments, swap):
    a, b = disk("a"), disk("b")
    domain = CopyDomain("pair")
    a.join(domain)
    b.join(domain)
    targets = [b, a] if swap else [a, b]
    model = [bytearray(data_of(t)) for t in targets]
    r = xcopy(a, param_list(targets, segments))  # received by a, whatever the direction
    assert r.sense_codes == GOOD, r
    for seg in segments:
        apply(model, seg)
    assert [data_of(t) for t in targets] == model


def test_copies_through_the_ring_match_model():
    """The same model, the command served by the production runner from a FakeKernel ring, on a
    device whose backend blocks (worker threads) — seeded, bounded."""
    import random

    rng = random.Random(19)
    a, b = disk("a", blocking=True), disk("b")
    domain = CopyDomain("ring")
    a.join(domain)
    b.join(domain)
    model = [bytearray(data_of(a)), bytearray(data_of(b))]
    h = RingHarness(a)
    try:
        for _ in range(40):
            segs = []
            for _ in range(rng.randint(1, 4)):
                n = rng.randint(0, 48)
                segs.append(x.BlockToBlockSegment(rng.randint(0, 1), rng.randint(0, 1), n,
                                                  rng.randint(0, BLOCKS - n),
                                                  rng.randint(0, BLOCKS - n)))
            r = xcopy(a, param_list([a, b], segs), run=h.run)
            assert r.sense_codes == GOOD, r
            for seg in segs:
                apply(model, seg)
            assert [data_of(a), data_of(b)] == model
    finally:
        h.close()


# --- copy domains ----------------------------------------------------------------------------


@pytest.mark.parametrize("outside", ["source", "destination"])
def test_device_outside_the_domain_is_unreachable_and_nothing_moves(outside):
    a, b = disk("a"), disk("b")  # each alone in its default domain
    before = bytes(data_of(a)), bytes(data_of(b))
    targets = [b, a] if outside == "source" else [a, b]
    r = xcopy(a, param_list(targets, [x.BlockToBlockSegment(0, 1, 16, 0, 0)]))
    assert r.sense_codes == COPY_TARGET_NOT_REACHABLE
    assert (bytes(data_of(a)), bytes(data_of(b))) == before


def test_unreachable_cscd_is_refused_before_any_segment_runs():
    # Segment 0 is a valid copy within a; segment 1 names b of another domain: nothing runs.
    a, b = disk("a"), disk("b")
    before = bytes(data_of(a))
    segs = [x.BlockToBlockSegment(0, 0, 8, 0, 100), x.BlockToBlockSegment(0, 1, 8, 0, 0)]
    r = xcopy(a, param_list([a, b], segs))
    assert r.sense_codes == COPY_TARGET_NOT_REACHABLE
    assert bytes(data_of(a)) == before


def test_leaving_a_domain_and_closing_make_devices_unreachable():
    a, b = disk("a"), disk("b")
    shared = CopyDomain("shared")
    a.join(shared)
    b.join(shared)
    assert shared.find(b.naa_designator()) is b
    seg = [x.BlockToBlockSegment(0, 1, 4, 0, 0)]
    assert xcopy(a, param_list([a, b], seg)).sense_codes == GOOD
    b.close()
    assert shared.find(b.naa_designator()) is None
    assert xcopy(a, param_list([a, b], seg)).sense_codes == COPY_TARGET_NOT_REACHABLE
    b.join(CopyDomain("own"))
    assert shared.devices() == [a]


def test_segment_beyond_capacity_is_copy_aborted_and_untouched():
    a = disk("a")
    before = bytes(data_of(a))
    # libiscsi ValidSegDescr "beyond EOL": 2048 blocks ending past the last LBA.
    for seg in (x.BlockToBlockSegment(0, 0, 16, 0, BLOCKS - 1),
                x.BlockToBlockSegment(0, 0, 16, BLOCKS - 8, 0)):
        r = xcopy(a, param_list([a], [seg]))
        assert r.sense_codes == (SenseKey.COPY_ABORTED, 0, 0)
    assert bytes(data_of(a)) == before


def test_block_sizes_differ_dc_counts_destination_blocks():
    a = disk("a")
    big = disk("big", blocks=32, bs=4096)
    shared = CopyDomain("mixed")
    a.join(shared)
    big.join(shared)
    # DC 1: 2 destination blocks of 4096 bytes = 16 source blocks of 512.
    seg = x.BlockToBlockSegment(0, 1, 2, 8, 3, dc=True)
    assert xcopy(a, param_list([a, big], [seg])).sense_codes == GOOD
    assert data_of(big)[3 * 4096 : 5 * 4096] == data_of(a)[8 * BS : 24 * BS]
    # DC 0: 3 source blocks of 512 is no whole number of 4096-byte blocks.
    r = xcopy(a, param_list([a, big], [x.BlockToBlockSegment(0, 1, 3, 0, 0)]))
    assert r.sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)


def test_wrong_disk_block_length_is_invalid_field():
    a = disk("a")
    header = x.ParameterHeader(0, False, 3, 0, 0, 0, 0)
    plist = x.ParameterList(header, (cscd(a).__class__(a.naa_designator(), 4096),),
                            (x.BlockToBlockSegment(0, 0, 1, 0, 1),))
    r = xcopy(a, plist.build())
    assert r.sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
    assert parse_sense(r.sense).field_pointer == 16 + 29


# --- libiscsi scenarios ------------------------------------------------------------------------


def _op_params(dev: BlockDevice) -> x.OperatingParameters:
    r = run_command(dev, cdbs.receive_copy_results(3), data_in_len=1024)
    assert r.good, r
    return x.OperatingParameters.parse(r.data)


def test_operating_parameters_and_vpd_8f_agree():
    a = disk("a")
    params = _op_params(a)
    assert params.limits == a.copy_manager.limits()
    assert set(params.implemented_descriptors) == {0x02, 0xE4}
    pages = run_command(a, cdbs.inquiry(evpd=True, page_code=0), data_in_len=255).data
    assert 0x8F in pages[4:]
    vpd = run_command(a, cdbs.inquiry(evpd=True, page_code=0x8F, allocation_length=1024),
                      data_in_len=1024)
    descs = x.parse_vpd_third_party_copy(vpd.data)
    assert x.parse_supported_commands(descs[0x0001]) == {0x83: (0,), 0x84: (0, 3, 4)}
    p = descs[0x0004]
    assert int.from_bytes(p[4:6], "big") == params.limits.max_cscd_descriptors
    assert int.from_bytes(p[6:8], "big") == params.limits.max_segment_descriptors
    assert int.from_bytes(p[8:12], "big") == params.limits.max_descriptor_list_length
    g = descs[0x8001]
    assert int.from_bytes(g[8:12], "big") == params.limits.max_segment_length
    assert int.from_bytes(g[0:4], "big") == params.limits.total_concurrent_copies


def test_descriptor_limits_as_libiscsi_sends_them():
    a = disk("a")
    lim = _op_params(a).limits
    seg = x.BlockToBlockSegment(0, 0, 8, 0, 100)
    too_many_cscd = param_list([a] * (lim.max_cscd_descriptors + 1), [seg])
    assert xcopy(a, too_many_cscd).sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x06)
    too_many_seg = param_list([a], [seg] * (lim.max_segment_descriptors + 1))
    assert xcopy(a, too_many_seg).sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x08)
    # More than MAXIMUM DESCRIPTOR LIST LENGTH: as libiscsi sizes it.
    n = (lim.max_descriptor_list_length + x.B2B_LENGTH
         - (lim.max_cscd_descriptors + 1) * x.CSCD_LENGTH) // x.B2B_LENGTH
    over = param_list([a] * (lim.max_cscd_descriptors + 1), [seg] * n)
    assert xcopy(a, over).sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)


def test_parameter_list_lengths_as_libiscsi_sends_them():
    a = disk("a")
    data = param_list([a], [x.BlockToBlockSegment(0, 0, 8, 0, 100)])
    for cut in (16 + 32 - 1, len(data) - 1):
        r = run_command(a, cdbs.extended_copy(cut), data[:cut])
        assert r.sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
    assert run_command(a, cdbs.extended_copy(0)).good


def test_unsupported_descriptor_types():
    a = disk("a")
    data = bytearray(param_list([a], [x.BlockToBlockSegment(0, 0, 8, 0, 100)]))
    bad_cscd = bytes(data[:16]) + b"\xe0" + bytes(data[17:])
    assert xcopy(a, bad_cscd).sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x07)
    data[48] = 0x0C  # stream-to-stream... not 02h
    assert xcopy(a, bytes(data)).sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x09)


def test_reserved_lu_id_type_is_ignored_spc4():
    # libiscsi ValidTgtDescr: an SPC-4 device ignores LU ID TYPE (reserved there) -> GOOD.
    a = disk("a")
    header = x.ParameterHeader(0, False, 3, 0, 0, 0, 0)
    plist = x.ParameterList(header, (cscd(a, lu_id_type=2),),
                            (x.BlockToBlockSegment(0, 0, 8, 0, 100),))
    assert xcopy(a, plist.build()).good
    assert data_of(a)[100 * BS : 108 * BS] == data_of(a)[0 : 8 * BS]


def test_copy_status_lifecycle():
    a = disk("a")
    status = cdbs.receive_copy_results(0, list_identifier=1)
    assert run_command(a, status, data_in_len=64).sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x24, 0)
    seg = x.BlockToBlockSegment(0, 0, 8, 0, 100)
    assert xcopy(a, param_list([a], [seg, seg], list_id=1, usage=x.ListIdUsage.HOLD)).good
    r = run_command(a, status, data_in_len=64)
    assert r.good
    got = x.CopyStatus.parse(r.data)
    assert (got.status, got.segments_processed, got.transfer_count) == (1, 2, 16 * BS)
    # Reported once: the completed copy's status is gone afterwards.
    assert not run_command(a, status, data_in_len=64).good
    # LIST ID USAGE 10b holds nothing.
    assert xcopy(a, param_list([a], [seg], list_id=2, usage=x.ListIdUsage.NO_HOLD)).good
    assert not run_command(a, cdbs.receive_copy_results(0, 2), data_in_len=64).good


def test_failed_copy_status_and_segment_details():
    a = disk("a")

    class Broken(MemoryDisk):
        def read(self, offset, bufs):  # noqa: ANN001
            raise OSError(5, "EIO")

    b = BlockDevice(DeviceConfig("b", "mem", "", BLOCKS * BS), Broken(BLOCKS * BS))
    run_command(b, cdbs.test_unit_ready())
    domain = CopyDomain("d")
    a.join(domain)
    b.join(domain)
    seg = x.BlockToBlockSegment(1, 0, 8, 0, 100)
    r = xcopy(a, param_list([a, b], [seg], list_id=7, usage=x.ListIdUsage.HOLD))
    assert r.sense_codes == (SenseKey.COPY_ABORTED, 0x11, 0x00)
    st_ = x.CopyStatus.parse(run_command(a, cdbs.receive_copy_results(0, 7), data_in_len=64).data)
    assert (st_.status, st_.segments_processed) == (2, 0)
    details = run_command(a, cdbs.receive_copy_results(4, 7), data_in_len=256)
    assert details.good and details.data[56] == 0x02
    assert parse_sense(details.data[60:]).sense_key == SenseKey.COPY_ABORTED


def test_rsoc_lists_the_copy_commands():
    a = disk("a")
    for sa in (0, 3, 4):
        r = run_command(a, cdbs.report_supported_operation_codes(2, 0x84, sa), data_in_len=64)
        assert r.good and r.data[1] & 0x07 == 3, (sa, r)
    assert run_command(a, cdbs.report_supported_operation_codes(2, 0x83, 0),
                       data_in_len=64).data[1] & 0x07 == 3
    lid4 = bytearray(cdbs.extended_copy(0))
    lid4[1] = 0x01
    assert run_command(a, bytes(lid4)).sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x24, 0)


# --- concurrency -------------------------------------------------------------------------------


def test_two_devices_copying_to_each_other_finish():
    """Copies a->b and b->a (and COMPARE AND WRITE-free overlapping copies within each) from
    several threads at once: every command completes GOOD within the deadline (no deadlock)."""
    a, b = disk("a", blocking=True), disk("b", blocking=True)
    domain = CopyDomain("x")
    a.join(domain)
    b.join(domain)
    errors: list[object] = []

    def worker(dev: BlockDevice, other: BlockDevice, seed: int) -> None:
        for i in range(30):
            lba = (seed * 7 + i * 13) % (BLOCKS - 32)
            segs = [x.BlockToBlockSegment(0, 1, 32, lba, (lba + 5) % (BLOCKS - 32)),
                    x.BlockToBlockSegment(1, 0, 32, lba, lba)]
            r = xcopy(dev, param_list([dev, other], segs))
            if r.sense_codes not in (GOOD, (SenseKey.ILLEGAL_REQUEST, 0x55, 0x03)):
                errors.append(r)

    threads = [threading.Thread(target=worker, args=(d, o, s))
               for s, (d, o) in enumerate([(a, b), (b, a), (a, b), (b, a)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "copies did not finish: deadlock"
    assert errors == []
