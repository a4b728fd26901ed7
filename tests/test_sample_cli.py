"""sample.py end to end on tiny random checkpoints: streaming, --no-stream, stopping at <|endoftext|>,
the learner's views (--show-tokens, --show-probs, --attention-png), and every user mistake as a
short message with a non-zero exit, never a traceback."""

import errno
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cupy_standin
import sample
from numgpt import GPT, GPTConfig
from numgpt.backend import cupy_available
from numgpt.data.tokenizer import EOT, get_tokenizer
from numgpt.inspection import TextStream, format_prob, probs_row, token_label, top_candidates

ROOT = Path(__file__).resolve().parents[1]
# the scripts find numgpt at the repository root, and whatever else (the tokenizer's data) where we do
SCRIPT_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
TINY = dict(vocab_size=50257, block_size=16, n_layer=2, n_head=2, n_embd=8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random GPT-2-vocabulary model, moved off its init so that its samples vary."""
    model = GPT(GPTConfig(**TINY), seed=0)
    rng = np.random.default_rng(0)
    for p in model.params.values():
        p += rng.normal(0.0, 0.5, size=p.shape).astype(np.float32)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def eot_ckpt(tmp_path_factory):
    """A model that puts all its mass on <|endoftext|>: the final layernorm outputs a constant
    (gain 0, bias e_0) and only EOT's output row points along e_0."""
    model = GPT(GPTConfig(**TINY, tie_weights=False), seed=0)
    model.params["ln_f.weight"][:] = 0.0
    model.params["ln_f.bias"][:] = np.eye(TINY["n_embd"])[0]
    model.params["lm_head.weight"][:] = 0.0
    model.params["lm_head.weight"][EOT, 0] = 50.0
    path = tmp_path_factory.mktemp("eot")
    model.save_pretrained(path)
    return str(path)


def run(capsys, *argv):
    """(exit code, stdout, stderr) of sample.main(argv)."""
    code = sample.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class RecordingStdout(io.StringIO):
    """A stdout that remembers each write, to see text arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


# ---------------------------------------------------------------- generating

def test_streams_the_same_text_no_stream_prints_whole(ckpt, capsys, monkeypatch):
    argv = ["--ckpt", ckpt, "--prompt", "Once upon a time", "--max-new-tokens", "12", "--seed", "3",
            "--no-stop-at-eot"]
    recorder = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", recorder)
    assert sample.main(argv) == 0
    monkeypatch.undo()
    streamed = recorder.getvalue()
    pieces = [w for w in recorder.writes if w]
    assert pieces[0] == "Once upon a time" and len(pieces) > 5          # the prompt, then token by token
    code, whole, _ = run(capsys, *argv, "--no-stream")
    assert code == 0 and whole == streamed
    assert whole.startswith("Once upon a time") and whole.endswith(f"\n{sample.SEPARATOR}\n")


def test_samples_follow_the_seed(ckpt, capsys, backend):
    argv = ["--ckpt", ckpt, "--prompt", "Hi", "--max-new-tokens", "8", "--num-samples", "2", "--no-stop-at-eot",
            "--backend", backend]
    _, a, _ = run(capsys, *argv, "--seed", "1")
    _, b, _ = run(capsys, *argv, "--seed", "1")
    _, c, _ = run(capsys, *argv, "--seed", "2")
    assert a == b != c
    first, second = a.split(f"\n{sample.SEPARATOR}\n")[:2]
    assert first != second                          # the samples continue one stream of draws


def test_the_printed_text_is_the_generated_tokens(ckpt, capsys):
    enc = get_tokenizer()
    model = GPT.from_pretrained(ckpt)
    ids = model.generate([enc.encode("Hi")], 10, temperature=0)[0, 1:]
    code, out, _ = run(capsys, "--ckpt", ckpt, "--prompt", "Hi", "--max-new-tokens", "10", "--temperature", "0",
                       "--no-stop-at-eot")
    assert code == 0 and out == "Hi" + enc.decode(ids.tolist()) + f"\n{sample.SEPARATOR}\n"


def test_stops_at_end_of_text_unless_told(eot_ckpt, capsys):
    code, out, _ = run(capsys, "--ckpt", eot_ckpt, "--prompt", "The end", "--max-new-tokens", "5")
    assert code == 0 and out == f"The end\n{sample.SEPARATOR}\n"
    code, out, _ = run(capsys, "--ckpt", eot_ckpt, "--prompt", "The end", "--max-new-tokens", "3",
                       "--no-stop-at-eot", "--seed", "0")
    assert code == 0 and out == "The end" + "<|endoftext|>" * 3 + f"\n{sample.SEPARATOR}\n"


def test_empty_prompt_starts_from_end_of_text(ckpt, capsys):
    code, out, _ = run(capsys, "--ckpt", ckpt, "--max-new-tokens", "4", "--show-tokens", "--seed", "0")
    assert code == 0 and f"{EOT:>6}  '<|endoftext|>'" in out


def test_prompt_from_a_file_and_from_stdin(ckpt, capsys, monkeypatch, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Der Bär 🐻", encoding="utf-8")
    common = ["--ckpt", ckpt, "--max-new-tokens", "3", "--seed", "0", "--no-stop-at-eot"]
    code, from_file, _ = run(capsys, *common, "--prompt-file", str(prompt))
    assert code == 0 and from_file.startswith("Der Bär 🐻")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Der Bär 🐻"))
    assert run(capsys, *common, "--prompt-file", "-")[1] == from_file
    prompt.write_text("\ufeffDer Bär 🐻", encoding="utf-8")             # with a byte-order mark
    assert run(capsys, *common, "--prompt-file", str(prompt))[1] == from_file
    monkeypatch.setattr(sys, "stdin", io.StringIO("\ufeffDer Bär 🐻"))
    assert run(capsys, *common, "--prompt-file", "-")[1] == from_file


@pytest.mark.parametrize("text", ["Café 中", "Der Bär 🐻"])
def test_a_piped_prompt_is_read_as_utf8_whatever_the_locales_encoding(ckpt, capsys, monkeypatch, tmp_path, text):
    """Python decodes a pipe in the locale's encoding: on Windows the ANSI code page, cp1252, where
    UTF-8's "é" reads as "Ã©" (a different prompt) and the bear's bytes as no text at all (it was
    refused as "not UTF-8"). --prompt-file - reads UTF-8, as --prompt-file FILE does."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(text, encoding="utf-8")
    common = ["--ckpt", ckpt, "--max-new-tokens", "3", "--seed", "0", "--no-stop-at-eot", "--show-tokens"]
    code, from_file, _ = run(capsys, *common, "--prompt-file", str(prompt))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="cp1252"))
    code, from_pipe, err = run(capsys, *common, "--prompt-file", "-")
    assert (code, err.count("error")) == (0, 0) and from_pipe == from_file


