"""Linear layer in GPT-2's Conv1D layout: the weight is stored (in, out), so y = x @ w + b."""

from numgpt.precision import matmul


def linear_forward(x, w, b=None):
    """y = x @ w + b.   x (..., C_in), w (C_in, C_out), b (C_out,) or None  ->  y (..., C_out).

    Every leading axis is a row: the product is one 2-D matmul. (NumPy's (B,T,C) @ (C,C') broadcasts
    w over B and runs ~20x slower than the same product on (B*T,C), measured at the tutorial shape.)
    """
    y = matmul(x.reshape(-1, x.shape[-1]), w)          # (N, C_out)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1]), (x, w, b is not None)


def linear_backward(dy, cache):
    """dx = dy @ w^T, dw = x^T @ dy, db = sum of dy over rows.   dy (..., C_out) -> dx, dw, db|None."""
    x, w, has_bias = cache
    x2d = x.reshape(-1, x.shape[-1])                   # (N, C_in)
    dy2d = dy.reshape(-1, dy.shape[-1])                # (N, C_out)
    dx = matmul(dy2d, w.T).reshape(x.shape)            # (..., C_in)
    dw = matmul(x2d.T, dy2d)                           # (C_in, C_out)
    db = dy2d.sum(axis=0) if has_bias else None        # (C_out,)
    return dx, dw, db


def named_grads(name, dw, db):
    """{name.weight: dw, name.bias: db} in GPT-2's naming; no bias entry for a bias-free layer."""
    grads = {f"{name}.weight": dw}
    if db is not None:
        grads[f"{name}.bias"] = db
    return grads
