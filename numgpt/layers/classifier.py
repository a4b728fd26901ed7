"""The language-model head fused with the loss: logits = x @ w^T, loss = cross_entropy(logits, y),
with w = wte (tied, as GPT-2) or lm_head.weight.

With a 50257-token vocabulary the (N,V) logits dominate a small model's memory (411 MB in float32
for 2048 positions), so the rows are processed in chunks: each chunk's logits are made, turned into
its share of the loss and, when a backward will follow, straight into its share of the gradients,
then dropped. The whole (N,V) array exists only when the caller asks for the logits.
"""

from numgpt import kernels
from numgpt.backend import array_module, backend_name
from numgpt.layers.cross_entropy import IGNORE_INDEX, cross_entropy_forward, row_weights, subtract_onehot
from numgpt.precision import matmul, matmul_operand, operand_dtype, using_half_matmuls

# Logits per chunk, at most, by backend. CPU: 128 MiB in float32. Measured on a 2-core CPU at
# V = 50257, the matmuls with one chunk run at ~20 GFLOP/s for 128 rows and ~95 for 512 (BLAS
# needs tall operands), while a quarter of a 2048-row batch's logits is memory we can spare.
# GPU: 1 GiB, so GPT-2's 16 x 1024 positions take 4 chunks, not 25. Each chunk after the first
# adds its share into dw, a pass that moves 3 x 154 MB of (V,C) gradient: on an H100 about half
# the time of the chunk's three fp16 products (a twentieth of fp32's). 1 GiB is little beside
# torch's whole (N,V) logits. (A choice from that arithmetic, not yet timed on a GPU.)
CHUNK_ELEMENTS = {"numpy": 1 << 25, "cupy": 1 << 28}
# Elements of the (V,C) weight gradient whose share from a chunk after the first is made, then
# added, at a time, by backend. CPU: 4 MiB in float32, a scratch of 1365 rows at C = 768 instead of a
# second whole (V,C) gradient (147 MiB at GPT-2 124M, beside the gradient itself). Alternated A/B of
# the classifier, CPU time: 0.93x at C = 768 (the scratch stays in the cache), 1.01x at C = 128 (8192
# rows); 16 MiB was as fast but left the tutorial-shaped run's peak RSS 8 MiB higher than before,
# where malloc placed it. GPU: all V rows at once, as before.
DW_ELEMENTS = {"numpy": 1 << 20, "cupy": None}


