"""numgpt's CUDA kernels run on the CPU, so that CI, which has no GPU, tests their source.

`numgpt.kernels.source(dtype)` is compiled by g++ against cuda_emulator.h (each CUDA thread a
fiber in one OS thread, with CUDA's barriers, warp shuffles and mma.sync) and one generated
launcher per kernel.
`emulated()` then routes `numgpt.kernels` to this library: with it, the kernel wrappers accept
NumPy arrays, and the layers use the kernels on NumPy as they would on CuPy. So the tests run the
same wrappers, grids and argument lists that a GPU gets, and compare against the twins.

A launch checks every argument against the kernel's C signature: a NumPy scalar of the wrong
width, or an array of the wrong element type, raises TypeError. (CuPy would pass the bytes
through and the kernel would read garbage.)
"""

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from numgpt import kernels

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulator.h")
KERNEL = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')

# C parameter type -> (ctypes type, what a launch must pass for it)
SCALARS = {"int": (ctypes.c_int, np.int32), "long long": (ctypes.c_longlong, np.int64),
           "float": (ctypes.c_float, np.float32), "double": (ctypes.c_double, np.float64),
           "unsigned short": (ctypes.c_ushort, np.float16)}   # HALF: a float16 as its bits (numgpt/cuda/float16.cu)


