"""Fused CUDA kernels: on CuPy arrays, each replaces a chain of elementwise passes of one layer.

A NumPy-style chain such as layernorm's (mean, subtract, square, mean, sqrt, divide, multiply,
add) launches one GPU kernel per step and streams the (B,T,C) array through memory each time.
The kernels below read their inputs once and write their outputs once. Each has a twin: the NumPy
code of its layer, which runs on CuPy too when kernels are off, and which tests/test_kernels.py
compares it against (float32 and float64), on a GPU and on the CPU through a CUDA emulator.

    gelu_forward, gelu_backward        elementwise, one thread per element
    layernorm_forward, layernorm_dx    one warp (32 threads) per row of C
    causal_softmax, softmax_backward   one warp per row of attention scores
    softmax_parts                      one block per row of logits: the cross-entropy's max, exp, sum
    flash_attention_forward, _backward causal attention that never forms the (T,T) matrix: in FMAs,
                                       or (fp16) on tensor cores with mma.sync, FlashAttention-2 style
    scale_all, accumulate_all,         one launch over many arrays (every parameter or gradient),
    sum_of_squares_all, all_finite_all each block doing one chunk of one array (PyTorch's foreach)
    adamw_all

The source is written once with REAL for the element type and compiled with NVRTC for float and
for double when first used (the tensor-core attention, for fp16 training, for float only). Layers
ask `enabled(xp)` (or `enabled(xp, "flash_attention")`) before calling a kernel here; `disabled()`
turns them all off in a block, `disabled("flash_attention")` that one,
`disabled("tensor_core_attention")` the fp16 attention's tensor cores (tests use them to run the
twins on the GPU, benchmarks to compare).
"""

import contextlib
import math

import numpy as np

from numgpt.backend import array_module, backend_name

WARP = 32                 # threads per row in the row kernels: a warp reduces with shuffles, no shared memory
THREADS = 256             # threads per block in the elementwise kernels
MAX_BLOCKS = 65535        # elementwise kernels loop over the rest (a grid-stride loop)
DIMS = 16                 # head dims per thread in the attention kernels: a row takes ceil(hs / DIMS) threads
TC_HEAD_SIZES = (16, 32, 64)  # head sizes the tensor-core attention kernels are compiled for (GPT-2's is 64)
TC_ROWS = 64                  # rows per block in those kernels (MMA_ROWS in the source): warps of 16 rows
TC_THREADS = TC_ROWS // 16 * 32
CHUNK = 1 << 14           # elements per block in the multi-array kernels: GPT-2 124M's parameters are ~7600 blocks
MAX_TABLES = 8            # chunk tables kept for reuse (see _chunk_table)

