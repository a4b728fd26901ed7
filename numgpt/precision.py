"""Reduced-precision arithmetic for the GPU: float16 matmuls with loss scaling, and TF32.

Three precisions, train.py's --precision:

    fp32   float32 arrays and arithmetic, the default (the gradient checks use its plain matmuls,
           on float64 arrays); on a GPU the attention kernels make each product of three TF32 ones
           on tensor cores, within about 2^-21 of float32's (as torch's float32 attention does)
    tf32   float32 arrays, but matmul inputs are rounded to TF32 (10-bit mantissa) on tensor cores:
           by cuBLAS, and by the attention kernels; everything else is unchanged (CuPy only)
    fp16   mixed precision (Micikevicius et al. 2018): the parameters and the AdamW moments stay
           float32, and every activation is computed in float32; only the matmuls run in float16:
           their operands are rounded to float16 (by the layer that makes one, when it feeds
           matmuls alone), tensor cores multiply them with float32 accumulation, and the product
           is rounded to float16 (as under torch.autocast) before it goes back to float32

float16 has 5 exponent bits: magnitudes below 6e-8 flush to zero, and above 65504 overflow. The
forward's values live well inside that range, but gradients are small (a mean over B*T positions
divides them by thousands), so the backward computes the gradient of `scale * loss` and the result
is divided by `scale` in float32 at the end. DynamicLossScaler picks the scale: as large as it can
be without overflowing, found by halving it after a step whose gradients were not finite (that
step is skipped) and doubling it after a long run of good ones.
"""

import contextlib
import math
import os

import numpy as np

from numgpt import foreach
from numgpt.backend import array_module, backend_name
from numgpt.errors import ConfigError

PRECISIONS = ("fp32", "tf32", "fp16")

# the dtype matmul() multiplies in, None for none: set by `half_matmuls`
_matmul_dtype = None
# whether float32 matmuls round their operands to TF32: set by `set_tf32`
_tf32 = False


@contextlib.contextmanager
def half_matmuls(dtype):
    """Within the block, matmul() multiplies in `dtype` ("float16"); with None it is plain."""
    global _matmul_dtype
    previous, _matmul_dtype = _matmul_dtype, dtype
    try:
        yield
    finally:
        _matmul_dtype = previous


def operand_dtype(dtype):
    """The dtype matmul() multiplies an array of `dtype` in: float16 inside `half_matmuls`, else `dtype`.

    A layer whose output feeds only matmuls (ln_1 and ln_2 feed linear layers, the MLP's activation
    its projection, the loss's exps the classifier's two gradient products) writes that output in
    this dtype: the same numbers as rounding it afterwards, and on a GPU its kernel writes float16
    directly, one pass over the array instead of two."""
    return np.dtype(dtype if _matmul_dtype is None else _matmul_dtype)


def as_dtype(a, dtype):
    """a in `dtype` (None: a's own); a itself when it already is."""
    if dtype is None or a.dtype == dtype:
        return a
    with np.errstate(over="ignore"):   # beyond 65504 is inf in float16: expected, the loss scaler handles it
        return a.astype(dtype, copy=False)


def matmul_operand(a):
    """a as matmul() multiplies it: rounded to float16 inside `half_matmuls`, else a itself.

    A layer that multiplies with an operand twice (a weight in its forward and its backward, an
    input in its forward and its weight gradient) rounds it once with this and keeps the result:
    one cast instead of two, and float16 kept where float32 was."""
    return as_dtype(a, operand_dtype(a.dtype))


def matmul(a, b, out=None, bias=None):
    """a @ b (+ bias), the product every layer uses.   a (..., n, k), b (..., k, m), bias (m,) -> (..., n, m).

    Inside `half_matmuls("float16")` a and b are rounded to float16 first (unless matmul_operand
    already did). NumPy and cuBLAS both accumulate float16 products in float32, so the sums lose
    nothing; the product is rounded to float16 once (where a sum beyond 65504 overflows to inf:
    the loss scaler's cue) and handed back in the operands' wider dtype, float32 at least (into
    `out` when given), with `bias` added there. Outside the block it is xp.matmul (+ bias).
    """
    xp = array_module(a)
    if _matmul_dtype is None:
        y = xp.matmul(a, b, out=out)
    else:
        with np.errstate(over="ignore", invalid="ignore"):   # overflow is expected: the loss scaler handles it
            product = xp.matmul(matmul_operand(a), matmul_operand(b))
        if out is None:
            # widened and biased in one pass, not two: the same numbers, as float16 -> float32 is exact
            wide = np.result_type(a.dtype, b.dtype, np.float32)
            return product.astype(wide) if bias is None else xp.add(product, bias, dtype=wide)
        y = out
        y[...] = product
    if bias is not None:
        y += bias
    return y


