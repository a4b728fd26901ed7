"""The fused CUDA kernels against their twins, the layers' NumPy-style code run on the same GPU.

Everything here but the compile check needs CuPy and a GPU and skips without them. The compile
check needs only NVRTC (from a CuPy install), so kernel source errors show up on a machine without
a GPU too. The gradient checks of tests/test_layers.py and tests/test_model.py run on CuPy with
the kernels on, so the kernels' float64 derivatives are checked by finite differences as well.
"""

import numpy as np
import pytest

from numgpt import AdamW, kernels
from numgpt.backend import cupy_available, get_xp, to_numpy
from numgpt.layers.activations import gelu_backward, gelu_forward
from numgpt.layers.attention import causal_softmax, softmax_backward
from numgpt.layers.layernorm import layernorm_backward, layernorm_forward

gpu = pytest.mark.skipif(not cupy_available(), reason="CuPy with a GPU is not available")
DTYPES = ["float32", "float64"]
TOLERANCE = {"float32": 2e-5, "float64": 1e-12}


def nvrtc_or_skip():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:   # no CuPy, or no NVRTC library
        pytest.skip(f"NVRTC is not available: {e}")
    return nvrtc


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_compile(dtype):
    nvrtc = nvrtc_or_skip()
    program = nvrtc.createProgram(kernels.source(dtype), "numgpt_kernels.cu", [], [])
    try:
        nvrtc.compileProgram(program, ["--gpu-architecture=compute_80"])   # the dialect CuPy uses: NVRTC's default
    except Exception:
        pytest.fail(nvrtc.getProgramLog(program))


def fused_and_twin(fn, *args):
    """fn(*args) with the kernels on and off, as NumPy; the arguments are copied for each call
    (some functions work in place)."""
    fused = fn(*(a.copy() if hasattr(a, "copy") else a for a in args))
    with kernels.disabled():
        twin = fn(*(a.copy() if hasattr(a, "copy") else a for a in args))
    return fused, twin


def assert_same(fused, twin, dtype):
    fused, twin = to_numpy(fused), to_numpy(twin)
    assert fused.dtype == twin.dtype and fused.shape == twin.shape
    np.testing.assert_allclose(fused, twin, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def random(cp, shape, dtype, seed=0, scale=1.0):
    return cp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype=dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_kernels_match_their_twin(dtype):
    cp = get_xp("cupy")
    x, dy = random(cp, (3, 5, 67), dtype, 0, 3.0), random(cp, (3, 5, 67), dtype, 1)
    fused, twin = fused_and_twin(lambda a: gelu_forward(a)[0], x)
    assert_same(fused, twin, dtype)
    fused, twin = fused_and_twin(gelu_backward, dy, x)
    assert_same(fused, twin, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 7, 32, 100, 768])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_kernels_match_their_twin(dtype, C, bias):
    cp = get_xp("cupy")
    x = random(cp, (2, 9, C), dtype, 0) + 5.0       # a large mean: the variance must not cancel
    w, dy = random(cp, (C,), dtype, 1), random(cp, (2, 9, C), dtype, 2)
    b = random(cp, (C,), dtype, 3) if bias else None
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


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tq, Tk", [(1, 1), (5, 5), (70, 70), (1, 9), (3, 40)])
def test_softmax_kernels_match_their_twin(dtype, Tq, Tk):
    cp = get_xp("cupy")
    scores, dprobs = random(cp, (2, 3, Tq, Tk), dtype, 0, 4.0), random(cp, (2, 3, Tq, Tk), dtype, 1)
    fused, twin = fused_and_twin(causal_softmax, scores)
    assert_same(fused, twin, dtype)
    fused, twin = fused_and_twin(softmax_backward, dprobs, twin)
    assert_same(fused, twin, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_kernel_matches_its_twin(dtype):
    cp = get_xp("cupy")
    results = []
    for use_kernels in (True, False):
        params = {"w": random(cp, (33, 70), dtype, 0), "b": random(cp, (70,), dtype, 1)}
        opt = AdamW(params, lr=1e-2, weight_decay=0.1, exclude_from_decay=["b"])
        for step in range(3):
            grads = {name: random(cp, p.shape, dtype, 10 + step) for name, p in params.items()}
            if use_kernels:
                opt.step(grads)
            else:
                with kernels.disabled():
                    opt.step(grads)
        results.append(params)
    for name in results[0]:
        assert_same(results[0][name], results[1][name], dtype)
