// Causal attention on tensor cores: FlashAttention-2 (Dao 2023) with float16 or TF32 operands, or
// float32 ones as three TF32 products.
// Part of the one program numgpt/kernels.py compiles: its source(dtype) defines REAL and the rest.
#if REAL_IS_FLOAT   // float32 arrays only (what every --precision trains in)
// Each matrix product of the attention (S = q k^T, y = P v and the backward's five) is a sequence of
// mma.sync: one warp multiplies a 16xK tile A by a Kx8 tile B and adds the product to a 16x8 float32
// tile C, held in registers spread over its 32 lanes. The operands come in one of three formats,
// each a struct below with its instruction, in one of two layouts; PTX fixes which lane holds what
// ("Matrix fragments for mma.m16n8k16 / mma.m16n8k8"), with lane = 4 g + t:
//   Half, for --precision fp16: m16n8k16, two float16 in each register, the lower index in the low half
//     A (16x16)  a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//     B (16x8)   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   Tf32, for --precision tf32: m16n8k8, one TF32 (a float32 rounded to a 10-bit mantissa) in each
//   register (and Tf32x3, for fp32: a float32 in each, which its mma turns into three TF32 products)
//     A (16x8)   a[0] = A[g][t]   a[1] = A[g+8][t]   a[2] = A[g][t+4]   a[3] = A[g+8][t+4]
//     B (8x8)    b[0] = B[t][g]   b[1] = B[t+4][g]
//   both: C (float32)   c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// Call a register's worth of neighbouring operands in a row a word (F::PER_WORD of them). Then in
// both layouts a[i] is the word t + 4 (i / 2) of row g + 8 (i % 2), and the B of a product with X^T
// (S = q k^T) has b[j] = the word t + 4 j of X's row g: one code loads both (load_a_fragments,
// b_from_rows). The accumulators of a product hold P (and the backward's dS) where the next
// product's A fragment wants them (F::a_from_accumulators), so P goes from one product into the
// next without leaving the registers. A block is 4 warps of 16 rows each; the other operand passes
// through shared memory, F::TILE rows at a time. Softmax, lse, D and every sum stay float32, as in
// FlashAttention-2; the operands q k v, P, dy and dS are rounded once (Tf32x3: split at each mma).
// MMA_ROWS (query or key rows per block: 4 warps x 16) comes from TC_ROWS in numgpt/kernels.py
// F::TILE: rows of the other operand per shared-memory tile, MMA_ROWS or a divisor of it (so that
// the tiles line up with the blocks: the diagonal's are a block's own rows)

// F::TILE rows of HS operands in shared memory, as words: 4 words of padding a row put the rows
// that one fragment load reads in different banks
template <class F, int HS> using Tile = unsigned[F::TILE][HS / F::PER_WORD + 4];

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

// x rounded to TF32 (to nearest, ties away from 0). volatile: where it is, once per use; else nvcc
// hoists Tf32x3's splits of a warp's A fragments out of the loops, doubling their registers (spills)
__device__ __forceinline__ unsigned tf32_bits(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned r;
    asm volatile("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#elif defined(__CUDA_ARCH__)
    __trap();
    return 0;
#else
    return emu::tf32_bits(x);
#endif
}

// c (16x8, float32) += a (16xK) b (Kx8), one warp: every lane must call it. K = 16: float16
// operands, two to a register; K = 8: TF32, one to a register
template <int K>
__device__ __forceinline__ void mma_sync(float* c, const unsigned* a, const unsigned* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MMA_REGISTERS : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) \
                      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1])
    if constexpr (K == 16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};" MMA_REGISTERS);
    else
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};" MMA_REGISTERS);
#undef MMA_REGISTERS
#elif defined(__CUDA_ARCH__)
    __trap();
#else
    if constexpr (K == 16) emu::mma_16x8x16(c, a, b);
    else emu::mma_16x8x8(c, a, b);
#endif
}

struct Half {
    // dims one mma sums over; operands per register; rows per shared-memory tile
    static constexpr int K = 16, PER_WORD = 2, TILE = MMA_ROWS;

    static __device__ __forceinline__ unsigned word(const float* x, float factor) {   // x[0], x[1] times factor
        return pack_half2(x[0] * factor, x[1] * factor);
    }

    static __device__ __forceinline__ void mma(float* c, const unsigned* a, const unsigned* b) { mma_sync<K>(c, a, b); }

