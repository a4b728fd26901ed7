"""GPT-2's position-wise MLP: out = dropout(act(x @ W_fc + b_fc) @ W_proj + b_proj), hidden width 4C.

`params` holds c_fc.weight (C,4C), c_fc.bias (4C,), c_proj.weight (4C,C), c_proj.bias (C,);
the biases are absent in a bias-free model. `activation` names an entry of ACTIVATIONS. The
activation feeds only the projection, so it is written in the dtype that matmul multiplies in.
"""

from numgpt.layers.activations import ACTIVATIONS
from numgpt.layers.dropout import dropout_backward, dropout_forward
from numgpt.layers.linear import linear_backward, linear_forward, named_grads
from numgpt.precision import operand_dtype


def mlp_forward(x, params, activation="gelu", dropout=0.0, rng=None):
    """x (B,T,C) -> out (B,T,C), cache. Dropout on the output is active when rng is given."""
    act_forward, act_backward = ACTIVATIONS[activation]
    h, fc_cache = linear_forward(x, params["c_fc.weight"], params.get("c_fc.bias"))         # (B,T,4C)
    a, act_cache = act_forward(h, out_dtype=operand_dtype(h.dtype))                            # (B,T,4C)
    out, proj_cache = linear_forward(a, params["c_proj.weight"], params.get("c_proj.bias"))  # (B,T,C)
    out, out_drop_cache = dropout_forward(out, dropout, rng)
    # the activation's backward travels in the cache: mlp_backward runs whichever forward ran
    return out, (fc_cache, act_backward, act_cache, proj_cache, out_drop_cache)


def mlp_backward(dout, cache):
    """Gradients of mlp_forward.   dout (B,T,C) -> dx (B,T,C), grads {name: array}."""
    fc_cache, act_backward, act_cache, proj_cache, out_drop_cache = cache
    dout = dropout_backward(dout, out_drop_cache)
    da, dw_proj, db_proj = linear_backward(dout, proj_cache)   # (B,T,4C)
    dh = act_backward(da, act_cache)                           # (B,T,4C)
    dx, dw_fc, db_fc = linear_backward(dh, fc_cache)           # (B,T,C)
    grads = {**named_grads("c_fc", dw_fc, db_fc), **named_grads("c_proj", dw_proj, db_proj)}
    return dx, grads
