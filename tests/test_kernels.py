"""The fused CUDA kernels against their twins, the layers' NumPy-style code.

Each comparison runs on two devices: a GPU through CuPy (skipped without one), and the CPU
through tests/cuda_emulator.py, which compiles the same CUDA source with g++ and runs each CUDA
thread as a fiber (skipped without a C++ compiler). The emulator checks the kernels' logic
on every CI run; only the GPU shows their speed and the device's own rounding. The compile check
needs only NVRTC (from a CuPy install), so source errors that g++ would accept show up without a
GPU too. The gradient checks of tests/test_layers.py and tests/test_model.py run on CuPy with the
kernels on, so the kernels' float64 derivatives are checked by finite differences as well.
"""

import contextlib
import re

import numpy as np
import pytest

import cuda_emulator
import cupy_standin
from gradcheck import relative_error
from numgpt import GPT, AdamW, GPTConfig, clip_grad_norm, foreach, kernels, precision
from numgpt.optim import clip_coefficient
from numgpt.backend import cupy_available, get_xp, scatter_add, to_numpy
from numgpt.layers.activations import gelu_backward, gelu_forward
from numgpt.layers.attention import (FlashCache, MatrixCache, attention_backward, attention_forward,
                                    causal_attention_backward, causal_attention_forward, causal_softmax,
                                    softmax_backward)
from numgpt.layers.classifier import classifier_forward
from numgpt.layers.cross_entropy import IGNORE_INDEX, cross_entropy_forward
from numgpt.layers.layernorm import layernorm_backward, layernorm_forward
from numgpt.layers.linear import sum_rows
from numgpt.precision import half_matmuls, set_tf32

DTYPES = ["float32", "float64"]
TOLERANCE = {"float32": 2e-5, "float64": 1e-12}
needs_compiler = cuda_emulator.needs_compiler


class NaNFilledNumPy:
    """NumPy as numgpt.kernels sees it under the emulator: `empty` arrays start as nan (integers as -1),
    so that an element of an output that no block writes shows. np.empty often returns fresh pages of
    zeros, which a sum (sum_of_squares_all's one partial sum per chunk) takes in silently."""
    __name__ = "numpy"

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=np.float64):
        return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -1, dtype=dtype)


@pytest.fixture(params=[
    pytest.param("gpu", marks=pytest.mark.skipif(not cupy_available(), reason="CuPy with a GPU is not available")),
    pytest.param("emulator", marks=needs_compiler),
])
def xp(request, monkeypatch):
    """The array module whose arrays the kernels get: CuPy on a GPU, NumPy under the emulator (where
    the kernels' outputs start as nan: NaNFilledNumPy)."""
    if request.param == "gpu":
        yield get_xp("cupy")
    else:
        monkeypatch.setattr(kernels, "array_module", lambda a: NaNFilledNumPy() if isinstance(a, np.ndarray) else np)
        with cuda_emulator.emulated():
            yield np


def as_float16(x):
    """x rounded to float16, held in float64."""
    return np.asarray(x).astype(np.float16).astype(np.float64)


def as_tf32(x):
    """x rounded to TF32 (float32's exponent, 10 mantissa bits: to nearest, ties away from zero, as
    cvt.rna.tf32.f32), held in float64. Rounded from float64 directly, as as_float16 is: through
    float32 a value just off a tie could land on it (and then go the other way), once in 8192."""
    bits = np.asarray(x, dtype=np.float64).view(np.uint64)
    dropped = np.uint64(52 - 10)   # float64's mantissa bits beyond TF32's; adding half their unit rounds the magnitude
    return ((bits + (np.uint64(1) << (dropped - np.uint64(1)))) >> dropped << dropped).view(np.float64)


# the tensor-core attention's operand formats (kernels.TC_OPERANDS): what each rounds an operand to
ROUNDED = {"float16": as_float16, "tf32": as_tf32, "float32": lambda x: np.asarray(x, dtype=np.float64)}
ROUNDING_FORMATS = ("float16", "tf32")   # "float32" rounds nowhere (three TF32 products miss by 2^-21)


@contextlib.contextmanager
def tensor_core_matmuls(xp, operands):
    """Within the block matmuls round their operands to `operands` ("float16" or "tf32"; "float32":
    nowhere), and so do the attention kernels. On a GPU "tf32" is train.py's --precision tf32; under the emulator it
    reaches the kernels alone (NumPy's matmuls have no TF32)."""
    if operands == "float16":
        with half_matmuls("float16"):
            yield
    elif operands == "float32":   # the default
        yield
    elif xp is np:
        precision._tf32 = True
        try:
            yield
        finally:
            precision._tf32 = False
    else:
        set_tf32(xp, True)
        try:
            yield
        finally:
            set_tf32(xp, False)


def tensor_cores_or_skip(xp, head_size):
    if not kernels.tensor_core_attention_supports(xp, head_size):
        pytest.skip("mma.sync needs compute capability 8.0")


@pytest.mark.parametrize("capability, expected", [("75", False), ("80", True), ("86", True), ("90", True)])
def test_the_tensor_core_attention_runs_from_compute_capability_8_0(monkeypatch, capability, expected):
    """mma.sync's float16 and TF32 shapes need 8.0 (A100) or newer: an A100 gets the tensor cores too."""
    cupy_standin.install(monkeypatch)
    monkeypatch.setattr(cupy_standin.Device, "compute_capability", capability)
    xp = get_xp("cupy")
    assert kernels.tensor_core_attention_supports(xp, 64) is expected
    assert not kernels.tensor_core_attention_supports(xp, 48)   # not a compiled head size


def nvrtc_or_skip():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:   # no CuPy, or no NVRTC library
        pytest.skip(f"NVRTC is not available: {e}")
    return nvrtc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["compute_80", "compute_75"])   # tensor-core attention, and its stubs below 8.0
def test_kernels_compile(dtype, arch):
    nvrtc = nvrtc_or_skip()
    program = nvrtc.createProgram(kernels.source(dtype), "numgpt_kernels.cu", [], [])
    try:
        nvrtc.compileProgram(program, [f"--gpu-architecture={arch}"])
    except Exception:
        pytest.fail(nvrtc.getProgramLog(program))


@pytest.mark.skipif(not cupy_available(), reason="CuPy with a GPU is not available")
def test_the_tensor_core_kernels_do_not_spill():
    """NVRTC's build of the tensor-core attention (what runs) keeps every kernel in registers: no
    local memory. dkv is near the 255-register limit (DEVELOPERS.md), and a spill there is slow."""
    xp = get_xp("cupy")
    tensor_cores_or_skip(xp, 64)
    for operands, name in kernels.TC_OPERANDS.items():
        for hs in kernels.TC_HEAD_SIZES:
            for part in ("forward", "dq", "dkv"):
                kernel = kernels._kernel(f"tc_attention_{part}_{name}_{hs}", "float32")
                assert kernel.local_size_bytes == 0, (operands, hs, part, kernel.num_regs)


def fused_and_twin(fn, *args):
    """fn(*args) with the kernels on and off, as NumPy; the arguments are copied for each call
    (some functions work in place)."""
    fused = fn(*(a.copy() if hasattr(a, "copy") else a for a in args))
    with kernels.disabled():
        twin = fn(*(a.copy() if hasattr(a, "copy") else a for a in args))
    return fused, twin


def assert_same(fused, twin, dtype):
    """Equal to the dtype's tolerance, relative to each element and to the largest one: a sum of
    many products (a weight gradient) errs relative to the size of its terms, not of its result."""
    fused, twin = to_numpy(fused), to_numpy(twin)
    assert fused.dtype == twin.dtype and fused.shape == twin.shape
    largest = float(np.nanmax(np.abs(twin), initial=1.0))   # NaN where both have one is equal (assert_allclose)
    np.testing.assert_allclose(fused, twin, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * largest)


