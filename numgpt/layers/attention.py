"""Causal multi-head self-attention (Vaswani et al. 2017) with GPT-2's fused qkv projection.

    q, k, v = split(x @ W_attn + b_attn)             each (B,nh,T,hs), hs = C / nh
    att     = softmax((q / sqrt(hs)) k^T + M)        (B,nh,T,T), M[t,s] = -inf for s > t, else 0:
                                                     row t sees positions <= t
    y       = dropout(att) v                         (B,nh,T,hs), heads merged back to (B,T,C)
    out     = dropout(y @ W_proj + b_proj)           (B,T,C)

`params` holds GPT-2's names: c_attn.weight (C,3C), c_attn.bias (3C,), c_proj.weight (C,C),
c_proj.bias (C,); the biases are absent in a bias-free model.

On a GPU the middle two lines are one kernel that never forms the (B,nh,T,T) matrix: it walks
the keys a tile at a time keeping each row's running max and sum of exps (FlashAttention, Dao et
al. 2022), and the backward recomputes the probabilities from q, k and each row's log-sum-exp.
On float32 arrays its products run on tensor cores (FlashAttention-2's layout of the work), for
head sizes 16, 32 and 64 (kernels.TC_HEAD_SIZES) on compute capability 8.0 or newer.
The matrix code here is its twin: it runs on the CPU, and on a GPU for dropout, generation, the
attention maps and the head sizes the kernels do not take (kernels.flash_attention_supports).

Generation adds one token at a time, and the keys and values of the earlier positions do not
change when it does (row t only looks left). A KVCache keeps them, so each step computes q, k, v
for the new position alone and attends over the cached ones: O(T) work per token instead of O(T^2).
"""

import math
from typing import Any, NamedTuple

from numgpt import kernels
from numgpt.backend import array_module, cpu_blocks
from numgpt.layers.dropout import dropout_backward, dropout_forward
from numgpt.layers.linear import linear_backward, linear_forward, named_grads
from numgpt.precision import matmul, tensor_core_operands


class FlashCache(NamedTuple):
    """What the fused kernels' backward needs: it recomputes the probabilities from these."""
    qkv: Any              # (B,T,3C) the forward's input
    y: Any                # (B,T,C) its output
    lse: Any              # (B,nh,T) each row's log-sum-exp of the scaled scores
    n_head: int
    scale: float          # 1 / sqrt(hs)
    operands: Any         # the tensor cores' operand format (precision.tensor_core_operands), None: FMAs


class MatrixCache(NamedTuple):
    """What the matrix path's backward needs."""
    q: Any                # (B,nh,T,hs), already scaled by 1 / sqrt(hs)
    k: Any                # (B,nh,Tk,hs), the KV cache's positions included
    v: Any                # (B,nh,Tk,hs)
    att: Any              # (B,nh,T,Tk) the probabilities
    att_drop: Any         # (B,nh,T,Tk) after dropout (att itself without)
    att_drop_cache: Any   # dropout's cache
    n_head: int
    scale: float


def split_heads(x, n_head):
    """(B,T,C) -> (B,nh,T,hs): heads become a batch axis, so one matmul serves every head."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B,nh,T,hs) -> (B,T,C), contiguous."""
    B, nh, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)


class KVCache:
    """The keys and values of the positions one attention layer has seen, for generation.

    k, v (B,nh,max_len,hs) are allocated once; positions 0..length-1 hold data. Setting length
    back to 0 empties the cache without freeing it.
    """

    def __init__(self, xp, shape, dtype):
        self.k = xp.empty(shape, dtype=dtype)           # (B,nh,max_len,hs)
        self.v = xp.empty(shape, dtype=dtype)
        self.length = 0

    def append(self, k, v):
        """Store k, v (B,nh,T,hs) after the cached positions -> keys, values (B,nh,length,hs) of all of them."""
        start, end = self.length, self.length + k.shape[2]
        want = (self.k.shape[0], self.k.shape[1], k.shape[2], self.k.shape[3])
        if k.shape != want or v.shape != want:   # a batch of 1 would broadcast into every row
            raise ValueError(f"the KV cache holds (B,nh,T,hs) = {self.k.shape[:2]} + (T,) + {self.k.shape[3:]} "
                             f"arrays: got keys {k.shape}, values {v.shape}")
        if end > self.k.shape[2]:
            raise ValueError(f"the KV cache holds {self.k.shape[2]} positions: {start} + {k.shape[2]} do not fit")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]   # views: no copy


