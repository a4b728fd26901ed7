"""Training data: where the text comes from, the token cache, and random batches.

The pipeline has three stages.

1. **Documents.** A source yields a list of documents (stories), as strings:

   - ``"embedded"``: the generated stories of `numgpt.data.stories`; needs nothing.
   - ``"tinystories"``: TinyStories from Hugging Face; needs the optional `datasets` package and
     the network (or its local cache).
   - ``"files"``: local text files. TinyStories' own text releases put a line that is exactly
     ``<|endoftext|>`` between stories, so such lines split a file into documents; a file
     without them is one document.

2. **Tokens, once.** Tokenizing millions of stories takes a while, and a training run reads
   the data many times, so each (source, split) is tokenized once into a cache directory: a
   flat file of GPT-2 token ids (`<name>.bin`, uint16, each document followed by the EOT token)
   and its metadata (`<name>.json`). Later runs memory-map the .bin file, so even a corpus larger
   than memory costs no loading time. The cache name contains a hash of the source key (for
   local files: their paths, sizes and modification times), so changed data gets a new cache.

3. **Batches.** `get_batch` cuts random windows of block_size + 1 tokens out of the token
   array; the inputs are the first block_size tokens and the targets the same window shifted
   by one, so the model learns to predict every next token.

Every problem a user can cause (a missing file, too little data, ...) raises `DataError` with a
message that says what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from numgpt.checkpoint import atomic_writer, cannot_write_in, remove_stale_temp_files
from numgpt.console import counted
from numgpt.data import stories
from numgpt.data.tokenizer import EOT, VOCAB_SIZE, get_tokenizer
from numgpt.errors import ConfigError, DataError

Log = Callable[[str], None]

SOURCES = ("embedded", "tinystories", "files")
SPLITS = ("train", "val")

# Bump when the cache format or the tokenization changes: old caches then no longer match.
CACHE_VERSION = 1
TOKENIZER_NAME = "gpt2"
TOKEN_DTYPE = np.uint16     # GPT-2 ids go up to 50256, which fits in 16 bits: half of int32's disk
DOCS_PER_BATCH = 2048       # documents handed to the tokenizer at once (threads share a batch)
BATCH_CHARS = 8 << 20       # and at most about this many characters: its token lists cost ~15x that
PIECE_CHARS = 1 << 20       # a longer document goes to the tokenizer in pieces (see pieces)
TOKENIZER_THREADS = min(8, os.cpu_count() or 1)
# a temporary file in the cache untouched this long is a killed run's, not another run's still writing:
# a live one grows with every batch of documents, seconds apart (such a file can take a GB of disk,
# so a killed run's is not kept for long). A run suspended longer than this (Ctrl-Z, a sleeping
# laptop) loses its file and fails at the rename, after tokenizing: loudly, and nothing is corrupted
STALE_TEMP_S = 3600

TINYSTORIES_REPO = "roneneldan/TinyStories"
HF_URL = "https://huggingface.co"
_HF_SPLITS = {"train": "train", "val": "validation"}

# A line that is exactly <|endoftext|> (a trailing \r or stray spaces are forgiven).
_SEPARATOR = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*\r?$", re.MULTILINE)


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Local text files.
# ---------------------------------------------------------------------------------------------

def _check_data_file(path: Path) -> None:
    """Raise DataError unless `path` names an existing regular file."""
    if not path.exists():
        raise DataError(f"data file '{path}' does not exist: check the path")
    if path.is_dir():
        raise DataError(f"data file '{path}' is a directory: give the text files inside it instead")
    if not path.is_file():   # /dev/zero never ends, a pipe may never end: reading would fill the memory
        raise DataError(f"data file '{path}' is not a regular file (a device or a pipe): save the text to a "
                        f"file and give that")


def _read_text(path: Path, log: Log) -> str:
    """The text of one data file, decoded as UTF-8 (a few bad bytes replaced, with a warning; a
    binary file, which trains nothing useful, is a DataError)."""
    _check_data_file(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"data file '{path}' cannot be read ({e.strerror or e}): "
                        f"check that it is a readable text file") from e
    if not data:
        raise DataError(f"data file '{path}' is empty: give a file with some text")
    if b"\0" in data:   # text files (in UTF-8) never hold a NUL byte; programs, images and archives do
        raise DataError(f"data file '{path}' does not look like text (it holds NUL bytes): give a text "
                        f"file saved as UTF-8")
    try:
        text = data.decode("utf-8-sig")          # -sig: drop a byte-order mark if there is one
    except UnicodeDecodeError:
        # One bad byte should not stop a training run: replace it and say so.
        text = data.decode("utf-8-sig", errors="replace")
        replaced = text.count("\ufffd") - data.count("\ufffd".encode())
        bad_lines = [number for number, line in enumerate(data.split(b"\n"), start=1)
                     if not _is_utf8(line)]
        log(f"warning: data file '{path}' is not valid UTF-8: {replaced} undecodable byte "
            f"sequence(s) on {len(bad_lines)} line(s) (first on line {bad_lines[0]}) were replaced "
            f"with U+FFFD; save the file as UTF-8 to keep those characters")
    return text.replace("\r\n", "\n")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def split_documents(text: str) -> list[str]:
    """Split text at lines that are exactly <|endoftext|>; strip each document, drop empty ones."""
    return [doc.strip() for doc in _SEPARATOR.split(text) if doc.strip()]


def read_text_documents(paths: Sequence[str | os.PathLike[str]], log: Log = _print_stderr) -> list[str]:
    """The documents of local text files, in order (see `split_documents`).

    Raises DataError for a path that is missing, a directory, unreadable, empty, or holds no
    text besides separators. Bytes that are not UTF-8 are replaced and reported through `log`.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data files were given: give at least one text file")
    documents: list[str] = []
    for path in map(Path, paths):
        found = split_documents(_read_text(path, log))
        if not found:
            raise DataError(f"data file '{path}' has no text, only whitespace or <|endoftext|> "
                            f"separator lines: give a file with some text")
        documents.extend(found)
    return documents


