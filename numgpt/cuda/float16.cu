// float16 outputs without cuda_fp16.h, which NVRTC cannot find: a float16 travels as its 16 bits.
// Part of the one program numgpt/kernels.py compiles: its source(dtype) defines REAL and the rest.
#define HALF unsigned short   // a float16 element; numgpt/kernels.py hands these kernels float16 arrays

// x rounded to the nearest float16, ties to even (as NumPy's and CuPy's astype round)
__device__ __forceinline__ HALF half_bits(float x) {
#ifdef __CUDA_ARCH__
    HALF h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#else
    return emu::half_bits(x);   // the CPU emulator (tests/cuda_emulator.h)
#endif
}

// *y = v, for an output in the kernels' REAL or, rounded once, in float16: a kernel written as a
// template over its output type stores through these
__device__ __forceinline__ void store(REAL* y, REAL v) { *y = v; }
__device__ __forceinline__ void store(HALF* y, float v) { *y = half_bits(v); }
