"""GPTConfig: every architectural choice of a model, in one place."""

import math
from dataclasses import asdict, dataclass, replace

from numgpt.errors import ConfigError
from numgpt.layers.activations import ACTIVATIONS


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2-style model.

    vocab_size  tokens in the vocabulary (GPT-2: 50257)
    block_size  longest context, the number of learned positions (GPT-2: 1024)
    n_layer     transformer blocks
    n_head      attention heads; n_embd must be divisible by it
    n_embd      width of the residual stream, C
    dropout     probability used by every dropout (embedding, attention, residual), in [0, 1)
    bias        biases in linear layers and layernorms (GPT-2: True)
    tie_weights the output layer reuses the token embedding wte (GPT-2: True)
    activation  the MLP's nonlinearity: "gelu" (GPT-2's tanh form), "gelu_exact" or "relu"

    The shape comments everywhere use: B batch, T positions, C = n_embd, nh = n_head,
    hs = head_size = C / nh, V = vocab_size, N rows (every leading axis flattened: B*T), Tk the
    keys attended (T, or the KV cache's length + T in generation). d<name> is the loss's gradient
    with respect to <name>: dy for a forward's output y, dx for its input x.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    activation: str = "gelu"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                              f"each head gets n_embd / n_head channels")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def head_size(self):
        """hs = n_embd / n_head: each head's channels."""
        return self.n_embd // self.n_head

    def to_dict(self):
        return asdict(self)


def param_shapes(config):
    """{name: shape} of every parameter, in GPT-2's checkpoint order and Conv1D (in, out) layout."""
    C, V = config.n_embd, config.vocab_size

    def linear(name, n_in, n_out):
        return {f"{name}.weight": (n_in, n_out), **({f"{name}.bias": (n_out,)} if config.bias else {})}

    def layernorm(name):
        return {f"{name}.weight": (C,), **({f"{name}.bias": (C,)} if config.bias else {})}

    shapes = {"wte.weight": (V, C), "wpe.weight": (config.block_size, C)}
    for i in range(config.n_layer):
        shapes.update(layernorm(f"h.{i}.ln_1"))
        shapes.update(linear(f"h.{i}.attn.c_attn", C, 3 * C))
        shapes.update(linear(f"h.{i}.attn.c_proj", C, C))
        shapes.update(layernorm(f"h.{i}.ln_2"))
        shapes.update(linear(f"h.{i}.mlp.c_fc", C, 4 * C))
        shapes.update(linear(f"h.{i}.mlp.c_proj", 4 * C, C))
    shapes.update(layernorm("ln_f"))
    if not config.tie_weights:
        shapes["lm_head.weight"] = (V, C)   # nn.Linear layout (out, in), as transformers stores it
    return shapes


def params_mismatch(config, params):
    """Why `params` ({name: array}) are not the parameters of `config`, in words, or None: the names
    missing or unexpected, or the first of a wrong shape (NumPy would broadcast some silently)."""
    expected = param_shapes(config)
    missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or unexpected:
        return ", ".join(f"{what} {names[:5]}{' and more' if len(names) > 5 else ''}"
                         for what, names in (("missing", missing), ("unexpected", unexpected)) if names)
    wrong = next((name for name, shape in expected.items() if tuple(params[name].shape) != shape), None)
    if wrong is not None:
        return f"params[{wrong!r}] has shape {tuple(params[wrong].shape)}, expected {expected[wrong]}"
    return None


def num_params(config):
    """How many numbers param_shapes(config) holds, counted from a one- and a two-layer model, so
    that the count costs no time even for a mistyped n_layer of 10**18."""
    def count(n_layer):
        return sum(math.prod(shape) for shape in param_shapes(replace(config, n_layer=n_layer)).values())

    one = count(1)
    return one + (config.n_layer - 1) * (count(2) - one)