def files_source_key(paths: Sequence[str | os.PathLike[str]]) -> str:
    """A cache key for local files that changes when any path, size or modification time does."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        _check_data_file(path)
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"files-{digest.hexdigest()[:16]}"


def embedded_source_key() -> str:
    """A cache key for the embedded corpus: it changes whenever the story generator's code does."""
    return f"embedded-{hashlib.sha256(Path(stories.__file__).read_bytes()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------
# TinyStories on Hugging Face.
# ---------------------------------------------------------------------------------------------

def _hf_cache_dirs() -> list[Path]:
    """Where a downloaded TinyStories would be: the datasets cache and the hub download cache.

    These follow the documented defaults and environment variables of `datasets` and
    `huggingface_hub` (HF_HOME, HF_DATASETS_CACHE, HF_HUB_CACHE), without importing either.
    """
    hf_home = Path(os.environ.get("HF_HOME") or user_cache_home() / "huggingface")
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or hf_home / "datasets")
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                     or hf_home / "hub")
    return [datasets_cache / "roneneldan___tiny_stories", hub_cache / "datasets--roneneldan--TinyStories"]


def tinystories_cached() -> bool:
    """Whether a non-empty TinyStories download is in the local Hugging Face cache."""
    return any(d.is_dir() and any(d.iterdir()) for d in _hf_cache_dirs())


def _datasets_installed() -> bool:
    """Whether the optional `datasets` package is installed (found without importing it)."""
    return importlib.util.find_spec("datasets") is not None


def _hf_offline() -> bool:
    """Whether the user switched Hugging Face to offline mode (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _http_head(url: str, timeout_s: float) -> None:
    """Send a HEAD request to `url`; raise OSError if no HTTP answer comes back."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass                                       # any HTTP status means the server answered


