"""Shared fixtures: every test that takes `xp` runs on NumPy and on CuPy (a stand-in where there is no GPU)."""

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import cupy_standin
from numgpt import precision
from numgpt.backend import cupy_available, get_xp

# train.py and sample.py live at the repository root, beside the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The default profile draws 25 new examples per test each run; `HYPOTHESIS_PROFILE=thorough`
# draws 300. CI's profile draws the same 25 every time (derandomize): a gate that a new random
# draw can close turns a bug found by chance into lost work, while runs here keep searching.
HYPOTHESIS_SETTINGS = dict(deadline=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("default", max_examples=25, **HYPOTHESIS_SETTINGS)
settings.register_profile("ci", max_examples=25, derandomize=True, **HYPOTHESIS_SETTINGS)
settings.register_profile("thorough", max_examples=300, **HYPOTHESIS_SETTINGS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# "cupy" runs on the GPU where there is one, else on tests/cupy_standin.py: CuPy's rules on NumPy
# arrays, with the CUDA kernels run by tests/cuda_emulator.py (so it needs a C++ compiler)
GPU = cupy_available()
BACKENDS = ["numpy", pytest.param("cupy", id="cupy" if GPU else "cupy-standin",
                                   marks=[] if GPU else cupy_standin.needs_compiler)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend name, "numpy" or "cupy"."""
    with pytest.MonkeyPatch.context() as patch:   # its own: a test's monkeypatch.undo() leaves it
        if request.param == "cupy" and not GPU:
            cupy_standin.install(patch)
        yield request.param


@pytest.fixture
def xp(backend):
    """The array module of the backend under test."""
    return get_xp(backend)


@pytest.fixture(autouse=True)
def tf32_off_after_each_test():
    """set_tf32(xp, True) holds for the process (train.py --precision tf32 and the benchmarks turn it
    on): off again after each test, or the matmuls and attention kernels of later tests would round
    to TF32 too."""
    yield
    if precision.tensor_core_operands() == "tf32":
        if GPU:
            precision.set_tf32(get_xp("cupy"), False)
        else:
            precision._tf32 = False   # the stand-in's CuPy, and its setting, left with its test
