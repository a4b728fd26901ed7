// The multi-array kernels: one launch works on many arrays (every parameter of a model, or every
// gradient) instead of one launch per array. Block b does row b of a table the host built once
// (_chunk_table): the address of one chunk of each array, the chunk's length n, and a tag.
// Part of the one program numgpt/kernels.py compiles: its source(dtype) defines REAL and the rest.
#define CHUNK_ROW(table, arrays) (table + (long long)blockIdx.x * ((arrays) + 2))
#define CHUNK_ARRAY(row, k) ((REAL*)(row)[k])

// row (a, n, tag): a *= factor
extern "C" __global__ void scale_chunks(const long long* table, REAL factor) {
    const long long* row = CHUNK_ROW(table, 1);
    REAL* a = CHUNK_ARRAY(row, 0);
    for (long long i = threadIdx.x; i < row[1]; i += blockDim.x) a[i] *= factor;
}

// row (dst, src, n, tag): dst = src / divisor, or with add dst += src / divisor
extern "C" __global__ void accumulate_chunks(const long long* table, REAL divisor, int add) {
    const long long* row = CHUNK_ROW(table, 2);
    REAL *dst = CHUNK_ARRAY(row, 0), *src = CHUNK_ARRAY(row, 1);
    for (long long i = threadIdx.x; i < row[2]; i += blockDim.x) dst[i] = (add ? dst[i] : (REAL)0) + src[i] / divisor;
}

// row (a, n, tag): partial[b] = sum of a^2 over the chunk, each square rounded to REAL and summed in double
extern "C" __global__ void sum_squares_chunks(const long long* table, double* partial) {
    __shared__ double warp_totals[32];
    const long long* row = CHUNK_ROW(table, 1);
    const REAL* a = CHUNK_ARRAY(row, 0);
    double total = 0;
    for (long long i = threadIdx.x; i < row[1]; i += blockDim.x) total += (double)(a[i] * a[i]);
    total = warp_sum(total);
    if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = total;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (unsigned w = 1; w < blockDim.x / 32; ++w) total += warp_totals[w];
        partial[blockIdx.x] = total;
    }
}

// row (a, n, tag): *found = 1 when the chunk holds an inf or a nan (threads may race to write it: all write 1)
extern "C" __global__ void nonfinite_chunks(const long long* table, int* found) {
    const long long* row = CHUNK_ROW(table, 1);
    const REAL* a = CHUNK_ARRAY(row, 0);
    for (long long i = threadIdx.x; i < row[1]; i += blockDim.x)
        if (!isfinite(a[i])) *found = 1;
}

// row (p, g, m, v, n, decays): AdamW in place, the arithmetic of numgpt.optim.AdamW.step; a
// parameter tagged 0 is not decayed. Each gradient is first multiplied by *grad_scale, a number
// on the device (clipping's coefficient: the host never reads it)
extern "C" __global__ void adamw_chunks(const long long* table, const double* grad_scale, REAL decay,
                                        REAL one_minus_b1, REAL b2, REAL one_minus_b2, REAL bias_correction2_sqrt,
                                        REAL eps, REAL step_size) {
    const long long* row = CHUNK_ROW(table, 4);
    REAL *p = CHUNK_ARRAY(row, 0), *g = CHUNK_ARRAY(row, 1), *m = CHUNK_ARRAY(row, 2), *v = CHUNK_ARRAY(row, 3);
    REAL keep = row[5] ? decay : (REAL)1, scale = (REAL)*grad_scale;
    for (long long i = threadIdx.x; i < row[4]; i += blockDim.x) {
        REAL gi = g[i] * scale;
        REAL mi = m[i] + (gi - m[i]) * one_minus_b1;
        REAL vi = v[i] * b2 + gi * gi * one_minus_b2;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * keep - mi / (sqrt(vi) / bias_correction2_sqrt + eps) * step_size;
    }
}
