"""The GPT: GPT-2's decoder-only transformer, composed from the layers' forward/backward pairs.

    x      = dropout(wte[idx] + wpe[:T])                 (B,T,C)
    x      = block_i(x)  for i in 0..n_layer-1           (B,T,C)
    logits = ln_f(x) @ wte^T                             (B,T,V)  (lm_head.weight when untied)
    loss   = cross_entropy(logits, targets)

`forward` keeps every layer's cache; `backward` walks them in reverse and returns the gradient of
the mean loss for every parameter, named as in a GPT-2 checkpoint. `generate` (and its step-by-step
form `generate_stream`) runs `decode`, the same layers for inference: each new token alone, with
the keys and values of the earlier positions kept in KV caches.
"""

import functools
import math
from contextlib import contextmanager

import numpy as np

from numgpt import checkpoint, foreach, seeds
from numgpt.backend import array_module, device_rng, get_xp, resolve_dtype, to_device, to_numpy
from numgpt.config import GPTConfig, num_params, param_shapes, params_mismatch
from numgpt.errors import ConfigError, is_count, is_number
from numgpt.layers.attention import KVCache
from numgpt.layers.block import block_attention_probs, block_backward, block_forward, sub_params, with_prefix
from numgpt.layers.classifier import classifier_backward, classifier_forward
from numgpt.layers.cross_entropy import IGNORE_INDEX
from numgpt.layers.dropout import dropout_backward, dropout_forward
from numgpt.layers.embedding import embedding_backward, embedding_forward
from numgpt.layers.layernorm import layernorm_backward, layernorm_forward
from numgpt.layers.linear import named_grads
from numgpt.precision import half_matmuls
from numgpt.sampling import check_sampling_args, sample_next

INIT_STD = 0.02


def init_params(config, seed=0):
    """GPT-2's initialisation as float64 NumPy arrays: weights normal with mean 0 and std 0.02, the
    residual projections (c_proj) with std 0.02 / sqrt(2 n_layer), so that the 2 n_layer additions
    to the residual stream (two per block) add the same variance to it together whatever the depth,
    biases 0, layernorm gains 1. Each rule is chosen by the parameter's GPT-2 name (".bias",
    "ln_", "c_proj"): a new kind of parameter must be named so that the right one matches."""
    rng = seeds.stream(seed, seeds.INIT)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(".bias"):
            params[name] = np.zeros(shape)
        elif ".ln_" in name or name.startswith("ln_f"):
            params[name] = np.ones(shape)
        else:
            std = INIT_STD / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else INIT_STD
            params[name] = rng.normal(0.0, std, size=shape)
    return params


def model_arrays(arrays, xp, dtype, take=False):
    """{name: array of module `xp` and `dtype`} from `arrays`, copied. With `take` the arrays are the
    caller's to give away (an initialisation's, a checkpoint's just read): each is popped from the
    dict and converted in turn, so its memory goes as its copy comes, and one that is already a
    writable C-contiguous NumPy array of `dtype` is kept as it is (for a NumPy model). Never two
    copies of the whole model at once: GPT-2 124M's sample.py peaked at 1013 MiB of RSS, now 573."""
    out = {}
    for name in list(arrays):
        value = arrays.pop(name) if take else arrays[name]
        reusable = (take and xp is np and isinstance(value, np.ndarray) and value.dtype == dtype
                    and value.flags.c_contiguous and value.flags.writeable)
        out[name] = value if reusable else xp.array(to_numpy(value), dtype=dtype)
    return out


def module_of(ids):
    """The array module that holds `ids`: NumPy for lists and other host data."""
    return array_module(ids) if hasattr(ids, "shape") else np


