// Sums over the rows of a matrix: bias gradients and layernorm's dw.
// Part of the one program numgpt/kernels.py compiles: its source(dtype) defines REAL and the rest.

// out (G,C): row g holds the sum over rows [g R, (g+1) R) of x (N,C), or of x * w elementwise when
// has_w (otherwise w is never read). Block (bx, g) sums columns [32 bx, 32 bx + 32) of group g: lane
// l of every warp reads column 32 bx + l, so a warp reads one contiguous line per row; the warps
// take every (blockDim.x / 32)th row, and shared memory adds up their sums.
extern "C" __global__ void sum_rows(const REAL* x, const REAL* w, int has_w, REAL* out, long long N, int C,
                                    long long R) {
    __shared__ REAL warp_sums[32][32];   // [warp][lane], for up to 32 warps
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    int c = blockIdx.x * 32 + lane;
    long long end = min(N, (blockIdx.y + 1) * R);
    REAL sum = 0;
    if (c < C)
        for (long long r = blockIdx.y * R + warp; r < end; r += warps)
            sum += has_w ? x[r * C + c] * w[r * C + c] : x[r * C + c];
    warp_sums[warp][lane] = sum;
    __syncthreads();
    if (warp == 0 && c < C) {
        for (int k = 1; k < warps; ++k) sum += warp_sums[k][lane];
        out[blockIdx.y * (long long)C + c] = sum;
    }
}