def _unreachable_reason(url: str, timeout_s: float) -> str | None:
    """None if `url` answers within `timeout_s` seconds, else why not.

    The request runs in a daemon thread so that even a name lookup that ignores socket
    timeouts (DNS can) cannot make the caller wait longer than `timeout_s`.
    """
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            _http_head(url, timeout_s)
            outcome.append(None)
        except Exception as e:   # URLError, socket.timeout, ssl errors...: all mean "unreachable"
            outcome.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=probe, name="numgpt-hf-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


def tinystories_available(timeout_s: float = 3.0) -> tuple[bool, str]:
    """Whether TinyStories can be loaded now, and why (or why not); takes at most `timeout_s`.

    True when `datasets` is installed and TinyStories is either in the local Hugging Face cache
    or huggingface.co answers. Used to choose a data source automatically, so it must be quick:
    it never imports `datasets` (slow) and never waits on the network longer than `timeout_s`.
    """
    if not _datasets_installed():
        return False, "datasets is not installed (pip install datasets)"
    if tinystories_cached():
        return True, "TinyStories is in the local Hugging Face cache"
    if _hf_offline():
        return False, "TinyStories is not in the local Hugging Face cache and Hugging Face offline mode is on"
    reason = _unreachable_reason(HF_URL, timeout_s)
    if reason is not None:
        return False, f"huggingface.co is unreachable ({reason})"
    return True, "huggingface.co is reachable"


def _broken_datasets(e: Exception) -> DataError:
    return DataError(f"the installed datasets package cannot be imported ({type(e).__name__}: {e}): "
                     f"pip install -U datasets, or use the embedded stories (--dataset embedded)")


def load_tinystories(split: str, log: Log = print) -> list[str]:
    """The stories of one TinyStories split ("train" or "val"), via Hugging Face `datasets`.

    When the dataset is already cached but huggingface.co does not answer, Hugging Face offline
    mode is switched on first, so that `datasets` reads its cache instead of retrying the network.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if "datasets" not in sys.modules and not _hf_offline() and tinystories_cached() \
            and _unreachable_reason(HF_URL, 3.0) is not None:
        # These variables are read when datasets is imported, hence before the import below.
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        log("huggingface.co is unreachable: reading TinyStories from the local cache (offline mode)")
    try:
        import datasets
    except ImportError as e:
        if e.name != "datasets":   # installed, but a package it imports is missing
            raise _broken_datasets(e) from e
        raise DataError("the TinyStories source needs the Hugging Face datasets package: "
                        "pip install datasets, or use the embedded stories (--dataset embedded)") from e
    except Exception as e:   # one too old for the installed pyarrow fails with an AttributeError, say
        raise _broken_datasets(e) from e
    log(f"loading TinyStories ({_HF_SPLITS[split]} split) from Hugging Face")
    try:
        texts = datasets.load_dataset(TINYSTORIES_REPO, split=_HF_SPLITS[split])["text"]
    except Exception as e:   # network, cache and parsing errors all leave us without the data
        raise DataError(f"could not load TinyStories from Hugging Face ({type(e).__name__}: {e}): "
                        f"check the network connection, or use the embedded stories (--dataset embedded)") from e
    documents = [text.strip() for text in texts if text and text.strip()]
    if not documents:
        raise DataError(f"the TinyStories {split} split is empty: clear the Hugging Face cache "
                        f"(~/.cache/huggingface) and try again")
    return documents


# ---------------------------------------------------------------------------------------------
# The token cache.
# ---------------------------------------------------------------------------------------------

def user_cache_home() -> Path:
    """The user's cache directory: $XDG_CACHE_HOME, else ~/.cache (the convention that pip and
    HuggingFace follow); numgpt's token cache is its numgpt/ folder, HuggingFace's its huggingface/."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def cache_paths(cache_dir: str | os.PathLike[str], source_key: str, split: str) -> tuple[Path, Path]:
    """The (.bin, .json) paths of the cache for `source_key` and `split`.

    The name is readable (source and split) and unique: it ends in a hash of everything the
    tokens depend on, so a different source, tokenizer or cache version never shares a file.
    """
    readable = re.sub(r"[^A-Za-z0-9]+", "-", source_key).strip("-")[:40] or "source"
    digest = hashlib.sha256(f"{CACHE_VERSION}\0{TOKENIZER_NAME}\0{source_key}\0{split}".encode())
    stem = Path(cache_dir) / f"{readable}-{split}-{digest.hexdigest()[:12]}"
    return stem.with_suffix(".bin"), stem.with_suffix(".json")


