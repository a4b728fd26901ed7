"""The benchmarks' GPU side runs, here on the CuPy stand-in: a lent GPU's few minutes should
measure, not meet a typo. (Their numbers mean nothing here; the benchmarks report them on a GPU.)
bench_train's `--batch-size max` search runs against made-up child runs."""

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import cupy_standin
from numgpt import backend as numgpt_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_attention  # noqa: E402
import bench_ddp  # noqa: E402
import bench_generate  # noqa: E402
import bench_layers  # noqa: E402
import bench_train  # noqa: E402
from bench import common  # noqa: E402   (importable once bench_train has put the checkout on the path)


@pytest.fixture(autouse=True)
def no_reexecution(monkeypatch):
    """A benchmark whose BLAS threads differ from --threads re-executes itself: here that would
    replace pytest. Tests call main() with matching_threads(); this fails any that forgot."""
    def execve(*args):
        raise AssertionError(f"the benchmark tried to re-execute itself: {args[1]}")
    monkeypatch.setattr(os, "execve", execve)


def matching_threads(monkeypatch, threads=1):
    """The command-line option --threads `threads`, the environment set to match, so main() runs on."""
    for variable in common.BLAS_THREAD_VARIABLES:
        monkeypatch.setenv(variable, str(threads))
    return ["--threads", str(threads)]


@cupy_standin.needs_compiler
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16"])
def test_bench_train_times_a_numgpt_step_on_cupy(monkeypatch, precision):
    monkeypatch.setenv("CUPY_TF32", "0")   # tf32 sets it
    cupy_standin.install(monkeypatch)
    monkeypatch.setattr(bench_train, "VOCAB", 64)
    shape = {"batch_size": 2, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}
    times, memory = bench_train.bench_numgpt(shape, steps=2, warmup=1, backend="cupy", precision=precision)
    assert {part: len(t) for part, t in times.items()} == {"forward": 2, "backward": 2, "optimizer": 2, "step": 1}
    assert all(t > 0 for part in times.values() for t in part) and memory >= 0


@cupy_standin.needs_compiler
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16"])
def test_bench_attention_measures_each_numgpt_variant(monkeypatch, capsys, precision):
    cupy_standin.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "torch", None)   # the stand-in has no CUDA for torch: its row is left out
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--batch-size", "1", "--block-size", "40", "--n-head",
                                      "2", "--precision", precision, "--repeats", "1", "--no-save"])
    bench_attention.main()
    rows = [line.split(":")[0].strip() for line in capsys.readouterr().out.splitlines()]
    assert rows == ["flash", "flash fma", "matrix"]


@cupy_standin.needs_compiler
def test_bench_attention_leaves_out_a_torch_without_cuda(monkeypatch, capsys):
    pytest.importorskip("torch")   # the CPU build this project's tests run with: torch.cuda is not available
    cupy_standin.install(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--batch-size", "1", "--block-size", "40", "--n-head",
                                      "2", "--repeats", "1", "--no-save"])
    bench_attention.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "(this torch has no CUDA: no torch row)"
    assert [line.split(":")[0].strip() for line in lines[:-1]] == ["flash", "flash fma", "matrix"]


@cupy_standin.needs_compiler
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bench_layers_times_each_layer_with_and_without_the_kernels_on_cupy(monkeypatch, capsys, precision):
    cupy_standin.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "torch", None)   # no CUDA for torch here: no reference column
    monkeypatch.setattr(bench_layers, "VOCAB", 64)
    monkeypatch.setattr(bench_layers, "SHAPES", {"tiny": {"batch_size": 2, "block_size": 16, "n_layer": 1,
                                                          "n_head": 2, "n_embd": 16, "dropout": 0.0}})
    monkeypatch.setattr(sys, "argv", ["bench_layers.py", "--backend", "cupy", "--precision", precision,
                                      "--repeats", "1", "--no-save", *matching_threads(monkeypatch)])
    bench_layers.main()
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    rows = [line.split() for line in lines[header + 1:]]   # layer, fwd ms, bwd ms, GFLOP/s, twins ms, ...
    assert [row[0] for row in rows] == ["embedding", "layernorm", "attention", "mlp", "classifier+loss"]
    assert all(float(row[1]) > 0 and float(row[4]) > 0 for row in rows)


TINY = {"batch_size": 2, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}


