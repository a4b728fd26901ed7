"""train.py end to end on tiny models: logs and checkpoints, exact resume with dropout on, Ctrl-C,
fine-tuning, and every kind of bad input getting a short message and a non-zero exit."""

import dataclasses
import errno
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest

import cupy_standin
import numgpt.checkpoint
import numgpt.distributed
import numgpt.errors
import numgpt.optim
import numgpt.precision
import numgpt.seeds
import numgpt.training
import train
from numgpt import GPT, GPTConfig
from numgpt.backend import to_numpy
from numgpt.data.tokenizer import EOT, HF_TOKENIZER_FILES, bundled_bpe_files, get_tokenizer
from numgpt.errors import CheckpointError, ConfigError
from numgpt.precision import DynamicLossScaler
from numgpt.train_state import STATE_FILE, STATE_KEY, load_train_state
from numgpt.training import PRESETS, TrainConfig, learning_rate, memory_floor
from damage import flip_a_bit

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--num-samples", "0", "--no-progress"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the whole session: the embedded corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("token-cache"))


def run(out_dir, cache_dir, *flags):
    """train.py on the embedded stories with TINY's model and `flags`."""
    return train.main([*TINY, "--dataset", "embedded", "--out-dir", str(out_dir), "--cache-dir", cache_dir, *flags])


def write_stories(path):
    """A local text file of 40 short stories, enough for TINY's batches: `path`."""
    path.write_text("\n<|endoftext|>\n".join(f"Story {i}: the cat sat on the mat and was happy." * 5
                                              for i in range(40)))
    return path


def log_rows(out_dir):
    with open(Path(out_dir) / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def step_losses(out_dir):
    return {r["step"]: r["loss"] for r in log_rows(out_dir) if "loss" in r}


def test_a_run_writes_log_checkpoint_and_plot(tmp_path, cache_dir, capsys, backend):
    assert run(tmp_path, cache_dir, "--max-iters", "4", "--eval-interval", "2", "--num-samples", "1",
               "--sample-tokens", "8", "--backend", backend) == 0
    rows = log_rows(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows if "loss" in r)
    model = GPT.from_pretrained(tmp_path)                     # the best model is a GPT-2 directory
    assert model.config.n_embd == 16
    assert (tmp_path / "train_state.safetensors").exists()
    out = capsys.readouterr().out
    assert "Before training:" in out and "After training:" in out and "Once upon a time" in out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_a_loss_curve_that_cannot_be_written_does_not_fail_the_run(tmp_path, cache_dir, capsys):
    pytest.importorskip("matplotlib")
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    (tmp_path / "loss.png").unlink()
    (tmp_path / "loss.png").mkdir()
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 0
    assert "note: no loss curve" in capsys.readouterr().out
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]   # the PNG's temporary file too


def test_resume_is_exact_with_dropout(tmp_path, cache_dir, backend):
    flags = ["--dropout", "0.1", "--grad-accum", "2", "--eval-interval", "3", "--seed", "7", "--backend", backend]
    assert run(tmp_path / "whole", cache_dir, *flags, "--max-iters", "6") == 0
    assert run(tmp_path / "split", cache_dir, *flags, "--max-iters", "3") == 0
    assert run(tmp_path / "split", cache_dir, "--resume", "--max-iters", "6") == 0
    whole, split = step_losses(tmp_path / "whole"), step_losses(tmp_path / "split")
    assert list(split) == [1, 2, 3, 4, 5, 6]
    assert split == whole                                       # bit for bit, dropout and batches included
    a, b = GPT.from_pretrained(tmp_path / "whole"), GPT.from_pretrained(tmp_path / "split")
    for name, p in a.params.items():
        np.testing.assert_array_equal(b.params[name], p)
    # the same file, byte for byte: a checksum of it tells a reproduced run
    saved = {run: (tmp_path / run / "model.safetensors").read_bytes() for run in ("whole", "split")}
    assert saved["whole"] == saved["split"]


def test_resume_continues_the_out_dir_it_read(tmp_path, cache_dir, monkeypatch):
    """A run copied elsewhere resumes where it is now (here ./out, the default --out-dir), and
    leaves the directory it was saved from alone."""
    assert run(tmp_path / "saved", cache_dir, "--max-iters", "1") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    shutil.copytree(tmp_path / "saved", tmp_path / "cwd" / "out")
    monkeypatch.chdir(tmp_path / "cwd")
    assert train.main([*TINY, "--cache-dir", cache_dir, "--resume", "--max-iters", "2"]) == 0
    assert load_train_state(tmp_path / "cwd" / "out")[1]["step"] == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()} == before


def test_a_resume_whose_saved_token_cache_is_not_here_uses_this_machines_default(tmp_path, cache_dir, monkeypatch):
    """A run copied from another machine names a cache directory of that machine (its home, say):
    the resume must not create it, anywhere the state says, but use this machine's default."""
    os.symlink(cache_dir, tmp_path / "elsewhere")        # the saving machine's cache...
    assert train.main([*TINY, "--dataset", "embedded", "--out-dir", str(tmp_path / "o"),
                       "--cache-dir", str(tmp_path / "elsewhere"), "--max-iters", "1"]) == 0
    os.remove(tmp_path / "elsewhere")                    # ...is not on this one
    (tmp_path / "xdg").mkdir()
    os.symlink(cache_dir, tmp_path / "xdg" / "numgpt")   # this machine's default, already holding the tokens
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert train.main(["--out-dir", str(tmp_path / "o"), "--resume", "--max-iters", "2"]) == 0
    assert not os.path.lexists(tmp_path / "elsewhere")
    assert load_train_state(tmp_path / "o")[1]["train_config"]["cache_dir"] == str(tmp_path / "xdg" / "numgpt")


def test_a_resumed_run_may_change_its_data_source(tmp_path, cache_dir):
    text = tmp_path / "stories.txt"
    text.write_text("\n<|endoftext|>\n".join(f"Story {i}: the cat sat on the mat." * 5 for i in range(40)))
    flags = [*TINY, "--out-dir", str(tmp_path / "o"), "--cache-dir", cache_dir]
    assert train.main([*flags, "--data", str(text), "--max-iters", "1"]) == 0
    assert train.main([*flags, "--resume", "--dataset", "embedded", "--max-iters", "2"]) == 0
    info = load_train_state(tmp_path / "o")[1]
    assert info["source"] == "embedded" and info["train_config"]["data"] == []


def test_resume_refuses_a_max_iters_below_the_saved_step(tmp_path, cache_dir, capsys):
    assert run(tmp_path, cache_dir, "--max-iters", "2") == 0
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "1") == 2
    assert "--max-iters 1 is below the saved run's step 2" in capsys.readouterr().err
    capsys.readouterr()
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 0   # nothing left to train: done
    assert ("note: the run has trained its 2 steps (--max-iters 2); a larger --max-iters trains it further"
            in capsys.readouterr().out)


def test_resuming_a_finished_one_step_run_says_step_not_steps(tmp_path, cache_dir, capsys):
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    capsys.readouterr()
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "1") == 0
    assert "note: the run has trained its 1 step (--max-iters 1);" in capsys.readouterr().out


def test_resume_refuses_to_change_the_model(tmp_path, cache_dir, capsys):
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    assert run(tmp_path, cache_dir, "--resume", "--n-embd", "32") == 2
    assert "--n-embd" in capsys.readouterr().err


def test_resume_may_change_where_and_how_long_the_run_goes_on(tmp_path, cache_dir):
    """The settings that do not change what is trained may differ on --resume: the backend (auto
    names the one a run on NumPy used, or a GPU found since), the precision, the steps, the
    evaluations and samples."""
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    assert run(tmp_path, cache_dir, "--resume", "--backend", "auto", "--precision", "fp16", "--max-iters", "2",
               "--eval-interval", "2", "--eval-iters", "1", "--num-samples", "1", "--sample-tokens", "2") == 0
    _, info = load_train_state(tmp_path)
    assert info["step"] == 2 and info["train_config"]["precision"] == "fp16"


def test_a_resume_that_moves_max_iters_says_how_the_learning_rate_changes(tmp_path, cache_dir, capsys):
    """The cosine decay ends at --max-iters: a finished run continued further goes from min_lr back up."""
    flags = ["--lr", "1e-3", "--min-lr", "1e-4", "--warmup-iters", "0"]
    assert run(tmp_path, cache_dir, *flags, "--max-iters", "4") == 0
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "8") == 0
    assert ("note: the learning rate's cosine decay now ends at --max-iters 8, not at the run's 4: at step 4 it "
            "is 0.00055, where it was 0.0001") in capsys.readouterr().out   # 1e-4 + (1 + cos(pi / 2)) / 2 * 9e-4
    assert [r["lr"] for r in log_rows(tmp_path) if r.get("step") == 5] == [pytest.approx(0.00055)]
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "9") == 0
    assert "decay now ends at --max-iters 9, not at the run's 8" in capsys.readouterr().out   # each change is told
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "9") == 0
    assert "note: the learning rate" not in capsys.readouterr().out   # nothing moved, nothing to tell


def test_a_resume_in_the_warmup_moves_no_learning_rate_and_says_nothing(tmp_path, cache_dir, capsys):
    assert run(tmp_path, cache_dir, "--max-iters", "1", "--warmup-iters", "5") == 0
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 0
    assert "note: the learning rate" not in capsys.readouterr().out


