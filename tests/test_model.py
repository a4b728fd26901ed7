"""The whole model: a float64 gradient check over drawn configurations (with its negative control),
properties a GPT must have, configuration errors, AdamW and clipping, generation."""

import dataclasses
import math
import weakref

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import cupy_standin
import numgpt
import numgpt.model
from gradcheck import gradient_mismatches
from numgpt import GPT, AdamW, ConfigError, GPTConfig, clip_grad_norm, foreach, kernels, no_decay_names
from numgpt.backend import cupy_available, get_xp, to_device, to_numpy
from numgpt.config import num_params
from numgpt.layers.activations import ACTIVATIONS
from numgpt.layers.embedding import embedding_backward
from numgpt.layers.layernorm import layernorm_forward
from numgpt.optim import clip_coefficient, global_norm

seeds = st.integers(0, 2**32 - 1)


@st.composite
def model_case(draw):
    n_head = draw(st.integers(1, 3))
    config = GPTConfig(vocab_size=draw(st.integers(2, 11)), block_size=draw(st.integers(1, 6)),
                       n_layer=draw(st.integers(1, 2)), n_head=n_head,
                       n_embd=n_head * draw(st.integers(1, 3)), dropout=draw(st.sampled_from([0.0, 0.2])),
                       bias=draw(st.booleans()), tie_weights=draw(st.booleans()),
                       activation=draw(st.sampled_from(sorted(ACTIVATIONS))))
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, config.block_size))
    return config, B, T


def scaled_model(config, backend, seed, scale):
    """A float64 model whose weights are scaled up: at GPT-2's init (0.02) many gradients sink
    under the finite-difference noise floor, and a check that cannot see them proves little."""
    model = GPT(config, backend=backend, dtype="float64", seed=seed)
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        p += to_device(rng.normal(0.0, scale, size=p.shape), model.xp)
    return model


def model_mismatches(model, idx, targets, rng, max_coords=16, loss_scale=1.0, names=None):
    """Gradient-check every parameter of `model` (or those `names`) on one batch; dropout masks are
    replayed exactly. The analytic pass runs with `loss_scale` (its gradients must still be those
    of the loss)."""
    dropout_state = model.dropout_rng.bit_generator.state

    def loss():
        model.dropout_rng.bit_generator.state = dropout_state
        return model.forward(idx, targets, requires_grad=False)[1]

    loss()                                      # draws the masks once more, then the analytic pass
    model.dropout_rng.bit_generator.state = dropout_state
    model.forward(idx, targets, loss_scale=loss_scale)
    grads = model.backward()
    assert list(grads) == list(model.params)
    checked = {name: model.params[name] for name in (names or model.params)}
    return gradient_mismatches(loss, checked, grads, rng, max_coords=max_coords)


def batch(config, B, T, rng):
    idx = rng.integers(0, config.vocab_size, size=(B, T))
    targets = rng.integers(0, config.vocab_size, size=(B, T))
    return idx, targets


@given(case=model_case(), scale=st.sampled_from([0.1, 0.5]), seed=seeds)
# layernorms over 2 channels with a variance near their eps: central differences at the default
# step err by 3e-5 of the gradient here, so the checker must re-measure them to higher order
@example(case=(GPTConfig(vocab_size=3, block_size=1, n_layer=2, n_head=1, n_embd=2, bias=False, tie_weights=False),
               2, 1), scale=0.1, seed=175)
def test_model_gradients(backend, case, scale, seed):
    config, B, T = case
    rng = np.random.default_rng(seed)
    model = scaled_model(config, backend, seed, scale)
    idx, targets = batch(config, B, T, rng)
    targets[0, 0] = -100                        # an ignored position takes part too
    if B * T == 1:
        targets[0, 0] = 0
    # On CuPy a few coordinates of every parameter check how the model composes the kernels, which
    # test_kernels checks one by one against their NumPy twins; on the stand-in, where each kernel
    # launch is emulated, 16 made this the suite's slowest test (32 s of CI's time, now ~9 s)
    assert not model_mismatches(model, idx, targets, rng, max_coords=16 if backend == "numpy" else 4)


@pytest.mark.parametrize("loss_scale", [3.0, 2.0 ** 20])
def test_model_gradients_under_a_loss_scale(backend, loss_scale):
    """A loss scale multiplies inside the backward and divides the finished gradients: checked in
    float64 against the unscaled loss, for a scale that is not a power of two (test_precision
    checks powers of two to the bit) and a large one, with dropout and an ignored target."""
    config = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=4, dropout=0.2, tie_weights=False)
    rng = np.random.default_rng(0)
    model = scaled_model(config, backend, 0, 0.5)
    idx, targets = batch(config, 2, 4, rng)
    targets[1, 2] = -100
    assert not model_mismatches(model, idx, targets, rng, max_coords=16, loss_scale=loss_scale)