def causal_softmax(scores):
    """Row-wise softmax of (..., Tq, Tk) scores whose rows are the last Tq of Tk positions: row i is
    position Tk - Tq + i and may only attend to columns <= that position (Tq == Tk: row t sees <= t).

    The masked scores become -inf, so their probabilities are exactly 0; the row max is
    subtracted first so exp never overflows (a row's own position is always kept, so no row is all -inf).
    Works in the scores' memory, which it overwrites. On a GPU one fused kernel does it
    (numgpt.kernels; this code is its twin).
    """
    xp = array_module(scores)
    if kernels.enabled(xp):
        return kernels.causal_softmax(scores)
    Tq, Tk = scores.shape[-2:]
    future = xp.triu(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)   # (Tq,Tk): True right of each row's position
    xp.copyto(scores, -xp.inf, where=future)                          # in place: where() would copy (B,nh,Tq,Tk)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores, out=scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def softmax_backward(dprobs, probs, overwrite=False):
    """ds = p * (dp - sum(dp * p)) along the last axis: dp times the softmax's Jacobian
    J = diag(p) - p p^T (a vector-Jacobian product; J is symmetric, so it is also J dp).
    dprobs, probs (..., Tk) -> ds (..., Tk).
    (One fused kernel on a GPU: numgpt.kernels.)

    With `overwrite` ds is written into dprobs' memory, on the CPU a block of rows at a time
    (backend.cpu_blocks) with a block-sized scratch for dp * p: no second (B,nh,T,T) array (96 MiB
    per layer at GPT-2 124M, batch 2 x 1024, at the top of the backward's memory). The same
    numbers either way."""
    xp = array_module(probs)
    if kernels.enabled(xp):
        return kernels.softmax_backward(dprobs, probs)
    if not (overwrite and dprobs.flags.c_contiguous and probs.flags.c_contiguous):
        ds = dprobs * probs
        dot = ds.sum(axis=-1, keepdims=True)                # (...,1)
        xp.subtract(dprobs, dot, out=ds)
        ds *= probs
        return ds
    Tk = probs.shape[-1]
    dp, p = dprobs.reshape(-1, Tk), probs.reshape(-1, Tk)   # (rows,Tk) views
    blocks = cpu_blocks(xp, len(p), unit=Tk)                # of whole rows
    scratch = xp.empty((min(blocks[0].stop, len(p)), Tk), dtype=dp.dtype)
    for rows in blocks:
        prod = xp.multiply(dp[rows], p[rows], out=scratch[:len(p[rows])])
        dot = prod.sum(axis=-1, keepdims=True)              # (rows,1)
        dp[rows] -= dot
        dp[rows] *= p[rows]
    return dprobs


def attention_forward(x, params, n_head, dropout=0.0, rng=None, *, kv_cache=None):
    """Causal self-attention.   x (B,T,C) -> out (B,T,C), cache. Dropout is active when rng is given.

    With a `kv_cache` (generation), x holds the T positions that follow the cache's `length`:
    their keys and values join the cache and their queries attend over all Tk = length + T
    positions. The returned cache then serves attention_probs only, not a backward.
    """
    qkv, qkv_cache = linear_forward(x, params["c_attn.weight"], params.get("c_attn.bias"))  # (B,T,3C)
    # qkv is this function's own: the heads' attention may overwrite it
    y, core_cache = causal_attention_forward(qkv, n_head, dropout, rng, kv_cache, overwrite=True)   # (B,T,C)
    out, proj_cache = linear_forward(y, params["c_proj.weight"], params.get("c_proj.bias"))
    out, out_drop_cache = dropout_forward(out, dropout, rng)
    return out, (qkv_cache, core_cache, proj_cache, out_drop_cache)