def test_a_kill_while_a_resume_rewrites_the_log_leaves_it_whole(tmp_path, monkeypatch):
    """The resume cuts the log back to its checkpoint through a temporary file and a rename: a kill
    before the rename leaves the old log, not a truncated one."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n')

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        numgpt.training.rewrite_log(log, 1)
    assert log.read_text() == '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n'
    assert os.listdir(tmp_path) == ["log.jsonl"]


def test_resume_after_a_kill_in_the_middle_of_a_log_row(tmp_path, cache_dir):
    """kill -9 while a row is being written leaves half a line: the resume drops it."""
    assert run(tmp_path, cache_dir, "--max-iters", "2", "--eval-interval", "2") == 0
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.')
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "3") == 0
    assert list(step_losses(tmp_path)) == [1, 2, 3]
    with open(tmp_path / "log.jsonl", "a") as f:            # the plot reads the log the same way
        f.write('{"step": 4, "lo')
    assert [r["step"] for r in numgpt.training.read_log(tmp_path / "log.jsonl")][-1] == 3
    (tmp_path / "log.jsonl").write_text('{"step": 0}\n{"st\n{"step": 1}\n')
    with pytest.raises(CheckpointError, match="line 2"):    # damage elsewhere is not a kill: say where
        numgpt.training.read_log(tmp_path / "log.jsonl")
    # lines that Python's JSON parser refuses with other errors than JSONDecodeError: too deep, too many digits
    for line in ("[" * 100_000, '{"step": ' + "9" * 5000 + "}"):
        (tmp_path / "log.jsonl").write_text('{"step": 0}\n' + line + '\n{"step": 1}\n')
        with pytest.raises(CheckpointError, match="line 2"):
            numgpt.training.read_log(tmp_path / "log.jsonl")


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="no O_NOFOLLOW on this platform")
def test_a_resumed_run_writes_no_row_through_a_log_that_links_elsewhere(tmp_path, cache_dir):
    """An out-dir from elsewhere (downloaded, unpacked) can hold log.jsonl as a symbolic link to a
    file that does not exist yet, anywhere: the resume appended its rows there, creating it."""
    out, outside = tmp_path / "out", tmp_path / "outside.txt"
    assert run(out, cache_dir, "--max-iters", "2", "--eval-interval", "2") == 0
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").symlink_to(outside)
    assert run(out, cache_dir, "--resume", "--max-iters", "3") == 2   # named before the data
    assert not outside.exists()
    with pytest.raises(OSError, match="symbolic links"):   # the write itself does not follow it either
        numgpt.training.Trainer.write_row(type("T", (), {"is_main": True, "log_path": out / "log.jsonl"}), {})
    assert not outside.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_resumed_run_refuses_a_log_that_is_a_fifo(tmp_path, cache_dir, capsys, monkeypatch):
    """An out-dir from elsewhere (a tar archive) can hold log.jsonl as a FIFO: the resume's read of
    the log waited for a writer for ever, as a FIFO shard's did. read_log is replaced here so that
    the test fails instead of hanging where the FIFO reaches it."""
    out = tmp_path / "out"
    assert run(out, cache_dir, "--max-iters", "2", "--eval-interval", "2") == 0
    (out / "log.jsonl").unlink()
    os.mkfifo(out / "log.jsonl")
    read_log = numgpt.training.read_log
    monkeypatch.setattr(numgpt.training, "read_log", lambda path: read_log(path) if os.path.isfile(path) else
                        pytest.fail(f"read_log opened {path}, which is not a regular file"))
    capsys.readouterr()
    assert run(out, cache_dir, "--resume", "--max-iters", "3") == 2   # named before the data
    assert "log.jsonl is not a regular file" in capsys.readouterr().err


def test_a_kill_right_after_a_checkpoint_loses_no_log_row(tmp_path, cache_dir, monkeypatch):
    """A resume starts after its state's step and never evaluates that step again: the row of an
    evaluation must be in the log before its state is."""
    class Killed(BaseException):   # nothing in train.py catches it, as nothing can catch a kill -9
        pass

    save_state = numgpt.training.Trainer.save_state

    def save_then_die(self):
        save_state(self)
        if self.step == 2:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(numgpt.training.Trainer, "save_state", save_then_die)
        with pytest.raises(Killed):
            run(tmp_path, cache_dir, "--max-iters", "4", "--eval-interval", "2")
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "4", "--eval-interval", "2") == 0
    rows = numgpt.training.read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["deleted", "truncated", "config-deleted"])
def test_resume_replaces_a_damaged_best_model(tmp_path, cache_dir, capsys, damage):
    """The best model is saved only when the val loss beats its record: a resume that trusted a
    deleted or damaged one would keep it, and say at the end that the model is there."""
    assert run(tmp_path, cache_dir, "--max-iters", "2", "--eval-interval", "2") == 0
    weights = tmp_path / "model.safetensors"
    if damage == "deleted":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (tmp_path / "config.json").unlink()
    capsys.readouterr()
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "3", "--eval-interval", "2") == 0
    assert "the best model in" in capsys.readouterr().out
    GPT.from_pretrained(tmp_path)                          # saved again at step 3's evaluation


def test_resume_on_other_data_saves_the_model_at_its_next_evaluation(tmp_path, cache_dir, capsys):
    """--resume --data goes on training on other text. The best val loss so far was measured on
    the old data's validation split: kept, it would have to be beaten by a loss on the new one, and
    the model trained on the new data might never be saved."""
    text = write_stories(tmp_path / "stories.txt")
    out = tmp_path / "o"
    assert run(out, cache_dir, "--max-iters", "2", "--eval-interval", "2") == 0
    saved = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert train.main([*TINY, "--data", str(text), "--out-dir", str(out), "--cache-dir", cache_dir, "--resume",
                       "--max-iters", "3", "--eval-interval", "2"]) == 0
    assert "the run trained on other data before" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() != saved
    # the control: resumed on the data it trained on, the record stands
    assert train.main([*TINY, "--data", str(text), "--out-dir", str(out), "--cache-dir", cache_dir, "--resume",
                       "--max-iters", "4", "--eval-interval", "2"]) == 0
    assert "other data" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", [b'{"loss": 2.0}', b"7", b'{"step": 1.5}', b"\xff\xfe"],
                         ids=["no-step", "not-an-object", "float-step", "not-utf8"])
def test_resume_with_a_damaged_log(tmp_path, cache_dir, monkeypatch, capsys, damage):
    """The damage is named before the data is loaded (minutes, for a large corpus), not after."""
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    log = tmp_path / "log.jsonl"
    log.write_bytes(damage + b"\n" + log.read_bytes())
    monkeypatch.setattr(numgpt.training, "load_data", None)   # calling it would be a TypeError
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 2
    err = capsys.readouterr().err
    assert "log.jsonl" in err and "Traceback" not in err


def test_a_new_run_refuses_an_out_dir_that_holds_a_run(tmp_path, cache_dir, monkeypatch, capsys):
    """Forgetting --resume must not replace a trained model with an untrained one."""
    assert run(tmp_path, cache_dir, "--max-iters", "2", "--eval-interval", "2") == 0
    saved = {name: (tmp_path / name).read_bytes() for name in ("model.safetensors", "log.jsonl")}

    def no_data(*args):
        raise AssertionError("the out-dir is checked before any data is loaded")

    with monkeypatch.context() as m:
        m.setattr(numgpt.training, "load_data", no_data)
        assert run(tmp_path, cache_dir, "--max-iters", "1") == 2
    err = capsys.readouterr().err
    assert "already holds a training run (step 2)" in err and "--resume" in err and "--overwrite" in err
    assert all((tmp_path / name).read_bytes() == data for name, data in saved.items())
    assert run(tmp_path, cache_dir, "--max-iters", "1", "--overwrite", "--resume") == 2
    assert run(tmp_path, cache_dir, "--max-iters", "1", "--overwrite") == 0
    assert [r["step"] for r in log_rows(tmp_path)] == [0, 1, 1]    # nothing of the old run's log
    assert load_train_state(tmp_path)[1]["step"] == 1


def test_overwrite_keeps_the_old_run_until_the_new_one_saves(tmp_path, cache_dir, monkeypatch, capsys):
    """--overwrite replaces a run with the new run's first checkpoint: a new run that fails on its
    first evaluation, or is stopped before it, leaves the old run whole."""
    out = tmp_path / "o"
    assert run(out, cache_dir, "--max-iters", "2", "--eval-interval", "2") == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(numgpt.training, "estimate_loss", lambda model, batches: math.nan)
        assert run(out, cache_dir, "--overwrite") == 2
    assert "the train loss is nan at step 0" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(numgpt.training, "generate_samples", interrupted)   # Ctrl-C in "Before training:"
    assert run(out, cache_dir, "--overwrite", "--num-samples", "1") == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


def test_a_kill_during_the_first_checkpoint_of_overwrite_leaves_no_old_state_beside_the_new_model(
        tmp_path, cache_dir, monkeypatch, capsys):
    """A second Ctrl-C between the new model and the new state: --resume must not continue the old
    run's state with the new, untrained model as its best one."""
    assert run(tmp_path, cache_dir, "--max-iters", "2", "--eval-interval", "2") == 0
    old_weights = (tmp_path / "model.safetensors").read_bytes()

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(numgpt.training, "save_train_state", killed)
        assert run(tmp_path, cache_dir, "--overwrite", "--seed", "7") == 130
    assert (tmp_path / "model.safetensors").read_bytes() != old_weights   # the new run's model
    assert not (tmp_path / "train_state.safetensors").exists()
    assert [row["step"] for row in numgpt.training.read_log(tmp_path / "log.jsonl")] == [0]   # the new run's
    capsys.readouterr()
    assert run(tmp_path, cache_dir, "--resume") == 2
    assert "train_state.safetensors does not exist" in capsys.readouterr().err


def test_a_run_that_fails_before_it_saves_leaves_no_out_dir_it_made(tmp_path, cache_dir, monkeypatch, capsys):
    """Bad data, or a Ctrl-C in the first evaluation: the out-dir the run created goes again, empty,
    with the parents it created for it; one that was there before stays, with what it holds."""
    def bad_data(*args):
        raise numgpt.errors.DataError("no stories here")

    with monkeypatch.context() as m:
        m.setattr(numgpt.training, "load_data", bad_data)
        assert run(tmp_path / "new" / "run", cache_dir) == 2
        assert "no stories here" in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
        (tmp_path / "empty").mkdir()                   # an empty parent that was there before stays
        assert run(tmp_path / "empty" / "new" / "run", cache_dir) == 2
        assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
        (tmp_path / "mine").mkdir()
        assert run(tmp_path / "mine", cache_dir) == 2
        assert (tmp_path / "mine").is_dir()

    def interrupted(model, batches):
        raise KeyboardInterrupt

    monkeypatch.setattr(numgpt.training, "estimate_loss", interrupted)
    assert run(tmp_path / "stopped", cache_dir, "--num-samples", "0") == 130
    assert not (tmp_path / "stopped").exists()


def test_a_log_alone_is_a_run_too(tmp_path, cache_dir, capsys):
    """A fresh run must not append to, or silently replace, another run's log."""
    (tmp_path / "log.jsonl").write_text('{"step": 0, "train_loss": 3.0, "val_loss": 3.1}\n')
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 2
    assert "holds log.jsonl but no train_state.safetensors" in capsys.readouterr().err
    assert run(tmp_path, cache_dir, "--max-iters", "1", "--overwrite") == 0
    assert [r["step"] for r in log_rows(tmp_path)] == [0, 1, 1]              # the old row is gone


def test_a_run_killed_during_its_first_checkpoint_is_not_sent_to_resume(tmp_path, cache_dir, capsys):
    """A SIGKILL between the first checkpoint's model and its state leaves a model, its config and the
    log, but nothing --resume can continue: the refusal must offer only --overwrite."""
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    (tmp_path / STATE_FILE).unlink()
    capsys.readouterr()
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 2
    err = capsys.readouterr().err
    assert "holds model.safetensors, config.json, log.jsonl" in err and f"but no {STATE_FILE}" in err
    assert "--overwrite" in err and "continue it with --resume" not in err
    assert run(tmp_path, cache_dir, "--max-iters", "1", "--overwrite") == 0


def test_a_new_run_refuses_a_config_json_or_plot_it_would_overwrite(tmp_path, cache_dir, capsys):
    """An out-dir holding another program's config.json (or a loss.png) is not a numgpt run, but
    the first checkpoint would replace it all the same."""
    (tmp_path / "config.json").write_text('{"mine": true}')
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 2
    assert "holds config.json, which this run would overwrite" in capsys.readouterr().err
    assert (tmp_path / "config.json").read_text() == '{"mine": true}'
    assert run(tmp_path, cache_dir, "--max-iters", "1", "--overwrite") == 0
    GPT.from_pretrained(tmp_path)


