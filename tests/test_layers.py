"""Finite-difference gradient checks of every layer, in float64, over shapes and inputs drawn by
hypothesis, with an upstream gradient drawn independently of the inputs. Each check has a
negative control: a deliberately wrong backward that the same check must catch."""

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from gradcheck import dot_loss, draw, gradient_mismatches, layer_mismatches, relative_error
from numgpt import backend, kernels, precision
from numgpt.backend import array_module, to_device, to_numpy
from numgpt.layers import attention, classifier
from numgpt.layers.activations import ACTIVATIONS, gelu_forward
from numgpt.layers.attention import attention_backward, attention_forward, causal_softmax
from numgpt.layers.classifier import classifier_backward, classifier_forward
from numgpt.layers.cross_entropy import EXP_SAFE_BOUND, IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward
from numgpt.layers.dropout import dropout_backward, dropout_forward
from numgpt.layers.embedding import embedding_backward, embedding_forward
from numgpt.layers.layernorm import layernorm_backward, layernorm_forward
from numgpt.layers.linear import SUM_ROWS_BLOCK, linear_backward, linear_forward, sum_rows
from numgpt.layers.mlp import mlp_backward, mlp_forward
from numgpt.layers.residual import residual_backward, residual_forward

seeds = st.integers(0, 2**32 - 1)
scales = st.sampled_from([0.02, 0.3, 1.0, 3.0])   # GPT-2's init scale, and larger values that rise above FD noise
sizes = st.integers(1, 5)


def without_biases(arrays):
    """The arrays of the same layer in a bias-free model (GPTConfig(bias=False))."""
    return {name: a for name, a in arrays.items() if name != "b" and not name.endswith(".bias")}


# ---------------------------------------------------------------- linear

def linear_arrays(xp, rng, B, T, C_in, C_out, scale):
    return {"x": draw(xp, rng, (B, T, C_in), scale), "w": draw(xp, rng, (C_in, C_out), scale),
            "b": draw(xp, rng, (C_out,), scale)}


def run_linear(a):
    return linear_forward(a["x"], a["w"], a["b"])


def linear_grads(dout, cache):
    dx, dw, db = linear_backward(dout, cache)
    return {"x": dx, "w": dw, "b": db}


def linear_grads_first_row_only(dout, cache):
    """Wrong: the bias gradient of the first row only, instead of the sum over rows."""
    grads = linear_grads(dout, cache)
    grads["b"] = dout.reshape(-1, dout.shape[-1])[0]
    return grads


@given(B=sizes, T=sizes, C_in=sizes, C_out=sizes, scale=scales, seed=seeds)
def test_linear_gradients(xp, B, T, C_in, C_out, scale, seed):
    rng = np.random.default_rng(seed)
    assert not layer_mismatches(run_linear, linear_grads, linear_arrays(xp, rng, B, T, C_in, C_out, scale), rng)


@given(C_in=sizes, C_out=sizes, seed=seeds)
def test_linear_check_catches_wrong_bias_gradient(xp, C_in, C_out, seed):
    rng = np.random.default_rng(seed)
    arrays = linear_arrays(xp, rng, 2, 3, C_in, C_out, 1.0)
    assert "b" in layer_mismatches(run_linear, linear_grads_first_row_only, arrays, rng)


def test_linear_without_bias(xp):
    rng = np.random.default_rng(0)
    arrays = {"x": draw(xp, rng, (2, 3, 4)), "w": draw(xp, rng, (4, 5))}
    run = lambda a: linear_forward(a["x"], a["w"])
    grads = lambda dout, cache: dict(zip(("x", "w"), linear_backward(dout, cache)[:2]))
    assert linear_backward(draw(xp, rng, (2, 3, 5)), run(arrays)[1])[2] is None
    assert not layer_mismatches(run, grads, arrays, rng)


@given(rows=st.integers(1, 3 * SUM_ROWS_BLOCK + 5), seed=seeds)
def test_sum_rows_sums_every_row_in_its_blocks_and_the_rest(xp, rows, seed):
    """Whole blocks of rows, and the rows after the last whole block (the gradient checks' few rows are
    all in that rest)."""
    x = draw(xp, np.random.default_rng(seed), (rows, 3))
    assert relative_error(sum_rows(x), x.sum(axis=0)) < 1e-13


def test_sum_rows_keeps_float32s_error_small_over_many_rows():
    """In float32 the error of a sum of rows one after another grows with their number: at 16384 rows
    NumPy's x.sum(axis=0) is 1.8e-6 off, numgpt's two levels 1.6e-7 (measured)."""
    x = np.random.default_rng(0).normal(0.3, 1.0, size=(16384, 64)).astype(np.float32)
    exact = x.astype(np.float64).sum(axis=0)
    assert relative_error(sum_rows(x), exact) < 5e-7 < relative_error(x.sum(axis=0), exact)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_the_check_catches_a_gradient_or_loss_that_is_not_finite(xp, bad):
    """nan compares false with every tolerance and an inf entry makes the tolerance inf: before the
    checker looked for them, a backward that returned nan or inf (and a nan loss) passed."""
    rng = np.random.default_rng(0)
    arrays = linear_arrays(xp, rng, 2, 3, 4, 5, 1.0)
    out, cache = run_linear(arrays)
    dout = draw(xp, rng, out.shape)
    loss = lambda: dot_loss(run_linear(arrays)[0], dout)
    assert not gradient_mismatches(loss, arrays, linear_grads(dout, cache), rng)
    for entry in [(0, 0), (3, 4)]:   # with one coordinate sampled, one of them is not
        grads = linear_grads(dout, cache)
        grads["w"][entry] = bad
        assert "w" in gradient_mismatches(loss, arrays, grads, rng, max_coords=1)
    assert "w" in gradient_mismatches(lambda: loss() * bad, arrays, linear_grads(dout, cache), rng)


