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

uint64_t tcmu_py_jl_sum_scalar(const uint8_t *head, size_t head_len, const uint8_t *map,
                               const struct iovec *v, uint32_t n_iov);

/* XXH3-64 of head[0..head_len) followed by the buffers v[k] (offsets into map). */
uint64_t tcmu_py_jl_sum_scalar(const uint8_t *head, size_t head_len, const uint8_t *map,
                               const struct iovec *v, uint32_t n_iov)
{
    XXH3_state_t st;
    uint32_t i;

    XXH3_64bits_reset(&st);
    XXH3_64bits_update(&st, head, head_len);
    for (i = 0; i < n_iov; i++)
        XXH3_64bits_update(&st, map + (uintptr_t)v[i].iov_base, v[i].iov_len);
    return XXH3_64bits_digest(&st);
}