def ctrl_c_in_evaluation(monkeypatch, evaluation, signum=signal.SIGINT):
    """Send this process a SIGINT (or `signum`) while the `evaluation`-th evaluation (1 = the first)
    estimates its train loss, as a Ctrl-C there would."""
    estimate_loss, calls = numgpt.training.estimate_loss, []

    def estimate_with_ctrl_c(model, batches):
        calls.append(batches)
        if len(calls) == 2 * evaluation - 1:   # each evaluation estimates two losses, train then val
            os.kill(os.getpid(), signum)
        return estimate_loss(model, batches)

    monkeypatch.setattr(numgpt.training, "estimate_loss", estimate_with_ctrl_c)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_in_the_first_evaluation_keeps_the_old_run(tmp_path, cache_dir, monkeypatch, capfd, signum):
    """Its checkpoint would hold an untrained model and, with --overwrite, replace the old run.
    SIGTERM does the same, and the exit status says which signal it was."""
    assert run(tmp_path, cache_dir, "--max-iters", "2", "--eval-interval", "2") == 0
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    ctrl_c_in_evaluation(monkeypatch, 1, signum)
    assert run(tmp_path, cache_dir, "--max-iters", "4", "--overwrite") == 128 + signum
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old
    err = capfd.readouterr().err
    assert "Stopped." in err and "Continue with" not in err   # --resume would continue the old run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_tokenizing_stops_and_leaves_nothing_half_written(tmp_path, monkeypatch, capfd, signum):
    """Before the training loop, Ctrl-C and SIGTERM (a batch scheduler's, at any moment) stop the
    run at once: the half-written token cache and the out-dir it made are removed, and the exit
    status names the signal. (SIGTERM used to kill the process there, leaving both behind.)"""
    tokenize_into = numgpt.training.dataset._tokenize_into

    def interrupted(documents, out, *args):
        out.write(b"\0" * 1000)                 # some tokens are written, then the signal comes
        os.kill(os.getpid(), signum)
        return tokenize_into(documents, out, *args)

    monkeypatch.setattr(numgpt.training.dataset, "_tokenize_into", interrupted)
    cache, out = tmp_path / "cache", tmp_path / "out"
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    assert run(out, str(cache), "--max-iters", "1") == 128 + signum
    assert "Stopped." in capfd.readouterr().err
    assert not out.exists() and not [p.name for p in cache.rglob("*") if p.is_file()]
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler   # main hands SIGTERM back to its caller


def test_ctrl_c_in_a_later_evaluation_stops_after_it(tmp_path, cache_dir, monkeypatch, capfd):
    """It stops there, not a step later; it says what it does and how to go on, with an out-dir
    quoted as the shell needs it."""
    out = tmp_path / "my run"
    ctrl_c_in_evaluation(monkeypatch, 2)
    assert run(out, cache_dir, "--max-iters", "10", "--eval-interval", "2") == 130
    assert load_train_state(out)[1]["step"] == 2 and max(step_losses(out)) == 2
    err = capfd.readouterr().err
    assert "Ctrl-C: stopping after this step" in err
    assert f"Continue with: python train.py --resume --out-dir '{out}'" in err


def test_the_sample_command_at_the_end_is_quoted_as_the_shell_needs_it(tmp_path, cache_dir, capsys):
    out = tmp_path / "my run"
    assert run(out, cache_dir, "--max-iters", "1") == 0
    assert f"(python sample.py --ckpt '{out}')" in capsys.readouterr().out


def test_ctrl_c_at_the_last_step_stops_without_samples_or_resume_hint(tmp_path, cache_dir, monkeypatch, capfd):
    ctrl_c_in_evaluation(monkeypatch, 2)
    assert run(tmp_path, cache_dir, "--max-iters", "2", "--eval-interval", "2", "--num-samples", "1") == 130
    out, err = capfd.readouterr()
    assert "Interrupted: saved step 2" in err and "Continue with" not in err and "After training" not in out
    assert load_train_state(tmp_path)[1]["step"] == 2


def test_relative_data_and_cache_paths_are_saved_absolute(tmp_path, monkeypatch, capsys):
    """So the run resumes from any directory, on the same text and with the same token cache."""
    (tmp_path / "stories.txt").write_text("The cat sat on the mat and was happy. " * 200)
    monkeypatch.chdir(tmp_path)
    assert train.main([*TINY, "--data", "stories.txt", "--out-dir", "o", "--cache-dir", "cache",
                       "--max-iters", "1"]) == 0
    saved = load_train_state(tmp_path / "o")[1]["train_config"]
    assert saved["data"] == [str(tmp_path / "stories.txt")] and saved["cache_dir"] == str(tmp_path / "cache")
    monkeypatch.chdir(tmp_path / "o")
    capsys.readouterr()
    assert train.main(["--resume", "--out-dir", ".", "--max-iters", "2", "--no-progress"]) == 0
    assert f"using cached tokens {tmp_path / 'cache'}" in capsys.readouterr().out


def test_resume_keeps_the_data_source_that_auto_chose(tmp_path, cache_dir, monkeypatch, capsys):
    """A --dataset auto run started without TinyStories must not switch to it when resumed."""
    auto = [*TINY, "--out-dir", str(tmp_path), "--cache-dir", cache_dir]
    monkeypatch.setattr(numgpt.training.dataset, "tinystories_available", lambda: (False, "offline"))
    assert train.main([*auto, "--max-iters", "1"]) == 0
    monkeypatch.setattr(numgpt.training.dataset, "tinystories_available", lambda: (True, "online now"))
    assert train.main([*auto, "--resume", "--max-iters", "2"]) == 0
    assert "online now" not in capsys.readouterr().out
    assert load_train_state(tmp_path)[1]["source"] == "embedded"
    # and a run that trained on TinyStories says so when TinyStories is gone
    rewrite_state(tmp_path, lambda arrays, info: info.update(source="tinystories"))
    monkeypatch.setattr(numgpt.training.dataset, "tinystories_available", lambda: (False, "offline"))
    assert train.main([*auto, "--resume", "--max-iters", "3"]) == 2
    assert "trained on TinyStories, which cannot be used now: offline" in capsys.readouterr().err


@pytest.mark.parametrize("closed, signum", [(False, signal.SIGINT), (True, signal.SIGINT), (False, signal.SIGTERM)],
                         ids=["ctrl-c", "ctrl-c-stdin-and-stderr-closed", "sigterm"])
def test_a_stop_signal_saves_and_resumes(tmp_path, cache_dir, closed, signum):
    """Ctrl-C, or the SIGTERM of `kill`, `timeout` or a batch scheduler, saves the step it finishes.
    With stdin and stderr closed (0<&- 2>&-), the descriptor 2 is the next file opened, not a
    stream: the notice must not be written there, nor fail the step."""
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--dataset", "embedded", "--out-dir", str(tmp_path),
           "--cache-dir", cache_dir, "--max-iters", "100000", "--eval-interval", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=(lambda: (os.close(0), os.close(2))) if closed else None)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "log.jsonl").exists() or len(step_losses(tmp_path)) < 3:
        time.sleep(0.2)
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert closed or ("Traceback" not in err and "--resume" in err and "stopping after this step" in err)
    stopped_at = max(step_losses(tmp_path))
    assert load_train_state(tmp_path)[1]["step"] == stopped_at
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", str(stopped_at + 2)) == 0
    assert max(step_losses(tmp_path)) == stopped_at + 2


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_output_that_cannot_be_written_is_named(tmp_path, cache_dir):
    """`> /dev/full`: every write fails with ENOSPC, as on a full disk. The error must say that it
    was the output, not a checkpoint, and fail before any state exists without a traceback."""
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--dataset", "embedded", "--out-dir", str(tmp_path),
           "--cache-dir", cache_dir, "--max-iters", "2"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert "cannot write to the standard output: No space left on device" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_an_output_that_fails_only_when_flushed_is_named(tmp_path, cache_dir, monkeypatch, capsys):
    """A file on a disk that fills up by the end of the run: its buffered text fails at the flush."""
    class FullAtFlush(io.StringIO):
        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(sys, "stdout", FullAtFlush())
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 1
    assert "cannot write to the standard output: No space left on device" in capsys.readouterr().err


def test_the_out_dir_holds_the_tokenizer_for_transformers(tmp_path, cache_dir):
    """vocab.json and merges.txt, GPT-2's encoder.json and vocab.bpe under transformers' names."""
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    vocab_bpe, encoder_json = bundled_bpe_files()
    assert (tmp_path / "merges.txt").read_bytes() == vocab_bpe.read_bytes()
    assert (tmp_path / "vocab.json").read_bytes() == encoder_json.read_bytes()


def test_a_run_without_gpt3_tokenizers_files_says_the_out_dir_lacks_the_tokenizer(tmp_path, cache_dir, monkeypatch,
                                                                                  capsys):
    """A broken install (tiktoken's cache still tokenizes) trains, and says why transformers will
    find no tokenizer in the out-dir."""
    # tiktoken's cache, which holds GPT-2's files: the fallback finds them with no network. And the
    # tokenizer built anew, so that the run takes the fallback whether or not an earlier test in this
    # process built it (run first, alone or in another order, it went to the network and failed offline)
    gpt2 = get_tokenizer()
    monkeypatch.setattr(numgpt.data.tokenizer.tiktoken, "get_encoding", lambda name: gpt2)
    for module in (numgpt.training, numgpt.data.tokenizer):
        monkeypatch.setattr(module, "bundled_bpe_files", lambda: None)
    get_tokenizer.cache_clear()
    try:
        assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    finally:
        get_tokenizer.cache_clear()   # later tests build it from the bundled files again
    assert "the out-dir gets no merges.txt or vocab.json" in capsys.readouterr().out
    assert not any((tmp_path / name).exists() for name in HF_TOKENIZER_FILES)


def test_another_tokenizer_in_the_out_dir_is_refused_then_replaced(tmp_path, cache_dir, capsys):
    """Another model's vocab.json would pair GPT-2 tokens with its ids, silently: a new run refuses
    it as it refuses a config.json, and --overwrite replaces it with GPT-2's."""
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 2
    assert "holds vocab.json, which this run would overwrite" in capsys.readouterr().err
    assert run(tmp_path, cache_dir, "--max-iters", "1", "--overwrite") == 0
    assert (tmp_path / "vocab.json").read_bytes() == bundled_bpe_files()[1].read_bytes()


def test_a_resumed_run_writes_the_tokenizer_it_lacks(tmp_path, cache_dir):
    """An out-dir saved before numgpt wrote the tokenizer gets it at the resumed run's next
    evaluation, whether or not the model improves there."""
    assert run(tmp_path, cache_dir, "--max-iters", "2", "--eval-interval", "1") == 0
    for name in HF_TOKENIZER_FILES:
        (tmp_path / name).unlink()
    rows = log_rows(tmp_path)
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "3", "--eval-interval", "1") == 0
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    assert len(log_rows(tmp_path)) > len(rows)


def test_fine_tune_from_a_checkpoint(tmp_path, cache_dir):
    assert run(tmp_path / "base", cache_dir, "--max-iters", "2") == 0
    assert run(tmp_path / "tuned", cache_dir, "--init-from", str(tmp_path / "base"), "--max-iters", "2") == 0
    assert GPT.from_pretrained(tmp_path / "tuned").config == GPT.from_pretrained(tmp_path / "base").config


def test_a_fine_tuning_run_resumes_with_its_checkpoint_named_another_way(tmp_path, cache_dir, capsys, monkeypatch):
    """--init-from is saved as an absolute path, as --data is, and a resume that names the same
    directory another way (./base for base, or from elsewhere) repeats it; another directory does not."""
    assert run(tmp_path / "base", cache_dir, "--max-iters", "1") == 0
    assert run(tmp_path / "other", cache_dir, "--max-iters", "1") == 0
    monkeypatch.chdir(tmp_path)
    assert run("tuned", cache_dir, "--init-from", "base", "--max-iters", "1") == 0
    assert load_train_state(tmp_path / "tuned")[1]["train_config"]["init_from"] == str(tmp_path / "base")
    assert run("tuned", cache_dir, "--resume", "--init-from", "./base", "--max-iters", "2") == 0
    monkeypatch.chdir(tmp_path / "other")
    assert run("../tuned", cache_dir, "--resume", "--init-from", "../base", "--max-iters", "3") == 0
    capsys.readouterr()
    assert run("../tuned", cache_dir, "--resume", "--init-from", ".", "--max-iters", "4") == 2
    assert "which used different --init-from" in capsys.readouterr().err