@given(case=model_case(), seed=seeds)
def test_model_check_catches_fancy_index_embedding(backend, case, seed, monkeypatch):
    # Tiny drawn models can hide the bug (one channel: layernorm outputs its bias whatever came in;
    # dropout can zero one of the repeated rows), so the control widens them and turns dropout off.
    config = dataclasses.replace(case[0], n_embd=4 * case[0].n_head, block_size=max(3, case[0].block_size),
                                 dropout=0.0)
    rng = np.random.default_rng(seed)
    model = scaled_model(config, backend, seed, 0.5)
    idx, targets = batch(config, 1, config.block_size, rng)
    idx[:] = 0                                  # every position uses token 0: ids repeat

    def fancy_index_backward(dx, cache, dwte=None):   # `dwte[idx] += dx`: the last write wins
        _, dwpe = embedding_backward(dx, cache)
        if dwte is None:
            dwte = model.xp.zeros(cache[1], dtype=dx.dtype)
        dwte[cache[0].reshape(-1)] += dx.reshape(-1, dx.shape[-1])
        return dwte, dwpe

    monkeypatch.setattr(numgpt.model, "embedding_backward", fancy_index_backward)
    with kernels.disabled():   # they play no part in the bug; under the CUDA emulator they would cost a minute
        # wte alone: a control fails at every coordinate it draws, and each failure is measured again
        assert "wte.weight" in model_mismatches(model, idx, targets, rng, max_coords=64, names=["wte.weight"])


def test_causality(backend):
    """Changing the tokens after position t never changes the logits at or before t."""
    config = GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config, backend=backend, dtype="float64", seed=3).eval()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 50, size=(2, 12))
    for t in range(12):
        changed = idx.copy()
        changed[:, t + 1:] = rng.integers(0, 50, size=changed[:, t + 1:].shape)
        a, _ = model.forward(idx, requires_grad=False)
        b, _ = model.forward(changed, requires_grad=False)
        np.testing.assert_array_equal(to_numpy(a)[:, :t + 1], to_numpy(b)[:, :t + 1])


def test_layernorm_normalises(xp):
    x = to_device(np.random.default_rng(0).normal(3.0, 5.0, size=(4, 5, 64)), xp)
    y, _ = layernorm_forward(x, xp.ones(64), xp.zeros(64))
    np.testing.assert_allclose(to_numpy(y.mean(axis=-1)), 0.0, atol=1e-12)
    np.testing.assert_allclose(to_numpy(y.var(axis=-1)), 1.0, rtol=1e-5)


def test_layernorm_is_gpt2s_formula_with_eps_1e_5():
    """Rows of std 0.01, whose variance (1e-4) is not far above eps: an eps other than GPT-2's 1e-5
    (1e-4, 1e-6), or eps outside the square root, moves y by far more than the tolerance."""
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(3.0, 0.01, (4, 64)), rng.normal(1.0, 0.1, 64), rng.normal(0.0, 0.1, 64)
    mean, var = x.mean(axis=-1, keepdims=True), x.var(axis=-1, keepdims=True)
    y, _ = layernorm_forward(x, w, b)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * w + b, rtol=1e-9, atol=1e-12)


def test_initial_loss_is_near_log_vocab(backend):
    config = GPTConfig(vocab_size=500, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config, backend=backend, seed=0)
    idx, targets = batch(config, 4, 16, np.random.default_rng(0))
    _, loss = model.forward(idx, targets)
    assert abs(loss - math.log(500)) < 0.1


def test_init_follows_gpt2(backend):
    """Every weight matrix is normal with std 0.02, except both residual projections of every
    block (attn.c_proj and mlp.c_proj), scaled by 1/sqrt(2 n_layer); every bias is 0 and every
    layernorm gain 1. The seed picks the draw."""
    config = GPTConfig(vocab_size=1000, block_size=64, n_layer=4, n_head=4, n_embd=128)
    p = {k: to_numpy(v) for k, v in GPT(config, backend=backend, seed=0).params.items()}
    for name, value in p.items():
        if name.endswith(".bias"):
            assert not np.any(value), name
        elif ".ln_" in name or name.startswith("ln_f."):
            assert np.all(value == 1), name
        else:
            std = 0.02 / math.sqrt(8) if name.endswith("c_proj.weight") else 0.02
            assert value.std() == pytest.approx(std, rel=0.05), name
    again, other = (GPT(config, backend=backend, seed=seed).params["h.3.attn.c_proj.weight"] for seed in (0, 1))
    np.testing.assert_array_equal(to_numpy(again), p["h.3.attn.c_proj.weight"])
    assert not np.array_equal(to_numpy(other), p["h.3.attn.c_proj.weight"])


