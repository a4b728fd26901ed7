"""Saving and loading GPT-2 directories: round trips, and every broken checkpoint a user may hand
us gets a CheckpointError that names the problem (never a traceback from deep inside)."""

import contextlib
import errno
import io
import json
import os
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from numgpt import GPT, CheckpointError, ConfigError, GPTConfig, checkpoint
from numgpt.backend import to_numpy
from numgpt.checkpoint import atomic_write
from damage import flip_a_bit

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


def test_loading_a_model_never_holds_two_copies_of_it(tmp_path):
    """from_pretrained takes the arrays it has just read (each converted, or kept as it is where it
    has the model's dtype, then freed from the loaded dict): its peak is the model and one tensor
    more, not two models (sample.py with GPT-2 124M: 1013 -> 573 MiB of RSS). tracemalloc sees
    NumPy's buffers."""
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=64)
    GPT(config, seed=1).save_pretrained(tmp_path)
    for dtype, itemsize in (("float32", 4), ("float64", 8)):   # kept as read, and converted
        tracemalloc.start()
        try:
            model = GPT.from_pretrained(tmp_path, dtype=dtype)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        size, largest = sum(p.nbytes for p in model.params.values()), max(p.nbytes for p in model.params.values())
        assert peak <= size + largest // itemsize * 4 + largest + (64 << 10), dtype   # + reading's small buffers


def test_a_model_given_params_still_copies_them_and_leaves_the_dict_whole():
    config = GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4)
    params = {name: to_numpy(p).copy() for name, p in GPT(config).params.items()}
    model = GPT(config, params=params)
    assert list(params) == list(model.params)
    assert not any(np.shares_memory(model.params[name], params[name]) for name in params)


def test_one_model_saved_again_is_the_same_file_byte_for_byte(tmp_path):
    """(safetensors' own writer listed the metadata in an order that changed from save to save.)"""
    model = GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4))
    files = set()
    for i in range(8):
        model.save_pretrained(tmp_path / str(i))
        files.add((tmp_path / str(i) / "model.safetensors").read_bytes())
    assert len(files) == 1


def test_arrays_in_either_byte_order_are_written_as_safetensors_reads_them(tmp_path):
    path = str(tmp_path / "x.safetensors")
    tensors = {"little": np.arange(6, dtype="<f4").reshape(2, 3), "big": np.arange(4, dtype=">f8"),
               "half": np.ones((0, 2), dtype=np.float16)}
    checkpoint.write_safetensors(path, tensors, {"format": "pt"})
    loaded = load_file(path)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype.newbyteorder("=")
        np.testing.assert_array_equal(loaded[name], array)


def test_a_big_endian_model_saved_loads_with_its_checksums(tmp_path):
    config = GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4)
    params = {name: to_numpy(p).astype(">f4") for name, p in GPT(config).params.items()}
    checkpoint.save_pretrained(tmp_path, config, params)
    for name, p in GPT.from_pretrained(tmp_path).params.items():
        np.testing.assert_array_equal(to_numpy(p), params[name], err_msg=name)


def test_a_loaded_model_is_in_eval_mode_as_transformers_loads_it(tmp_path):
    """GPT-2's own config asks for dropout 0.1: a loaded model in training mode would give a
    different answer at every forward."""
    GPT(GPTConfig(**{**CONFIG.to_dict(), "dropout": 0.1}), seed=1).save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    idx = np.arange(16).reshape(2, 8) % CONFIG.vocab_size
    assert not model.training
    np.testing.assert_array_equal(model.forward(idx, requires_grad=False)[0],
                                  model.forward(idx, requires_grad=False)[0])
    model.train()   # the control: dropout is really there to switch off
    assert not np.array_equal(model.forward(idx, requires_grad=False)[0], model.forward(idx, requires_grad=False)[0])


def test_every_activation_has_a_transformers_name():
    """A new activation added to ACTIVATIONS alone would train, then fail at its first save."""
    from numgpt.layers.activations import ACTIVATIONS
    assert set(checkpoint.HF_ACTIVATION) == set(ACTIVATIONS) == set(checkpoint.FROM_HF_ACTIVATION.values())


def test_saved_keys_are_transformers_style(saved):
    _, path = saved
    keys = set(load_file(str(path / "model.safetensors")))
    assert "transformer.wte.weight" in keys and "transformer.h.1.mlp.c_fc.weight" in keys
    assert "lm_head.weight" not in keys        # tied: transformers ties it on load
    assert json.loads((path / "config.json").read_text())["activation_function"] == "gelu_new"