def test_bench_layers_times_each_layer_against_torch_on_the_cpu(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(bench_layers, "VOCAB", 64)
    monkeypatch.setattr(bench_layers, "SHAPES", {"tiny": TINY})
    monkeypatch.setattr(sys, "argv", ["bench_layers.py", "--repeats", "2", *matching_threads(monkeypatch)])
    rows = []
    monkeypatch.setattr(bench_layers, "append_result", rows.append)
    threads = torch.get_num_threads()
    try:
        bench_layers.main()
    finally:
        torch.set_num_threads(threads)
    assert [row["bench"] for row in rows] == ["layer:embedding", "layer:layernorm", "layer:attention", "layer:mlp",
                                              "layer:classifier+loss"]
    # stored to the microsecond, so the classifier's backward (the gradients come from its forward) reads 0
    assert all(row[key] >= 0 for row in rows for key in ("forward_ms", "backward_ms", "torch_forward_ms",
                                                          "torch_backward_ms"))
    assert all(row["ratio_vs_torch"] > 0 for row in rows)
    assert "torch/numgpt" in capsys.readouterr().out


def run_child_in_process(monkeypatch, capsys, module, args):
    """What a benchmark's child run (module.child) prints as its JSON line, run in this process with
    torch's thread count put back after it and the malloc setting of a child left out."""
    monkeypatch.setattr("numgpt.allocator.keep_freed_memory", lambda: None)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    try:
        module.child(args)
    finally:
        if torch:
            torch.set_num_threads(threads)
    return json.loads(capsys.readouterr().out.splitlines()[-1])


@pytest.mark.parametrize("impl", ["numgpt", "torch"])
def test_bench_train_times_both_sides_on_the_cpu(monkeypatch, capsys, impl):
    if impl == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    monkeypatch.setattr(bench_train, "VOCAB", 64)
    monkeypatch.setitem(bench_train.SHAPES, "tiny", TINY)
    args = argparse.Namespace(impl=impl, shape="tiny", batch_size=2, steps=2, warmup=1, threads=1, backend="numpy",
                              precision="fp32", torch_compile=False)
    result = run_child_in_process(monkeypatch, capsys, bench_train, args)
    assert all(result[part + "_ms"] > 0 for part in ("forward", "backward", "optimizer", "step"))
    assert result["peak_mem_mib"] > 0 and result["step_stat"] == "median of 2 steps"


def test_bench_generate_runs_both_sides_on_a_tiny_model_with_the_same_tokens(monkeypatch, capsys, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch.setattr(bench_generate, "SHAPE", dict(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16))
    args = argparse.Namespace(backend="numpy", seed=0, weights=str(tmp_path), prompt_len=4, new_tokens=6, repeats=2,
                              uncached_tokens=3, threads=1)
    ours = run_child_in_process(monkeypatch, capsys, bench_generate, argparse.Namespace(**vars(args), impl="numgpt"))
    ref = run_child_in_process(monkeypatch, capsys, bench_generate, argparse.Namespace(**vars(args), impl="torch"))
    assert len(ours["tokens"]) == 6 and ours["tokens"] == ref["tokens"]
    assert ours["tok_s"] > 0 and ours["uncached_tok_s"] > 0 and ref["tok_s"] > 0
    assert ours["peak_rss_mib"] > 0 and ref["peak_rss_mib"] > 0


# made-up medians of the fake children below: step milliseconds by side and batch size
STEP_MS = {("numgpt", 16): 200.0, ("numgpt", 64): 400.0, ("torch", 16): 160.0}


def search_largest_batches(monkeypatch, fits, fits_whole_run):
    """bench_train's main() with --batch-size max, --steps 5 and --warmup 2, its children replaced by
    fakes: a side runs out of memory above batch size fits[side], and in a whole run (not a probe) above
    fits_whole_run[side]. ([(side, batch size, warmup, steps) of each child], the results row)."""
    children, rows = [], []

    def fake_child(script, args, env=None):
        options = dict(zip(args[::2], args[1::2]))   # "--impl", impl, "--shape", name, ...
        impl, batch_size = options["--impl"], int(options["--batch-size"])
        warmup, steps = int(options["--warmup"]), int(options["--steps"])
        children.append((impl, batch_size, warmup, steps))
        probe = (warmup, steps) == (1, 1)
        if batch_size > (fits if probe else fits_whole_run)[impl]:
            raise bench_train.ChildOutOfMemory(f"{impl} ran out of memory at batch size {batch_size}")
        return {"forward_ms": 1.0, "backward_ms": 2.0, "optimizer_ms": 0.5, "peak_mem_mib": 1000.0 * batch_size,
                "step_ms": STEP_MS.get((impl, batch_size), 999.0),   # a probe's figures are not read
                "step_stat": f"mean of {steps} pipelined steps"}

    for module in ("torch", "transformers"):   # main() only checks that the reference is installed
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    monkeypatch.setattr(bench_train, "run_child", fake_child)
    monkeypatch.setattr(bench_train, "device_name_or_error", lambda parser, backend: "a GPU")
    monkeypatch.setattr(bench_train, "matmul_peak_gflops", lambda backend, precision: 1000.0)
    monkeypatch.setattr(bench_train, "append_result", rows.append)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--backend", "cupy", "--shape", "gpt2-124m-1k",
                                      "--batch-size", "max", "--steps", "5", "--warmup", "2",
                                      *matching_threads(monkeypatch)])
    bench_train.main()
    assert all((warmup, steps) in {(1, 1), (2, 5)} for _, _, warmup, steps in children)
    [row] = rows
    return children, row


