"""One transformer block, GPT-2's pre-norm layout:

    x = x + attn(ln_1(x))
    x = x + mlp(ln_2(x))

`params` holds the block's entries without their "h.<i>." prefix: ln_1.weight, attn.c_attn.weight, ...
"""

from numgpt.layers.attention import attention_backward, attention_forward, attention_probs
from numgpt.layers.linear import named_grads
from numgpt.layers.layernorm import layernorm_backward, layernorm_forward
from numgpt.layers.mlp import mlp_backward, mlp_forward
from numgpt.layers.residual import residual_backward, residual_forward
from numgpt.precision import operand_dtype


def sub_params(params, prefix):
    """The entries of `params` under `prefix` ("attn."), with the prefix stripped."""
    n = len(prefix)
    return {name[n:]: value for name, value in params.items() if name.startswith(prefix)}


def with_prefix(grads, prefix):
    """The entries of `grads` with `prefix` ("attn.") put before each name: sub_params' inverse."""
    return {prefix + name: value for name, value in grads.items()}


def block_forward(x, params, n_head, activation="gelu", dropout=0.0, rng=None, *, kv_cache=None):
    """x (B,T,C) -> y (B,T,C), cache. With a `kv_cache`, x holds the positions after the cached ones
    (see attention_forward) and the cache serves block_attention_probs only, not a backward."""
    # each layernorm's output feeds only a linear layer: it is written in the dtype the matmul takes
    h_dtype = operand_dtype(x.dtype)
    h, ln_1_cache = layernorm_forward(x, params["ln_1.weight"], params.get("ln_1.bias"), out_dtype=h_dtype)
    h, attn_cache = attention_forward(h, sub_params(params, "attn."), n_head, dropout, rng, kv_cache=kv_cache)
    x = residual_forward(x, h)
    h, ln_2_cache = layernorm_forward(x, params["ln_2.weight"], params.get("ln_2.bias"), out_dtype=h_dtype)
    h, mlp_cache = mlp_forward(h, sub_params(params, "mlp."), activation, dropout, rng)
    y = residual_forward(x, h)
    return y, (ln_1_cache, attn_cache, ln_2_cache, mlp_cache)


def block_attention_probs(cache):
    """The attention probabilities (B,nh,T,Tk) of the block's heads, from block_forward's cache."""
    return attention_probs(cache[1])


def block_backward(dy, cache):
    """dy (B,T,C) -> dx (B,T,C), grads {name without the block prefix: array}.

    With h = x + attn(ln_1(x)) and y = h + mlp(ln_2(h)), each of x and h feeds both the identity
    path and a branch, so its gradient is the sum of the two paths':
        dh = dy + ln_2_backward(mlp_backward(dy)),   dx = dh + ln_1_backward(attn_backward(dh))"""
    ln_1_cache, attn_cache, ln_2_cache, mlp_cache = cache
    dh, dbranch = residual_backward(dy)                      # y = h + mlp(ln_2(h)): both terms get dy
    dln, mlp_grads = mlp_backward(dbranch, mlp_cache)        # the gradient of ln_2's output
    dh_branch, dw, db = layernorm_backward(dln, ln_2_cache)  # ... and of its input, h
    dh = dh + dh_branch                                      # h was used twice: the gradients add
    grads = {**named_grads("ln_2", dw, db), **with_prefix(mlp_grads, "mlp.")}
    dx, dbranch = residual_backward(dh)                      # h = x + attn(ln_1(x)): the same again
    dln, attn_grads = attention_backward(dbranch, attn_cache)
    dx_branch, dw, db = layernorm_backward(dln, ln_1_cache)
    dx = dx + dx_branch
    grads.update({**named_grads("ln_1", dw, db), **with_prefix(attn_grads, "attn.")})
    return dx, grads
