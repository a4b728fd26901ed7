// Enough of CUDA's execution model to run numgpt's kernels on a CPU, in one OS thread.
//
// Each CUDA thread of a block is a fiber (a stack of its own); the blocks of a grid run
// one after another, so a __shared__ array (a static local here) belongs to one block at a time.
// A fiber runs until it reaches __syncthreads(), a warp shuffle or an mma.sync, then yields.
// __syncthreads() releases the block's fibers when all of them wait there; a shuffle (or an mma)
// releases a warp when its 32 lanes have posted their values (each reads its partner's, then all
// wait again before the slots are reused). A thread that returns stops counting, as an exited thread does on a GPU. Warps run
// one at a time from one block barrier to the next, and the order of warps and of lanes flips at
// every release (see run_block), so a read of shared memory that lacks a barrier meets unwritten
// or overwritten data in one order or the other. A wait that can never be released (a
// __syncthreads() that some threads skip) ends the launch with an error instead of hanging, and so
// does a grid or block that a GPU refuses to launch (a dimension of 0, or over its limit). Nothing
// preempts a fiber: a warp that waits for another warp's write must shuffle while it waits (after
// RUN_AHEAD warp barriers the other warps run); a loop with neither shuffle nor barrier spins forever.
// What this cannot show: speed, and the device's own rounding (no fused multiply-adds here).
#pragma once

// Fibers switch with _setjmp/_longjmp, which save no signal mask and so make no system call
// (swapcontext makes two per switch: most of a launch's time). ucontext only starts a fiber. A
// fortified longjmp (_FORTIFY_SOURCE, on by default in some compilers) aborts a jump to a stack
// below the current one, which a switch between fibers is half the time: cuda_emulator.py compiles
// with -U_FORTIFY_SOURCE, and this #undef covers a compiler that adds it later.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <ucontext.h>
#if defined(__USE_FORTIFY_LEVEL) && __USE_FORTIFY_LEVEL > 0
#error "cuda_emulator.h must come before every other include: a fortified longjmp cannot switch fibers"
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };

namespace emu {

enum State { RUNNING, AT_BLOCK_BARRIER, AT_WARP_BARRIER, EXITED };

struct Fiber {
    ucontext_t start;           // how a fresh fiber begins (makecontext)
    jmp_buf resume;             // where a started fiber goes on
    bool started = false;       // false: the next switch to it begins fiber_main afresh
    std::vector<char> stack = std::vector<char>(256 * 1024);
    dim3 index;
    State state = RUNNING;
};

// When `fibers` grows it moves each Fiber, and a move keeps each stack's buffer where it is: the
// parked fibers' saved stack pointers (in `resume`) stay valid.
static_assert(std::is_nothrow_move_constructible_v<Fiber>, "growing `fibers` must move the stacks, not copy them");

inline dim3 grid_dim, block_dim, block_idx, thread_idx;
// a GPU runs a grid's blocks in any order, here one after another: first to last, or (set by
// cuda_emulator.py's reversed_blocks) last to first, so that a block's write into another block's
// part, which the owner would overwrite later in the usual order, stays and shows
inline bool blocks_reversed = false;
inline std::vector<Fiber> fibers;   // grows to the largest block launched, never shrinks: stacks are reused
inline int block_threads = 0;        // the threads of the block running now: fibers[0 .. block_threads)
inline int current = 0;
inline jmp_buf scheduler;
inline const std::function<void()>* kernel_body = nullptr;
inline double warp_slots[1024];   // one slot per thread of the block: wide enough for float, double, int

inline void wait(State reason) {
    fibers[current].state = reason;
    if (!_setjmp(fibers[current].resume)) _longjmp(scheduler, 1);
}

inline void syncthreads() { wait(AT_BLOCK_BARRIER); }

template <class T> T shfl_xor(T value, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(double), "a shuffled value must fit a slot");
    int me = current, partner = (me & ~31) | ((me & 31) ^ lane_mask);   // one-dimensional blocks
    *reinterpret_cast<T*>(&warp_slots[me]) = value;
    wait(AT_WARP_BARRIER);
    T result = *reinterpret_cast<T*>(&warp_slots[partner]);
    wait(AT_WARP_BARRIER);
    return result;
}

// float16 bits <-> float, rounding to nearest even (as cvt.rn.f16.f32 and cvt.rn.f16x2.f32): g++'s _Float16
inline unsigned short half_bits(float x) {
    _Float16 h = (_Float16)x;
    unsigned short bits;
    std::memcpy(&bits, &h, sizeof bits);
    return bits;
}

inline unsigned pack_half2(float lo, float hi) {   // lo in the low 16 bits
    return half_bits(lo) | (unsigned)half_bits(hi) << 16;
}

