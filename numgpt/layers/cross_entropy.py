"""Softmax cross-entropy, fused: loss = logsumexp(logits) - logits[target], never a one-hot.

The model reaches this math through numgpt/layers/classifier.py, which runs the forward on one
chunk of the logits at a time and does the backward's work there, fused with the output layer's
products; cross_entropy_backward is the unfused textbook form, which the tests check it against.
"""

from numgpt import kernels
from numgpt.backend import array_module
from numgpt.precision import as_dtype

IGNORE_INDEX = -100  # the target value that drops a position, as in torch and transformers

# logsumexp(l) = log(sum(exp(l - m))) + m for any shift m; the row max is the usual m because it
# keeps exp from overflowing. When every |logit| is at most this bound, m = 0 is as safe in float32:
# exp(60) = 1e26, so even 10^12 terms sum below its limit (3e38), and exp(-60) = 9e-27 is far above
# its smallest normal number (1e-38).
EXP_SAFE_BOUND = 60.0


def cross_entropy_forward(logits, targets, ignore_index=IGNORE_INDEX, n_valid=None, overwrite=False,
                          logits_bound=None, exps_dtype=None):
    """Mean negative log-likelihood.   logits (N,V), targets (N,) ints -> loss (0-d value), cache.

    loss = sum over kept rows of (logsumexp(logits_i) - logits_i[t_i]) / n_valid. Rows whose target
    is `ignore_index` count neither in the sum nor in n_valid. `n_valid` may be given when the rows
    are one chunk of a larger batch whose mean is wanted; by default it is this call's kept rows.
    With no kept row at all the mean is 0/0 = nan, as in torch. The loss is a 0-d value of the
    logits' module: a NumPy scalar, or a 0-d CuPy array, which stays on the GPU until it is read.

    The cache holds exp(logits - row max), from which the backward gets the softmax in one pass.
    With `overwrite` that array is built in the logits' own memory: no second (N,V) array. A caller
    that knows |logits| <= `logits_bound` <= EXP_SAFE_BOUND saves the two passes that find and
    subtract the max: the cache then holds exp(logits) itself. On a GPU one kernel finds the max,
    the exps and their sums together (numgpt.kernels.softmax_parts), and the bound is not used.
    The cached exps come in `exps_dtype` when given (rounded once, after the sums: float16 for a
    caller that only multiplies them in float16 matmuls, as the classifier does); the kernel then
    writes them apart from the logits, which it reads.
    """
    xp = array_module(logits)
    N = logits.shape[0]
    valid = targets != ignore_index                                    # (N,) bool
    if n_valid is None:
        n_valid = int(valid.sum())
    safe_targets = xp.where(valid, targets, 0)                         # any in-range id for ignored rows
    target_logit = logits[xp.arange(N), safe_targets]                  # (N,) gathered before any overwrite
    out = logits if overwrite else None
    if kernels.enabled(xp):
        # the code below is the kernel's twin
        exps, sumexp, shift = kernels.softmax_parts(logits, out=out, out_dtype=exps_dtype)  # (N,V), (N,1), (N,)
    else:
        if logits_bound is not None and logits_bound <= EXP_SAFE_BOUND:
            shift = 0.0
            exps = xp.exp(logits, out=out)                             # (N,V) unnormalised probabilities
        else:
            shift = logits.max(axis=-1)                                # (N,): exp(logits - max) <= 1
            exps = xp.subtract(logits, shift[:, None], out=out)
            xp.exp(exps, out=exps)
        sumexp = exps.sum(axis=-1, keepdims=True)                      # (N,1)
    lse = xp.log(sumexp[:, 0]) + shift                                 # (N,) logsumexp
    nll = (lse - target_logit) * valid                                 # (N,)
    loss = nll.sum() / n_valid if n_valid else xp.asarray(float("nan"), dtype=logits.dtype)
    return loss, (as_dtype(exps, exps_dtype), sumexp, safe_targets, valid, n_valid)


def cross_entropy_backward(dloss, cache, overwrite=False):
    """dlogits = dloss * (softmax(logits) - onehot(target)) / n_valid on kept rows, 0 on ignored ones.
    dloss (a number) -> dlogits (N,V).

    With `overwrite` the gradient is written into the cached array (the cache is then spent).
    """
    exps, sumexp, safe_targets, valid, n_valid = cache
    row_scale = (row_weights(valid, n_valid) * dloss).astype(exps.dtype)   # (N,)
    dlogits = exps if overwrite else exps.copy()                       # (N,V)
    subtract_onehot(dlogits, sumexp, safe_targets)                     # sumexp * (softmax - onehot)
    dlogits *= (row_scale / sumexp[:, 0])[:, None]
    return dlogits


def row_weights(valid, n_valid):
    """Each row's weight in the mean loss: 1/n_valid, n_valid counting the kept rows of the whole
    batch (not of one chunk); 0 for ignored rows and when no row is kept."""
    return valid * (1.0 / n_valid if n_valid else 0.0)


def subtract_onehot(exps, sumexp, safe_targets):
    """exps (N,V) -= sumexp (N,1) * onehot(safe_targets (N,)), in place: sumexp * (softmax - onehot).

    Only the N target entries change, to e_t - sumexp (= -(the sum of the row's other exps)),
    formed in sumexp's dtype and rounded once into exps'. For a confident row (softmax near 1 at
    the target) that is small: subtracting the one-hot later, from a product rounded to float16,
    would cancel it away. Under float16 products exps comes already rounded to float16, but a
    confident row's target is its max, whose exp(l - max) = 1 is exact in any format.
    """
    xp = array_module(exps)
    rows = xp.arange(exps.shape[0])
    exps[rows, safe_targets] = exps[rows, safe_targets] - sumexp[:, 0]
