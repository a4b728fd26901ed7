// GELU, the tanh approximation GPT-2 uses; one thread per element, a grid-stride loop.
// Part of the one program numgpt/kernels.py compiles: its source(dtype) defines REAL and the rest.
#define GELU_SCALE ((REAL)0.79788456080286541)   // sqrt(2/pi)
#define GELU_CUBIC ((REAL)0.044715)
#define GELU_SATURATION ((REAL)10)              // see GELU_SATURATION in numgpt/layers/activations.py

// y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with y in REAL or (OUT = HALF) float16
template <class OUT> __device__ void gelu_forward_elements(const REAL* x, OUT* y, long long n) {
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        REAL v = x[i];
        store(&y[i], (REAL)0.5 * v * ((REAL)1 + tanh(GELU_SCALE * (v + GELU_CUBIC * v * v * v))));
    }
}

extern "C" __global__ void gelu_forward(const REAL* x, REAL* y, long long n) { gelu_forward_elements(x, y, n); }
#if REAL_IS_FLOAT   // float16 from float32 arithmetic (from float64 through float it would round twice)
extern "C" __global__ void gelu_forward_half(const REAL* x, HALF* y, long long n) { gelu_forward_elements(x, y, n); }
#endif

// dx = dy (1 + t) (0.5 + s (1 - t)),  t = tanh(u),  s = 0.5 x sqrt(2/pi) (1 + 3 * 0.044715 x^2),
// with x clipped where the slope is exactly 1 or 0 already: a huge x^3 would make s * (1 - t) inf * 0
extern "C" __global__ void gelu_backward(const REAL* x, const REAL* dy, REAL* dx, long long n) {
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        REAL v = x[i];   // clipped by comparisons, which keep a NaN (fmin/fmax would drop it, as NumPy's clip does not)
        v = v > GELU_SATURATION ? GELU_SATURATION : (v < -GELU_SATURATION ? -GELU_SATURATION : v);
        REAL t = tanh(GELU_SCALE * (v + GELU_CUBIC * v * v * v));
        REAL s = (REAL)0.5 * GELU_SCALE * v * ((REAL)1 + (REAL)3 * GELU_CUBIC * v * v);
        dx[i] = dy[i] * ((REAL)1 + t) * ((REAL)0.5 + s * ((REAL)1 - t));
    }
}