    // B = X for the rows [k0, k0 + 16) and column col of a tile X: the halves of each register
    // come from two rows
    template <class Rows>   // a Tile<Half, HS>
    static __device__ __forceinline__ void b_from_columns(unsigned* b, Rows& tile, int k0, int col) {
        int t = threadIdx.x % 4, shift = 16 * (col % 2);
        #pragma unroll
        for (int i = 0; i < 2; ++i) {
            int row = k0 + 2 * t + 8 * i;
            b[i] = (tile[row][col / 2] >> shift & 0xffffu) | (tile[row + 1][col / 2] >> shift << 16);
        }
    }

    // the A fragment of the 16x16 tile that the accumulator tiles p[0] and p[1] hold side by side:
    // each register's two floats are neighbours in one accumulator
    static __device__ __forceinline__ void a_from_accumulators(unsigned* a, float (*p)[4]) {
        a[0] = pack_half2(p[0][0], p[0][1]);
        a[1] = pack_half2(p[0][2], p[0][3]);
        a[2] = pack_half2(p[1][0], p[1][1]);
        a[3] = pack_half2(p[1][2], p[1][3]);
    }
};

// The m16n8k8 layouts of TF32 operands, shared by Tf32 and Tf32x3 (Self: which one, for its
// `operand`, the register it makes of one float). They take the accumulators of one 16x8 tile as
// a 16x8 A, but those hold its columns 2t and 2t+1 where A wants t and t+4. A product sums over k
// in any order, so the products that take P (or dS) as A reorder each 8 keys: A's column (and
// B's row) t is key 2t, and t + 4 is key 2t + 1.
template <class Self>
struct Tf32Layout {
    static constexpr int K = 8, PER_WORD = 1, TILE = MMA_ROWS;

    static __device__ __forceinline__ unsigned word(const float* x, float factor) {
        return Self::operand(x[0] * factor);
    }

    static __device__ __forceinline__ void mma(float* c, const unsigned* a, const unsigned* b) { mma_sync<K>(c, a, b); }

    // B = X for the rows [k0, k0 + 8) and column col of a tile X, in the reordered keys: b[i] is row k0 + 2t + i
    template <class Rows>   // a Tile<Self, HS>
    static __device__ __forceinline__ void b_from_columns(unsigned* b, Rows& tile, int k0, int col) {
        int t = threadIdx.x % 4;
        b[0] = tile[k0 + 2 * t][col];
        b[1] = tile[k0 + 2 * t + 1][col];
    }

    // the A fragment, in the reordered keys, of the 16x8 tile that the accumulator tile p[0] holds
    static __device__ __forceinline__ void a_from_accumulators(unsigned* a, float (*p)[4]) {
        a[0] = Self::operand(p[0][0]);
        a[1] = Self::operand(p[0][2]);
        a[2] = Self::operand(p[0][1]);
        a[3] = Self::operand(p[0][3]);
    }
};

// --precision tf32: the operands rounded to TF32, one mma each
struct Tf32 : Tf32Layout<Tf32> {
    static __device__ __forceinline__ unsigned operand(float x) { return tf32_bits(x); }
};

// --precision fp32: float32's accuracy from TF32 tensor cores, as CUTLASS's 3xTF32
// (OpMultiplyAddFastF32, which torch's float32 attention runs on compute capability 8.0+). The
// registers hold float32 operands; each product splits x = big + small, big = tf32(x) and small =
// tf32(x - big) (x - big is exact, and big + small misses x by at most 2^-22 |x|), and adds
// a_small b_big + a_big b_small + a_big b_big: three mma, leaving out a_small b_small (< 2^-22 |a b|)
struct Tf32x3 : Tf32Layout<Tf32x3> {
    // half a block's rows a tile: the splits' registers leave no room for tc_attention_dkv's 64 x 64 tiles
    static constexpr int TILE = MMA_ROWS / 2;

    static __device__ __forceinline__ unsigned operand(float x) { return __float_as_uint(x); }

    template <int N>
    static __device__ __forceinline__ void split(const unsigned* x, unsigned* big, unsigned* small) {
        #pragma unroll
        for (int i = 0; i < N; ++i) {
            big[i] = tf32_bits(__uint_as_float(x[i]));
            small[i] = tf32_bits(__uint_as_float(x[i]) - __uint_as_float(big[i]));
        }
    }