@pytest.mark.parametrize("tie_weights", [True, False])
def test_the_parameter_count_counts_every_parameter_once(tie_weights):
    """config.num_params (a formula: train.py's memory check) and GPT.num_params (the count the
    scripts print) agree with the parameters a model holds, and with GPT-2 small's 124,439,808."""
    assert num_params(GPTConfig()) == 124_439_808
    config = GPTConfig(vocab_size=11, block_size=4, n_layer=3, n_head=2, n_embd=4, tie_weights=tie_weights)
    model = GPT(config)
    assert model.num_params() == num_params(config) == sum(p.size for p in numgpt.model.init_params(config).values())


def test_float32_end_to_end(backend):
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.1)
    model = GPT(config, backend=backend)
    idx, targets = batch(config, 2, 8, np.random.default_rng(0))
    logits, _ = model.forward(idx, targets)
    grads = model.backward()
    assert logits.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())
    opt = AdamW(model.params, lr=1e-3)
    opt.step(grads)
    assert all(p.dtype == np.float32 for p in model.params.values())


def test_the_loss_can_stay_on_the_device(backend, monkeypatch):
    """forward(loss_on_device=True) hands back the 0-d value the loss was computed in (reading a
    GPU's would wait for the forward) and equals the float; the kept targets are counted on the
    host where the batch came from, and handed to the classifier, which then counts nothing."""
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = GPT(config, backend=backend)
    idx, targets = batch(config, 2, 8, np.random.default_rng(0))
    targets[0, :3] = -100
    counted = []
    classifier_forward = numgpt.model.classifier_forward
    monkeypatch.setattr(numgpt.model, "classifier_forward",
                        lambda *a, **kw: counted.append(kw["n_valid"]) or classifier_forward(*a, **kw))
    _, loss = model.forward(idx, targets, loss_on_device=True)
    _, loss_float = model.forward(idx, targets)
    assert loss.shape == () and loss.dtype == np.float32 and isinstance(loss_float, float)   # a float has no shape
    assert float(loss) == loss_float and counted == [13, 13]


def test_a_host_batch_reaches_the_model_in_one_transfer(backend, monkeypatch):
    """forward(x, y) with both on the host checks them there and moves them to a GPU model in one
    copy (the pair stacked), not one per array; a NumPy model copies nothing."""
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = GPT(config, backend=backend)
    idx, targets = batch(config, 2, 8, np.random.default_rng(0))
    moved = []
    monkeypatch.setattr(numgpt.model, "to_device", lambda x, xp, dtype=None: (
        moved.append(x.shape) if isinstance(x, np.ndarray) and xp is not np else None) or to_device(x, xp, dtype))
    _, loss = model.forward(idx, targets)
    assert moved == ([] if backend == "numpy" else [(2, 2, 8)])
    monkeypatch.undo()
    assert loss == model.forward(to_device(idx, model.xp), to_device(targets, model.xp))[1]


def cached_arrays(cache, params):
    """The arrays that own the memory of every array in a forward's cache, each once, the
    parameters left out."""
    found, todo = {}, [cache]
    while todo:
        item = todo.pop()
        if isinstance(item, np.ndarray):
            while isinstance(item.base, np.ndarray):
                item = item.base
            if not any(item is p for p in params.values()):
                found[id(item)] = item
        elif isinstance(item, (tuple, list)):
            todo.extend(item)
    return list(found.values())


def test_a_forward_keeps_only_what_the_backward_reads():
    """Per layer and token the backward reads 16 C numbers: the normalised inputs of ln_1 and ln_2
    and their outputs (4 C), q, k and v (3 C), the heads' output (C), the MLP's hidden layer before
    and after GELU (8 C); and each head's T attention probabilities, and each layernorm's 1/std.
    A copy beside those (as q scaled beside qkv was) costs C numbers a token in every layer:
    36 MiB per 1024 tokens at GPT-2 124M."""
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = GPT(config)
    B, T, C, nh = 3, 8, config.n_embd, config.n_head
    model.forward(*batch(config, B, T, np.random.default_rng(0)), return_logits=False)
    block_caches = model._cache[2]
    kept = sum(a.nbytes for a in cached_arrays(block_caches, model.params))
    assert kept == config.n_layer * B * T * (16 * C + nh * T + 2) * 4