@pytest.mark.parametrize("name, reason", [("missing.txt", "No such file or directory"), (".", "Is a directory"),
                                          ("latin1.txt", "not UTF-8")])
def test_an_unreadable_prompt_file_is_named_once_in_words(ckpt, capsys, tmp_path, name, reason):
    """'cannot read the prompt file 'p.txt': No such file or directory', without Python's
    '[Errno 2] ...: 'p.txt'' repeating the path."""
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    path = str(tmp_path / name)
    code, _, err = run(capsys, "--ckpt", ckpt, "--prompt-file", path)
    assert code == 2 and err.count(path) == 1 and reason in err and "[Errno" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_a_prompt_file_too_long_to_be_a_prompt_is_refused(ckpt, capsys, monkeypatch, tmp_path, source):
    """Read whole, /dev/zero or a corpus by mistake would fill the memory, then the terminal."""
    monkeypatch.setattr(sample, "MAX_PROMPT_CHARS", 100)
    text, corpus = "x" * 101, tmp_path / "corpus.txt"
    corpus.write_text(text)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code, out, err = run(capsys, "--ckpt", ckpt, "--prompt-file", "-" if source == "stdin" else str(corpus))
    assert code == 2 and "more than 100 characters" in err and out == ""
    corpus.write_text(text[:100])   # at the limit: read whole
    code, out, _ = run(capsys, "--ckpt", ckpt, "--prompt-file", str(corpus), "--max-new-tokens", "1")
    assert code == 0 and out.startswith(text[:100])