def test_one_large_gradient_does_not_widen_the_tolerance_of_the_rest(xp):
    """L = sum(a * c) with c[0] a million times the rest: a backward that is right at c[0] and
    wrong by 1e-4 elsewhere must fail. Scaled by its array's largest gradient, the tolerance
    (1e-6 of it) was 100 times that error."""
    rng = np.random.default_rng(0)
    c = rng.normal(size=32) + 2.0
    c[0] = 1e6
    arrays = {"a": draw(xp, rng, (32,))}
    loss = lambda: float((to_numpy(arrays["a"]) * c).sum())
    assert not gradient_mismatches(loss, arrays, {"a": to_device(c, xp)}, rng)
    wrong = c * (1 + 1e-4)
    wrong[0] = c[0]
    assert "a" in gradient_mismatches(loss, arrays, {"a": to_device(wrong, xp)}, rng)


# ---------------------------------------------------------------- embedding

def run_embedding(idx, start=0):
    return lambda a: embedding_forward(idx, a["wte"], a["wpe"], start)


def embedding_grads(dout, cache):
    dwte, dwpe = embedding_backward(dout, cache)
    return {"wte": dwte, "wpe": dwpe}


def embedding_grads_fancy_index(dout, cache):
    """The classic bug: `dwte[idx] += dx` keeps one write per repeated id."""
    idx, wte_shape = cache[:2]
    grads = embedding_grads(dout, cache)
    xp = array_module(dout)
    dwte = xp.zeros(wte_shape)
    dwte[idx.reshape(-1)] += dout.reshape(-1, dout.shape[-1])
    grads["wte"] = dwte
    return grads


@st.composite
def embedding_case(draw_):
    V = draw_(st.integers(1, 7))
    B, T = draw_(sizes), draw_(sizes)
    block_size = T + draw_(st.integers(0, 3))
    C = draw_(sizes)
    ids = draw_(st.lists(st.integers(0, V - 1), min_size=B * T, max_size=B * T))
    return V, B, T, block_size, C, np.array(ids).reshape(B, T)


@given(case=embedding_case(), scale=scales, seed=seeds)
def test_embedding_gradients(xp, case, scale, seed):
    V, B, T, block_size, C, ids = case
    rng = np.random.default_rng(seed)
    arrays = {"wte": draw(xp, rng, (V, C), scale), "wpe": draw(xp, rng, (block_size, C), scale)}
    start = block_size - T          # the last T positions, as generation with a KV cache uses them; often 0
    assert not layer_mismatches(run_embedding(to_device(ids, xp), start), embedding_grads, arrays, rng)


@given(case=embedding_case(), seed=seeds)
def test_embedding_check_catches_fancy_index_bug(xp, case, seed):
    V, B, T, block_size, C, ids = case
    ids = np.concatenate([ids.reshape(-1), ids.reshape(-1)[:1]])    # one id surely repeats
    ids = ids.reshape(1, -1)
    rng = np.random.default_rng(seed)
    arrays = {"wte": draw(xp, rng, (V, C)), "wpe": draw(xp, rng, (ids.shape[1], C))}
    assert "wte" in layer_mismatches(run_embedding(to_device(ids, xp)), embedding_grads_fancy_index, arrays, rng)


def test_embedding_backward_accumulates_into_a_given_gradient(xp):
    """With tied weights the rows are added into the output layer's gradient: the sum of both."""
    rng = np.random.default_rng(0)
    ids = to_device(np.array([[0, 2, 2, 1]]), xp)
    wte, wpe, dx = draw(xp, rng, (3, 5)), draw(xp, rng, (4, 5)), draw(xp, rng, (1, 4, 5))
    cache = embedding_forward(ids, wte, wpe)[1]
    head_grad = draw(xp, rng, (3, 5))
    expected = head_grad + embedding_backward(dx, cache)[0]
    dwte, _ = embedding_backward(dx, cache, dwte=head_grad)
    assert dwte is head_grad
    np.testing.assert_allclose(to_numpy(dwte), to_numpy(expected), rtol=1e-12)


def test_embedding_gradients_come_in_the_dtype_of_dx(xp):
    """A float32 model's embedding gradients are float32: a fresh dwte (untied weights, where no
    output-layer gradient is given to add into) and dwpe are made in dx's dtype, not NumPy's float64."""
    rng = np.random.default_rng(0)
    ids = to_device(np.array([[0, 2, 2, 1]]), xp)
    wte, wpe = draw(xp, rng, (3, 5)).astype(np.float32), draw(xp, rng, (6, 5)).astype(np.float32)
    x, cache = embedding_forward(ids, wte, wpe, start=1)
    assert x.dtype == np.float32
    dwte, dwpe = embedding_backward(xp.ones_like(x), cache)
    assert dwte.dtype == dwpe.dtype == np.float32


# ---------------------------------------------------------------- layernorm

def run_layernorm(a):
    return layernorm_forward(a["x"], a["w"], a.get("b"))


def layernorm_grads(dout, cache):
    return {name: g for name, g in zip(("x", "w", "b"), layernorm_backward(dout, cache)) if g is not None}