def probed_and_timed(children):
    """The (side, batch size) of the probes, 3 steps each, and of the whole runs."""
    return ([(impl, batch) for impl, batch, warmup, steps in children if (warmup, steps) == (1, 1)],
            [(impl, batch) for impl, batch, warmup, steps in children if (warmup, steps) == (2, 5)])


def tok_s(impl, batch_size):
    return batch_size * 1024 / (STEP_MS[impl, batch_size] / 1000)   # gpt2-124m-1k: blocks of 1024 tokens


def test_batch_size_max_probes_short_then_times_the_comparison_and_each_sides_largest(monkeypatch, capsys):
    children, row = search_largest_batches(monkeypatch, fits={"numgpt": 64, "torch": 16},
                                           fits_whole_run={"numgpt": 64, "torch": 16})
    probed, timed = probed_and_timed(children)
    assert probed == [("numgpt", 8), ("numgpt", 16), ("numgpt", 32), ("numgpt", 64), ("numgpt", 128),
                      ("torch", 8), ("torch", 16), ("torch", 32)]
    # torch's largest is the comparison, run in two rounds in ABBA order; numgpt's largest once
    assert timed == [("numgpt", 16), ("torch", 16), ("torch", 16), ("numgpt", 16), ("numgpt", 64)]
    assert row["shape"]["batch_size"] == 16 and (row["steps"], row["warmup"]) == (5, 2)   # how it was measured
    assert row["tok_s"] == tok_s("numgpt", 16) and row["torch_tok_s"] == tok_s("torch", 16)
    assert row["ratio_vs_torch"] == round(tok_s("numgpt", 16) / tok_s("torch", 16), 3) == 0.8
    assert row["largest_batch"] == {"numgpt": 64, "torch": 16}
    assert row["largest_batch_tok_s"] == {"numgpt": tok_s("numgpt", 64), "torch": tok_s("torch", 16)}
    assert row["ratio_vs_torch_at_largest"] == round(tok_s("numgpt", 64) / tok_s("torch", 16), 3) == 1.6
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("gpt2-124m-1k ")]
    assert [(impl, int(batch)) for _, impl, batch, *_ in table] == [("numgpt", 16), ("torch", 16), ("numgpt", 64)]
    assert row["rounds"] == 2 and row["ratio_range"] == [0.8, 0.8] and row["step_stat"] == "mean of 5 pipelined steps"


def test_batch_size_max_leaves_out_a_largest_batch_whose_whole_run_runs_out_of_memory(monkeypatch, capsys):
    children, row = search_largest_batches(monkeypatch, fits={"numgpt": 64, "torch": 16},
                                           fits_whole_run={"numgpt": 32, "torch": 16})
    assert probed_and_timed(children)[1] == [("numgpt", 16), ("torch", 16), ("torch", 16), ("numgpt", 16),
                                             ("numgpt", 64)]
    assert row["shape"]["batch_size"] == 16 and row["ratio_vs_torch"] == 0.8   # the comparison stands
    assert row["largest_batch"] == {"torch": 16}
    assert row["largest_batch_tok_s"] == {"torch": tok_s("torch", 16)}
    assert "ratio_vs_torch_at_largest" not in row
    assert "numgpt: batch size 64 fit the probe but runs out of memory in a whole run: left out" \
        in capsys.readouterr().out


