"""Generation with a KV cache: the cached path gives the uncached path's tokens exactly (greedy and
seeded sampling, batched, prompts and generations longer than block_size), its logits are the
full forward's, and the streaming API and attention maps behave."""

import numpy as np
import pytest

import cupy_standin
import numgpt.model
from numgpt import GPT, ConfigError, GPTConfig
from numgpt.backend import to_device, to_numpy
from numgpt.layers.attention import KVCache, causal_softmax

CONFIG = GPTConfig(vocab_size=61, block_size=8, n_layer=2, n_head=2, n_embd=16)


def signal_model(backend, config=CONFIG, seed=0, dtype="float64"):
    """A model moved off its init: at GPT-2's 0.02 the logits are nearly uniform and ties between
    tokens would make 'the same tokens' a weak statement."""
    model = GPT(config, backend=backend, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.params.values():
        p += to_device(rng.normal(0.0, 0.3, size=p.shape), model.xp, dtype=p.dtype)
    return model


def prompts(B, T, seed=1):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=(B, T))


# ---------------------------------------------------------------- the layer pieces

def test_rectangular_causal_softmax_is_the_last_rows_of_the_square(xp):
    scores = to_device(np.random.default_rng(0).normal(size=(2, 3, 7, 7)), xp)
    full = to_numpy(causal_softmax(scores.copy()))
    for Tq in (1, 3, 7):
        np.testing.assert_allclose(to_numpy(causal_softmax(scores[..., -Tq:, :].copy())), full[..., -Tq:, :],
                                   rtol=1e-15, atol=0)


def test_kv_cache_appends_and_refuses_to_overflow(xp):
    cache = KVCache(xp, (1, 2, 4, 3), "float64")
    k, v = (to_device(np.full((1, 2, 3, 3), fill), xp) for fill in (1.0, 2.0))
    keys, values = cache.append(k, v)
    assert cache.length == 3 and keys.shape == (1, 2, 3, 3) and float(values.sum()) == 2.0 * 18
    keys, _ = cache.append(k[:, :, :1] * 5, v[:, :, :1])
    assert keys.shape == (1, 2, 4, 3) and np.all(to_numpy(keys[:, :, 3]) == 5)
    with pytest.raises(ValueError, match="do not fit"):
        cache.append(k[:, :, :1], v[:, :, :1])


# ---------------------------------------------------------------- decode against forward

def test_decode_logits_are_the_forward_logits(backend):
    model = signal_model(backend)
    tokens = prompts(3, CONFIG.block_size)
    reference = to_numpy(model.eval().forward(tokens)[0])                     # (B,T,V)
    caches = model.empty_kv_caches(3)
    for start, stop in ((0, 5), (5, 6), (6, 8)):                              # a prefill, then single steps
        logits = to_numpy(model.decode(tokens[:, start:stop], caches))       # (B,V)
        np.testing.assert_allclose(logits, reference[:, stop - 1], rtol=0, atol=1e-12)
    assert caches[0].length == CONFIG.block_size
    with pytest.raises(ValueError, match="at most block_size"):   # not NumPy's broadcasting error
        model.decode(tokens[:, :1], caches)


def test_decode_checks_its_ids_and_caches_as_forward_checks_a_batch():
    """decode is public: it used to take a batch of 1 into 2-row caches (the keys broadcast into
    both rows, and logits for 2 rows came back), fewer caches than layers (the last layers skipped),
    negative ids (wte[-1], silently) and, as an AttributeError, a list. Each is now refused before
    any cache changes; a list is taken, as forward and generate take one."""
    model = signal_model("numpy")
    for idx, caches, error in ((np.zeros((1, 2), int), model.empty_kv_caches(2), "rows"),
                               (np.zeros((2, 2), int), model.empty_kv_caches(2)[:1], "n_layer"),
                               (np.full((2, 2), -1), model.empty_kv_caches(2), "outside"),
                               (np.zeros((2, 2)), model.empty_kv_caches(2), "integer")):
        with pytest.raises(ValueError, match=error):
            model.decode(idx, caches)
        assert all(cache.length == 0 for cache in caches)
    np.testing.assert_array_equal(model.decode([[1, 2]], model.empty_kv_caches(1)),
                                  model.decode(np.array([[1, 2]]), model.empty_kv_caches(1)))
    with pytest.raises(ValueError, match="KV cache holds"):   # the layer's own check
        KVCache(np, (2, 2, 4, 3), "float64").append(np.zeros((1, 2, 1, 3)), np.zeros((1, 2, 1, 3)))