def test_an_untied_bias_free_model_is_saved_as_transformers_loads_it(tmp_path):
    """transformers finds an untied output layer at lm_head.weight (outside "transformer.") and
    its GPT-2 always has biases: a bias-free model is saved with zero biases, the same function."""
    config = GPTConfig(**{**CONFIG.to_dict(), "bias": False, "tie_weights": False})
    model = GPT(config, seed=1)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "transformer.lm_head.weight" not in tensors
    np.testing.assert_array_equal(tensors["lm_head.weight"], model.params["lm_head.weight"])
    with_biases = GPT(GPTConfig(**{**config.to_dict(), "bias": True}), seed=1).params
    biases = [name for name in with_biases if name.endswith(".bias")]
    assert biases and all(name not in model.params for name in biases)
    for name in biases:
        bias = tensors[checkpoint.PREFIX + name]
        assert bias.shape == with_biases[name].shape and not bias.any(), name


def edit_weights(path, changes):
    """Rewrite path's model.safetensors with the tensors changes(tensors) returns set or added."""
    weights = str(path / "model.safetensors")
    tensors = load_file(weights)
    save_file({**tensors, **changes(tensors)}, weights, metadata={"format": "pt"})


def test_a_bias_free_checkpoint_whose_biases_were_trained_elsewhere_keeps_them(tmp_path):
    """Its zero biases are dropped again on load; once any of them is not zero (the model was
    fine-tuned by transformers), every bias is kept, and the model has biases."""
    GPT(GPTConfig(**{**CONFIG.to_dict(), "bias": False}), seed=1).save_pretrained(tmp_path)
    name = "transformer.ln_f.bias"
    edit_weights(tmp_path, lambda tensors: {name: np.full_like(tensors[name], 0.5)})
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config.bias
    np.testing.assert_array_equal(loaded.params["ln_f.bias"], 0.5)
    np.testing.assert_array_equal(loaded.params["h.0.attn.c_attn.bias"], 0.0)


def test_a_tied_checkpoint_that_stores_lm_head_too_loads(saved):
    """Some files hold the tied output layer as well, a copy of wte: it is dropped, and the model
    ties lm_head to wte, as transformers does."""
    model, path = saved
    edit_weights(path, lambda tensors: {"lm_head.weight": tensors["transformer.wte.weight"].copy()})
    loaded = GPT.from_pretrained(path)
    assert loaded.config.tie_weights and list(loaded.params) == list(model.params)
    for name, p in model.params.items():
        np.testing.assert_array_equal(loaded.params[name], p)


def test_missing_directory(tmp_path):
    """Named, with what to give instead: sample.py's default `out` before any training, or a hub
    name such as `gpt2`, which numgpt does not download."""
    with pytest.raises(CheckpointError, match="does not exist: give a train.py out-dir.*does not download"):
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


def shard(path, n_shards=2):
    """Split path's model.safetensors into n_shards files and an index, as transformers' save_pretrained
    does for a model above its max_shard_size; returns the index as a dict."""
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::n_shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_a_sharded_checkpoint_loads(saved):
    model, path = saved
    shard(path, n_shards=3)
    loaded = GPT.from_pretrained(path)
    assert loaded.config == model.config
    for name, p in model.params.items():
        np.testing.assert_array_equal(to_numpy(loaded.params[name]), to_numpy(p))


@pytest.mark.parametrize("damage, message", [
    (lambda index, path: "{", "cannot read .*index.json"),
    (lambda index, path: json.dumps({"metadata": {}}), "does not map the tensors to shard files"),
    (lambda index, path: json.dumps({"weight_map": {"wte.weight": "../model.safetensors"}}),
     "does not map the tensors to shard files in its directory"),
    (lambda index, path: json.dumps({"weight_map": {"wte.weight": ".."}}), "shard files in its directory"),
    (lambda index, path: json.dumps({"weight_map": {"wte.weight": ["a list"]}}), "shard files in its directory"),
    (lambda index, path: "[" * 100_000, "cannot read .*index.json: maximum recursion depth"),
    (lambda index, path: '{"metadata": {"total_size": ' + "9" * 5000 + "}}", "cannot read .*index.json: Exceeds"),
    (lambda index, path: (path / "model-00002-of-00002.safetensors").unlink() or json.dumps(index),
     "cannot read .*model-00002-of-00002.safetensors: .*No such file"),
])
def test_a_damaged_shard_index_is_named(saved, damage, message):
    _, path = saved
    index = shard(path)
    (path / "model.safetensors.index.json").write_text(damage(index, path))
    with pytest.raises(CheckpointError, match=message):
        GPT.from_pretrained(path)


