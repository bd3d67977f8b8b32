"""Public test kit: run handlers without a kernel, exactly as the kernel would drive them.

- `FakeKernel` plays target_core_user's side of the ring over a bytearray; `FakeUio` gives it the
  surface of an open /dev/uioN.
- `RingHarness` connects a device to a FakeKernel through the production ring and runner.
- `run_command` executes one command on a device directly (no ring).
- `cdbs` builds CDBs by name and field.
- `MemoryDisk` is a disk in a bytearray, the smallest BlockBackend (subclass it to add or
  break a capability).
- `check_block_handler` / `check_any_device` are conformance checks any handler can run.
- `wait_until` polls a condition until it holds or a deadline passes (never a fixed sleep).
- `tcmu_py.testing.fuzz` (import it by name) fuzzes a device with generated CDBs and parameter
  lists through the ring, and the ring itself with corrupted entries; `replay` rebuilds a case.

Nothing here imports pytest.
"""

from tcmu_py.testing import cdbs
from tcmu_py.testing.conformance import check_any_device, check_block_handler
from tcmu_py.testing.fake_kernel import FakeKernel, FakeKernelError, Pending
from tcmu_py.testing.fake_uio import FakeUio
from tcmu_py.testing.harness import Result, RingHarness, run_command
from tcmu_py.testing.memory import MemoryDisk
from tcmu_py.testing.waiting import wait_until

__all__ = [
    "FakeKernel",
    "FakeKernelError",
    "FakeUio",
    "MemoryDisk",
    "Pending",
    "Result",
    "RingHarness",
    "cdbs",
    "check_any_device",
    "check_block_handler",
    "run_command",
    "wait_until",
]
