"""Operations over many arrays at once, as PyTorch's torch._foreach_* functions.

A training step's bookkeeping touches every parameter-shaped array: gradients are accumulated,
unscaled, measured and clipped. GPT-2 124M has 148 parameters, so on a GPU a loop over them costs
148 kernel launches per operation, most of them on tiny arrays (a bias is 768 numbers), each a
few microseconds of Python and driver work. With kernels on, each function here is one kernel
over a table of chunks of all the arrays (numgpt.kernels); the loops below are those kernels'
twins, and what runs on the CPU.
"""

import numpy as np

from numgpt import kernels
from numgpt.backend import array_module


def fused(*columns):
    """Whether these lists of arrays go through one multi-array kernel rather than a loop: on a
    GPU with kernels on, when kernels.chunkable says the arrays fit one (C-contiguous, one
    floating dtype, the same sizes in every list)."""
    return bool(columns[0]) and kernels.enabled(array_module(columns[0][0])) and kernels.chunkable(*columns)


def scale_(arrays, factor):
    """a *= factor, in place, for every array of the list."""
    if fused(arrays):
        kernels.scale_all(arrays, factor)
        return
    for a in arrays:
        a *= factor


def accumulate_(dsts, srcs, divisor, add):
    """d = s / divisor for each pair (d, s) of the lists, or d += s / divisor with `add`: the
    gradients of grad_accum micro-batches averaged into one buffer."""
    if fused(dsts, srcs):
        kernels.accumulate_all(dsts, srcs, divisor, add)
        return
    for d, s in zip(dsts, srcs):
        if add:
            d += s / divisor
        else:
            array_module(d).divide(s, divisor, out=d)


def sum_of_squares(arrays):
    """The sum of the squares of every element of every array, summed in float64: a 0-d float64
    value on the arrays' device (reading it on the host waits for the device)."""
    if fused(arrays):
        return kernels.sum_of_squares_all(arrays)
    return sum((a * a).sum(dtype=np.float64) for a in arrays)


def all_finite(arrays):
    """True when no element of any array is inf or nan (a Python bool: one wait for the device)."""
    if fused(arrays):
        return kernels.all_finite_all(arrays)
    return all(bool(array_module(a).isfinite(a).all()) for a in arrays)