def test_a_small_vocabulary_model_works_within_it(capsys, tmp_path):
    GPT(GPTConfig(**{**TINY, "vocab_size": 300}), seed=0).save_pretrained(tmp_path)
    code, out, _ = run(capsys, "--ckpt", str(tmp_path), "--prompt", "a b", "--max-new-tokens", "5", "--seed", "0")
    assert code == 0 and out.startswith("a b")
    code, _, err = run(capsys, "--ckpt", str(tmp_path), "--prompt", "Hello")       # "Hello" is token 15496
    assert code == 2 and "15496" in err and "300 tokens" in err
    code, _, err = run(capsys, "--ckpt", str(tmp_path))                            # empty: <|endoftext|> = 50256
    assert code == 2 and "<|endoftext|>" in err


# ---------------------------------------------------------------- looking inside

def test_show_tokens_prints_the_bpe_pieces(ckpt, capsys):
    code, out, _ = run(capsys, "--ckpt", ckpt, "--prompt", "Hello world", "--show-tokens", "--max-new-tokens", "0")
    assert code == 0
    assert "prompt: 2 tokens" in out and "    0  15496  'Hello'\n    1    995  ' world'\n" in out   # pos, id, token


def test_show_probs_lists_the_candidates_after_top_k(ckpt, capsys, backend):
    code, out, _ = run(capsys, "--ckpt", ckpt, "--prompt", "Hi", "--show-probs", "--top-k", "3",
                       "--max-new-tokens", "4", "--seed", "0", "--no-stop-at-eot", "--backend", backend)
    assert code == 0
    lines = out.splitlines()
    rows = lines[1:5]
    assert lines[0].split()[:3] == ["step", "token", "p"] and [r.split()[0] for r in rows] == ["1", "2", "3", "4"]
    for row in rows:
        probs = [float(word) for word in row.split()[2:] if word[0].isdigit()]   # labels are quoted
        assert len(probs) == 4 and abs(sum(probs[1:]) - 1.0) < 2e-3   # the drawn token's p, then the 3
    assert lines[5].startswith("Hi")                                     # then the text itself


@pytest.mark.parametrize("temperature", [0.0, 0.5, 2.0])
def test_show_probs_shows_the_distribution_the_token_was_drawn_from(ckpt, capsys, monkeypatch, temperature):
    """A row's probabilities are the softmax of logits / temperature; greedy decoding (temperature
    0) shows the softmax at temperature 1."""
    shown = []

    def recording_probs_row(enc, step, token, probs):
        shown.append(probs)
        return probs_row(enc, step, token, probs)

    monkeypatch.setattr(sample, "probs_row", recording_probs_row)
    code, _, _ = run(capsys, "--ckpt", ckpt, "--prompt", "Hi", "--show-probs", "--max-new-tokens", "1",
                     "--temperature", str(temperature), "--seed", "0")
    assert code == 0 and len(shown) == 1
    model = GPT.from_pretrained(ckpt)
    (_, logits), = model.generate_stream(np.array([get_tokenizer().encode("Hi")]), 1, with_logits=True)
    z = logits[0].astype(np.float64) / (temperature or 1.0)
    expected = np.exp(z - z.max())
    np.testing.assert_allclose(shown[0], expected / expected.sum(), rtol=1e-4, atol=1e-12)


def test_a_sample_that_outgrows_the_context_says_so(ckpt, capsys):
    """transformers refuses to generate past the model's context; numgpt slides the window, and says
    so when the prompt and the new tokens will not fit, not only when the prompt alone does not."""
    fits = TINY["block_size"] - 2
    code, _, err = run(capsys, "--ckpt", ckpt, "--prompt", "a", "--max-new-tokens", str(fits), "--seed", "0")
    assert code == 0 and "can outgrow" not in err
    code, _, err = run(capsys, "--ckpt", ckpt, "--prompt", "a", "--max-new-tokens", str(fits + 5), "--seed", "0")
    assert code == 0
    assert f"note: the prompt and up to {fits + 5} new tokens can outgrow the context of {TINY['block_size']}" in err