def test_fine_tuning_takes_the_model_shape_from_the_checkpoint(tmp_path, cache_dir, capsys):
    assert run(tmp_path / "base", cache_dir, "--max-iters", "1", "--activation", "relu") == 0
    tune = ["--init-from", str(tmp_path / "base"), "--out-dir", str(tmp_path / "tuned"), "--dataset", "embedded",
            "--cache-dir", cache_dir, "--block-size", "16", "--batch-size", "4", "--eval-iters", "2",
            "--num-samples", "0", "--no-progress", "--max-iters", "1"]
    assert train.main([*tune, "--n-layer", "3"]) == 2
    assert "--n-layer 3 conflicts with the --init-from checkpoint, which has --n-layer 1: drop --n-layer" \
        in capsys.readouterr().err
    # a boolean flag is named as typed, with the checkpoint's as its flag: not "--bias ... (True)"
    assert train.main([*tune, "--no-bias"]) == 2
    assert "--no-bias conflicts with the --init-from checkpoint, which has --bias: drop --no-bias" \
        in capsys.readouterr().err
    assert train.main([*tune, "--no-tie-weights"]) == 2
    assert "--no-tie-weights conflicts with the --init-from checkpoint, which has --tie-weights" \
        in capsys.readouterr().err
    assert train.main([*tune, "--activation", "gelu"]) == 2
    assert "--activation gelu conflicts with the --init-from checkpoint, which has --activation relu" \
        in capsys.readouterr().err
    assert train.main(tune) == 0
    assert "1 layer, 16 wide" in capsys.readouterr().out          # not the defaults' 4 layers, 128 wide
    saved = load_train_state(tmp_path / "tuned")[1]["train_config"]
    assert (saved["n_layer"], saved["n_head"], saved["n_embd"], saved["activation"]) == (1, 2, 16, "relu")


def test_untied_and_bias_free_models_train_resume_and_fine_tune(tmp_path, cache_dir, capsys):
    """--no-tie-weights and --no-bias reach the model, its saved config and the resumed run; a
    fine-tuning run takes them from its checkpoint."""
    assert run(tmp_path / "base", cache_dir, "--max-iters", "1", "--no-tie-weights", "--no-bias") == 0
    config = GPT.from_pretrained(tmp_path / "base").config
    assert (config.tie_weights, config.bias) == (False, False)
    assert "lm_head.weight" in GPT.from_pretrained(tmp_path / "base").params
    assert run(tmp_path / "base", cache_dir, "--resume", "--bias") == 2
    assert "used different --bias" in capsys.readouterr().err
    assert run(tmp_path / "base", cache_dir, "--resume", "--max-iters", "2") == 0
    assert run(tmp_path / "tuned", cache_dir, "--init-from", str(tmp_path / "base"), "--max-iters", "1") == 0
    saved = load_train_state(tmp_path / "tuned")[1]["train_config"]
    assert (saved["tie_weights"], saved["bias"]) == (False, False)


def test_local_text_files(tmp_path, cache_dir):
    text = write_stories(tmp_path / "stories.txt")
    assert train.main([*TINY, "--data", str(text), "--out-dir", str(tmp_path / "o"),
                       "--cache-dir", cache_dir, "--max-iters", "2"]) == 0


def test_non_utf8_data_is_decoded_with_a_note(tmp_path, cache_dir, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes(("Caf\xe9 au lait. " * 200).encode("latin-1"))
    assert train.main([*TINY, "--data", str(text), "--out-dir", str(tmp_path / "o"), "--cache-dir", cache_dir,
                       "--max-iters", "1"]) == 0
    captured = capsys.readouterr()
    assert "UTF-8" in captured.out + captured.err


def test_fp16_mixed_precision_trains_and_resumes_its_loss_scale(tmp_path, cache_dir, backend):
    assert run(tmp_path, cache_dir, "--precision", "fp16", "--max-iters", "2", "--eval-interval", "2",
               "--backend", backend) == 0
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "3") == 0
    assert all(math.isfinite(loss) for loss in step_losses(tmp_path).values())
    _, info = load_train_state(tmp_path)
    assert info["train_config"]["precision"] == "fp16"
    assert info["loss_scaler"] == {"scale": 2.0 ** 16, "good_steps": 3}     # counted across the resume


def test_fp16_step_with_overflowing_gradients_is_skipped(tmp_path, cache_dir, monkeypatch, capsys, backend):
    """A loss scale far too large overflows float16: that step must leave the parameters alone and
    halve the scale."""
    monkeypatch.setattr(numgpt.training, "DynamicLossScaler", lambda: DynamicLossScaler(scale=2.0 ** 60))
    assert run(tmp_path, cache_dir, "--precision", "fp16", "--max-iters", "1", "--seed", "3", "--backend", backend) == 0
    assert "overflowed" in capsys.readouterr().out
    arrays, info = load_train_state(tmp_path)
    assert info["loss_scaler"]["scale"] == 2.0 ** 59
    assert (info["step"], info["adam_step"]) == (1, 0)   # AdamW's count, behind the run's: what a resume needs
    [row] = [r for r in log_rows(tmp_path) if "loss" in r]
    assert "grad_norm" not in row                         # a skipped step's gradients overflowed: no norm
    untrained = GPT(GPTConfig(**info["model_config"]), seed=3)
    for name, p in untrained.params.items():
        np.testing.assert_array_equal(arrays["param"][name], p, err_msg=name)


def test_fp16_overflow_that_no_loss_scale_cures_stops_the_run(tmp_path, cache_dir, monkeypatch, capsys):
    """An overflow outside the gradients' reach (activations, logits) persists at every scale:
    the scaler would halve it a thousand times to 0, skipping every step, and then fail on it."""
    monkeypatch.setattr(numgpt.training, "DynamicLossScaler", lambda: DynamicLossScaler(scale=2.0 ** -22))
    monkeypatch.setattr(numgpt.training, "all_finite", lambda arrays: False)
    assert run(tmp_path, cache_dir, "--precision", "fp16", "--max-iters", "10") == 2
    out, err = capsys.readouterr()
    assert out.count("step skipped") == 2   # at scales 2^-23 and 2^-24; the third is refused
    assert "float16 overflowed at step 2" in err and "--precision tf32 or fp32" in err and "Traceback" not in err
    assert "keeps its state of step 0" in err and load_train_state(tmp_path)[1]["step"] == 0


@cupy_standin.needs_compiler
@pytest.mark.parametrize("precision, reads", [("fp32", 1), ("fp16", 2)])   # fp16: the overflow check too
def test_a_training_step_reads_from_the_gpu_once(tmp_path, cache_dir, monkeypatch, precision, reads):
    """On a GPU every read from the device makes the host wait for the whole step: a step reads the
    loss (with the stop flag) once at its end, and under fp16 whether the gradients are finite."""
    counts = []
    train_step = numgpt.training.Trainer.train_step

    def counted(self):
        before = cupy_standin.transfers["to_host"]
        result = train_step(self)
        counts.append(cupy_standin.transfers["to_host"] - before)
        return result

    cupy_standin.install(monkeypatch)   # on a GPU machine too: the stand-in counts, the GPU does not
    monkeypatch.setattr(numgpt.training.Trainer, "train_step", counted)
    assert run(tmp_path, cache_dir, "--backend", "cupy", "--precision", precision, "--grad-accum", "2",
               "--max-iters", "3") == 0
    assert counts == [reads] * 3


@cupy_standin.needs_compiler
def test_the_log_names_the_device_and_why_auto_chose_the_cpu(tmp_path, cache_dir, capsys, monkeypatch):
    """The model line says where training runs; --backend auto says why it is not the GPU (here a GPU
    without NVRTC, which CuPy sees and cannot compile for)."""
    cupy_standin.install(monkeypatch)
    with pytest.MonkeyPatch.context() as patch:
        cupy_standin.remove_nvrtc(patch)
        assert run(tmp_path / "cpu", cache_dir, "--backend", "auto", "--max-iters", "1") == 0
    out = "".join(capsys.readouterr())
    assert "--backend auto: training on the CPU, because CuPy sees a GPU but cannot load NVRTC" in out
    assert " wide, on the CPU; " in out
    assert run(tmp_path / "gpu", cache_dir, "--backend", "auto", "--max-iters", "1") == 0
    out = "".join(capsys.readouterr())
    assert " wide, on NumPy (the CuPy stand-in of numgpt's tests); " in out and "--backend auto" not in out


@cupy_standin.needs_compiler
def test_tf32_turns_on_cublas_tf32(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "0")   # set_tf32 sets it: monkeypatch puts back what was there
    cupy_standin.install(monkeypatch)      # which records the compute type, as a GPU does not
    linalg = cupy_standin.MODULES["cupy._core._routines_linalg"]
    assert run(tmp_path, cache_dir, "--backend", "cupy", "--precision", "tf32", "--max-iters", "1") == 0
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32 and os.environ["CUPY_TF32"] == "1"


