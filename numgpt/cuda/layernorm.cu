// Layernorm: the forward, and the backward's dx (dw and db are column sums: numgpt/layers/layernorm.py).
// Part of the one program numgpt/kernels.py compiles: its source(dtype) defines REAL and the rest.

// one warp per row of x (N,C): xhat = (x - mean) * rstd, y = xhat * w + b, rstd = 1 / sqrt(var + eps);
// without a bias (has_bias 0) b is never read. y in REAL or (OUT = HALF) float16
template <class OUT> __device__ void layernorm_forward_rows(const REAL* x, const REAL* w, const REAL* b, int has_bias,
                                                            OUT* y, REAL* xhat, REAL* rstd, int N, int C, REAL eps) {
    int row = blockIdx.x, lane = threadIdx.x;
    if (row >= N) return;
    long long offset = (long long)row * C;
    REAL sum = 0;
    for (int c = lane; c < C; c += 32) sum += x[offset + c];
    REAL mean = warp_sum(sum) / C;
    REAL squares = 0;   // the variance from deviations, not E[x^2] - mean^2, which cancels badly
    for (int c = lane; c < C; c += 32) { REAL d = x[offset + c] - mean; squares += d * d; }
    REAL r = (REAL)1 / sqrt(warp_sum(squares) / C + eps);
    for (int c = lane; c < C; c += 32) {
        REAL h = (x[offset + c] - mean) * r;
        xhat[offset + c] = h;
        store(&y[offset + c], has_bias ? h * w[c] + b[c] : h * w[c]);
    }
    if (lane == 0) rstd[row] = r;
}

extern "C" __global__ void layernorm_forward(const REAL* x, const REAL* w, const REAL* b, int has_bias, REAL* y,
                                             REAL* xhat, REAL* rstd, int N, int C, REAL eps) {
    layernorm_forward_rows(x, w, b, has_bias, y, xhat, rstd, N, C, eps);
}
#if REAL_IS_FLOAT   // as gelu_forward_half
extern "C" __global__ void layernorm_forward_half(const REAL* x, const REAL* w, const REAL* b, int has_bias, HALF* y,
                                                  REAL* xhat, REAL* rstd, int N, int C, REAL eps) {
    layernorm_forward_rows(x, w, b, has_bias, y, xhat, rstd, N, C, eps);
}
#endif

// one warp per row: dx = rstd (g - mean(g) - xhat mean(g xhat)),  g = dy w
extern "C" __global__ void layernorm_dx(const REAL* dy, const REAL* xhat, const REAL* rstd, const REAL* w,
                                        REAL* dx, int N, int C) {
    int row = blockIdx.x, lane = threadIdx.x;
    if (row >= N) return;
    long long offset = (long long)row * C;
    REAL g_sum = 0, gx_sum = 0;
    for (int c = lane; c < C; c += 32) {
        REAL g = dy[offset + c] * w[c];
        g_sum += g;
        gx_sum += g * xhat[offset + c];
    }
    REAL g_mean = warp_sum(g_sum) / C, gx_mean = warp_sum(gx_sum) / C, r = rstd[row];
    for (int c = lane; c < C; c += 32)
        dx[offset + c] = r * (dy[offset + c] * w[c] - g_mean - xhat[offset + c] * gx_mean);
}