def layernorm_grads_missing_variance_path(dout, cache):
    """Wrong: ignores how x moves the variance (drops the xhat * mean(g * xhat) term)."""
    xhat, rstd, w, _ = cache
    grads = layernorm_grads(dout, cache)
    g = dout * w
    grads["x"] = (g - g.mean(axis=-1, keepdims=True)) * rstd
    return grads


@given(B=sizes, T=sizes, C=st.integers(2, 9), scale=scales, shift=st.sampled_from([0.0, 5.0]),
       bias=st.booleans(), seed=seeds)
@example(B=4, T=5, C=2, scale=1.0, shift=5.0, bias=True, seed=17429127)   # FD round-off above the tolerance at eps
def test_layernorm_gradients(xp, B, T, C, scale, shift, bias, seed):
    rng = np.random.default_rng(seed)
    arrays = {"x": draw(xp, rng, (B, T, C), scale) + shift, "w": draw(xp, rng, (C,)), "b": draw(xp, rng, (C,))}
    if not bias:
        arrays = without_biases(arrays)
    assert not layer_mismatches(run_layernorm, layernorm_grads, arrays, rng)


@given(B=sizes, T=sizes, C=st.integers(2, 9), seed=seeds)
def test_layernorm_check_catches_missing_variance_path(xp, B, T, C, seed):
    rng = np.random.default_rng(seed)
    arrays = {"x": draw(xp, rng, (B, T, C)), "w": draw(xp, rng, (C,)), "b": draw(xp, rng, (C,))}
    assert "x" in layer_mismatches(run_layernorm, layernorm_grads_missing_variance_path, arrays, rng)


# ---------------------------------------------------------------- attention

def attention_arrays(xp, rng, B, T, n_head, head_size, scale):
    C = n_head * head_size
    return {"x": draw(xp, rng, (B, T, C), scale),
            "c_attn.weight": draw(xp, rng, (C, 3 * C), scale), "c_attn.bias": draw(xp, rng, (3 * C,), scale),
            "c_proj.weight": draw(xp, rng, (C, C), scale), "c_proj.bias": draw(xp, rng, (C,), scale)}


def run_attention(n_head, dropout, mask_seed):
    def run(a):
        # the same seed every call: one fixed dropout mask, so the function is deterministic
        rng = array_module(a["x"]).random.default_rng(mask_seed) if dropout else None
        params = {k: v for k, v in a.items() if k != "x"}
        return attention_forward(a["x"], params, n_head, dropout, rng)
    return run


def attention_grads(dout, cache):
    dx, grads = attention_backward(dout, cache)
    return {"x": dx, **grads}


@given(B=st.integers(1, 3), T=st.integers(1, 6), n_head=st.integers(1, 3), head_size=st.integers(1, 4),
       dropout=st.sampled_from([0.0, 0.3]), scale=scales, bias=st.booleans(), seed=seeds)
@example(B=1, T=3, n_head=3, head_size=4, dropout=0.0, scale=3.0, bias=True, seed=10567192)   # |L| 1, S 4571
def test_attention_gradients(xp, B, T, n_head, head_size, dropout, scale, bias, seed):
    rng = np.random.default_rng(seed)
    arrays = attention_arrays(xp, rng, B, T, n_head, head_size, scale)
    if not bias:
        arrays = without_biases(arrays)
    assert not layer_mismatches(run_attention(n_head, dropout, seed), attention_grads, arrays, rng)


@given(T=st.integers(1, 6), n_head=st.integers(1, 3), seed=seeds)
def test_attention_check_catches_wrong_softmax_backward(xp, T, n_head, seed, monkeypatch):
    rng = np.random.default_rng(seed)
    arrays = attention_arrays(xp, rng, 2, T, n_head, 2, 1.0)
    monkeypatch.setattr(attention, "softmax_backward", lambda dprobs, probs, overwrite=False: probs * dprobs)
    with kernels.disabled():   # the twin's softmax; on CuPy the flash kernels replace it (test_kernels mutates those)
        assert layer_mismatches(run_attention(n_head, 0.0, seed), attention_grads, arrays, rng)


def test_attention_rows_are_causal_distributions(xp):
    rng = np.random.default_rng(0)
    probs = to_numpy(causal_softmax(draw(xp, rng, (2, 3, 7, 7), 10.0)))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    assert np.all(probs[..., np.triu_indices(7, k=1)[0], np.triu_indices(7, k=1)[1]] == 0.0)
    assert np.all(probs[..., np.tril_indices(7)[0], np.tril_indices(7)[1]] > 0.0)


def test_attention_is_the_textbook_formula_head_by_head(xp):
    """Against the formula written out per batch row and head, in loops: out = concat over heads of
    softmax(q_h k_h^T / sqrt(hs), future masked) v_h, then the projection. The gradient checks hold
    for any forward; this pins the forward itself (the scale, the mask, the head split)."""
    B, T, n_head, hs = 2, 5, 3, 4
    C = n_head * hs
    arrays = attention_arrays(xp, np.random.default_rng(0), B, T, n_head, hs, 1.0)
    out, _ = run_attention(n_head, 0.0, 0)(arrays)
    a = {name: to_numpy(value) for name, value in arrays.items()}
    qkv = a["x"] @ a["c_attn.weight"] + a["c_attn.bias"]                       # (B,T,3C)
    expected = np.zeros((B, T, C))
    for b in range(B):
        for h in range(n_head):
            cols = slice(h * hs, (h + 1) * hs)
            q, k, v = qkv[b, :, cols], qkv[b, :, C:][:, cols], qkv[b, :, 2 * C:][:, cols]   # (T,hs)
            scores = q @ k.T / math.sqrt(hs)
            scores[np.triu_indices(T, k=1)] = -np.inf                          # no position sees its future
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            expected[b, :, cols] = weights / weights.sum(axis=1, keepdims=True) @ v
    expected = expected @ a["c_proj.weight"] + a["c_proj.bias"]
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-10, atol=1e-12)


