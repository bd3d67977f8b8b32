/*
 * tcmu-py ring binding: the body of the journal record checksum, included after <xxhash.h> by
 * _ring.c (the SIMD build the compiler picks) and by _jl_sum_scalar.c (XXH_VECTOR 0), each
 * naming the function TCMU_PY_JL_SUM_NAME: one definition of the sum journal.py checks
 * (XXH3-64 of head[0..head_len) followed by the buffers v[k], offsets into map), two builds.
 */
uint64_t TCMU_PY_JL_SUM_NAME(const uint8_t *head, size_t head_len, const uint8_t *map,
                             const struct iovec *v, uint32_t n_iov);

uint64_t TCMU_PY_JL_SUM_NAME(const uint8_t *head, size_t head_len, const uint8_t *map,
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