SOURCE = r"""
#define GELU_SCALE ((REAL)%(gelu_scale).17g)
#define GELU_CUBIC ((REAL)%(gelu_cubic).17g)

template <class F> __device__ __forceinline__ F warp_sum(F v) {   // REAL, or double for a float sum
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;   // every lane holds the sum
}

__device__ __forceinline__ REAL warp_max(REAL v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
extern "C" __global__ void gelu_forward(const REAL* x, REAL* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
        REAL v = x[i];
        y[i] = (REAL)0.5 * v * ((REAL)1 + tanh(GELU_SCALE * (v + GELU_CUBIC * v * v * v)));
    }
}

// dx = dy (1 + t) (0.5 + s (1 - t)),  t = tanh(u),  s = 0.5 x sqrt(2/pi) (1 + 3 * 0.044715 x^2)
extern "C" __global__ void gelu_backward(const REAL* x, const REAL* dy, REAL* dx, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
        REAL v = x[i];
        REAL t = tanh(GELU_SCALE * (v + GELU_CUBIC * v * v * v));
        REAL s = (REAL)0.5 * GELU_SCALE * v * ((REAL)1 + (REAL)3 * GELU_CUBIC * v * v);
        dx[i] = dy[i] * ((REAL)1 + t) * ((REAL)0.5 + s * ((REAL)1 - t));
    }
}

// one warp per row of x (N,C): xhat = (x - mean) * rstd, y = xhat * w + b, rstd = 1 / sqrt(var + eps);
// without a bias (has_bias 0) b is never read
extern "C" __global__ void layernorm_forward(const REAL* x, const REAL* w, const REAL* b, int has_bias, REAL* y,
                                             REAL* xhat, REAL* rstd, int N, int C, REAL eps) {
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
        y[offset + c] = has_bias ? h * w[c] + b[c] : h * w[c];
    }
    if (lane == 0) rstd[row] = r;
}

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

// in place, one warp per row of scores (rows, Tk); row i of each (Tq, Tk) matrix is position
// Tk - Tq + i and sees columns <= it: softmax over those, 0 beyond
extern "C" __global__ void causal_softmax(REAL* s, long long rows, int Tq, int Tk) {
    long long row = blockIdx.x;
    int lane = threadIdx.x;
    if (row >= rows) return;
    int last = Tk - Tq + (int)(row %% Tq);
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

// (m, s) of a row part: its max m and sum of exp(x - m); merged with another part's (m2, s2)
__device__ __forceinline__ void merge_max_sum(REAL& m, REAL& s, REAL m2, REAL s2) {
    REAL top = max(m, m2);
    s = s * exp(m - top) + s2 * exp(m2 - top);
    m = top;
}

// one block per row of logits (rows, V): shift = row max, exps = exp(logits - shift) (may be the
// logits' own memory), sumexp = row sum of exps. Each thread keeps a running max and sum of its
// columns (one pass), the block merges them, and a second pass writes the exps.
extern "C" __global__ void softmax_parts(const REAL* logits, REAL* exps, REAL* sumexp, REAL* shift, int V) {
    __shared__ REAL warp_m[32], warp_s[32];
    const REAL* row = logits + (long long)blockIdx.x * V;
    int lane = threadIdx.x %% 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    REAL m = row[0], s = 0;   // start from a real logit: merging two -inf maxima would make nan
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
        REAL x = row[c];
        if (x > m) { s = s * exp(m - x) + (REAL)1; m = x; } else s += exp(x - m);
    }
    for (int offset = 16; offset > 0; offset >>= 1)
        merge_max_sum(m, s, __shfl_xor_sync(0xffffffff, m, offset), __shfl_xor_sync(0xffffffff, s, offset));
    if (lane == 0) { warp_m[warp] = m; warp_s[warp] = s; }
    __syncthreads();
    m = warp_m[0]; s = warp_s[0];   // every thread merges the warps' parts: a few, from shared memory
    for (int w = 1; w < warps; ++w) merge_max_sum(m, s, warp_m[w], warp_s[w]);
    REAL* out = exps + (long long)blockIdx.x * V;
    for (int c = threadIdx.x; c < V; c += blockDim.x) out[c] = exp(row[c] - m);
    if (threadIdx.x == 0) { sumexp[blockIdx.x] = s; shift[blockIdx.x] = m; }
}

// ---- causal attention without the (T,T) matrix: FlashAttention (Dao et al. 2022), in plain FMAs ----
// qkv (B,T,3C) as the c_attn layer makes it: q, k, v of head h start at columns h hs, C + h hs and
// 2C + h hs of each row. A block holds one (batch, head) and a run of query (or key) rows; the G
// threads of a row hold its dims d = part, part + G, ... (at most DIMS each) in registers, and their
// partial dot products meet through shuffles. The other side's rows pass through shared memory a
// tile at a time. The forward keeps a running max m and sum l of each row's exps (online softmax),
// so it needs one pass over the keys and keeps only lse = m + log(l) for the backward, which
// recomputes the probabilities p = exp(s - lse) from q and k.
#define DIMS %(dims)d
#define MAX_TILE 64
#define TILE_ELEMS (16384 / (int)sizeof(REAL))   // a tile of one operand: 16 KB of shared memory

__device__ __forceinline__ REAL group_sum(REAL v, int G) {   // the sum over a row's G threads
    for (int offset = G / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// row `row` of operand `column` (0 q, 1 k, 2 v) into registers r[k] = x[part + k G] * factor (0 off the row)
__device__ __forceinline__ void load_row(REAL* r, const REAL* head, int column, int row, int T, int C, int hs,
                                         int part, int G, REAL factor) {
    #pragma unroll
    for (int k = 0; k < DIMS; ++k) {
        int d = part + k * G;
        r[k] = row < T && d < hs ? head[(long long)row * 3 * C + column * C + d] * factor : (REAL)0;
    }
}

// row `row` of this block's head of a (B,T,C) array (y, dy: heads merged) into registers r[k] = x[part + k G]
__device__ __forceinline__ void load_merged_row(REAL* r, const REAL* x, int row, int T, int C, int hs, int part, int G) {
    #pragma unroll
    for (int k = 0; k < DIMS; ++k) {
        int d = part + k * G;
        r[k] = row < T && d < hs ? x[((long long)blockIdx.z * T + row) * C + blockIdx.y * hs + d] : (REAL)0;
    }
}

// the keys and values of rows [start, start + n) into tiles (n, hs) of shared memory
__device__ __forceinline__ void load_kv_tiles(REAL* k_tile, REAL* v_tile, const REAL* head, int start, int n,
                                              int C, int hs) {
    __syncthreads();   // every thread is done with the previous tiles
    for (int e = threadIdx.x; e < n * hs; e += blockDim.x) {
        const REAL* row = head + (long long)(start + e / hs) * 3 * C + e %% hs;
        k_tile[e] = row[C];
        v_tile[e] = row[2 * C];
    }
    __syncthreads();
}

__device__ __forceinline__ REAL dot_tile(const REAL* r, const REAL* tile_row, int part, int G, int hs) {
    REAL dot = 0;
    #pragma unroll
    for (int k = 0; k < DIMS; ++k) { int d = part + k * G; if (d < hs) dot += r[k] * tile_row[d]; }
    return group_sum(dot, G);
}

// grid (ceil(T / rows), n_head, B), rows = blockDim / G: y (B,T,C) = softmax(scale q k^T + causal) v,
// lse (B,nh,T) = each row's log-sum-exp
extern "C" __global__ void flash_attention_forward(const REAL* qkv, REAL* y, REAL* lse, int T, int n_head, int hs,
                                                   int G, REAL scale) {
    __shared__ REAL k_tile[TILE_ELEMS], v_tile[TILE_ELEMS];
    int C = n_head * hs, rows = blockDim.x / G, part = threadIdx.x %% G;
    int i = (int)blockIdx.x * rows + (int)threadIdx.x / G;                      // this thread's query
    int last = min(T, ((int)blockIdx.x + 1) * rows) - 1;                   // later keys are masked for every row here
    int tile = min(MAX_TILE, TILE_ELEMS / hs);
    const REAL* head = qkv + (long long)blockIdx.z * T * 3 * C + blockIdx.y * hs;
    REAL q[DIMS], acc[DIMS];
    load_row(q, head, 0, i, T, C, hs, part, G, scale);
    #pragma unroll
    for (int k = 0; k < DIMS; ++k) acc[k] = 0;
    REAL m = (REAL)-1e30, l = 0;   // the first key's exp(m - s) is then 0: no inf - inf
    for (int start = 0; start <= last; start += tile) {
        int n = min(tile, last + 1 - start);
        load_kv_tiles(k_tile, v_tile, head, start, n, C, hs);
        for (int j = 0; j < n; ++j) {
            REAL s = dot_tile(q, k_tile + j * hs, part, G, hs);       // every thread: the shuffles need all
            if (start + j > i) continue;                               // the causal mask
            REAL p = 1, rescale = 1;                                   // rescale the old sums when s is a new max
            if (s > m) { rescale = exp(m - s); m = s; } else p = exp(s - m);
            l = l * rescale + p;
            #pragma unroll
            for (int k = 0; k < DIMS; ++k) {
                int d = part + k * G;
                if (d < hs) acc[k] = acc[k] * rescale + p * v_tile[j * hs + d];
            }
        }
    }
    if (i >= T) return;
    #pragma unroll
    for (int k = 0; k < DIMS; ++k) {
        int d = part + k * G;
        if (d < hs) y[((long long)blockIdx.z * T + i) * C + blockIdx.y * hs + d] = acc[k] / l;
    }
    if (part == 0) lse[((long long)blockIdx.z * n_head + blockIdx.y) * T + i] = m + log(l);
}

// the backward's per-pair arithmetic, with p = exp(s - lse) and ds = p (dp - D), D = dy . y per row:
// dq_i = scale sum_j ds_ij k_j,  dk_j = sum_i ds_ij (scale q_i),  dv_j = sum_i p_ij dy_i.
// dy, y (B,T,C); lse, D (B,nh,T); dqkv (B,T,3C). Grid and rows as the forward's, over queries; this
// kernel also writes D, which flash_attention_dkv (launched after it) reads:
extern "C" __global__ void flash_attention_dq(const REAL* qkv, const REAL* dy, const REAL* y, const REAL* lse,
                                              REAL* D, REAL* dqkv, int T, int n_head, int hs, int G, REAL scale) {
    __shared__ REAL k_tile[TILE_ELEMS], v_tile[TILE_ELEMS];
    int C = n_head * hs, rows = blockDim.x / G, part = threadIdx.x %% G;
    int i = (int)blockIdx.x * rows + (int)threadIdx.x / G;
    int last = min(T, ((int)blockIdx.x + 1) * rows) - 1;
    int tile = min(MAX_TILE, TILE_ELEMS / hs);
    long long head_offset = (long long)blockIdx.z * T * 3 * C + blockIdx.y * hs;
    const REAL* head = qkv + head_offset;
    long long stat = ((long long)blockIdx.z * n_head + blockIdx.y) * T + min(i, T - 1);
    REAL q[DIMS], g[DIMS], yr[DIMS], dq[DIMS];
    load_row(q, head, 0, i, T, C, hs, part, G, scale);
    load_merged_row(g, dy, i, T, C, hs, part, G);
    load_merged_row(yr, y, i, T, C, hs, part, G);
    REAL Di = 0;
    #pragma unroll
    for (int k = 0; k < DIMS; ++k) { Di += g[k] * yr[k]; dq[k] = 0; }
    Di = group_sum(Di, G);                              // every thread: the shuffles need all
    if (part == 0 && i < T) D[stat] = Di;
    REAL L = lse[stat];
    for (int start = 0; start <= last; start += tile) {
        int n = min(tile, last + 1 - start);
        load_kv_tiles(k_tile, v_tile, head, start, n, C, hs);
        for (int j = 0; j < n; ++j) {
            REAL s = dot_tile(q, k_tile + j * hs, part, G, hs);
            REAL dp = dot_tile(g, v_tile + j * hs, part, G, hs);
            if (start + j > i) continue;
            REAL ds = exp(s - L) * (dp - Di);
            #pragma unroll
            for (int k = 0; k < DIMS; ++k) {
                int d = part + k * G;
                if (d < hs) dq[k] += ds * k_tile[j * hs + d];
            }
        }
    }
    if (i >= T) return;
    #pragma unroll
    for (int k = 0; k < DIMS; ++k) {
        int d = part + k * G;
        if (d < hs) dqkv[head_offset + (long long)i * 3 * C + d] = dq[k] * scale;
    }
}

// grid (ceil(T / rows), n_head, B) over keys: each row is a key j, and the queries i >= j pass through
// shared memory
extern "C" __global__ void flash_attention_dkv(const REAL* qkv, const REAL* dy, const REAL* lse, const REAL* D,
                                               REAL* dqkv, int T, int n_head, int hs, int G, REAL scale) {
    __shared__ REAL q_tile[TILE_ELEMS], g_tile[TILE_ELEMS], lse_tile[MAX_TILE], D_tile[MAX_TILE];
    int C = n_head * hs, rows = blockDim.x / G, part = threadIdx.x %% G;
    int j = (int)blockIdx.x * rows + (int)threadIdx.x / G;                      // this thread's key
    int first = (int)blockIdx.x * rows;                                     // earlier queries see none of these keys
    int tile = min(MAX_TILE, TILE_ELEMS / hs);
    long long head_offset = (long long)blockIdx.z * T * 3 * C + blockIdx.y * hs;
    const REAL* head = qkv + head_offset;
    const REAL* stats_lse = lse + ((long long)blockIdx.z * n_head + blockIdx.y) * T;
    const REAL* stats_D = D + ((long long)blockIdx.z * n_head + blockIdx.y) * T;
    REAL kr[DIMS], vr[DIMS], dk[DIMS], dv[DIMS];
    load_row(kr, head, 1, j, T, C, hs, part, G, (REAL)1);
    load_row(vr, head, 2, j, T, C, hs, part, G, (REAL)1);
    #pragma unroll
    for (int k = 0; k < DIMS; ++k) { dk[k] = 0; dv[k] = 0; }
    for (int start = first; start < T; start += tile) {
        int n = min(tile, T - start);
        __syncthreads();   // every thread is done with the previous tiles
        for (int e = threadIdx.x; e < n * hs; e += blockDim.x) {
            long long row = (long long)blockIdx.z * T + start + e / hs;
            q_tile[e] = qkv[row * 3 * C + blockIdx.y * hs + e %% hs] * scale;
            g_tile[e] = dy[row * C + blockIdx.y * hs + e %% hs];
        }
        for (int e = threadIdx.x; e < n; e += blockDim.x) { lse_tile[e] = stats_lse[start + e]; D_tile[e] = stats_D[start + e]; }
        __syncthreads();
        for (int t = 0; t < n; ++t) {
            REAL s = dot_tile(kr, q_tile + t * hs, part, G, hs);
            REAL dp = dot_tile(vr, g_tile + t * hs, part, G, hs);
            if (start + t < j || j >= T) continue;                     // the causal mask
            REAL p = exp(s - lse_tile[t]), ds = p * (dp - D_tile[t]);
            #pragma unroll
            for (int k = 0; k < DIMS; ++k) {
                int d = part + k * G;
                if (d < hs) { dv[k] += p * g_tile[t * hs + d]; dk[k] += ds * q_tile[t * hs + d]; }
            }
        }
    }
    if (j >= T) return;
    #pragma unroll
    for (int k = 0; k < DIMS; ++k) {
        int d = part + k * G;
        if (d < hs) {
            dqkv[head_offset + (long long)j * 3 * C + C + d] = dk[k];
            dqkv[head_offset + (long long)j * 3 * C + 2 * C + d] = dv[k];
        }
    }
}

// ---- causal attention on tensor cores: FlashAttention-2 (Dao 2023) with float16 operands ----
#if REAL_IS_FLOAT   // float32 arrays only (what --precision fp16 trains in)
// For --precision fp16. Each matrix product of the attention (S = q k^T, y = P v and the backward's
// five) is a sequence of mma.sync.m16n8k16: one warp multiplies a 16x16 float16 tile A by a 16x8
// float16 tile B and adds the product to a 16x8 float32 tile C, held in registers spread over its
// 32 lanes. PTX fixes which lane holds what ("Matrix fragments for mma.m16n8k16"); lane = 4 g + t:
//   A (row-major)  a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B (16x8)       b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   C (float32)    c[0], c[1] = C[g][2t, 2t+1]                       c[2], c[3] = C[g+8][2t, 2t+1]
// with two float16 in each a and b register, the lower index in the low half. So the accumulators
// of two neighbouring 16x8 tiles hold a 16x16 tile exactly where the A operand wants it: the
// probabilities P (and the backward's dS) go from one product into the next without leaving the
// registers (a_from_accumulators). A block is 4 warps of 16 rows each; the other operand passes
// through shared memory as float16, MMA_TILE rows at a time. Softmax, lse, D and every sum stay
// float32, as in FlashAttention-2; the operands q k v, P, dy and dS are rounded to float16 once.
#define MMA_ROWS %(tc_rows)d                      // query (or key) rows per block: 4 warps x 16
#define MMA_TILE 64                      // rows of the other operand per shared-memory tile
#define MMA_LD(HS) ((HS) / 2 + 4)        // words per tile row: 4 words of padding put the 8 rows
                                         // that a fragment load reads in different banks

__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {   // two floats -> float16x2 bits
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rn.f16x2.f32 %%0, %%1, %%2;" : "=r"(r) : "f"(hi), "f"(lo));   // the first source goes high
    return r;
#elif defined(__CUDA_ARCH__)
    __trap();   // the host launches these kernels on compute capability 8.0 and newer only
    return 0;
#else
    return emu::pack_half2(lo, hi);   // the CPU emulator (tests/cuda_emulator.h)
#endif
}

// c (16x8, float32) += a (16x16) b (16x8), one warp: every lane must call it
__device__ __forceinline__ void mma_16x8x16(float* c, const unsigned* a, const unsigned* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%%0, %%1, %%2, %%3}, {%%4, %%5, %%6, %%7}, "
                 "{%%8, %%9}, {%%0, %%1, %%2, %%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
    __trap();
#else
    emu::mma_16x8x16(c, a, b);
#endif
}

// rows [start, start + MMA_TILE) of a (T, HS) operand whose row r starts at x + r stride, times
// `factor`, into a tile of float16 pairs; rows at or past T are zeros
template <int HS>
__device__ void load_half_tile(unsigned (*tile)[MMA_LD(HS)], const float* x, long long stride, int start, int T,
                               float factor) {
    for (int e = threadIdx.x; e < MMA_TILE * HS / 2; e += blockDim.x) {
        int r = e / (HS / 2), w = e %% (HS / 2);
        const float* pair = x + (start + r) * stride + 2 * w;
        tile[r][w] = start + r < T ? pack_half2(pair[0] * factor, pair[1] * factor) : 0u;
    }
}

// the A fragments a[kk] (the dims [16 kk, 16 kk + 16)) of rows [row0, row0 + 16) of a (T, HS)
// operand (row r at x + r stride), times factor; rows at or past T are zeros
template <int HS>
__device__ void load_a_fragments(unsigned (*a)[4], const float* x, long long stride, int row0, int T, float factor) {
    int g = threadIdx.x %% 32 / 4, t = threadIdx.x %% 4;
    #pragma unroll
    for (int kk = 0; kk < HS / 16; ++kk)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            int row = row0 + g + 8 * (i %% 2), col = 16 * kk + 2 * t + 8 * (i / 2);
            const float* pair = x + row * stride + col;
            a[kk][i] = row < T ? pack_half2(pair[0] * factor, pair[1] * factor) : 0u;
        }
}

// B = X^T for the rows [n0, n0 + 8) and dims [k0, k0 + 16) of a tile X: both halves of each
// register are neighbours in one row of the tile (one word)
template <int HS>
__device__ __forceinline__ void b_from_rows(unsigned* b, unsigned (*tile)[MMA_LD(HS)], int n0, int k0) {
    int g = threadIdx.x %% 32 / 4, t = threadIdx.x %% 4;
    b[0] = tile[n0 + g][k0 / 2 + t];
    b[1] = tile[n0 + g][k0 / 2 + 4 + t];
}

// B = X for the rows [k0, k0 + 16) and dims [n0, n0 + 8) of a tile X: the halves of each register
// come from two rows
template <int HS>
__device__ __forceinline__ void b_from_columns(unsigned* b, unsigned (*tile)[MMA_LD(HS)], int k0, int n0) {
    int g = threadIdx.x %% 32 / 4, t = threadIdx.x %% 4, col = n0 + g, shift = 16 * (col %% 2);
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        int row = k0 + 2 * t + 8 * i;
        b[i] = (tile[row][col / 2] >> shift & 0xffffu) | (tile[row + 1][col / 2] >> shift << 16);
    }
}

// the accumulators of the 16x8 tiles n and n + 1 as the A fragment of one 16x16 tile (see above)
__device__ __forceinline__ void a_from_accumulators(unsigned* a, const float* left, const float* right) {
    a[0] = pack_half2(left[0], left[1]);
    a[1] = pack_half2(left[2], left[3]);
    a[2] = pack_half2(right[0], right[1]);
    a[3] = pack_half2(right[2], right[3]);
}

// s (16 rows x MMA_TILE, as MMA_TILE / 8 accumulator tiles) = rows a (16 x HS) . the tile's rows
template <int HS>
__device__ __forceinline__ void products_with_rows(float (*s)[4], unsigned (*a)[4], unsigned (*tile)[MMA_LD(HS)]) {
    #pragma unroll
    for (int n = 0; n < MMA_TILE / 8; ++n) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0;
        #pragma unroll
        for (int kk = 0; kk < HS / 16; ++kk) {
            unsigned b[2];
            b_from_rows<HS>(b, tile, 8 * n, 16 * kk);
            mma_16x8x16(s[n], a[kk], b);
        }
    }
}

// acc (16 x HS) += p (16 x MMA_TILE, accumulator tiles) . the tile (MMA_TILE x HS)
template <int HS>
__device__ __forceinline__ void accumulate_product(float (*acc)[4], float (*p)[4], unsigned (*tile)[MMA_LD(HS)]) {
    #pragma unroll
    for (int kk = 0; kk < MMA_TILE / 16; ++kk) {
        unsigned a[4];
        a_from_accumulators(a, p[2 * kk], p[2 * kk + 1]);
        #pragma unroll
        for (int n = 0; n < HS / 8; ++n) {
            unsigned b[2];
            b_from_columns<HS>(b, tile, 16 * kk, 8 * n);
            mma_16x8x16(acc[n], a, b);
        }
    }
}

// the max over the 4 lanes that hold one row of an accumulator tile (their sum: group_sum(v, 4))
__device__ __forceinline__ float quad_max(float v) {
    v = max(v, __shfl_xor_sync(0xffffffff, v, 1));
    return max(v, __shfl_xor_sync(0xffffffff, v, 2));
}

// the rows [row0, row0 + 16) of an accumulator (16 x 8 n) into out (row r at out + r stride), times factor
template <int HS>
__device__ void store_accumulators(float* out, long long stride, float (*acc)[4], int row0, int T, float factor0,
                                   float factor1) {
    int g = threadIdx.x %% 32 / 4, t = threadIdx.x %% 4;
    #pragma unroll
    for (int n = 0; n < HS / 8; ++n)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            int row = row0 + g + 8 * (i / 2);
            if (row < T) out[row * stride + 8 * n + 2 * t + i %% 2] = acc[n][i] * (i < 2 ? factor0 : factor1);
        }
}

// grid (ceil(T / MMA_ROWS), n_head, B), 128 threads: y (B,T,C) and lse (B,nh,T) as flash_attention_forward's
template <int HS>
__device__ void tc_attention_forward(const float* qkv, float* y, float* lse, int T, int n_head, float scale) {
    __shared__ unsigned k_tile[MMA_TILE][MMA_LD(HS)], v_tile[MMA_TILE][MMA_LD(HS)];
    int C = n_head * HS, g = threadIdx.x %% 32 / 4, t = threadIdx.x %% 4;
    int q0 = (int)blockIdx.x * MMA_ROWS + (int)threadIdx.x / 32 * 16;   // this warp's first query
    int last = min(T, ((int)blockIdx.x + 1) * MMA_ROWS) - 1;            // later keys are masked for every row here
    const float* head = qkv + (long long)blockIdx.z * T * 3 * C + blockIdx.y * HS;
    unsigned q[HS / 16][4];
    load_a_fragments<HS>(q, head, 3 * C, q0, T, scale);
    float acc[HS / 8][4] = {}, m[2] = {-1e30f, -1e30f}, l[2] = {0, 0};   // rows g and g + 8: max, this lane's sum
    for (int start = 0; start <= last; start += MMA_TILE) {
        __syncthreads();   // every warp is done with the previous tiles
        load_half_tile<HS>(k_tile, head + C, 3 * C, start, T, 1.0f);
        load_half_tile<HS>(v_tile, head + 2 * C, 3 * C, start, T, 1.0f);
        __syncthreads();
        // the last tile starts at this block's first query (MMA_TILE = MMA_ROWS), so every row
        // here keeps key `start`: its max below is a real score
        float s[MMA_TILE / 8][4];
        products_with_rows<HS>(s, q, k_tile);
        float tile_max[2] = {m[0], m[1]};
        #pragma unroll
        for (int n = 0; n < MMA_TILE / 8; ++n)
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                int key = start + 8 * n + 2 * t + i %% 2, row = q0 + g + 8 * (i / 2);
                if (key > row || key >= T) s[n][i] = -1e30f;   // the causal mask: exp(-1e30 - max) is 0
                tile_max[i / 2] = max(tile_max[i / 2], s[n][i]);
            }
        for (int r = 0; r < 2; ++r) {   // online softmax: rescale the old sums to the new max
            tile_max[r] = quad_max(tile_max[r]);
            float rescale = exp(m[r] - tile_max[r]);
            m[r] = tile_max[r];
            l[r] *= rescale;
            #pragma unroll
            for (int n = 0; n < HS / 8; ++n) { acc[n][2 * r] *= rescale; acc[n][2 * r + 1] *= rescale; }
        }
        #pragma unroll
        for (int n = 0; n < MMA_TILE / 8; ++n)
            #pragma unroll
            for (int i = 0; i < 4; ++i) { s[n][i] = exp(s[n][i] - m[i / 2]); l[i / 2] += s[n][i]; }
        accumulate_product<HS>(acc, s, v_tile);
    }
    l[0] = group_sum(l[0], 4);
    l[1] = group_sum(l[1], 4);
    store_accumulators<HS>(y + (long long)blockIdx.z * T * C + blockIdx.y * HS, C, acc, q0, T, 1 / l[0], 1 / l[1]);
    for (int r = 0; r < 2; ++r) {
        int row = q0 + g + 8 * r;
        if (t == 0 && row < T) lse[((long long)blockIdx.z * n_head + blockIdx.y) * T + row] = m[r] + log(l[r]);
    }
}

// the row statistics of rows [row0, row0 + 16) that the backward needs: lse and D = dy . y, which
// it writes (the lanes of column 0 do)
template <int HS>
__device__ void tc_row_statistics(float* L, float* Dr, const float* dy, const float* y, const float* lse, float* D,
                                  int row0, int T, int C, int n_head) {
    int g = threadIdx.x %% 32 / 4, t = threadIdx.x %% 4;
    for (int r = 0; r < 2; ++r) {
        int row = row0 + g + 8 * r;
        long long offset = ((long long)blockIdx.z * T + row) * C + blockIdx.y * HS;
        float dot = 0;
        for (int d = t; d < HS && row < T; d += 4) dot += dy[offset + d] * y[offset + d];
        Dr[r] = group_sum(dot, 4);
        long long stat = ((long long)blockIdx.z * n_head + blockIdx.y) * T + row;
        L[r] = row < T ? lse[stat] : 0;
        if (t == 0 && row < T) D[stat] = Dr[r];
    }
}

// grid and block as the forward's, over queries: dq into dqkv, and D (B,nh,T) for tc_attention_dkv
// (launched after it). With p = exp(s - lse) and ds = p (dp - D): dq_i = scale sum_j ds_ij k_j.
template <int HS>
__device__ void tc_attention_dq(const float* qkv, const float* dy, const float* y, const float* lse, float* D,
                                float* dqkv, int T, int n_head, float scale) {
    __shared__ unsigned k_tile[MMA_TILE][MMA_LD(HS)], v_tile[MMA_TILE][MMA_LD(HS)];
    int C = n_head * HS, g = threadIdx.x %% 32 / 4, t = threadIdx.x %% 4;
    int q0 = (int)blockIdx.x * MMA_ROWS + (int)threadIdx.x / 32 * 16;
    int last = min(T, ((int)blockIdx.x + 1) * MMA_ROWS) - 1;
    long long head_offset = (long long)blockIdx.z * T * 3 * C + blockIdx.y * HS;
    const float* head = qkv + head_offset;
    const float* dy_head = dy + (long long)blockIdx.z * T * C + blockIdx.y * HS;
    unsigned q[HS / 16][4], gq[HS / 16][4];   // scale q and dy of this warp's rows, as A fragments
    load_a_fragments<HS>(q, head, 3 * C, q0, T, scale);
    load_a_fragments<HS>(gq, dy_head, C, q0, T, 1.0f);
    float L[2], Dr[2], dq[HS / 8][4] = {};
    tc_row_statistics<HS>(L, Dr, dy, y, lse, D, q0, T, C, n_head);
    for (int start = 0; start <= last; start += MMA_TILE) {
        __syncthreads();
        load_half_tile<HS>(k_tile, head + C, 3 * C, start, T, 1.0f);
        load_half_tile<HS>(v_tile, head + 2 * C, 3 * C, start, T, 1.0f);
        __syncthreads();
        float s[MMA_TILE / 8][4], dp[MMA_TILE / 8][4];
        products_with_rows<HS>(s, q, k_tile);
        products_with_rows<HS>(dp, gq, v_tile);
        #pragma unroll
        for (int n = 0; n < MMA_TILE / 8; ++n)
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                int key = start + 8 * n + 2 * t + i %% 2, row = q0 + g + 8 * (i / 2);
                bool masked = key > row || key >= T || row >= T;
                s[n][i] = masked ? 0 : exp(s[n][i] - L[i / 2]) * (dp[n][i] - Dr[i / 2]);   // ds
            }
        accumulate_product<HS>(dq, s, k_tile);
    }
    store_accumulators<HS>(dqkv + head_offset, 3 * C, dq, q0, T, scale, scale);
}

// grid (ceil(T / MMA_ROWS), n_head, B) over keys, 128 threads; the queries i >= j pass through shared
// memory: dk_j = sum_i ds_ij (scale q_i), dv_j = sum_i p_ij dy_i, from the transposed products
// s^T = k (scale q)^T and dp^T = v dy^T, so that the keys are the rows of every accumulator
template <int HS>
__device__ void tc_attention_dkv(const float* qkv, const float* dy, const float* lse, const float* D, float* dqkv,
                                 int T, int n_head, float scale) {
    __shared__ unsigned q_tile[MMA_TILE][MMA_LD(HS)], g_tile[MMA_TILE][MMA_LD(HS)];
    __shared__ float lse_tile[MMA_TILE], D_tile[MMA_TILE];
    int C = n_head * HS, g = threadIdx.x %% 32 / 4, t = threadIdx.x %% 4;
    int k0 = (int)blockIdx.x * MMA_ROWS + (int)threadIdx.x / 32 * 16;   // this warp's first key
    long long head_offset = (long long)blockIdx.z * T * 3 * C + blockIdx.y * HS;
    const float* head = qkv + head_offset;
    const float* dy_head = dy + (long long)blockIdx.z * T * C + blockIdx.y * HS;
    const float* stats_lse = lse + ((long long)blockIdx.z * n_head + blockIdx.y) * T;
    const float* stats_D = D + ((long long)blockIdx.z * n_head + blockIdx.y) * T;
    unsigned kr[HS / 16][4], vr[HS / 16][4];
    load_a_fragments<HS>(kr, head + C, 3 * C, k0, T, 1.0f);
    load_a_fragments<HS>(vr, head + 2 * C, 3 * C, k0, T, 1.0f);
    float dk[HS / 8][4] = {}, dv[HS / 8][4] = {};
    // earlier queries see none of this block's keys
    for (int start = (int)blockIdx.x * MMA_ROWS; start < T; start += MMA_TILE) {
        __syncthreads();
        load_half_tile<HS>(q_tile, head, 3 * C, start, T, scale);
        load_half_tile<HS>(g_tile, dy_head, C, start, T, 1.0f);
        for (int e = threadIdx.x; e < MMA_TILE; e += blockDim.x) {
            lse_tile[e] = start + e < T ? stats_lse[start + e] : 0;
            D_tile[e] = start + e < T ? stats_D[start + e] : 0;
        }
        __syncthreads();
        float st[MMA_TILE / 8][4], dpt[MMA_TILE / 8][4];   // keys x queries
        products_with_rows<HS>(st, kr, q_tile);
        products_with_rows<HS>(dpt, vr, g_tile);
        #pragma unroll
        for (int n = 0; n < MMA_TILE / 8; ++n)
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                int query = 8 * n + 2 * t + i %% 2, key = k0 + g + 8 * (i / 2);
                bool masked = start + query < key || start + query >= T || key >= T;
                st[n][i] = masked ? 0 : exp(st[n][i] - lse_tile[query]);   // p^T
                dpt[n][i] = st[n][i] * (dpt[n][i] - D_tile[query]);        // ds^T
            }
        accumulate_product<HS>(dv, st, g_tile);
        accumulate_product<HS>(dk, dpt, q_tile);
    }
    store_accumulators<HS>(dqkv + head_offset + C, 3 * C, dk, k0, T, 1.0f, 1.0f);
    store_accumulators<HS>(dqkv + head_offset + 2 * C, 3 * C, dv, k0, T, 1.0f, 1.0f);
}

// one kernel of each per head size: the fragments' arrays need their sizes at compile time
#define TC_ATTENTION_KERNELS(HS)                                                                               \
extern "C" __global__ void tc_attention_forward_##HS(const float* qkv, float* y, float* lse, int T, int n_head,  \
                                                     float scale) {                                            \
    tc_attention_forward<HS>(qkv, y, lse, T, n_head, scale);                                                   \
}                                                                                                              \
extern "C" __global__ void tc_attention_dq_##HS(const float* qkv, const float* dy, const float* y,             \
                                                const float* lse, float* D, float* dqkv, int T, int n_head,   \
                                                float scale) {                                                 \
    tc_attention_dq<HS>(qkv, dy, y, lse, D, dqkv, T, n_head, scale);                                          \
}                                                                                                              \
extern "C" __global__ void tc_attention_dkv_##HS(const float* qkv, const float* dy, const float* lse,          \
                                                 const float* D, float* dqkv, int T, int n_head, float scale) { \
    tc_attention_dkv<HS>(qkv, dy, lse, D, dqkv, T, n_head, scale);                                            \
}
%(tc_kernels)s#endif   // REAL_IS_FLOAT

// The multi-array kernels: one launch works on many arrays (every parameter of a model, or every
// gradient) instead of one launch per array. Block b does row b of a table the host built once
// (_chunk_table): the address of one chunk of each array, the chunk's length n, and a tag.
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
    if (threadIdx.x %% 32 == 0) warp_totals[threadIdx.x / 32] = total;
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
""" % {"gelu_scale": math.sqrt(2.0 / math.pi), "gelu_cubic": 0.044715, "dims": DIMS, "tc_rows": TC_ROWS,
       "tc_kernels": "".join(f"TC_ATTENTION_KERNELS({hs})\n" for hs in TC_HEAD_SIZES)}