def test_attention_is_causal(xp):
    rng = np.random.default_rng(1)
    arrays = attention_arrays(xp, rng, 1, 6, 2, 3, 1.0)
    out, _ = run_attention(2, 0.0, 0)(arrays)
    arrays["x"][:, 4:] += 1.0                                         # change only the future
    changed, _ = run_attention(2, 0.0, 0)(arrays)
    np.testing.assert_array_equal(to_numpy(out)[:, :4], to_numpy(changed)[:, :4])
    assert not np.allclose(to_numpy(out)[:, 4:], to_numpy(changed)[:, 4:])


def root(a):
    """The array that owns `a`'s memory (a itself, or the end of its chain of bases)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def test_the_attention_keeps_its_queries_in_qkvs_own_memory():
    """attention_forward scales q inside the qkv it made: the cache's k and v keep all of qkv alive,
    so a scaled copy of q beside it would be one more (B,T,C) array held per layer until the
    backward (36 MiB per 1024 tokens at GPT-2 124M). causal_attention_forward leaves a qkv it is
    given alone unless told it may overwrite it."""
    arrays = attention_arrays(np, np.random.default_rng(0), 2, 5, 3, 4, 1.0)
    _, (_, core, _, _) = run_attention(3, 0.0, 0)(arrays)
    assert isinstance(core, attention.MatrixCache)
    assert root(core.q) is root(core.k) is root(core.v)
    qkv = draw(np, np.random.default_rng(1), (2, 5, 36))
    given_qkv = qkv.copy()
    y, cache = attention.causal_attention_forward(qkv, 3)
    np.testing.assert_array_equal(qkv, given_qkv)
    y_overwriting, cache_overwriting = attention.causal_attention_forward(qkv, 3, overwrite=True)
    np.testing.assert_array_equal(y_overwriting, y)
    np.testing.assert_array_equal(cache_overwriting.q, cache.q)
    assert root(cache_overwriting.q) is qkv


@pytest.mark.parametrize("block_rows", [1, 3, 1000])
def test_softmax_backward_in_place_gives_the_same_numbers(block_rows, monkeypatch):
    """With overwrite, softmax_backward writes ds into dprobs a block of rows at a time (CPU_BLOCK
    elements): the same numbers as the plain form, bit for bit, whether the rows fill the last block
    or not, and the block covering every row."""
    monkeypatch.setattr(backend, "CPU_BLOCK", block_rows * 7)
    rng = np.random.default_rng(0)
    probs = causal_softmax(rng.standard_normal((2, 3, 5, 7), dtype=np.float32))
    dprobs = rng.standard_normal((2, 3, 5, 7), dtype=np.float32)
    given = dprobs.copy()
    expected = attention.softmax_backward(dprobs, probs)
    np.testing.assert_array_equal(dprobs, given)
    ds = attention.softmax_backward(dprobs, probs, overwrite=True)
    assert ds is dprobs
    np.testing.assert_array_equal(ds, expected)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_the_attentions_backward_holds_one_attention_matrix_at_a_time(dropout, monkeypatch):
    """The backward's (B,nh,T,T) arrays (dp = dy v^T, then ds) are the largest it makes, at the top of
    a training step's memory at GPT-2 124M: ds is made in dp's memory (96 MiB less per batch of 2 x
    1024), and the heads' gradients go straight into dqkv, not through merged copies and a
    concatenation. tracemalloc sees NumPy's buffers."""
    monkeypatch.setattr(backend, "CPU_BLOCK", 8 * 64)                 # a scratch of 8 rows
    B, T, n_head, hs = 2, 64, 4, 8
    C = n_head * hs
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, 3 * C), dtype=np.float32)
    dy = rng.standard_normal((B, T, C), dtype=np.float32)
    _, cache = attention.causal_attention_forward(qkv, n_head, dropout, np.random.default_rng(1) if dropout else None)
    tracemalloc.start()
    try:
        attention.causal_attention_backward(dy, cache)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    matrix, heads = B * n_head * T * T * 4, B * T * C * 4
    # one matrix (and under dropout the product before its mask), dv dq dk and dqkv, the scratch, small arrays
    assert peak <= (1 + (dropout > 0)) * matrix + 6 * heads + 8 * T * 4 + (4 << 10)


def test_attention_probs_are_the_probabilities_before_dropout(xp):
    """attention_probs gives the softmax itself even when dropout was active in the forward: rows
    that sum to 1, not the dropped and rescaled copy that multiplied v (which equals it without dropout)."""
    rng = np.random.default_rng(0)
    arrays = attention_arrays(xp, rng, 2, 5, 2, 3, 1.0)
    _, cache = run_attention(2, 0.5, 0)(arrays)
    probs = to_numpy(attention.attention_probs(cache))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-12)
    rows, cols = np.tril_indices(5)                        # every position a query may attend to
    assert np.all(probs[..., rows, cols] > 0.0)


# ---------------------------------------------------------------- MLP and activations

def mlp_arrays(xp, rng, B, T, C, scale):
    return {"x": draw(xp, rng, (B, T, C), scale),
            "c_fc.weight": draw(xp, rng, (C, 4 * C), scale), "c_fc.bias": draw(xp, rng, (4 * C,), scale),
            "c_proj.weight": draw(xp, rng, (4 * C, C), scale), "c_proj.bias": draw(xp, rng, (C,), scale)}


