"""Reduced precision: float16 matmuls with loss scaling, the dynamic loss scaler, and TF32.

NumPy, like cuBLAS, multiplies float16 matrices with float32 accumulation, so the mixed-precision
arithmetic of the GPU is checked here on the CPU (slowly: NumPy has no float16 BLAS)."""

import numpy as np
import pytest

from gradcheck import relative_error
from numgpt import GPT, AdamW, ConfigError, GPTConfig
from numgpt.backend import cupy_available, get_xp, to_numpy
from numgpt.layers.activations import ACTIVATIONS
from numgpt.layers.cross_entropy import cross_entropy_forward
from numgpt.layers.layernorm import layernorm_forward
from numgpt.layers.linear import linear_backward, linear_forward, sum_rows
from numgpt.precision import DynamicLossScaler, all_finite, half_matmuls, matmul, set_tf32, using_half_matmuls

CONFIG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def markov_batch(rng, B, T, vocab=CONFIG.vocab_size):
    """(idx, targets) (B,T) from a fixed random Markov chain whose rows favour a few successors:
    text with structure to learn and noise that keeps the loss from reaching 0."""
    transitions = np.random.default_rng(123).dirichlet(np.full(vocab, 0.1), size=vocab)   # (V,V)
    seq = np.empty((B, T + 1), dtype=np.int64)
    seq[:, 0] = rng.integers(vocab, size=B)
    for t in range(T):
        seq[:, t + 1] = [rng.choice(vocab, p=transitions[s]) for s in seq[:, t]]
    return seq[:, :-1], seq[:, 1:]


def grads_of(model, idx, targets, loss_scale=1.0):
    _, loss = model.forward(idx, targets, loss_scale=loss_scale)
    return loss, {name: to_numpy(g).copy() for name, g in model.backward().items()}


def test_matmul_rounds_operands_only_inside_the_block(xp):
    rng = np.random.default_rng(0)
    a, b, bias = (xp.asarray(rng.standard_normal(shape), dtype=np.float32) for shape in ((5, 300), (300, 7), (7,)))
    np.testing.assert_array_equal(to_numpy(matmul(a, b)), to_numpy(a @ b))
    np.testing.assert_array_equal(to_numpy(matmul(a, b, bias=bias)), to_numpy(a @ b + bias))
    with half_matmuls("float16"):
        assert using_half_matmuls()
        mixed = matmul(a, b)
        into = matmul(a, b, out=xp.empty((5, 7), dtype=np.float32))
        biased = matmul(a, b, bias=bias)                                        # widened and biased at once
        biased_into = matmul(a, b, out=xp.empty((5, 7), dtype=np.float32), bias=bias)
    assert not using_half_matmuls()
    expected = (a.astype(np.float16) @ b.astype(np.float16)).astype(np.float32)
    assert mixed.dtype == biased.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(mixed), to_numpy(expected))
    np.testing.assert_array_equal(to_numpy(into), to_numpy(expected))
    np.testing.assert_array_equal(to_numpy(biased), to_numpy(expected + bias))
    np.testing.assert_array_equal(to_numpy(biased_into), to_numpy(expected + bias))
    assert 1e-5 < relative_error(to_numpy(mixed), to_numpy(a @ b)) < 1e-2     # rounded, but only to float16


def test_a_linear_layer_rounds_each_operand_once_and_keeps_it_rounded(xp):
    """Under float16 matmuls linear_forward keeps x and w as float16 for the backward (half the
    cache, no second cast) and gives exactly what casting at every product gives."""
    rng = np.random.default_rng(0)
    x, w, b, dy = (xp.asarray(rng.standard_normal(shape), dtype=np.float32)
                   for shape in ((3, 4, 16), (16, 8), (8,), (3, 4, 8)))
    with half_matmuls("float16"):
        y, cache = linear_forward(x, w, b)
        dx, dw, db = linear_backward(dy, cache)
    assert [a.dtype for a in cache[:2]] == [np.float16, np.float16]
    h = lambda a: a.reshape(-1, a.shape[-1]).astype(np.float16)   # (rows, C) in float16
    product = lambda a, b: to_numpy((a @ b).astype(np.float32))
    np.testing.assert_array_equal(to_numpy(y).reshape(12, 8), product(h(x), h(w)) + to_numpy(b))
    np.testing.assert_array_equal(to_numpy(dx).reshape(12, 16), product(h(dy), h(w).T))
    np.testing.assert_array_equal(to_numpy(dw), product(h(x).T, h(dy)))
    np.testing.assert_array_equal(to_numpy(db), to_numpy(sum_rows(dy)))            # of the unrounded dy
    assert not np.array_equal(to_numpy(dw), to_numpy(x.reshape(12, 16).T @ dy.reshape(12, 8)))   # rounded