def test_a_tensor_in_two_shards_is_refused(saved):
    _, path = saved
    shard(path)
    first = path / "model-00001-of-00002.safetensors"
    save_file({**load_file(str(first)), **load_file(str(path / "model-00002-of-00002.safetensors"))}, str(first))
    with pytest.raises(CheckpointError, match="which another shard of .*index.json holds too"):
        GPT.from_pretrained(path)


def test_a_pytorch_bin_alone_gets_a_way_to_convert_it(saved):
    _, path = saved
    (path / "model.safetensors").rename(path / "pytorch_model.bin")   # torch's pickle, in older checkpoints
    with pytest.raises(CheckpointError, match="has no model.safetensors, nor .*pytorch_model.bin is there.*save_pre"):
        GPT.from_pretrained(path)


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read"),
    ("[1, 2]", "JSON object"),
    ('{"model_type": "llama"}', "llama"),
    ('{"n_embd": 10, "n_head": 3}', "divisible"),
    ('{"activation_function": "swish"}', "swish"),
    # variants of GPT-2 that compute another function: loaded, they would give wrong logits silently
    ('{"n_inner": 100}', "n_inner = 100 is not supported"),
    ('{"layer_norm_epsilon": 1e-6}', "layer_norm_epsilon = 1e-06 is not supported"),
    ('{"scale_attn_weights": false}', "scale_attn_weights = False is not supported"),
    ('{"scale_attn_by_inverse_layer_idx": true}', "scale_attn_by_inverse_layer_idx = True is not supported"),
    # an encoder-decoder's GPT-2: refused from config.json, not after --init-from has tokenized the data
    ('{"add_cross_attention": true}', "add_cross_attention = True is not supported"),
    # JSON that Python's parser refuses with other errors than JSONDecodeError
    ("[" * 100_000, "cannot read .*config.json: maximum recursion depth"),
    ('{"n_layer": ' + "9" * 5000 + "}", "cannot read .*config.json: Exceeds the limit"),
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


def test_saving_params_that_are_not_the_configs_is_refused_and_keeps_the_old_checkpoint(saved):
    """checkpoint.save_pretrained(path, config, params) used to write any params: one missing (or of
    a wrong shape) gave a checkpoint that load_pretrained then refused, in place of the good one."""
    model, path = saved
    before = {name: (path / name).read_bytes() for name in ("config.json", "model.safetensors")}
    params = {name: to_numpy(p) for name, p in model.params.items()}
    for bad in ({k: v for k, v in params.items() if k != "ln_f.bias"}, {**params, "ln_f.bias": np.zeros(3)}):
        with pytest.raises(ConfigError, match="ln_f.bias"):
            checkpoint.save_pretrained(path, CONFIG, bad)
    assert {name: (path / name).read_bytes() for name in before} == before
    GPT.from_pretrained(path)


def test_weights_that_do_not_match_the_config(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(CheckpointError, match="holds 2 layers, but its config.json says n_layer = 3"):
        GPT.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 31}))
    with pytest.raises(CheckpointError, match="shape"):
        GPT.from_pretrained(path)


def test_a_mistyped_huge_n_layer_is_refused_at_once(saved, monkeypatch):
    """n_layer = 10**15 is a valid GPTConfig; listing its parameters' names would never end."""
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "n_layer": 10**15}))
    listed = checkpoint.param_shapes

    def param_shapes(config):
        assert config.n_layer < 1000, "param_shapes was asked for every layer of n_layer = 10**15"
        return listed(config)

    monkeypatch.setattr(checkpoint, "param_shapes", param_shapes)
    with pytest.raises(CheckpointError, match="n_layer = 1000000000000000"):
        GPT.from_pretrained(path)


def write_raw_safetensors(path, tensors):
    """Write {name: (safetensors dtype name, array of its bits)} as a safetensors file, by hand:
    NumPy, and so safetensors.numpy, has no bfloat16."""
    header, data = {}, b""
    for name, (dtype, bits) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(bits.shape), "data_offsets": [len(data), len(data) + bits.nbytes]}
        data += bits.tobytes()
    header = json.dumps(header).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