def classifier_forward(x, w, targets=None, ignore_index=IGNORE_INDEX, n_valid=None, return_logits=True,
                       requires_grad=True, grad_scale=1.0):
    """x (N,C), w (V,C), targets (N,) or None -> loss (0-d value, or None), logits (N,V) or None, cache.

    Without targets there is no loss and the logits are always returned. With targets and
    `requires_grad`, the gradients of the mean loss are computed chunk by chunk here, because the
    chunk's probabilities are at hand now and would cost a second x @ w^T to rebuild later. They
    are the gradients of grad_scale * loss (mixed precision scales the loss: see numgpt.precision).
    `n_valid`, the number of targets that are not `ignore_index`, may be given by a caller that
    counted them on the host: counting them here, on a GPU, waits for the device.

    The gradient of a chunk's logits is dlogits = a * (exps / sumexp - onehot(t)) = r * d, with
    exps the unnormalised softmax, a = grad_scale / n_valid (0 on ignored rows), r = a / sumexp
    and d = exps - sumexp * onehot(t), which changes only the n target entries of exps. The row
    scale r goes onto the (n,C) sides of the products: dx = (d @ w) * r and dw = d^T @ (x * r),
    one pass over the chunk's (n,V) array less than forming dlogits.
    """
    xp = array_module(x)
    if targets is None:
        return None, matmul(x, w.T), None
    N, V = x.shape[0], w.shape[0]
    w_m = matmul_operand(w)                                       # (V,C), rounded once for every chunk's two products
    if n_valid is None:
        n_valid = int((targets != ignore_index).sum())
    logits = xp.empty((N, V), dtype=x.dtype) if return_logits else None
    dx = xp.empty_like(x) if requires_grad else None              # (N,C)
    dw = xp.empty_like(w) if requires_grad else None              # (V,C)
    loss = 0.0
    # exp(logits) may reach e^60 when the bound lets the loss skip the row max: far beyond
    # float16's 65504, so with float16 matmuls the max is always subtracted (exps <= 1). The GPU's
    # fused kernel finds the max at no extra cost, and the bound would cost a wait for the device.
    bound = None if using_half_matmuls() or kernels.enabled(xp) else logits_bound(x, w)
    n_chunks = -(-N * V // CHUNK_ELEMENTS[backend_name(xp)])     # ceil: as few chunks as fit the budget
    chunk = -(-N // n_chunks)                                     # equal chunks: no thin, slow remainder
    # one buffer for every chunk's logits and one for its share of dw, reused: a fresh large array
    # per chunk would cost the kernel a page fault for each of its pages, every step
    chunk_buf = xp.empty((chunk, V), dtype=x.dtype)              # (chunk,V)
    dw_budget = DW_ELEMENTS[backend_name(xp)]
    dw_rows = V if dw_budget is None else max(1, dw_budget // w.shape[1])   # rows of dw_part
    dw_part = xp.empty((min(dw_rows, V), w.shape[1]), dtype=w.dtype) if requires_grad and n_chunks > 1 else None
    for i, start in enumerate(range(0, N, chunk)):
        rows = slice(start, min(start + chunk, N))
        chunk_logits = matmul(x[rows], w_m.T, out=chunk_buf[:rows.stop - start])    # (n,V)
        if return_logits:
            logits[rows] = chunk_logits
        # the chunk's logits are not needed after this: the loss works in their memory, and the
        # exps, which only the two matmuls below use, come as those take them (float16 under fp16)
        chunk_loss, ce_cache = cross_entropy_forward(
            chunk_logits, targets[rows], ignore_index, n_valid, overwrite=True, logits_bound=bound,
            exps_dtype=operand_dtype(x.dtype) if requires_grad else None)
        loss = loss + chunk_loss
        if requires_grad:
            exps, sumexp, safe_targets, valid, _ = ce_cache                   # (n,V), (n,1), (n,), (n,)
            subtract_onehot(exps, sumexp, safe_targets)                        # d (n,V), in exps' memory
            a = (row_weights(valid, n_valid) * grad_scale).astype(x.dtype)     # (n,)
            r = a[:, None] / sumexp                                            # (n,1)
            dx_rows = matmul(exps, w_m, out=dx[rows])                          # (n,C)
            dx_rows *= r
            x_scaled = x[rows] * r                                             # (n,C)
            if i == 0:
                matmul(exps.T, x_scaled, out=dw)                               # (V,C)
            else:   # dw_part is a few rows' scratch: the share of dw is made and added slice by slice
                for v0 in range(0, V, dw_rows):
                    v1 = min(v0 + dw_rows, V)
                    dw[v0:v1] += matmul(exps[:, v0:v1].T, x_scaled, out=dw_part[:v1 - v0])   # (v1-v0,C)
    return loss, logits, (dx, dw) if requires_grad else None


def logits_bound(x, w):
    """A bound on every |x_i . w_j| by Cauchy-Schwarz: max_i |x_i| * max_j |w_j| (a Python float).

    Cheap beside the logits ((N+V) C work against N V C), and after a layernorm rarely loose by
    more than a few times: when it is small the cross-entropy can skip the row max (see there).
    """
    xp = array_module(x)

    def max_sq_norm(a):   # the largest |row|^2
        return float(xp.einsum("ij,ij->i", a, a).max())

    return (max_sq_norm(x) * max_sq_norm(w)) ** 0.5


def classifier_backward(dloss, cache):
    """dx (N,C), dw (V,C) of the loss scaled by dloss: the chunked forward already did the work.

    Its "cache" is the finished (dx, dw). For the math, read classifier_forward's docstring and
    cross_entropy_backward, the unfused textbook form that the tests compare this with."""
    if cache is None:
        raise ValueError("classifier_backward needs a forward with targets and requires_grad=True")
    dx, dw = cache
    if dloss == 1.0:   # the model's case: the mean loss itself
        return dx, dw
    return dx * dloss, dw * dloss
