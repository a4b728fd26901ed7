// Softmaxes: the attention's causal one and its backward, and the cross-entropy's parts.
// Part of the one program numgpt/kernels.py compiles: its source(dtype) defines REAL and the rest.

// in place, one warp per row of scores (rows, Tk); row i of each (Tq, Tk) matrix is position
// Tk - Tq + i and sees columns <= it: softmax over those, 0 beyond
extern "C" __global__ void causal_softmax(REAL* s, long long rows, int Tq, int Tk) {
    long long row = blockIdx.x;
    int lane = threadIdx.x;
    if (row >= rows) return;
    int last = Tk - Tq + (int)(row % Tq);
    REAL* sr = s + row * Tk;
    REAL m = sr[0];   // column 0 is always visible
    for (int c = lane; c <= last; c += 32) m = max(m, sr[c]);
    m = warp_max(m);
    REAL sum = 0;
    for (int c = lane; c <= last; c += 32) { REAL e = exp(sr[c] - m); sr[c] = e; sum += e; }
    REAL inv = (REAL)1 / warp_sum(sum);
    for (int c = lane; c < Tk; c += 32) sr[c] = c <= last ? sr[c] * inv : (REAL)0;
}

// one warp per row: ds = p (dp - sum(dp p))
extern "C" __global__ void softmax_backward(const REAL* dp, const REAL* p, REAL* ds, long long rows, int T) {
    long long row = blockIdx.x;
    int lane = threadIdx.x;
    if (row >= rows) return;
    long long offset = row * T;
    REAL dot = 0;
    for (int c = lane; c < T; c += 32) dot += dp[offset + c] * p[offset + c];
    dot = warp_sum(dot);
    for (int c = lane; c < T; c += 32) ds[offset + c] = p[offset + c] * (dp[offset + c] - dot);
}

// exp(x - top) for x <= top, and 0 where both are -inf: a logit of -inf (a token ruled out) weighs
// nothing, as in the twin, which subtracts a finite row max; exp(-inf - -inf) would be nan. A part
// whose max is still -inf has seen only such logits
__device__ __forceinline__ REAL exp_below(REAL x, REAL top) {
    return x == top && x < 0 && !isfinite(x) ? (REAL)0 : exp(x - top);
}

// (m, s) of a row part: its max m and sum of exp(x - m); merged with another part's (m2, s2)
__device__ __forceinline__ void merge_max_sum(REAL& m, REAL& s, REAL m2, REAL s2) {
    REAL top = max(m, m2);
    s = s * exp_below(m, top) + s2 * exp_below(m2, top);
    m = top;
}

// one block per row of logits (rows, V): shift = row max, exps = exp(logits - shift) (may be the
// logits' own memory; or, OUT = HALF, float16 for the classifier's matmuls), sumexp = row sum of
// exps. Each thread keeps a running max and sum of its columns (one pass), the block merges them,
// and a second pass writes the exps.
template <class OUT>
__device__ void softmax_parts_rows(const REAL* logits, OUT* exps, REAL* sumexp, REAL* shift, int V) {
    __shared__ REAL warp_m[32], warp_s[32];
    const REAL* row = logits + (long long)blockIdx.x * V;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    REAL m = row[0], s = 0;   // start from a real logit: merging two -inf maxima would make nan
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
        REAL x = row[c];
        if (x > m) { s = s * exp(m - x) + (REAL)1; m = x; } else s += exp_below(x, m);
    }
    for (int offset = 16; offset > 0; offset >>= 1)
        merge_max_sum(m, s, __shfl_xor_sync(0xffffffff, m, offset), __shfl_xor_sync(0xffffffff, s, offset));
    if (lane == 0) { warp_m[warp] = m; warp_s[warp] = s; }
    __syncthreads();
    m = warp_m[0]; s = warp_s[0];   // every thread merges the warps' parts: a few, from shared memory
    for (int w = 1; w < warps; ++w) merge_max_sum(m, s, warp_m[w], warp_s[w]);
    OUT* out = exps + (long long)blockIdx.x * V;
    for (int c = threadIdx.x; c < V; c += blockDim.x) store(&out[c], exp(row[c] - m));
    if (threadIdx.x == 0) { sumexp[blockIdx.x] = s; shift[blockIdx.x] = m; }
}

extern "C" __global__ void softmax_parts(const REAL* logits, REAL* exps, REAL* sumexp, REAL* shift, int V) {
    softmax_parts_rows(logits, exps, sumexp, shift, V);
}
#if REAL_IS_FLOAT   // as gelu_forward_half
extern "C" __global__ void softmax_parts_half(const REAL* logits, HALF* exps, REAL* sumexp, REAL* shift, int V) {
    softmax_parts_rows(logits, exps, sumexp, shift, V);
}
#endif
