"""Token + learned position embedding: x[b, t] = wte[idx[b, t]] + wpe[start + t].

`start` is the position of idx's first token: 0, except in generation with a KV cache, where idx
holds only the tokens after the cached ones."""

from numgpt.backend import array_module, scatter_add


def embedding_forward(idx, wte, wpe, start=0):
    """x = wte[idx] + wpe[start:start+T].   idx (B,T) ints, wte (V,C), wpe (block_size,C) -> x (B,T,C)."""
    T = idx.shape[1]
    x = wte[idx]                                       # (B,T,C): a gather, one row per token (a copy)
    x += wpe[start:start + T]                          # (T,C) broadcast over B, into the copy
    return x, (idx, wte.shape, wpe.shape, start)


def embedding_backward(dout, cache, dwte=None):
    """dout (B,T,C), the gradient of x -> dwte (V,C), dwpe (block_size,C): the tables' gradients.

    dwte[v] = sum of dout[b, t] where idx[b, t] == v; dwpe[start + t] = sum over b of dout[b, t].

    A token id that occurs twice must receive both gradients: `dwte[idx] += dout` would silently
    keep only one of them, so the rows are scatter-added. Given `dwte` (V,C), the rows are added
    into it in place: with tied weights that is the output layer's gradient of the same matrix,
    which spares a fresh (V,C) array and a pass adding the two.
    """
    idx, wte_shape, wpe_shape, start = cache
    xp = array_module(dout)
    B, T, C = dout.shape
    if dwte is None:
        dwte = xp.zeros(wte_shape, dtype=dout.dtype)   # (V,C)
    scatter_add(dwte, idx.reshape(-1), dout.reshape(B * T, C))
    dwpe = xp.zeros(wpe_shape, dtype=dout.dtype)       # (block_size,C): unused positions get no gradient
    dwpe[start:start + T] = dout.sum(axis=0)
    return dwte, dwpe