    static __device__ __forceinline__ void mma(float* c, const unsigned* a, const unsigned* b) {   // hides the layout's
        unsigned a_big[4], a_small[4], b_big[2], b_small[2];
        split<4>(a, a_big, a_small);
        split<2>(b, b_big, b_small);
        mma_sync<K>(c, a_small, b_big);   // the small terms first: added to c before the big one
        mma_sync<K>(c, a_big, b_small);
        mma_sync<K>(c, a_big, b_big);
    }
};

// -inf: the running max before the first key, and a masked score (exp(-inf - max) is 0). A finite
// sentinel such as -1e30 would outweigh real scores below it, and the masked keys would count
__device__ __forceinline__ float minus_infinity() { return -__uint_as_float(0x7f800000u); }

// rows [start, start + F::TILE) of a (T, HS) operand whose row r starts at x + r stride, times
// `factor`, into a tile of words; rows at or past T are zeros
template <class F, int HS>
__device__ void load_tile(Tile<F, HS>& tile, const float* x, long long stride, int start, int T, float factor) {
    // every kernel loads tiles: the shapes its loops assume, checked once here
    static_assert(MMA_ROWS % F::TILE == 0 && F::TILE % F::K == 0, "tiles must fit the blocks and the mma shape");
    constexpr int WORDS = HS / F::PER_WORD;
    for (int e = threadIdx.x; e < F::TILE * WORDS; e += blockDim.x) {
        int r = e / WORDS, w = e % WORDS;
        tile[r][w] = start + r < T ? F::word(x + (start + r) * stride + F::PER_WORD * w, factor) : 0u;
    }
}

// the A fragments a[kk] (the dims [K kk, K kk + K)) of rows [row0, row0 + 16) of a (T, HS)
// operand (row r at x + r stride), times factor; rows at or past T are zeros
template <class F, int HS>
__device__ void load_a_fragments(unsigned (*a)[4], const float* x, long long stride, int row0, int T, float factor) {
    int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    #pragma unroll
    for (int kk = 0; kk < HS / F::K; ++kk)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            int row = row0 + g + 8 * (i % 2), w = F::K / F::PER_WORD * kk + t + 4 * (i / 2);
            a[kk][i] = row < T ? F::word(x + row * stride + F::PER_WORD * w, factor) : 0u;
        }
}

// B = X^T for the rows [n0, n0 + 8) and dims [k0, k0 + K) of a tile X: b[j] is the word t + 4 j of row g
template <class F, int HS>
__device__ __forceinline__ void b_from_rows(unsigned* b, Tile<F, HS>& tile, int n0, int k0) {
    int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    b[0] = tile[n0 + g][k0 / F::PER_WORD + t];
    b[1] = tile[n0 + g][k0 / F::PER_WORD + 4 + t];
}

// s (16 rows x F::TILE, as F::TILE / 8 accumulator tiles) = rows a (16 x HS) . the tile's rows
template <class F, int HS>
__device__ __forceinline__ void products_with_rows(float (*s)[4], unsigned (*a)[4], Tile<F, HS>& tile) {
    #pragma unroll
    for (int n = 0; n < F::TILE / 8; ++n) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0;
        #pragma unroll
        for (int kk = 0; kk < HS / F::K; ++kk) {
            unsigned b[2];
            b_from_rows<F, HS>(b, tile, 8 * n, F::K * kk);
            F::mma(s[n], a[kk], b);
        }
    }
}