def _cache_problem(bin_path: Path, meta_path: Path, source_key: str, split: str) -> str | None:
    """None if the cache is complete and matches, else what is wrong with it.

    Besides the metadata and the size, one pass over the tokens checks what every cache written
    by `_tokenize_into` holds: ids within the vocabulary, and EOT last. A file damaged in place
    keeps its size, and would otherwise fail far from here, in the model or when splitting.
    """
    if not meta_path.exists():
        return "no metadata"
    try:
        meta = json.loads(meta_path.read_bytes())   # JSON is UTF-8: not the locale's encoding (cp1252 on Windows)
        n_tokens = int(meta["n_tokens"])
        expected = {"tokenizer": TOKENIZER_NAME, "source": source_key, "split": split,
                    "dtype": np.dtype(TOKEN_DTYPE).name, "version": CACHE_VERSION}
        mismatched = sorted(k for k, v in expected.items() if meta.get(k) != v)
    # OverflowError: int(inf); RecursionError: JSON nested deeper than Python's stack
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        return f"unreadable metadata ({type(e).__name__}: {e})"
    if mismatched:
        return f"metadata does not match in {', '.join(mismatched)}"
    expected_size = n_tokens * np.dtype(TOKEN_DTYPE).itemsize
    size = bin_path.stat().st_size if bin_path.exists() else None
    if size != expected_size or n_tokens == 0:
        return f"token file has {size} bytes, metadata says {expected_size}"
    tokens = np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r")
    if tokens[-1] != EOT:
        return "token file does not end with <|endoftext|>"
    largest = int(tokens.max())                  # uint16: the smallest is >= 0 anyway
    if largest >= VOCAB_SIZE:
        return f"token file holds id {largest}, outside the vocabulary of {VOCAB_SIZE}"
    return None


def pieces(document: str, size: int) -> list[str]:
    """`document` cut into pieces of about `size` characters, each cut at the end of a line,
    between a character that is not whitespace and the whitespace (" \\t\\r") before the newline.
    GPT-2's pre-tokenizer always ends a token there and begins the next one there alike with or
    without the text before, so the pieces' tokens, one after another, are the document's. (A cut
    after whitespace would not do: a run of it at the end of a text stays one token, while inside
    one, its last character goes apart, to the word that follows.)"""
    parts, start = [], 0
    newline = document.find("\n", start + size)
    while newline != -1:
        cut = newline
        while cut > start and document[cut - 1] in " \t\r":
            cut -= 1
        if cut > start and not document[cut - 1].isspace():
            parts.append(document[start:cut])
            start = cut
            newline = document.find("\n", start + size)
        else:
            newline = document.find("\n", newline + 1)
    parts.append(document[start:])
    return parts


def _tokenizer_batches(documents: Sequence[str]) -> Iterator[tuple[list[str], list[bool]]]:
    """The texts for the tokenizer, in order, in batches of at most DOCS_PER_BATCH texts and about
    BATCH_CHARS characters: yields (texts, ends), ends[i] True when texts[i] ends its document. A
    document's tokens, as Python ints, take ~15 times its text: whole, a 1 GB file would need 15 GB."""
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    for document in documents:
        parts = pieces(document, PIECE_CHARS)
        for k, part in enumerate(parts):
            texts.append(part)
            ends.append(k == len(parts) - 1)
            chars += len(part)
            if len(texts) == DOCS_PER_BATCH or chars >= BATCH_CHARS:
                yield texts, ends
                texts, ends, chars = [], [], 0
    if texts:
        yield texts, ends