def run_mlp(activation, dropout=0.0, mask_seed=0):
    def run(a):
        rng = array_module(a["x"]).random.default_rng(mask_seed) if dropout else None
        return mlp_forward(a["x"], {k: v for k, v in a.items() if k != "x"}, activation, dropout, rng)
    return run


def mlp_grads(dout, cache):
    dx, grads = mlp_backward(dout, cache)
    return {"x": dx, **grads}


def away_from_kinks(x):
    """Move entries off ReLU's kink at 0, where finite differences straddle two slopes."""
    return x + 0.01 * (abs(x) < 1e-3)


@given(B=sizes, T=sizes, C=sizes, activation=st.sampled_from(sorted(ACTIVATIONS)),
       dropout=st.sampled_from([0.0, 0.25]), scale=scales, bias=st.booleans(), seed=seeds)
def test_mlp_gradients(xp, B, T, C, activation, dropout, scale, bias, seed):
    rng = np.random.default_rng(seed)
    arrays = mlp_arrays(xp, rng, B, T, C, scale)
    if not bias:
        arrays = without_biases(arrays)
    if activation == "relu":   # finite differences must not straddle ReLU's kink at 0
        b_fc = to_numpy(arrays["c_fc.bias"]) if bias else 0.0
        h = to_numpy(arrays["x"]).reshape(-1, C) @ to_numpy(arrays["c_fc.weight"]) + b_fc
        assume(np.abs(h).min() > 1e-4)
    assert not layer_mismatches(run_mlp(activation, dropout, seed), mlp_grads, arrays, rng)


@given(B=sizes, T=sizes, C=sizes, seed=seeds)
def test_mlp_check_catches_wrong_gelu_backward(xp, B, T, C, seed, monkeypatch):
    rng = np.random.default_rng(seed)
    arrays = mlp_arrays(xp, rng, B, T, C, 1.0)
    # wrong: differentiates 0.5 x (1 + tanh(...)) as if the tanh did not depend on x
    wrong = lambda dy, x: dy * 0.5 * (1.0 + array_module(x).tanh(0.7978845608 * (x + 0.044715 * x ** 3)))
    monkeypatch.setitem(ACTIVATIONS, "gelu", (gelu_forward, wrong))
    assert layer_mismatches(run_mlp("gelu"), mlp_grads, arrays, rng)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(n=st.integers(1, 30), scale=st.sampled_from([0.1, 1.0, 4.0]), seed=seeds)
def test_activation_gradients(xp, name, n, scale, seed):
    forward, backward = ACTIVATIONS[name]
    rng = np.random.default_rng(seed)
    arrays = {"x": away_from_kinks(draw(xp, rng, (n,), scale))}
    assert not layer_mismatches(lambda a: forward(a["x"]), lambda d, c: {"x": backward(d, c)}, arrays, rng)


@pytest.mark.parametrize("dtype, huge", [(np.float32, [1e14, 1e20, 3e38]), (np.float64, [1e103, 1e300])])
def test_gelu_backward_stays_finite_for_large_inputs(xp, dtype, huge):
    """The slope is 0 far left and 1 far right, up to the largest finite x: x^3 overflows from 7e12
    in float32 (5.6e102 in float64), which made s (1 - t) = inf * 0 NaN before x was clipped."""
    magnitudes = [50.0, 1e4] + huge
    x = to_device(np.array([-m for m in magnitudes] + magnitudes, dtype=dtype), xp)
    dx = ACTIVATIONS["gelu"][1](xp.ones_like(x), x)
    np.testing.assert_array_equal(to_numpy(dx), [0.0] * len(magnitudes) + [1.0] * len(magnitudes))


@pytest.mark.parametrize("block", [1, 7, 64])
def test_gelu_backward_in_blocks_is_the_whole_computation(block, monkeypatch):
    """On the CPU gelu_backward works in blocks of backend.CPU_BLOCK elements: every block, the last
    and partial one too, gets the same numbers, to the bit, as one pass over the whole array."""
    rng = np.random.default_rng(0)
    x, dy = (rng.standard_normal((3, 5, 13)).astype(np.float32) * 4 for _ in range(2))
    whole = ACTIVATIONS["gelu"][1](dy, x)
    monkeypatch.setattr(backend, "CPU_BLOCK", block)
    x_before = x.copy()
    np.testing.assert_array_equal(ACTIVATIONS["gelu"][1](dy, x), whole)
    np.testing.assert_array_equal(x, x_before)   # the caller's x is kept


def test_relu_passes_no_gradient_at_zero(xp):
    """ReLU's backward is 0 where the input is exactly 0, as torch's (threshold_backward keeps x > 0).
    Finite differences cannot see this (the kink), so the gradient checks move inputs off it."""
    x = to_device(np.array([-1.0, 0.0, 2.0]), xp)
    np.testing.assert_array_equal(to_numpy(ACTIVATIONS["relu"][1](xp.ones_like(x), x)), [0.0, 0.0, 1.0])


# ---------------------------------------------------------------- dropout and residual

def run_dropout(p, mask_seed):
    return lambda a: dropout_forward(a["x"], p, array_module(a["x"]).random.default_rng(mask_seed))


@given(n=st.integers(1, 40), p=st.sampled_from([0.0, 0.1, 0.5, 0.9]), seed=seeds)
def test_dropout_gradients(xp, n, p, seed):
    rng = np.random.default_rng(seed)
    arrays = {"x": draw(xp, rng, (n,))}
    assert not layer_mismatches(run_dropout(p, seed), lambda d, c: {"x": dropout_backward(d, c)}, arrays, rng)