@cupy_standin.needs_compiler
def test_a_tf32_run_resumed_on_the_cpu_is_told_to_give_precision_fp32(tmp_path, cache_dir, capsys):
    """A GPU run's --precision tf32 is saved, not typed again: continued on the CPU, the message names
    the resumable --precision fp32 that makes it run there, not the --backend cupy it cannot have."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUPY_TF32", "0")
        patch.setattr(numgpt.precision, "_tf32", False)   # set_tf32 sets it: put back after the GPU run
        cupy_standin.install(patch)
        assert run(tmp_path, cache_dir, "--backend", "cupy", "--precision", "tf32", "--max-iters", "1") == 0
    capsys.readouterr()
    resume = ["--resume", "--out-dir", str(tmp_path), "--max-iters", "2", "--no-progress", "--backend"]
    for backend in ("numpy", "auto"):   # here auto is the CPU: the stand-in is gone
        assert train.main([*resume, backend]) == 2
        err = capsys.readouterr().err
        assert "this run trained with --precision tf32" in err and "--precision fp32" in err, err
        assert "Traceback" not in err
    assert train.main([*resume, "numpy", "--precision", "fp32"]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--precision", "tf32"], "--backend cupy"),
    (["--precision", "fp16", "--dtype", "float64"], "--dtype float32"),
    (["--lr", "0"], "--lr"),
    (["--lr=-1e-3"], "--lr"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--batch-size", "0"], "--batch-size"),
    (["--min-lr", "1"], "--min-lr"),
    (["--dropout", "1.5"], "--dropout"),
    (["--dropout", "nan"], "--dropout"),
    (["--block-size", "5000000"], "block"),
    (["--seed", "-1"], "--seed"),
    (["--grad-clip", "nan"], "--grad-clip"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--weight-decay", "1e308"], "lr * weight_decay must be below 1"),
    (["--lr", "0.5", "--weight-decay", "2"], "lr * weight_decay must be below 1"),   # exactly 1: weights x 0
    (["--out-dir="], "--out-dir"),
    (["--grad-accum", str(10**20)], "too large"),                   # beyond NumPy's int64
    (["--batch-size", str(10**9)], "GiB of memory"),                # more than any machine holds
    (["--n-layer", str(10**18)], "GiB of memory"),
    (["--eval-iters", str(10**9)], "GiB of memory"),
    (["--num-samples", str(10**17)], "GiB of memory"),
])
def test_bad_hyperparameters(tmp_path, cache_dir, capsys, flags, message):
    assert run(tmp_path, cache_dir, "--max-iters", "1", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flags", [["--n-embd", "30", "--n-head", "4"], ["--dropout", "1.5"], ["--seed", "-1"],
                                   ["--batch-size", str(10**9)], ["--precision", "tf32"]])
def test_bad_settings_are_found_before_the_data_and_the_out_dir(tmp_path, cache_dir, monkeypatch, flags):
    monkeypatch.setattr(numgpt.training, "load_data", None)   # calling it would be a TypeError
    assert run(tmp_path / "o", cache_dir, *flags) == 2
    assert not (tmp_path / "o").exists()


def test_a_resumed_run_lets_go_of_the_state_files_arrays_once_it_has_them(tmp_path, cache_dir, monkeypatch):
    """--resume reads the state's parameters and AdamW moments: the model takes the parameters, the
    optimizer copies the moments, and the file's arrays go before the best model is read and
    training starts. Holding them (and a copy of the parameters) made the resume's setup the run's
    peak at GPT-2 124M: 3.8 GiB, against 3.3 for a training step at batch 1; now 2.9."""
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    read, left_at_the_best_model = [], []
    load = numgpt.training.load_train_state

    def reading(out_dir):
        state = load(out_dir)
        read.extend(weakref.ref(a) for group in state[0].values() for a in group.values())
        return state

    best_model_problem = numgpt.training.Trainer._best_model_problem

    def checking(self):
        alive = [ref() for ref in read if ref() is not None]
        left_at_the_best_model.append([a for a in alive if not any(a is p for p in self.model.params.values())])
        return best_model_problem(self)

    monkeypatch.setattr(numgpt.training, "load_train_state", reading)
    monkeypatch.setattr(numgpt.training.Trainer, "_best_model_problem", checking)
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 0
    assert len(read) > 0 and left_at_the_best_model == [[]]


@pytest.mark.parametrize("dropout", ["0", "0.1"])
def test_the_memory_floor_is_below_what_a_run_allocates(tmp_path, cache_dir, dropout):
    """check_memory refuses a run whose floor exceeds the machine: the floor must never be more
    than a run really allocates (tracemalloc sees NumPy's arrays), or a run that fits is refused."""
    flags = ["--n-layer", "2", "--batch-size", "32", "--block-size", "64", "--num-samples", "2", "--sample-tokens", "8",
             "--dropout", dropout]
    tracemalloc.start()
    try:
        assert run(tmp_path, cache_dir, "--max-iters", "1", *flags) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    cfg = TrainConfig(**load_train_state(tmp_path)[1]["train_config"])
    floor = memory_floor(cfg, cfg.model_config())
    assert peak / 4 < floor < peak    # a floor, and not a vacuous one


def test_the_memory_floor_counts_the_attention_matrices_where_they_are_formed():
    """GPT-2 124M, batch 64 x 1024, on an 80 GiB GPU: the fused attention kernel never forms the
    (T,T) probabilities, and the floor is 29 GiB; with dropout every layer keeps them twice (3 GiB
    each, 72 GiB over 12 layers), and the run cannot fit."""
    cfg = TrainConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=64)
    dropped = dataclasses.replace(cfg, dropout=0.1)
    floor = lambda c, backend: memory_floor(c, c.model_config(), backend)
    assert floor(cfg, "cupy") < 80 * 2**30 < floor(dropped, "cupy")
    assert floor(cfg, "numpy") > 60 * 2**30   # NumPy's attention always forms them


def test_ranks_on_one_machine_share_its_memory(monkeypatch):
    """Each of a machine's ranks holds a whole model: NumPy's ranks share the RAM, a GPU is one rank's."""
    cfg = TrainConfig(n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=8)
    floor = memory_floor(cfg, cfg.model_config(), "numpy", ranks=2)
    monkeypatch.setattr(numgpt.training, "memory_size", lambda xp: 1.5 * floor)
    numgpt.training.check_memory(cfg, cfg.model_config(), np, ranks=2, local_ranks=1)   # one here, one elsewhere
    with pytest.raises(ConfigError, match="for each of this machine's 2 ranks"):
        numgpt.training.check_memory(cfg, cfg.model_config(), np, ranks=2, local_ranks=2)


def test_the_memory_floor_of_a_rank_is_that_of_its_share_of_the_batch(monkeypatch):
    """Each of 2 ranks holds half the global batch's activations, and on a GPU its own memory."""
    cfg = TrainConfig(n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=8)
    half = dataclasses.replace(cfg, batch_size=4)
    for backend in ("numpy", "cupy"):
        assert memory_floor(cfg, cfg.model_config(), backend, 2) == memory_floor(half, half.model_config(), backend)
    cupy_standin.install(monkeypatch)
    floor = memory_floor(cfg, cfg.model_config(), "cupy", ranks=2)
    monkeypatch.setattr(numgpt.training, "memory_size", lambda xp: 1.5 * floor)
    numgpt.training.check_memory(cfg, cfg.model_config(), cupy_standin.cupy, ranks=2, local_ranks=2)


class LocalRanks(numgpt.distributed.Communicator):
    """Rank 0 of `size`, `local_size` of them on this machine, without MPI."""

    def __init__(self, size, local_size):
        self.size, self.local_size = size, local_size


@pytest.mark.parametrize("local_ranks, fits", [(1, True), (2, False)])
def test_setup_checks_the_memory_of_its_share_of_the_batch_beside_this_machines_ranks(
        tmp_path, monkeypatch, local_ranks, fits):
    """2 ranks, on one machine or two, in RAM for one rank's share of the batch and less than two:
    each rank's floor is that of half the batch, and ranks on one machine add theirs up."""
    cfg = TrainConfig(n_layer=2, n_head=2, n_embd=64, block_size=256, batch_size=64, dataset="embedded",
                      out_dir=str(tmp_path / "out"))
    share = memory_floor(cfg, cfg.model_config(), ranks=2)
    whole = memory_floor(cfg, cfg.model_config())
    size = (share + min(whole, 2 * share)) / 2
    assert share < size < whole   # a run that computed the whole batch's floor would not fit
    monkeypatch.setattr(numgpt.training, "memory_size", lambda xp: size)

    class Fitted(Exception):
        """Setup reached the data: the memory check let the run go on."""

    def load_data(*args):
        raise Fitted

    monkeypatch.setattr(numgpt.training, "load_data", load_data)
    trainer = numgpt.training.Trainer(cfg, log=lambda message: None, comm=LocalRanks(2, local_ranks))
    with trainer, pytest.raises(Fitted if fits else ConfigError) as error:
        trainer.setup()
    assert fits or "for each of this machine's 2 ranks" in str(error.value)


@pytest.mark.parametrize("environ, threads", [
    ({"MPI_LOCALNRANKS": "2"}, "4"),                                     # MPICH's mpiexec: 2 ranks on 8 cores
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, "2"),                          # Open MPI's: 3 ranks
    ({"MPI_LOCALNRANKS": "64"}, "1"),                                    # never 0 threads
    ({"MPI_LOCALNRANKS": "2", "OMP_NUM_THREADS": "3"}, None),            # the user's choice stands
    ({"MPI_LOCALNRANKS": "2", "OPENBLAS_NUM_THREADS": "3"}, None),       # in any of the variables
    ({"MPI_LOCALNRANKS": "2", "MKL_NUM_THREADS": "3"}, None),
    ({"MPI_LOCALNRANKS": ""}, None),                                     # not a count: no launcher
    ({"MPI_LOCALNRANKS": "1"}, None),                                    # alone: every core
    ({}, None),                                                          # no mpiexec
])
@pytest.mark.parametrize("affinity", [True, False], ids=["affinity-mask", "cpu-count"])
def test_ranks_on_one_machine_share_its_cores(monkeypatch, environ, threads, affinity):
    """On a machine of 8 cores, as its affinity mask says or, where the OS has none, its count."""
    if affinity:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    else:
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 8)
    given = dict(environ)
    train.share_cores_among_local_ranks(environ)
    expected = {**given, **dict.fromkeys(train.THREAD_VARIABLES, threads)} if threads else given
    assert environ == expected


@pytest.mark.parametrize("error, message", [
    (MemoryError("Unable to allocate 13.4 GiB for an array with shape (60000, 60000)"),
     "error: out of memory: Unable to allocate 13.4 GiB"),
    (MemoryError(), "error: out of memory. Use"),   # Python's own, from reading the data, says nothing
])
def test_running_out_of_memory_is_one_line(tmp_path, cache_dir, monkeypatch, capsys, error, message):
    def huge(*args, **kwargs):
        raise error

    monkeypatch.setattr(numgpt.training, "build_model", huge)
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 1
    err = capsys.readouterr().err
    assert message in err and "--batch-size" in err and "Traceback" not in err


def test_a_bug_in_a_single_process_reaches_the_caller_with_its_traceback(tmp_path, cache_dir, monkeypatch):
    """Only with several ranks does main() turn an unexpected exception into the job's end."""
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug in numgpt")

    monkeypatch.setattr(numgpt.training, "build_model", bug)
    with pytest.raises(ZeroDivisionError, match="a bug in numgpt"):
        run(tmp_path, cache_dir, "--max-iters", "1")


@pytest.mark.parametrize("content", [None, b"", b"  \n<|endoftext|>\n  "], ids=["missing", "empty", "separators"])
def test_bad_data_files(tmp_path, cache_dir, capsys, content):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    assert train.main([*TINY, "--data", str(path), "--out-dir", str(tmp_path / "o"), "--cache-dir", cache_dir]) == 2
    assert "data.txt" in capsys.readouterr().err


def test_data_shorter_than_a_block(tmp_path, cache_dir, capsys):
    path = tmp_path / "short.txt"
    path.write_text("Too short.\n<|endoftext|>\nAlso short.")
    assert train.main([*TINY, "--data", str(path), "--out-dir", str(tmp_path / "o"), "--cache-dir", cache_dir]) == 2
    assert "--block-size" in capsys.readouterr().err


def test_resume_without_or_with_a_corrupt_state(tmp_path, cache_dir, capsys):
    assert run(tmp_path, cache_dir, "--resume") == 2
    assert "does not exist" in capsys.readouterr().err
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    state = tmp_path / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    assert run(tmp_path, cache_dir, "--resume") == 2
    assert "corrupt" in capsys.readouterr().err


@pytest.mark.parametrize("tensor", ["param/wte.weight", "adam_v/h.0.attn.c_proj.weight"])
def test_resume_from_a_state_whose_bytes_changed_on_disk(tmp_path, cache_dir, capsys, tensor):
    """A flipped bit leaves a finite number that every other check of the state accepts (the
    control: the same state re-saved without its checksums resumes); the checksum names it."""
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    flip_a_bit(tmp_path / STATE_FILE, tensor)
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 2
    err = capsys.readouterr().err
    assert f"{tensor} in {tmp_path / STATE_FILE} is damaged" in err and "Traceback" not in err

    from safetensors import safe_open
    from safetensors.numpy import save_file
    with safe_open(tmp_path / STATE_FILE, framework="numpy") as f:   # the same bytes, saved without checksums
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, {STATE_KEY: f.metadata()[STATE_KEY]}
    save_file(tensors, tmp_path / STATE_FILE, metadata)
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 0