inline float half_at(unsigned bits, int which) {   // the low (0) or high (1) half of a register
    unsigned short half = bits >> (16 * which);
    _Float16 h;
    std::memcpy(&h, &half, sizeof h);
    return h;
}

// x rounded to TF32 (a 10-bit mantissa), to nearest with ties away from zero, as cvt.rna.tf32.f32:
// adding half a unit of the 13 dropped bits to the magnitude carries into the kept ones
inline unsigned tf32_bits(float x) {
    unsigned bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & ~0x1fffu;   // inf and nan stay
    return bits;
}

inline float tf32_at(unsigned bits) {   // a TF32 register's value: the tensor core ignores its low 13 bits
    bits &= ~0x1fffu;
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
}

// mma.sync.m16n8kK with float32 C, D: every lane of the warp posts its fragments; when all 32 have,
// each computes its four elements of D = A B + C from them, A(row, k) and B(k, col) reading the
// posted fragments in the layout of the instruction's operand type (see the kernels' comment). The
// products of two float16 or two TF32 are exact in float, and the sum runs over k in order (a
// tensor core may add in another order).
inline unsigned mma_a_slots[1024][4], mma_b_slots[1024][2];
inline bool partial_warp = false;   // an mma reached by fewer than 32 live lanes: the launch fails

template <int K, class ReadA, class ReadB>
inline void mma(float* c, const unsigned* a, const unsigned* b, ReadA A, ReadB B) {
    int me = current, first = me & ~31, g = (me & 31) / 4, t = me % 4;
    std::memcpy(mma_a_slots[me], a, sizeof mma_a_slots[me]);
    std::memcpy(mma_b_slots[me], b, sizeof mma_b_slots[me]);
    wait(AT_WARP_BARRIER);
    for (int lane = first; lane < first + 32; ++lane)   // an exited lane's slots hold stale fragments
        if (lane >= block_threads || fibers[lane].state == EXITED) {
            if (!partial_warp) std::fprintf(stderr, "cuda emulator: mma.sync without all 32 lanes of warp %d\n", me / 32);
            partial_warp = true;
        }
    float d[4];
    for (int i = 0; i < 4; ++i) {
        int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        d[i] = c[i];
        for (int k = 0; k < K; ++k) d[i] += A(mma_a_slots + first, row, k) * B(mma_b_slots + first, k, col);
    }
    wait(AT_WARP_BARRIER);   // every lane has read the slots before any posts new fragments
    std::memcpy(c, d, sizeof d);
}

// float16 A (16x16) and B (16x8), two to a register
inline void mma_16x8x16(float* c, const unsigned* a, const unsigned* b) {
    mma<16>(c, a, b,
            // lane 4 (row % 8) + (k % 8) / 2, register row / 8 + 2 (k / 8), half k % 2
            [](unsigned (*slots)[4], int row, int k) { return half_at(slots[4 * (row % 8) + k % 8 / 2][row / 8 + 2 * (k / 8)], k % 2); },
            // lane 4 col + (k % 8) / 2, register k / 8
            [](unsigned (*slots)[2], int k, int col) { return half_at(slots[4 * col + k % 8 / 2][k / 8], k % 2); });
}

// TF32 A (16x8) and B (8x8), one to a register
inline void mma_16x8x8(float* c, const unsigned* a, const unsigned* b) {
    mma<8>(c, a, b,
           // lane 4 (row % 8) + k % 4, register row / 8 + 2 (k / 4)
           [](unsigned (*slots)[4], int row, int k) { return tf32_at(slots[4 * (row % 8) + k % 4][row / 8 + 2 * (k / 4)]); },
           // lane 4 col + k % 4, register k / 4
           [](unsigned (*slots)[2], int k, int col) { return tf32_at(slots[4 * col + k % 4][k / 4]); });
}

// a fiber runs the kernel once per block: after the body it waits as EXITED, and the next block
// (or launch) that sets it RUNNING again sends it round the loop
inline void fiber_main() {
    for (;;) {   // thread_idx is set by the scheduler before every switch to a fiber
        (*kernel_body)();
        wait(EXITED);
    }
}

// from the scheduler to fiber `current`, until it waits
inline void switch_to_current() {
    Fiber& f = fibers[current];
    if (_setjmp(scheduler)) return;
    if (f.started) _longjmp(f.resume, 1);
    f.started = true;
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = f.stack.data();
    f.start.uc_stack.ss_size = f.stack.size();
    f.start.uc_link = nullptr;   // fiber_main never returns
    makecontext(&f.start, fiber_main, 0);
    setcontext(&f.start);
}