def in_model_precision(method):
    """Run a GPT method with the model's matmul precision (float16 matmuls when mixed)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with half_matmuls(self.matmul_dtype):
            return method(self, *args, **kwargs)
    return run


class GPT:
    """A GPT-2-style language model with explicit forward and backward passes.

    model = GPT(config, backend="numpy", dtype="float32", seed=0)
    logits, loss = model.forward(idx, targets)     # idx, targets (B,T) ints
    grads = model.backward()                       # {name: gradient of the mean loss}

    With matmul_dtype="float16" (mixed precision, for GPU tensor cores) the parameters stay in
    `dtype`, float32, the activations are computed in it, and only the matmuls run in float16
    (operands and product). `params` ({name: array}) are copied; with take_params=True the model
    takes them instead (they leave the dict; see model_arrays): no second copy of the weights.
    """

    def __init__(self, config, backend="numpy", dtype="float32", seed=0, params=None, matmul_dtype=None, *,
                 take_params=False):
        if not isinstance(config, GPTConfig):
            raise ConfigError(f"config must be a GPTConfig, got {type(config).__name__}")
        if not is_count(seed):   # NumPy's own error for -1 names no argument
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        self.config = config
        self.xp = get_xp(backend)
        self.dtype = resolve_dtype(dtype)
        if matmul_dtype not in (None, "float16") or (matmul_dtype and self.dtype != np.float32):
            raise ConfigError(f"matmul_dtype must be None or 'float16' (with dtype float32), got {matmul_dtype!r}")
        self.matmul_dtype = matmul_dtype
        host_params = init_params(config, seed) if params is None else params
        # the model owns its parameters and updates them in place: copies of a caller's, unless it
        # gives them away (take_params), as an initialisation and a checkpoint just read do
        params = model_arrays(host_params, self.xp, self.dtype, take=params is None or take_params)
        problem = params_mismatch(config, params)
        if problem:   # a missing one would fail only in the first forward, a wrong bias shape broadcast
            raise ConfigError(f"params do not match the config: {problem}")
        # in GPT-2's order, whatever the order given (a training state's file sorts them by name): the
        # saved file's bytes and the order the gradient norm sums in follow it
        self.params = {name: params[name] for name in param_shapes(config)}
        self.dropout_rng = seeds.stream(seed, seeds.DROPOUT)   # host generator behind every dropout mask
        self.training = True
        self._cache = None

    # ---------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, path, backend="numpy", dtype="float32"):
        """Load a HuggingFace GPT-2 directory (config.json + model.safetensors), in eval mode
        (dropout off), as transformers' from_pretrained returns it: call .train() to fine-tune."""
        config, params = checkpoint.load_pretrained(path)
        # the arrays just read are nobody else's: the model takes them (see model_arrays)
        return cls(config, backend=backend, dtype=dtype, params=params, take_params=True).eval()

    def save_pretrained(self, path):
        """Write config.json + model.safetensors, loadable by from_pretrained and by transformers."""
        checkpoint.save_pretrained(path, self.config, {name: to_numpy(p) for name, p in self.params.items()})

    # ---------------------------------------------------------------- modes

    def train(self):
        """Training mode: dropout is active."""
        self.training = True
        return self

    def eval(self):
        """Evaluation mode: dropout is off, so forward is deterministic."""
        self.training = False
        return self

    @contextmanager
    def evaluating(self):
        """Eval mode inside the with-block; afterwards the mode the model was in."""
        was_training, self.training = self.training, False
        try:
            yield self
        finally:
            self.training = was_training

    def num_params(self):
        """Number of parameters (a tied output layer counts once)."""
        return num_params(self.config)

    # ---------------------------------------------------------------- forward / backward

    def _as_ids(self, ids, name, xp=None, allow_ignore=False, any_length=False):
        """`ids` as a (B,T) int64 array of module `xp` (the model's by default), or a ConfigError
        that says what is wrong. T must be 1..block_size unless `any_length`.

        The ids are checked where they are, then moved: a batch from the host costs one transfer
        to the GPU and no wait for it (reading a device array's min and max back would)."""
        try:
            ids = to_device(ids, module_of(ids))
        except ValueError as e:   # rows of different lengths
            raise ConfigError(f"{name} must be a (batch, time) array of token ids; NumPy cannot make one of it "
                              f"({e})") from None
        if ids.ndim != 2:
            raise ConfigError(f"{name} must be a (batch, time) array of token ids, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise ConfigError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        if ids.shape[1] == 0 or (ids.shape[1] > self.config.block_size and not any_length):
            takes = "at least 1" if any_length else f"1 to block_size = {self.config.block_size}"
            raise ConfigError(f"{name} has {ids.shape[1]} positions; this model takes {takes}")
        checked = ids[ids != IGNORE_INDEX] if allow_ignore else ids   # the loss skips ignored targets
        if checked.size and (int(checked.min()) < 0 or int(checked.max()) >= self.config.vocab_size):
            raise ConfigError(f"{name} holds ids outside [0, vocab_size = {self.config.vocab_size})")
        return to_device(ids.astype(np.int64, copy=False), self.xp if xp is None else xp)

    def _head_weight(self):
        """The output layer's (V,C) weight: the token embedding itself when the weights are tied."""
        return self.params["wte.weight" if self.config.tie_weights else "lm_head.weight"]

    def _batch_on_device(self, idx, targets):
        """idx, targets (B,T) -> the two as int64 arrays of the model's module, and n_valid, the
        number of targets that are not ignored (None without targets).

        They are checked (and the targets counted) where they are: on the host that is no wait for
        the GPU. A host batch for a GPU model then travels in one asynchronous transfer."""
        idx = self._as_ids(idx, "idx", xp=module_of(idx))
        if targets is None:
            return to_device(idx, self.xp), None, None
        targets = self._as_ids(targets, "targets", xp=module_of(targets), allow_ignore=True)
        if targets.shape != idx.shape:
            raise ConfigError(f"targets must have idx's shape {idx.shape}, got {targets.shape}")
        n_valid = int((targets != IGNORE_INDEX).sum())
        if self.xp is not np and array_module(idx) is np and array_module(targets) is np:
            idx, targets = to_device(np.stack([idx, targets]), self.xp)   # CuPy stages it through pinned memory
        return to_device(idx, self.xp), to_device(targets, self.xp), n_valid

    @in_model_precision
    def forward(self, idx, targets=None, *, return_logits=True, requires_grad=True, loss_scale=1.0,
                loss_on_device=False):
        """idx (B,T) ints, targets (B,T) ints or None -> logits (B,T,V) or None, loss (a float; the 0-d
        value with loss_on_device; None without targets).

        Targets equal to -100 are ignored by the loss. With targets and `return_logits=False` the
        full logits are never built (training needs only the loss). With `requires_grad=False`
        nothing is kept for backward, which saves memory and, with targets, the output layer's
        gradient work.
        `loss_scale` multiplies the loss inside the backward's arithmetic and divides the finished
        gradients: it keeps small gradients from flushing to zero in float16 matmuls.
        With `loss_on_device` the loss is the 0-d value it was computed in, not a float: on a GPU,
        reading it would make the host wait for the whole forward (the trainer reads it once a step).
        """
        cfg, p = self.config, self.params
        if not (is_number(loss_scale) and 0 < loss_scale < math.inf):   # backward divides by it
            raise ConfigError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
        idx, targets, n_valid = self._batch_on_device(idx, targets)
        B, T = idx.shape
        rng = device_rng(self.xp, self.dropout_rng) if self.training and cfg.dropout > 0 else None

        keep = requires_grad and targets is not None   # a backward will follow: keep what it reads
        x, emb_cache = embedding_forward(idx, p["wte.weight"], p["wpe.weight"])      # (B,T,C)
        x, drop_cache = dropout_forward(x, cfg.dropout, rng)
        block_caches = []
        for i in range(cfg.n_layer):
            x, cache = block_forward(x, sub_params(p, f"h.{i}."), cfg.n_head, cfg.activation, cfg.dropout, rng)
            if keep:   # else each block's cache goes with the next block: evaluation holds one layer's, not all
                block_caches.append(cache)
            del cache
        x, ln_f_cache = layernorm_forward(x, p["ln_f.weight"], p.get("ln_f.bias"))    # (B,T,C)
        loss, logits, head_cache = classifier_forward(
            x.reshape(B * T, cfg.n_embd), self._head_weight(),
            None if targets is None else targets.reshape(-1), n_valid=n_valid,
            return_logits=return_logits, requires_grad=requires_grad, grad_scale=loss_scale)

        self._cache = ((emb_cache, drop_cache, block_caches, ln_f_cache, head_cache, (B, T), loss_scale)
                       if keep else None)
        logits = None if logits is None else logits.reshape(B, T, cfg.vocab_size)
        return logits, (loss if loss is None or loss_on_device else float(loss))

    @in_model_precision
    def backward(self):
        """Gradients of the last forward's mean loss: {name: array} with the keys and shapes of params.

        The returned arrays are valid until the next forward/backward, which may reuse them. With
        float16 matmuls a gradient may overflow to inf or nan: the caller checks (see DynamicLossScaler).
        """
        if self._cache is None:
            raise RuntimeError("backward() needs a preceding forward(idx, targets) with requires_grad=True")
        cfg = self.config
        emb_cache, drop_cache, block_caches, ln_f_cache, head_cache, (B, T), loss_scale = self._cache
        self._cache = None   # the caches are spent: free their memory now
        dx, dhead = classifier_backward(1.0, head_cache)                             # (B*T,C), (V,C)
        dx, dw, db = layernorm_backward(dx.reshape(B, T, cfg.n_embd), ln_f_cache)
        grads = named_grads("ln_f", dw, db)
        for i in reversed(range(cfg.n_layer)):
            # every block's activations are held to the end, not popped once read: popping took 330 MiB
            # off GPT-2 124M's peak, but the gradients then reused the freed memory piecemeal, and the
            # next step's forward met ~1,000 fresh page faults and ran 1.8% slower (CPU, batch 4 x 256)
            dx, block_grads = block_backward(dx, block_caches[i])
            grads.update(with_prefix(block_grads, f"h.{i}."))
        dx = dropout_backward(dx, drop_cache)
        if cfg.tie_weights:
            # wte is used twice, by the output layer and by the embedding: its gradient is the sum,
            # made by scatter-adding the embedding's rows into the output layer's
            grads["wte.weight"], grads["wpe.weight"] = embedding_backward(dx, emb_cache, dwte=dhead)
        else:
            grads["lm_head.weight"] = dhead
            grads["wte.weight"], grads["wpe.weight"] = embedding_backward(dx, emb_cache)
        grads = {name: grads[name] for name in self.params}
        if loss_scale != 1.0:   # the gradients of loss_scale * loss, back to those of the loss
            foreach.scale_(list(grads.values()), 1.0 / loss_scale)
        return grads

    # ---------------------------------------------------------------- generation

    def empty_kv_caches(self, batch):
        """One empty KVCache per layer, each room for block_size positions of `batch` rows."""
        cfg = self.config
        shape = (batch, cfg.n_head, cfg.block_size, cfg.head_size)        # (B,nh,block_size,hs)
        return [KVCache(self.xp, shape, self.dtype) for _ in range(cfg.n_layer)]

    @in_model_precision
    def decode(self, idx, kv_caches, *, return_attention=False):
        """The inference forward: idx (B,T) are the tokens after the `length` positions the caches
        hold -> logits (B,V) of the last position (and, with `return_attention`, a list with each
        layer's attention probabilities (B,nh,T,length+T)).

        Their keys and values join the caches. Only the last position goes through the output
        layer, because only it predicts a new token. No dropout, nothing kept for backward.
        """
        cfg, p = self.config, self.params
        # checked where they are (on the host in generation: no wait for the device), as forward's
        idx = self._as_ids(idx, "idx", xp=module_of(idx), any_length=True)
        rows = [kv_cache.k.shape[0] for kv_cache in kv_caches]
        if rows != [idx.shape[0]] * cfg.n_layer:   # fewer would skip layers, a batch of 1 broadcast into every row
            raise ValueError(f"decode needs n_layer = {cfg.n_layer} KV caches of idx's {idx.shape[0]} rows "
                             f"(empty_kv_caches({idx.shape[0]})), got {len(rows)} of {sorted(set(rows))} rows")
        start = kv_caches[0].length
        if start + idx.shape[1] > cfg.block_size:   # wpe has no rows beyond block_size
            raise ValueError(f"decode sees at most block_size = {cfg.block_size} positions: the caches hold "
                             f"{start}, and {idx.shape[1]} more do not fit")
        idx = to_device(idx, self.xp)
        x, _ = embedding_forward(idx, p["wte.weight"], p["wpe.weight"], start=start)  # (B,T,C)
        maps = []
        for i, kv_cache in enumerate(kv_caches):
            x, cache = block_forward(x, sub_params(p, f"h.{i}."), cfg.n_head, cfg.activation, kv_cache=kv_cache)
            if return_attention:
                maps.append(block_attention_probs(cache))
        x, _ = layernorm_forward(x[:, -1], p["ln_f.weight"], p.get("ln_f.bias"))      # (B,C)
        _, logits, _ = classifier_forward(x, self._head_weight())                       # (B,V)
        return (logits, maps) if return_attention else logits

    def attention_maps(self, idx):
        """idx (B,T) ints -> [att (B,nh,T,T) for each layer]: how much each position attends to
        each earlier one, in every head (as in evaluation: no dropout)."""
        idx = self._as_ids(idx, "idx", xp=module_of(idx))   # left where it is: decode moves it
        _, maps = self.decode(idx, self.empty_kv_caches(idx.shape[0]), return_attention=True)
        return maps

    @in_model_precision
    def residual_stream(self, idx):
        """idx (B,T) ints -> [x (B,T,C)], n_layer + 1 of them: the residual stream after the embeddings
        and after each block, as in evaluation (no dropout), for probes and interventions.
        (transformers' output_hidden_states gives the same, but its last is after ln_f.)"""
        cfg, p = self.config, self.params
        idx = self._as_ids(idx, "idx")
        x, _ = embedding_forward(idx, p["wte.weight"], p["wpe.weight"])             # (B,T,C)
        stream = [x]
        for i in range(cfg.n_layer):
            x, _ = block_forward(x, sub_params(p, f"h.{i}."), cfg.n_head, cfg.activation)
            stream.append(x)
        return stream

    def _last_logits(self, context):
        """Logits (B,V) of the last position of `context` (B,T) by a full forward in eval mode."""
        with self.evaluating():
            logits, _ = self.forward(context, requires_grad=False)
        return logits[:, -1]

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, *,
                        use_cache=True, with_logits=False):
        """Yield the new tokens one step at a time: ids (B,) int64 NumPy arrays, or (ids, logits)
        pairs with `with_logits`, logits (B,V) the NumPy float array the step's draw came from.

        Arguments as in generate. With `use_cache` the prompt runs through the model once (the
        prefill) and every later step runs only the token just drawn, against the KV caches.
        Once the context outgrows block_size the window slides: every token moves to another
        position, so each step refills the caches from the last block_size tokens, as costly as
        use_cache=False, which runs forward over the whole context every step (the reference).
        """
        check_sampling_args(temperature, top_k, top_p)
        if not is_count(max_new_tokens):
            raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not (seed is None or isinstance(seed, np.random.Generator) or is_count(seed)):
            raise ConfigError(f"seed must be an integer >= 0, a NumPy Generator or None, got {seed!r}")
        tokens = self._as_ids(idx, "idx", xp=np, any_length=True)          # (B,T) on the host: tiny
        # a plain method returning the generator, so that the checks above run now, not at the first step
        return self._steps(tokens, max_new_tokens, (temperature, top_k, top_p), np.random.default_rng(seed),
                           use_cache, with_logits)

    def _steps(self, tokens, max_new_tokens, sampling, rng, use_cache, with_logits):
        """generate_stream's loop, once its arguments are checked."""
        block_size = self.config.block_size
        window = tokens[:, -block_size:]               # (B,<=block_size): what the model sees
        kv_caches = self.empty_kv_caches(len(tokens)) if use_cache else None
        fresh = window                                 # the window's tokens the caches do not hold yet
        for _ in range(max_new_tokens):
            logits = self.decode(fresh, kv_caches) if use_cache else self._last_logits(window)
            logits = to_numpy(logits)                                              # (B,V)
            ids = sample_next(logits, *sampling, rng)                              # (B,)
            yield (ids, logits) if with_logits else ids
            if window.shape[1] < block_size:           # room left: the earlier positions stand
                window = np.concatenate([window, ids[:, None]], axis=1)
                fresh = ids[:, None]
            else:                                      # the window slides: every position changes
                window = np.concatenate([window[:, 1:], ids[:, None]], axis=1)
                fresh = window
                for kv_cache in kv_caches or ():
                    kv_cache.length = 0                # refilled from the whole window next step

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, *,
                 use_cache=True):
        """idx (B,T) ints -> (B, T + max_new_tokens): idx followed by sampled tokens.

        temperature 0 is greedy; top_k / top_p restrict the draw to the most likely tokens; `seed`
        (an int, or a NumPy Generator to continue) makes the draws repeatable. The context is
        cropped to the last block_size tokens. Every row gets max_new_tokens tokens: no token stops
        it (sample.py stops at <|endoftext|>). Returns an array of idx's array module (NumPy for
        lists). `use_cache=False` recomputes the whole context every step (see generate_stream).
        """
        out_xp = module_of(idx)
        tokens = self._as_ids(idx, "idx", xp=np, any_length=True)
        steps = self.generate_stream(tokens, max_new_tokens, temperature, top_k, top_p, seed, use_cache=use_cache)
        return to_device(np.concatenate([tokens, *(ids[:, None] for ids in steps)], axis=1), out_xp)