def store_as(path, dtype, encode):
    """Rewrite the checkpoint at `path` with every tensor stored as `dtype`, its bits encode(float32 array)."""
    weights = path / "model.safetensors"
    write_raw_safetensors(weights, {name: (dtype, encode(a)) for name, a in load_file(str(weights)).items()})


def bfloat16_bits(a):
    """float32 -> bfloat16 by truncation: the high 16 bits of each value."""
    return (a.view(np.uint32) >> 16).astype("<u2")


def truncated_to_bfloat16(a):
    """The float32 numbers bfloat16_bits(a) stands for: the low 16 bits cleared."""
    return (a.view(np.uint32) & 0xFFFF0000).view(np.float32)


@pytest.mark.parametrize("dtype, encode, decode", [
    ("F32", lambda a: a, lambda a: a),
    ("F64", lambda a: a.astype("<f8"), lambda a: a),
    ("F16", lambda a: a.astype("<f2"), lambda a: a.astype(np.float16).astype(np.float32)),
    ("BF16", bfloat16_bits, truncated_to_bfloat16),
])
def test_weights_in_any_float_dtype_load_into_the_models_dtype(saved, backend, dtype, encode, decode):
    """HuggingFace checkpoints are often published in bfloat16 (or float16): each loads, exactly,
    and becomes the model's float32."""
    model, path = saved
    store_as(path, dtype, encode)
    loaded = GPT.from_pretrained(path, backend=backend)
    for name, p in model.params.items():
        assert loaded.params[name].dtype == np.float32
        np.testing.assert_array_equal(to_numpy(loaded.params[name]), decode(to_numpy(p)), err_msg=name)
    if dtype == "BF16":   # the truncation changed the numbers, so the comparison above could fail
        assert not np.array_equal(truncated_to_bfloat16(to_numpy(model.params["wte.weight"])),
                                  to_numpy(model.params["wte.weight"]))


def test_float64_weights_beyond_float32s_range_are_refused(saved):
    """Cast to the model's float32, 1e39 would become inf, which the NaN check had already passed."""
    _, path = saved

    def huge(a):
        a = a.astype("<f8")
        if a.ndim == 2:
            a[0, 0] = 1e39
        return a
    store_as(path, "F64", huge)
    with pytest.raises(CheckpointError, match="beyond float32's range"):
        GPT.from_pretrained(path)


@pytest.mark.parametrize("dtype, encode", [
    ("F8_E4M3", lambda a: (a.view(np.uint32) >> 24).astype(np.uint8)),
    ("I32", lambda a: a.view("<i4")),
])
def test_an_unsupported_dtype_is_named(saved, dtype, encode):
    _, path = saved
    store_as(path, dtype, encode)
    with pytest.raises(CheckpointError, match=f"{dtype}.*F16, BF16, F32, F64"):
        GPT.from_pretrained(path)


def test_causal_mask_buffers_are_skipped_in_any_dtype(saved):
    """Older files carry the attention's causal masks, some as booleans: buffers, not weights, so
    they are skipped unread whatever their dtype."""
    model, path = saved
    weights = path / "model.safetensors"
    tensors = {name: ("F32", a) for name, a in load_file(str(weights)).items()}
    mask = np.tril(np.ones((1, 1, CONFIG.block_size, CONFIG.block_size), dtype=np.uint8))
    for i in range(CONFIG.n_layer):
        tensors[f"transformer.h.{i}.attn.bias"] = ("BOOL", mask)
        tensors[f"transformer.h.{i}.attn.masked_bias"] = ("F32", np.array(-1e4, dtype=np.float32))
    write_raw_safetensors(weights, tensors)
    loaded = GPT.from_pretrained(path)
    for name, p in model.params.items():
        np.testing.assert_array_equal(loaded.params[name], p)


@pytest.mark.parametrize("damage", ["offsets-past-the-end", "offsets-not-the-shape", "header-not-json",
                                    "header-nested-too-deep"])
