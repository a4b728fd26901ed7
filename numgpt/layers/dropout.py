"""Inverted dropout: zero each element with probability p and scale the survivors by 1/(1-p),
so the expected activation is unchanged and evaluation needs no rescaling."""


def dropout_forward(x, p, rng):
    """y = x * keep / (1 - p) with keep ~ Bernoulli(1 - p).   x (...) -> y (...).

    `rng` is a random Generator of x's array module, or None for no dropout (evaluation), which
    is also what p == 0 means. The boolean mask is the cache: a quarter of a float32 copy.
    """
    if rng is None or p == 0.0:
        return x, None
    keep = rng.random(x.shape, dtype=x.dtype) >= p     # (...) bool
    y = x * keep
    y *= 1.0 / (1.0 - p)
    return y, (keep, p)


def dropout_backward(dy, cache):
    """dx = dy * keep / (1 - p): the same mask and scale as the forward.   dy -> dx (same shape)."""
    if cache is None:
        return dy
    keep, p = cache
    dx = dy * keep
    dx *= 1.0 / (1.0 - p)
    return dx