// release the waiters of a barrier whose every live member waits: the block, or a warp
inline bool release(int first, int count, State barrier) {
    bool all = true, any = false;
    for (int t = first; t < first + count; ++t) {
        if (fibers[t].state == EXITED) continue;
        any = true;
        all = all && fibers[t].state == barrier;
    }
    if (!(all && any)) return false;
    for (int t = first; t < first + count; ++t)
        if (fibers[t].state == barrier) fibers[t].state = RUNNING;
    return true;
}

// run one block to its end -> false on a deadlock. Between two block barriers the warps run one
// after another, each as far as it gets (a schedule a GPU may choose: nothing orders warps there),
// so a warp that lacks a barrier overwrites shared memory that another has not read yet, or reads
// what another has not written. Which warp goes first flips at every block barrier, and which lane
// at every warp barrier; odd and even blocks start the other way round.
constexpr int RUN_AHEAD = 1 << 16;

inline bool run_block(int threads, bool forward) {
    for (int t = 0; t < threads; ++t) fibers[t].state = RUNNING;
    int warps = (threads + 31) / 32;
    bool lanes_forward = forward;
    for (;;) {
        bool ran = false;
        for (int w = 0; w < warps; ++w) {
            int first = 32 * (forward ? w : warps - 1 - w), count = std::min(32, threads - first);
            // this warp, until none of its lanes can go on, or for at most RUN_AHEAD warp barriers: a
            // warp that waits (shuffling) for another warp's write must let that warp run
            bool warp_ran = true;
            for (int turns = 0; warp_ran && turns < RUN_AHEAD; ++turns) {
                warp_ran = false;
                for (int i = 0; i < count; ++i) {
                    current = first + (lanes_forward ? i : count - 1 - i);
                    thread_idx = fibers[current].index;
                    if (fibers[current].state != RUNNING) continue;
                    warp_ran = ran = true;
                    switch_to_current();
                }
                if (release(first, count, AT_WARP_BARRIER)) {
                    lanes_forward = !lanes_forward;
                    warp_ran = true;
                }
            }
        }
        if (release(0, threads, AT_BLOCK_BARRIER)) forward = !forward;
        else if (!ran) break;
    }
    bool deadlocked = false;
    for (int t = 0; t < threads; ++t)
        if (fibers[t].state != EXITED) {
            if (!deadlocked)
                std::fprintf(stderr, "cuda emulator: deadlock in block (%u,%u,%u): thread %d waits at a barrier that "
                             "not every live thread of its block or warp reaches\n", block_idx.x, block_idx.y,
                             block_idx.z, t);
            deadlocked = true;
            fibers[t].started = false;   // abandoned mid-kernel: it begins afresh on its stack next time
        }
    return !deadlocked;
}

// run body as kernel<<<grid, block>>> -> 0, or 1 when a block deadlocked, an mma lacked lanes or the
// grid or block is one a GPU refuses to launch
inline int launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    // a GPU's limits (cudaErrorInvalidConfiguration): no dimension 0 (an empty grid is an error there,
    // not a launch of nothing), grid.y and grid.z at most 65535, block.z at most 64, 1024 threads a block
    if (!grid.x || !grid.y || !grid.z || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 || !block.x ||
        !block.y || !block.z || block.x > 1024 || block.y > 1024 || block.z > 64) {
        std::fprintf(stderr, "cuda emulator: grid (%u,%u,%u), block (%u,%u,%u): a GPU refuses this launch\n", grid.x,
                     grid.y, grid.z, block.x, block.y, block.z);
        return 1;
    }
    int threads = block.x * block.y * block.z;
    if (threads > 1024) { std::fprintf(stderr, "cuda emulator: %d threads per block\n", threads); return 1; }
    grid_dim = grid;
    block_dim = block;
    kernel_body = &body;
    partial_warp = false;
    block_threads = threads;
    if ((int)fibers.size() < threads) fibers.resize(threads);
    for (int t = 0; t < threads; ++t)
        fibers[t].index = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
    unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    for (unsigned long long n = 0; n < blocks; ++n) {
        unsigned long long b = blocks_reversed ? blocks - 1 - n : n;   // x fastest, then y, then z
        block_idx = {unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / grid.x / grid.y)};
        if (!run_block(threads, (block_idx.x + block_idx.y + block_idx.z) % 2 == 0) || partial_warp) return 1;
    }
    return 0;
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, value, lane_mask) emu::shfl_xor((value), (lane_mask))

inline unsigned __float_as_uint(float x) { unsigned bits; std::memcpy(&bits, &x, sizeof bits); return bits; }
inline float __uint_as_float(unsigned bits) { float x; std::memcpy(&x, &bits, sizeof x); return x; }

using std::exp;
using std::isfinite;
using std::log;
using std::max;
using std::min;
using std::sqrt;
using std::tanh;
