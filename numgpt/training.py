"""The training loop behind train.py: data, model, AdamW, schedule, evaluation, checkpoints.

    for step in range(start, max_iters):
        lr = learning_rate(step)        # linear warmup, then cosine decay
        grads = mean over grad_accum micro-batches of model.backward()
        grads = mean of grads over the ranks (data-parallel runs only)
        clip the global gradient norm, then AdamW
        every eval_interval steps: estimate train/val loss, keep the best model, save the state

Everything that decides the run lives in one TrainConfig; the out-dir holds the best model as a
HuggingFace GPT-2 directory (config.json + model.safetensors, and the tokenizer's vocab.json +
merges.txt), the latest training state (train_state.safetensors, for --resume), log.jsonl and,
with matplotlib, loss.png.

With a `Communicator` of N ranks (numgpt.distributed) the same loop trains data-parallel: each rank
takes its rows of every batch and rank 0 alone logs and writes files. Nothing saved depends on N,
so a run can resume with another number of ranks.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from numgpt import checkpoint, foreach, seeds
from numgpt.allocator import keep_freed_memory
from numgpt.backend import backend_name, cupy_problem, get_xp, gpu_name, memory_size, to_numpy
from numgpt.config import GPTConfig, num_params, params_mismatch
from numgpt.console import counted
from numgpt.data import dataset
from numgpt.data.tokenizer import (EOT, HF_TOKENIZER_FILES, INSTALL_HINT, VOCAB_SIZE, bundled_bpe_files, get_tokenizer,
                                   write_hf_tokenizer)
from numgpt.distributed import Communicator, differences_from_rank_0, flat_buffer, main_first
from numgpt.errors import CheckpointError, ConfigError, DataError, TrainingError, describe_os_error, saying
from numgpt.layers.classifier import CHUNK_ELEMENTS
from numgpt.model import GPT
from numgpt.optim import AdamW, clip_coefficient, global_norm, no_decay_names
from numgpt.precision import PRECISIONS, DynamicLossScaler, all_finite, set_tf32
from numgpt.train_state import (GROUPS, STATE_FILE, damaged_state, load_train_state, save_train_state,
                                saved_step)

LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
# every file a run writes in its out-dir: a new run refuses an out-dir that holds one (unless --overwrite);
# the state first, as the first checkpoint removes them (Trainer.evaluate)
# a loss scale this small makes float16 gradients of size 1 its smallest subnormal: overflow that
# persists down to it is not the gradients' (which the scale sets), but values it does not reach
MIN_LOSS_SCALE = 2.0 ** -24
RUN_FILES = (STATE_FILE, checkpoint.WEIGHTS_FILE, checkpoint.CONFIG_FILE, LOG_FILE, PLOT_FILE, *HF_TOKENIZER_FILES)
# of those, the ones other programs write too: alone, they are not a run's
SHARED_NAMES = {checkpoint.CONFIG_FILE, PLOT_FILE, *HF_TOKENIZER_FILES}
SAMPLE_PROMPT = "Once upon a time"
DEFAULT_SEED = 1337


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are the bare `python train.py` run: a small
    model on the embedded stories that finishes in a few CPU minutes."""

    dataset: str = "auto"             # auto | tinystories | embedded; with data, only auto (or files)
    data: list = field(default_factory=list)   # local text files
    out_dir: str = "out"
    cache_dir: str = field(default_factory=lambda: str(dataset.user_cache_home() / "numgpt"))
    init_from: str = "scratch"        # scratch, or a HuggingFace GPT-2 directory to fine-tune
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    activation: str = "gelu"
    tie_weights: bool = True          # the output layer is the token embedding wte, as in GPT-2
    bias: bool = True                 # biases in the linear layers and layernorms, as in GPT-2
    # optimisation
    max_iters: int = 600
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = None              # None: lr / 10, nanoGPT's convention, so a lower --lr alone works
    warmup_iters: int = 50
    beta2: float = 0.99               # nanoGPT's choice for small models; torch's default is 0.999
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # evaluation and samples
    eval_interval: int = 100
    eval_iters: int = 10
    num_samples: int = 3
    sample_tokens: int = 120
    # machine
    seed: int = DEFAULT_SEED          # the weights' init, the batches' order, dropout, the samples
    # the fixed evaluation batches': the same windows of the data whatever --seed, so that runs of
    # several seeds are scored alike (--seed's default: the default run's batches are as before)
    eval_seed: int = DEFAULT_SEED
    backend: str = "numpy"
    dtype: str = "float32"
    precision: str = "fp32"          # fp32, tf32 or fp16 (mixed): see numgpt.precision

    def __post_init__(self):
        # resolved here, not where it is used, so the saved config records the rate actually used
        if self.min_lr is None:
            self.min_lr = self.lr / 10

    def validate(self):
        """Raise ConfigError naming the first setting that cannot work; it needs no data and no
        out-dir, so a mistake is reported before anything slow or lasting happens."""
        for f in dataclasses.fields(self):
            if f.type is int and getattr(self, f.name) >= 2**63:   # NumPy counts in int64
                raise ConfigError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)} is too large: "
                                  f"the limit is 2**63 - 1")
        for name in ("out_dir", "cache_dir"):   # "" names no directory (the cache's would be the current one)
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is empty: name a directory")
        positive = ("n_layer", "n_head", "n_embd", "block_size", "max_iters", "batch_size", "grad_accum",
                    "eval_interval", "eval_iters")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.beta2 < 1:
            raise ConfigError(f"--beta2 must be in (0, 1), got {self.beta2}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr must be in [0, lr = {self.lr}], got {self.min_lr}")
        # NaN compares false with everything, so `< 0` alone would let --grad-clip nan switch clipping off
        for name in ("warmup_iters", "weight_decay", "grad_clip", "num_samples", "sample_tokens", "seed", "eval_seed"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.lr * self.weight_decay >= 1:   # each step multiplies the weights by 1 - lr * weight_decay
            raise ConfigError(f"--weight-decay {self.weight_decay} with --lr {self.lr} would shrink the weights "
                              f"to 0 or past it every step: lr * weight_decay must be below 1")
        if not 0 <= self.dropout < 1:   # GPTConfig checks it too, but would not name the flag
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        self.model_config()   # n_embd divisible by n_head, a known activation
        if self.data and self.dataset not in ("auto", "files"):
            raise ConfigError(f"--data and --dataset {self.dataset} are two data sources: give one of them")
        if self.dataset not in ("auto", "tinystories", "embedded", "files"):
            raise ConfigError(f"--dataset must be auto, tinystories or embedded (or files, with --data), "
                              f"got {self.dataset!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "fp32" and self.dtype != "float32":
            raise ConfigError(f"--precision {self.precision} lowers float32 arithmetic: it needs --dtype float32")

    def model_config(self):
        """The GPTConfig of a model trained from scratch with these settings (GPTConfig checks them)."""
        return GPTConfig(vocab_size=VOCAB_SIZE, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, dropout=self.dropout, activation=self.activation,
                         tie_weights=self.tie_weights, bias=self.bias)


# Named setups. "tinystories-tutorial" is the classic PyTorch TinyStories tutorial: a 4-layer,
# 128-wide GPT with ReLU, batch 32 x 64 tokens, dropout 0.1, AdamW at a constant 1e-3, 2000 steps.
PRESETS = {
    "default": {},
    "tinystories-tutorial": dict(dataset="tinystories", n_layer=4, n_head=4, n_embd=128, block_size=64,
                                 dropout=0.1, activation="relu", max_iters=2000, batch_size=32, lr=1e-3,
                                 min_lr=1e-3, warmup_iters=0, beta2=0.999, weight_decay=0.01, grad_clip=0.0,
                                 eval_interval=200, eval_iters=50),
}


def learning_rate(step, cfg):
    """Linear warmup over warmup_iters, then cosine decay from lr to min_lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * ((step + 1) / (cfg.warmup_iters + 1))   # the fraction first: lr * (step + 1) may overflow
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


# ---------------------------------------------------------------- data

def choose_source(cfg, log):
    """The data source to use ("files", "tinystories" or "embedded"), saying which and why."""
    if cfg.data:
        return "files"
    if cfg.dataset != "auto":
        return cfg.dataset
    available, reason = dataset.tinystories_available()
    if available:
        log(f"data: TinyStories ({reason})")
        return "tinystories"
    log(f"data: the embedded stories, because TinyStories cannot be used: {reason}")
    return "embedded"


def load_data(cfg, source, log):
    """(train tokens, val tokens) as uint16 arrays, each long enough for one block."""
    splits = [dataset.load_split_tokens(source, split, cfg.cache_dir, cfg.data, log) for split in ("train", "val")]
    for split, tokens in zip(("train", "val"), splits):
        if len(tokens) <= cfg.block_size:
            raise dataset.too_short(f"the {split} split", len(tokens), cfg.block_size)
    return splits


# ---------------------------------------------------------------- model and optimizer

def build_model(cfg, params=None, config=None, take=False):
    """A model of `params` and `config` when given (a saved training state's, or the --init-from
    checkpoint's as load_init_from reads it), else a fresh one of cfg's shape; in cfg's precision
    (Trainer.setup has switched TF32 on or off). With `take` the model takes the arrays of `params`
    (they leave the dict: see numgpt.model.model_arrays) instead of copying them."""
    kwargs = dict(backend=cfg.backend, dtype=cfg.dtype, matmul_dtype="float16" if cfg.precision == "fp16" else None)
    if params is not None:
        return GPT(config, params=params, take_params=take, **kwargs)
    return GPT(cfg.model_config(), seed=cfg.seed, **kwargs)


def load_init_from(cfg):
    """(GPTConfig with cfg's dropout, {name: array}) of the --init-from checkpoint, read whole and
    checked (its checksums included: see checkpoint.load_pretrained)."""
    config, params = checkpoint.load_pretrained(cfg.init_from)
    check_block_size(cfg, config)
    return dataclasses.replace(config, dropout=cfg.dropout), params


def check_block_size(cfg, config):
    """ConfigError when cfg's block size exceeds that of its --init-from model's `config`: the
    position embedding has no rows beyond it."""
    if cfg.block_size > config.block_size:
        raise ConfigError(f"--block-size {cfg.block_size} exceeds the block size {config.block_size} "
                          f"of {cfg.init_from}")


# the settings of the model's shape, which an --init-from checkpoint decides
CHECKPOINT_SHAPE = ("n_layer", "n_head", "n_embd", "activation", "tie_weights", "bias")


def shape_flag(name, value):
    """The flag that asks for `value` of setting `name`: "--n-layer 4", "--no-bias"."""
    dashed = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{dashed}" if value else f"--no-{dashed}"
    return f"--{dashed} {value}"


def with_checkpoint_shape(cfg, given):
    """cfg with the shape of its --init-from model, so the log and the saved config describe the
    model trained; ConfigError when a flag in `given` (the flags typed) asks for another shape. A
    block size not typed is cut to the checkpoint's, when that is shorter than the default."""
    config = checkpoint.load_config(cfg.init_from)   # config.json alone: load_init_from reads the weights
    if config.vocab_size < VOCAB_SIZE:   # found now, not after minutes of tokenizing
        raise ConfigError(f"{cfg.init_from} has a vocabulary of {counted(config.vocab_size, 'token')}, and the "
                          f"training data are GPT-2 tokens (ids up to {VOCAB_SIZE - 1}): fine-tune a model with "
                          f"GPT-2's vocabulary")
    for name in CHECKPOINT_SHAPE:
        if name in given and given[name] != getattr(config, name):
            # each value as its flag: the --no-bias typed, not "--bias (True)", which names a flag not typed
            typed, theirs = shape_flag(name, given[name]), shape_flag(name, getattr(config, name))
            raise ConfigError(f"{typed} conflicts with the --init-from checkpoint, which has {theirs}: drop "
                              f"{typed.split()[0]} (fine-tuning keeps the checkpoint's shape)")
    shape = {name: getattr(config, name) for name in CHECKPOINT_SHAPE}
    if "block_size" not in given:
        shape["block_size"] = min(cfg.block_size, config.block_size)
    cfg = dataclasses.replace(cfg, **shape)
    check_block_size(cfg, config)   # now, not after the data: load_init_from checks it again for the library's callers
    return cfg


def memory_floor(cfg, config, backend="numpy", ranks=1):
    """Bytes that one rank of a run with these settings surely holds at once, a floor below what
    it needs: the weights, their gradients and AdamW's two moments; of every layer, the activations
    its backward reads, at least 12 numbers a token (the block's input, q, k, v and the MLP's
    hidden layer before and after its activation), and the attention probabilities (B,nh,T,T)
    where they are formed (on the CPU; on a GPU under dropout, which drops some of them, and then
    twice: before and after); a chunk of the classifier's logits, at least
    half its budget when the logits exceed it; the fixed evaluation batches; the stories generated
    at the end (their tokens and the keys and values cached for them)."""
    itemsize = np.dtype(cfg.dtype).itemsize
    params = num_params(config)
    tokens = cfg.batch_size // ranks * cfg.block_size                    # one micro-batch on this rank
    activations = config.n_layer * tokens * 12 * config.n_embd
    if backend == "numpy" or config.dropout > 0:   # see attention_forward: the GPU's kernel has no dropout
        activations += config.n_layer * tokens * config.n_head * cfg.block_size * (1 + (config.dropout > 0))
    logits = min(tokens * config.vocab_size, CHUNK_ELEMENTS[backend] // 2)
    eval_ids = 2 * cfg.eval_iters * 2 * tokens * 8                       # train and val, x and y, int64
    story_tokens = cfg.num_samples * cfg.sample_tokens
    kv_caches = config.n_layer * 2 * min(story_tokens, cfg.num_samples * config.block_size) * config.n_embd
    return itemsize * (4 * params + activations + logits + kv_caches) + eval_ids + 8 * story_tokens


def check_memory(cfg, config, xp, ranks=1, local_ranks=1):
    """ConfigError when a run with these settings cannot fit in `xp`'s memory, before it allocates
    any of it (an allocation far beyond the machine may not fail: the system can kill the process).
    The `local_ranks` of `ranks` that run on this machine share its RAM; a GPU is one rank's own."""
    floor, size = memory_floor(cfg, config, backend_name(xp), ranks), memory_size(xp)
    sharing = local_ranks if backend_name(xp) == "numpy" else 1
    if size is not None and floor * sharing > size:
        each = f" for each of this machine's {sharing} ranks" if sharing > 1 else ""
        raise ConfigError(f"these settings need more than {floor / 2**30:,.1f} GiB of memory{each}, and this "
                          f"{'GPU' if backend_name(xp) == 'cupy' else 'machine'} has {size / 2**30:,.1f} GiB: "
                          f"use a smaller --batch-size, --block-size, --eval-iters, --num-samples or "
                          f"--sample-tokens, or a smaller model (--n-layer, --n-embd)"
                          + (", or fewer ranks on this machine" if sharing > 1 else ""))


# The settings whose values may differ between ranks: paths, which may differ between machines.
# What they hold (the tokens, the step and the weights) is compared once it is read.
RANK_LOCAL_SETTINGS = ("out_dir", "cache_dir", "data", "init_from")


def refuse_ranks_that_differ(comm, facts):
    """ConfigError on a rank whose `facts` ({name: value}) differ from rank 0's. Ranks started with
    other flags, or that read another state or other text (an out-dir or a data file that is not
    the same on every machine), would wait for each other forever, crash in MPI, or train two
    models as one, silently."""
    differing = differences_from_rank_0(comm, facts)
    if differing:
        raise ConfigError(f"this rank's run differs from rank 0's in {', '.join(differing)}: start every rank "
                          f"with the same flags and data, and an --out-dir that every machine shares")


def check_ranks_agree(comm, cfg):
    """refuse_ranks_that_differ on the settings and the array backend they resolve to, before the
    data and before the device's communicator: a rank on another backend would never join the
    collectives that set up NCCL, and the job would hang there."""
    facts = {f"--{name.replace('_', '-')}": value for name, value in dataclasses.asdict(cfg).items()
             if name not in RANK_LOCAL_SETTINGS}
    facts["the backend"] = backend_name(get_xp(cfg.backend))   # --backend auto: per machine
    refuse_ranks_that_differ(comm, facts)


def build_optimizer(model, cfg):
    """AdamW with nanoGPT's decay groups: the matrices are decayed, biases and layernorms are not."""
    return AdamW(model.params, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8,
                 weight_decay=cfg.weight_decay, exclude_from_decay=no_decay_names(model.params))


def estimate_loss(model, batches):
    """Mean loss over fixed batches, in eval mode (no dropout), without backward work. The model
    is handed back in the mode it came in."""
    with model.evaluating():
        losses = [model.forward(x, y, return_logits=False, requires_grad=False, loss_on_device=True)[1]
                  for x, y in batches]
    # summed in float64, as the floats were; one read from the device, not one per batch
    return float(sum(loss.astype(np.float64) for loss in losses)) / len(losses)


def generate_samples(model, n, max_new_tokens, seed, prompt=SAMPLE_PROMPT):
    """`n` stories continuing `prompt`, each cut at the first end-of-text token."""
    enc = get_tokenizer()
    prompt_ids = np.array([enc.encode_ordinary(prompt)] * n)
    out = model.generate(prompt_ids, max_new_tokens, temperature=0.8, top_k=200,
                         seed=seeds.stream(seed, seeds.SAMPLES))
    texts = []
    for row in np.asarray(out)[:, prompt_ids.shape[1]:]:
        row = list(row)
        row = row[:row.index(EOT)] if EOT in row else row
        texts.append(prompt + enc.decode([int(t) for t in row if t < enc.n_vocab]))
    return texts


# ---------------------------------------------------------------- the log

def read_log(path):
    """The rows of log.jsonl, each a dict with an integer "step". A last line that is not JSON is
    left out: it is the half-written row of a run killed while writing it (the row is lost, the
    run is not). Any other damage is a CheckpointError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e}): restore it, or delete it to start the "
                              f"log anew") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        # ValueError: JSONDecodeError, or an integer of more digits than Python converts; RecursionError:
        # JSON nested deeper than Python's stack
        except (ValueError, RecursionError):
            if number == len(lines):
                continue
            raise CheckpointError(f"line {number} of {path} is not JSON: repair or delete that line") from None
        if not (isinstance(row, dict) and checkpoint.JSON_KINDS["an integer"](row.get("step"))):
            raise CheckpointError(f"line {number} of {path} is not a row of numgpt's log (an object with an "
                                  f"integer \"step\"): repair or delete that line")
        rows.append(row)
    return rows


def _open_no_symlink(path, flags):
    """os.open for open(..., opener=): a symbolic link at `path` is an error (ELOOP), not followed.
    An out-dir copied from elsewhere could hold log.jsonl as a link to any file of this machine,
    which the run's rows would be appended to, or created at, outside the out-dir. (Windows has no
    O_NOFOLLOW; there, creating a link needs an administrator.)"""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


def rewrite_log(path, last_step):
    """Keep only the rows up to `last_step`: a resumed run rewrites what came after its checkpoint
    (and a half-written last row goes too)."""
    if not os.path.exists(path):
        return
    rows = [row for row in read_log(path) if row["step"] <= last_step]
    checkpoint.atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def plot_losses(log_path, png_path):
    """Train and val loss against step as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train (per step)")
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with checkpoint.atomic_writer(png_path) as f:   # an image viewer never sees half a PNG
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- the out-dir

def remove_files(directory, names):
    """Delete the files `names` in `directory` that exist."""
    for name in names:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.remove(path)


def lock_directory(path):
    """An open descriptor of directory `path` that holds an exclusive flock on it, or ConfigError
    when another process holds one: two runs in one out-dir would overwrite each other's
    checkpoints and interleave their logs. None where flock is not to be had (Windows, some
    network file systems): the run then goes on unguarded."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another training run is using {path}/ now: wait until it ends, or choose "
                          f"another --out-dir") from None
    except OSError:
        os.close(fd)
        return None
    return fd


def refuse_previous_run(out_dir):
    """ConfigError when `out_dir` holds a file that a run writes: a training run (its state, model or
    log), or a config.json or loss.png of something else, which the first checkpoint would replace."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not found:
        return
    them = "them" if len(found) > 1 else "it"
    if set(found) <= SHARED_NAMES:
        raise ConfigError(f"{out_dir}/ holds {', '.join(found)}, which this run would overwrite: choose "
                          f"another --out-dir, or give --overwrite to replace {them}")
    if STATE_FILE not in found:   # left by a run killed during its first checkpoint, or by another program
        raise ConfigError(f"{out_dir}/ holds {', '.join(found)} but no {STATE_FILE}, so --resume cannot "
                          f"continue it (as a run stopped during its first checkpoint can leave it): start over "
                          f"with --overwrite, which replaces {them}, or choose another --out-dir")
    step = saved_step(out_dir)
    raise ConfigError(f"{out_dir}/ already holds a training run{'' if step is None else f' (step {step})'}: "
                      f"continue it with --resume, start over with --overwrite, or choose another --out-dir")


# ---------------------------------------------------------------- Ctrl-C and SIGTERM

class StopRequest:
    """The first Ctrl-C (SIGINT), or SIGTERM (what `kill`, `timeout` and batch schedulers send
    before they kill), asks the loop to stop after the current step or evaluation, so the state
    saved is a whole step, never a half-applied update; a second one aborts at once. With
    `notice`, the first says so on stderr. `signum` is the signal that asked, or None."""

    NOTICES = {signal.SIGINT: b"\nCtrl-C: stopping after this step (press it again to stop at once)\n",
               signal.SIGTERM: b"\nSIGTERM: stopping after this step (send it again to stop at once)\n"}

    def __init__(self, notice=True):
        self.signum = None
        self.notice = notice
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.NOTICES}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum
        if self.notice:
            # os.write, not print: a signal handler that prints while the interrupted code is
            # printing too would fail with "reentrant call" on the stream's lock. A notice that
            # cannot be written (stderr closed, or captured without a descriptor) must not stop the step.
            try:
                os.write(sys.stderr.fileno(), self.NOTICES[signum])
            except (OSError, ValueError):
                pass


# ---------------------------------------------------------------- the run

def missing_dirs(path):
    """The directories that os.makedirs(path) would create, deepest first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


class Trainer:
    """One training run: `with Trainer(cfg, log) as trainer:`, then `trainer.setup()` (or
    `setup(resume=True)`) to load the data and build the model, then `trainer.run()`. The out-dir
    is locked against other runs from setup until the block ends. With `comm`
    (numgpt.distributed), one rank of a data-parallel run, in which cfg.batch_size is the global
    batch, split evenly across the ranks."""

    def __init__(self, cfg, log=print, progress=True, comm=None):
        self.cfg, self.comm = cfg, comm or Communicator()
        self.is_main = self.comm.rank == 0
        self.log = log if self.is_main else (lambda message: None)
        self.progress = progress and self.is_main
        self.stop = StopRequest(notice=self.is_main)
        self.out_dir_lock = None
        self.made_dirs = []           # the out-dir and the parents setup created for it, deepest first
        self.checkpoint_step = None   # the step of the state saved or resumed in the out-dir, if any
        self.grad_norm = None         # the last step's gradient norm before clipping (None: not clipped, or skipped)

    def close(self):
        """Let another run use the out-dir (the lock goes with the process too, however it ends),
        and remove the out-dir, and the parents, that setup made if the run failed before it saved
        anything there."""
        if self.out_dir_lock is not None:
            os.close(self.out_dir_lock)
            self.out_dir_lock = None
        if self.checkpoint_step is None and self.is_main:
            for directory in self.made_dirs:   # deepest first: each is empty once its child is gone
                try:
                    os.rmdir(directory)
                except FileNotFoundError:      # makedirs failed above it
                    continue
                except OSError:                # not empty: a file of someone else's, or a partial save
                    break
        self.made_dirs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def setup(self, resume=False, overwrite=False):
        """Load the data and build the model and optimizer, fresh or from the out-dir's state.

        A fresh run refuses an out-dir that holds another run, unless `overwrite`: it would replace
        that run's trained model with an untrained one and mix the two logs. With `overwrite`, the
        old run's files are replaced by this run's first checkpoint (see `run`), not before."""
        cfg, comm = self.cfg, self.comm
        if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
            raise ConfigError(f"--out-dir {cfg.out_dir} is a file, not a directory: choose another --out-dir")
        if not resume and not overwrite:
            refuse_previous_run(cfg.out_dir)
        if cfg.batch_size % comm.size:
            if resume:   # the saved run keeps its batch: what can change is the number of ranks
                divisors = [str(n) for n in range(1, cfg.batch_size + 1) if cfg.batch_size % n == 0]
                choices = f"{', '.join(divisors[:-1])} or {divisors[-1]} ranks" if len(divisors) > 1 else "1 rank"
                raise ConfigError(f"this run's global batch of {cfg.batch_size} rows (--batch-size) is split "
                                  f"evenly across the ranks, which {comm.size} cannot do: resume it on {choices}")
            raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch, split evenly across the "
                              f"{comm.size} ranks: give a multiple of {comm.size}")
        if comm.size > 1:
            self.log(f"data-parallel: {comm.size} ranks, {cfg.batch_size // comm.size} rows of each batch on each")
        state = load_train_state(cfg.out_dir) if resume else None
        config = self._model_config(state)
        xp = get_xp(cfg.backend)
        if cfg.backend == "auto" and xp is np:
            self.log(f"--backend auto: training on the CPU, because {cupy_problem()}")
        set_tf32(xp, cfg.precision == "tf32")   # which refuses tf32 on NumPy: before the data, as the rest
        check_memory(cfg, config, xp, comm.size, comm.local_size)   # before minutes of loading data
        self.made_dirs = missing_dirs(cfg.out_dir)
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
        except OSError as e:   # a path through a file, a directory without write permission
            raise ConfigError(f"cannot create --out-dir {cfg.out_dir}: {e.strerror}") from None
        if self.is_main:
            problem = checkpoint.cannot_write_in(cfg.out_dir)   # before the data, not at the first checkpoint
            if problem:
                raise ConfigError(f"cannot write in --out-dir {cfg.out_dir}: {problem}")
            # first the lock, then the cleanup: another run's temporary files are not stale
            self.out_dir_lock = lock_directory(cfg.out_dir)
            checkpoint.remove_stale_temp_files(cfg.out_dir)
            if os.path.islink(self.log_path):   # named now, not at the first row (see _open_no_symlink)
                raise CheckpointError(f"{self.log_path} is a symbolic link, which numgpt does not write "
                                      f"through: replace it with the file itself, or delete it")
            if os.path.exists(self.log_path) and not os.path.isfile(self.log_path):   # a FIFO's open waits for ever
                raise CheckpointError(f"{self.log_path} is not a regular file (a directory, a FIFO or a device): "
                                      f"move it away, or delete it")
            if state is not None and os.path.exists(self.log_path):
                read_log(self.log_path)   # a damaged log is named now, not after the data
            if bundled_bpe_files() is None:   # a broken install: tiktoken's cache has no files to copy
                self.log(f"note: the out-dir gets no {' or '.join(HF_TOKENIZER_FILES)}, so transformers will not "
                         f"find a tokenizer there: {INSTALL_HINT}")
        # --init-from's weights are read and checked before the data, which can take minutes: a
        # truncated or damaged file is named now, not after them
        pretrained_config, pretrained = None, None
        if state is None and cfg.init_from != "scratch":
            pretrained_config, pretrained = load_init_from(cfg)
        # rank 0 chooses the data (every rank must train on the same) and tokenizes it into the
        # cache; the other ranks then read the cache instead of tokenizing the same text again
        self.source = comm.broadcast(self._choose_source(state) if self.is_main else None)
        with main_first(comm):
            self.train_tokens, self.val_tokens = load_data(cfg, self.source, self.log)
        # the model takes the arrays just read: no second copy of the weights during setup
        self.model = (build_model(cfg, pretrained, pretrained_config, take=True) if state is None
                      else self._model_from_state(state[0], config))
        del pretrained
        if backend_name(self.model.xp) == "numpy":
            keep_freed_memory()   # every step reuses the last step's memory: no page faults (see there)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scaler = DynamicLossScaler() if cfg.precision == "fp16" else None
        if self.scaler is not None and backend_name(self.model.xp) == "numpy":
            self.log("note: --precision fp16 on the CPU gives the GPU's arithmetic at a fraction of the speed "
                     "(NumPy has no float16 BLAS); use it with --backend cupy")
        # every gradient lives in one flat buffer, with two more slots for the step's loss and
        # stop flag: averaging all of it across the ranks is one allreduce per step
        self.flat_grads, self.grads = flat_buffer(self.model.params, extra=2)
        # every rank draws the same global batches from the same generator and keeps its rows
        self.batcher = dataset.Batcher(self.train_tokens, cfg.batch_size, cfg.block_size,
                                       seed=seeds.stream(cfg.seed, seeds.BATCHES))
        # fixed evaluation batches: every evaluation sees the same data, so the curve is comparable,
        # and they come from their own generators, so evaluating never shifts the training batches
        self.eval_batches = {
            split: [comm.shard(dataset.get_batch(tokens, cfg.batch_size, cfg.block_size,
                                                 seeds.stream(cfg.eval_seed, seeds.EVAL_BATCHES, i, k)))
                    for k in range(cfg.eval_iters)]
            for i, (split, tokens) in enumerate((("train", self.train_tokens), ("val", self.val_tokens)))}
        self.step, self.best_val = 0, float("inf")
        self.resumed = state is not None
        if self.resumed:
            self._restore(*state)
        # what the paths hold; the settings themselves are compared before the device's communicator
        # is built (train.py calls check_ranks_agree; a program that builds its own Trainer should too)
        if comm.size > 1:
            refuse_ranks_that_differ(comm, {
                "the training tokens": checkpoint.crc32(self.train_tokens),
                "the validation tokens": checkpoint.crc32(self.val_tokens), "the step": self.step,
                "the weights": [checkpoint.crc32(to_numpy(p)) for p in self.model.params.values()]})

    def _choose_source(self, state):
        """choose_source's answer, except that a resumed --dataset auto run keeps the source it
        trained on: choosing again could switch datasets mid-run (TinyStories online, offline not)."""
        cfg = self.cfg
        if state is None or cfg.data or cfg.dataset != "auto":
            return choose_source(cfg, self.log)
        source = state[1]["source"]
        if source == "files":   # the run trained on files, and --dataset auto replaced them
            return choose_source(cfg, self.log)
        if source not in ("tinystories", "embedded"):
            raise damaged_state(cfg.out_dir, f"its data source {source!r} is not a dataset")
        if source == "tinystories":
            available, reason = dataset.tinystories_available()
            if not available:
                raise DataError(f"this run trained on TinyStories, which cannot be used now: {reason}. "
                                f"Make it available again, or continue on other data with --dataset embedded")
        return source

    def _model_config(self, state):
        """The GPTConfig of the model this run trains: the saved one when it resumes."""
        cfg = self.cfg
        if state is not None:
            try:
                return GPTConfig(**state[1]["model_config"])
            except (TypeError, ConfigError) as e:
                raise damaged_state(cfg.out_dir, f"its model_config: {e}") from None
        if cfg.init_from != "scratch":
            return dataclasses.replace(checkpoint.load_config(cfg.init_from), dropout=cfg.dropout)
        return cfg.model_config()

    def _model_from_state(self, arrays, config):
        # every tensor is checked before any is copied: NumPy would broadcast some wrong shapes silently
        for group in GROUPS:
            problem = params_mismatch(config, arrays[group])
            if problem:
                raise damaged_state(self.cfg.out_dir, f"its {group} tensors do not match its model_config: {problem}")
        return build_model(self.cfg, params=arrays["param"], config=config, take=True)

    def _restore(self, arrays, info):
        # the scalars are converted here, so a value of the wrong kind fails now and not mid-run
        try:
            adam_step = int(info["adam_step"])
            if self.scaler is not None and "loss_scaler" in info:   # absent when the run was not fp16 before
                self.scaler.load_state_dict(info["loss_scaler"])
            self.batcher.set_state(info["data_rng"])
            self.step, self.best_val = int(info["step"]), float(info["best_val_loss"])
            self.checkpoint_step = self.step
        except (TypeError, KeyError, ValueError, OverflowError) as e:   # OverflowError: rng integers out of range
            raise damaged_state(self.cfg.out_dir, f"{type(e).__name__}: {e}") from None
        # outside the try: the moments' shapes were checked with the parameters', so an error here is
        # numgpt's, not the file's, and must not be reported as a damaged state
        self.optimizer.load_state_dict({"step": adam_step, "m": arrays["adam_m"], "v": arrays["adam_v"]})
        # the model and the optimizer hold the state's numbers now: the file's copies go before the
        # best model is read and training starts (at GPT-2 124M, a second 1.4 GiB)
        arrays.clear()
        if self.is_main:
            rewrite_log(self.log_path, self.step)
        self.log(f"resumed from {self.cfg.out_dir} at step {self.step} (best val loss {self.best_val:.4f})")
        saved_max_iters = info["train_config"].get("max_iters")
        steps_left = self.step < self.cfg.max_iters
        if not steps_left:   # the run only evaluates and samples again: say how it would go on
            self.log(f"note: the run has trained its {counted(self.step, 'step')} (--max-iters {self.cfg.max_iters}); "
                     f"a larger --max-iters trains it further")
        if isinstance(saved_max_iters, int) and saved_max_iters != self.cfg.max_iters and steps_left:
            # the cosine ends at max_iters: a new end moves the rates after this step, and after a
            # finished run's min_lr they rise again, which a loss curve shows without saying why
            saved = learning_rate(self.step, dataclasses.replace(self.cfg, max_iters=saved_max_iters))
            now = learning_rate(self.step, self.cfg)
            if now != saved:   # in the warmup, the end moves nothing yet
                self.log(f"note: the learning rate's cosine decay now ends at --max-iters {self.cfg.max_iters}, "
                         f"not at the run's {saved_max_iters}: at step {self.step} it is {now:.3g}, where it "
                         f"was {saved:.3g}")
        # a deleted or damaged best model would be replaced only by a loss below its record: never, maybe
        problem = self.comm.broadcast(self._best_model_problem() if self.is_main else None)
        if problem:
            self.log(f"note: the best model in {self.cfg.out_dir} cannot be used ({problem}); the next "
                     f"evaluation saves the model it has then")
            self.best_val = float("inf")
        # --data or --dataset may change on --resume (to go on training on other text); the saved
        # record was measured on the old validation split, and a loss on the new one does not compare
        elif (self.source, self.cfg.data) != (info["source"], info["train_config"].get("data", [])):
            self.log(f"note: the run trained on other data before; its best val loss {self.best_val:.4f} "
                     f"was measured on that data's validation split, so the next evaluation saves the "
                     f"model it has then")
            self.best_val = float("inf")

    def _best_model_problem(self):
        """Why the out-dir's best model cannot be loaded as this run's model, or None."""
        try:
            _, params = checkpoint.load_pretrained(self.cfg.out_dir)
        except CheckpointError as e:
            return str(e)
        return params_mismatch(self.model.config, params)

    def save_state(self):
        """Write the training state (rank 0 only: every rank holds the same one)."""
        if self.is_main:
            info = {"step": self.step, "best_val_loss": self.best_val, "model_config": self.model.config.to_dict(),
                    "train_config": dataclasses.asdict(self.cfg), "source": self.source,
                    "data_rng": self.batcher.state()}
            if self.scaler is not None:
                info["loss_scaler"] = self.scaler.state_dict()
            save_train_state(self.cfg.out_dir, self.model, self.optimizer, info)
        self.checkpoint_step = self.step   # only once written: a failed save claims no checkpoint

    def train_step(self):
        """One optimizer step over grad_accum micro-batches of this rank's rows, the gradients
        averaged across the ranks. Returns (mean loss, whether any rank was asked to stop).

        With fp16 matmuls the backward works on the loss times the scaler's scale; a step whose
        gradients overflowed is skipped (the parameters and AdamW's moments do not move) and the
        scale halved, as every rank decides alike from the same averaged gradients."""
        cfg, model, grads = self.cfg, self.model, self.grads
        loss_scale = 1.0 if self.scaler is None else self.scaler.scale
        # the dropout masks of step s on rank r come from a generator seeded by (seed, s, r): a
        # resume draws the same masks without saving any generator state, and every rank's rows
        # get masks of their own (so with dropout, N ranks match N ranks, not 1 process)
        model.dropout_rng = seeds.stream(cfg.seed, seeds.DROPOUT, self.step, self.comm.rank)
        total_loss = 0.0
        for micro_step in range(cfg.grad_accum):
            x, y = self.comm.shard(self.batcher.next_batch())
            # the loss stays on the device: the step's one read of it is at its end, for the log
            _, loss = model.forward(x, y, return_logits=False, loss_scale=loss_scale, loss_on_device=True)
            total_loss = total_loss + loss / cfg.grad_accum
            micro_grads = model.backward()
            foreach.accumulate_(list(grads.values()), [micro_grads[name] for name in grads], cfg.grad_accum,
                                add=micro_step > 0)
        # the loss and a stop request (Ctrl-C, SIGTERM) travel with the gradients, so all ranks agree
        # on when to stop
        self.flat_grads[-2], self.flat_grads[-1] = total_loss, float(self.stop.requested)
        self.comm.allreduce_mean(self.flat_grads)
        norm = None
        if self.gradients_usable():
            clip = None
            if cfg.grad_clip > 0:   # as a factor inside AdamW's update: on a GPU the step never waits for it
                norm = global_norm(grads)
                clip = clip_coefficient(grads, cfg.grad_clip, norm)
            self.optimizer.lr = learning_rate(self.step, cfg)
            self.optimizer.step(grads, grad_scale=clip)
        xp = self.model.xp
        read = self.flat_grads[-2:] if norm is None else xp.concatenate([self.flat_grads[-2:], xp.reshape(norm, 1)])
        values = to_numpy(read).tolist()   # the step's one read from the device
        self.grad_norm = None if norm is None else values[2]
        return values[0], values[1] > 0

    def gradients_usable(self):
        """False when fp16 gradients overflowed (the scaler then halves its scale); else True."""
        if self.scaler is None:
            return True
        finite = all_finite([self.flat_grads])   # every gradient is in the flat buffer: one pass
        self.scaler.update(finite)
        if not finite:
            if self.scaler.scale < MIN_LOSS_SCALE:   # halving again would reach 0 in ~1000 skipped steps
                raise TrainingError(f"float16 overflowed at step {self.step} even with the loss scaled down to "
                                    f"{self.scaler.scale:g}: values the scale does not reach (activations, "
                                    f"logits) exceed float16's range, and {self.kept()}. Train with "
                                    f"--precision tf32 or fp32 (and --overwrite), or a lower --lr")
            self.log(f"step {self.step}: float16 gradients overflowed; step skipped, "
                     f"loss scale now {self.scaler.scale:g}")
        return finite

    def evaluate(self):
        """Estimate the train and val loss on the fixed batches, save the model if it is the best
        so far, log the row, save the state; returns whether any rank was asked to stop.

        A Ctrl-C or SIGTERM during a new run's first evaluation stops it before it saves anything:
        that checkpoint would hold an untrained model, and with --overwrite would replace the old run."""
        # each rank evaluates its rows of the fixed batches; with equal rows, the mean of the ranks'
        # means is the mean over all rows. A stop request travels with them, so all ranks agree on it.
        local = [estimate_loss(self.model, batches) for batches in self.eval_batches.values()]
        local.append(float(self.stop.requested))
        mean = to_numpy(self.comm.allreduce_mean(self.model.xp.asarray(local, dtype=np.float64))).tolist()
        losses, stop = dict(zip(self.eval_batches, mean[:-1])), mean[-1] > 0
        if stop and self.checkpoint_step is None:
            raise KeyboardInterrupt
        for split, loss in losses.items():
            self.check_finite(f"the {split} loss", loss)   # before a NaN model or state is saved
        if self.checkpoint_step is None and self.is_main:
            # a new run's first checkpoint: an --overwrite run removes the old run's files first, its
            # state first of all, so a kill while this one is written (a second Ctrl-C) leaves part
            # of one run or the other, never the old state beside the new model, which --resume
            # would continue with the wrong weights as its best model
            remove_files(self.cfg.out_dir, RUN_FILES)
        improved = losses["val"] < self.best_val
        if improved:
            self.best_val = losses["val"]
            if self.is_main:
                self.model.save_pretrained(self.cfg.out_dir)
        # the model's tokens are GPT-2's, and transformers needs the tokenizer's files beside it: at
        # every evaluation, so a run resumed from an out-dir without them gets them, improved or not
        if self.is_main:
            write_hf_tokenizer(self.cfg.out_dir)
        self.log(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                 + (" (best: saved model)" if improved else ""))
        # the row before the state: a resume starts after the state's step, so a kill between the
        # two would lose a row that no run writes again
        self.write_row({"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"]})
        self.save_state()
        return stop

    @property
    def log_path(self):
        """The run's log.jsonl, in the out-dir."""
        return os.path.join(self.cfg.out_dir, LOG_FILE)

    def write_row(self, row):
        """Append a row to log.jsonl (rank 0 only), closed at once, so `tail -f log.jsonl` follows the run."""
        if self.is_main:
            with saying(f"cannot write {self.log_path}"), open(self.log_path, "a", encoding="utf-8",
                                                                opener=_open_no_symlink) as log_file:
                log_file.write(json.dumps(row) + "\n")

    def check_finite(self, what, loss):
        """TrainingError when `loss` is NaN or infinite: the run diverged, and every later step
        would only save NaN weights over the last good checkpoint."""
        if not math.isfinite(loss):
            raise TrainingError(f"{what} is {loss} at step {self.step}: the run diverged, and {self.kept()}. "
                                f"Start again with a lower --lr (and --overwrite)")

    def kept(self):
        """What a run that stops on an error leaves in its out-dir."""
        if self.checkpoint_step is None:
            return "nothing of it was saved"
        return f"{self.cfg.out_dir}/ keeps its state of step {self.checkpoint_step} and its best model"

    def run(self):
        """Train from self.step to max_iters; returns "done" or "interrupted"."""
        from tqdm import tqdm

        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        xp = self.model.xp
        device = "the CPU" if backend_name(xp) == "numpy" else gpu_name(xp)
        self.log(f"model: {self.model.num_params() / 1e6:.2f}M parameters, {counted(cfg.n_layer, 'layer')}, "
                 f"{cfg.n_embd} wide, on {device}; {len(self.train_tokens):,} train / {len(self.val_tokens):,} "
                 "val tokens")
        # the bar redraws itself with carriage returns: in a log file (stderr redirected) each redraw
        # would be one more line, so it is drawn on a terminal only
        show_bar = self.progress and sys.stderr.isatty()
        # a diverging run's inf and NaN are caught in its losses (check_finite), with one message that
        # says what to do: NumPy's warnings would come first, each quoting a line of numgpt's code
        with self.stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            # a new run's first evaluation saves its untrained model, and only then replaces an
            # --overwrite run's files: a run that fails to start (bad data, a Ctrl-C) leaves them whole
            stop_requested = False if self.resumed else self.evaluate()
            with tqdm(total=cfg.max_iters, initial=self.step, disable=not show_bar, unit="step",
                      dynamic_ncols=True) as bar:
                self.log = bar.write if show_bar else self.log
                while self.step < cfg.max_iters and not stop_requested:
                    started = time.perf_counter()
                    loss, stop_requested = self.train_step()
                    elapsed = time.perf_counter() - started
                    self.step += 1
                    lr = learning_rate(self.step - 1, cfg)
                    row = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_step / elapsed}
                    if self.grad_norm is not None:   # what clipping computes, logged at no cost
                        row["grad_norm"] = self.grad_norm
                    self.write_row(row)
                    if self.scaler is None:   # fp16 skips a step whose loss overflowed, and evaluates the rest
                        self.check_finite("the training loss", loss)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
                    bar.update(1)
                    if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                        stop_requested = self.evaluate() or stop_requested   # it saves the state
                    elif stop_requested:
                        self.save_state()
        if self.is_main:
            try:
                if plot_losses(self.log_path, os.path.join(cfg.out_dir, PLOT_FILE)):
                    self.log(f"loss curve: {os.path.join(cfg.out_dir, PLOT_FILE)}")
            except OSError as e:   # the run is trained and saved: a picture that cannot be written is no failure
                self.log(f"note: no loss curve: {describe_os_error(e)}")
        return "interrupted" if stop_requested else "done"