def test_no_layers_activations_outlive_their_use(monkeypatch):
    """A forward without a backward to follow (evaluation: requires_grad=False) holds one block's
    activations at a time, not every layer's (at GPT-2 124M, batch 1 x 1024: 1.2 GiB, which
    evaluation held on top of the training state); the backward holds them all to its end (freeing
    each once read cost the next step 1.8%: see GPT.backward), and not beyond it."""
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=3, n_head=2, n_embd=8)
    model = GPT(config)
    idx, targets = batch(config, 2, 8, np.random.default_rng(0))
    refs, alive_at_each_block = [], []
    block_forward, block_backward = numgpt.model.block_forward, numgpt.model.block_backward

    def alive():
        return [i for i, arrays in enumerate(refs) if any(ref() is not None for ref in arrays)]

    def forward_spy(*args, **kwargs):
        alive_at_each_block.append(alive())
        y, cache = block_forward(*args, **kwargs)
        refs.append([weakref.ref(a) for a in cached_arrays(cache, model.params)])
        return y, cache

    def backward_spy(dy, cache):
        alive_at_each_block.append(alive())
        return block_backward(dy, cache)

    monkeypatch.setattr(numgpt.model, "block_forward", forward_spy)
    monkeypatch.setattr(numgpt.model, "block_backward", backward_spy)
    for requires_grad in (False, True):
        refs.clear(), alive_at_each_block.clear()
        _, loss = model.forward(idx, targets, requires_grad=requires_grad)
        if requires_grad:
            assert alive() == [0, 1, 2]
            model.backward()
            assert alive_at_each_block == [[], [0], [0, 1], [0, 1, 2], [0, 1, 2], [0, 1, 2]] and alive() == []
        else:
            assert alive_at_each_block == [[], [], []] and alive() == []
    with model.evaluating():   # the model's own loss as evaluate sees it
        assert model.forward(idx, targets, requires_grad=False)[1] == loss


def test_float32_agrees_with_float64(backend):
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)
    m32, m64 = (GPT(config, backend=backend, dtype=d, seed=1) for d in ("float32", "float64"))
    idx, targets = batch(config, 2, 8, np.random.default_rng(0))
    _, l32 = m32.forward(idx, targets)
    _, l64 = m64.forward(idx, targets)
    g32, g64 = m32.backward(), m64.backward()
    assert l32 == pytest.approx(l64, rel=1e-5)
    for name in g64:
        ref = to_numpy(g64[name])
        assert np.abs(to_numpy(g32[name]) - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-9, name


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=10, n_head=3), "divisible"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_head=True), "n_head"),   # Python's True is an int, and 4 % True == 0
    (dict(vocab_size=-5), "vocab_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(activation="swish"), "activation"),
    (dict(bias="yes"), "bias"),
    (dict(tie_weights="no"), "tie_weights"),   # a non-empty string is true
])
def test_invalid_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**{**dict(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_embd=4), **kwargs})


def test_bad_inputs_are_clear_errors():
    model = GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4))
    for T in (5, 0):   # beyond block_size, and none at all
        with pytest.raises(ConfigError, match="positions; this model takes 1 to block_size = 4"):
            model.forward(np.zeros((1, T), dtype=np.int64))
    with pytest.raises(ConfigError, match="0 positions; this model takes at least 1$"):   # generate crops, any T
        model.generate(np.zeros((1, 0), dtype=np.int64), max_new_tokens=1)
    for bad_id in (10, -1):   # -1 would index the last row of wte, silently
        with pytest.raises(ConfigError, match="idx holds ids outside"):
            model.forward(np.array([[1, bad_id]]))
        with pytest.raises(ConfigError, match="targets holds ids outside"):   # -1 would train the last id
            model.forward(np.array([[1, 2]]), np.array([[2, bad_id]]))
    model.forward(np.array([[1, 2]]), np.array([[2, -100]]))   # -100 is ignore_index, not an id
    with pytest.raises(ConfigError, match="shape"):
        model.forward(np.array([1, 2]))
    with pytest.raises(ConfigError, match="integer"):
        model.forward(np.array([[1.0, 2.0]]))
    with pytest.raises(ConfigError, match="backend"):
        GPT(model.config, backend="tpu")
    with pytest.raises(ConfigError, match="dtype"):
        GPT(model.config, dtype="float16")
    for kwargs in (dict(), dict(targets=np.array([[2, 3]]), requires_grad=False)):   # nothing to differentiate
        model.forward(np.array([[1, 2]]), **kwargs)
        with pytest.raises(RuntimeError, match="forward"):
            model.backward()
    with pytest.raises(ConfigError, match="targets must have idx's shape"):
        model.forward(np.array([[1, 2]]), np.array([[2], [3]]))   # the same numbers, in another shape
    for loss_scale in (0.0, float("nan"), float("inf"), True):   # backward divides by it
        with pytest.raises(ConfigError, match="loss_scale"):
            model.forward(np.array([[1, 2]]), np.array([[2, 3]]), loss_scale=loss_scale)
    model.forward(np.array([[1, 2]]), np.array([[2, 3]]), loss_scale=np.float32(2.0))