def rewrite_state(out_dir, change):
    """Re-save out_dir's training state after `change(arrays, info)`: valid safetensors, odd content."""
    from safetensors.numpy import save
    arrays, info = load_train_state(out_dir)
    change(arrays, info)
    tensors = {f"{group}/{name}": a for group, named in arrays.items() for name, a in named.items()}
    (Path(out_dir) / STATE_FILE).write_bytes(save(tensors, {STATE_KEY: json.dumps(info)}))


def with_one(a, value):
    """A copy of `a` whose first element is `value`."""
    a = a.copy()
    a.flat[0] = value
    return a


def as_fp16_run(info, loss_scaler):
    """Make the saved run an fp16 one, whose resume restores `loss_scaler`."""
    info["train_config"]["precision"] = "fp16"
    info["loss_scaler"] = loss_scaler


@pytest.mark.parametrize("change", [
    lambda arrays, info: info["train_config"].update(flash_attention=True),
    lambda arrays, info: info.update(train_config=[1, 2]),
    lambda arrays, info: info["train_config"].update(warmup_iters="ten"),
    lambda arrays, info: info.pop("data_rng"),
    lambda arrays, info: info.update(data_rng={"bit_generator": "PCG64"}),
    lambda arrays, info: info["model_config"].update(rotary=True),
    lambda arrays, info: info.update(step="three"),
    lambda arrays, info: info.update(step=1.0),
    lambda arrays, info: info.update(step=-5),
    lambda arrays, info: info.update(adam_step=-1),
    lambda arrays, info: info.update(adam_step=2),
    lambda arrays, info: info.update(best_val_loss="low"),
    lambda arrays, info: info["train_config"].update(data="stories.txt"),
    lambda arrays, info: info["train_config"].update(n_layer=1.0),
    lambda arrays, info: arrays["adam_m"].update({"wpe.weight": arrays["adam_m"]["wpe.weight"][:1]}),
    lambda arrays, info: arrays["param"].update({"ln_f.bias": arrays["param"]["ln_f.bias"][:1]}),
    lambda arrays, info: arrays["adam_v"].pop("ln_f.bias"),
    lambda arrays, info: info["data_rng"]["state"].update(state=2 ** 200),
    lambda arrays, info: info["data_rng"].update(uinteger=-1),
    lambda arrays, info: info.update(best_val_loss=float("nan")),
    lambda arrays, info: info.update(best_val_loss=-1.0),
    lambda arrays, info: arrays["param"].update({"wte.weight": with_one(arrays["param"]["wte.weight"], np.nan)}),
    lambda arrays, info: arrays["adam_m"].update({"ln_f.bias": with_one(arrays["adam_m"]["ln_f.bias"], np.inf)}),
    lambda arrays, info: arrays["adam_v"].update({"wpe.weight": with_one(arrays["adam_v"]["wpe.weight"], -np.inf)}),
    lambda arrays, info: arrays["adam_v"].update({"h.0.ln_1.bias": with_one(arrays["adam_v"]["h.0.ln_1.bias"], -1e-9)}),
    lambda arrays, info: as_fp16_run(info, {"scale": float("nan"), "good_steps": 0}),
    lambda arrays, info: as_fp16_run(info, {"scale": 0.0, "good_steps": 0}),
    lambda arrays, info: as_fp16_run(info, {"scale": 1024.0, "good_steps": -3}),
    lambda arrays, info: as_fp16_run(info, {"scale": "big", "good_steps": 0}),
], ids=["extra-setting", "not-a-table", "wrong-type", "no-data-rng", "bad-data-rng", "model-config",
        "step", "float-step", "negative-step", "negative-adam-step", "adam-step-ahead", "best-val-loss",
        "data-not-a-list", "float-setting", "moment-shape", "param-shape", "missing-moment",
        "rng-state-too-large", "rng-negative", "nan-best-val-loss", "negative-best-val-loss", "nan-param",
        "inf-moment", "minus-inf-moment", "negative-second-moment", "nan-loss-scale", "zero-loss-scale",
        "negative-good-steps", "string-loss-scale"])
def test_resume_from_a_damaged_or_foreign_state(tmp_path, cache_dir, capsys, change):
    """A state from another numgpt version reads as safetensors but does not fit: say so, in one line."""
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    rewrite_state(tmp_path, change)
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 2
    err = capsys.readouterr().err
    assert "damaged or was written by another numgpt version" in err and "Traceback" not in err


def test_resume_of_an_older_state_takes_the_defaults_for_newer_settings(tmp_path, cache_dir):
    """A state written before a setting existed resumes with that setting's default (the behaviour
    the older numgpt had): here --precision, which came after the first release."""
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    rewrite_state(tmp_path, lambda arrays, info: info["train_config"].pop("precision"))
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 0
    assert load_train_state(tmp_path)[1]["train_config"]["precision"] == "fp32"


def test_a_state_from_before_eval_seed_resumes_on_the_evaluation_batches_of_its_seed(tmp_path, cache_dir):
    """Before --eval-seed, --seed drew the evaluation batches: a resumed run keeps scoring its
    best val loss on the same text."""
    assert run(tmp_path, cache_dir, "--max-iters", "1", "--seed", "7") == 0
    rewrite_state(tmp_path, lambda arrays, info: info["train_config"].pop("eval_seed"))
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 0
    assert load_train_state(tmp_path)[1]["train_config"]["eval_seed"] == 7


def test_a_state_from_before_tie_weights_and_bias_resumes_with_what_its_model_was(tmp_path, cache_dir, capsys):
    """Before --tie-weights and --bias, a run trained what its --init-from checkpoint was: its
    model_config says so. Flags that repeat it are no change."""
    for name, flags in (("tied", []), ("untied", ["--no-tie-weights", "--no-bias"])):
        assert run(tmp_path / name, cache_dir, "--max-iters", "1", *flags) == 0
        rewrite_state(tmp_path / name, lambda arrays, info: [info["train_config"].pop(key)
                                                             for key in ("tie_weights", "bias", "eval_seed")])
    assert run(tmp_path / "tied", cache_dir, "--resume", "--max-iters", "2", "--tie-weights", "--bias",
               "--eval-seed", "1337") == 0
    assert run(tmp_path / "untied", cache_dir, "--resume", "--max-iters", "2", "--no-tie-weights") == 0
    saved = load_train_state(tmp_path / "untied")[1]["train_config"]
    assert (saved["tie_weights"], saved["bias"]) == (False, False)
    assert run(tmp_path / "untied", cache_dir, "--resume", "--max-iters", "3", "--tie-weights") == 2
    assert "used different --tie-weights" in capsys.readouterr().err


@pytest.mark.parametrize("setting, flags", [("activation", ["--activation", "gelu"]), ("min_lr", ["--min-lr", "1e-4"])])
def test_a_flag_that_repeats_the_default_an_older_state_ran_with_is_no_change(tmp_path, cache_dir, setting, flags):
    """A setting the saved train_config lacks ran with its default (min_lr's: lr / 10)."""
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    rewrite_state(tmp_path, lambda arrays, info: info["train_config"].pop(setting))
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2", *flags) == 0


def test_a_resume_that_trains_no_more_steps_says_nothing_of_the_learning_rate(tmp_path, cache_dir, capsys):
    assert run(tmp_path, cache_dir, "--max-iters", "2", "--warmup-iters", "0") == 0
    rewrite_state(tmp_path, lambda arrays, info: info["train_config"].update(max_iters=8))   # stopped early
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 0
    assert "note: the learning rate" not in capsys.readouterr().out