ALL = "all"
_off = set()      # kernels turned off by `disabled`: names, or ALL
_modules = {}   # dtype name -> compiled cupy.RawModule
_tables = {}    # the arrays' addresses, sizes, element size and tags -> their chunk table, the most recently used last


def enabled(xp, kernel=None):
    """True when the arrays of module `xp` should go through the kernels here: on CuPy, unless
    `disabled` turned them all off, or the one named `kernel`."""
    return _runs_kernels(xp) and ALL not in _off and kernel not in _off


def _runs_kernels(xp):
    """Whether arrays of `xp` live on the GPU (the tests' CUDA emulator says yes for NumPy)."""
    return backend_name(xp) == "cupy"


@contextlib.contextmanager
def disabled(*kernels):
    """Within the block, layers use their NumPy-style code (the kernels' twins) on CuPy too: in
    place of the named kernels (those that `enabled` is asked about by name), or of all of them."""
    global _off
    previous, _off = _off, _off | (set(kernels) or {ALL})
    try:
        yield
    finally:
        _off = previous


def source(dtype):
    """The CUDA source for element type `dtype` (float32 or float64)."""
    real = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    return f"#define REAL {real}\n#define REAL_IS_FLOAT {int(real == 'float')}\n" + SOURCE


def _kernel(name, dtype):
    """Kernel `name` compiled for `dtype` (once per dtype, by NVRTC through CuPy)."""
    key = np.dtype(dtype).name
    if key not in _modules:
        import cupy
        _modules[key] = cupy.RawModule(code=source(dtype))
    return _modules[key].get_function(name)


