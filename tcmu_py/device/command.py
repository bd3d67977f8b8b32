"""What a handler sees of one SCSI command, and what it may answer.

Contract: a `Command`'s buffers are views of the kernel's data area. They are valid only until the
command is completed; a handler must not keep them (or slices of them) after it returns or, for an
asynchronous handler, after its future resolves. Copy what must outlive the command.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from tcmu_py.buffers import gather, scatter, slice_views, zero

GOOD = 0x00


class Command:
    """One SCSI command: the CDB and the Data-Out / Data-In buffers the initiator provided.

    For a command without BIDI, the kernel supplies a single list of buffers whose direction
    follows the CDB, so `data_out` and `data_in` are the same list; a handler reads parameter
    data from it or writes its answer into it according to what the opcode means.
    """

    __slots__ = ("cdb", "opcode", "data_out", "data_in", "data_out_length", "data_in_length", "tag",
                 "native_error", "arrived")

    def __init__(
        self,
        cdb: bytes,
        data_out: Sequence[memoryview] = (),
        data_in: Sequence[memoryview] | None = None,
        tag: int = 0,
        *,
        lengths: tuple[int, int] | None = None,
        native_error: int = 0,
        arrived: float | None = None,
    ) -> None:
        """`lengths`: (bytes of data_out, bytes of data_in) when the caller already knows them
        (the runner does, from the ring); otherwise they are summed here. `native_error`: the
        errno the C data plane's own attempt at this command failed with (0: none, or not
        tried): a handler may answer from it instead of trying again (the ceph device answers
        a cluster that did not respond NOT READY at once, within one ``osd_op_timeout``).
        `arrived`: when the command was taken from the ring (`time.monotonic`; default now):
        the kernel's ``cmd_time_out`` runs from about then, whatever waited in between (a
        worker busy with an earlier command), so a handler that bounds its own waits counts
        from it."""
        self.arrived = time.monotonic() if arrived is None else arrived
        self.cdb = cdb
        self.opcode = cdb[0]
        self.data_out = data_out
        self.data_in = data_out if data_in is None else data_in
        self.tag = tag
        self.native_error = native_error
        if lengths is not None:
            self.data_out_length, self.data_in_length = lengths
            return
        self.data_out_length = sum(len(b) for b in self.data_out)
        self.data_in_length = (
            self.data_out_length if data_in is None else sum(len(b) for b in self.data_in)
        )

    def read_data_out(self, limit: int | None = None) -> bytes:
        """Gather (copy) up to `limit` bytes of Data-Out; for parameter lists, not bulk data."""
        want = self.data_out_length if limit is None else min(limit, self.data_out_length)
        return gather(self.data_out, 0, want)

    def write_data_in(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter `data` into the Data-In buffers starting at byte `offset`.

        Returns the number of bytes written: as much of `data` as fits, silently truncated at the
        end of the buffers (SPC-5 4.2.5.6: allocation length truncation is not an error).
        """
        return scatter(self.data_in, offset, data)

    def zero_data_in(self, offset: int = 0, length: int | None = None) -> None:
        """Fill Data-In with zeros from `offset` for `length` bytes (default: to the end)."""
        end = self.data_in_length if length is None else min(offset + length, self.data_in_length)
        zero(slice_views(self.data_in, offset, end - offset))


@dataclass(slots=True)
class Response:
    """A completed command as it goes back to the kernel.

    `data_in_length` is how many bytes of Data-In are valid (None: all of them); when it is smaller
    than the buffers the initiator sees a residual (TCMU READ_LEN).
    """

    status: int = GOOD
    sense: bytes = b""
    data_in_length: int | None = None
