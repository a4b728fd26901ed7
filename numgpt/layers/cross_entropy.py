"""Softmax cross-entropy, fused: loss = logsumexp(logits) - logits[target], never a one-hot."""

from numgpt.backend import array_module

IGNORE_INDEX = -100  # the target value that drops a position, as in torch and transformers


def cross_entropy_forward(logits, targets, ignore_index=IGNORE_INDEX, n_valid=None):
    """Mean negative log-likelihood.   logits (N,V), targets (N,) ints -> loss (0-d array), cache.

    loss = sum over kept rows of (logsumexp(logits_i) - logits_i[t_i]) / n_valid. Rows whose target
    is `ignore_index` count neither in the sum nor in n_valid. `n_valid` may be given when the rows
    are one chunk of a larger batch whose mean is wanted; by default it is this call's kept rows.
    With no kept row at all the mean is 0/0 = nan, as in torch.
    """
    xp = array_module(logits)
    N = logits.shape[0]
    valid = targets != ignore_index                                    # (N,) bool
    if n_valid is None:
        n_valid = int(valid.sum())
    safe_targets = xp.where(valid, targets, 0)                         # any in-range id for ignored rows
    row_max = logits.max(axis=-1, keepdims=True)                       # (N,1): subtracted so exp never overflows
    shifted = logits - row_max                                         # (N,V)
    sumexp = xp.exp(shifted).sum(axis=-1, keepdims=True)               # (N,1)
    lse = xp.log(sumexp) + row_max                                     # (N,1) logsumexp
    target_logit = logits[xp.arange(N), safe_targets]                  # (N,)
    nll = (lse[:, 0] - target_logit) * valid                           # (N,)
    loss = nll.sum() / n_valid if n_valid else xp.asarray(float("nan"), dtype=logits.dtype)
    return loss, (logits, lse, safe_targets, valid, n_valid)


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss * (softmax(logits) - onehot(target)) / n_valid on kept rows, 0 on ignored ones."""
    logits, lse, safe_targets, valid, n_valid = cache
    xp = array_module(logits)
    N = logits.shape[0]
    dlogits = xp.exp(logits - lse)                                     # (N,V) softmax probabilities
    dlogits[xp.arange(N), safe_targets] -= 1.0                         # minus the one-hot, in place
    scale = (dloss / n_valid) if n_valid else 0.0
    dlogits *= (valid * scale)[:, None].astype(logits.dtype)           # ignored rows get no gradient
    return dlogits