@given(seed=seeds)
def test_dropout_check_catches_missing_rescale(xp, seed):
    rng = np.random.default_rng(seed)
    arrays = {"x": draw(xp, rng, (40,))}
    wrong = lambda d, cache: {"x": d * cache[0]}       # forgot the 1 / (1 - p)
    assert layer_mismatches(run_dropout(0.5, seed), wrong, arrays, rng)


def test_dropout_keeps_expectation_and_is_off_without_rng(xp):
    x = xp.ones(200_000)
    y, _ = dropout_forward(x, 0.3, xp.random.default_rng(0))
    assert abs(float(y.mean()) - 1.0) < 0.01
    assert abs(float((y == 0).mean()) - 0.3) < 0.01
    assert dropout_forward(x, 0.3, None)[0] is x


def test_dropout_with_p_zero_is_the_identity_and_draws_nothing(xp):
    """p = 0 means no dropout even with a generator: x itself comes back, nothing is cached, and no
    random number is drawn, so the generator's later draws are those of a run without the call."""
    x = xp.ones((3, 4))
    rng, twin = xp.random.default_rng(5), xp.random.default_rng(5)
    y, cache = dropout_forward(x, 0.0, rng)
    assert y is x and cache is None
    np.testing.assert_array_equal(to_numpy(rng.random(8)), to_numpy(twin.random(8)))


def test_residual_gradients(xp):
    rng = np.random.default_rng(0)
    arrays = {"x": draw(xp, rng, (2, 3, 4)), "fx": draw(xp, rng, (2, 3, 4))}
    run = lambda a: (residual_forward(a["x"], a["fx"]), None)
    grads = lambda d, _: dict(zip(("x", "fx"), residual_backward(d)))
    assert not layer_mismatches(run, grads, arrays, rng)
    assert layer_mismatches(run, lambda d, _: {"x": d, "fx": 0 * d}, arrays, rng)   # a branch that gets no gradient


# ---------------------------------------------------------------- cross-entropy and the fused classifier

@st.composite
def targets_case(draw_, force_ignored=False):
    # with one class the loss is constantly 0: a control needs V >= 2 to have a gradient to get wrong
    N, V = draw_(st.integers(1, 8)), draw_(st.integers(2 if force_ignored else 1, 9))
    targets = draw_(st.lists(st.integers(0, V - 1) | st.just(IGNORE_INDEX), min_size=N, max_size=N))
    if force_ignored:   # at least two kept rows and one ignored row
        targets = [0, 0] + targets + [IGNORE_INDEX]
        N += 3
    return N, V, np.array(targets)


def run_cross_entropy(targets, logits_bound=None):
    return lambda a: cross_entropy_forward(a["logits"], targets, logits_bound=logits_bound)


@given(case=targets_case(), scale=scales, seed=seeds, bounded=st.booleans())
def test_cross_entropy_gradients(xp, case, scale, seed, bounded):
    N, V, targets = case
    rng = np.random.default_rng(seed)
    arrays = {"logits": draw(xp, rng, (N, V), scale)}
    bound = EXP_SAFE_BOUND if bounded else None   # the drawn logits are far below it: no row max
    grads = lambda d, cache: {"logits": cross_entropy_backward(d, cache)}
    if not np.any(targets != IGNORE_INDEX):   # nothing to learn from: nan loss, zero gradient
        loss, cache = cross_entropy_forward(arrays["logits"], to_device(targets, xp), logits_bound=bound)
        assert np.isnan(float(loss)) and not np.any(to_numpy(cross_entropy_backward(1.0, cache)))
        return
    assert not layer_mismatches(run_cross_entropy(to_device(targets, xp), bound), grads, arrays, rng)