def test_compare_alternates_the_sides_abba_and_reports_the_median_of_the_rounds_ratios(monkeypatch):
    step_ms = {"numgpt": iter([100.0, 300.0, 100.0]), "torch": iter([150.0, 150.0, 100.0])}   # by round
    order = []

    def fake_side(impl, name, args, batch_size):
        order.append(impl)
        return {"step_ms": next(step_ms[impl]), "forward_ms": 1.0, "peak_mem_mib": len(order), "batch_size": 4}

    monkeypatch.setattr(bench_train, "run_side", fake_side)
    results, ratios = bench_train.compare("tutorial", argparse.Namespace(rounds=3), ("numgpt", "torch"), 4)
    assert order == ["numgpt", "torch", "torch", "numgpt", "numgpt", "torch"]
    assert ratios == [1.5, 0.5, 1.0]   # torch's step over numgpt's, round by round
    assert results["numgpt"] == {"step_ms": 100.0, "forward_ms": 1.0, "peak_mem_mib": 5, "batch_size": 4}
    assert results["torch"]["step_ms"] == 150.0 and results["torch"]["peak_mem_mib"] == 6


def test_bench_train_reports_the_median_of_the_rounds_ratios_not_the_ratio_of_medians(monkeypatch):
    """numgpt's steps take 100, 300 and 100 ms in three rounds, torch's 150, 150 and 100: the rounds'
    ratios are 1.5, 0.5 and 1.0, whose median is 1.0, where the medians' ratio would say 1.5."""
    step_ms = {"numgpt": iter([100.0, 300.0, 100.0]), "torch": iter([150.0, 150.0, 100.0])}
    rows = []

    def fake_child(script, args, env=None):
        impl = dict(zip(args[::2], args[1::2]))["--impl"]
        return {"forward_ms": 1.0, "backward_ms": 2.0, "optimizer_ms": 0.5, "peak_mem_mib": 100.0 + len(impl),
                "step_ms": next(step_ms[impl]), "step_stat": "median of 1 steps"}

    for module in ("torch", "transformers"):
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    monkeypatch.setattr(bench_train, "run_child", fake_child)
    monkeypatch.setattr(bench_train, "matmul_peak_gflops", lambda backend, precision: 1000.0)
    monkeypatch.setattr(bench_train, "append_result", rows.append)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--shape", "tutorial", "--rounds", "3",
                                      *matching_threads(monkeypatch)])
    bench_train.main()
    [row] = rows
    assert row["ratio_vs_torch"] == 1.0 and row["ratio_range"] == [0.5, 1.5]
    assert row["step_ms"] == 100.0 and row["torch_tok_s"] == round(32 * 64 / 0.150, 1)   # medians of the runs
    assert row["peak_rss_mib"] == 106.0 and row["torch_peak_rss_mib"] == 105.0         # what the table quotes
    assert row["gflops"] > 0 and row["torch_gflops"] > 0


def test_run_side_gives_the_child_its_blas_threads_in_the_environment(monkeypatch, tmp_path):
    """NumPy's BLAS reads its thread count when it loads, so --threads reaches it only through the
    child's environment: a child (a stand-in script) reports what it was started with."""
    script = tmp_path / "child.py"
    script.write_text("import json, os\n"
                      f"print(json.dumps({{v: os.environ.get(v) for v in {common.BLAS_THREAD_VARIABLES!r}}}))\n")
    for variable in common.BLAS_THREAD_VARIABLES:
        monkeypatch.setenv(variable, "7")   # what this process runs with: not what the child should get
    monkeypatch.setattr(bench_train, "__file__", str(script))
    args = argparse.Namespace(steps=1, warmup=0, threads=3, backend="numpy", precision="fp32", torch_compile=False)
    seen = bench_train.run_side("numgpt", "tutorial", args, batch_size=2)
    assert seen == {**{variable: "3" for variable in common.BLAS_THREAD_VARIABLES}, "batch_size": 2}


def test_run_with_blas_threads_restarts_the_command_only_when_the_environment_differs(monkeypatch):
    started = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.append((path, argv, env)))
    matching_threads(monkeypatch, 2)
    common.run_with_blas_threads(2)
    assert started == []
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "dev", "-m", "bench.bench_train", "--steps", "2"],
                        raising=False)
    common.run_with_blas_threads(3)
    [(path, argv, env)] = started
    # the same command: the interpreter's options (-m among them) and every argument
    assert path == sys.executable and argv == [sys.executable, "-X", "dev", "-m", "bench.bench_train", "--steps", "2"]
    assert all(env[variable] == "3" for variable in common.BLAS_THREAD_VARIABLES)