def for_matmuls(xp, layer):
    """(make, x): make(x, out_dtype) -> (what `layer` hands to matmuls, the arrays it keeps for its
    backward): a layernorm's or an activation's output, or the cross-entropy's cached exps."""
    rng = np.random.default_rng(0)
    x, w, b = (xp.asarray(rng.standard_normal(shape) * 4, dtype=np.float32) for shape in ((3, 5, 40), (40,), (40,)))
    x[0, 0, 0] = 1e5                                                      # beyond float16: inf, quietly
    targets = xp.asarray(rng.integers(0, 40, 15))

    def make(a, dtype):
        if layer == "layernorm":
            y, (xhat, rstd, *_) = layernorm_forward(a, w, b, out_dtype=dtype)
            return y, [xhat, rstd]
        if layer == "cross_entropy":                                      # logits of unit spread
            _, (exps, sumexp, *_) = cross_entropy_forward(a.reshape(15, 40) / 4, targets, exps_dtype=dtype)
            return exps, [sumexp]
        y, kept = ACTIVATIONS[layer][0](a, out_dtype=dtype)
        return y, [kept]
    return make, x


@pytest.mark.parametrize("layer", ["layernorm", *sorted(ACTIVATIONS), "cross_entropy"])
def test_a_layer_asked_for_float16_gives_its_float32_output_rounded_once(xp, layer):
    """A layer whose output feeds only matmuls (a block's layernorms, the MLP's activation, the
    classifier's exps) is asked for it in float16 under fp16 matmuls: the numbers that rounding its
    float32 output gives, which matmul would otherwise do (on CuPy its kernel writes them
    directly), while what it keeps for itself stays float32."""
    make, x = for_matmuls(xp, layer)
    (wide, _), (half, kept) = make(x, None), make(x, np.float16)
    assert wide.dtype == np.float32 and half.dtype == np.float16
    with np.errstate(over="ignore"):
        rounded = to_numpy(wide).astype(np.float16)
    np.testing.assert_array_equal(to_numpy(half).view(np.uint16), rounded.view(np.uint16))   # bit for bit
    assert all(a.dtype == np.float32 for a in kept)


def test_half_block_ends_on_an_exception():
    with pytest.raises(ZeroDivisionError):
        with half_matmuls("float16"):
            1 / 0
    assert not using_half_matmuls()


def test_a_nested_half_block_gives_back_the_outer_ones_precision():
    """A float32 model's method called inside a float16 model's (each runs in its own block)
    leaves float16 matmuls on for the rest of the outer one."""
    with half_matmuls("float16"):
        with half_matmuls(None):
            assert not using_half_matmuls()
        assert using_half_matmuls()
    assert not using_half_matmuls()


def test_float16_matmuls_stay_close_to_float32(backend):
    idx, targets = markov_batch(np.random.default_rng(0), 4, 16)
    ref, mixed = (GPT(CONFIG, backend=backend, seed=3, matmul_dtype=m) for m in (None, "float16"))
    ref_loss, ref_grads = grads_of(ref, idx, targets)
    loss, grads = grads_of(mixed, idx, targets, loss_scale=2.0 ** 12)
    assert loss == pytest.approx(ref_loss, rel=1e-3) and loss != ref_loss
    for name, g in grads.items():
        assert g.dtype == np.float32
        assert relative_error(g, ref_grads[name]) < 2e-2, name
    assert all(p.dtype == np.float32 for p in mixed.params.values())   # float32 master weights


def test_loss_scaling_saves_small_gradients_from_float16_underflow():
    """With 4096 positions each logit's gradient is ~1/4096 of a probability, and the products in
    the backward fall below float16's normal range (6e-5): unscaled, they lose their digits."""
    idx, targets = markov_batch(np.random.default_rng(1), 256, 16)
    ref, mixed = (GPT(CONFIG, seed=3, matmul_dtype=m) for m in (None, "float16"))
    _, ref_grads = grads_of(ref, idx, targets)
    errors = {}
    for scale in (1.0, 2.0 ** 12):
        _, grads = grads_of(mixed, idx, targets, loss_scale=scale)
        errors[scale] = max(relative_error(g, ref_grads[name]) for name, g in grads.items())
    assert errors[2.0 ** 12] < 5e-3 and errors[1.0] > 3 * errors[2.0 ** 12], errors   # measured: 0.001, 0.02


def test_loss_scale_is_undone_exactly_in_float32(backend):
    """Scaling by a power of two commutes with rounding, so the gradients are the same to the bit;
    a backward that forgot to divide by the scale would be off by 2^10."""
    idx, targets = markov_batch(np.random.default_rng(2), 2, 16)
    model = GPT(CONFIG, backend=backend, seed=3)
    _, plain = grads_of(model, idx, targets)
    _, scaled = grads_of(model, idx, targets, loss_scale=2.0 ** 10)
    for name, g in plain.items():
        np.testing.assert_array_equal(scaled[name], g, err_msg=name)