def random(xp, shape, dtype, seed=0, scale=1.0):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # the twin's forward: x^3 = inf, harmless
def test_gelu_kernels_match_their_twin(xp, dtype):
    x, dy = random(xp, (3, 5, 67), dtype, 0, 3.0), random(xp, (3, 5, 67), dtype, 1)
    x[0, 0, :7] = xp.asarray([-1e30, -1e14, -20.0, 20.0, 1e14, 1e30, np.nan], dtype=dtype)   # x^3 overflowed float32;
    # the twin's clip keeps a NaN (a diverged model's), and the kernel must not turn it into a number
    fused, twin = fused_and_twin(lambda a: gelu_forward(a)[0], x)
    assert_same(fused, twin, dtype)
    fused, twin = fused_and_twin(gelu_backward, dy, x)
    assert_same(fused, twin, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 7, 32, 100, 768])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_kernels_match_their_twin(xp, dtype, C, bias):
    # a mean far from 0 (10^4 to 10^5 times the variance in x^2): a variance taken as E[x^2] - mean^2
    # cancels, while the twin's and the kernel's means, summed in their own orders, still agree
    x = random(xp, (2, 9, C), dtype, 0) + {"float32": 100.0, "float64": 300.0}[dtype]
    w, dy = random(xp, (C,), dtype, 1), random(xp, (2, 9, C), dtype, 2)
    b = random(xp, (C,), dtype, 3) if bias else None
    (y_fused, cache_fused), (y_twin, cache_twin) = fused_and_twin(lambda a: layernorm_forward(a, w, b), x)
    assert_same(y_fused, y_twin, dtype)
    for a, t in zip(cache_fused[:2], cache_twin[:2]):    # xhat, rstd
        assert_same(a, t, dtype)
    fused = layernorm_backward(dy, cache_fused)
    with kernels.disabled():
        twin = layernorm_backward(dy, cache_twin)
    for a, t in zip(fused, twin):
        if t is None:
            assert a is None
        else:
            assert_same(a, t, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C", [(0, 5), (1, 1), (9, 33), (300, 64), (70_000, 2)])   # 1, 2 and 3 launches
def test_sum_rows_kernel_matches_its_twin(xp, dtype, N, C):
    """Bias gradients (sum_rows) and layernorm's dw (the kernel with a weight) as the twins sum them,
    for fewer columns than a warp has lanes and more, and rows in one, two and three passes."""
    x, w = random(xp, (N, C), dtype, 0), random(xp, (N, C), dtype, 1)
    fused, twin = fused_and_twin(sum_rows, x)
    assert_same(fused, twin, dtype)
    assert_same(kernels.sum_rows(x, w), (x * w).sum(axis=0), dtype)


def test_kernels_with_a_capped_grid_loop_over_the_rest(xp, monkeypatch):
    """A grid dimension holds at most MAX_BLOCKS blocks (a GPU's 65535): gelu's grid-stride loops and
    sum_rows' groups of more than SUM_ROWS_GROUP rows must still cover every element. With the cap
    at 3 blocks this needs a thousand elements, not 16 million."""
    monkeypatch.setattr(kernels, "MAX_BLOCKS", 3)
    test_gelu_kernels_match_their_twin(xp, "float64")                 # 1005 elements: 4 blocks' worth
    test_sum_rows_kernel_matches_its_twin(xp, "float64", 2000, 33)    # 8 groups' worth of rows in 3


@needs_compiler
@pytest.mark.parametrize("mutation", [
    ("r += warps)", "r += 2 * warps)"),                                       # skips every other row
    ("k = 1; k < warps; ++k", "k = 2; k < warps; ++k"),                     # drops a warp's sum
    ("warp_sums[warp][lane] = sum;\n    __syncthreads();", "warp_sums[warp][lane] = sum;"),   # no barrier
    ("* w[r * C + c] :", "* w[r * C] :"),                                     # the wrong weight
])
def test_the_sum_rows_comparison_catches_a_wrong_kernel(monkeypatch, mutation):
    """Negative controls: each wrong sum_rows kernel fails the comparison above."""
    assert kernels.SOURCE.count(mutation[0]) == 1
    monkeypatch.setattr(kernels, "SOURCE", kernels.SOURCE.replace(*mutation))
    with cuda_emulator.emulated(), pytest.raises(AssertionError):
        test_sum_rows_kernel_matches_its_twin(np, "float64", 300, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, V, C", [(0, 3, 4), (1, 1, 1), (50, 7, 300), (2000, 1000, 3)])
def test_scatter_add_kernel_matches_np_add_at_to_the_bit(xp, dtype, N, V, C):
    """Embedding and classifier weight gradients: the kernel adds the rows of each id in their order,
    as np.add.at does, so it gives np.add.at's sums exactly, and the same sums on every run (CuPy's
    atomic adds do neither). Ids repeat, some never occur, one occurs in long runs."""
    rng = np.random.default_rng(0)
    index = rng.integers(0, V, size=N)
    index[: N // 2] = V - 1                                        # a run as long as half the rows
    rng.shuffle(index)
    target, values = random(xp, (V, C), dtype, 1), random(xp, (N, C), dtype, 2)
    expected = to_numpy(target).copy()
    np.add.at(expected, index, to_numpy(values))
    fused, twin = fused_and_twin(lambda t: (scatter_add(t, xp.asarray(index), values), t)[1], target)
    np.testing.assert_array_equal(to_numpy(fused), expected)
    assert_same(twin, expected, dtype)


def test_scatter_add_into_a_strided_target(xp):
    """The kernel finds row i at i * C: a target that is a transposed view goes to the twin."""
    rng = np.random.default_rng(0)
    index = rng.integers(0, 5, size=40)
    target, values = random(xp, (3, 5), "float64", 1).T, random(xp, (40, 3), "float64", 2)
    expected = to_numpy(target).copy()
    np.add.at(expected, index, to_numpy(values))
    scatter_add(target, xp.asarray(index), values)
    np.testing.assert_allclose(to_numpy(target), expected, rtol=1e-14)


@needs_compiler
@pytest.mark.parametrize("mutation", [
    ("(r > 0 && index[order[r - 1]] == id)", "(false)"),             # every position starts a run: rows added twice
    ("s < N && index[order[s]] == id", "s < N"),                     # a run goes on into the next id's rows
    ("sum += values[order[s] * C + c]", "sum += values[s * C + c]"),   # the rows in the wrong order
])
def test_the_scatter_add_comparison_catches_a_wrong_kernel(monkeypatch, mutation):
    """Negative controls: each wrong scatter_add_rows kernel fails the comparison above."""
    assert kernels.SOURCE.count(mutation[0]) == 1
    monkeypatch.setattr(kernels, "SOURCE", kernels.SOURCE.replace(*mutation))
    with cuda_emulator.emulated(), pytest.raises(AssertionError):
        test_scatter_add_kernel_matches_np_add_at_to_the_bit(np, "float64", 50, 7, 300)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tq, Tk, scale", [(1, 1, 4.0), (5, 5, 4.0), (70, 70, 4.0), (1, 9, 4.0), (3, 40, 4.0),
                                          (9, 9, 300.0)])   # scores far apart: a max that missed one would overflow exp
def test_softmax_kernels_match_their_twin(xp, dtype, Tq, Tk, scale):
    scores, dprobs = random(xp, (2, 3, Tq, Tk), dtype, 0, scale), random(xp, (2, 3, Tq, Tk), dtype, 1)
    fused, twin = fused_and_twin(causal_softmax, scores)
    assert_same(fused, twin, dtype)
    fused, twin = fused_and_twin(softmax_backward, dprobs, twin)
    assert_same(fused, twin, dtype)


CHUNK = 1000                            # more elements than a block has threads, and not a multiple of them
SIZES = [1, 999, 1000, 1001, 0, 2600]   # one chunk, several, a part of one, none


def arrays_of(xp, dtype, seed):
    return [random(xp, (n,), dtype, seed + i) for i, n in enumerate(SIZES)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_array_kernels_match_their_twins(xp, dtype, monkeypatch):
    """scale_, accumulate_ (set and add), sum_of_squares and all_finite over arrays of one chunk,
    several chunks, part of one and none, as the loops do."""
    monkeypatch.setattr(kernels, "CHUNK", CHUNK)
    results = []
    for use_kernels in (True, False):
        with contextlib.nullcontext() if use_kernels else kernels.disabled():
            dsts, srcs = arrays_of(xp, dtype, 0), arrays_of(xp, dtype, 10)
            assert foreach.fused(dsts, srcs) == use_kernels
            foreach.accumulate_(dsts, srcs, 3, add=False)
            set_ = [d.copy() for d in dsts]
            foreach.accumulate_(dsts, arrays_of(xp, dtype, 20), 3, add=True)
            foreach.scale_(dsts, 0.7)
            finite = [foreach.all_finite(dsts)]
            for bad in (np.inf, np.nan):   # the last element of the second chunk of the last array
                dsts[-1][2 * CHUNK - 1] = bad
                finite.append(foreach.all_finite(dsts))
                dsts[-1][2 * CHUNK - 1] = 0.0
            results.append((set_, dsts, foreach.sum_of_squares(dsts), finite))
    (set_, dsts, total, finite), (set_twin, dsts_twin, total_twin, finite_twin) = results
    for a, b in zip(set_ + dsts, set_twin + dsts_twin):
        assert_same(a, b, dtype)
    np.testing.assert_allclose(to_numpy(total), to_numpy(total_twin), rtol=TOLERANCE[dtype])
    assert finite == finite_twin == [True, False, False]


def test_a_chunk_table_holds_each_chunks_address_and_length_and_is_reused_only_for_the_same_arrays(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", 4)
    buffer = np.zeros(10, dtype=np.float64)
    as64, as32 = buffer, buffer.view(np.float32)[:10]   # the same address and size, another element size
    table64, table32 = kernels._chunk_table([[as64]], tags=[1]), kernels._chunk_table([[as32]], tags=[1])
    address = buffer.ctypes.data
    assert table64.tolist() == [[address, 4, 1], [address + 32, 4, 1], [address + 64, 2, 1]]
    assert table32.tolist() == [[address, 4, 1], [address + 16, 4, 1], [address + 32, 2, 1]]
    assert kernels._chunk_table([[as64]], tags=[1]) is table64
    assert kernels._chunk_table([[as64]], tags=[0]) is not table64
    # a shorter view at the same address (a flat buffer's first parameter) has a table of its own
    assert kernels._chunk_table([[buffer[:6]]], tags=[1]).tolist() == [[address, 4, 1], [address + 32, 2, 1]]


def test_only_arrays_that_a_multi_array_kernel_can_read_go_to_one():
    """The multi-array kernels read each array as one C-contiguous run of elements of the first
    array's float dtype, as many as the first list's array has: anything else takes the loop."""
    a, b = np.zeros((4, 6)), np.zeros(5)
    assert kernels.chunkable([a, b], [np.ones((24,)), np.ones(5)])
    assert kernels.chunkable([a.astype(np.float32)])
    assert not kernels.chunkable([a, b.astype(np.float32)])          # one float32 among float64
    assert not kernels.chunkable([a.astype(np.float16)])             # no float16 kernels
    assert not kernels.chunkable([a.T])                              # not C-contiguous
    assert not kernels.chunkable([a, b], [np.ones(24), np.ones(4)])  # the second pair's sizes differ
    assert not kernels.chunkable([])


@needs_compiler
def test_a_training_steps_bookkeeping_is_one_launch_per_operation(monkeypatch):
    """Accumulating, unscaling, checking, clipping and updating the 148 parameters of a 12-layer
    GPT-2 take one kernel launch each, not one per parameter, as train.py does them: clipping's
    norm is one launch (and on CuPy a few scalar operations), its scaling part of AdamW's."""
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=12, n_head=2, n_embd=16)
    launches = []
    # what emulated() does, with each kernel counted (monkeypatch undoes both at the end)
    monkeypatch.setattr(kernels, "_runs_kernels", lambda xp: True)
    monkeypatch.setattr(kernels, "_kernel", lambda name, dtype: launches.append(name)
                        or cuda_emulator.emulated_kernel(name, dtype))
    model = GPT(config, seed=0)
    grads = {name: np.ones_like(p) for name, p in model.params.items()}
    assert len(grads) == 148
    opt = AdamW(model.params, lr=1e-3, weight_decay=0.1)
    foreach.accumulate_(list(grads.values()), list(grads.values()), 2, add=True)
    foreach.scale_(list(grads.values()), 0.5)
    assert foreach.all_finite(list(grads.values()))
    opt.step(grads, grad_scale=clip_coefficient(grads, 1.0))
    assert launches == ["accumulate_chunks", "scale_chunks", "nonfinite_chunks", "sum_squares_chunks", "adamw_chunks"]


@needs_compiler
def test_a_float16_forward_writes_the_matmul_operands_in_its_kernels(monkeypatch):
    """Under fp16 matmuls the outputs of ln_1, ln_2 and GELU and the classifier's exps feed only
    matmuls: their kernels write them as float16 (the `_half` variants), so no float32 copy is
    written and read again to be rounded. ln_f stays float32: the classifier scales its output too.
    Under fp32 nothing changes."""
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=3, n_head=2, n_embd=16)
    idx = np.random.default_rng(0).integers(0, 64, (2, 9))
    launches = []
    monkeypatch.setattr(kernels, "_runs_kernels", lambda xp: True)
    monkeypatch.setattr(kernels, "_kernel", lambda name, dtype: launches.append(name)
                        or cuda_emulator.emulated_kernel(name, dtype))
    counts = {}
    for matmul_dtype in (None, "float16"):
        launches.clear()
        GPT(config, seed=0, matmul_dtype=matmul_dtype).forward(idx[:, :-1], idx[:, 1:])
        counts[matmul_dtype] = {name: launches.count(name) for name in set(launches)
                                if name.startswith(("gelu_forward", "layernorm_forward", "softmax_parts"))}
    assert counts[None] == {"layernorm_forward": 7, "gelu_forward": 3, "softmax_parts": 1}
    assert counts["float16"] == {"layernorm_forward_half": 6, "layernorm_forward": 1, "gelu_forward_half": 3,
                                 "softmax_parts_half": 1}


@needs_compiler
@pytest.mark.parametrize("layer", ["layernorm", "gelu", "cross_entropy"])
def test_the_float16_output_comparison_catches_a_kernel_that_rounds_wrongly(monkeypatch, layer):
    """Negative control: float16 stores one unit in the last place off fail the bitwise comparison
    of test_precision, which runs these kernels on the stand-in for CuPy."""
    import test_precision
    mutation = ("*y = half_bits(v);", "*y = half_bits(v) ^ 1;")
    assert kernels.SOURCE.count(mutation[0]) == 1
    monkeypatch.setattr(kernels, "SOURCE", kernels.SOURCE.replace(*mutation))
    with cuda_emulator.emulated(), pytest.raises(AssertionError):
        test_precision.test_a_layer_asked_for_float16_gives_its_float32_output_rounded_once(np, layer)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_kernel_matches_its_twin(xp, dtype, monkeypatch):
    """Three AdamW steps with one kernel launch each (parameters of several chunks, decayed and
    not; gradients unscaled, scaled by clipping's coefficient on the device, and by a number)
    leave the parameters and both moments where the per-parameter loop does."""
    monkeypatch.setattr(kernels, "CHUNK", CHUNK)
    results = []
    for use_kernels in (True, False):
        params = {"w": random(xp, (33, 70), dtype, 0), "b": random(xp, (70,), dtype, 1),
                  "g": random(xp, (300,), dtype, 2)}
        opt = AdamW(params, lr=1e-2, weight_decay=0.1, exclude_from_decay=["b"])
        for step in range(3):
            grads = {name: random(xp, p.shape, dtype, 10 + step) for name, p in params.items()}
            with contextlib.nullcontext() if use_kernels else kernels.disabled():
                opt.step(grads, grad_scale=[None, clip_coefficient(grads, 1.0), 0.5][step])
        results.append({**params, **{"m." + n: a for n, a in opt.m.items()}, **{"v." + n: a for n, a in opt.v.items()}})
    for name in results[0]:
        assert_same(results[0][name], results[1][name], dtype)


@needs_compiler
@pytest.mark.parametrize("test, mutation", [
    ("adamw", ("REAL keep = row[5] ? decay : (REAL)1,", "REAL keep = decay,")),            # decays every parameter
    ("adamw", ("REAL gi = g[i] * scale;", "REAL gi = g[i] + 0 * scale;")),                  # ignores grad_scale
    ("adamw", ("i < row[4]; i += blockDim.x", "i < row[4] - 1; i += blockDim.x")),        # skips a chunk's last element
    ("multi", ("for (long long i = threadIdx.x; i < row[1]; i += blockDim.x) a[i] *= factor;",
               "for (long long i = threadIdx.x; i < row[1]; i += 2 * blockDim.x) a[i] *= factor;")),   # scales half
    ("multi", ("        if (!isfinite(a[i])) *found = 1;",
               "        if (!isfinite(a[i]) && i < row[1] - 1) *found = 1;")),
    ("multi", ("w < blockDim.x / 32; ++w", "w < 2; ++w")),                                # sums two warps of eight
    ("multi", ("warp_totals[threadIdx.x / 32] = total;\n    __syncthreads();",                  # no barrier before
               "warp_totals[threadIdx.x / 32] = total;")),                                    # thread 0 adds them up
])
def test_the_multi_array_comparisons_catch_a_wrong_kernel(monkeypatch, test, mutation):
    """Negative controls: each wrong multi-array kernel fails the comparison above that runs it."""
    assert kernels.SOURCE.count(mutation[0]) == 1
    monkeypatch.setattr(kernels, "SOURCE", kernels.SOURCE.replace(*mutation))
    compare = {"adamw": test_adamw_kernel_matches_its_twin, "multi": test_multi_array_kernels_match_their_twins}[test]
    with cuda_emulator.emulated(), pytest.raises(AssertionError):
        compare(np, "float64", monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, n_head, hs", [(1, 1, 4), (5, 2, 8), (70, 2, 64), (130, 1, 17), (40, 1, 200), (9, 1, 512)])
def test_flash_attention_kernels_match_their_twin(xp, dtype, T, n_head, hs):
    """Output and every gradient of the attention layer with the fused kernels (no (T,T) matrix)
    as with the twin that forms it: one query block or several, one key tile or several, heads
    that need 1 to 32 threads a row (512 dims: a whole warp, the most one row may have)."""
    C = n_head * hs
    x, dout = random(xp, (2, T, C), dtype, 0), random(xp, (2, T, C), dtype, 1)
    std = C ** -0.5   # q . k / sqrt(hs) of order 1, as after a layernorm: no row is one-hot
    params = {"c_attn.weight": random(xp, (C, 3 * C), dtype, 2, std), "c_attn.bias": random(xp, (3 * C,), dtype, 3),
              "c_proj.weight": random(xp, (C, C), dtype, 4, std), "c_proj.bias": random(xp, (C,), dtype, 5)}
    with kernels.disabled():
        out_twin, cache_twin = attention_forward(x, params, n_head)
        dx_twin, grads_twin = attention_backward(dout, cache_twin)
    assert isinstance(cache_twin[1], MatrixCache)
    with kernels.disabled("flash_attention"):   # the other kernels stay on: the matrix path with fused softmaxes
        assert isinstance(attention_forward(x, params, n_head)[1][1], MatrixCache)
    # float32 heads of TC_HEAD_SIZES go to the tensor cores (three TF32 products): the FMA kernels too
    tensor_cores = dtype == "float32" and hs in kernels.TC_HEAD_SIZES and kernels.tensor_core_attention_supports(xp, hs)
    for operands in ("float32", None) if tensor_cores else (None,):
        with kernels.disabled("tensor_core_attention") if operands is None else contextlib.nullcontext():
            out, cache = attention_forward(x, params, n_head)
            assert isinstance(cache[1], FlashCache) and cache[1].operands == operands
            dx, grads = attention_backward(dout, cache)
        assert_same(out, out_twin, dtype)
        assert_same(dx, dx_twin, dtype)
        for name in grads_twin:
            assert_same(grads[name], grads_twin[name], dtype)


@needs_compiler
@pytest.mark.parametrize("mutation", [("Di += g[k] * yr[k];", "Di += g[k];"),
                                      ("if (start + j > i) continue;", "if (start + j > i + 1) continue;")])
def test_the_flash_attention_comparison_catches_a_wrong_kernel(monkeypatch, mutation):
    """Negative controls: a dq kernel whose D leaves out y, or a forward whose causal mask lets each
    query see one key too many, fails the comparison above."""
    assert mutation[0] in kernels.SOURCE
    monkeypatch.setattr(kernels, "SOURCE", kernels.SOURCE.replace(*mutation, 1))   # the first: the forward's mask
    with cuda_emulator.emulated(), pytest.raises(AssertionError):
        test_flash_attention_kernels_match_their_twin(np, "float64", 70, 2, 64)


@pytest.mark.parametrize("operands", [None, "float32"])   # FMAs, tensor cores (three TF32 products)
def test_attention_kernels_keep_rows_whose_every_score_is_far_below_zero(xp, operands):
    """Every score -144 (each key the negated query, products exact in float32 and TF32): exp(-144)
    is 0 in float32, so each row's running max must start from its first score, as the twin
    subtracts the row max; one that started at 0 would leave every row's sum 0, and y nan."""
    T, hs = 20, 16
    if operands is not None:
        tensor_cores_or_skip(xp, hs)
    q = np.full((T, hs), 6.0)                                           # q k / sqrt(hs) = -16 * 36 / 4
    qkv = xp.asarray(np.concatenate([q, -q, np.random.default_rng(0).standard_normal((T, hs))], axis=1)[None],
                     dtype=np.float32)
    dy = random(xp, (1, T, hs), "float32", 1)
    with kernels.disabled("tensor_core_attention") if operands is None else contextlib.nullcontext():
        y, cache = causal_attention_forward(qkv, 1)
        assert isinstance(cache, FlashCache) and cache.operands == operands
        dqkv = causal_attention_backward(dy, cache)
    with kernels.disabled():
        y_twin, cache_twin = causal_attention_forward(qkv, 1)
        dqkv_twin = causal_attention_backward(dy, cache_twin)
    assert_same(y, y_twin, "float32")
    assert_same(dqkv, dqkv_twin, "float32")


@pytest.mark.parametrize("operands", [None, "float32"])   # FMAs, tensor cores (three TF32 products)
def test_the_attention_forward_has_no_floor_under_a_rows_scores(xp, operands):
    """Every score -4e30 (q = 1e15, each key -q: a diverged float32 model's, still finite): the row
    max must come from the scores themselves, with nothing below it. From a sentinel of -1e30 the
    FMA kernel's sums stayed 0 (y nan), and the tensor cores' masked keys, set to -1e30, outweighed
    the real ones (y averaged the future's values). Ties this far from 0 lose log(T) in the lse
    (s + log T rounds to s), so the backward's exp(s - lse) cannot follow here: forward only."""
    T, hs = 20, 16
    if operands is not None:
        tensor_cores_or_skip(xp, hs)
    q = np.full((T, hs), 1e15)
    qkv = xp.asarray(np.concatenate([q, -q, np.random.default_rng(0).standard_normal((T, hs))], axis=1)[None],
                     dtype=np.float32)
    with kernels.disabled("tensor_core_attention") if operands is None else contextlib.nullcontext():
        y, cache = causal_attention_forward(qkv, 1)
        assert isinstance(cache, FlashCache) and cache.operands == operands
    with kernels.disabled():
        y_twin, _ = causal_attention_forward(qkv, 1)
    assert np.isfinite(to_numpy(y)).all()
    assert_same(y, y_twin, "float32")


@needs_compiler
def test_the_kernels_give_the_same_results_whatever_order_their_blocks_run_in():
    """A GPU runs a grid's blocks in any order. Comparisons above, run last block first: a block
    that writes past its own part (the lse of row T, which is the next head's row 0; sum_rows'
    columns past C, the next group's) is overwritten by the owner in the emulator's usual order,
    first to last, and goes unseen; last to first it stays."""
    with cuda_emulator.reversed_blocks(), cuda_emulator.emulated():
        test_flash_attention_kernels_match_their_twin(np, "float32", 70, 2, 64)   # FMAs and tensor cores
        test_tensor_core_attention_rounds_only_where_it_says(np, 70, 2, 32, "float16")
        test_sum_rows_kernel_matches_its_twin(np, "float64", 300, 33)


MMA_LAYOUTS = r"""
// c (16,16) = a (16,16) . bt^T, with bt's rows read through b_from_rows; d (16,8) = c . b, with the
// accumulators c read through F::a_from_accumulators and b (16,8) through F::b_from_columns:
// mma.sync's fragment layouts of operand format F
template <class F>
__device__ void mma_layouts(const float* a, const float* bt, const float* b, float* c, float* d) {
    __shared__ Tile<F, 16> rows;
    __shared__ Tile<F, 8> columns;
    unsigned af[16 / F::K][4], bf[2], pf[4];
    load_a_fragments<F, 16>(af, a, 16, 0, 16, 1.0f);
    load_tile<F, 16>(rows, bt, 16, 0, 16, 1.0f);
    load_tile<F, 8>(columns, b, 8, 0, 16, 1.0f);
    __syncthreads();
    float acc[F::TILE / 8][4], out[1][4] = {};
    products_with_rows<F, 16>(acc, af, rows);   // F::TILE rows: the first 16 are bt's
    store_accumulators<16>(c, 16, acc, 0, 16, 1.0f, 1.0f);
    for (int kk = 0; kk < 16 / F::K; ++kk) {
        F::a_from_accumulators(pf, acc + F::K / 8 * kk);
        F::b_from_columns(bf, columns, F::K * kk, threadIdx.x / 4);
        F::mma(out[0], pf, bf);
    }
    store_accumulators<8>(d, 8, out, 0, 16, 1.0f, 1.0f);
}
extern "C" __global__ void mma_layouts_half(const float* a, const float* bt, const float* b, float* c, float* d) {
    mma_layouts<Half>(a, bt, b, c, d);
}
extern "C" __global__ void mma_layouts_tf32(const float* a, const float* bt, const float* b, float* c, float* d) {
    mma_layouts<Tf32>(a, bt, b, c, d);
}
extern "C" __global__ void mma_layouts_tf32x3(const float* a, const float* bt, const float* b, float* c, float* d) {
    mma_layouts<Tf32x3>(a, bt, b, c, d);
}"""


@pytest.mark.parametrize("operands", kernels.TC_OPERANDS)
def test_mma_fragment_layouts(xp, operands):
    """One warp's mma.sync through the tensor-core attention's fragment helpers equals NumPy's
    products of the matrices rounded to the operand format: on a GPU this checks the helpers
    against the hardware's layout (PTX's table), under the emulator against the emulator's reading
    of it."""
    source = kernels.source("float32") + MMA_LAYOUTS
    name = "mma_layouts_" + kernels.TC_OPERANDS[operands]
    if xp is np:
        kernel = cuda_emulator.kernel_from(source, name)
    else:
        import cupy
        tensor_cores_or_skip(xp, 16)
        kernel = cupy.RawModule(code=source).get_function(name)
    rng = np.random.default_rng(0)
    a, bt, b = (rng.standard_normal(shape).astype(np.float32) for shape in [(16, 16), (16, 16), (16, 8)])
    c, d = xp.zeros((16, 16), dtype=np.float32), xp.zeros((16, 8), dtype=np.float32)
    kernel((1,), (32,), tuple(xp.asarray(m) for m in (a, bt, b)) + (c, d))
    rounded = ROUNDED[operands]
    c_ref = rounded(a) @ rounded(bt).T
    # d's reference rounds the kernel's own c, as the kernel does: rounding c_ref instead would move an
    # element of c that lies within c's float32 error of a float16 (TF32) rounding boundary by a
    # whole unit of it (2^-11, ~1e-3 in d), and a tensor core's own order and truncation of the
    # sum's terms decide which side such an element lands on, not the layouts checked here
    d_ref = rounded(to_numpy(c)) @ rounded(b)
    np.testing.assert_allclose(to_numpy(c), c_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(d), d_ref, rtol=1e-4, atol=1e-4)


TC_SHAPES = [(1, 1, 16), (5, 2, 16), (70, 2, 32), (130, 1, 64)]   # one query block or three, one key tile or three


def tensor_core_attention(xp, T, n_head, hs, operands):
    """qkv, dy (float32 NumPy), and y, dqkv of causal attention through the tensor-core kernels
    with `operands` (a key of kernels.TC_OPERANDS)."""
    tensor_cores_or_skip(xp, hs)
    C = n_head * hs
    qkv, dy = random(np, (2, T, 3 * C), "float32", 0), random(np, (2, T, C), "float32", 1)
    with tensor_core_matmuls(xp, operands):
        y, cache = causal_attention_forward(xp.asarray(qkv), n_head)
        assert isinstance(cache, FlashCache) and cache.operands == operands   # tensor cores ran
        dqkv = causal_attention_backward(xp.asarray(dy), cache)
    assert y.dtype == dqkv.dtype == np.float32
    return qkv, dy, y, dqkv


# the bound of the test below, for each operand format
TC_ERROR = {"float16": 1e-3, "tf32": 1e-3, "float32": 1e-5}


@pytest.mark.parametrize("operands", kernels.TC_OPERANDS)
@pytest.mark.parametrize("T, n_head, hs", TC_SHAPES)
def test_tensor_core_attention_is_as_close_to_float64_as_its_operands_allow(xp, T, n_head, hs, operands):
    """Under fp16 matmuls (or TF32) the attention kernels run on tensor cores with float16 (TF32)
    operands. Their output and gradient stay within that rounding of the float64 result
    (measured: at most 5e-4 relative, less than the twin's float16 matmuls err, which also round
    the scores; TF32 keeps float16's 10 mantissa bits). In float32 (three TF32 products) they stay
    within float32's: at most 5.5e-7 measured under the emulator, where the FMA kernels err by up
    to 3.1e-7, and leaving out one of the three products 3.7e-4."""
    qkv, dy, y, dqkv = tensor_core_attention(xp, T, n_head, hs, operands)
    with kernels.disabled():
        y64, cache64 = causal_attention_forward(qkv.astype(np.float64), n_head)
        dqkv64 = causal_attention_backward(dy.astype(np.float64), cache64)
    assert relative_error(y, y64) < TC_ERROR[operands]
    assert relative_error(dqkv, dqkv64) < TC_ERROR[operands]


TC_ROUNDINGS = ("q", "k", "v", "dy", "P", "P for dv", "dS")


def tensor_core_reference(qkv, dy, n_head, operands, unrounded=()):
    """y (B,T,C), dqkv (B,T,3C) of causal attention in float64, rounded to `operands` (float16 or
    TF32) exactly where the tensor-core kernels round (TC_ROUNDINGS, less those named in
    `unrounded`: negative controls):
    q scale (multiplied in float32), k, v and dy; the probabilities P of the forward's key tiles,
    each exp(s - m) with m the running max after that tile; the backward's P = exp(s - lse) for dv
    and dS = P (dP - D) for dq and dk. Everything else (the scores, the sums, the softmax) is
    float64 here and float32 there."""
    rounded = lambda name, x: x if name in unrounded else ROUNDED[operands](x)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = np.float32(1.0 / np.sqrt(hs))
    heads = lambda a: a.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)                  # (B,nh,T,hs)
    merge = lambda a: a.transpose(0, 2, 1, 3).reshape(B, T, C)
    q, k, v = (rounded(name, part) for name, part in [("q", heads(qkv[..., :C]) * scale),
                                                      ("k", heads(qkv[..., C:2 * C])), ("v", heads(qkv[..., 2 * C:]))])
    s = np.where(np.tril(np.ones((T, T), bool)), q @ k.swapaxes(-1, -2), -np.inf)         # (B,nh,T,T)
    m, l = np.full(s.shape[:-1], -np.inf), np.zeros(s.shape[:-1])
    acc = np.zeros(q.shape)
    # the key tiles (Half's and Tf32's TILE = MMA_ROWS), online softmax
    for start in range(0, T, kernels.TC_ROWS):
        tile = s[..., start:start + kernels.TC_ROWS]
        m_new = np.maximum(m, tile.max(-1))
        p = np.exp(tile - m_new[..., None])
        rescale = np.exp(m - m_new)
        l = l * rescale + p.sum(-1)
        acc = acc * rescale[..., None] + rounded("P", p) @ v[..., start:start + kernels.TC_ROWS, :]
        m = m_new
    y = acc / l[..., None]
    lse = m + np.log(l)
    g = heads(dy.astype(np.float64))
    D = (g * y).sum(-1, keepdims=True)        # from dy and y before any rounding
    g = rounded("dy", g)
    p = np.exp(s - lse[..., None])
    ds = rounded("dS", p * (g @ v.swapaxes(-1, -2) - D))
    dq, dk, dv = ds @ k * float(scale), ds.swapaxes(-1, -2) @ q, rounded("P for dv", p).swapaxes(-1, -2) @ g
    return merge(y), np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)