def compiler():
    """The C++ compiler on PATH, or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


# for every test that runs kernels here (directly, or through tests/cupy_standin.py)
needs_compiler = pytest.mark.skipif(compiler() is None, reason="no C++ compiler for the CUDA emulator")


def signatures(source):
    """{kernel name: [(C type, parameter name), ...]} of every `extern "C" __global__` kernel."""
    result = {}
    for name, params in KERNEL.findall(source):
        result[name] = [tuple(p.strip().rsplit(None, 1)) for p in params.replace("*", "* ").split(",")]
    return result


def preprocessed(source):
    """`source` after the C preprocessor: kernels that a macro defines appear with their names."""
    result = subprocess.run([compiler(), "-E", "-P", "-x", "c++", "-"], input=source, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the kernels do not preprocess:\n{result.stderr}")
    return result.stdout


def launcher(name, params):
    """C++ for `emu_<name>(grid, block, params...)`, which runs kernel `name` over that grid."""
    declared = ", ".join(f"{ctype} {pname}" for ctype, pname in params)
    passed = ", ".join(pname for _, pname in params)
    # only the launchers are exported: the emulator's state stays private to each library (visible,
    # its inline variables would be one copy per process, shared by every library loaded)
    return (f'extern "C" __attribute__((visibility("default"))) int emu_{name}(unsigned gx, unsigned gy, '
            f'unsigned gz, unsigned bx, unsigned by, unsigned bz, {declared}) {{\n'
            f'    return emu::launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, [=] {{ {name}({passed}); }});\n}}\n')


blocks_reversed = False   # run each grid's blocks last to first (see reversed_blocks)


@contextlib.contextmanager
def reversed_blocks():
    """Inside `with reversed_blocks():`, launches run their grid's blocks last to first. A GPU
    runs them in any order; in the usual first-to-last order a block that writes into a later
    block's part (a row past its own) is overwritten by the owner and goes unseen, last to first
    it stays."""
    global blocks_reversed
    blocks_reversed = True
    try:
        yield
    finally:
        blocks_reversed = False


class EmulatedKernel:
    """Called as a cupy.RawKernel is: kernel(grid, block, args)."""

    def __init__(self, function, params, library):
        # each parameter as (its C type, preprocessed and with const dropped, its name)
        self.function, self.library = function, library
        self.params = [(ctype.replace("const ", "").strip(), pname) for ctype, pname in params]
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_uint] * 6 + [
            ctypes.c_void_p if ctype.endswith("*") else SCALARS[ctype][0] for ctype, _ in self.params]

    @staticmethod
    def _argument(value, ctype, pname):
        if ctype.endswith("*"):
            element = np.dtype(SCALARS[ctype[:-1].strip()][1])
            if not isinstance(value, np.ndarray) or value.dtype != element or not value.flags.c_contiguous:
                raise TypeError(f"{pname}: wants a C-contiguous {element} array, got {value!r:.80}")
            return value.ctypes.data
        if type(value) is not SCALARS[ctype][1]:
            raise TypeError(f"{pname}: wants a {SCALARS[ctype][1].__name__}, got {type(value).__name__}")
        return value

    def __call__(self, grid, block, args, shared_mem=0):
        if len(args) != len(self.params):
            raise TypeError(f"{len(self.params)} arguments wanted, {len(args)} given")
        dims = [tuple(d) + (1,) * (3 - len(d)) for d in (grid, block)]
        self.library.emu_reverse_blocks(int(blocks_reversed))
        if self.function(*dims[0], *dims[1], *(self._argument(a, *p) for a, p in zip(args, self.params))):
            raise RuntimeError("the kernel deadlocked, ran mma.sync without a whole warp, or was launched with a "
                               "grid or block a GPU refuses (the emulator's message is on stderr)")


_libraries = {}   # sha256 of the CUDA source, the header and this file -> (ctypes library, signatures)


def build(source):
    """The kernels of CUDA `source` compiled into a shared library -> (library, signatures).

    Compiled once per source text (a few seconds), kept in the temp directory across runs."""
    emulator = "".join(Path(path).read_text(encoding="utf-8") for path in (HEADER, __file__))
    digest = hashlib.sha256((source + emulator).encode()).hexdigest()[:16]
    if digest not in _libraries:
        params = signatures(preprocessed(source))
        code = '#include "%s"\n%s\n%s%s' % (HEADER, source, "".join(launcher(n, p) for n, p in params.items()),
                                            'extern "C" __attribute__((visibility("default"))) void '
                                            'emu_reverse_blocks(int on) { emu::blocks_reversed = on; }\n')
        directory = os.path.join(tempfile.gettempdir(), "numgpt-cuda-emulator")
        os.makedirs(directory, exist_ok=True)
        library = os.path.join(directory, f"kernels-{digest}.so")
        if not os.path.exists(library):
            cpp = os.path.join(directory, f"kernels-{digest}.{os.getpid()}.cpp")
            with open(cpp, "w") as f:
                f.write(code)
            partial = library + f".{os.getpid()}"
            compiled = subprocess.run([compiler(), "-std=c++17", "-O1", "-shared", "-fPIC", "-fvisibility=hidden",
                                       "-U_FORTIFY_SOURCE", "-Wall", "-Werror", "-Wno-unknown-pragmas",
                                       "-o", partial, cpp], capture_output=True, text=True)
            if compiled.returncode:
                raise RuntimeError(f"the kernels do not compile for the emulator:\n{compiled.stderr}")
            os.replace(partial, library)   # atomic: a parallel test run never loads half a library
            os.remove(cpp)
        _libraries[digest] = (ctypes.CDLL(library), params)
    return _libraries[digest]


def emulated_kernel(name, dtype):
    """What numgpt.kernels._kernel returns on a GPU, here a function of the emulator's library."""
    return kernel_from(kernels.source(dtype), name)


def kernel_from(source, name):
    """Kernel `name` of CUDA `source` (kernels.source(dtype), perhaps with more kernels after it)."""
    library, params = build(source)
    return EmulatedKernel(getattr(library, f"emu_{name}"), params[name], library)


@contextlib.contextmanager
def emulated():
    """Within the block, numgpt.kernels runs its kernels here, on NumPy arrays."""
    saved = kernels._kernel, kernels._runs_kernels
    kernels._kernel, kernels._runs_kernels = emulated_kernel, lambda xp: True
    try:
        yield
    finally:
        kernels._kernel, kernels._runs_kernels = saved