def all_finite(arrays):
    """True when no element of any array is inf or nan: whether a float16 step may be applied.
    On a GPU one kernel checks them all (numgpt.foreach)."""
    return foreach.all_finite(list(arrays))


def using_half_matmuls():
    """True inside `half_matmuls` with a dtype."""
    return _matmul_dtype is not None


def tensor_core_operands():
    """The format float32 matmuls take their operands in: "float16" inside `half_matmuls`, "tf32"
    after set_tf32(xp, True), else "float32". The attention kernels multiply on tensor cores in it
    (numgpt.kernels.TC_OPERANDS): "float32" as three TF32 products, at float32's accuracy, as
    torch's float32 attention does on compute capability 8.0 and newer (CUTLASS's 3xTF32)."""
    if _matmul_dtype is not None:
        return np.dtype(_matmul_dtype).name
    return "tf32" if _tf32 else "float32"


def set_tf32(xp, enabled):
    """Let cuBLAS run float32 matmuls on TF32 tensor cores (CuPy on an Ampere or newer GPU).

    CuPy reads CUPY_TF32 at its first float32 matmul and keeps the answer; set_compute_type
    changes it afterwards. The attention kernels follow (tensor_core_operands). CuPy applies the
    setting to 2-D products only: a batched one (ndim > 2, gemmStridedBatchedEx) computes in full
    float32, so the attention's matrix path (under dropout, in KV-cache decoding) stays float32. On
    NumPy, asking for TF32 is an error: the CPU has no such mode.
    """
    global _tf32
    if backend_name(xp) == "numpy":
        if enabled:
            raise ConfigError("--precision tf32 is a mode of NVIDIA tensor cores: use it with --backend cupy")
        _tf32 = False
        return
    _tf32 = bool(enabled)
    os.environ["CUPY_TF32"] = "1" if enabled else "0"
    from cupy._core import _routines_linalg as linalg   # where CuPy keeps the setting
    linalg.set_compute_type(xp.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)


class DynamicLossScaler:
    """The loss scale for float16 gradients, as torch.cuda.amp.GradScaler chooses it.

    scaler.scale is the factor the backward multiplies the loss by. After each step call
    scaler.update(finite), with finite False when any gradient was inf or nan: the scale is then
    halved (and the caller skips that step). After `growth_interval` finite steps in a row it is
    doubled, to keep it near the largest value that does not overflow. Powers of two: scaling and
    unscaling are exact.
    """

    def __init__(self, scale=2.0 ** 16, growth_interval=2000):
        if not scale > 0 or growth_interval < 1:
            raise ConfigError(f"loss scale must be > 0 and growth_interval >= 1, got {scale!r}, {growth_interval!r}")
        self.scale = float(scale)
        self.growth_interval = int(growth_interval)
        self.good_steps = 0

    def update(self, finite):
        """Account for one step whose gradients were all finite (True) or not (False)."""
        if not finite:
            self.scale /= 2.0
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state):
        """Continue from a state_dict(), or raise ValueError naming the field that no scaler could
        have saved: a scale that is not a finite number > 0 would scale every loss to inf or NaN, and
        a count of good steps outside [0, growth_interval) would never reach the interval again
        (update grows the scale when the count equals it). A resume reports the ValueError as a
        damaged training state."""
        scale, good_steps = state["scale"], state["good_steps"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise ValueError(f"the loss scaler's scale must be a finite number > 0, got {scale!r}")
        if (isinstance(good_steps, bool) or not isinstance(good_steps, int)
                or not 0 <= good_steps < self.growth_interval):
            raise ValueError(f"the loss scaler's good_steps must be an integer in [0, {self.growth_interval}), "
                             f"got {good_steps!r}")
        self.scale, self.good_steps = float(scale), good_steps