def _tokenize_into(documents: Sequence[str], out: BinaryIO, desc: str, show_progress: bool) -> int:
    """Write the tokens of `documents`, each followed by EOT, to `out`; return how many."""
    encoding = get_tokenizer()
    n_tokens = 0
    # The bar is for people: hide it when stderr is a log file rather than a terminal.
    with tqdm(total=len(documents), desc=desc, unit="doc",
              disable=not (show_progress and sys.stderr.isatty())) as bar:
        for texts, ends in _tokenizer_batches(documents):
            flat: list[int] = []
            for ids, end in zip(encoding.encode_ordinary_batch(texts, num_threads=TOKENIZER_THREADS), ends):
                flat.extend(ids)
                if end:
                    flat.append(EOT)
            out.write(np.array(flat, dtype=TOKEN_DTYPE).tobytes())
            n_tokens += len(flat)
            bar.update(sum(ends))
    return n_tokens


def prepare_tokens(documents_fn: Callable[[], Sequence[str]], cache_dir: str | os.PathLike[str],
                   source_key: str, split: str, log: Log = print,
                   show_progress: bool = True) -> np.memmap:
    """The tokens of a source's split, tokenized once and then read from the cache.

    `documents_fn` is only called when the cache is missing, stale or damaged, so a cached
    source (say, TinyStories) needs neither its download nor the tokenizer's time again.
    Returns a read-only uint16 memory map: documents' tokens, each followed by EOT.
    """
    bin_path, meta_path = cache_paths(cache_dir, source_key, split)
    problem = _cache_problem(bin_path, meta_path, source_key, split)
    if problem is None:
        tokens = np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r")
        log(f"using cached tokens {bin_path} ({counted(len(tokens), 'token')})")
        return tokens
    if meta_path.exists():                        # a cache was there, but cannot be trusted
        log(f"token cache {bin_path.name} cannot be used ({problem}): tokenizing again")

    try:
        bin_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache directory '{bin_path.parent}' ({e.strerror or e}): "
                        f"choose a writable one with --cache-dir") from e
    problem = cannot_write_in(bin_path.parent)   # found now, not after minutes of downloading and tokenizing
    if problem:
        raise DataError(f"cannot write in the cache directory '{bin_path.parent}' ({problem}): "
                        f"choose a writable one with --cache-dir")
    remove_stale_temp_files(bin_path.parent, idle_s=STALE_TEMP_S)
    documents = documents_fn()
    if not documents:
        raise DataError(f"the {source_key} source has no documents in its {split} split: give more data")

    started = time.perf_counter()
    # Metadata goes last, and the old metadata first: a cache is trusted only through its
    # metadata, so no crash can pair a new token file with old metadata, or the reverse.
    meta_path.unlink(missing_ok=True)
    with atomic_writer(bin_path) as out:
        n_tokens = _tokenize_into(documents, out, f"tokenizing {split}", show_progress)
    meta = {"tokenizer": TOKENIZER_NAME, "source": source_key, "split": split,
            "n_documents": len(documents), "n_tokens": n_tokens,
            "dtype": np.dtype(TOKEN_DTYPE).name, "version": CACHE_VERSION}
    with atomic_writer(meta_path) as out:
        out.write(json.dumps(meta, indent=2).encode())
    log(f"tokenized {counted(len(documents), 'document')} into {counted(n_tokens, 'token')} in "
        f"{time.perf_counter() - started:.1f} s -> {bin_path}")
    return np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r")


# ---------------------------------------------------------------------------------------------
# Splits of a source, as train.py asks for them.
# ---------------------------------------------------------------------------------------------

