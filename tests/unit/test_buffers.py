"""tcmu_py.buffers: every operation agrees with slicing the concatenation of the list."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_py import buffers

lists = st.lists(st.binary(max_size=40), max_size=8)


def views(parts: list[bytes]) -> list[memoryview]:
    return [memoryview(bytearray(p)) for p in parts]


@settings(max_examples=200, derandomize=True, deadline=None)
@given(lists, st.integers(0, 400), st.integers(0, 400))
def test_slice_views_and_gather_are_the_slice_of_the_concatenation(parts, offset, length):
    whole = b"".join(parts)
    got = buffers.slice_views(views(parts), offset, length)
    assert b"".join(got) == whole[offset : offset + length]
    assert all(len(v) for v in got)  # no empty views handed to preadv/pwritev
    assert buffers.gather(views(parts), offset, length) == whole[offset : offset + length]


def test_slice_views_are_views_of_the_same_memory():
    bufs = views([b"abcd", b"efgh"])
    (a, b) = buffers.slice_views(bufs, 2, 4)
    a[:] = b"XY"
    b[:] = b"ZW"
    assert [bytes(v) for v in bufs] == [b"abXY", b"ZWgh"]


@settings(max_examples=200, derandomize=True, deadline=None)
@given(lists, st.integers(0, 400))
def test_skip_is_what_follows_the_first_n_bytes(parts, n):
    whole = b"".join(parts)
    rest = buffers.skip(parts, n)
    assert b"".join(rest) == whole[n:]
    assert all(len(b) for b in rest)
    mv = views(parts)
    assert b"".join(buffers.skip(mv, n)) == whole[n:]


@settings(max_examples=200, derandomize=True, deadline=None)
@given(lists, st.integers(0, 400))
def test_zero_after_skip_clears_exactly_the_tail(parts, n):
    bufs = views(parts)
    buffers.zero(buffers.skip(bufs, n))
    whole = b"".join(parts)
    assert b"".join(bytes(b) for b in bufs) == whole[:n] + bytes(max(len(whole) - n, 0))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(lists, st.integers(0, 400), st.binary(max_size=120))
def test_scatter_writes_the_slice_of_the_concatenation(parts, offset, data):
    bufs = views(parts)
    whole = bytearray(b"".join(parts))
    n = buffers.scatter(bufs, offset, data)
    assert n == max(0, min(len(data), len(whole) - offset))
    whole[offset : offset + n] = data[:n]
    assert b"".join(bytes(b) for b in bufs) == bytes(whole)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(lists, st.integers(0, 400), st.one_of(st.none(), st.integers(0, 400)),
       st.binary(max_size=120), st.integers(0, 400))
def test_command_data_helpers_agree_with_the_concatenation(parts, offset, length, data, at):
    """Command's Data-In / Data-Out helpers are the buffers module's operations."""
    from tcmu_py.device.command import Command

    whole = b"".join(parts)
    cmd = Command(b"\x00" * 6, views(parts))
    assert cmd.read_data_out(length) == whole[: length]
    n = cmd.write_data_in(data, at)
    expect = bytearray(whole)
    expect[at : at + n] = data[:n]
    assert n == max(0, min(len(data), len(whole) - at))
    cmd.zero_data_in(offset, length)
    end = len(expect) if length is None else min(offset + length, len(expect))
    expect[offset:end] = bytes(max(end - offset, 0))
    assert b"".join(bytes(b) for b in cmd.data_in) == bytes(expect)
