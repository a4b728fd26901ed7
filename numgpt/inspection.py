"""What sample.py shows a learner: text as it streams, the prompt's tokens, each step's most likely
candidates, and every head's attention over the prompt.

`enc` is the GPT-2 tokenizer (a tiktoken Encoding, see numgpt.data.tokenizer); everything else is
plain Python and NumPy, so sample.py only wires these pieces to the command line.
"""

import codecs
import os

import numpy as np

from numgpt.errors import ConfigError, NumGPTError

MAX_TICK_LABELS = 24   # longer prompts get unlabelled heatmaps: the labels would overlap
IMAGE_FORMATS = ("png", "svg", "pdf")   # what matplotlib writes without further packages


def token_bytes(enc, token_id):
    """The bytes of one token; b"" for an id the tokenizer lacks (a model with a padded vocabulary)."""
    return enc.decode_single_token_bytes(token_id) if token_id < enc.n_vocab else b""


def token_label(enc, token_id):
    """A token as a learner should see it: its text quoted, so spaces and newlines show (' the',
    '\\n'); its bytes where they are not whole UTF-8 characters (b'\\xf0\\x9f\\x98': part of an emoji)."""
    if token_id >= enc.n_vocab:
        return f"<id {token_id}>"
    raw = token_bytes(enc, token_id)
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)


class TextStream:
    """Token ids in, printable text out, as the tokens come.

    GPT-2's tokens are byte strings, and one character of several UTF-8 bytes (é, 中, an emoji) can
    be split across tokens. Decoding each token alone would print garbage for both halves; an
    incremental UTF-8 decoder holds an unfinished character back until its last byte arrives.
    """

    def __init__(self, enc):
        self.enc = enc
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        """The text this token completes ("" while a character is still unfinished)."""
        return self.decoder.decode(token_bytes(self.enc, token_id))

    def flush(self):
        """Whatever is held back at the end: an unfinished character becomes U+FFFD."""
        return self.decoder.decode(b"", final=True)


def token_table(enc, ids):
    """The prompt's BPE pieces, one line per token: position, id, text."""
    lines = [f"{'pos':>5} {'id':>6}  token"]
    lines += [f"{pos:>5} {i:>6}  {token_label(enc, i)}" for pos, i in enumerate(map(int, ids))]
    return "\n".join(lines)


def top_candidates(probs, k=5):
    """The k most likely tokens of one step, most likely first, as [(id, p)]; tokens of
    probability 0 (cut by top-k / top-p) are left out.   probs (V,)"""
    k = min(k, probs.size)
    top = np.argpartition(-probs, k - 1)[:k]                 # the k largest, unordered: O(V)
    top = top[np.argsort(-probs[top], kind="stable")]
    return [(int(i), float(probs[i])) for i in top if probs[i] > 0]


PROBS_HEADER = f"{'step':>4}  {'token':<16} {'p':>7}   most likely candidates"


def format_prob(p):
    """0.412, or 2.1e-05 where three decimals would show an untrained model's 1/50257 as 0.000."""
    return f"{p:.3f}" if p >= 1e-3 or p == 0 else f"{p:.1e}"


def probs_row(enc, step, token_id, probs, k=5):
    """One line of --show-probs: the step, the token drawn with its probability, then the k most
    likely candidates of the distribution it was drawn from.   probs (V,)"""
    candidates = "  ".join(f"{token_label(enc, i)} {format_prob(p)}" for i, p in top_candidates(probs, k))
    return f"{step:>4}  {token_label(enc, token_id):<16} {format_prob(probs[token_id]):>7}   {candidates}"


def check_matplotlib():
    """Raise NumGPTError unless matplotlib can be imported (it is an optional extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NumGPTError("--attention-png needs matplotlib, which is not installed: "
                          "pip install matplotlib (or pip install \"numgpt[plot]\")") from None


def check_image_path(path):
    """Raise NumGPTError unless plot_attention can write `path`: matplotlib is installed, the
    file's extension names a format it writes, and its directory exists. Cheap, so callers check
    before any long work."""
    check_matplotlib()
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in IMAGE_FORMATS:
        raise ConfigError(f"cannot write the attention image {path!r}: name it with one of the extensions "
                          f"{', '.join('.' + f for f in IMAGE_FORMATS)}")
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ConfigError(f"cannot write the attention image {path!r}: there is no directory {directory!r}")
    if os.path.isdir(path):
        raise ConfigError(f"cannot write the attention image {path!r}: it is a directory")


def plot_attention(maps, labels, path):
    """Write a grid of heatmaps to the image file `path`: one row per layer, one column per head,
    each the (T,T) attention probabilities of one prompt (rows: the attending positions, columns:
    the positions attended to; the upper triangle is 0, the future is masked).

    maps: one (nh,T,T) NumPy array per layer. labels: T token labels for the axes of short prompts.
    """
    check_image_path(path)
    from matplotlib.figure import Figure   # the object API: no pyplot, no global backend state

    n_layer, n_head, T = len(maps), maps[0].shape[0], maps[0].shape[-1]
    # as wide as the heads need, and never narrower than the title (~6 inches): with few heads it was cut off
    fig = Figure(figsize=(max(1.6 * n_head + 1.0, 6.5), 1.6 * n_layer + 0.8), layout="constrained")
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    for layer, att in enumerate(maps):
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(att[head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    if T <= MAX_TICK_LABELS:   # name the positions on the outer edges only
        for ax in axes[:, 0]:
            ax.set_yticks(range(T), labels, fontsize=5)
        for ax in axes[-1, :]:
            ax.set_xticks(range(T), labels, fontsize=5, rotation=90)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    fig.suptitle("attention over the prompt (row: query position, column: key position)")
    fig.savefig(path, dpi=100)
