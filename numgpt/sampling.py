"""Choosing the next token from the model's logits: greedy, temperature, top-k and top-p.

Sampling runs on the host in float64 with a NumPy Generator, so a seed repeats the same draws on
either backend given the same logits.
"""

import math

import numpy as np

from numgpt.errors import ConfigError, NumGPTError, is_count, is_number


def check_sampling_args(temperature=1.0, top_k=None, top_p=None, flags=False):
    """Raise ConfigError for a temperature that is not a finite number >= 0, a top_k < 1 or a top_p
    outside (0, 1]. NaN fails every comparison, so the range checks reject it too; an infinite
    temperature would turn every logit into 0 or NaN. With `flags`, the messages name them as a
    command line does (--top-k), else as the arguments they are (top_k)."""
    names = ("--temperature", "--top-k", "--top-p") if flags else ("temperature", "top_k", "top_p")
    if not is_number(temperature) or not 0 <= temperature < math.inf:
        raise ConfigError(f"{names[0]} must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and not (is_count(top_k) and top_k >= 1):
        raise ConfigError(f"{names[1]} must be an integer >= 1, got {top_k!r} (leave it out for no top-k)")
    if top_p is not None and (not is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise ConfigError(f"{names[2]} must be in (0, 1], got {top_p!r}")


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution sampling draws from.   logits (B,V) -> probs (B,V), float64, rows sum to 1.

    Temperature divides the logits (lower is sharper); top-k keeps the k most likely tokens (and
    any tied with the k-th, as transformers' TopKLogitsWarper does); top-p keeps the smallest set
    of most likely tokens whose mass reaches p; where tokens tie, its ranking puts the lower id
    first (transformers' puts the higher). Temperature 0 puts all mass on the argmax, the first
    one when several tie, as transformers' greedy search does. Arguments outside check_sampling_args'
    ranges are a ConfigError (a negative temperature would favour the least likely tokens, a top_p
    of 0 give NaN probabilities).
    """
    check_sampling_args(temperature, top_k, top_p)
    logits = np.asarray(logits, dtype=np.float64)
    B, V = logits.shape
    # NaN and +inf carry through the maximum, and a row all -inf has no token: any of them would
    # make the draw token 0 every time, silently
    if not np.isfinite(logits.max(axis=-1)).all():
        raise NumGPTError("the model's logits hold NaN or infinite numbers: its arithmetic overflowed, as a "
                          "diverged model's does; use an earlier checkpoint, or try dtype float64")
    if temperature == 0:
        probs = np.zeros_like(logits)
        probs[np.arange(B), logits.argmax(axis=-1)] = 1.0
        return probs
    # Top-k compares the logits as given: after the shift below, 1e-224 and 0 would both round to
    # the same value beside a maximum of 1, and a token outside the k could tie with the k-th.
    if top_k is not None and top_k < V:
        kth = np.partition(logits, V - top_k, axis=-1)[:, V - top_k, None]   # (B,1) k-th largest
        logits = np.where(logits < kth, -np.inf, logits)
    # Shifted by its maximum first, a row's largest logit is 0 and the rest are negative, so a tiny
    # temperature can only send them towards -inf (probability 0). Divided first, the largest would
    # overflow to inf, and inf - inf is NaN. The shift leaves the softmax unchanged.
    logits = logits - logits.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):   # -inf is the intended limit
        logits = logits / temperature
    probs = np.exp(logits)                                                     # the maximum, 0, survives top-k
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        # ranked by the logits, not the probabilities: at a huge temperature every exp rounds to 1,
        # and the probabilities' ties would keep the lowest ids, not the likeliest tokens
        order = np.argsort(-logits, axis=-1, kind="stable")                  # most likely first
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs          # mass of the tokens ranked above
        drop_sorted = mass_before >= top_p                                     # the nucleus already reached p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, rng=None):
    """One token per row.   logits (B,V) -> ids (B,) int64."""
    probs = next_token_probs(logits, temperature, top_k, top_p)
    if temperature == 0:
        return probs.argmax(axis=-1)
    rng = np.random.default_rng() if rng is None else rng
    # inverse-CDF sampling: the first token whose running mass exceeds a uniform draw; a token of
    # probability 0 adds no mass, so it can never be that first token
    cdf = np.cumsum(probs, axis=-1)                                            # (B,V)
    u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]                           # (B,1)
    ids = (cdf <= u).sum(axis=-1)
    return np.minimum(ids, probs.shape[1] - 1).astype(np.int64)
