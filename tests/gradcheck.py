"""Finite-difference gradient checking in float64.

The analytic gradient of a scalar L(arrays) is compared with central differences
(L(a + eps) - L(a - eps)) / (2 eps) at a random sample of coordinates of every array. An entry
passes when

    |analytic - numeric| <= NOISE * max(|L|, S, 1) + RTOL * max(|analytic|, |numeric|, median)

The first term is the noise floor of the differences, the round-off in L divided by the step: it
keeps gradients that are exactly zero by symmetry from failing (the K part of the qkv bias: adding
b to every key adds q.b to a whole row of scores, which the softmax ignores). L's
round-off follows the size of the terms it is summed from, S (given by the caller: for a layer's
sum(out * dout), sum |out * dout|), which can be thousands of times |L| when they cancel. The
second measures an entry against its own size, or against its array's median |analytic| where
that is larger (round-off inside the layer follows the array's typical size). The median, not the
largest entry: scaled by the largest, one large gradient (a true one, or a wrong one left out of
the sample) let errors of a millionth of it pass everywhere else in its array. An entry that
fails is measured again, to fourth order in the step and at a larger step (see
gradient_mismatches). A gradient or loss that is not finite (nan, inf) never passes: nan
compares false with every tolerance.
"""

import numpy as np

from numgpt.backend import array_module, to_device, to_numpy

EPS = 1e-6
RTOL = 1e-6
NOISE = 1e-9  # per unit of |L| or S: L's round-off (~1e-16 S) / (2 eps), times 20


def numeric_grad(loss_fn, array, coords, eps=EPS):
    """Central differences of loss_fn() with respect to array[c] for each flat index c in coords.
    `array` is perturbed in place and restored; loss_fn must read it."""
    # reshape is a view of a contiguous array only: of another, a copy whose writes loss_fn never sees
    assert array.flags.c_contiguous, "numeric_grad perturbs a contiguous array in place"
    flat = array.reshape(-1)
    grads = []
    for c in coords:
        c = int(c)
        original = flat[c].copy()
        flat[c] = original + eps
        plus = loss_fn()
        flat[c] = original - eps
        minus = loss_fn()
        flat[c] = original
        grads.append((plus - minus) / (2 * eps))
    return np.array(grads)


def gradient_mismatches(loss_fn, arrays, analytic, rng, max_coords=64, loss_terms=0.0):
    """{name: worst error in tolerances} of the arrays whose analytic gradient disagrees with
    finite differences (empty when all agree).

    arrays: {name: float64 array read by loss_fn}; analytic: {name: dL/d(array)}; loss_terms: S,
    the sum of the absolute values of the terms that make L (see the module's docstring).
    """
    loss = loss_fn()
    if not np.isfinite(loss):
        return {name: float("inf") for name in arrays}
    noise = NOISE * max(abs(loss), loss_terms, 1.0)
    bad = {}
    for name, array in arrays.items():
        assert analytic[name].shape == array.shape, f"{name}: gradient shape {analytic[name].shape} != {array.shape}"
        full = to_numpy(analytic[name])
        if not np.all(np.isfinite(full)):   # anywhere, sampled or not
            bad[name] = float("inf")
            continue
        n = array.size
        coords = rng.choice(n, size=min(n, max_coords), replace=False)
        num = numeric_grad(loss_fn, array, coords)
        ana = full.reshape(-1)[coords]
        tol = noise + RTOL * np.maximum(np.maximum(np.abs(ana), np.abs(num)), np.median(np.abs(full)))
        err = np.abs(ana - num)   # nan where the loss was: `not err <= tol` counts it as a mismatch
        if not np.all(err <= tol):
            # Central differences err in two ways: truncation, c eps^2 (c a sixth of the third
            # derivative), and round-off in L, ~1e-16 S / eps. A failing entry is measured again
            # for each: at eps/2, combined with D(eps) by Richardson, (4 D(eps/2) - D(eps)) / 3,
            # which cancels the eps^2 term (for where L curves sharply: a layernorm over 2 channels
            # whose variance is near its own eps); and at 10 eps, where round-off is 10x smaller
            # (for large terms of L with small gradients). It passes if either agrees: a wrong gradient
            # is wrong at every step. One entry that fails again condemns the array, so the rest
            # are not measured again (a negative control would pay for every one of them).
            for j in np.flatnonzero(~(err <= tol)):
                c = coords[j:j + 1]
                richardson = (4 * numeric_grad(loss_fn, array, c, eps=EPS / 2)[0] - num[j]) / 3
                wide = numeric_grad(loss_fn, array, c, eps=10 * EPS)[0]
                err[j] = min(abs(ana[j] - richardson), abs(ana[j] - wide))
                if not err[j] <= tol[j]:
                    break
        if not np.all(err <= tol):
            bad[name] = float(np.max(err / tol))   # in tolerances; a re-measured entry by its better measure
    return bad


def relative_error(a, b):
    """|a - b| / |b| over whole arrays (Frobenius norms), of NumPy or CuPy arrays."""
    return float(np.linalg.norm(to_numpy(a) - to_numpy(b)) / np.linalg.norm(to_numpy(b)))


def dot_loss(out, dout):
    """L = sum(out * dout): its gradient with respect to out is the drawn upstream gradient dout."""
    return float((out * dout).sum())


def dot_loss_terms(out, dout):
    """S of dot_loss: sum |out * dout|, the scale of its round-off."""
    return float(abs(out * dout).sum())


def draw(xp, rng, shape, scale=1.0):
    """A float64 array of `shape` on xp's device, normal(0, scale)."""
    return to_device(rng.normal(0.0, scale, size=shape), xp)


def layer_mismatches(run, backward, arrays, rng):
    """Gradient-check one layer. run(arrays) -> (out, cache); backward(dout, cache) -> {name: grad}."""
    out, cache = run(arrays)
    dout = draw(array_module(out), rng, out.shape)          # the upstream gradient, drawn independently
    analytic = backward(dout, cache)
    assert set(analytic) == set(arrays)                     # no gradient for an absent bias
    return gradient_mismatches(lambda: dot_loss(run(arrays)[0], dout), arrays, analytic, rng,
                               loss_terms=dot_loss_terms(out, dout))
