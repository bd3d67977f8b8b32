"""cffi API-mode builder for the TCMU ring binding (placeholder: extended by the ring work)."""

import os

from cffi import FFI

HEADER = "/usr/include/linux/target_core_user.h"

if not os.path.exists(HEADER):
    raise SystemExit(
        f"tcmu-py: {HEADER} not found. Install the Linux UAPI headers "
        "(Debian/Ubuntu: apt-get install linux-libc-dev) and retry."
    )

ffibuilder = FFI()
ffibuilder.cdef("int tcmu_py_mailbox_size(void);")
ffibuilder.set_source(
    "tcmu_py._tcmu_ring",
    "#include <linux/target_core_user.h>\n"
    "static int tcmu_py_mailbox_size(void) { return sizeof(struct tcmu_mailbox); }\n",
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