def test_a_damaged_safetensors_header_is_reported_as_corrupt(saved, damage):
    _, path = saved
    weights = path / "model.safetensors"
    tensors = {name: ("F32", a) for name, a in load_file(str(weights)).items()}
    write_raw_safetensors(weights, tensors)
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    entry = header["transformer.wte.weight"]
    if damage == "offsets-past-the-end":
        entry["data_offsets"][1] += len(data)
    elif damage == "offsets-not-the-shape":
        entry["shape"][0] += 1
    new = {"header-not-json": b"{" * size, "header-nested-too-deep": b"[" * 100_000}.get(damage)
    new = new or json.dumps(header).encode()
    weights.write_bytes(len(new).to_bytes(8, "little") + new + data[8 + size:])
    with pytest.raises(CheckpointError, match="corrupt"):
        GPT.from_pretrained(path)


def test_a_flipped_bit_in_the_weights_is_named(saved):
    """A byte changed on disk after the save fails its tensor's checksum. The control: the same
    flip in a file saved without checksums, as transformers saves, loads a different number."""
    model, path = saved
    weights = path / "model.safetensors"
    saved_bytes = weights.read_bytes()
    flip_a_bit(weights, "transformer.h.1.mlp.c_fc.weight")
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight .* is damaged"):
        GPT.from_pretrained(path)

    weights.write_bytes(saved_bytes)
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    flip_a_bit(weights, "transformer.h.1.mlp.c_fc.weight")
    loaded = GPT.from_pretrained(path).params["h.1.mlp.c_fc.weight"]
    assert loaded.flat[0] != model.params["h.1.mlp.c_fc.weight"].flat[0]
    np.testing.assert_allclose(loaded, model.params["h.1.mlp.c_fc.weight"], rtol=1e-6)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    with pytest.raises(TypeError):
        atomic_write(target, object())          # the write fails midway
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]   # no temporary file left behind


class FullDisk(io.RawIOBase):
    """A file on a full disk: every write of its buffer fails with ENOSPC."""
    def __init__(self, fd):
        self.fd = fd

    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        os.close(self.fd)
        super().close()


@pytest.mark.parametrize("size", [10, 10**6])   # held in the buffer until the flush, or written at once
def test_a_full_disk_is_named_with_the_file_it_could_not_write(tmp_path, monkeypatch, size):
    """A small write waits in the file's buffer: its flush fails, and so does the close's second
    flush, whose error must name the file too (it replaced the named one: a bare "No space left")."""
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: io.BufferedWriter(FullDisk(fd)))
    with pytest.raises(OSError) as failed:
        atomic_write(target, b"x" * size)
    assert failed.value.errno == errno.ENOSPC
    assert failed.value.strerror == f"cannot write {target}: No space left on device"
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_works_where_a_directory_cannot_be_opened_as_on_windows(tmp_path, monkeypatch):
    """Windows' os.open refuses a directory (PermissionError, errno 13: its C runtime opens files
    only) and Windows has no fsync of one. A write must not fail there after its file is in place,
    as it did: no token cache or checkpoint could be written, so `python train.py` always failed."""
    target = tmp_path / "f.bin"
    real_open = os.open

    def windows_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    with monkeypatch.context() as windows:   # undone before pytest reports: its pathlib reads os.name
        windows.setattr(os, "open", windows_open)
        windows.setattr(os, "name", "nt")
        atomic_write(target, b"new")
        atomic_write(target, b"newer")   # over an existing file too
    assert target.read_bytes() == b"newer"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_stale_temporary_file_that_cannot_be_removed_is_left(tmp_path, monkeypatch):
    """On Windows a file another process holds open cannot be removed (PermissionError, WinError
    32): its writer, suspended longer than idle_s, is alive. The run that found it goes on."""
    stale = tmp_path / (checkpoint.TEMP_PREFIX + "abcd1234")
    stale.write_bytes(b"half a token cache")
    os.utime(stale, (0, 0))

    def in_use(path):
        raise PermissionError(errno.EACCES, "The process cannot access the file because it is being used "
                                            "by another process", path)

    monkeypatch.setattr(os, "remove", in_use)
    checkpoint.remove_stale_temp_files(tmp_path, idle_s=3600)
    assert stale.exists()


def rewrite_header(weights, edit, data_edit=lambda data: data):
    """Rewrite the safetensors file `weights` with its header's JSON text edit(header dict) (a str)
    and its data data_edit(bytes)."""
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = edit(json.loads(data[8:8 + size])).encode()
    weights.write_bytes(len(header).to_bytes(8, "little") + header + data_edit(data[8 + size:]))


def overlapping(header):
    """Every tensor of wte's size and dtype listed again, under new names, over wte's bytes."""
    entry = header["transformer.wte.weight"]
    return json.dumps({**header, **{f"copy{i}": entry for i in range(20)}})