def test_the_auto_backend_is_cupy_where_a_gpu_is_usable(backend, monkeypatch):
    """backend="auto" (train.py's default) takes CuPy when cupy_available() says a GPU is usable, as
    with the stand-in for CuPy installed, and NumPy when not."""
    assert get_xp("auto") is (get_xp("cupy") if cupy_available() else np)
    monkeypatch.setattr(numgpt.backend, "cupy_available", lambda: False)
    assert get_xp("auto") is np


def test_backend_cupy_says_what_is_missing_and_how_to_install_it(monkeypatch):
    """--backend cupy where CuPy cannot run names the reason and the fix: CuPy not installed, or
    installed but broken, no GPU, or a GPU without NVRTC (a driver-only machine: CuPy imports and
    sees the GPU, then every kernel fails to compile at its first use). "auto" then takes NumPy."""
    cupy_standin.install(monkeypatch)                 # imports, sees a GPU, finds NVRTC
    assert get_xp("cupy") is cupy_standin.cupy and get_xp("auto") is cupy_standin.cupy
    cupy_standin.remove_nvrtc(monkeypatch)
    with pytest.raises(ConfigError, match=r"cannot load NVRTC.*libnvrtc\.so\.12.*cupy-cuda12x\[ctk\].*--backend numpy"):
        get_xp("cupy")
    assert get_xp("auto") is np
    monkeypatch.setattr(cupy_standin.MODULES["cupy.cuda.runtime"], "getDeviceCount", lambda: 0)
    with pytest.raises(ConfigError, match="CuPy sees no GPU. "):
        get_xp("cupy")
    monkeypatch.setattr(numgpt.backend, "_cupy", None)
    monkeypatch.setattr(numgpt.backend, "_cupy_import_error", ModuleNotFoundError("No module named 'cupy'"))
    with pytest.raises(ConfigError, match="CuPy is not installed. "):
        get_xp("cupy")
    monkeypatch.setattr(numgpt.backend, "_cupy_import_error", RuntimeError("libcublas.so.12: no such file"))
    with pytest.raises(ConfigError, match=r"does not import \(libcublas\.so\.12"):
        get_xp("cupy")
    assert get_xp("auto") is np


def test_to_device_casts_to_the_dtype_it_is_given(xp):
    """to_device(x, xp, dtype) gives the array in `dtype`, from a list, a host array or a device array."""
    for x in ([1.5, 2.0], np.array([1.5, 2.0]), to_device(np.array([1.5, 2.0]), xp)):
        a = to_device(x, xp, dtype=np.float32)
        assert a.dtype == np.float32 and to_numpy(a).tolist() == [1.5, 2.0]


def test_params_that_do_not_fit_the_config_are_refused():
    config = GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4)
    params = GPT(config).params
    with pytest.raises(ConfigError, match=r"missing \['ln_f.bias'\]") as refused:
        GPT(config, params={name: p for name, p in params.items() if name != "ln_f.bias"})
    assert "unexpected" not in str(refused.value)                              # an empty list is not named
    with pytest.raises(ConfigError, match=r"unexpected \['lm_head.weight'\]") as refused:
        GPT(config, params={**params, "lm_head.weight": params["wte.weight"]})   # the config ties them
    assert "missing" not in str(refused.value)
    extra = {f"extra{i}": params["wte.weight"] for i in range(6)}
    with pytest.raises(ConfigError, match=r"missing \['ln_f.bias'\], unexpected \[(.*, ){4}.*\] and more"):
        GPT(config, params={**{k: v for k, v in params.items() if k != "ln_f.bias"}, **extra})
    with pytest.raises(ConfigError, match=r"'ln_f.bias'\] has shape \(1,\)"):
        GPT(config, params={**params, "ln_f.bias": np.zeros(1)})   # would broadcast in forward, silently
    with pytest.raises(ConfigError, match=r"'h.0.attn.c_attn.weight'\] has shape \(12, 4\)"):
        GPT(config, params={**params, "h.0.attn.c_attn.weight": params["h.0.attn.c_attn.weight"].T})   # nn.Linear's


def test_a_model_owns_copies_of_the_params_it_is_given():
    """Training updates the parameters in place: a model built from another's parameters (or a
    checkpoint's arrays) must not train them too."""
    config = GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4)
    original = GPT(config)
    copy = GPT(config, params=original.params)
    for name, p in copy.params.items():
        p += 1.0
        assert not np.any(original.params[name] == p), name


def test_dropout_only_in_training_mode(backend):
    config = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.5)
    model = GPT(config, backend=backend, seed=0)
    idx = np.arange(8).reshape(1, 8)
    a, b = (to_numpy(model.forward(idx)[0]) for _ in range(2))
    assert not np.allclose(a, b)                # two different masks
    other_seed = GPT(config, backend=backend, seed=1, params=model.params)
    assert not np.allclose(to_numpy(other_seed.forward(idx)[0]), a)   # the seed picks the masks too
    model.eval()
    c, d = (to_numpy(model.forward(idx)[0]) for _ in range(2))
    np.testing.assert_array_equal(c, d)