def test_cross_entropy_without_the_row_max_is_the_same_function(xp):
    rng = np.random.default_rng(0)
    logits = draw(xp, rng, (6, 50257), 10.0)                 # |logits| < 60
    targets = to_device(np.array([0, 5, IGNORE_INDEX, 50256, 7, 7]), xp)
    bound = float(abs(to_numpy(logits)).max())
    losses, dlogits = [], []
    for logits_bound in (None, bound):
        loss, cache = cross_entropy_forward(logits, targets, logits_bound=logits_bound)
        losses.append(float(loss))
        dlogits.append(to_numpy(cross_entropy_backward(1.0, cache)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-14)
    np.testing.assert_allclose(dlogits[0], dlogits[1], rtol=1e-12, atol=1e-20)


@given(case=targets_case(force_ignored=True), seed=seeds)
def test_cross_entropy_check_catches_mean_over_ignored_rows(xp, case, seed):
    N, V, targets = case
    rng = np.random.default_rng(seed)
    arrays = {"logits": draw(xp, rng, (N, V))}

    def wrong(dloss, cache):   # divides by all rows instead of the kept ones
        exps, sumexp, safe, valid, n_valid = cache
        return cross_entropy_backward(dloss, cache) * (n_valid / exps.shape[0])

    assert layer_mismatches(run_cross_entropy(to_device(targets, xp)), lambda d, c: {"logits": wrong(d, c)},
                            arrays, rng)


def test_cross_entropy_of_uniform_logits_is_log_vocab(xp):
    for V in (2, 7, 50257):
        loss, _ = cross_entropy_forward(xp.zeros((3, V)), to_device(np.array([0, 1, V - 1]), xp))
        assert float(loss) == pytest.approx(np.log(V), rel=1e-12)


def test_cross_entropy_is_stable_for_huge_logits(xp):
    logits = to_device(np.array([[1e4, 0.0, -1e4]], dtype=np.float32), xp)
    loss, cache = cross_entropy_forward(logits, to_device(np.array([1]), xp))
    assert float(loss) == pytest.approx(1e4)
    assert np.all(np.isfinite(to_numpy(cross_entropy_backward(1.0, cache))))


def test_cross_entropy_of_float32_logits_stays_float32(xp):
    """The loss and dlogits come in the logits' dtype: the row scale (a Python float times a bool
    mask, float64 by NumPy's rules) is cast before it multiplies the float32 exps, or the whole
    (N,V) gradient would come out float64, twice the memory of the logits."""
    rng = np.random.default_rng(0)
    logits = draw(xp, rng, (4, 7)).astype(np.float32)
    loss, cache = cross_entropy_forward(logits, to_device(np.array([0, 6, IGNORE_INDEX, 3]), xp))
    assert loss.dtype == np.float32
    assert cross_entropy_backward(1.0, cache).dtype == np.float32
    assert cross_entropy_backward(0.5, cache, overwrite=True).dtype == np.float32


def run_classifier(targets):
    return lambda a: classifier_forward(a["x"], a["w"], targets, return_logits=False)[::2]


@given(case=targets_case(), C=sizes, chunk_rows=st.integers(1, 4), dw_rows=st.integers(1, 4), scale=scales,
       seed=seeds)
def test_classifier_gradients_over_chunks(xp, case, C, chunk_rows, dw_rows, scale, seed, monkeypatch):
    N, V, targets = case
    assume(np.any(targets != IGNORE_INDEX))     # with no target kept the loss is nan, its gradient 0
    # several chunks, whose shares of dw after the first are added a few rows at a time
    monkeypatch.setattr(classifier, "CHUNK_ELEMENTS", dict.fromkeys(classifier.CHUNK_ELEMENTS, chunk_rows * V))
    monkeypatch.setattr(classifier, "DW_ELEMENTS", dict.fromkeys(classifier.DW_ELEMENTS, dw_rows * C))
    rng = np.random.default_rng(seed)
    arrays = {"x": draw(xp, rng, (N, C), scale), "w": draw(xp, rng, (V, C), scale)}
    grads = lambda d, cache: dict(zip(("x", "w"), classifier_backward(d, cache)))
    assert not layer_mismatches(run_classifier(to_device(targets, xp)), grads, arrays, rng)


def test_the_classifier_adds_later_chunks_into_dw_through_a_small_scratch(monkeypatch):
    """Each chunk after the first adds its share of the (V,C) weight gradient through a scratch of
    DW_ELEMENTS numbers, not a second (V,C) array (147 MiB at GPT-2 124M). tracemalloc sees NumPy's
    buffers: what the gradients add to the peak is dw, dx, the scratch and a chunk's (n,C) temporaries."""
    N, V, C, chunk, dw_rows = 96, 6000, 32, 32, 500
    monkeypatch.setattr(classifier, "CHUNK_ELEMENTS", {"numpy": chunk * V})           # 3 chunks
    monkeypatch.setattr(classifier, "DW_ELEMENTS", {"numpy": dw_rows * C})
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((N, C), dtype=np.float32), rng.standard_normal((V, C), dtype=np.float32)
    targets = rng.integers(0, V, N)

    def peak(requires_grad):
        tracemalloc.start()
        try:
            classifier_forward(x, w, targets, return_logits=False, requires_grad=requires_grad)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    gradients = 4 * (V * C + N * C + dw_rows * C + 2 * chunk * C)   # dw, dx, the scratch, x_scaled and dx's rows
    assert peak(True) - peak(False) <= gradients + (16 << 10)        # 16 KiB for the small arrays; a second dw is 750


def test_classifier_matches_unfused_loss_and_logits(xp, monkeypatch):
    monkeypatch.setattr(classifier, "CHUNK_ELEMENTS", dict.fromkeys(classifier.CHUNK_ELEMENTS, 3 * 11))
    rng = np.random.default_rng(0)
    x, w = draw(xp, rng, (10, 4)), draw(xp, rng, (11, 4))
    targets = to_device(np.array([1, 2, 3, IGNORE_INDEX, 5, 6, 7, 8, 9, 10]), xp)
    loss, logits, _ = classifier_forward(x, w, targets)
    ref_loss, _ = cross_entropy_forward(x @ w.T, targets)
    np.testing.assert_allclose(to_numpy(logits), to_numpy(x @ w.T), rtol=1e-14)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-13)


def huge_logits_case(xp):
    """x (4,8), w (5,8) whose logits pass +-1e3, and targets: unshifted, exp overflows even in float64."""
    rng = np.random.default_rng(1)
    return draw(xp, rng, (4, 8), 100.0), draw(xp, rng, (5, 8), 10.0), to_device(np.array([0, 1, 2, 4]), xp)


def test_classifier_is_stable_for_huge_logits(xp):
    x, w, targets = huge_logits_case(xp)
    assert float(classifier.logits_bound(x, w)) > EXP_SAFE_BOUND
    loss, _, (dx, dw) = classifier_forward(x, w, targets, return_logits=False)
    ref_loss, _ = cross_entropy_forward(x @ w.T, targets)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-13)
    assert np.all(np.isfinite(to_numpy(dx))) and np.all(np.isfinite(to_numpy(dw)))


