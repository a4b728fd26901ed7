"""Layer normalisation over the last axis (Ba et al. 2016), as in GPT-2 with eps = 1e-5."""

from numgpt import kernels
from numgpt.backend import array_module
from numgpt.layers.linear import sum_rows
from numgpt.precision import as_dtype


def layernorm_forward(x, w, b=None, eps=1e-5, out_dtype=None):
    """y = (x - mean) / sqrt(var + eps) * w + b, statistics over C.   x (..., C), w, b (C,) -> y alike.

    The variance is the mean squared deviation (divided by C, as torch's LayerNorm does, not C - 1;
    and not E[x^2] - E[x]^2, which cancels badly when |mean| >> std). The cache keeps the normalised input
    and 1/std for the backward. Two new (B,T,C) arrays, the rest in place: every extra temporary is
    one more pass through memory. On a GPU one fused kernel makes y, xhat and rstd
    (numgpt.kernels; this code is its twin). y comes in `out_dtype` when given (rounded from x's
    dtype: float16 for a matmul, see operand_dtype).
    """
    xp = array_module(x)
    if kernels.enabled(xp):
        y, xhat, rstd = kernels.layernorm_forward(x, w, b, eps, out_dtype)
        return as_dtype(y, out_dtype), (xhat, rstd, w, b is not None)
    # plain form: mu = x.mean(-1, keepdims=True); xhat = (x - mu) / sqrt(((x - mu)**2).mean(-1, keepdims=True)
    # + eps); y = xhat * w + b
    mean = x.mean(axis=-1, keepdims=True)              # (...,1)
    xhat = x - mean                                    # (...,C): x - mean, normalised below
    y = xp.multiply(xhat, xhat)                        # (...,C): squares first, the output later
    var = y.mean(axis=-1, keepdims=True)               # (...,1)
    rstd = 1.0 / xp.sqrt(var + eps)                    # (...,1)
    xhat *= rstd
    xp.multiply(xhat, w, out=y)
    if b is not None:
        y += b
    return as_dtype(y, out_dtype), (xhat, rstd, w, b is not None)


def layernorm_backward(dy, cache):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w; dw = sum over rows of
    dy * xhat, db = sum over rows of dy.   dy (..., C) -> dx (..., C), dw (C,), db (C,) or None.

    db is None for a bias-free layernorm.

    Derivation (every mean over C): xhat = (x - mean) * rstd depends on x directly (the g * rstd
    term), through mean (-mean(g) * rstd) and through rstd (-xhat * mean(g * xhat) * rstd). The
    full steps are in llm.c's doc/layernorm.
    """
    xhat, rstd, w, has_bias = cache
    xp = array_module(dy)
    if kernels.enabled(xp):   # dx in one fused kernel, dw and db in one each (this code is their twin)
        return (kernels.layernorm_dx(dy, xhat, rstd, w), kernels.sum_rows(dy, xhat),
                kernels.sum_rows(dy) if has_bias else None)
    # plain form: g = dy * w; dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    scratch = dy * xhat                                # (...,C)
    dw = sum_rows(scratch)                             # (C,)
    db = sum_rows(dy) if has_bias else None            # (C,)
    dx = dy * w                                        # (...,C): g, turned into dx in place
    g_mean = dx.mean(axis=-1, keepdims=True)           # (...,1)
    xp.multiply(dx, xhat, out=scratch)
    gxhat_mean = scratch.mean(axis=-1, keepdims=True)  # (...,1): mean(g * xhat)
    dx -= g_mean
    dx -= xp.multiply(xhat, gxhat_mean, out=scratch)
    dx *= rstd
    return dx, dw, db