@pytest.mark.parametrize("operands", ROUNDING_FORMATS)
@pytest.mark.parametrize("T, n_head, hs", TC_SHAPES)
def test_tensor_core_attention_rounds_only_where_it_says(xp, T, n_head, hs, operands, unrounded=()):
    """The same output and gradient within 7e-5 of tensor_core_reference, which rounds where the
    kernels do (measured: at most 1.0e-5 under the emulator, 5.4e-5 on an H100, whose MMAs add in
    their own order; the kernels differ from float64 by 5e-4, and leaving out any one rounding
    moves the reference 0.9-3.6e-4 where T > 1). What is left is float32 arithmetic that moves a
    few values across a float16 rounding boundary."""
    qkv, dy, y, dqkv = tensor_core_attention(xp, T, n_head, hs, operands)
    y_ref, dqkv_ref = tensor_core_reference(qkv, dy, n_head, operands, unrounded)
    assert relative_error(y, y_ref) < 7e-5
    assert relative_error(dqkv, dqkv_ref) < 7e-5


@needs_compiler
@pytest.mark.parametrize("operands", ROUNDING_FORMATS)
@pytest.mark.parametrize("rounding", TC_ROUNDINGS)
def test_the_rounding_comparison_sees_each_rounding(rounding, operands):
    """Negative controls: against a reference that leaves out any one of the kernels' roundings to
    float16 or TF32, the comparison above fails (at this shape each moves the output or the
    gradient by at least 1.4e-4)."""
    with cuda_emulator.emulated(), pytest.raises(AssertionError):
        test_tensor_core_attention_rounds_only_where_it_says(np, 130, 1, 64, operands, unrounded=(rounding,))