def test_classifier_stability_check_catches_a_wrong_logits_bound(xp, monkeypatch):
    monkeypatch.setattr(classifier, "logits_bound", lambda x, w: 0.0)   # claims exp is safe unshifted
    x, w, targets = huge_logits_case(xp)
    # the bound steers the twin only: on CuPy the softmax kernel always subtracts the row max
    with np.errstate(over="ignore", invalid="ignore"), kernels.disabled():
        loss, _, _ = classifier_forward(x, w, targets, return_logits=False)
    assert not np.isfinite(float(loss))


def test_logits_bound_bounds_every_logit_and_is_reached_by_parallel_rows(xp):
    """The classifier skips the row max when logits_bound(x, w) <= EXP_SAFE_BOUND, so it must never
    fall below a |logit|. Cauchy-Schwarz is tight for parallel rows: x's longest row (3, 4), norm 5,
    along w's longest (6, 8), norm 10, gives the logit 50, which the bound must equal."""
    x = to_device(np.array([[3.0, 4.0], [1.0, 0.0]]), xp)
    w = to_device(np.array([[6.0, 8.0], [0.0, 1.0], [1.0, 1.0]]), xp)
    assert classifier.logits_bound(x, w) == pytest.approx(50.0, rel=1e-12)
    rng = np.random.default_rng(0)
    for shape_x, shape_w in [((7, 5), (11, 5)), ((1, 3), (4, 3)), ((6, 1), (2, 1))]:
        x, w = draw(xp, rng, shape_x, 3.0), draw(xp, rng, shape_w, 3.0)
        assert classifier.logits_bound(x, w) >= float(abs(to_numpy(x) @ to_numpy(w).T).max())


def test_classifier_under_float16_matmuls_subtracts_the_row_max(xp):
    """Under float16 matmuls the exps are float16, whose largest value is 65504 = e^11.1: a logit
    of 20, far below EXP_SAFE_BOUND, would overflow unshifted, so the bound that lets float32 skip
    the row max must not be used there. The loss and both gradients stay finite and near float32's."""
    rng = np.random.default_rng(0)
    base = np.full(16, 1.6)                                    # |base|^2 = 41: every logit near 20,
    w = to_device(base + rng.normal(0.0, 0.3, (5, 16)), xp).astype(np.float32)   # apart by O(1)
    x = to_device(0.5 * base + rng.normal(0.0, 0.3, (6, 16)), xp).astype(np.float32)
    targets = to_device(np.array([0, 1, 2, 3, 4, 0]), xp)
    assert float((x @ w.T).min()) > 11.1 and classifier.logits_bound(x, w) < EXP_SAFE_BOUND
    ref_loss, _, (ref_dx, ref_dw) = classifier_forward(x, w, targets, return_logits=False)
    with precision.half_matmuls("float16"):
        loss, _, (dx, dw) = classifier_forward(x, w, targets, return_logits=False)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-2, abs=1e-3)
    assert relative_error(dx, ref_dx) < 1e-2 and relative_error(dw, ref_dw) < 1e-2


def test_classifier_under_float16_matmuls_keeps_the_gradient_of_confident_rows(xp):
    """Where the target's probability is near 1, a row's gradient softmax - onehot is near 0. It
    must be formed before a product is rounded to float16: (exps @ w) rounded, minus w[t] after,
    leaves float16's rounding of |w| (5e-4 of it), as large as the gradient itself. Reference: the
    float64 gradient of the same function, the float16-rounded logits of float16-rounded x and w."""
    rng = np.random.default_rng(0)
    N, V, C, scale = 64, 50, 16, 1024.0                       # scale: as the loss scaler's
    w = rng.normal(0.0, 1.0, (V, C)).astype(np.float32)
    targets = rng.integers(0, V, N)
    x = (1.5 * w[targets] + rng.normal(0.0, 0.1, (N, C))).astype(np.float32)   # the target's logit leads
    x16, w16 = (a.astype(np.float16).astype(np.float64) for a in (x, w))
    logits = (x16 @ w16.T).astype(np.float16).astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    confident = p[np.arange(N), targets] > 0.999               # 49 of the 64 rows
    assert confident.sum() > N // 2
    dlogits = p - np.eye(V)[targets]
    ref_dx, ref_dw = dlogits @ w16 / N, dlogits.T @ x16 / N
    with precision.half_matmuls("float16"):
        _, _, (dx, dw) = classifier_forward(to_device(x, xp), to_device(w, xp), to_device(targets, xp),
                                            return_logits=False, grad_scale=scale)
    dx, dw = to_numpy(dx) / scale, to_numpy(dw) / scale
    # 5e-4 here; 1.0 with the one-hot subtracted after the product (the rows' gradient is lost)
    assert relative_error(dx[confident], ref_dx[confident]) < 1e-2
    assert relative_error(dw, ref_dw) < 1e-2


@given(case=targets_case(force_ignored=True), C=sizes, seed=seeds)
def test_classifier_check_catches_per_chunk_mean(xp, case, C, seed, monkeypatch):
    N, V, targets = case
    rng = np.random.default_rng(seed)
    arrays = {"x": draw(xp, rng, (N, C)), "w": draw(xp, rng, (V, C))}
    monkeypatch.setattr(classifier, "CHUNK_ELEMENTS", dict.fromkeys(classifier.CHUNK_ELEMENTS, V))   # one row per chunk

    def per_chunk_mean(valid, n_valid):   # the chunking bug: each chunk normalised by its own kept rows
        return valid / max(int(valid.sum()), 1)

    monkeypatch.setattr(classifier, "row_weights", per_chunk_mean)
    grads = lambda d, cache: dict(zip(("x", "w"), classifier_backward(d, cache)))
    assert layer_mismatches(run_classifier(to_device(targets, xp)), grads, arrays, rng)