def _split_file_tokens(tokens: np.ndarray, split: str, val_fraction: float) -> np.ndarray:
    """The train or val part of local files' tokens: the last documents are the validation set.

    Documents end at EOT tokens (ordinary text never encodes to EOT). The last
    round(val_fraction * documents) documents, at least one (and one fewer than all), are
    validation, unless they hold more than twice val_fraction of the tokens: then, as for a single
    document, the last val_fraction of the tokens are. (Two files, each one document, would
    otherwise hold out the whole second one.)
    """
    ends = np.flatnonzero(tokens == EOT) + 1
    cut = int(len(tokens) * (1 - val_fraction))                 # by tokens
    if len(ends) > 1:
        n_val = min(max(1, round(len(ends) * val_fraction)), len(ends) - 1)
        document_cut = int(ends[len(ends) - n_val - 1])         # by documents
        if len(tokens) - document_cut <= 2 * val_fraction * len(tokens):
            cut = document_cut
    return tokens[:cut] if split == "train" else tokens[cut:]


def load_split_tokens(source: str, split: str, cache_dir: str | os.PathLike[str],
                      data_paths: Sequence[str | os.PathLike[str]] | None = None, log: Log = print,
                      val_fraction: float = 0.1, show_progress: bool = True) -> np.ndarray:
    """The uint16 tokens of `split` ("train" or "val") of `source`, cached in `cache_dir`.

    `source` is "embedded" (generated stories), "tinystories" (Hugging Face) or "files" (the
    text files `data_paths`, whose last `val_fraction` of documents is the validation split).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if source == "embedded":
        return prepare_tokens(lambda: stories.embedded_corpus(split), cache_dir, embedded_source_key(),
                              split, log, show_progress)
    if source == "tinystories":
        return prepare_tokens(lambda: load_tinystories(split, log), cache_dir, "tinystories", split,
                              log, show_progress)
    if source == "files":
        if not data_paths:
            raise DataError("the files source needs at least one text file: give them with --data")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), not {val_fraction}")
        # Both splits come from one cache of all the files' documents, cut at a document boundary.
        tokens = prepare_tokens(lambda: read_text_documents(data_paths, log), cache_dir,
                                files_source_key(data_paths), "all", log, show_progress)
        return _split_file_tokens(tokens, split, val_fraction)
    raise DataError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}")


# ---------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------

def _check_batch_shape(n_tokens: int, batch_size: int, block_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, not {batch_size}")
    if block_size < 1:
        raise ConfigError(f"block size must be at least 1, not {block_size}")
    if n_tokens <= block_size:
        raise too_short("the data", n_tokens, block_size)


def too_short(what, n_tokens, block_size):
    """The DataError for `what` (the data, a split) of n_tokens <= block_size: a batch row takes
    block_size + 1 of them (its targets are the next tokens)."""
    remedy = f"a --block-size below {n_tokens}, or more data" if n_tokens > 1 else "more data"
    return DataError(f"{what} has {counted(n_tokens, 'token')} but --block-size is {block_size}: use {remedy}")


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A batch of random windows: inputs x and next-token targets y, both int64 (B, T).

    Each row starts at an offset drawn uniformly from `rng`, so the batch depends only on the
    generator's state. y[b, t] is the token after x[b, t]: y is x shifted left by one.
    The windows are copied out of `tokens`, so no view keeps a memory map alive.
    """
    _check_batch_shape(len(tokens), batch_size, block_size)
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    windows = np.stack([np.asarray(tokens[i:i + block_size + 1]) for i in starts]).astype(np.int64)
    return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


class Batcher:
    """Random batches from one token array, with a generator whose state can be saved.

    Saving `state()` in a checkpoint and passing it back to `set_state` continues the exact
    sequence of batches after a resume.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int,
                 seed: int | np.random.Generator | None = None):
        _check_batch_shape(len(tokens), batch_size, block_size)
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next (x, y) batch; see `get_batch`."""
        return get_batch(self.tokens, self.batch_size, self.block_size, self.rng)

    def state(self) -> dict:
        """The generator's state, a JSON-friendly dict."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        """Continue from a state returned by `state`."""
        self.rng.bit_generator.state = state