// acc (16 x HS) += p (16 x F::TILE, accumulator tiles) . the tile (F::TILE x HS)
template <class F, int HS>
__device__ __forceinline__ void accumulate_product(float (*acc)[4], float (*p)[4], Tile<F, HS>& tile) {
    int g = threadIdx.x % 32 / 4;
    #pragma unroll
    for (int kk = 0; kk < F::TILE / F::K; ++kk) {
        unsigned a[4];
        F::a_from_accumulators(a, p + F::K / 8 * kk);
        #pragma unroll
        for (int n = 0; n < HS / 8; ++n) {
            unsigned b[2];
            F::b_from_columns(b, tile, F::K * kk, 8 * n + g);
            F::mma(acc[n], a, b);
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
template <class F, int HS>
__device__ void tc_attention_forward(const float* qkv, float* y, float* lse, int T, int n_head, float scale) {
    __shared__ Tile<F, HS> k_tile, v_tile;
    int C = n_head * HS, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    int q0 = (int)blockIdx.x * MMA_ROWS + (int)threadIdx.x / 32 * 16;   // this warp's first query
    int last = min(T, ((int)blockIdx.x + 1) * MMA_ROWS) - 1;            // later keys are masked for every row here
    const float* head = qkv + (long long)blockIdx.z * T * 3 * C + blockIdx.y * HS;
    unsigned q[HS / F::K][4];
    load_a_fragments<F, HS>(q, head, 3 * C, q0, T, scale);
    // rows g and g + 8: the running max, this lane's sum
    float acc[HS / 8][4] = {}, m[2] = {minus_infinity(), minus_infinity()}, l[2] = {0, 0};
    for (int start = 0; start <= last; start += F::TILE) {
        __syncthreads();   // every warp is done with the previous tiles
        load_tile<F, HS>(k_tile, head + C, 3 * C, start, T, 1.0f);
        load_tile<F, HS>(v_tile, head + 2 * C, 3 * C, start, T, 1.0f);
        __syncthreads();
        // every row keeps key 0, so from the first tile on each row's max is a real score (a later
        // tile may mask all of a warp's rows: their max stays, and their exps are 0)
        float s[F::TILE / 8][4];
        products_with_rows<F, HS>(s, q, k_tile);
        float tile_max[2] = {m[0], m[1]};
        #pragma unroll
        for (int n = 0; n < F::TILE / 8; ++n)
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                int key = start + accumulator_column(n, i), row = q0 + accumulator_row(i);
                if (key > row || key >= T) s[n][i] = minus_infinity();   // the causal mask
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
        for (int n = 0; n < F::TILE / 8; ++n)
            #pragma unroll
            for (int i = 0; i < 4; ++i) { s[n][i] = exp(s[n][i] - m[i / 2]); l[i / 2] += s[n][i]; }
        accumulate_product<F, HS>(acc, s, v_tile);
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
template <class F, int HS>
__device__ void tc_attention_dq(const float* qkv, const float* dy, const float* y, const float* lse, float* D,
                                float* dqkv, int T, int n_head, float scale) {
    __shared__ Tile<F, HS> k_tile, v_tile;
    int C = n_head * HS;
    int q0 = (int)blockIdx.x * MMA_ROWS + (int)threadIdx.x / 32 * 16;
    int last = min(T, ((int)blockIdx.x + 1) * MMA_ROWS) - 1;
    long long head_offset = (long long)blockIdx.z * T * 3 * C + blockIdx.y * HS;
    const float* head = qkv + head_offset;
    const float* dy_head = dy + (long long)blockIdx.z * T * C + blockIdx.y * HS;
    unsigned q[HS / F::K][4], gq[HS / F::K][4];   // scale q and dy of this warp's rows, as A fragments
    load_a_fragments<F, HS>(q, head, 3 * C, q0, T, scale);
    load_a_fragments<F, HS>(gq, dy_head, C, q0, T, 1.0f);
    float L[2], Dr[2], dq[HS / 8][4] = {};
    tc_row_statistics<HS>(L, Dr, dy, y, lse, D, q0, T, C, n_head);
    for (int start = 0; start <= last; start += F::TILE) {
        __syncthreads();
        load_tile<F, HS>(k_tile, head + C, 3 * C, start, T, 1.0f);
        load_tile<F, HS>(v_tile, head + 2 * C, 3 * C, start, T, 1.0f);
        __syncthreads();
        float s[F::TILE / 8][4], dp[F::TILE / 8][4];
        products_with_rows<F, HS>(s, q, k_tile);
        products_with_rows<F, HS>(dp, gq, v_tile);
        #pragma unroll
        for (int n = 0; n < F::TILE / 8; ++n)
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                int key = start + accumulator_column(n, i), row = q0 + accumulator_row(i);
                bool masked = key > row || key >= T || row >= T;
                s[n][i] = masked ? 0 : exp(s[n][i] - L[i / 2]) * (dp[n][i] - Dr[i / 2]);   // ds
            }
        accumulate_product<F, HS>(dq, s, k_tile);
    }
    store_accumulators<HS>(dqkv + head_offset, 3 * C, dq, q0, T, scale, scale);
}

// grid (ceil(T / MMA_ROWS), n_head, B) over keys, 128 threads; the queries i >= j pass through shared
// memory: dk_j = sum_i ds_ij (scale q_i), dv_j = sum_i p_ij dy_i, from the transposed products
// s^T = k (scale q)^T and dp^T = v dy^T, so that the keys are the rows of every accumulator
template <class F, int HS>
__device__ void tc_attention_dkv(const float* qkv, const float* dy, const float* lse, const float* D, float* dqkv,
                                 int T, int n_head, float scale) {
    __shared__ Tile<F, HS> q_tile, g_tile;
    __shared__ float lse_tile[F::TILE], D_tile[F::TILE];
    int C = n_head * HS;
    int k0 = (int)blockIdx.x * MMA_ROWS + (int)threadIdx.x / 32 * 16;   // this warp's first key
    long long head_offset = (long long)blockIdx.z * T * 3 * C + blockIdx.y * HS;
    const float* head = qkv + head_offset;
    const float* dy_head = dy + (long long)blockIdx.z * T * C + blockIdx.y * HS;
    const float* stats_lse = lse + ((long long)blockIdx.z * n_head + blockIdx.y) * T;
    const float* stats_D = D + ((long long)blockIdx.z * n_head + blockIdx.y) * T;
    unsigned kr[HS / F::K][4], vr[HS / F::K][4];
    load_a_fragments<F, HS>(kr, head + C, 3 * C, k0, T, 1.0f);
    load_a_fragments<F, HS>(vr, head + 2 * C, 3 * C, k0, T, 1.0f);
    float dk[HS / 8][4] = {}, dv[HS / 8][4] = {};
    // earlier queries see none of this block's keys
    for (int start = (int)blockIdx.x * MMA_ROWS; start < T; start += F::TILE) {
        __syncthreads();
        load_tile<F, HS>(q_tile, head, 3 * C, start, T, scale);
        load_tile<F, HS>(g_tile, dy_head, C, start, T, 1.0f);
        for (int e = threadIdx.x; e < F::TILE; e += blockDim.x) {
            lse_tile[e] = start + e < T ? stats_lse[start + e] : 0;
            D_tile[e] = start + e < T ? stats_D[start + e] : 0;
        }
        __syncthreads();
        float st[F::TILE / 8][4], dpt[F::TILE / 8][4];   // keys x queries
        products_with_rows<F, HS>(st, kr, q_tile);
        products_with_rows<F, HS>(dpt, vr, g_tile);
        #pragma unroll
        for (int n = 0; n < F::TILE / 8; ++n)
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                int query = accumulator_column(n, i), key = k0 + accumulator_row(i);
                bool masked = start + query < key || start + query >= T || key >= T;
                st[n][i] = masked ? 0 : exp(st[n][i] - lse_tile[query]);   // p^T
                dpt[n][i] = st[n][i] * (dpt[n][i] - D_tile[query]);        // ds^T
            }
        accumulate_product<F, HS>(dv, st, g_tile);
        accumulate_product<F, HS>(dk, dpt, q_tile);
    }
    store_accumulators<HS>(dqkv + head_offset + C, 3 * C, dk, k0, T, 1.0f, 1.0f);
    store_accumulators<HS>(dqkv + head_offset + 2 * C, 3 * C, dv, k0, T, 1.0f, 1.0f);
}

// one kernel of each per format and head size: the fragments' arrays need their sizes at compile time
#define TC_ATTENTION_KERNELS(F, NAME, HS)                                                                      \
extern "C" __global__ void tc_attention_forward_##NAME##_##HS(const float* qkv, float* y, float* lse, int T,     \
                                                              int n_head, float scale) {                       \
    tc_attention_forward<F, HS>(qkv, y, lse, T, n_head, scale);                                                \
}                                                                                                              \
extern "C" __global__ void tc_attention_dq_##NAME##_##HS(const float* qkv, const float* dy, const float* y,     \
                                                         const float* lse, float* D, float* dqkv, int T,       \
                                                         int n_head, float scale) {                            \
    tc_attention_dq<F, HS>(qkv, dy, y, lse, D, dqkv, T, n_head, scale);                                       \
}                                                                                                              \
extern "C" __global__ void tc_attention_dkv_##NAME##_##HS(const float* qkv, const float* dy, const float* lse,  \
                                                          const float* D, float* dqkv, int T, int n_head,      \
                                                          float scale) {                                       \
    tc_attention_dkv<F, HS>(qkv, dy, lse, D, dqkv, T, n_head, scale);                                         \
}
#define TC_ATTENTION_KERNELS_OF_SIZE(HS) \
    TC_ATTENTION_KERNELS(Half, half, HS) TC_ATTENTION_KERNELS(Tf32, tf32, HS) TC_ATTENTION_KERNELS(Tf32x3, tf32x3, HS)
FOR_EACH_TC_HEAD_SIZE(TC_ATTENTION_KERNELS_OF_SIZE)   // TC_HEAD_SIZES in numgpt/kernels.py
#endif   // REAL_IS_FLOAT