TC_FORMATS = tuple(kernels.TC_OPERANDS)
TC_MUTATIONS = [   # (the operand formats whose kernels it breaks, code, wrong code)
    (TC_FORMATS, "if (key > row || key >= T) s[n][i] = minus_infinity();",
     "if (key > row + 1 || key >= T) s[n][i] = minus_infinity();"),                        # sees one key too many
    (TC_FORMATS, "acc[n][2 * r] *= rescale; acc[n][2 * r + 1] *= rescale;", ""),          # forgets the online rescale
    (TC_FORMATS, "b[0] = tile[n0 + g][k0 / F::PER_WORD + t];",
     "b[0] = tile[n0 + t][k0 / F::PER_WORD + g];"),                                       # B's lanes transposed
    (TC_FORMATS, "exp(s[n][i] - L[i / 2]) * (dp[n][i] - Dr[i / 2])",
     "exp(s[n][i] - L[i / 2]) * dp[n][i]"),                                                # dq without D
    (TC_FORMATS, "bool masked = start + query < key ||",
     "bool masked = start + query < key - 1 ||"),                                          # dk, dv see one more
    (("float16",), "a[1] = pack_half2(p[0][2], p[0][3]);\n        a[2] = pack_half2(p[1][0], p[1][1]);",
     "a[2] = pack_half2(p[0][2], p[0][3]);\n        a[1] = pack_half2(p[1][0], p[1][1]);"),      # P's A fragment
    (("tf32", "float32"), "a[1] = Self::operand(p[0][2]);\n        a[2] = Self::operand(p[0][1]);",
     # P's A fragment without the reordered keys
     "a[1] = Self::operand(p[0][1]);\n        a[2] = Self::operand(p[0][2]);"),
    (("tf32", "float32"), "b[0] = tile[k0 + 2 * t][col];\n        b[1] = tile[k0 + 2 * t + 1][col];",
     "b[0] = tile[k0 + t][col];\n        b[1] = tile[k0 + t + 4][col];"),    # V's B fragment without them
    (("float32",), "mma_sync<K>(c, a_big, b_small);", ""),                   # two TF32 products of three
    (("float32",), "split<4>(a, a_big, a_small);", "split<4>(a, a_big, a_small); a_big[0] = a[0];"),  # one not split
]
TC_CHECKS = [(check, operands, mutation) for formats, *mutation in TC_MUTATIONS for operands in formats
             for check in [test_tensor_core_attention_is_as_close_to_float64_as_its_operands_allow,
                           test_tensor_core_attention_rounds_only_where_it_says]
             if operands in ROUNDING_FORMATS
             or check is test_tensor_core_attention_is_as_close_to_float64_as_its_operands_allow]