def causal_attention_forward(qkv, n_head, dropout=0.0, rng=None, kv_cache=None, overwrite=False):
    """The heads' attention.   qkv (B,T,3C) -> y (B,T,C) with heads merged, cache.

    With `overwrite` the matrix path scales the queries in qkv's own memory (qkv is then spent).

    On a GPU without dropout or a KV cache, one kernel does it without forming the (B,nh,T,T)
    probabilities (numgpt.kernels.flash_attention_forward; its operand formats are explained
    there); the code below is its twin.
    """
    xp = array_module(qkv)
    C = qkv.shape[-1] // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    fused = kernels.enabled(xp, "flash_attention") and kernels.flash_attention_supports(hs)
    if fused and kv_cache is None and (rng is None or dropout == 0):
        operands = tensor_core_operands()   # "float16", "tf32" or "float32"
        if not (qkv.dtype == xp.float32 and kernels.enabled(xp, "tensor_core_attention")
                and kernels.tensor_core_attention_supports(xp, hs)):
            operands = None                  # products in FMAs, in the arrays' dtype (float64 among them)
        y, lse = kernels.flash_attention_forward(qkv, n_head, scale, operands)
        return y, FlashCache(qkv, y, lse, n_head, scale, operands)
    q, k, v = (split_heads(part, n_head) for part in (qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]))
    if kv_cache is not None:
        k, v = kv_cache.append(k, v)                                    # (B,nh,Tk,hs): every position so far
    # scaling q rather than the scores touches T*hs numbers per head instead of T*Tk. With
    # `overwrite`, in qkv's memory: the cache's k and v keep all of qkv alive, and a scaled copy of q
    # beside it would be one more (B,T,C) array kept for the backward
    q = xp.multiply(q, scale, out=q if overwrite else None)             # (B,nh,T,hs)
    scores = matmul(q, k.transpose(0, 1, 3, 2))                         # (B,nh,T,Tk)
    att = causal_softmax(scores)                                        # (B,nh,T,Tk), in scores' memory
    att_drop, att_drop_cache = dropout_forward(att, dropout, rng)
    y = merge_heads(matmul(att_drop, v))                                # (B,T,C)
    return y, MatrixCache(q, k, v, att, att_drop, att_drop_cache, n_head, scale)


def attention_probs(cache):
    """The attention probabilities (B,nh,T,Tk) that attention_forward computed, from its cache."""
    core_cache = cache[1]
    if not isinstance(core_cache, MatrixCache):
        raise ValueError("the fused attention kernel keeps no probabilities: pass a kv_cache, as decode does")
    return core_cache.att


def attention_backward(dout, cache):
    """Gradients of attention_forward.   dout (B,T,C) -> dx (B,T,C), grads {name: array}."""
    qkv_cache, core_cache, proj_cache, out_drop_cache = cache
    dout = dropout_backward(dout, out_drop_cache)
    dy, dw_proj, db_proj = linear_backward(dout, proj_cache)            # dy (B,T,C)
    dqkv = causal_attention_backward(dy, core_cache)                    # (B,T,3C)
    dx, dw_attn, db_attn = linear_backward(dqkv, qkv_cache)
    grads = {**named_grads("c_attn", dw_attn, db_attn), **named_grads("c_proj", dw_proj, db_proj)}
    return dx, grads


def causal_attention_backward(dy, cache):
    """Gradient of causal_attention_forward.   dy (B,T,C) -> dqkv (B,T,3C).

        dv   = att_drop^T dy                     (B,nh,T,hs)
        datt = dropout_backward(dy v^T)          (B,nh,T,T)
        ds   = att * (datt - sum(datt * att))    softmax backward; masked entries have att = 0, so ds = 0
        dq   = (ds k) / sqrt(hs),  dk = ds^T (q / sqrt(hs))
        dqkv = [merge(dq), merge(dk), merge(dv)]  the backward of the split is a concatenation

    (No backward runs with a KV cache, so here Tk = T.)"""
    if isinstance(cache, FlashCache):
        return kernels.flash_attention_backward(dy, cache.qkv, cache.y, cache.lse, cache.n_head, cache.scale,
                                                cache.operands)
    xp = array_module(dy)
    dy_heads = split_heads(dy, cache.n_head)                            # (B,nh,T,hs)
    datt_drop = matmul(dy_heads, cache.v.transpose(0, 1, 3, 2))         # (B,nh,T,T)
    dv = matmul(cache.att_drop.transpose(0, 1, 3, 2), dy_heads)         # (B,nh,T,hs)
    datt = dropout_backward(datt_drop, cache.att_drop_cache)
    del datt_drop                                                       # datt is all that is needed now
    dscores = softmax_backward(datt, cache.att, overwrite=True)         # in datt's memory; masked: p = 0 -> 0
    dq = matmul(dscores, cache.k)                                       # (B,nh,T,hs), of the scaled q
    dq *= cache.scale                                                   # of q itself
    dk = matmul(dscores.transpose(0, 1, 3, 2), cache.q)                 # (B,nh,T,hs): q is the scaled q
    B, nh, T, hs = dq.shape
    dqkv = xp.empty((B, T, 3, nh, hs), dtype=dq.dtype)                 # (B,T,3C) once reshaped
    thirds = dqkv.transpose(2, 0, 3, 1, 4)                              # (3,B,nh,T,hs), a view
    thirds[0], thirds[1], thirds[2] = dq, dk, dv                        # each merged straight into its place
    return dqkv.reshape(B, T, 3 * nh * hs)