def test_run_with_blas_threads_restarts_when_any_variable_differs_and_keeps_the_rest_of_the_environment(
        monkeypatch):
    """OMP_NUM_THREADS=3 alone does not make OpenBLAS, which reads its own variable first, run on 3.
    What this process printed is flushed first: execve drops Python's buffers (a pipe's, say)."""
    events = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: events.append(env))
    for name in ("stdout", "stderr"):
        monkeypatch.setattr(sys, name, types.SimpleNamespace(flush=lambda name=name: events.append(name)))
    matching_threads(monkeypatch, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("NUMGPT_BENCH_MARK", "kept")   # PATH, PYTHONPATH, CUDA's variables alike
    common.run_with_blas_threads(3)
    stdout, stderr, env = events
    assert (stdout, stderr) == ("stdout", "stderr")
    assert env["NUMGPT_BENCH_MARK"] == "kept" and all(env[v] == "3" for v in common.BLAS_THREAD_VARIABLES)


def test_the_ratio_is_the_median_of_the_rounds_ratios_even_of_two_rounds():
    """The benchmarks' default of 2 rounds: the median is the mean of the two, not the lower."""
    assert common.median_and_range([1.2, 1.1]) == (1.15, [1.1, 1.2])
    assert common.median_and_range([1.23456, 1.3, 0.9, 2.0]) == (1.267, [0.9, 2.0])


def test_a_results_row_names_cupys_version_by_its_distributions_prefix(monkeypatch, request):
    """CuPy's distribution is named for its CUDA: cupy-cuda12x, not cupy."""
    from importlib import metadata
    request.addfinalizer(common.versions.cache_clear)   # the next test reads this machine's again
    dists = [types.SimpleNamespace(metadata={"Name": name}, version=version)
             for name, version in (("numpy", "2.1.0"), (None, "0"), ("CuPy-CUDA12x", "14.2.0"))]
    monkeypatch.setattr(metadata, "distributions", lambda: dists)
    common.versions.cache_clear()
    assert common.versions()["cupy"] == "14.2.0"


def test_a_results_row_names_its_commit_command_versions_and_load(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "results.jsonl"))
    monkeypatch.setattr(sys, "argv", ["bench_x.py", "--steps", "3"])
    common.append_result({"bench": "x", "tok_s": 1.0})
    [row] = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert row["bench"] == "x" and row["tok_s"] == 1.0 and row["command"] == ["bench_x.py", "--steps", "3"]
    assert row["commit"] == common.git_commit()
    assert row["versions"]["python"].count(".") == 2 and "numpy" in row["versions"]
    assert row["load_avg_1m"] is None or row["load_avg_1m"] >= 0


def test_git_commit_is_dirty_with_changes_other_than_the_results(monkeypatch, tmp_path, request):
    request.addfinalizer(common.git_commit.cache_clear)   # the next test reads this checkout's again

    def commit():
        common.git_commit.cache_clear()
        return common.git_commit()
    monkeypatch.setattr(common, "CHECKOUT", str(tmp_path))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))   # no checkout above it counts
    assert commit() is None   # not a git checkout
    git = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.jsonl").write_text("")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    head = git("rev-parse", "HEAD").stdout.decode().strip()
    assert commit() == head
    (tmp_path / "bench" / "results.jsonl").write_text("{}\n")   # a run's own rows
    assert commit() == head
    (tmp_path / "notes.txt").write_text("")
    assert commit() == head + "-dirty"