def test_float16_training_follows_float32(backend):
    """30 AdamW steps on the same batches: the loss curves of the two precisions agree to within
    a small fraction of the distance the loss travels (measured: 0.15% of it). 30 steps, not
    more: on the CuPy stand-in, whose kernels run emulated, the two runs already take 20 s."""
    rng = np.random.default_rng(4)
    batches = [markov_batch(rng, 8, 16) for _ in range(30)]
    curves = {}
    for m in (None, "float16"):
        model = GPT(CONFIG, backend=backend, seed=5, matmul_dtype=m)
        opt, scaler = AdamW(model.params, lr=5e-3), DynamicLossScaler()
        curves[m] = []
        for idx, targets in batches:
            _, loss = model.forward(idx, targets, loss_scale=scaler.scale)
            grads = model.backward()
            finite = all_finite(grads.values())
            scaler.update(finite)
            if finite:
                opt.step(grads)
            curves[m].append(loss)
    ref, mixed = np.array(curves[None]), np.array(curves["float16"])
    travelled = ref[:5].mean() - ref[-5:].mean()
    assert travelled > 0.3                                              # it learned something (0.38)
    assert np.abs(mixed - ref).max() < 0.02 * travelled, np.abs(mixed - ref).max()


def test_dynamic_loss_scaler():
    scaler = DynamicLossScaler(scale=1024.0, growth_interval=3)
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 1024.0
    scaler.update(False)                                 # overflow: halve, and count again from 0
    assert scaler.scale == 512.0 and scaler.good_steps == 0
    for _ in range(3):
        scaler.update(True)
    assert scaler.scale == 1024.0 and scaler.good_steps == 0
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
    with pytest.raises(ConfigError):
        DynamicLossScaler(scale=0.0)


@pytest.mark.parametrize("state, message", [
    ({"scale": float("nan"), "good_steps": 0}, "scale"),
    ({"scale": float("inf"), "good_steps": 0}, "scale"),
    ({"scale": 0.0, "good_steps": 0}, "scale"),
    ({"scale": -1024.0, "good_steps": 0}, "scale"),
    ({"scale": "1024", "good_steps": 0}, "scale"),
    ({"scale": True, "good_steps": 0}, "scale"),
    ({"scale": 1024.0, "good_steps": -1}, "good_steps"),
    ({"scale": 1024.0, "good_steps": 3}, "good_steps"),      # the growth interval: it would never grow again
    ({"scale": 1024.0, "good_steps": 1.5}, "good_steps"),
    ({"scale": 1024.0, "good_steps": False}, "good_steps"),
], ids=["nan", "inf", "zero", "negative", "string", "bool", "negative-count", "count-at-interval",
        "float-count", "bool-count"])
def test_a_damaged_loss_scaler_state_is_refused(state, message):
    """A hand-edited or damaged state would scale every loss by NaN, or never grow the scale again:
    a ValueError naming the field, which a resume reports as a damaged training state."""
    scaler = DynamicLossScaler(scale=512.0, growth_interval=3)
    with pytest.raises(ValueError, match=f"loss scaler's {message} must be"):
        scaler.load_state_dict(state)
    assert scaler.state_dict() == {"scale": 512.0, "good_steps": 0}   # left as it was


def test_an_overflowing_backward_is_reported_not_hidden():
    """A scale far too large makes float16 products overflow: the gradients come back non-finite
    for the caller (the scaler) to see, instead of silently wrong."""
    idx, targets = markov_batch(np.random.default_rng(5), 2, 16)
    model = GPT(CONFIG, seed=3, matmul_dtype="float16")
    _, grads = grads_of(model, idx, targets, loss_scale=2.0 ** 40)
    assert not all_finite(grads.values())


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_all_finite_looks_at_every_array(bad):
    arrays = [np.ones(3, np.float32), np.ones((2, 2), np.float32), np.array([1.0, bad], np.float32)]
    assert all_finite(arrays[:2]) and not all_finite(arrays) and not all_finite(arrays[::-1])


def test_mixed_precision_needs_float32_master_weights():
    with pytest.raises(ConfigError, match="matmul_dtype"):
        GPT(CONFIG, dtype="float64", matmul_dtype="float16")
    with pytest.raises(ConfigError, match="matmul_dtype"):
        GPT(CONFIG, matmul_dtype="bfloat16")


def test_tf32_is_refused_on_numpy():
    set_tf32(np, False)                                  # turning it off is always fine
    with pytest.raises(ConfigError, match="cupy"):
        set_tf32(np, True)


@pytest.mark.skipif(not cupy_available(), reason="CuPy with a GPU is not available")
def test_tf32_rounds_float32_matmuls_on_the_gpu():
    cp = get_xp("cupy")
    rng = np.random.default_rng(0)
    a, b = (cp.asarray(rng.standard_normal(shape), dtype=np.float32) for shape in ((256, 512), (512, 256)))
    exact = to_numpy(a.astype(np.float64) @ b.astype(np.float64))
    try:
        set_tf32(cp, True)
        tf32 = to_numpy(a @ b)
    finally:
        set_tf32(cp, False)
    fp32 = to_numpy(a @ b)
    assert relative_error(fp32, exact) < 1e-6 < relative_error(tf32, exact) < 1e-2