@needs_compiler
@pytest.mark.parametrize("check, operands, mutation", TC_CHECKS)
def test_the_tensor_core_attention_comparisons_catch_a_wrong_kernel(monkeypatch, check, operands, mutation):
    """Negative controls: each wrong tensor-core kernel fails both comparisons above (the fragment
    layouts' too: the emulator computes what PTX's layout says, not what the helpers assume)."""
    assert kernels.SOURCE.count(mutation[0]) == 1
    monkeypatch.setattr(kernels, "SOURCE", kernels.SOURCE.replace(*mutation))
    with cuda_emulator.emulated(), pytest.raises(AssertionError):
        check(np, 130, 1, 64, operands)


@pytest.mark.parametrize("operands", ROUNDING_FORMATS)
def test_a_reduced_precision_step_with_every_kernel_stays_as_close_to_float32_as_the_twins(xp, monkeypatch, operands):
    """A small GPT under fp16 matmuls and a loss scale (or under TF32), with every kernel on
    (attention on tensor cores): loss and gradients as close to float32's as the twins' step is
    (measured: every gradient within 0.07% of float32's, both ways). Under the emulator the twins'
    TF32 step is float32's itself (NumPy has no TF32), and the bound 0.2%."""
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    tensor_cores_or_skip(xp, 16)
    idx = np.random.default_rng(0).integers(0, 64, (4, 17))
    backend = "cupy" if xp is not np else "numpy"
    used = []   # the attention kernels' operand formats
    forward = kernels.flash_attention_forward
    monkeypatch.setattr(kernels, "flash_attention_forward", lambda *args: used.append(args[-1]) or forward(*args))
    matmul_dtype, loss_scale = ("float16", 2.0 ** 12) if operands == "float16" else (None, 1.0)
    results = {}
    for name, reduced, kernels_on in [("float32", False, False), ("twins", True, False), ("kernels", True, True)]:
        with contextlib.ExitStack() as stack:
            if not kernels_on:
                stack.enter_context(kernels.disabled())
            if reduced and operands == "tf32":
                stack.enter_context(tensor_core_matmuls(xp, "tf32"))
            model = GPT(config, backend=backend, seed=3, matmul_dtype=matmul_dtype if reduced else None)
            _, loss = model.forward(idx[:, :-1], idx[:, 1:], return_logits=False, loss_scale=loss_scale)
            results[name] = loss, {name: to_numpy(g) for name, g in model.backward().items()}
    assert used == [operands, operands]   # both layers' attention, in the kernels' step only
    (ref_loss, ref), (twin_loss, twin), (loss, grads) = results["float32"], results["twins"], results["kernels"]
    assert loss == pytest.approx(ref_loss, rel=1e-3) and twin_loss == pytest.approx(ref_loss, rel=1e-3)
    for name in ref:
        assert relative_error(grads[name], ref[name]) < 2 * max(relative_error(twin[name], ref[name]), 1e-3), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 300, 1000])
