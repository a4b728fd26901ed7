"""Layer normalisation over the last axis (Ba et al. 2016), as in GPT-2 with eps = 1e-5."""

from numgpt.backend import array_module


def layernorm_forward(x, w, b=None, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * w + b, statistics over C.   x (B,T,C), w, b (C,) -> y.

    The variance is the mean squared deviation (not E[x^2] - E[x]^2, which cancels badly when
    |mean| >> std). The cache keeps the normalised input and 1/std for the backward.
    """
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)              # (B,T,1)
    xc = x - mean                                      # (B,T,C)
    var = (xc * xc).mean(axis=-1, keepdims=True)       # (B,T,1)
    rstd = 1.0 / xp.sqrt(var + eps)                    # (B,T,1)
    xhat = xc * rstd                                   # (B,T,C)
    y = xhat * w
    if b is not None:
        y += b
    return y, (xhat, rstd, w, b is not None)


def layernorm_backward(dy, cache):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w; dw, db sum over rows.

    db is None for a bias-free layernorm.

    Derivation (llm.c doc/layernorm): xhat depends on x directly and through mean and rstd; the
    two mean terms are those indirect paths.
    """
    xhat, rstd, w, has_bias = cache
    C = xhat.shape[-1]
    rows = (-1, C)
    dw = (dy * xhat).reshape(rows).sum(axis=0)         # (C,)
    db = dy.reshape(rows).sum(axis=0) if has_bias else None  # (C,)
    g = dy * w                                         # (B,T,C)
    g_mean = g.mean(axis=-1, keepdims=True)            # (B,T,1)
    gx_mean = (g * xhat).mean(axis=-1, keepdims=True)  # (B,T,1)
    dx = (g - g_mean - xhat * gx_mean) * rstd          # (B,T,C)
    return dx, dw, db
