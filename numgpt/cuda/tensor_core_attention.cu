// Causal attention on tensor cores: FlashAttention-2 (Dao 2023) with float16 operands.
// Part of the one program numgpt/kernels.py compiles: its source(dtype) defines REAL and the rest.
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
// MMA_ROWS (query or key rows per block: 4 warps x 16) comes from TC_ROWS in numgpt/kernels.py
#define MMA_TILE MMA_ROWS                // rows of the other operand per shared-memory tile: as many as a
                                         // block's own, so the last tile a block needs starts at its first row
#define MMA_LD(HS) ((HS) / 2 + 4)        // words per tile row: 4 words of padding put the 8 rows
                                         // that a fragment load reads in different banks

__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {   // two floats -> float16x2 bits
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));   // the first source goes high
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
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
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
        int r = e / (HS / 2), w = e % (HS / 2);
        const float* pair = x + (start + r) * stride + 2 * w;
        tile[r][w] = start + r < T ? pack_half2(pair[0] * factor, pair[1] * factor) : 0u;
    }
}

// the A fragments a[kk] (the dims [16 kk, 16 kk + 16)) of rows [row0, row0 + 16) of a (T, HS)
// operand (row r at x + r stride), times factor; rows at or past T are zeros
template <int HS>
__device__ void load_a_fragments(unsigned (*a)[4], const float* x, long long stride, int row0, int T, float factor) {
    int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    #pragma unroll
    for (int kk = 0; kk < HS / 16; ++kk)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            int row = row0 + g + 8 * (i % 2), col = 16 * kk + 2 * t + 8 * (i / 2);
            const float* pair = x + row * stride + col;
            a[kk][i] = row < T ? pack_half2(pair[0] * factor, pair[1] * factor) : 0u;
        }
}

// B = X^T for the rows [n0, n0 + 8) and dims [k0, k0 + 16) of a tile X: both halves of each
// register are neighbours in one row of the tile (one word)
template <int HS>
__device__ __forceinline__ void b_from_rows(unsigned* b, unsigned (*tile)[MMA_LD(HS)], int n0, int k0) {
    int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    b[0] = tile[n0 + g][k0 / 2 + t];
    b[1] = tile[n0 + g][k0 / 2 + 4 + t];
}

// B = X for the rows [k0, k0 + 16) and dims [n0, n0 + 8) of a tile X: the halves of each register
// come from two rows
template <int HS>
__device__ __forceinline__ void b_from_columns(unsigned* b, unsigned (*tile)[MMA_LD(HS)], int k0, int n0) {
    int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4, col = n0 + g, shift = 16 * (col % 2);
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

// where this lane's element i of accumulator tile n sits in the (16 x 8 n) accumulator: PTX's C layout
__device__ __forceinline__ int accumulator_row(int i) { return threadIdx.x % 32 / 4 + 8 * (i / 2); }
__device__ __forceinline__ int accumulator_column(int n, int i) { return 8 * n + 2 * (threadIdx.x % 4) + i % 2; }

// the max over the 4 lanes that hold one row of an accumulator tile (their sum: group_sum(v, 4))
__device__ __forceinline__ float quad_max(float v) {
    v = max(v, __shfl_xor_sync(0xffffffff, v, 1));
    return max(v, __shfl_xor_sync(0xffffffff, v, 2));
}

// the rows [row0, row0 + 16) of an accumulator (16 x 8 n) into out (row r at out + r stride), times factor
template <int HS>
__device__ void store_accumulators(float* out, long long stride, float (*acc)[4], int row0, int T, float factor0,
                                   float factor1) {
    // accumulator_row and accumulator_column, with this lane's parts g and t hoisted: through the
    // helpers here nvcc 13.0 gives tc_attention_dkv 253 registers instead of 246
    int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    #pragma unroll
    for (int n = 0; n < HS / 8; ++n)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            int row = row0 + g + 8 * (i / 2);
            if (row < T) out[row * stride + 8 * n + 2 * t + i % 2] = acc[n][i] * (i < 2 ? factor0 : factor1);
        }
}

// grid (ceil(T / MMA_ROWS), n_head, B), 128 threads: y (B,T,C) and lse (B,nh,T) as flash_attention_forward's
template <int HS>
__device__ void tc_attention_forward(const float* qkv, float* y, float* lse, int T, int n_head, float scale) {
    __shared__ unsigned k_tile[MMA_TILE][MMA_LD(HS)], v_tile[MMA_TILE][MMA_LD(HS)];
    int C = n_head * HS, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
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
                int key = start + accumulator_column(n, i), row = q0 + accumulator_row(i);
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
    int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
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
    int C = n_head * HS;
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
                int key = start + accumulator_column(n, i), row = q0 + accumulator_row(i);
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
    int C = n_head * HS;
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
                int query = accumulator_column(n, i), key = k0 + accumulator_row(i);
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
FOR_EACH_TC_HEAD_SIZE(TC_ATTENTION_KERNELS)   // TC_HEAD_SIZES in numgpt/kernels.py
#endif   // REAL_IS_FLOAT
