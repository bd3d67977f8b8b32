/*
 * tcmu-py ring binding: the journal record checksum, scalar build (compiled beside _ring.c by
 * _ffi_build.py as a translation unit of its own).
 *
 * XXH3-64 (Debian's libxxhash-dev header, compiled in) without SIMD: _ring.c has the build the
 * compiler picks for the CPU (SSE2 on x86-64) and times both once per process, keeping the
 * faster (tcmu_py_jl_pick_sum). Both compute the same function; which one runs faster depends
 * on the CPU: under QEMU's software emulation (the VM lab) the scalar one is 2.5x faster, on a
 * real x86-64 CPU the SSE2 one about 2x (docs/benchmarks.md).
 */
#define XXH_INLINE_ALL
#define XXH_VECTOR 0                            /* XXH_SCALAR */
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <xxhash.h>

#define TCMU_PY_JL_SUM_NAME tcmu_py_jl_sum_scalar
#include "_jl_sum.h"