def test_attention_png_of_a_long_prompt_shows_the_last_block_size_tokens(ckpt, capsys, monkeypatch, tmp_path):
    """The model sees only the last block_size tokens of a longer prompt: the heatmap shows those,
    with their attention as the model computes it over them."""
    pytest.importorskip("matplotlib")
    plotted = []
    monkeypatch.setattr(sample, "plot_attention", lambda maps, labels, path: plotted.append((maps, labels)))
    block_size = TINY["block_size"]
    prompt = " ".join(str(n) for n in range(2 * block_size - 2))             # one token per number
    code, _, err = run(capsys, "--ckpt", ckpt, "--prompt", prompt, "--attention-png", str(tmp_path / "a.png"),
                       "--max-new-tokens", "0")
    assert code == 0 and f"over {block_size} prompt tokens" in err
    enc = get_tokenizer()
    window = enc.encode(prompt)[-block_size:]
    (maps, labels), = plotted
    assert labels == [token_label(enc, i) for i in window] and labels[-1] == "' 29'"
    expected = GPT.from_pretrained(ckpt).attention_maps(np.array([window]))
    assert len(maps) == len(expected) == 2
    for got, want in zip(maps, expected):
        np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("error, message", [
    (OSError(errno.EACCES, "Permission denied", "/out/a.png"), "Permission denied: /out/a.png"),   # its file
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),   # Python's [Errno 28] left out
    (OSError("the device went away"), "the device went away"),                        # no errno: its words
])
def test_an_os_error_is_its_reason_and_file_in_one_line(ckpt, capsys, monkeypatch, tmp_path, error, message):
    pytest.importorskip("matplotlib")

    def failing_plot(*args):
        raise error

    monkeypatch.setattr(sample, "plot_attention", failing_plot)
    code, _, err = run(capsys, "--ckpt", ckpt, "--attention-png", str(tmp_path / "a.png"), "--max-new-tokens", "0")
    assert code == 1 and err.endswith(f"\nerror: {message}\n")