class RecordingGenerator:
    """A NumPy Generator that records the shape of every array of uniform numbers drawn from it."""

    def __init__(self, rng):
        self.rng, self.shapes = rng, []

    def random(self, shape, **kwargs):
        self.shapes.append(tuple(shape))
        return self.rng.random(shape, **kwargs)


def test_dropout_masks_are_drawn_where_gpt2_draws_them():
    """In training mode a mask is drawn for the embeddings' sum, then in every block for the
    attention probabilities and for each residual branch (after attn.c_proj, after the MLP). A
    dropout left out would pass the gradient check: its backward leaves out the same mask."""
    config = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.1)
    model = GPT(config, seed=0)
    model.dropout_rng = RecordingGenerator(model.dropout_rng)
    B, T, C, nh = 3, 5, config.n_embd, config.n_head
    model.forward(np.zeros((B, T), dtype=np.int64))
    assert model.dropout_rng.shapes == [(B, T, C)] + [(B, nh, T, T), (B, T, C), (B, T, C)] * config.n_layer


# ---------------------------------------------------------------- AdamW and clipping

def reference_adamw(p, grads_seq, lr, b1, b2, eps, wd):
    """AdamW written out the textbook way, in float64, one array."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads_seq, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


@pytest.mark.parametrize("cpu_block", [None, 5])
def test_adamw_matches_the_textbook_update(xp, monkeypatch, cpu_block):
    """cpu_block 5: the CPU updates a parameter in cache-sized blocks (65,536 elements), which
    these (3,4) parameters would fit in one of; blocks of 5, 5 and 2 check that each is updated."""
    if cpu_block:
        monkeypatch.setattr(numgpt.backend, "CPU_BLOCK", cpu_block)
    rng = np.random.default_rng(0)
    start = rng.normal(size=(3, 4))
    grads_seq = [rng.normal(size=(3, 4)) for _ in range(5)]
    params = {"w": to_device(start.copy(), xp), "b": to_device(start[0].copy(), xp)}
    opt = AdamW(params, lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, exclude_from_decay={"b"})
    for g in grads_seq:
        opt.step({"w": to_device(g, xp), "b": to_device(g[0], xp)})
    np.testing.assert_allclose(to_numpy(params["w"]), reference_adamw(start, grads_seq, 0.1, 0.8, 0.9, 1e-6, 0.1),
                               rtol=1e-12)
    np.testing.assert_allclose(to_numpy(params["b"]),
                               reference_adamw(start[0], [g[0] for g in grads_seq], 0.1, 0.8, 0.9, 1e-6, 0.0),
                               rtol=1e-12)


def test_adamw_rejects_bad_hyperparameters():
    params = {"w": np.zeros(3)}
    for kwargs in (dict(lr=0), dict(lr=-1e-3), dict(lr=1e-3, betas=(0.9, 1.0)), dict(lr=1e-3, eps=0),
                   dict(lr=1e-3, weight_decay=-1), dict(lr=1e-3, exclude_from_decay={"nope"}),
                   dict(lr=float("inf")), dict(lr=True), dict(lr=1e-3, betas=(0.9,)),
                   dict(lr=1e-3, eps=float("inf")), dict(lr=1e-3, weight_decay=float("inf")),
                   dict(lr=1e-3, eps=True), dict(lr=1e-3, weight_decay=True), dict(lr=1e-3, betas=(False, 0.9)),
                   dict(lr=1e-3, eps="1e-8")):
        with pytest.raises(ConfigError):
            AdamW(params, **kwargs)
    AdamW(params, lr=np.float32(1e-3), betas=(np.float32(0.9), 0.999), eps=np.float32(1e-8),
          weight_decay=np.float32(0.1))   # NumPy's numbers are numbers


def test_adamw_takes_betas_of_zero_and_refuses_parameters_it_cannot_update_in_place():
    """Betas lie in [0, 1), as torch's: beta = 0 (no momentum) is allowed. A parameter that is not
    C-contiguous (a transposed view) is refused: reshape(-1) would copy it, and every update would
    go to the copy while the parameter stayed as it was."""
    AdamW({"w": np.zeros(3)}, lr=1e-3, betas=(0.0, 0.0))
    w = np.zeros((4, 3))
    with pytest.raises(ConfigError, match="C-contiguous"):
        AdamW({"w": w.T}, lr=1e-3)


def test_adamw_keeps_each_parameters_precision_when_dtypes_mix(xp):
    """The update's scratch buffer is shared between parameters: a float64 parameter updated after
    a float32 one must not be computed in the float32 buffer (nor the other way round). The float64
    one follows the textbook update as closely as when it is alone."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=(3, 4))
    grads_seq = [rng.normal(size=(3, 4)) for _ in range(3)]
    params = {"single": to_device(start.astype(np.float32), xp), "double": to_device(start.copy(), xp)}
    opt = AdamW(params, lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for g in grads_seq:
        opt.step({"single": to_device(g.astype(np.float32), xp), "double": to_device(g, xp)})
    assert params["single"].dtype == np.float32 and params["double"].dtype == np.float64
    expected = reference_adamw(start, grads_seq, 0.1, 0.8, 0.9, 1e-6, 0.1)
    np.testing.assert_allclose(to_numpy(params["double"]), expected, rtol=1e-12)


def test_adamw_refuses_a_state_whose_moments_do_not_match_its_parameters():
    """A saved state is checked before anything is copied: either moment naming other parameters
    than this optimizer's (here only the second) is a ConfigError, and the step count stays."""
    opt = AdamW({"w": np.zeros(3), "b": np.zeros(2)}, lr=1e-3)
    state = {"step": 7, "m": {"w": np.ones(3), "b": np.ones(2)}, "v": {"w": np.ones(3)}}
    with pytest.raises(ConfigError, match="does not match"):
        opt.load_state_dict(state)
    assert opt.step_count == 0 and not opt.m["w"].any()


def test_adamw_refuses_gradients_and_moments_of_another_shape_than_their_parameters():
    """The update works on flat views, so a gradient of the parameter's size but another shape (a
    (3, 4) weight's gradient transposed) or one that broadcasts ((1,)) used to update the parameter
    silently with the wrong numbers; a (1,) moment in a saved state was broadcast over the
    parameter. Each is a ConfigError now, before anything changes."""
    params = {"w": np.zeros((3, 4)), "b": np.zeros(4)}
    opt = AdamW(params, lr=1e-3)
    for bad in ({"w": np.ones((4, 3)), "b": np.ones(4)}, {"w": np.ones((3, 4)), "b": np.ones(1)}):
        with pytest.raises(ConfigError, match="shape"):
            opt.step(bad)
    assert opt.step_count == 0 and not params["w"].any() and not params["b"].any()
    state = {"step": 7, "m": {"w": np.ones((3, 4)), "b": np.ones(1)}, "v": {"w": np.ones((3, 4)), "b": np.ones(4)}}
    with pytest.raises(ConfigError, match="shape"):
        opt.load_state_dict(state)
    assert opt.step_count == 0 and not opt.m["w"].any()


@pytest.mark.parametrize("clip", [clip_grad_norm, clip_coefficient])
def test_clipping_rejects_a_max_norm_that_is_not_positive(clip):
    grads = {"w": np.array([3.0, 4.0])}
    for max_norm in (-1.0, 0.0, float("nan")):   # -1 would flip the gradients, NaN skip the clipping
        with pytest.raises(ConfigError, match="max_norm"):
            clip(grads, max_norm)
    np.testing.assert_array_equal(grads["w"], [3.0, 4.0])
    assert float(clip(grads, float("inf"))) in (5.0, 1.0)   # never clips: the norm, or the coefficient 1
    assert float(clip(grads, np.float32(10.0))) in (5.0, 1.0)   # NumPy's numbers are numbers


@pytest.mark.parametrize("clip", [clip_grad_norm, clip_coefficient, lambda grads, _: global_norm(grads)])
def test_clipping_no_gradients_is_a_clear_error(clip):
    """An empty dict (a wrong argument, most likely) is named, not a bare StopIteration."""
    with pytest.raises(ConfigError, match="grads is empty"):
        clip({}, 1.0)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_no_decay_names_follow_nanogpt(tie_weights):
    """nanoGPT decays every parameter of 2 or more dimensions: the embeddings and, tied or not, the
    output layer too; the biases and layernorms are not decayed."""
    model = GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4, tie_weights=tie_weights))
    names = no_decay_names(model.params)
    assert names == {name for name in model.params if name.endswith(".bias") or "ln_" in name}
    assert {"ln_f.weight", "h.0.ln_1.weight", "h.0.ln_2.bias", "h.0.attn.c_attn.bias"} <= names
    decayed = set(model.params) - names
    assert {"wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"} <= decayed
    assert tie_weights or "lm_head.weight" in decayed


