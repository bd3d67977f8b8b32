"""The daemon: device discovery and lifecycle (`serve`), configuration, LIO objects, status."""

#: Longest busy-poll watch for the next command, in microseconds (`DeviceRunner.run`): adaptive,
#: so only a device whose commands follow each other within this long ever spins. Here rather
#: than in `serve` so the command line can show it without importing the daemon.
DEFAULT_POLL_US = 1000

#: Whether `serve` runs plain READ/WRITE of file-extent devices (raw, thin) in C (`serve
#: --data-plane / --no-data-plane`). The same as `tcmu_py.device.runner.DEFAULT_DATA_PLANE` (a unit
#: test checks), kept here so the command line can show it without importing the data path.
DEFAULT_DATA_PLANE = True

#: Whether that data plane runs on a native (C) thread per device that owns the ring (`serve
#: --native-loop / --no-native-loop`; issue 17 stage 2), rather than in the Python loop thread's
#: dequeue. The same as `tcmu_py.device.runner.DEFAULT_NATIVE_LOOP` (a unit test checks).
DEFAULT_NATIVE_LOOP = True
