"""The array module: NumPy on the CPU, CuPy on the GPU, chosen in one place.

Layer code never imports numpy or cupy. It asks `array_module(x)` for the module `xp` that owns
its input and does all of its math through `xp`, so one implementation runs on both devices.
This file is also where dtypes are named and where arrays cross between host and device.
"""

import math
import os
import sys

import numpy as np

from numgpt.errors import ConfigError

try:  # CuPy is an optional extra: `import numgpt` must work without it.
    import cupy as _cupy
    _cupy_import_error = None
except Exception as error:  # ImportError, or a CuPy wheel that cannot find its CUDA libraries
    _cupy, _cupy_import_error = None, error

BACKENDS = ("numpy", "cupy", "auto")
DTYPES = ("float32", "float64")
# what numgpt[gpu] installs: CuPy for CUDA 12 with the CUDA libraries it loads (NVRTC, cuBLAS, ...)
CUPY_INSTALL = 'pip install "cupy-cuda12x[ctk]"'
# On the CPU, elementwise work of a dozen passes (AdamW's update, GELU's backward) runs in blocks of
# this many elements: each pass then works on blocks (256 KiB in float32) that stay in the cache,
# instead of streaming whole arrays through memory once per pass
CPU_BLOCK = 1 << 16


def cupy_problem():
    """Why CuPy cannot run numgpt on this machine, as a clause for a message (with the error behind
    it where there is one); None when it can.

    It can when CuPy imports, sees a GPU and finds NVRTC, CUDA's run-time compiler: every fused
    kernel of numgpt/cuda, and each of CuPy's own elementwise operations, is compiled by it on first
    use. A driver-only machine (no CUDA Toolkit) has a GPU but no NVRTC, unless pip brought it.
    """
    if _cupy is None:
        if isinstance(_cupy_import_error, ImportError):
            return "CuPy is not installed"
        return f"CuPy is installed but does not import ({_cupy_import_error})"
    try:
        if _cupy.cuda.runtime.getDeviceCount() == 0:
            return "CuPy sees no GPU"
    except Exception as error:  # no driver, or one too old for CuPy's CUDA
        return f"CuPy sees no GPU ({error})"
    try:
        _cupy.cuda.nvrtc.getVersion()
    except Exception as error:  # the library cannot be loaded: no CUDA Toolkit, no nvidia-cuda-nvrtc wheel
        return f"CuPy sees a GPU but cannot load NVRTC, CUDA's run-time compiler ({error})"
    return None


def cupy_available():
    """True when CuPy can run numgpt here: it imports, sees at least one GPU and finds NVRTC."""
    return cupy_problem() is None


def get_xp(backend="numpy"):
    """The array module for `backend`: "numpy", "cupy", or "auto" (CuPy when a GPU is usable)."""
    if backend == "numpy":
        return np
    if backend == "cupy":
        problem = cupy_problem()
        if problem is not None:
            raise ConfigError(f"backend 'cupy' cannot run: {problem}. On a machine with an NVIDIA GPU and "
                              f"its driver, {CUPY_INSTALL} (or pip install -e \".[gpu]\") installs CuPy "
                              "with the CUDA libraries it needs; or use --backend numpy")
        return _cupy
    if backend == "auto":
        return _cupy if cupy_available() else np
    raise ConfigError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def gpu_name(xp):
    """The name CUDA gives the GPU that CuPy module `xp` is using, such as "NVIDIA H100 80GB HBM3"."""
    return xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"].decode()


def backend_name(xp):
    """"numpy" or "cupy" for an array module."""
    return "cupy" if xp is _cupy and xp is not None else "numpy"


def resolve_dtype(dtype="float32"):
    """A NumPy dtype from "float32" / "float64" (or the dtype itself); anything else is an error."""
    name = np.dtype(dtype).name if isinstance(dtype, (type, np.dtype)) else str(dtype)
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}: choose float32 (training) or float64 (checks)")
    return np.dtype(name)


