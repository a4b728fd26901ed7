"""Data for numgpt: the GPT-2 tokenizer, an embedded story corpus, and the token pipeline.

    import numpy as np
    from numgpt.data import load_split_tokens, get_batch
    tokens = load_split_tokens("embedded", "train", cache_dir="data_cache")
    x, y = get_batch(tokens, batch_size=16, block_size=128, rng=np.random.default_rng(0))
"""

from numgpt.data.dataset import (
    SOURCES,
    Batcher,
    cache_paths,
    embedded_source_key,
    files_source_key,
    get_batch,
    load_split_tokens,
    load_tinystories,
    prepare_tokens,
    read_text_documents,
    split_documents,
    tinystories_available,
    tinystories_cached,
)
from numgpt.data.stories import embedded_corpus, generate_stories
from numgpt.data.tokenizer import EOT, VOCAB_SIZE, decode, encode, get_tokenizer

__all__ = [
    "EOT", "VOCAB_SIZE", "get_tokenizer", "encode", "decode",
    "generate_stories", "embedded_corpus",
    "SOURCES", "read_text_documents", "split_documents", "load_tinystories", "tinystories_available",
    "tinystories_cached", "files_source_key", "embedded_source_key", "cache_paths", "prepare_tokens",
    "load_split_tokens", "get_batch", "Batcher",
]