def test_init_from_a_missing_or_corrupt_checkpoint(tmp_path, cache_dir, capsys):
    assert run(tmp_path / "o", cache_dir, "--init-from", str(tmp_path / "nowhere")) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"junk")
    assert run(tmp_path / "o", cache_dir, "--init-from", str(tmp_path / "bad")) == 2
    assert "config.json" in capsys.readouterr().err


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, cache_dir, monkeypatch):
    """A crash in the middle of writing a checkpoint leaves the previous one loadable."""
    import numgpt.checkpoint
    assert run(tmp_path, cache_dir, "--max-iters", "2", "--eval-interval", "1") == 0
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(f, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(numgpt.checkpoint.os, "fsync", crash)
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "4") == 1
    assert (tmp_path / "model.safetensors").read_bytes() == before
    GPT.from_pretrained(tmp_path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_min_lr_follows_a_lower_lr_and_resumes_unchanged(tmp_path, cache_dir):
    """The README's fine-tuning --lr 3e-5 needs no --min-lr: the default is lr / 10."""
    assert run(tmp_path, cache_dir, "--lr", "3e-5", "--max-iters", "1") == 0
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 0
    assert load_train_state(tmp_path)[1]["train_config"]["min_lr"] == pytest.approx(3e-6)
    assert TrainConfig().min_lr == 1e-4                        # the presets' values are the old ones
    assert TrainConfig(**PRESETS["tinystories-tutorial"]).min_lr == 1e-3


def test_the_progress_bar_stays_out_of_a_redirected_stderr(tmp_path, cache_dir, capfd):
    """Each redraw of the bar ends in a carriage return: in a log file, a line per redraw."""
    flags = [flag for flag in TINY if flag != "--no-progress"]
    assert train.main([*flags, "--dataset", "embedded", "--out-dir", str(tmp_path), "--cache-dir", cache_dir,
                       "--max-iters", "3"]) == 0
    assert "\r" not in capfd.readouterr().err


def test_data_given_twice_adds_the_files():
    """--data a --data b trains on both, as --data a b does; not on the last one alone."""
    assert train.parse_args(["--data", "a.txt", "--data", "b.txt", "c.txt"]).data == ["a.txt", "b.txt", "c.txt"]


def test_every_setting_has_a_kind_that_resume_can_check():
    """--resume checks each saved setting's JSON kind by its annotation: a setting of a type
    without one (a bool, say) would end every --resume in a KeyError traceback."""
    assert {f.type for f in dataclasses.fields(TrainConfig)} <= set(train.SETTING_KINDS)


def test_help_lists_each_presets_settings_as_the_flags_that_give_them(capsys):
    """A preset sets more than its README line says (beta2, grad_clip, ...); --help shows them all,
    and those flags, typed, make the same settings."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split()).replace("- ", "-")   # undo argparse's line wrapping
    flags = shown.split("tinystories-tutorial is ")[1].split(" --out-dir")[0].split()
    typed = train.resolve_config(train.parse_args(flags))
    preset = train.resolve_config(train.parse_args(["--preset", "tinystories-tutorial"]))
    assert typed == preset


def test_a_presets_min_lr_scales_with_the_lr_given():
    """tinystories-tutorial's constant rate stays constant at another --lr (its min_lr 1e-3 would
    otherwise exceed a lower --lr and be refused)."""
    for lr in (3e-4, 2.25e-3):   # 1e-3 * (2.25e-3 / 1e-3) rounds to just above 2.25e-3
        cfg = train.resolve_config(train.parse_args(["--preset", "tinystories-tutorial", "--lr", str(lr)]))
        assert cfg.lr == cfg.min_lr == lr
    cfg = train.resolve_config(train.parse_args(["--preset", "tinystories-tutorial", "--lr", "3e-4",
                                                 "--min-lr", "1e-5"]))
    assert cfg.min_lr == 1e-5


def test_fine_tuning_a_model_of_a_shorter_context_takes_its_block_size(tmp_path, cache_dir, capsys, monkeypatch):
    """The default --block-size (64) exceeds this checkpoint's 16: it is cut to 16 unless typed, and
    a typed one is refused before any data is read."""
    assert run(tmp_path / "base", cache_dir, "--max-iters", "1") == 0    # TINY's block size is 16
    tune = ["--init-from", str(tmp_path / "base"), "--dataset", "embedded", "--cache-dir", cache_dir,
            "--batch-size", "4", "--eval-iters", "2", "--num-samples", "0", "--no-progress", "--max-iters", "1"]
    assert train.main([*tune, "--out-dir", str(tmp_path / "tuned")]) == 0
    assert load_train_state(tmp_path / "tuned")[1]["train_config"]["block_size"] == 16
    monkeypatch.setattr(numgpt.training, "load_data", None)   # calling it would be a TypeError
    assert train.main([*tune, "--out-dir", str(tmp_path / "long"), "--block-size", "32"]) == 2
    assert "--block-size 32 exceeds the block size 16" in capsys.readouterr().err
    assert not (tmp_path / "long").exists()


def test_out_dir_that_is_a_file_and_preset_with_resume(tmp_path, cache_dir, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert run(afile, cache_dir, "--max-iters", "1") == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "intact" not in err
    assert run(tmp_path / "o", cache_dir, "--max-iters", "1") == 0
    assert run(tmp_path / "o", cache_dir, "--resume", "--preset", "tinystories-tutorial") == 2
    assert "drop --preset" in capsys.readouterr().err


def test_a_failed_first_save_does_not_claim_a_checkpoint(tmp_path, cache_dir, monkeypatch, capsys):
    """A full disk names the file it could not write, in words: no "[Errno 28]"."""
    def crash(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(numgpt.checkpoint.os, "fsync", crash)
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {tmp_path / 'model.safetensors'}: No space left on device" in err
    assert "intact" not in err and "Errno" not in err


def test_a_log_that_cannot_be_written_is_named(tmp_path, cache_dir, monkeypatch, capsys):
    class FullFile(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_full_log(path, *args, **kwargs):
        return FullFile() if path.endswith("log.jsonl") else open(path, *args, **kwargs)

    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    monkeypatch.setattr(numgpt.training, "open", open_full_log, raising=False)
    assert run(tmp_path, cache_dir, "--max-iters", "2", "--resume") == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {tmp_path / 'log.jsonl'}: No space left on device" in err and "intact" in err


def test_two_runs_cannot_share_an_out_dir(tmp_path, cache_dir, capsys):
    """While one run holds the out-dir, another (here a --resume started twice) is refused before
    it touches a file; once the first ends, the out-dir is free again."""
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    holder = numgpt.training.lock_directory(str(tmp_path))
    if holder is None:
        pytest.skip("no flock on this file system")
    try:
        assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 2
    finally:
        os.close(holder)
    assert "another training run is using" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "2") == 0


def test_an_out_dir_that_cannot_be_made_is_one_line(tmp_path, cache_dir, capsys):
    (tmp_path / "afile").write_text("mine")
    assert run(tmp_path / "afile" / "sub", cache_dir, "--max-iters", "1") == 2
    err = capsys.readouterr().err
    assert "cannot create --out-dir" in err and "Not a directory" in err and "Errno" not in err


def test_an_out_dir_that_cannot_be_written_is_found_before_the_data(tmp_path, cache_dir, monkeypatch, capsys):
    def read_only(dir=None):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(numgpt.training, "load_data", None)   # calling it would be a TypeError
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 2
    assert f"cannot write in --out-dir {tmp_path}: Read-only file system" in capsys.readouterr().err


def test_a_cache_dir_that_cannot_be_written_is_found_before_the_data(tmp_path, monkeypatch, capsys):
    """A --cache-dir without write permission (simulated: root may write anywhere) is named in one
    line before the stories are read and tokenized, not in the [Errno 13] of a temporary file."""
    cache = tmp_path / "cache"
    cache.mkdir()

    def refused_in_cache(make):
        def make_file(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == cache:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return make(*args, dir=dir, **kwargs)
        return make_file

    monkeypatch.setattr(tempfile, "mkstemp", refused_in_cache(tempfile.mkstemp))
    monkeypatch.setattr(tempfile, "TemporaryFile", refused_in_cache(tempfile.TemporaryFile))
    monkeypatch.setattr(numgpt.data.stories, "embedded_corpus", None)   # calling it would be a TypeError
    assert run(tmp_path / "o", str(cache), "--max-iters", "1") == 2
    assert (f"cannot write in the cache directory '{cache}' (Permission denied): choose a writable one "
            f"with --cache-dir") in capsys.readouterr().err


def test_an_empty_cache_dir_or_data_path_is_refused(tmp_path, cache_dir, monkeypatch, capsys):
    """"" (an unset shell variable) is no directory or file: as a --cache-dir it would quietly put
    the token cache in the current directory, and as a --data path read that directory as data."""
    monkeypatch.chdir(tmp_path)
    assert run(tmp_path / "o", cache_dir, "--max-iters", "1", "--cache-dir=") == 2
    assert "--cache-dir is empty: name a directory" in capsys.readouterr().err
    assert train.main([*TINY, "--data", "", "--out-dir", str(tmp_path / "o"), "--cache-dir", cache_dir]) == 2
    assert "--data has an empty path: name a text file" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_fine_tuning_a_model_of_another_vocabulary_is_refused_before_the_data(tmp_path, cache_dir, monkeypatch,
                                                                              capsys):
    small = tmp_path / "small"
    GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0).save_pretrained(small)
    monkeypatch.setattr(numgpt.training, "load_data", None)
    assert run(tmp_path / "o", cache_dir, "--init-from", str(small)) == 2
    assert "has a vocabulary of 100 tokens" in capsys.readouterr().err


def test_fine_tuning_from_damaged_weights_is_refused_before_the_data(tmp_path, cache_dir, monkeypatch, capsys):
    """config.json alone passes with_checkpoint_shape: the weights must be read before the data too,
    which can take minutes to tokenize."""
    config = GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    GPT(config, seed=0).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])   # truncated, as by a copy that was cut short
    monkeypatch.setattr(numgpt.training, "load_data", None)
    assert run(tmp_path / "o", cache_dir, "--init-from", str(tmp_path / "m")) == 2
    assert f"cannot read {weights}" in capsys.readouterr().err


def test_a_run_removes_temporary_files_of_a_killed_write(tmp_path, cache_dir):
    (tmp_path / ".tmp-k1ll3d_x").write_bytes(b"half a checkpoint")
    (tmp_path / ".tmp-notes.txt").write_text("the user's")
    (tmp_path / ".tmp-draft_v2_notes.txt").write_text("the user's too: it starts like a temporary name")
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    assert not (tmp_path / ".tmp-k1ll3d_x").exists() and (tmp_path / ".tmp-notes.txt").exists()
    assert (tmp_path / ".tmp-draft_v2_notes.txt").exists()


@pytest.mark.filterwarnings("error::RuntimeWarning")   # NumPy's overflow warnings would come before the message
def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, cache_dir, capsys):
    assert run(tmp_path, cache_dir, "--max-iters", "3", "--lr", "1e308", "--weight-decay", "0") == 2
    err = capsys.readouterr().err
    assert "the run diverged" in err and "state of step 0" in err and "Traceback" not in err
    arrays, info = load_train_state(tmp_path)
    assert info["step"] == 0 and all(np.isfinite(a).all() for a in arrays["param"].values())
    GPT.from_pretrained(tmp_path)                              # the saved model is the finite one


def test_the_token_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert TrainConfig().cache_dir == str(tmp_path / "home" / ".cache" / "numgpt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert TrainConfig().cache_dir == str(tmp_path / "cache" / "numgpt")


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lrs = [learning_rate(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert lrs[110] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    huge = TrainConfig(lr=1e308, warmup_iters=10)   # a valid float: warmup must not overflow it to inf
    assert learning_rate(9, huge) == pytest.approx(1e308 / 11 * 10)


def test_each_step_uses_and_logs_the_rate_of_its_own_step(tmp_path, cache_dir, monkeypatch):
    """Step s (logged as step s + 1) updates with learning_rate(s), so the first update is
    warmup's smallest; off by one, a run would skip it and log rates it never used."""
    rates, adamw_step = [], numgpt.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.lr)
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(numgpt.optim.AdamW, "step", recording_step)
    assert run(tmp_path, cache_dir, "--max-iters", "4", "--warmup-iters", "2", "--lr", "1e-3") == 0
    expected = [learning_rate(s, TrainConfig(max_iters=4, warmup_iters=2, lr=1e-3)) for s in range(4)]
    assert rates == expected
    assert [r["lr"] for r in log_rows(tmp_path) if "loss" in r] == expected


def test_grad_accum_steps_on_the_gradient_of_the_mean_over_every_micro_batch(backend):
    """--grad-accum k: AdamW gets the mean of the k micro-batches' gradients, which (every row
    keeping its targets) is the gradient of the mean loss over all k batches' rows, and the step's
    loss is their mean. Nothing else asserts it: a step on the last micro-batch alone, or on the
    sum of the k, trained and resumed exactly too."""
    cfg = TrainConfig(batch_size=2, block_size=8, grad_accum=3, grad_clip=0.0, backend=backend, dtype="float64")
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 50, size=(2, 8)), rng.integers(0, 50, size=(2, 8))) for _ in range(3)]
    trainer = numgpt.training.Trainer(cfg, log=lambda message: None, progress=False)
    trainer.model = GPT(config, backend=backend, dtype="float64", seed=1)
    trainer.flat_grads, trainer.grads = numgpt.training.flat_buffer(trainer.model.params, extra=2)
    trainer.batcher = type("Batches", (), {"next_batch": iter(batches).__next__})()
    stepped = []
    trainer.optimizer = type("Recorder", (), {"step": lambda self, grads, grad_scale=None: stepped.append(
        ({name: to_numpy(g).copy() for name, g in grads.items()}, grad_scale))})()
    trainer.scaler, trainer.step = None, 0
    loss, stop = trainer.train_step()
    (grads, grad_scale), = stepped
    whole_x, whole_y = (np.concatenate(parts) for parts in zip(*batches))
    _, ref_loss = trainer.model.forward(whole_x, whole_y)
    ref_grads = trainer.model.backward()
    assert loss == pytest.approx(ref_loss, rel=1e-12) and not stop and grad_scale is None
    assert trainer.grad_norm is None   # without clipping, no norm is computed for the log
    for name, ref in ref_grads.items():
        ref = to_numpy(ref)
        np.testing.assert_allclose(grads[name], ref, rtol=0, atol=1e-12 * np.abs(ref).max(), err_msg=name)


def frozen_trainer(cfg, config, batch):
    """A Trainer with a float64 model of `config` whose every step takes `batch` and leaves the
    parameters alone, without data or an out-dir."""
    trainer = numgpt.training.Trainer(cfg, log=lambda message: None, progress=False)
    trainer.model = GPT(config, backend=cfg.backend, dtype="float64", seed=1)
    trainer.flat_grads, trainer.grads = numgpt.training.flat_buffer(trainer.model.params, extra=2)
    trainer.batcher = type("Batches", (), {"next_batch": lambda self: batch})()
    trainer.optimizer = type("Optimizer", (), {"step": lambda self, grads, grad_scale=None: None})()
    trainer.scaler, trainer.step = None, 0
    return trainer