def test_attention_png(ckpt, capsys, tmp_path, backend):
    pytest.importorskip("matplotlib")
    png = tmp_path / "attention.png"
    code, _, err = run(capsys, "--ckpt", ckpt, "--prompt", "The cat sat", "--attention-png", str(png),
                       "--max-new-tokens", "0", "--backend", backend)
    assert code == 0 and "2 layers x 2 heads over 3 prompt tokens" in err
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("n_head", [1, 2, 3])
def test_attention_png_title_fits_a_model_of_few_heads(tmp_path, monkeypatch, n_head):
    """The figure is as wide as its heads, but never narrower than its title: with 2 heads the
    title was cut off at both edges."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from numgpt.inspection import plot_attention

    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k)))
    att = np.tril(np.ones((n_head, 3, 3))) / np.arange(1, 4)[:, None]
    plot_attention([att, att], ["'a'", "'b'", "'c'"], str(tmp_path / "a.png"))
    fig = figures[0]
    title = fig.get_suptitle()
    box = next(t for t in fig.texts if t.get_text() == title).get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width


def test_attention_png_without_matplotlib_is_a_clear_error(ckpt, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib now raises ImportError
    code, _, err = run(capsys, "--ckpt", ckpt, "--attention-png", str(tmp_path / "a.png"))
    assert code == 2 and "matplotlib" in err and not (tmp_path / "a.png").exists()


def test_attention_png_with_an_unknown_extension_fails_before_loading(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, _, err = run(capsys, "--ckpt", str(tmp_path / "not-loaded"), "--attention-png", str(tmp_path / "a.txt"))
    assert code == 2 and "a.txt" in err and ".png" in err and "does not exist" not in err
    code, _, err = run(capsys, "--ckpt", str(tmp_path / "not-loaded"), "--attention-png", "")   # was ignored
    assert code == 2 and "attention image ''" in err and ".png" in err


@pytest.mark.parametrize("name, message", [("missing/a.png", "there is no directory"),
                                           ("dir.png", "it is a directory")])
def test_attention_png_that_cannot_be_written_fails_before_loading(capsys, tmp_path, name, message):
    pytest.importorskip("matplotlib")
    (tmp_path / "dir.png").mkdir()
    code, _, err = run(capsys, "--ckpt", str(tmp_path / "not-loaded"), "--attention-png", str(tmp_path / name))
    assert code == 2 and message in err and "not-loaded" not in err


# ---------------------------------------------------------------- user mistakes

@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "--temperature must"),   # named as the flags the user typed
    (["--temperature", "inf"], "finite"),
    (["--temperature", "nan"], "finite"),
    (["--top-p", "nan"], "--top-p must"),
    (["--seed", "-1"], "--seed"),
    (["--top-k", "0"], "--top-k must"),
    (["--top-p", "1.5"], "--top-p must"),
    (["--num-samples", "0"], "--num-samples"),
    (["--max-new-tokens", "-3"], "--max-new-tokens"),
    (["--prompt-file", "/no/such/prompt.txt"], "prompt file"),
    (["--backend", "cupy"], None),                    # an error without a GPU, a run with one
])
def test_bad_values_exit_non_zero_with_a_message(ckpt, capsys, argv, message):
    code, _, err = run(capsys, "--ckpt", ckpt, "--max-new-tokens", "2", *argv)
    if message is None and cupy_available():
        assert code == 0
        return
    assert code == 2 and err.startswith("error: ") and (message is None or message in err)


def test_a_gpu_without_nvrtc_is_a_clear_error(ckpt, capsys, monkeypatch):
    """On a machine with a driver and no CUDA Toolkit, CuPy imports and sees the GPU, and every kernel
    would fail to compile at its first use: one line says so, and how to install what is missing."""
    cupy_standin.install(monkeypatch)
    cupy_standin.remove_nvrtc(monkeypatch)
    code, out, err = run(capsys, "--ckpt", ckpt, "--backend", "cupy")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "NVRTC" in err and 'pip install "cupy-cuda12x[ctk]"' in err


def test_a_corrupt_checkpoint_is_a_clear_error(ckpt, capsys, tmp_path):
    (tmp_path / "config.json").write_text(Path(ckpt, "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors at all")
    code, _, err = run(capsys, "--ckpt", str(tmp_path))
    assert code == 2 and "corrupt" in err


def test_a_diverged_checkpoint_is_a_clear_error(ckpt, capsys, tmp_path):
    """NaN weights would print a page of one repeated token: say what is wrong instead."""
    model = GPT.from_pretrained(ckpt)
    model.params["h.1.mlp.c_fc.weight"][3, 5] = np.nan
    model.save_pretrained(tmp_path)
    code, _, err = run(capsys, "--ckpt", str(tmp_path))
    assert code == 2 and "h.1.mlp.c_fc.weight" in err and "NaN" in err


@pytest.mark.filterwarnings("error::RuntimeWarning")   # NumPy's overflow warnings would come before the message
def test_a_checkpoint_that_overflows_float32_is_a_clear_error(ckpt, capsys, tmp_path):
    """Finite weights whose products overflow give NaN logits, which would draw token 0, '!', every step."""
    model = GPT.from_pretrained(ckpt)
    model.params["h.0.mlp.c_fc.weight"][:] = 1e30
    model.params["h.0.mlp.c_proj.weight"][:] = 1e30
    model.save_pretrained(tmp_path)
    code, out, err = run(capsys, "--ckpt", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "3")
    assert code == 2 and "NaN or infinite" in err and out == "Hi"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_output_that_cannot_be_written_is_named(ckpt):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", ckpt, "--max-new-tokens", "2"],
                                stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=SCRIPT_ENV)
    assert result.returncode == 1
    assert "cannot write to the standard output: No space left on device" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_a_reader_that_goes_away_is_not_an_error(ckpt):
    """`python sample.py | head -1`: head exits after its line, and the next write meets a closed
    pipe. That is how such a pipeline ends, so sample.py ends quietly, with status 0."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--ckpt", ckpt, "--max-new-tokens", "20",
                             "--num-samples", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=SCRIPT_ENV)
    proc.stdout.close()   # gone before the first line: sample.py is still loading the model
    stderr = proc.stderr.read()
    assert proc.wait() == 0
    assert "error" not in stderr and "Traceback" not in stderr and "Exception ignored" not in stderr


