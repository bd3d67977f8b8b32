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