def test_a_step_clips_the_gradient_norm_and_the_optimizer_is_nanogpts():
    """The step hands AdamW the clip factor max_norm / (|g| + 1e-6), |g| measured here from the
    gradients it hands over; and build_optimizer decays exactly the matrices, by lr * weight_decay
    (a step with zero gradients moves nothing else), with betas (0.9, --beta2) and eps 1e-8."""
    cfg = TrainConfig(batch_size=2, block_size=8, grad_clip=0.01, beta2=0.95, weight_decay=0.1, dtype="float64")
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8)
    rng = np.random.default_rng(0)
    trainer = frozen_trainer(cfg, config, (rng.integers(0, 50, size=(2, 8)), rng.integers(0, 50, size=(2, 8))))
    stepped = []
    trainer.optimizer = type("Recorder", (), {"step": lambda self, grads, grad_scale=None: stepped.append(
        (math.sqrt(sum(float((to_numpy(g) ** 2).sum()) for g in grads.values())), grad_scale))})()
    trainer.train_step()
    (norm, grad_scale), = stepped
    assert norm > cfg.grad_clip                          # torch's clip_grad_norm_ factor:
    assert float(grad_scale) == pytest.approx(cfg.grad_clip / (norm + 1e-6), rel=1e-12)
    assert trainer.grad_norm == pytest.approx(norm, rel=1e-12)   # what log.jsonl's grad_norm says

    model = trainer.model
    opt = numgpt.training.build_optimizer(model, cfg)
    assert opt.betas == (0.9, 0.95) and opt.eps == 1e-8
    before = {name: to_numpy(p).copy() for name, p in model.params.items()}
    opt.step({name: p * 0 for name, p in model.params.items()})
    for name, p in model.params.items():
        keep = 1 - cfg.lr * cfg.weight_decay if p.ndim >= 2 else 1.0
        np.testing.assert_allclose(to_numpy(p), before[name] * keep, rtol=1e-15, err_msg=name)


def test_the_default_run_is_the_one_the_readme_measured():
    """README's "What training looks like" (a 4-layer, 128-wide model, 600 steps of 16 x 64 tokens,
    its curve, time and samples) was measured with these settings: change one, measure it again."""
    d = TrainConfig()
    assert (d.n_layer, d.n_head, d.n_embd, d.block_size, d.max_iters, d.batch_size) == (4, 4, 128, 64, 600, 16)
    assert (d.lr, d.min_lr, d.warmup_iters, d.beta2, d.weight_decay, d.grad_clip) == (1e-3, 1e-4, 50, 0.99, 0.1, 1.0)
    assert (d.dropout, d.activation, d.grad_accum, d.seed, d.eval_interval) == (0.0, "gelu", 1, 1337, 100)
    model = GPT(d.model_config(), seed=0)
    assert numgpt.training.build_optimizer(model, d).betas == (0.9, 0.99)


def test_the_end_of_run_samples_draw_from_their_own_stream():
    seeds_given = []

    class Model:
        def generate(self, ids, max_new_tokens, **options):
            seeds_given.append(options["seed"])
            return np.concatenate([ids, np.full((len(ids), max_new_tokens), EOT)], axis=1)

    assert numgpt.training.generate_samples(Model(), 2, 3, seed=5) == ["Once upon a time"] * 2
    expected = numgpt.seeds.stream(5, numgpt.seeds.SAMPLES).bit_generator.state
    assert seeds_given[0].bit_generator.state == expected


def test_overwrite_removes_the_old_state_first(tmp_path, cache_dir, monkeypatch):
    """A kill between two removals must never leave the old run's state without the old model
    beside it: --resume would continue that state with whatever model is there."""
    assert run(tmp_path, cache_dir, "--max-iters", "1") == 0
    removed, remove = [], os.remove
    monkeypatch.setattr(os, "remove", lambda path: (removed.append(os.path.basename(path)), remove(path)))
    assert run(tmp_path, cache_dir, "--overwrite", "--max-iters", "1") == 0
    assert removed[0] == "train_state.safetensors" and "model.safetensors" in removed


def test_each_step_draws_new_dropout_masks():
    """The masks of a step come from its own generator: the same batch and weights give another
    loss at the next step (one mask for every step would drop the same units for ever), and the
    same loss at the same step (which is what makes a resume exact)."""
    cfg = TrainConfig(batch_size=2, block_size=8, dropout=0.5, grad_clip=0.0)
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.5)
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, 50, size=(2, 8)), rng.integers(0, 50, size=(2, 8)))
    trainer = frozen_trainer(cfg, config, batch)
    losses = []
    for step in (0, 1, 0):
        trainer.step = step
        losses.append(trainer.train_step()[0])
    assert losses[0] == losses[2] != losses[1]


def test_estimate_loss_is_the_mean_over_every_batch_without_dropout():
    """Evaluation is in eval mode (a loss measured through dropout is higher, and noisy), averages
    all its batches (not the last one alone), and hands the model back in the mode it came in."""
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.5)
    model = GPT(config, dtype="float64", seed=1)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 50, size=(2, 8)), rng.integers(0, 50, size=(2, 8))) for _ in range(3)]
    expected = np.mean([model.eval().forward(x, y)[1] for x, y in batches])
    model.train()
    assert numgpt.training.estimate_loss(model, batches) == pytest.approx(expected, rel=1e-12)
    assert model.training
    numgpt.training.estimate_loss(model.eval(), batches)
    assert not model.training


def test_each_split_is_evaluated_on_its_own_tokens(tmp_path, cache_dir):
    """The val loss is measured on windows of the val split, the train loss on the train split's."""
    text = tmp_path / "stories.txt"
    docs = [f"Story {i}: the cat sat on the mat." * 5 for i in range(18)]
    docs += [f"Zebras {i} eat quantum pizza at noon." * 5 for i in range(2)]   # the last 10%: val
    text.write_text("\n<|endoftext|>\n".join(docs))
    cfg = TrainConfig(data=[str(text)], out_dir=str(tmp_path / "o"), cache_dir=cache_dir, n_layer=1, n_head=2,
                      n_embd=16, block_size=16, batch_size=4, eval_iters=2, num_samples=0)
    with numgpt.training.Trainer(cfg, log=lambda message: None, progress=False) as trainer:
        trainer.setup()
        for split, tokens in (("train", trainer.train_tokens), ("val", trainer.val_tokens)):
            windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, dtype=np.int64), 17)
            for x, y in trainer.eval_batches[split]:
                for row in np.concatenate([x, y[:, -1:]], axis=1):
                    assert (windows == row).all(axis=1).any(), f"a {split} batch row is not a window of {split}"


def test_the_runs_random_streams_are_all_different(tmp_path, cache_dir):
    """Training batches, evaluation batches and each step's dropout come from generators of their
    own. Keyed [seed], [seed, split, k] and [seed, 1, step, rank], NumPy's zero padding made the
    first training batch train-eval batch 0, and rank 0's masks of step k val-eval batch k's draws."""
    first_draws = {(purpose, i, j): tuple(numgpt.seeds.stream(1337, purpose, i, j).integers(0, 2**62, 2))
                   for purpose in range(5) for i in range(3) for j in range(3)}
    assert len(set(first_draws.values())) == len(first_draws)
    text = tmp_path / "stories.txt"
    text.write_text("\n<|endoftext|>\n".join(f"Story {i}: the cat sat on the mat." * 5 for i in range(20)))
    cfg = TrainConfig(data=[str(text)], out_dir=str(tmp_path / "o"), cache_dir=cache_dir, n_layer=1, n_head=2,
                      n_embd=16, block_size=16, batch_size=4, eval_iters=2, num_samples=0, seed=7, eval_seed=8)
    with numgpt.training.Trainer(cfg, log=lambda message: None, progress=False) as trainer:
        trainer.setup()
        # each stream where it belongs: keys that differ are no use if two uses share one of them;
        # the evaluation batches' from --eval-seed, so that runs of several --seed share them
        assert trainer.batcher.state() == numgpt.seeds.stream(cfg.seed, numgpt.seeds.BATCHES).bit_generator.state
        for i, (split, tokens) in enumerate((("train", trainer.train_tokens), ("val", trainer.val_tokens))):
            for k, (x, _) in enumerate(trainer.eval_batches[split]):
                expected = numgpt.training.dataset.get_batch(
                    tokens, 4, 16, numgpt.seeds.stream(cfg.eval_seed, numgpt.seeds.EVAL_BATCHES, i, k))[0]
                np.testing.assert_array_equal(x, expected)
        first_batch = trainer.batcher.next_batch()[0]
        assert not any(np.array_equal(first_batch, x) for x, _ in trainer.eval_batches["train"])


def test_evaluation_never_shifts_the_training_batches(tmp_path, cache_dir):
    """The fixed evaluation batches come from generators of their own: how many there are and how
    often they are evaluated leaves the training batches, and so the losses, as they were."""
    assert run(tmp_path / "a", cache_dir, "--max-iters", "3", "--eval-iters", "1", "--eval-interval", "3") == 0
    assert run(tmp_path / "b", cache_dir, "--max-iters", "3", "--eval-iters", "3", "--eval-interval", "1") == 0
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")


def test_the_saved_model_is_the_one_of_the_best_val_loss_across_a_resume(tmp_path, cache_dir, monkeypatch, capsys):
    """model.safetensors holds the weights of the evaluation with the lowest val loss: not the
    latest, not the one of the lowest train loss, and a resumed run compares with the best val
    loss it saved (not with infinity, which any loss beats)."""
    # (train, val) of the evaluations at steps 0 and 1, then, resumed, 2 and 3: step 1's val is best
    losses = iter([6.0, 5.0, 4.5, 4.0, 3.5, 4.5, 3.0, 4.2])
    monkeypatch.setattr(numgpt.training, "estimate_loss", lambda model, batches: next(losses))
    assert run(tmp_path, cache_dir, "--max-iters", "1", "--eval-interval", "1") == 0
    best = (tmp_path / "model.safetensors").read_bytes()
    assert run(tmp_path, cache_dir, "--resume", "--max-iters", "3", "--eval-interval", "1") == 0
    assert load_train_state(tmp_path)[1]["best_val_loss"] == 4.0
    assert (tmp_path / "model.safetensors").read_bytes() == best
    out = capsys.readouterr().out
    assert "step 1: train loss 4.5000, val loss 4.0000 (best: saved model)" in out
    assert "step 2: train loss 3.5000, val loss 4.5000\n" in out and "val loss 4.2000\n" in out


def test_the_samples_of_a_run_end_at_the_first_end_of_text_token():
    """A story ends where the model writes <|endoftext|>: neither that token's text nor what
    follows it is printed."""
    enc = get_tokenizer()
    story = enc.encode_ordinary(" there was a cat.") + [EOT] + enc.encode_ordinary(" Another story")

    class Model:
        def generate(self, prompt_ids, max_new_tokens, **kwargs):
            return np.concatenate([prompt_ids, np.tile(story, (len(prompt_ids), 1))], axis=1)

    assert numgpt.training.generate_samples(Model(), 2, len(story), seed=0) == ["Once upon a time there was a cat."] * 2