def memory_size(xp):
    """Bytes of memory `xp`'s arrays live in: the GPU's for CuPy, the machine's RAM for NumPy;
    None where it cannot be told."""
    try:
        if backend_name(xp) == "cupy":
            return xp.cuda.Device().mem_info[1]
        if sys.platform == "win32":
            return windows_physical_memory()
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # a sysconf name this Unix lacks, a call that failed
        return None


def windows_physical_memory():
    """Bytes of RAM in this Windows machine, from kernel32's GlobalMemoryStatusEx (Windows has no
    sysconf); None when the call fails."""
    import ctypes

    class MemoryStatusEx(ctypes.Structure):   # MEMORYSTATUSEX, field by field
        _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32)] + [
            (name, ctypes.c_uint64) for name in ("ullTotalPhys", "ullAvailPhys", "ullTotalPageFile",
                                                 "ullAvailPageFile", "ullTotalVirtual", "ullAvailVirtual",
                                                 "ullAvailExtendedVirtual")]

    status = MemoryStatusEx(dwLength=ctypes.sizeof(MemoryStatusEx))
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return status.ullTotalPhys


def cpu_blocks(xp, size, unit=1):
    """Slices that cover `size` items of `unit` elements each (rows of that length, say): blocks of
    CPU_BLOCK elements (at least one item) for NumPy, one slice of them all for CuPy (its fused
    kernels do such work; where they are off, blocks would only multiply launches)."""
    step = max(1, CPU_BLOCK // unit) if backend_name(xp) == "numpy" else max(size, 1)
    return [slice(start, start + step) for start in range(0, size, step)]


def array_module(x):
    """The module (numpy or cupy) that owns array `x`."""
    if _cupy is not None:
        return _cupy.get_array_module(x)
    return np


def to_device(x, xp, dtype=None):
    """Array `x` (NumPy, CuPy or a list) as an `xp` array, cast to `dtype` when given."""
    if xp is np and _cupy is not None and isinstance(x, _cupy.ndarray):
        x = x.get()
    return xp.asarray(x, dtype=dtype)


def to_numpy(x):
    """Array `x` as a NumPy array on the host (a no-op for NumPy input)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return x.get()
    return np.asarray(x)


def scatter_add(target, index, values):
    """target[index[i]] += values[i] for every row i, correct when `index` repeats.

    target (V, C), index (N,) integers in [0, V), values (N, C). A fancy-index `target[index] += values`
    would keep only the last write for a repeated id. NumPy >= 1.25 gives `np.add.at` a fast path
    for this pattern. On a GPU, numgpt.kernels.scatter_add_rows adds the rows of each id in the
    same order, so a step's gradients are the same on every run; its twin, CuPy's
    `cupyx.scatter_add`, adds them with atomic adds, in whatever order the threads arrive.
    """
    from numgpt import kernels   # here, not at the top: kernels imports this module

    xp = array_module(target)
    if kernels.enabled(xp) and target.flags.c_contiguous:   # the kernel reads row i at i * C
        kernels.scatter_add_rows(target, index, values)
    elif xp is np:
        np.add.at(target, index, values)
    else:
        import cupyx
        cupyx.scatter_add(target, index, values)


def erf(x):
    """The error function, elementwise, in x's dtype (only the exact-GELU option needs it)."""
    xp = array_module(x)
    if xp is not np:
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    try:
        from scipy.special import erf as scipy_erf
    except ImportError:  # scipy is not a dependency: fall back to the (slower) standard library
        return np.vectorize(math.erf, otypes=[x.dtype])(x)
    return scipy_erf(x).astype(x.dtype, copy=False)


def device_rng(xp, host_rng):
    """A random Generator of module `xp` driven by the host Generator `host_rng`.

    On NumPy it is `host_rng` itself. On CuPy a fresh device generator is seeded from one draw of
    `host_rng`, so the host generator's state alone makes every later draw reproducible (that
    state is what a checkpoint saves for an exact resume).
    """
    if xp is np:
        return host_rng
    return xp.random.default_rng(int(host_rng.integers(2**63)))