def test_attention_maps_are_causal_distributions(backend):
    model = signal_model(backend)
    maps = model.attention_maps(prompts(2, 6))
    assert len(maps) == CONFIG.n_layer
    for att in map(to_numpy, maps):
        assert att.shape == (2, CONFIG.n_head, 6, 6)
        np.testing.assert_allclose(att.sum(axis=-1), 1.0, rtol=1e-12)
        assert np.all(np.triu(att, k=1) == 0)                                  # no position sees its future


def test_the_residual_stream_starts_at_the_embeddings_and_leads_to_the_logits(backend):
    model = signal_model(backend)
    tokens = prompts(2, 6)
    stream = [to_numpy(x) for x in model.residual_stream(tokens)]
    assert len(stream) == CONFIG.n_layer + 1 and all(x.shape == (2, 6, CONFIG.n_embd) for x in stream)
    p = {name: to_numpy(value) for name, value in model.params.items()}
    np.testing.assert_allclose(stream[0], p["wte.weight"][tokens] + p["wpe.weight"][:6], rtol=0, atol=1e-15)
    last = stream[-1]
    xhat = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + 1e-5)
    logits = (xhat * p["ln_f.weight"] + p["ln_f.bias"]) @ p["wte.weight"].T       # the tied output layer
    np.testing.assert_allclose(logits, to_numpy(model.eval().forward(tokens)[0]), rtol=0, atol=1e-12)


def test_the_residual_stream_has_no_dropout_in_training_mode_either(backend):
    model = signal_model(backend, config=GPTConfig(**{**CONFIG.to_dict(), "dropout": 0.5})).train()
    stream = [to_numpy(x) for x in model.residual_stream(prompts(2, 6))]
    evaluated = [to_numpy(x) for x in model.eval().residual_stream(prompts(2, 6))]
    for x, y in zip(stream, evaluated):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- cached == uncached

SAMPLING = {"greedy": dict(temperature=0),
            "seeded": dict(seed=7),
            "top-k/top-p": dict(seed=3, temperature=0.8, top_k=10, top_p=0.9)}


@pytest.mark.parametrize("sampling", list(SAMPLING.values()), ids=list(SAMPLING))
@pytest.mark.parametrize("B, T, new", [(1, 1, 5), (3, 4, 3), (3, 4, 12), (2, 11, 6)],
                         ids=["one-token-prompt", "batched", "past-block-size", "prompt-longer-than-block"])
def test_cache_gives_the_uncached_tokens(backend, B, T, new, sampling):
    model = signal_model(backend)
    prompt = prompts(B, T)
    cached = to_numpy(model.generate(prompt, new, **sampling))
    uncached = to_numpy(model.generate(prompt, new, use_cache=False, **sampling))
    assert cached.shape == (B, T + new)
    np.testing.assert_array_equal(cached[:, :T], prompt)
    np.testing.assert_array_equal(cached, uncached)


def test_the_comparison_catches_a_cache_that_forgets_positions(monkeypatch):
    """Negative control: embedding each new token at position 0, a classic KV-cache bug, must show."""
    model = signal_model("numpy")
    prompt = prompts(3, 4)
    uncached = model.generate(prompt, 4, temperature=0, use_cache=False)
    embedding_forward = numgpt.model.embedding_forward
    monkeypatch.setattr(numgpt.model, "embedding_forward",
                        lambda idx, wte, wpe, start=0: embedding_forward(idx, wte, wpe))
    assert not np.array_equal(model.generate(prompt, 4, temperature=0), uncached)


def test_cache_ignores_dropout_in_training_mode(backend):
    """Generation never drops out, whatever mode the model is in, and leaves the mode as it was."""
    config = GPTConfig(**{**CONFIG.to_dict(), "dropout": 0.5})
    model = signal_model(backend, config).train()
    prompt = prompts(2, 3)
    cached = to_numpy(model.generate(prompt, 9, temperature=0))
    assert model.training
    np.testing.assert_array_equal(cached, to_numpy(model.eval().generate(prompt, 9, temperature=0,
                                                                           use_cache=False)))


