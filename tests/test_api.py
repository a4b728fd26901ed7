"""The public API, pinned: the names numgpt exports and the call signatures of its core entry points
(the model, the optimizer, checkpoints, sampling and every layer's forward/backward pair). A rename,
a reordered or removed parameter, a changed default or a parameter turned keyword-only fails here
first. A deliberate change of the API edits the lists below, in the same commit as the README."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

import numgpt

ROOT = Path(__file__).resolve().parent.parent

EXPORTS = {"GPT", "GPTConfig", "AdamW", "clip_coefficient", "clip_grad_norm", "global_norm", "no_decay_names",
           "keep_freed_memory", "NumGPTError", "ConfigError", "CheckpointError", "DataError", "__version__"}

# dotted name -> its signature as inspect prints it (annotations left out)
SIGNATURES = {
    # the package's exports
    "numgpt.GPTConfig": "(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0, "
                        "bias=True, tie_weights=True, activation='gelu')",
    "numgpt.AdamW": "(params, lr, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01, exclude_from_decay=())",
    "numgpt.AdamW.step": "(self, grads, grad_scale=None)",
    "numgpt.AdamW.state_dict": "(self)",
    "numgpt.AdamW.load_state_dict": "(self, state)",
    "numgpt.clip_grad_norm": "(grads, max_norm)",
    "numgpt.clip_coefficient": "(grads, max_norm, norm=None)",
    "numgpt.global_norm": "(grads)",
    "numgpt.no_decay_names": "(params)",
    "numgpt.keep_freed_memory": "()",
    # the model
    "numgpt.GPT": "(config, backend='numpy', dtype='float32', seed=0, params=None, matmul_dtype=None, *, "
                  "take_params=False)",
    "numgpt.GPT.from_pretrained": "(path, backend='numpy', dtype='float32')",
    "numgpt.GPT.save_pretrained": "(self, path)",
    "numgpt.GPT.train": "(self)",
    "numgpt.GPT.eval": "(self)",
    "numgpt.GPT.evaluating": "(self)",
    "numgpt.GPT.num_params": "(self)",
    "numgpt.GPT.forward": "(self, idx, targets=None, *, return_logits=True, requires_grad=True, loss_scale=1.0, "
                         "loss_on_device=False)",
    "numgpt.GPT.backward": "(self)",
    "numgpt.GPT.empty_kv_caches": "(self, batch)",
    "numgpt.GPT.decode": "(self, idx, kv_caches, *, return_attention=False)",
    "numgpt.GPT.attention_maps": "(self, idx)",
    "numgpt.GPT.residual_stream": "(self, idx)",
    "numgpt.GPT.generate": "(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, *, "
                           "use_cache=True)",
    "numgpt.GPT.generate_stream": "(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, "
                                  "*, use_cache=True, with_logits=False)",
    "numgpt.precision.DynamicLossScaler": "(scale=65536.0, growth_interval=2000)",
    # checkpoints and sampling
    "numgpt.checkpoint.load_pretrained": "(path)",
    "numgpt.checkpoint.save_pretrained": "(path, config, params)",
    "numgpt.checkpoint.load_config": "(path)",
    "numgpt.sampling.check_sampling_args": "(temperature=1.0, top_k=None, top_p=None, flags=False)",
    "numgpt.sampling.next_token_probs": "(logits, temperature=1.0, top_k=None, top_p=None)",
    "numgpt.sampling.sample_next": "(logits, temperature=1.0, top_k=None, top_p=None, rng=None)",
    # the layers: every *_forward / *_backward pair (test_every_layer_pair_is_pinned keeps this complete)
    "numgpt.layers.activations.gelu_forward": "(x, out_dtype=None)",
    "numgpt.layers.activations.gelu_backward": "(dy, x)",
    "numgpt.layers.activations.gelu_exact_forward": "(x, out_dtype=None)",
    "numgpt.layers.activations.gelu_exact_backward": "(dy, x)",
    "numgpt.layers.activations.relu_forward": "(x, out_dtype=None)",
    "numgpt.layers.activations.relu_backward": "(dy, x)",
    "numgpt.layers.attention.attention_forward": "(x, params, n_head, dropout=0.0, rng=None, *, kv_cache=None)",
    "numgpt.layers.attention.attention_backward": "(dout, cache)",
    "numgpt.layers.attention.causal_attention_forward": "(qkv, n_head, dropout=0.0, rng=None, kv_cache=None, "
                                                           "overwrite=False)",
    "numgpt.layers.attention.causal_attention_backward": "(dy, cache)",
    "numgpt.layers.attention.causal_softmax": "(scores)",
    "numgpt.layers.attention.softmax_backward": "(dprobs, probs, overwrite=False)",
    "numgpt.layers.attention.attention_probs": "(cache)",
    "numgpt.layers.attention.KVCache": "(xp, shape, dtype)",
    "numgpt.layers.attention.KVCache.append": "(self, k, v)",
    "numgpt.layers.block.block_forward": "(x, params, n_head, activation='gelu', dropout=0.0, rng=None, *, "
                                         "kv_cache=None)",
    "numgpt.layers.block.block_backward": "(dy, cache)",
    "numgpt.layers.block.block_attention_probs": "(cache)",
    "numgpt.layers.classifier.classifier_forward": "(x, w, targets=None, ignore_index=-100, n_valid=None, "
                                                   "return_logits=True, requires_grad=True, grad_scale=1.0)",
    "numgpt.layers.classifier.classifier_backward": "(dloss, cache)",
    "numgpt.layers.cross_entropy.cross_entropy_forward": "(logits, targets, ignore_index=-100, n_valid=None, "
                                                         "overwrite=False, logits_bound=None, exps_dtype=None)",
    "numgpt.layers.cross_entropy.cross_entropy_backward": "(dloss, cache, overwrite=False)",
    "numgpt.layers.dropout.dropout_forward": "(x, p, rng)",
    "numgpt.layers.dropout.dropout_backward": "(dy, cache)",
    "numgpt.layers.embedding.embedding_forward": "(idx, wte, wpe, start=0)",
    "numgpt.layers.embedding.embedding_backward": "(dout, cache, dwte=None)",
    "numgpt.layers.layernorm.layernorm_forward": "(x, w, b=None, eps=1e-05, out_dtype=None)",
    "numgpt.layers.layernorm.layernorm_backward": "(dy, cache)",
    "numgpt.layers.linear.linear_forward": "(x, w, b=None)",
    "numgpt.layers.linear.linear_backward": "(dy, cache)",
    "numgpt.layers.mlp.mlp_forward": "(x, params, activation='gelu', dropout=0.0, rng=None)",
    "numgpt.layers.mlp.mlp_backward": "(dout, cache)",
    "numgpt.layers.residual.residual_forward": "(x, fx)",
    "numgpt.layers.residual.residual_backward": "(dy)",
}


def resolve(dotted):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def signature_text(obj):
    """inspect's signature of obj without annotations (GPTConfig's fields carry them)."""
    sig = inspect.signature(obj)
    sig = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                      return_annotation=sig.empty)
    return str(sig)


def signature_mismatches(expected):
    """{dotted name: (pinned, found)} for every entry of `expected` whose signature differs
    (found is the error's text where the name no longer resolves)."""
    found = {}
    for dotted, pinned in expected.items():
        try:
            text = signature_text(resolve(dotted))
        except (ImportError, AttributeError) as e:
            text = f"{type(e).__name__}: {e}"
        if text != pinned:
            found[dotted] = (pinned, text)
    return found


def test_the_package_exports_exactly_the_documented_names():
    assert set(numgpt.__all__) == EXPORTS
    assert [name for name in sorted(EXPORTS) if not hasattr(numgpt, name)] == []   # `import *` would fail


def test_the_core_entry_points_keep_their_signatures():
    assert signature_mismatches(SIGNATURES) == {}


PAIR = ("_forward", "_backward")
# backwards whose forward has another name than <name>_forward
FORWARD_OF = {"numgpt.layers.attention.softmax_backward": "numgpt.layers.attention.causal_softmax"}


def test_every_layer_pair_is_pinned():
    """Each numgpt/layers module's public *_forward has its *_backward beside it, and both are in
    SIGNATURES: a new layer (or a renamed one) must be added there."""
    layers = ROOT / "numgpt" / "layers"
    found = set()
    for path in sorted(layers.glob("*.py")):
        module = importlib.import_module(f"numgpt.layers.{path.stem}")
        for name, obj in vars(module).items():
            if inspect.isfunction(obj) and obj.__module__ == module.__name__ and name.endswith(PAIR):
                found.add(f"{module.__name__}.{name}")
    for name in found:
        if name in FORWARD_OF:
            assert FORWARD_OF[name] in SIGNATURES
            continue
        partner = re.sub(r"_forward$", "_backward", name) if name.endswith("_forward") else \
            re.sub(r"_backward$", "_forward", name)
        assert partner in found, f"{name} has no {partner.rsplit('.', 1)[1]}"
    pinned = {name for name in SIGNATURES if name.startswith("numgpt.layers.") and name.endswith(PAIR)}
    assert found == pinned


def test_the_errors_keep_their_hierarchy():
    """Callers catch these: ConfigError is also a ValueError, each is a NumGPTError."""
    assert issubclass(numgpt.ConfigError, ValueError)
    for error in (numgpt.ConfigError, numgpt.CheckpointError, numgpt.DataError):
        assert issubclass(error, numgpt.NumGPTError)


@pytest.mark.parametrize("name", ["numgpt.GPT.forward", "numgpt.GPTConfig"])
def test_the_readme_states_the_pinned_signature(name):
    """README's 'The library' spells out forward(...) and GPTConfig(...) with every argument."""
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())   # its line breaks as spaces
    short = name.rsplit(".", 1)[1]
    stated = re.search(rf"`{short}(\(.*?\))`", readme).group(1)
    assert stated.replace('"', "'") == SIGNATURES[name].replace("self, ", "")


def test_a_renamed_or_reordered_parameter_is_caught(monkeypatch):
    """The negative control: the same check, on a GPT.forward whose `targets` is renamed and a
    linear_forward whose arguments are swapped, names both; a name dropped from __all__ fails the
    exports test's comparison."""
    def forward(self, idx, target=None, *, return_logits=True, requires_grad=True, loss_scale=1.0,
                loss_on_device=False):
        pass

    def linear_forward(w, x, b=None):
        pass

    monkeypatch.setattr(numgpt.GPT, "forward", forward)
    monkeypatch.setattr(resolve("numgpt.layers.linear"), "linear_forward", linear_forward)
    assert set(signature_mismatches(SIGNATURES)) == {"numgpt.GPT.forward", "numgpt.layers.linear.linear_forward"}
    monkeypatch.setattr(numgpt, "__all__", [name for name in numgpt.__all__ if name != "AdamW"])
    assert set(numgpt.__all__) != EXPORTS