@pytest.mark.parametrize("argv, message", [
    (["--config", "1"], "argument --config: expected RxT"),
    (["--config", "2x1"], "give a 1-rank configuration"),
    (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
])
def test_bench_ddp_refuses_bad_input_in_one_line(monkeypatch, capsys, argv, message):
    """Before it looks for MPI: the same answer on a machine without it."""
    monkeypatch.setattr(bench_ddp.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sys, "argv", ["bench_ddp.py", *argv, "--no-save"])
    with pytest.raises(SystemExit) as exit:
        bench_ddp.main()
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_bench_ddp_without_mpi4py_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(bench_ddp.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sys, "argv", ["bench_ddp.py", "--no-save"])
    with pytest.raises(SystemExit, match=r'pip install "numgpt\[mpi\]"'):
        bench_ddp.main()


def test_bench_ddp_alternates_configurations_over_rounds_and_reports_medians(monkeypatch):
    """Each configuration runs once a round, the order reversed every other round, each run in an
    out-dir of its own (not the token cache); a row holds medians and the median per-round ratio."""
    step_ms = {(1, 1): [100.0, 120.0, 110.0], (2, 1): [80.0, 60.0, 100.0]}   # by round
    runs, rows = [], []

    def fake_run(mpiexec, ranks, threads, args, cache_dir, out_dir):
        runs.append(((ranks, threads), cache_dir, out_dir))
        round_ = sum(config == (ranks, threads) for config, _, _ in runs) - 1
        return {"step_ms": step_ms[ranks, threads][round_], "allreduce_ms": 1.0, "peak_rss_mib": 100.0 + round_,
                "grad_mib": 1.0}

    monkeypatch.setattr(bench_ddp.shutil, "which", lambda *args, **kwargs: "mpiexec")
    find_spec = bench_ddp.importlib.util.find_spec
    monkeypatch.setattr(bench_ddp.importlib.util, "find_spec", lambda name: find_spec(name) or object())
    monkeypatch.setattr(bench_ddp, "run_config", fake_run)
    monkeypatch.setattr(bench_ddp, "append_result", rows.append)
    monkeypatch.setattr(sys, "argv", ["bench_ddp.py", "--config", "1x1", "--config", "2x1", "--rounds", "3"])
    bench_ddp.main()
    assert [config for config, _, _ in runs] == [(1, 1), (2, 1), (2, 1), (1, 1), (1, 1), (2, 1)]
    out_dirs = [out_dir for _, _, out_dir in runs]
    assert len(set(out_dirs)) == 6 and not {cache_dir for _, cache_dir, _ in runs} & set(out_dirs)
    one, two = rows
    assert (one["step_ms"], one["ratio_vs_1rank"], one["rounds"]) == (110.0, 1.0, 3)
    assert two["step_ms"] == 80.0 and two["peak_rss_mib"] == 102.0
    assert two["ratio_vs_1rank"] == 1.25 and two["ratio_range"] == [1.1, 2.0]   # 100/80, 120/60, 110/100


def test_bench_generate_on_a_gpu_runs_no_cpu_reference(monkeypatch, capsys):
    """transformers' generate runs on the CPU here: it is no reference for numgpt on a GPU."""
    children, rows = [], []

    def fake_child(script, args, env=None):
        children.append(args[args.index("--impl") + 1])
        return {"tokens": [1, 2], "tok_s": 100.0, "peak_rss_mib": 10.0}

    monkeypatch.setattr(bench_generate, "run_child", fake_child)
    monkeypatch.setattr(bench_generate, "device_name_or_error", lambda parser, backend: "a GPU")
    monkeypatch.setattr(bench_generate, "append_result", rows.append)
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--backend", "cupy"])
    assert bench_generate.main() == 0
    assert children == ["numgpt", "numgpt"] and "no reference for a GPU" in capsys.readouterr().out
    [row] = rows
    assert row["device"] == "a GPU" and "ratio_vs_torch" not in row


def fake_generate_rounds(monkeypatch, tok_s, tokens):
    """bench_generate's main() with --rounds 3, its children replaced by fakes that return tok_s[side]
    and tokens[side] of each round in turn (the reference taken as installed): ([the children's sides],
    main's exit status, the results row)."""
    children, rows = [], []

    def fake_child(script, args, env=None):
        impl = args[args.index("--impl") + 1]
        round_ = children.count(impl)
        children.append(impl)
        return {"tokens": tokens[impl][round_], "tok_s": tok_s[impl][round_], "peak_rss_mib": 10.0 + round_}

    monkeypatch.setattr(bench_generate.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(bench_generate, "run_child", fake_child)
    monkeypatch.setattr(bench_generate, "append_result", rows.append)
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--rounds", "3", "--threads", "1"])
    status = bench_generate.main()
    [row] = rows
    return children, status, row


def test_bench_generate_alternates_the_sides_over_rounds_and_reports_medians(monkeypatch):
    children, status, row = fake_generate_rounds(
        monkeypatch, {"numgpt": [60.0, 30.0, 50.0], "torch": [30.0, 20.0, 40.0]},
        {"numgpt": [[1, 2]] * 3, "torch": [[1, 2]] * 3})
    assert children == ["numgpt", "torch", "torch", "numgpt", "numgpt", "torch"] and status == 0
    assert (row["tok_s"], row["torch_tok_s"], row["peak_rss_mib"], row["rounds"]) == (50.0, 30.0, 12.0, 3)
    assert row["ratio_vs_torch"] == 1.5 and row["ratio_range"] == [1.25, 2.0]   # 60/30, 30/20, 50/40
    assert row["tokens_identical"]


@pytest.mark.parametrize("side", ["numgpt", "torch"])
def test_bench_generate_fails_when_any_round_generates_other_tokens(monkeypatch, side):
    """Greedy decoding of the same weights gives the same tokens every time, on either side."""
    tokens = {"numgpt": [[1, 2]] * 3, "torch": [[1, 2]] * 3}
    tokens[side] = [[1, 2], [1, 2], [1, 3]]
    _, status, row = fake_generate_rounds(monkeypatch, {"numgpt": [1.0] * 3, "torch": [1.0] * 3}, tokens)
    assert status == 1 and row["tokens_identical"] is False


@pytest.mark.parametrize("bench", [bench_train, bench_layers, bench_generate])
def test_a_backend_that_cannot_run_is_one_line_not_a_traceback(monkeypatch, capsys, bench):
    monkeypatch.setattr(numgpt_backend, "cupy_problem", lambda: "no GPU here")   # wherever the tests run
    monkeypatch.setattr(sys, "argv", ["bench.py", "--backend", "cupy", "--no-save", *(
        [] if bench is bench_generate else matching_threads(monkeypatch))])
    with pytest.raises(SystemExit) as exit:
        bench.main()
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("bench.py: error: backend 'cupy' cannot run: no GPU")


@pytest.mark.parametrize("bench, argv, message", [
    (bench_layers, ["--repeats", "0"], "argument --repeats: expected a positive integer, got '0'"),
    (bench_generate, ["--new-tokens", "0"], "argument --new-tokens: expected a positive integer, got '0'"),
    (bench_train, ["--warmup", "-1"], "argument --warmup: expected an integer of at least 0, got '-1'"),
    (bench_attention, ["--repeats", "x"], "argument --repeats: expected a positive integer, got 'x'"),
    (bench_generate, ["--seed", "-1"], "argument --seed: expected an integer of at least 0, got '-1'"),
    (bench_generate, ["--new-tokens", "3", "--uncached-tokens", "6"],
     "--uncached-tokens 6 is more than --new-tokens 3: the uncached run checks the first of the cached run's tokens"),
    (bench_generate, ["--prompt-len", "1000", "--new-tokens", "25"],
     "--prompt-len + --new-tokens must fit GPT-2's 1024 positions"),
])
def test_a_count_out_of_range_is_one_line_not_a_traceback(monkeypatch, capsys, bench, argv, message):
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    with pytest.raises(SystemExit) as exit:
        bench.main()
    assert exit.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == f"bench.py: error: {message}"


@pytest.mark.parametrize("platform, ru_maxrss", [("linux", 300 * 2**10), ("darwin", 300 * 2**20)])
def test_peak_rss_is_in_mib_on_linux_and_on_macos(monkeypatch, platform, ru_maxrss):
    """getrusage's ru_maxrss counts KiB on Linux and bytes on macOS: divided by 1024 there, a
    300 MiB run was reported as 307,200 MiB."""
    import resource
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=ru_maxrss))
    assert common.peak_rss_mib() == 300.0


def test_peak_rss_on_windows_is_the_peak_working_set(monkeypatch):
    """Windows has no `resource` module (importing it at the top kept every benchmark from
    starting there): the peak is psapi's PeakWorkingSetSize, read through ctypes."""
    import ctypes

    def get_process_memory_info(process, counters, size):
        assert process == "this process" and size == ctypes.sizeof(counters._obj)
        counters._obj.PeakWorkingSetSize = 300 * 2**20
        return 1

    windll = types.SimpleNamespace(kernel32=types.SimpleNamespace(GetCurrentProcess=lambda: "this process"),
                                   psapi=types.SimpleNamespace(GetProcessMemoryInfo=get_process_memory_info))
    monkeypatch.setattr(ctypes, "windll", windll, raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "resource", None)    # as on Windows: `import resource` fails
    assert common.peak_rss_mib() == 300.0
