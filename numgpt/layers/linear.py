"""Linear layer in GPT-2's Conv1D layout: the weight is stored (in, out), so y = x @ w + b."""

from numgpt import kernels
from numgpt.backend import array_module
from numgpt.precision import matmul, matmul_operand


def linear_forward(x, w, b=None):
    """y = x @ w + b.   x (..., C_in), w (C_in, C_out), b (C_out,) or None  ->  y (..., C_out).

    Every leading axis is a row: the product is one 2-D matmul. (NumPy's (B,T,C) @ (C,C') broadcasts
    w over B, a smaller matmul per batch row: 1.4-2x slower than one on (B*T,C) at the tutorial's
    shapes, NumPy 2.4 on 2 cores.) Outside mixed precision matmul_operand(a) is a itself and
    matmul(a, w, bias) is a @ w + bias; under it, both round to float16 (numgpt.precision).
    """
    # x and w as the matmuls take them (float16 under mixed precision): the backward multiplies
    # with both again, so they are rounded once and kept rounded
    # N = rows: every leading axis flattened (B*T)
    x2d, w = matmul_operand(x.reshape(-1, x.shape[-1])), matmul_operand(w)     # (N, C_in), (C_in, C_out)
    y = matmul(x2d, w, bias=b)                         # (N, C_out), in the wider of x's and w's dtypes
    return y.reshape(*x.shape[:-1], w.shape[1]), (x2d, w, x.shape, b is not None)


def linear_backward(dy, cache):
    """dx = dy @ w^T, dw = x^T @ dy, db = sum of dy over rows.
    dy (..., C_out) -> dx (..., C_in), dw (C_in, C_out), db (C_out,) or None."""
    x2d, w, x_shape, has_bias = cache
    dy2d = dy.reshape(-1, dy.shape[-1])                # (N, C_out)
    dy_op = matmul_operand(dy2d)                       # dy as matmul takes it: rounded once for both products
    dx = matmul(dy_op, w.T).reshape(x_shape)           # (..., C_in)
    dw = matmul(x2d.T, dy_op)                          # (C_in, C_out)
    db = sum_rows(dy2d) if has_bias else None          # (C_out,), from the unrounded dy
    return dx, dw, db


SUM_ROWS_BLOCK = 128   # rows summed one after another before their sum joins the others'


def sum_rows(x):
    """The sum over every row of x (..., C) -> (C,): a bias gradient.

    In two levels: the sum of each block of SUM_ROWS_BLOCK rows, then of the blocks' sums (the GPU's
    kernel, numgpt.kernels.sum_rows, whose twin this is, also sums groups of rows, then their sums).
    NumPy adds the rows of a first-axis sum one after another, and float32's rounding error grows
    with their number: 2e-6 relative at 16384 rows of 768, 1.8e-7 in two levels (torch's 5e-8), for
    up to ~40% more time, under 0.1 ms for 1024 rows of 768 either way."""
    if kernels.enabled(array_module(x)):
        return kernels.sum_rows(x)
    rows = x.reshape(-1, x.shape[-1])                                       # (N,C)
    whole = rows.shape[0] - rows.shape[0] % SUM_ROWS_BLOCK
    blocks = rows[:whole].reshape(-1, SUM_ROWS_BLOCK, rows.shape[1]).sum(axis=1)   # (N/block,C)
    return blocks.sum(axis=0) + rows[whole:].sum(axis=0)


def named_grads(name, dw, db):
    """{name.weight: dw, name.bias: db} in GPT-2's naming, of a linear layer or a layernorm; no bias
    entry for a bias-free one."""
    grads = {f"{name}.weight": dw}
    if db is not None:
        grads[f"{name}.bias"] = db
    return grads
