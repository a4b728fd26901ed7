"""Pointwise activations of the MLP, each a forward/backward pair that caches only its input.
Each forward writes its output in `out_dtype` when given (rounded from x's dtype: float16 for the
matmul that follows, see numgpt.precision.operand_dtype).

gelu        GPT-2's tanh approximation ("gelu_new" in transformers), the default.
gelu_exact  x * Phi(x) with the normal CDF Phi (torch's nn.GELU()).
relu        max(x, 0), the classic TinyStories tutorial's choice.
"""

import math

from numgpt import kernels
from numgpt.backend import array_module, cpu_blocks, erf
from numgpt.precision import as_dtype

GELU_SCALE = math.sqrt(2.0 / math.pi)  # a Python float: NumPy scalars would promote float32 to float64
GELU_CUBIC = 0.044715
INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Past |x| = 10, tanh(u) rounds to +-1 (u = 43.6 there), so GELU's slope is exactly 1 or 0 in float32
# and float64: the backward clips x to this range, changing no result, so that x^3 cannot overflow
# (beyond |x| ~ 1e13 in float32 it would, and inf * (1 - t) = inf * 0 is NaN).
GELU_SATURATION = 10.0


def gelu_forward(x, out_dtype=None):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).   x (...) -> y (...).

    Computed in place in one new array: GELU runs on the widest activations (B,T,4C), where each
    temporary array costs a pass through memory (3.4x faster than the one-expression form, the
    plain form below). On a GPU one fused kernel does it all (numgpt.kernels; this code is its twin).
    """
    xp = array_module(x)
    if kernels.enabled(xp):
        return as_dtype(kernels.gelu_forward(x, out_dtype), out_dtype), x
    # plain form: y = 0.5 * x * (1 + tanh(GELU_SCALE * (x + GELU_CUBIC * x**3)))
    y = x * x
    y *= x
    y *= GELU_CUBIC
    y += x
    y *= GELU_SCALE                                    # u = sqrt(2/pi) (x + 0.044715 x^3)
    xp.tanh(y, out=y)
    y += 1.0
    y *= x
    y *= 0.5
    return as_dtype(y, out_dtype), x


def gelu_backward(dy, x):
    """dx = dy * [0.5 (1 + t) + s (1 - t^2)], t = tanh(u), s = 0.5 x sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    dy, x (same shape) -> dx (same shape).

    Evaluated as dy * (1 + t) (0.5 + s (1 - t)), the same expression factored, in place in three
    arrays, on x clipped to +-GELU_SATURATION. sech^2 is written 1 - tanh^2: cosh overflows for
    large |x| (llm.c saw NaNs from it). On the CPU in cache-sized blocks (backend.cpu_blocks): the
    dozen passes then work on blocks of x, dy and two temporaries that stay in the cache, instead of
    streaming (B,T,4C) arrays through memory a dozen times (2x faster at GPT-2 124M's (1024, 3072)).
    """
    xp = array_module(x)
    if kernels.enabled(xp):
        return kernels.gelu_backward(dy, x)
    dx = xp.empty(x.shape, dtype=x.dtype)
    flat_dx, flat_dy, flat_x = dx.reshape(-1), dy.reshape(-1), x.reshape(-1)   # views when contiguous
    for block in cpu_blocks(xp, x.size):
        _gelu_backward_block(flat_dy[block], flat_x[block], flat_dx[block])
    return dx


def _gelu_backward_block(dy, x, out):
    """gelu_backward of dy, x into `out` (x's shape and dtype, not x itself): three arrays' passes."""
    xp = array_module(x)
    x = xp.clip(x, -GELU_SATURATION, GELU_SATURATION, out=out)   # into out, so the caller's x is kept
    x2 = x * x
    t = x2 * GELU_CUBIC
    t += 1.0
    t *= x
    t *= GELU_SCALE                                    # u
    xp.tanh(t, out=t)                                  # t
    s = x2                                             # x^2 is needed no more: s takes its memory
    s *= 3.0 * GELU_CUBIC
    s += 1.0
    s *= 0.5 * GELU_SCALE
    s *= x                                             # s
    local = xp.multiply(s, t, out=x)                   # and the clipped x's memory holds the rest
    xp.subtract(s, local, out=local)
    local += 0.5                                       # 0.5 + s (1 - t)
    t += 1.0
    local *= t
    local *= dy
    return local


def normal_cdf(x):
    """Phi(x) = 0.5 (1 + erf(x / sqrt 2)), the standard normal distribution's CDF."""
    return 0.5 * (1.0 + erf(x * INV_SQRT2))


def gelu_exact_forward(x, out_dtype=None):
    """y = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).   x (...) -> y (...)."""
    return as_dtype(x * normal_cdf(x), out_dtype), x


def gelu_exact_backward(dy, x):
    """dx = dy * [Phi(x) + x phi(x)], phi the standard normal density.   dy, x (same shape) -> dx."""
    xp = array_module(x)
    pdf = INV_SQRT_2PI * xp.exp(-0.5 * x * x)
    return dy * (normal_cdf(x) + x * pdf)


def relu_forward(x, out_dtype=None):
    """y = max(x, 0).   x (...) -> y (...)."""
    xp = array_module(x)
    return as_dtype(xp.maximum(x, 0), out_dtype), x


def relu_backward(dy, x):
    """dx = dy where x > 0, else 0.   dy, x (same shape) -> dx."""
    return dy * (x > 0)


# name -> (forward, backward); the names are GPTConfig.activation's choices.
ACTIVATIONS = {
    "gelu": (gelu_forward, gelu_backward),
    "gelu_exact": (gelu_exact_forward, gelu_exact_backward),
    "relu": (relu_forward, relu_backward),
}
