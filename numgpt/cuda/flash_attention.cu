// Causal attention without the (T,T) matrix: FlashAttention (Dao et al. 2022), in plain FMAs.
// Part of the one program numgpt/kernels.py compiles: its source(dtype) defines REAL and the rest.
// qkv (B,T,3C) as the c_attn layer makes it: q, k, v of head h start at columns h hs, C + h hs and
// 2C + h hs of each row. A block holds one (batch, head) and a run of query (or key) rows; the G
// threads of a row hold its dims d = part, part + G, ... (at most DIMS each) in registers, and their
// partial dot products meet through shuffles. The other side's rows pass through shared memory a
// tile at a time. The forward keeps a running max m and sum l of each row's exps (online softmax),
// so it needs one pass over the keys and keeps only lse = m + log(l) for the backward, which
// recomputes the probabilities p = exp(s - lse) from q and k. DIMS comes from numgpt/kernels.py.
#define MAX_TILE 64
#define TILE_ELEMS (16384 / (int)sizeof(REAL))   // a tile of one operand: 16 KB of shared memory

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
__device__ __forceinline__ void load_merged_row(REAL* r, const REAL* x, int row, int T, int C, int hs,
                                                int part, int G) {
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
        const REAL* row = head + (long long)(start + e / hs) * 3 * C + e % hs;
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
    int C = n_head * hs, rows = blockDim.x / G, part = threadIdx.x % G;
    int i = (int)blockIdx.x * rows + (int)threadIdx.x / G;                      // this thread's query
    int last = min(T, ((int)blockIdx.x + 1) * rows) - 1;                   // later keys are masked for every row here
    int tile = min(MAX_TILE, TILE_ELEMS / hs);
    const REAL* head = qkv + (long long)blockIdx.z * T * 3 * C + blockIdx.y * hs;
    REAL q[DIMS], acc[DIMS];
    load_row(q, head, 0, i, T, C, hs, part, G, scale);
    #pragma unroll
    for (int k = 0; k < DIMS; ++k) acc[k] = 0;
    REAL m = 0, l = 0;   // the running max and sum; key 0, which every row sees first, sets m
    for (int start = 0; start <= last; start += tile) {
        int n = min(tile, last + 1 - start);
        load_kv_tiles(k_tile, v_tile, head, start, n, C, hs);
        for (int j = 0; j < n; ++j) {
            REAL s = dot_tile(q, k_tile + j * hs, part, G, hs);       // every thread: the shuffles need all
            if (start + j > i) continue;                               // the causal mask
            REAL p = 1, rescale = 1;                                   // rescale the old sums when s is a new max
            if (start + j == 0) m = s;   // not from a sentinel such as -1e30: a score below it would make l 0, y nan
            else if (s > m) { rescale = exp(m - s); m = s; } else p = exp(s - m);
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
    int C = n_head * hs, rows = blockDim.x / G, part = threadIdx.x % G;
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
    int C = n_head * hs, rows = blockDim.x / G, part = threadIdx.x % G;
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
            q_tile[e] = qkv[row * 3 * C + blockIdx.y * hs + e % hs] * scale;
            g_tile[e] = dy[row * C + blockIdx.y * hs + e % hs];
        }
        for (int e = threadIdx.x; e < n; e += blockDim.x) {
            lse_tile[e] = stats_lse[start + e];
            D_tile[e] = stats_D[start + e];
        }
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
