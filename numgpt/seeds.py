"""A run's random streams: one NumPy generator per purpose, drawn from the run's seed (the fixed
evaluation batches' from a seed of their own, --eval-seed, so that runs of several seeds share them).

Each stream is seeded by the key [seed, purpose, i, j]: which stream, and up to two indices (an
evaluation batch's split and number; a step and a rank). NumPy pads a key with zeros, so [s, 1]
and [s, 1, 0] would seed one stream: keys of one length whose purposes differ never meet. INIT's
key [seed, 0, 0, 0] is [seed] padded: the initial weights are what default_rng(seed) draws.
"""

import numpy as np

INIT, BATCHES, EVAL_BATCHES, DROPOUT, SAMPLES = range(5)


def stream(seed, purpose, i=0, j=0):
    """The generator of `purpose` (one of the names above) for `seed`, at indices i and j."""
    return np.random.default_rng([seed, purpose, i, j])