def first_two_swapped(header):
    """The first two tensors' offsets swapped: each is read from the other's bytes (same size)."""
    a, b = "transformer.h.0.attn.c_proj.weight", "transformer.h.1.attn.c_proj.weight"
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    return json.dumps(header)


def shortened_to_one_float(header):
    """wpe's entry made one float long: the tensor after it starts in a gap no tensor owns."""
    wpe = header["transformer.wpe.weight"]
    begin = wpe["data_offsets"][0]
    header["transformer.wpe.weight"] = {**wpe, "shape": [1], "data_offsets": [begin, begin + 4]}
    return json.dumps(header)


@pytest.mark.parametrize("edit, data_edit, message", [
    # 20 more names over wte's bytes: read 21 times, 21 times the memory the file justifies
    (overlapping, lambda data: data, r"copy\d+'s data_offsets .* do not follow the previous"),
    # a tensor's bytes shortened by one float: the next one starts in a gap no tensor owns
    (shortened_to_one_float, lambda data: data, "do not follow the previous tensor's"),
    # bytes after the last tensor's, which no tensor owns (a polyglot file: safetensors refuses it)
    (json.dumps, lambda data: data + b"\0" * 8, "bytes end at .* but the file holds"),
    (lambda h: json.dumps({**h, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}),
     lambda data: data, r"x's data_offsets \[0.0, 4.0\] are not two integers"),
    # a tensor named twice: json.loads would keep the second entry silently
    (lambda h: json.dumps(h)[:-1] + ', "transformer.wte.weight": ' + json.dumps(h["transformer.wte.weight"]) + "}",
     lambda data: data, "names 'transformer.wte.weight' twice"),
])
def test_tensors_whose_bytes_overlap_or_leave_gaps_are_refused(saved, edit, data_edit, message):
    """safetensors requires the tensors to tile the data, one after another to the file's end, and
    refuses other files (so transformers does); numgpt read each tensor wherever its offsets said."""
    _, path = saved
    rewrite_header(path / "model.safetensors", edit, data_edit)
    with pytest.raises(CheckpointError, match=message):
        GPT.from_pretrained(path)


def test_offsets_out_of_order_in_the_header_still_load(saved):
    """Only the layout counts, not the header's order: tensors listed in another order than their
    bytes (as any writer may) load, and the control: swapping two same-sized tensors' offsets swaps
    their values, which no layout check can see (the checksums do)."""
    model, path = saved
    rewrite_header(path / "model.safetensors", lambda h: json.dumps(dict(reversed(h.items()))))
    loaded = GPT.from_pretrained(path)
    for name, p in model.params.items():
        np.testing.assert_array_equal(loaded.params[name], p)
    rewrite_header(path / "model.safetensors", first_two_swapped)
    with pytest.raises(CheckpointError, match="is damaged"):
        GPT.from_pretrained(path)


def test_a_tensor_under_both_key_styles_is_refused(saved):
    """transformers loads "transformer.wte.weight" and ignores an unprefixed "wte.weight" beside it;
    numgpt kept whichever came last, the unprefixed one in safetensors' sorted order, and so loaded
    other weights than transformers, silently."""
    _, path = saved
    edit_weights(path, lambda tensors: {"wte.weight": np.zeros_like(tensors["transformer.wte.weight"])})
    with pytest.raises(CheckpointError, match="holds both transformer.wte.weight and wte.weight"):
        GPT.from_pretrained(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_shard_that_is_a_fifo_is_refused_instead_of_waited_on(saved):
    """A shard index may name any file of the directory, and a tar archive can hold a FIFO: opening
    one for reading waits for a writer that never comes, so the load hung for ever."""
    import threading

    _, path = saved
    shard(path)
    fifo = path / "model-00002-of-00002.safetensors"
    fifo.unlink()
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            GPT.from_pretrained(path)
        except CheckpointError as e:
            outcome.append(str(e))

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(timeout=10)
    hung = loader.is_alive()
    if hung:   # let the hung open go on (to an empty file), so that the thread ends
        # without blocking: a load that is only slow has no reader there, and the open would wait for ever
        with contextlib.suppress(OSError):   # ENXIO: no reader
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        loader.join(timeout=10)
    assert not hung, "from_pretrained waited on the FIFO"
    assert outcome and "model-00002-of-00002.safetensors: it is not a regular file" in outcome[0]
