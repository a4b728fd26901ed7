"""The benchmarks' GPU side runs, here on the CuPy stand-in: a lent GPU's few minutes should
measure, not meet a typo. (Their numbers mean nothing here; the benchmarks report them on a GPU.)"""

import sys
from pathlib import Path

import pytest

import cupy_standin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_attention  # noqa: E402
import bench_layers  # noqa: E402
import bench_train  # noqa: E402

pytestmark = cupy_standin.needs_compiler


@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16"])
def test_bench_train_times_a_numgpt_step_on_cupy(monkeypatch, precision):
    monkeypatch.setenv("CUPY_TF32", "0")   # tf32 sets it
    cupy_standin.install(monkeypatch)
    monkeypatch.setattr(bench_train, "VOCAB", 64)
    shape = {"batch_size": 2, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}
    times, memory = bench_train.bench_numgpt(shape, steps=2, warmup=1, backend="cupy", precision=precision)
    assert {part: len(t) for part, t in times.items()} == {"forward": 2, "backward": 2, "optimizer": 2, "step": 1}
    assert all(t > 0 for part in times.values() for t in part) and memory >= 0


@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16"])
def test_bench_attention_measures_each_numgpt_variant(monkeypatch, capsys, precision):
    cupy_standin.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "torch", None)   # the stand-in has no CUDA for torch: its row is left out
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--batch-size", "1", "--block-size", "40", "--n-head",
                                      "2", "--precision", precision, "--repeats", "1", "--no-save"])
    bench_attention.main()
    rows = [line.split(":")[0].strip() for line in capsys.readouterr().out.splitlines()]
    assert rows == ["flash", "flash fma", "matrix"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bench_layers_times_each_layer_with_and_without_the_kernels_on_cupy(monkeypatch, capsys, precision):
    cupy_standin.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "torch", None)   # no CUDA for torch here: no reference column
    monkeypatch.setattr(bench_layers, "VOCAB", 64)
    monkeypatch.setattr(bench_layers, "SHAPES", {"tiny": {"batch_size": 2, "block_size": 16, "n_layer": 1,
                                                          "n_head": 2, "n_embd": 16, "dropout": 0.0}})
    monkeypatch.setattr(sys, "argv", ["bench_layers.py", "--backend", "cupy", "--precision", precision,
                                      "--repeats", "1", "--no-save"])
    bench_layers.main()
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    rows = [line.split() for line in lines[header + 1:]]   # layer, fwd ms, bwd ms, GFLOP/s, twins ms, ...
    assert [row[0] for row in rows] == ["embedding", "layernorm", "attention", "mlp", "classifier+loss"]
    assert all(float(row[1]) > 0 and float(row[4]) > 0 for row in rows)
