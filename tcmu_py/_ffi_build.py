"""cffi API-mode builder for the TCMU ring binding, `tcmu_py._tcmu_ring`.

Run by setuptools (`cffi_modules` in setup.py) during `pip install`. The binding's own C
surface is declared in `_ring.h` (a real header that is also the cdef) and implemented in
`_ring.c`; both are compiled against the system's `<linux/target_core_user.h>`, so every
struct layout and constant comes from the kernel header rather than being retyped. The
kernel structs are declared below only so `ffi.offsetof` / `ffi.sizeof` can check the
pure-Python offsets in `tcmu_py.ring` (tests/unit/test_ffi_offsets.py).
"""

import os
import runpy

from cffi import FFI

HEADER = "/usr/include/linux/target_core_user.h"
HERE = os.path.dirname(os.path.abspath(__file__))

if not os.path.exists(HEADER):
    raise SystemExit(
        f"tcmu-py: {HEADER} not found. Install the Linux UAPI headers "
        "(Debian/Ubuntu: apt-get install linux-libc-dev; Fedora: kernel-headers) and retry."
    )

# The kernel's declarations, as cffi needs them: "..." lets the compiler supply the real
# (packed, cacheline-aligned) layout and the values of the constants.
KERNEL_CDEF = """
#define TCMU_MAILBOX_VERSION ...
#define TCMU_MAILBOX_FLAG_CAP_OOOC ...
#define TCMU_MAILBOX_FLAG_CAP_READ_LEN ...
#define TCMU_MAILBOX_FLAG_CAP_TMR ...
#define TCMU_MAILBOX_FLAG_CAP_KEEP_BUF ...
#define TCMU_UFLAG_UNKNOWN_OP ...
#define TCMU_UFLAG_READ_LEN ...
#define TCMU_UFLAG_KEEP_BUF ...
#define TCMU_OP_MASK ...
#define TCMU_OP_ALIGN_SIZE ...
#define TCMU_SENSE_BUFFERSIZE ...
#define TCMU_TMR_UNKNOWN ...
#define TCMU_TMR_ABORT_TASK ...
#define TCMU_TMR_ABORT_TASK_SET ...
#define TCMU_TMR_CLEAR_ACA ...
#define TCMU_TMR_CLEAR_TASK_SET ...
#define TCMU_TMR_LUN_RESET ...
#define TCMU_TMR_TARGET_WARM_RESET ...
#define TCMU_TMR_TARGET_COLD_RESET ...
#define TCMU_TMR_LUN_RESET_PRO ...

enum tcmu_opcode { TCMU_OP_PAD, TCMU_OP_CMD, TCMU_OP_TMR, ... };

struct tcmu_mailbox {
    uint16_t version;
    uint16_t flags;
    uint32_t cmdr_off;
    uint32_t cmdr_size;
    uint32_t cmd_head;
    uint32_t cmd_tail;
    ...;
};

struct tcmu_cmd_entry_hdr {
    uint32_t len_op;
    uint16_t cmd_id;
    uint8_t kflags;
    uint8_t uflags;
    ...;
};

struct iovec {
    void *iov_base;
    size_t iov_len;
    ...;
};

struct tcmu_cmd_entry {
    struct tcmu_cmd_entry_hdr hdr;
    union {
        struct {
            uint32_t iov_cnt;
            uint32_t iov_bidi_cnt;
            uint32_t iov_dif_cnt;
            uint64_t cdb_off;
            uint64_t __pad1;
            uint64_t __pad2;
            struct iovec iov[];
        } req;
        struct {
            uint8_t scsi_status;
            uint8_t __pad1;
            uint16_t __pad2;
            uint32_t read_len;
            char sense_buffer[96];
        } rsp;
    };
    ...;
};

struct tcmu_tmr_entry {
    struct tcmu_cmd_entry_hdr hdr;
    uint8_t tmr_type;
    uint8_t __pad1;
    uint16_t __pad2;
    uint32_t cmd_cnt;
    uint64_t __pad3;
    uint64_t __pad4;
    uint16_t cmd_ids[];
    ...;
};
"""


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


#: Compiled in; `tcmu_py.ring` refuses a binding whose digest is not its sources' (`_sources`).
SOURCE_DIGEST = runpy.run_path(os.path.join(HERE, "_sources.py"))["digest"](HERE)

ffibuilder = FFI()
ffibuilder.cdef(KERNEL_CDEF)
ffibuilder.cdef(_read("_ring.h"))
ffibuilder.cdef("const char *tcmu_py_source_digest(void);")
ffibuilder.set_source(
    "tcmu_py._tcmu_ring",
    # _ring.c is compiled as part of this translation unit so its functions can be inlined
    # into the cffi wrappers; it includes <linux/target_core_user.h> and "_ring.h".
    _read("_ring.c")
    + f'\nconst char *tcmu_py_source_digest(void) {{ return "{SOURCE_DIGEST}"; }}\n',
    # the journal record checksum's scalar build (XXH_VECTOR differs: a translation unit of
    # its own; _ring.c picks the faster build at run time)
    sources=[os.path.relpath(os.path.join(HERE, "_jl_sum_scalar.c"))],
    include_dirs=[HERE],
    libraries=["m", "pthread"],  # log2() for the latency histogram; the native loop thread
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-address-of-packed-member"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(HERE), verbose=True)
