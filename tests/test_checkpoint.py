"""Saving and loading GPT-2 directories: round trips, and every broken checkpoint a user may hand
us gets a CheckpointError that names the problem (never a traceback from deep inside)."""

import json

import numpy as np
import pytest

from numgpt import GPT, CheckpointError, GPTConfig
from numgpt.backend import to_numpy
from numgpt.checkpoint import atomic_write

CONFIG = GPTConfig(vocab_size=30, block_size=8, n_layer=2, n_head=2, n_embd=8)


@pytest.fixture
def saved(tmp_path):
    model = GPT(CONFIG, seed=1)
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("config", [CONFIG, GPTConfig(**{**CONFIG.to_dict(), "bias": False, "tie_weights": False,
                                                          "activation": "relu", "dropout": 0.1})])
def test_round_trip_is_exact(config, tmp_path, backend):
    model = GPT(config, backend=backend, seed=1)
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path, backend=backend)
    assert loaded.config == config
    assert list(loaded.params) == list(model.params)
    for name, p in model.params.items():
        np.testing.assert_array_equal(to_numpy(loaded.params[name]), to_numpy(p))


def test_saved_keys_are_transformers_style(saved):
    from safetensors.numpy import load_file
    _, path = saved
    keys = set(load_file(str(path / "model.safetensors")))
    assert "transformer.wte.weight" in keys and "transformer.h.1.mlp.c_fc.weight" in keys
    assert "lm_head.weight" not in keys        # tied: transformers ties it on load
    assert json.loads((path / "config.json").read_text())["activation_function"] == "gelu_new"


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "nope")


def test_a_file_is_not_a_checkpoint_directory(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        GPT.from_pretrained(path / "config.json")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_missing_file(saved, name):
    _, path = saved
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        GPT.from_pretrained(path)


def test_truncated_weights(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        GPT.from_pretrained(path)


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read"),
    ("[1, 2]", "JSON object"),
    ('{"model_type": "llama"}', "llama"),
    ('{"n_embd": 10, "n_head": 3}', "divisible"),
    ('{"activation_function": "swish"}', "swish"),
])
def test_bad_config(saved, text, message):
    _, path = saved
    (path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        GPT.from_pretrained(path)


@pytest.mark.parametrize("field, value", [
    ("numgpt", None), ("resid_pdrop", "x"), ("activation_function", ["a"]), ("n_embd", None), ("n_layer", True),
    ("tie_word_embeddings", "yes"),
])
def test_a_config_field_of_the_wrong_type_is_named(saved, field, value):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(CheckpointError, match=f"config.json: {field} must be"):
        GPT.from_pretrained(path)


def test_weights_that_do_not_match_the_config(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(CheckpointError, match="missing"):
        GPT.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 31}))
    with pytest.raises(CheckpointError, match="shape"):
        GPT.from_pretrained(path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    with pytest.raises(TypeError):
        atomic_write(target, object())          # the write fails midway
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]   # no temporary file left behind