def test_clip_grad_norm(xp):
    grads = {"a": to_device(np.array([3.0, 0.0]), xp), "b": to_device(np.array([[4.0]]), xp)}
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    total = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    assert total == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm(grads, 10.0) == pytest.approx(1.0, rel=1e-5)   # under the limit: untouched
    np.testing.assert_allclose(to_numpy(grads["a"]), [3.0 / (5.0 + 1e-6), 0.0], rtol=1e-12)


def test_the_gradient_norm_is_summed_in_float64(xp):
    """Float32 gradients' squares are summed in float64, as optim and foreach promise. The values
    are multiples of 1/64, whose float32 squares are exact, so a float64 sum is exact too, in any
    order. Summed in float32, their total of about 2^19, where float32's spacing is 1/16, cannot
    hold the squares' 1/4096ths."""
    rng = np.random.default_rng(0)
    ks = [rng.integers(-1000, 1001, size=shape) for shape in [(4000,), (50, 80)]]
    grads = {name: to_device((k / 64).astype(np.float32), xp) for name, k in zip("ab", ks)}
    exact = sum(int((k * k).sum()) for k in ks) / 4096        # Python integers: no rounding at all
    total = foreach.sum_of_squares(list(grads.values()))
    assert total.dtype == np.float64 and float(total) == exact
    assert clip_coefficient(grads, 1.0).dtype == np.float64
    assert clip_grad_norm(grads, math.inf) == math.sqrt(exact)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])   # clipping, and a limit above the norm
