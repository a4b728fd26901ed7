// Sums and maxima across the lanes of a warp, through shuffles: no shared memory, no barrier.
// Every lane passes its value and gets the result back.
// Part of the one program numgpt/kernels.py compiles: its source(dtype) defines REAL and the rest.

template <class F> __device__ __forceinline__ F warp_sum(F v) {   // REAL, or double for a float sum
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;   // every lane holds the sum
}

__device__ __forceinline__ REAL warp_max(REAL v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// the sum over the G lanes (a power of 2, at most 32) that share a row: lanes 0..G-1, G..2G-1, ...
__device__ __forceinline__ REAL group_sum(REAL v, int G) {
    for (int offset = G / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}