def _elementwise_grid(n):
    return (min(max(1, -(-n // THREADS)), MAX_BLOCKS),), (THREADS,)


def _scalar(value, dtype):
    return np.dtype(dtype).type(value)


def gelu_forward(x):
    """y = gelu(x), GPT-2's tanh form, in one pass."""
    x = _contiguous(x)
    y = _empty_like(x)
    _kernel("gelu_forward", x.dtype)(*_elementwise_grid(x.size), (x, y, np.int64(x.size)))
    return y


def gelu_backward(dy, x):
    """dx of gelu for upstream dy, in one pass."""
    x, dy = _contiguous(x), _contiguous(dy)
    dx = _empty_like(x)
    _kernel("gelu_backward", x.dtype)(*_elementwise_grid(x.size), (x, dy, dx, np.int64(x.size)))
    return dx


def layernorm_forward(x, w, b, eps):
    """(y, xhat, rstd) of layernorm over the last axis; rstd has shape (..., 1) like the twin's."""
    x = _contiguous(x)
    C = x.shape[-1]
    N = x.size // C
    y, xhat = _empty_like(x), _empty_like(x)
    rstd = array_module(x).empty(x.shape[:-1] + (1,), dtype=x.dtype)
    w = _contiguous(w)
    has_bias = b is not None
    b = _contiguous(b) if has_bias else w   # without a bias, any valid pointer: the kernel never reads it
    _kernel("layernorm_forward", x.dtype)((N,), (WARP,), (x, w, b, np.int32(has_bias), y, xhat, rstd,
                                                           np.int32(N), np.int32(C), _scalar(eps, x.dtype)))
    return y, xhat, rstd


def layernorm_dx(dy, xhat, rstd, w):
    """dx of layernorm from the cached xhat and rstd."""
    dy = _contiguous(dy)
    C = dy.shape[-1]
    N = dy.size // C
    dx = _empty_like(dy)
    _kernel("layernorm_dx", dy.dtype)((N,), (WARP,), (dy, _contiguous(xhat), _contiguous(rstd), _contiguous(w), dx,
                                                       np.int32(N), np.int32(C)))
    return dx


def causal_softmax(scores):
    """Masked softmax of (..., Tq, Tk) scores in their own memory (as the twin): the probabilities."""
    assert scores.flags.c_contiguous, "causal_softmax works in place: scores must be C-contiguous"
    Tq, Tk = scores.shape[-2:]
    rows = scores.size // Tk
    _kernel("causal_softmax", scores.dtype)((rows,), (WARP,), (scores, np.int64(rows), np.int32(Tq), np.int32(Tk)))
    return scores


def softmax_backward(dprobs, probs):
    """ds = p (dp - sum(dp p)) along the last axis."""
    dprobs, probs = _contiguous(dprobs), _contiguous(probs)
    T = probs.shape[-1]
    rows = probs.size // T
    ds = _empty_like(probs)
    _kernel("softmax_backward", probs.dtype)((rows,), (WARP,), (dprobs, probs, ds, np.int64(rows), np.int32(T)))
    return ds


def softmax_parts(logits, out=None):
    """(exps, sumexp, shift) of logits (N,V): shift (N,) the row maxima, exps (N,V) = exp(logits -
    shift) (written into `out`, which may be `logits`), sumexp (N,1) its row sums."""
    logits = _contiguous(logits)
    N, V = logits.shape
    exps = _empty_like(logits) if out is None else out
    assert exps.flags.c_contiguous and exps.shape == logits.shape, "out must be a C-contiguous (N,V) array"
    xp = array_module(logits)
    sumexp, shift = xp.empty((N, 1), dtype=logits.dtype), xp.empty((N,), dtype=logits.dtype)
    _kernel("softmax_parts", logits.dtype)((N,), (THREADS,), (logits, exps, sumexp, shift, np.int32(V)))
    return exps, sumexp, shift


def flash_attention_supports(head_size):
    """Whether the attention kernels take heads of this size: up to 32 threads of DIMS dims each."""
    return head_size <= 32 * DIMS


def tensor_core_attention_supports(xp, head_size):
    """Whether the tensor-core attention kernels (float16 operands) take heads of this size on
    this device: they are compiled for TC_HEAD_SIZES, and mma.sync.m16n8k16 needs compute
    capability 8.0 (Ampere) or newer."""
    if head_size not in TC_HEAD_SIZES:
        return False
    return backend_name(xp) != "cupy" or int(xp.cuda.Device().compute_capability) >= 80   # else: the emulator


def _flash_launch(T, n_head, B, head_size):
    """(G, grid, block): G threads per row, the fewest (a power of two) that hold a head's dims."""
    G = 1
    while G * DIMS < head_size:
        G *= 2
    rows = THREADS // G
    return G, (-(-T // rows), n_head, B), (THREADS,)


def _tensor_core_launch(T, n_head, B, head_size):
    """(name suffix, grid, block) of the tensor-core attention kernels: 4 warps of 16 rows a block."""
    return f"_{head_size}", (-(-T // TC_ROWS), n_head, B), (TC_THREADS,)


def flash_attention_forward(qkv, n_head, scale, tensor_cores=False):
    """Causal attention of qkv (B,T,3C) -> y (B,T,C) with heads merged, lse (B,nh,T) for the backward.

    With tensor_cores (float32 arrays, see tensor_core_attention_supports), the matrix products
    take float16 operands on tensor cores; the softmax and every sum stay float32."""
    qkv = _contiguous(qkv)
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    hs, xp, t = C // n_head, array_module(qkv), qkv.dtype
    y, lse = xp.empty((B, T, C), dtype=t), xp.empty((B, n_head, T), dtype=t)
    if tensor_cores:
        assert t == np.float32, "the tensor-core attention takes float32 arrays"
        suffix, grid, block = _tensor_core_launch(T, n_head, B, hs)
        _kernel("tc_attention_forward" + suffix, t)(grid, block, (qkv, y, lse, np.int32(T), np.int32(n_head),
                                                                  np.float32(scale)))
        return y, lse
    G, grid, block = _flash_launch(T, n_head, B, hs)
    _kernel("flash_attention_forward", t)(grid, block, (qkv, y, lse, np.int32(T), np.int32(n_head), np.int32(hs),
                                                        np.int32(G), _scalar(scale, t)))
    return y, lse


def flash_attention_backward(dy, qkv, y, lse, n_head, scale, tensor_cores=False):
    """dqkv (B,T,3C) of flash_attention_forward for upstream dy (B,T,C): two kernels, over the
    queries (dq, and D = dy . y per row) and over the keys (dk, dv), each recomputing the
    probabilities it needs; on tensor cores as the forward did, with dy rounded to float16 too."""
    dy, qkv, y = _contiguous(dy), _contiguous(qkv), _contiguous(y)
    B, T, C = dy.shape
    hs, xp, t = C // n_head, array_module(dy), dy.dtype
    D, dqkv = xp.empty((B, n_head, T), dtype=t), _empty_like(qkv)      # D (B,nh,T): written by the dq kernel
    if tensor_cores:
        assert t == np.float32, "the tensor-core attention takes float32 arrays"
        suffix, grid, block = _tensor_core_launch(T, n_head, B, hs)
        shape = (np.int32(T), np.int32(n_head), np.float32(scale))
        _kernel("tc_attention_dq" + suffix, t)(grid, block, (qkv, dy, y, lse, D, dqkv, *shape))
        _kernel("tc_attention_dkv" + suffix, t)(grid, block, (qkv, dy, lse, D, dqkv, *shape))
        return dqkv
    G, grid, block = _flash_launch(T, n_head, B, hs)
    shape = (np.int32(T), np.int32(n_head), np.int32(hs), np.int32(G), _scalar(scale, t))
    _kernel("flash_attention_dq", t)(grid, block, (qkv, dy, y, lse, D, dqkv, *shape))
    _kernel("flash_attention_dkv", t)(grid, block, (qkv, dy, lse, D, dqkv, *shape))
    return dqkv


def chunkable(*columns):
    """Whether lists of arrays can go to a multi-array kernel: C-contiguous, all of one floating
    dtype, the i-th array of every list the size of the first list's (the kernel reads and writes
    as many elements of each)."""
    first = columns[0]
    arrays = [a for column in columns for a in column]
    return bool(arrays) and arrays[0].dtype in (np.float32, np.float64) \
        and all(a.flags.c_contiguous and a.dtype == arrays[0].dtype for a in arrays) \
        and all(len(column) == len(first) and all(a.size == b.size for a, b in zip(column, first))
                for column in columns)


def scale_all(arrays, factor):
    """a *= factor for every array, in one launch."""
    _launch_over_chunks("scale_chunks", [arrays], _scalar(factor, arrays[0].dtype))


def accumulate_all(dsts, srcs, divisor, add):
    """d = s / divisor (or, with `add`, d += s / divisor) for each pair, in one launch."""
    _launch_over_chunks("accumulate_chunks", [dsts, srcs], _scalar(divisor, dsts[0].dtype), np.int32(add))


def sum_of_squares_all(arrays):
    """The sum of every element squared, over all the arrays: a float64 scalar on their device."""
    n_chunks = sum(-(-a.size // CHUNK) for a in arrays)
    if not n_chunks:
        return 0.0
    partial = array_module(arrays[0]).empty(n_chunks, dtype=np.float64)   # one sum per chunk
    _launch_over_chunks("sum_squares_chunks", [arrays], partial)
    return partial.sum()


def all_finite_all(arrays):
    """Whether no element of any of the arrays is inf or nan: one launch, then one wait for the answer."""
    found = array_module(arrays[0]).zeros(1, dtype=np.int32)
    _launch_over_chunks("nonfinite_chunks", [arrays], found)
    return not int(found[0])


def adamw_all(params, grads, ms, vs, decays, grad_scale, decay, b1, b2, bias_correction2_sqrt, eps, step_size):
    """One AdamW update of every parameter and its moments, in place, in one launch; `decays[i]`
    says whether params[i] gets the weight decay factor `decay`; every gradient is multiplied by
    grad_scale, a float64 array of one element on the device, first."""
    t = params[0].dtype
    _launch_over_chunks("adamw_chunks", [params, grads, ms, vs], grad_scale, _scalar(decay, t), _scalar(1.0 - b1, t),
                        _scalar(b2, t), _scalar(1.0 - b2, t), _scalar(bias_correction2_sqrt, t), _scalar(eps, t),
                        _scalar(step_size, t), tags=decays)


def _launch_over_chunks(name, columns, *args, tags=None):
    """Run multi-array kernel `name` with one block of THREADS per chunk of `columns` (see
    _chunk_table) and arguments (table, *args); nothing when the arrays are empty."""
    table = _chunk_table(columns, tags)
    if len(table):
        _kernel(name, columns[0][0].dtype)((len(table),), (THREADS,), (table, *args))


def _chunk_table(columns, tags=None):
    """The table a multi-array kernel reads: one row per CHUNK elements of each array of
    `columns` (lists of arrays for chunkable(), the i-th of each list the same size), holding the
    chunk's address in every list, its length and tags[i]: an (n_chunks, len(columns) + 2) int64
    array on the arrays' device.

    The table follows from the addresses, sizes, element size and tags alone, so those are its
    key: it is kept for the next call with arrays at the same addresses (a training step's
    parameters, moments and flat gradients never move), and most steps copy nothing to the device."""
    first = columns[0]
    tags = [0] * len(first) if tags is None else [int(tag) for tag in tags]
    xp, itemsize = array_module(first[0]), first[0].itemsize
    # where each array's first element is: a device address for CuPy, a host one for NumPy (the emulator)
    address = (lambda a: a.data.ptr) if backend_name(xp) == "cupy" else (lambda a: a.ctypes.data)
    addresses = np.array([[address(a) for a in column] for column in columns], dtype=np.int64)   # (columns, arrays)
    sizes = np.array([a.size for a in first], dtype=np.int64)
    key = (xp.__name__, CHUNK, itemsize, addresses.tobytes(), sizes.tobytes(), tuple(tags))
    if key in _tables:
        _tables[key] = _tables.pop(key)                                   # now the most recently used
    else:
        counts = -(-sizes // CHUNK)                                       # chunks of each array
        array_of = np.repeat(np.arange(len(first)), counts)               # (n_chunks,)
        start = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)) * CHUNK
        table = np.empty((len(array_of), len(columns) + 2), dtype=np.int64)
        table[:, :-2] = (addresses[:, array_of] + start * itemsize).T
        table[:, -2] = np.minimum(CHUNK, sizes[array_of] - start)
        table[:, -1] = np.asarray(tags, dtype=np.int64)[array_of]
        if len(_tables) == MAX_TABLES:
            del _tables[next(iter(_tables))]                              # the least recently used
        _tables[key] = xp.asarray(table)   # CuPy copies through pinned memory: no wait for the device
    return _tables[key]


def _contiguous(a):
    return a if a.flags.c_contiguous else a.copy()


def _empty_like(a):
    return array_module(a).empty(a.shape, dtype=a.dtype)