@pytest.mark.parametrize("overwrite", [False, True])
def test_softmax_parts_kernel_matches_its_twin(xp, dtype, V, overwrite):
    """The cross-entropy's fused max/exp/sum: loss, exps and row sums as the twin's, in place or not,
    for rows shorter and longer than a block and logits large enough to overflow an unshifted exp."""
    logits = random(xp, (6, V), dtype, 0, 40.0)
    targets = xp.asarray([0, V - 1, IGNORE_INDEX, V // 2, 0, V // 3])
    fused, twin = fused_and_twin(lambda a: cross_entropy_forward(a, targets, overwrite=overwrite), logits)
    assert_same(fused[0], twin[0], dtype)                  # the loss
    for a, t in zip(fused[1][:2], twin[1][:2]):            # exps, sumexp
        assert_same(a, t, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exps_dtype", [None, "float16"])
def test_softmax_parts_kernel_takes_logits_of_minus_infinity_as_the_twin_does(xp, dtype, exps_dtype):
    """A logit of -inf (a token ruled out) weighs exp(-inf) = 0, as in the twin, which subtracts a
    finite row max. The kernel's running max starts at the row's first logit, and each of a block's
    threads keeps its own: where that was -inf, exp(-inf - -inf) made the whole row nan. Rows: -inf
    in column 0 only; in every column but the target's (so most threads see nothing else); in the
    first 600 of 1000. A row of nothing but -inf is nan in both (0/0)."""
    if exps_dtype is not None and dtype != "float32":
        pytest.skip("float16 exps come from float32 logits")
    V = 1000
    logits = to_numpy(random(xp, (3, V), "float64", 0, 3.0))
    logits[0, 0] = logits[1, np.arange(V) != 700] = logits[2, :600] = -np.inf
    logits, targets = xp.asarray(logits, dtype=dtype), xp.asarray([1, 700, V - 1])
    with np.errstate(invalid="ignore"):
        fused, twin = fused_and_twin(lambda a: cross_entropy_forward(a, targets, exps_dtype=exps_dtype), logits)
    assert np.isfinite(to_numpy(fused[0])), "the loss is nan where the twin's is not"
    assert_same(fused[0], twin[0], dtype)                  # the loss
    exps, sumexp = (to_numpy(a).astype(np.float64) for a in fused[1][:2])
    exps_twin, sumexp_twin = (to_numpy(a).astype(np.float64) for a in twin[1][:2])
    assert_same(sumexp, sumexp_twin, dtype)
    # float16 exps: each the float32 one rounded once, which may land one float16 unit (2^-10) apart
    np.testing.assert_allclose(exps, exps_twin, rtol=TOLERANCE[dtype] if exps_dtype is None else 2 ** -10, atol=0)
    nothing = xp.full((1, V), -np.inf, dtype=dtype)
    with np.errstate(invalid="ignore", divide="ignore"):   # log(0 = the sum of exps), then 0/0
        fused, twin = fused_and_twin(lambda a: cross_entropy_forward(a, xp.asarray([3]))[0], nothing)
    assert np.isnan(to_numpy(fused)) and np.isnan(to_numpy(twin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_classifier_with_the_kernel_matches_its_twin(xp, dtype, monkeypatch):
    """The chunked classifier (three chunks) gives the same loss and gradients with the fused kernel
    as with its twin, which skips the max by the logits' bound: the two shift differently."""
    import numgpt.layers.classifier as classifier
    monkeypatch.setattr(classifier, "CHUNK_ELEMENTS", dict.fromkeys(classifier.CHUNK_ELEMENTS, 3 * 300))
    x, w = random(xp, (8, 16), dtype, 0), random(xp, (300, 16), dtype, 1)
    targets = xp.asarray([3, 299, IGNORE_INDEX, 0, 3, 150, 7, 8])
    fused, twin = fused_and_twin(lambda a: classifier_forward(a, w, targets, return_logits=True), x)
    for a, t in [(fused[0], twin[0]), (fused[1], twin[1]), *zip(fused[2], twin[2])]:   # loss, logits, dx, dw
        assert_same(a, t, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_a_training_step_and_generation_with_every_kernel_match_the_twins(xp, dtype, bias):
    """A small GPT end to end: loss, every gradient (unscaled from a loss scale, then clipped),
    the parameters after an AdamW step and the tokens generated with a KV cache are the same with
    the kernels on as with them off. Both AdamW steps take the twins' gradients: a first step moves
    each parameter by lr * g / (|g| + eps), about lr * sign(g), so where g is within rounding of 0
    the two gradients' last bits would decide the step, and the comparison would be of those."""
    config = GPTConfig(vocab_size=300, block_size=12, n_layer=2, n_head=2, n_embd=32, bias=bias)
    idx = np.random.default_rng(0).integers(0, 300, (2, 12))
    results = []
    for use_kernels in (False, True):
        with contextlib.nullcontext() if use_kernels else kernels.disabled():
            model = GPT(config, backend="cupy" if xp is not np else "numpy", dtype=dtype, seed=0)
            _, loss = model.forward(idx[:, :-1], idx[:, 1:], return_logits=False, loss_scale=8.0)
            grads = {name: g.copy() for name, g in model.backward().items()}
            norm = clip_grad_norm(grads, 0.1)
            AdamW(model.params, lr=1e-2, weight_decay=0.1).step(results[0][2] if use_kernels else grads)
            tokens = model.generate(idx[:, :3], 5, top_k=1)
        results.append((loss, norm, grads, dict(model.params), tokens))
    (loss_twin, norm_twin, grads_twin, params_twin, tokens_twin), (loss, norm, grads, params, tokens) = results
    np.testing.assert_allclose([loss, norm], [loss_twin, norm_twin], rtol=TOLERANCE[dtype])
    for name in grads_twin:
        assert_same(grads[name], grads_twin[name], dtype)
        assert_same(params[name], params_twin[name], dtype)
    assert np.array_equal(to_numpy(tokens), to_numpy(tokens_twin))


@needs_compiler
def test_the_emulator_catches_a_wrong_kernel(monkeypatch):
    """Negative control: a warp sum that adds only 16 of the 32 lanes makes layernorm wrong, and the
    twin comparison says so (so the emulator really runs lanes apart and exchanges their values)."""
    x = random(np, (3, 100), "float64", 0)
    w = random(np, (100,), "float64", 1)
    with cuda_emulator.emulated():
        fused, twin = fused_and_twin(lambda a: layernorm_forward(a, w, None)[0], x)
        assert_same(fused, twin, "float64")
        monkeypatch.setattr(kernels, "SOURCE", kernels.SOURCE.replace("int offset = 16", "int offset = 8"))
        broken, _ = fused_and_twin(lambda a: layernorm_forward(a, w, None)[0], x)
    with pytest.raises(AssertionError):
        assert_same(broken, twin, "float64")


@needs_compiler
def test_the_emulator_checks_each_argument_against_the_signature():
    """A 64-bit integer where the kernel takes an int would be read as garbage on a GPU: refused here."""
    x = np.zeros((2, 8), dtype=np.float32)
    kernel = cuda_emulator.emulated_kernel("layernorm_dx", "float32")
    good = (x, x, x[:, :1].copy(), x[0].copy(), x.copy(), np.int32(2), np.int32(8))
    kernel((2,), (kernels.WARP,), good)
    with pytest.raises(TypeError, match="N: wants a int32"):
        kernel((2,), (kernels.WARP,), good[:5] + (np.int64(2), np.int32(8)))
    with pytest.raises(TypeError, match="dy: wants a C-contiguous float32 array"):
        kernel((2,), (kernels.WARP,), (x.astype(np.float64),) + good[1:])


@needs_compiler
def test_the_emulator_reports_a_barrier_that_some_threads_skip():
    """Half a warp waiting at __syncthreads() while the other half waits in a shuffle hangs a GPU:
    here it is an error."""
    source = kernels.source("float32") + r"""
extern "C" __global__ void half_sync(REAL* x) {
    if (threadIdx.x < 16) __syncthreads();
    else x[threadIdx.x] = __shfl_xor_sync(0xffffffff, x[threadIdx.x], 1);
}
extern "C" __global__ void warp_total(REAL* x) { x[threadIdx.x] = warp_sum(x[threadIdx.x]); }"""
    kernel = cuda_emulator.kernel_from(source, "half_sync")
    with pytest.raises(RuntimeError, match="deadlocked"):
        kernel((1,), (32,), (np.zeros(32, dtype=np.float32),))
    # the threads left waiting there start afresh at the next launch, on the same fibers
    x = np.arange(32, dtype=np.float32)
    cuda_emulator.kernel_from(source, "warp_total")((1,), (32,), (x,))
    np.testing.assert_array_equal(x, np.full(32, 496.0))


@needs_compiler
def test_the_emulator_reports_an_mma_without_a_whole_warp():
    """mma.sync reads every lane's fragments: with half the warp gone it would use stale ones."""
    source = kernels.source("float32") + r"""
extern "C" __global__ void half_warp_mma(REAL* x) {
    if (threadIdx.x >= 16) return;
    float c[4] = {};
    unsigned a[4] = {}, b[2] = {};
    Half::mma(c, a, b);
    x[threadIdx.x] = c[0];
}"""
    kernel = cuda_emulator.kernel_from(source, "half_warp_mma")
    with pytest.raises(RuntimeError, match="mma.sync without a whole warp"):
        kernel((1,), (32,), (np.zeros(32, dtype=np.float32),))


@needs_compiler
@pytest.mark.parametrize("grid, block", [((0,), (32,)), ((1, 65536), (32,)), ((1, 1, 65536), (32,)),
                                         ((1,), (32, 1, 65)), ((1,), (2048,))])
def test_the_emulator_refuses_a_launch_a_gpu_refuses(grid, block):
    """An empty grid, grid.y or grid.z over 65535, block.z over 64 or more than 1024 threads a block:
    cudaErrorInvalidConfiguration on a GPU (an empty grid is not a launch of nothing there), here an
    error too, so a wrapper that launches one for some shape fails on the CPU first."""
    kernel = cuda_emulator.emulated_kernel("scale_chunks", "float32")
    with pytest.raises(RuntimeError, match="a GPU refuses"):
        kernel(grid, block, (np.zeros((1, 3), dtype=np.int64), np.float32(1)))


@needs_compiler
@pytest.mark.parametrize("barrier", ["__syncthreads();", ""])
def test_the_emulator_exposes_a_missing_barrier(barrier):
    """Each thread reads its neighbour's shared-memory slot: right with the barrier between write
    and read, stale data without it (the control), as on a GPU whose warps run apart."""
    source = kernels.source("float32") + r"""
extern "C" __global__ void rotate(const REAL* x, REAL* y) {
    __shared__ REAL slots[64];
    slots[threadIdx.x] = x[threadIdx.x];
    BARRIER
    y[threadIdx.x] = slots[(threadIdx.x + 1) % 64];
}""".replace("BARRIER", barrier)
    kernel = cuda_emulator.kernel_from(source, "rotate")
    for seed in range(2):
        x, y = random(np, (64,), "float32", seed), np.zeros(64, dtype=np.float32)
        kernel((1,), (64,), (x, y))
        assert np.array_equal(y, np.roll(x, -1)) == bool(barrier)


@needs_compiler
@pytest.mark.parametrize("barrier", ["__syncthreads();", ""])
def test_the_emulator_exposes_a_tile_overwritten_before_every_warp_read_it(barrier):
    """A loop that refills a shared tile needs a barrier at its top too, or a warp that runs ahead
    overwrites what another warp has still to read. Warp shuffles between the reads keep each
    warp's lanes together but not the warps: the emulator runs one warp ahead (the control fails)."""
    source = kernels.source("float32") + r"""
extern "C" __global__ void two_tiles(const REAL* x, REAL* y) {
    __shared__ REAL tile[64];
    for (int start = 0; start < 128; start += 64) {
        BARRIER
        tile[threadIdx.x] = x[start + threadIdx.x];
        __syncthreads();
        REAL other = warp_sum(tile[(threadIdx.x + 32) % 64]);   // the other warp's half, summed
        y[start + threadIdx.x] = other;
    }
}""".replace("BARRIER", barrier)
    kernel = cuda_emulator.kernel_from(source, "two_tiles")
    x, y = random(np, (128,), "float32", 0), np.zeros(128, dtype=np.float32)
    kernel((1,), (64,), (x, y))
    halves = x.reshape(2, 2, 32).sum(-1, dtype=np.float64)              # (tile, warp)
    expected = np.repeat(halves[:, ::-1], 32, axis=1).reshape(128)   # each warp sums the other's half
    assert np.allclose(y, expected, rtol=1e-5) == bool(barrier)


def barrier_offsets(text):
    """Where `text` calls __syncthreads() (outside // comments)."""
    return [m.start() for m in re.finditer(r"__syncthreads\(\);", text)
            if "//" not in text[text.rfind("\n", 0, m.start()) + 1:m.start()]]


ATTENTION_FILES = {
    "flash_attention.cu": lambda: test_flash_attention_kernels_match_their_twin(np, "float32", 130, 1, 17),
    "tensor_core_attention.cu": lambda: test_tensor_core_attention_rounds_only_where_it_says(np, 130, 1, 64, "float16"),
}


@needs_compiler
@pytest.mark.parametrize("file, barrier", [(file, i) for file in ATTENTION_FILES
                                           for i in range(len(barrier_offsets((kernels.CUDA_DIR / file).read_text())))])
def test_every_barrier_of_the_attention_kernels_is_needed(monkeypatch, file, barrier):
    """Negative controls: without any one of the attention kernels' barriers their comparison
    fails, under the emulator: a warp reads a tile before the others have filled it, or refills it
    before they are done with it."""
    text = (kernels.CUDA_DIR / file).read_text()
    offset = kernels.SOURCE.index(text) + barrier_offsets(text)[barrier]
    monkeypatch.setattr(kernels, "SOURCE", kernels.SOURCE[:offset] + kernels.SOURCE[offset + len("__syncthreads();"):])
    with cuda_emulator.emulated(), pytest.raises(AssertionError):
        ATTENTION_FILES[file]()
