"""The CuPy stand-in refuses what CuPy refuses: otherwise the CuPy runs of the other tests would
prove nothing about the GPU path. Each rule is shown failing on the mistake it exists to catch."""

import copy
import importlib

import numpy as np
import pytest

import cupy_standin
import numgpt.backend
import numgpt.model
from numgpt import GPT, GPTConfig, kernels
from numgpt.backend import to_device, to_numpy
from numgpt.layers.activations import gelu_forward

pytestmark = cupy_standin.needs_compiler


@pytest.fixture
def cp(monkeypatch):
    cupy_standin.install(monkeypatch)
    return cupy_standin.cupy


def test_no_implicit_conversion_to_numpy(cp):
    x = cp.arange(3.0)
    for implicit in (np.asarray, np.array, lambda a: np.float64(1.0) * np.ones(3) + a):
        with pytest.raises(TypeError):
            implicit(x)
    np.testing.assert_array_equal(x.get(), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(cp.asnumpy(x), [0.0, 1.0, 2.0])
    assert cupy_standin.transfers["to_host"] == 2


def test_no_mixing_with_numpy_arrays(cp):
    x, host = cp.ones(3), np.ones(3)
    for mixed in (lambda: x + host, lambda: host * x, lambda: cp.exp(host), lambda: cp.concatenate([x, host]),
                  lambda: cp.matmul(x, host), lambda: x.__setitem__(slice(None), host),
                  lambda: x.__setitem__(Ellipsis, [1.0, 2.0, 3.0]), lambda: x.set(host.astype(np.float32))):
        with pytest.raises((TypeError, ValueError)):
            mixed()
    assert float((x + np.float32(2.0) + 1).sum()) == 12.0    # scalars are fine, a 0-d NumPy array too
    x[...] = np.array(5.0)
    x[:] = cp.asarray(host) * 2                               # an explicit copy is fine
    assert x.tolist() == [2.0, 2.0, 2.0]


def test_device_and_host_never_share_memory(cp):
    host = np.ones(3)
    x = cp.asarray(host)
    x += 1
    y = copy.copy(x)
    y += 1
    assert host.tolist() == [1.0, 1.0, 1.0] and x.tolist() == [2.0, 2.0, 2.0]


def test_results_stay_on_the_device(cp):
    x = cp.arange(6.0).reshape(2, 3)
    for result in (x.sum(), x[1, 2], cp.max(x), np.sum(x), x.mean(axis=None)):
        assert isinstance(result, cp.ndarray) and result.shape == ()
    with pytest.raises(TypeError):
        list(range(10))[x.argmax()]                          # a 0-d array is not an index
    assert int(x.argmax()) == 5


def test_only_what_cupy_has(cp):
    x = cp.arange(4.0)
    for numpy_only in (lambda: cp.insert, lambda: x.resize, lambda: x.setflags, lambda: np.spacing(x),
                       lambda: np.isnat(x), lambda: cp.sum(x, where=x > 1), lambda: cp.max(x, initial=0.0),
                       lambda: cp.exp(x, where=x > 1), lambda: x.sort(kind="quicksort")):
        with pytest.raises((AttributeError, TypeError)):
            numpy_only()
    cp.copyto(x, 0.0, where=x > 1)                           # copyto does take `where`
    assert x.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert cp.get_array_module(cp.ones(1)) is cp and cp.get_array_module(np.ones(1)) is np


def test_kernels_run_on_stand_in_arrays(cp, monkeypatch):
    x = cp.asarray(np.linspace(-3.0, 3.0, 1000, dtype=np.float32))
    launched, kernel = [], kernels._kernel
    monkeypatch.setattr(kernels, "_kernel", lambda name, dtype: launched.append(name) or kernel(name, dtype))
    y, _ = gelu_forward(x)                                   # through the kernel: arrays of the stand-in
    assert isinstance(y, cp.ndarray) and launched == ["gelu_forward"]
    with kernels.disabled():
        twin, _ = gelu_forward(x)
    np.testing.assert_allclose(y.get(), twin.get(), rtol=2e-6, atol=1e-7)
    with pytest.raises(TypeError):
        kernels._kernel("gelu_forward", np.float32)((1,), (256,), (np.ones(4, np.float32), x, np.int64(4)))


def test_the_stand_in_catches_a_host_conversion_in_library_code(cp, monkeypatch, tmp_path):
    """Negative control: save_pretrained with np.asarray where to_numpy belongs fails on CuPy."""
    model = GPT(GPTConfig(vocab_size=32, block_size=4, n_layer=1, n_head=1, n_embd=4), backend="cupy")
    model.save_pretrained(tmp_path / "good")
    monkeypatch.setattr(numgpt.model, "to_numpy", np.asarray)
    with pytest.raises(TypeError, match="Implicit conversion"):
        model.save_pretrained(tmp_path / "bad")


def test_transfers_are_counted(cp):
    x = to_device(np.ones(4), cp)
    assert cupy_standin.transfers == {"to_device": 1}
    x[np.array([0, 2])] = 0.0                               # a host index array is copied over too
    assert cupy_standin.transfers == {"to_device": 2}
    assert to_numpy(x).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert cupy_standin.transfers == {"to_device": 2, "to_host": 1}
    x[x > 0.5], cp.nonzero(x), cp.unique_counts(x)          # sized by the data: the host waits for a count
    x[x > 0.5] = 2.0
    assert cupy_standin.transfers == {"to_device": 2, "to_host": 5}
    assert f"{x.sum():.1f}" == "4.0" and cupy_standin.transfers["to_host"] == 6
    assert isinstance(cp.allclose(x, x), cp.ndarray)        # a 0-d array, as on CuPy: reading it is a read
    assert numgpt.backend.cupy_available()


NCCL_NUMBERS = ("NCCL_FLOAT32", "NCCL_FLOAT64", "NCCL_SUM")


def test_the_stand_in_names_only_what_cupy_has():
    """Where CuPy is installed (a GPU is not needed for this), the stand-in's lists are checked
    against it: a function, method or setting that the stand-in has and CuPy lacks would let code
    pass here that fails on a GPU."""
    cupy = pytest.importorskip("cupy")
    from cupy._core import _routines_linalg

    assert not {name for name in cupy_standin.FUNCTIONS | cupy_standin.SHARED if not hasattr(cupy, name)}
    assert not {name for name in cupy_standin.METHODS if not hasattr(cupy.ndarray, name)}
    assert not {name for name in cupy_standin.GENERATOR_METHODS if not hasattr(cupy.random.Generator, name)}
    for name in ("COMPUTE_TYPE_DEFAULT", "COMPUTE_TYPE_TF32"):
        assert getattr(cupy_standin._linalg, name) == getattr(_routines_linalg, name)
    for name, module in cupy_standin.MODULES.items():                 # cupy.cuda.Device, cupyx.scatter_add, ...
        real = importlib.import_module(name)
        if name == "cupy.cuda.nccl":
            if not real.available:
                continue   # CuPy defines NCCL's names only where it finds the library (pip install nvidia-nccl-cu12)
            assert [getattr(module, a) for a in NCCL_NUMBERS] == [getattr(real, a) for a in NCCL_NUMBERS]
        assert not {a for a in vars(module) if not a.startswith("_") and not hasattr(real, a)}, name