def test_clipping_inside_adamw_is_clipping_then_adamw(xp, max_norm):
    """train.py hands clipping's coefficient to AdamW (on a GPU it stays on the device): the
    parameters come out as after clip_grad_norm and a plain step, to the bit."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 5)), "b": rng.standard_normal(5)}
    grads = {name: rng.standard_normal(p.shape) for name, p in params.items()}
    results = []
    for inside in (True, False):
        ps = {name: to_device(p.astype(np.float32), xp) for name, p in params.items()}
        opt = AdamW(ps, lr=0.1, weight_decay=0.1)
        for step in range(2):
            gs = {name: to_device(g.astype(np.float32) * (step + 1), xp) for name, g in grads.items()}
            if inside:
                opt.step(gs, grad_scale=clip_coefficient(gs, max_norm))
            else:
                clip_grad_norm(gs, max_norm)
                opt.step(gs)
        results.append({name: to_numpy(p) for name, p in ps.items()})
    for name in params:
        np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)


def test_training_reduces_loss(backend):
    """A few hundred AdamW steps memorise a short repeating sequence."""
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config, backend=backend, seed=0)
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.0)
    seq = np.tile(np.arange(5), 4)
    idx, targets = seq[None, :8], seq[None, 1:9]
    _, first = model.forward(idx, targets)
    for _ in range(100):
        _, loss = model.forward(idx, targets)
        opt.step(model.backward())
    assert loss < 0.05 < first


# ---------------------------------------------------------------- generation

def test_generate_greedy_and_seeded(backend):
    config = GPTConfig(vocab_size=40, block_size=6, n_layer=1, n_head=2, n_embd=8)
    model = GPT(config, backend=backend, seed=0)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    greedy = model.generate(prompt, 10, temperature=0)
    assert greedy.shape == (2, 13) and np.array_equal(to_numpy(greedy)[:, :3], prompt)
    assert np.array_equal(to_numpy(greedy), to_numpy(model.generate(prompt, 10, temperature=0)))
    a = to_numpy(model.generate(prompt, 10, seed=7))
    b = to_numpy(model.generate(prompt, 10, seed=7))
    c = to_numpy(model.generate(prompt, 10, seed=8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert model.training                       # generate restores the mode it found


def test_generate_greedy_is_argmax_of_forward():
    config = GPTConfig(vocab_size=40, block_size=6, n_layer=1, n_head=2, n_embd=8)
    model = GPT(config, dtype="float64", seed=0).eval()
    out = model.generate([[1, 2]], 8, temperature=0)   # runs past block_size: the context is cropped
    for t in range(2, out.shape[1]):
        context = out[:, max(0, t - config.block_size):t]
        logits, _ = model.forward(context)
        assert out[0, t] == logits[0, -1].argmax()


def test_generate_rejects_bad_sampling_values():
    model = GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4))
    for kwargs in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ConfigError):
            model.generate([[1]], 2, **kwargs)
    with pytest.raises(ConfigError):
        model.generate([[1]], -1)


def test_generate_checks_seeds_and_ids_and_takes_numpy_numbers():
    config = GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model = GPT(config)
    for seed in (-1, 1.5, "a", True):
        with pytest.raises(ConfigError, match="seed"):
            model.generate([[1]], 2, seed=seed)
        with pytest.raises(ConfigError, match="seed"):
            GPT(config, seed=seed)
    with pytest.raises(ConfigError, match="idx must be a \\(batch, time\\) array"):
        model.generate([[1, 2], [3]], 2)   # rows of different lengths
    out = model.generate([[1]], np.int64(2), temperature=np.float32(0.5), top_p=np.float32(0.9), seed=np.int64(0))
    np.testing.assert_array_equal(out, model.generate([[1]], 2, temperature=0.5, top_p=0.9, seed=0))