@pytest.mark.parametrize("closed, argv, message", [
    ("stdout", [], "standard output is closed"),
    ("stdin", ["--prompt-file", "-"], "standard input, which is closed"),
])
def test_a_closed_standard_stream_exits_without_a_traceback(ckpt, closed, argv, message):
    """Started with `>&-` or `<&-`, Python has no sys.stdout or sys.stdin."""
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", ckpt, "--max-new-tokens", "2",
                             *argv], capture_output=True, text=True, cwd=ROOT,
                            env=SCRIPT_ENV,
                            preexec_fn=lambda: os.close(0 if closed == "stdin" else 1))
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_missing_checkpoint_exits_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(tmp_path / "nothing")],
                            capture_output=True, text=True, cwd=ROOT, env=SCRIPT_ENV)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_an_ascii_terminal_gets_question_marks_not_an_error(ckpt):
    """A story's "é" cannot be encoded on an ASCII (LANG=C) terminal: it prints as "?"."""
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", ckpt, "--prompt", "Caf\u00e9",
                             "--max-new-tokens", "2", "--seed", "0"], capture_output=True, cwd=ROOT,
                            env={**SCRIPT_ENV, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(b"Caf?")


@pytest.mark.parametrize("script", ["sample.py", "train.py"])
def test_ctrl_c_while_importing_ends_quietly(script, tmp_path):
    """A Ctrl-C while the scripts import NumPy ends them as it ends any command, without a traceback.
    `-X importtime` reports each import as it completes ("import time: 12 | 34 | numgpt.errors"):
    the first of numgpt's modules says the script's own imports are under way."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", str(ROOT / script), "--help"], cwd=tmp_path,
                            env=SCRIPT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.split("|")[-1].strip().startswith("numgpt."):
            proc.send_signal(signal.SIGINT)
            break
    err = "".join(lines) + proc.stderr.read()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert proc.returncode == -signal.SIGINT   # ended by the signal, as a command is, and not after it


def test_runs_as_a_script(ckpt):
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", ckpt, "--prompt", "Hi",
                             "--max-new-tokens", "3", "--seed", "0", "--no-stop-at-eot"],
                            capture_output=True, text=True, cwd=ROOT, env=SCRIPT_ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hi") and result.stdout.endswith(f"{sample.SEPARATOR}\n")


# ---------------------------------------------------------------- the helpers

def test_a_character_split_across_tokens_is_printed_once_whole():
    enc = get_tokenizer()
    ids = enc.encode("😀")
    assert len(ids) == 2                                          # GPT-2 splits the emoji's 4 bytes
    stream = TextStream(enc)
    assert [stream.push(i) for i in ids] == ["", "😀"] and stream.flush() == ""
    assert token_label(enc, ids[0]) == repr(enc.decode_single_token_bytes(ids[0]))   # bytes, not text


SPLIT_IDS = get_tokenizer().encode("😀 🐻 中文 naïve")   # tokens that hold parts of characters


@given(ids=st.lists(st.one_of(st.integers(0, EOT), st.sampled_from(SPLIT_IDS)), max_size=30))
def test_streamed_text_is_the_decoded_text(ids):
    enc = get_tokenizer()
    stream = TextStream(enc)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == enc.decode(ids)


def test_probabilities_stay_visible_when_small():
    assert [format_prob(p) for p in (0.4123, 1.0, 0.0, 2.1e-5)] == ["0.412", "1.000", "0.000", "2.1e-05"]


def test_an_id_beyond_the_tokenizer_prints_nothing_and_shows_as_its_id():
    """A model with a padded vocabulary (50304, say) can draw an id the tokenizer lacks."""
    enc = get_tokenizer()
    stream = TextStream(enc)
    for token_id in (enc.n_vocab, 50303):
        assert stream.push(token_id) == "" and token_label(enc, token_id) == f"<id {token_id}>"


def test_a_probs_row_gives_the_drawn_tokens_probability_then_the_candidates():
    enc = get_tokenizer()
    probs = np.zeros(enc.n_vocab)
    probs[[262, 290, 11]] = [0.5, 0.3, 0.2]                       # ' the', ' and', ','
    assert probs_row(enc, 3, 290, probs, k=2) == f"   3  {' and'!r:<16}   0.300   ' the' 0.500  ' and' 0.300"


def test_top_candidates_are_sorted_and_skip_impossible_tokens():
    probs = np.array([0.1, 0.0, 0.5, 0.4, 0.0])
    assert top_candidates(probs, k=5) == [(2, 0.5), (3, 0.4), (0, 0.1)]
    assert top_candidates(probs, k=2) == [(2, 0.5), (3, 0.4)]