def test_uncached_generation_ignores_dropout_in_training_mode():
    """use_cache=False runs the full forward each step: in eval mode too, whatever the model's mode."""
    config = GPTConfig(**{**CONFIG.to_dict(), "dropout": 0.5})
    model = signal_model("numpy", config).train()
    prompt = prompts(2, 3)
    uncached = model.generate(prompt, 9, temperature=0, use_cache=False)
    assert model.training
    np.testing.assert_array_equal(uncached, model.eval().generate(prompt, 9, temperature=0, use_cache=False))


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_every_step_sees_the_last_block_size_tokens_of_the_context(use_cache):
    """A context longer than block_size is cropped to its last block_size tokens, and the window
    slides one token a step: each step's logits are the full forward's over exactly those. (The
    cached and uncached paths share the window, so comparing them cannot show this.)"""
    model = signal_model("numpy").eval()
    context = prompts(2, 11)                                                  # 11 > block_size 8
    for ids, logits in model.generate_stream(context, 6, seed=2, use_cache=use_cache, with_logits=True):
        expected = model.forward(context[:, -CONFIG.block_size:])[0][:, -1]
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-12)
        context = np.concatenate([context, ids[:, None]], axis=1)


def test_float32_cache_agrees_with_uncached(backend):
    model = signal_model(backend, dtype="float32")
    prompt = prompts(2, 3)
    np.testing.assert_array_equal(to_numpy(model.generate(prompt, 10, temperature=0)),
                                  to_numpy(model.generate(prompt, 10, temperature=0, use_cache=False)))


# ---------------------------------------------------------------- the streaming API

def test_stream_yields_each_step_and_matches_generate():
    model = signal_model("numpy")
    prompt = prompts(2, 3)
    steps = list(model.generate_stream(prompt, 6, seed=5, with_logits=True))
    assert len(steps) == 6
    ids = np.stack([step_ids for step_ids, _ in steps], axis=1)               # (B,6)
    assert all(logits.shape == (2, CONFIG.vocab_size) for _, logits in steps)
    np.testing.assert_array_equal(model.generate(prompt, 6, seed=5)[:, 3:], ids)
    # the logits are those the draw saw: the full forward's last position
    first_logits = model.eval().forward(prompt)[0][:, -1]
    np.testing.assert_allclose(steps[0][1], first_logits, rtol=0, atol=1e-12)


def test_a_generator_as_seed_continues_its_stream():
    model = signal_model("numpy")
    rng = np.random.default_rng(11)
    first, second = (model.generate([[1, 2]], 5, seed=rng) for _ in range(2))
    np.testing.assert_array_equal(first, model.generate([[1, 2]], 5, seed=11))
    assert not np.array_equal(first, second)


def test_stream_checks_its_arguments_before_the_first_step():
    model = signal_model("numpy")
    with pytest.raises(ConfigError, match="temperature"):
        model.generate_stream([[1]], 3, temperature=-1)            # raised by the call, not by next()
    with pytest.raises(ConfigError, match="outside"):
        model.generate_stream([[CONFIG.vocab_size]], 3)
    assert list(model.generate_stream([[1]], 0)) == []


def test_returns_idx_array_module(backend):
    model = signal_model(backend)
    prompt = to_device(prompts(1, 2), model.xp)
    out = model.generate(prompt, 3, temperature=0)
    assert type(out) is type(prompt) and out.shape == (1, 5)


@cupy_standin.needs_compiler
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(top_k=5), dict(top_p=0.9)])
def test_each_generated_token_crosses_to_and_from_the_gpu_once(monkeypatch, sampling):
    """On a GPU a step's logits come to the host to be sampled, and the drawn token goes back:
    one copy each way per token (prompt and prefill included), counted on the CuPy stand-in."""
    cupy_standin.install(monkeypatch)
    model = signal_model("cupy", dtype="float32")
    cupy_standin.transfers.clear()
    model.generate(prompts(2, 3), 11, seed=0, **sampling)
    assert cupy_standin.transfers == {"to_device": 11, "to_host": 11}


def test_uncached_generation_leaves_an_eval_model_in_eval_mode():
    """use_cache=False runs forward in eval mode and then restores the mode the model was in: a model
    put in eval mode stays there (else its next forward would drop out)."""
    model = signal_model("numpy", GPTConfig(**{**CONFIG.to_dict(), "dropout": 0.5})).eval()
    model.generate(prompts(1, 3), 2, temperature=0, use_cache=False)
    assert not model.training
