"""CuPy's rules on NumPy arrays: numgpt's `--backend cupy` code runs where there is no GPU.

CI has no GPU, so without this the CuPy variant of every backend-parametrised test would skip and
the GPU path (transfers, 0-d results, the kernels' launch code) would go untested until someone
lends a machine. `install(monkeypatch)` puts this stand-in where `import cupy` finds it. Its
`ndarray` holds a NumPy array but behaves as a CuPy array does, in the ways NumPy code gets wrong:

- it never turns into a NumPy array by itself: `np.asarray(x)` raises TypeError, as CuPy does;
  `.get()`, `cupy.asnumpy`, `float()`, `.item()` and `.tolist()` are the ways to the host;
- arithmetic and cupy functions refuse NumPy arrays (CuPy raises "Unsupported type");
  Python and NumPy scalars are fine; cupy.asarray copies host data, so the two never share memory;
- reductions and single elements are 0-d arrays, not scalars, and an array is not an `__index__`;
- only names CuPy 14 has exist: the lists below are its functions and ndarray methods; NumPy's
  own keywords (`where=` on a ufunc, `initial=`) are refused;
- `RawModule` compiles the CUDA source for tests/cuda_emulator.py, so the kernels run, from the
  same launch code (a kernel argument's `.data.ptr` is the NumPy buffer's address).

`transfers` counts every copy between host and device, and every wait of the host for a result
whose size depends on the data, so a test can check that a training step reads back no more than
it means to. What the stand-in cannot show: speed, memory, asynchrony (it
is all synchronous), and the GPU's rounding (TF32 and cuBLAS's float16 products are exact NumPy here).
"""

import collections
import ctypes
import os
import sys
import types

import numpy as np

import cuda_emulator
import numgpt.backend
from numgpt import kernels

# copies between host and device: "to_device", and "to_host", which also counts the operations
# whose result size CuPy reads back from the device first (boolean-mask indexing, nonzero, unique):
# each "to_host" makes the host wait for the device
transfers = collections.Counter()

# for a test that installs the stand-in: its kernels run in the CUDA emulator, which needs g++
needs_compiler = cuda_emulator.needs_compiler

# the NumPy functions CuPy 14.2 also has (names in both dir(cupy) and dir(numpy), callables only,
# less file I/O and print options)
FUNCTIONS = frozenset("""
abs absolute acos acosh add all allclose amax amin angle any append apply_along_axis apply_over_axes arange
arccos arccosh arcsin arcsinh arctan arctan2 arctanh argmax argmin argpartition argsort argwhere around array
array2string array_equal array_equiv array_repr array_split array_str asanyarray asarray asarray_chkfinite
ascontiguousarray asfortranarray asin asinh astype atan atan2 atanh atleast_1d atleast_2d atleast_3d average
bartlett base_repr binary_repr bincount bitwise_and bitwise_count bitwise_invert bitwise_left_shift
bitwise_not bitwise_or bitwise_right_shift bitwise_xor blackman broadcast_arrays broadcast_shapes broadcast_to
can_cast cbrt ceil choose clip column_stack common_type compress concat concatenate conj conjugate convolve
copy copysign copyto corrcoef correlate cos cosh count_nonzero cov cross cumprod cumsum cumulative_prod
cumulative_sum deg2rad degrees delete diag diag_indices diag_indices_from diagflat diagonal diff digitize
divide divmod dot dsplit dstack ediff1d einsum empty empty_like equal exp exp2 expand_dims expm1 extract eye
fabs fill_diagonal fix flatnonzero flip fliplr flipud float_power floor floor_divide fmax fmin fmod
frexp from_dlpack frombuffer fromfunction fromiter full full_like gcd gradient greater greater_equal hamming
hanning heaviside histogram histogram2d histogramdd hsplit hstack hypot i0 identity imag indices inner interp
intersect1d invert isclose iscomplex iscomplexobj isdtype isfinite isfortran isin isinf isnan isneginf
isposinf isreal isrealobj isscalar issubdtype iterable ix_ kaiser kron lcm ldexp left_shift less less_equal
lexsort linspace log log10 log1p log2 logaddexp logaddexp2 logical_and logical_not logical_or
logical_xor logspace mask_indices matmul matrix_transpose max maximum may_share_memory mean median meshgrid
min min_scalar_type minimum mintypecode mod modf moveaxis multiply nan_to_num nanargmax nanargmin nancumprod
nancumsum nanmax nanmean nanmedian nanmin nanprod nanstd nansum nanvar ndim negative nextafter nonzero
not_equal ones ones_like outer packbits pad partition percentile permute_dims piecewise place poly polyadd
polyfit polymul polysub polyval positive pow power prod promote_types put put_along_axis
putmask quantile rad2deg radians ravel ravel_multi_index real real_if_close reciprocal remainder repeat
require reshape resize result_type right_shift rint roll rollaxis roots rot90 round row_stack
searchsorted select setdiff1d setxor1d shape shares_memory
sign signbit sin sinc sinh size sort sort_complex split sqrt square squeeze stack std subtract sum swapaxes
take take_along_axis tan tanh tensordot tile trace transpose trapezoid tri tril tril_indices tril_indices_from
trim_zeros triu triu_indices triu_indices_from true_divide trunc typename union1d unique unique_all
unique_counts unique_inverse unique_values unpackbits unravel_index unwrap vander var vdot vsplit vstack where
zeros zeros_like
""".split())

# functions that take host data (lists, NumPy arrays): a copy to the device
TO_DEVICE = frozenset(("array", "asarray", "asanyarray"))
# functions whose result size depends on the data: CuPy reads it back before it can allocate
READ_BACK = frozenset("argwhere bincount compress extract flatnonzero histogram nonzero unique unique_all "
                      "unique_counts unique_inverse unique_values".split())
# functions that NumPy answers with a Python bool and CuPy with a 0-d array
DEVICE_BOOL = frozenset(("allclose", "array_equal", "array_equiv"))
# NumPy keyword arguments that CuPy's functions, ufuncs and methods do not take (copyto takes `where`)
NUMPY_ONLY_KEYWORDS = frozenset(("where", "initial", "subok", "like", "device"))

# NumPy's types and constants that CuPy re-exports as they are
SHARED = frozenset("""
bool bool_ byte cdouble complex128 complex64 complexfloating csingle double dtype e euler_gamma finfo float16
float32 float64 floating generic half iinfo inexact inf int16 int32 int64 int8 int_ intc integer intp long
longlong nan newaxis number pi short signedinteger single ubyte uint uint16 uint32 uint64 uint8 uintc uintp
ulong ulonglong unsignedinteger ushort
""".split())

# cupy.ndarray's methods that hand NumPy's work back (attributes and the host copies are below)
METHODS = frozenset("""
all any argmax argmin argpartition argsort astype byteswap choose clip compress conj conjugate copy cumprod
cumsum diagonal dot flatten max mean min nonzero partition prod put ravel repeat reshape round
searchsorted sort squeeze std sum swapaxes take trace transpose var view
""".split())

GENERATOR_METHODS = frozenset("""
beta binomial chisquare dirichlet exponential f gamma geometric hypergeometric integers logseries poisson
power random standard_exponential standard_gamma standard_normal uniform
""".split())

BINARY = ("add sub mul matmul truediv floordiv mod pow divmod lshift rshift and or xor "
          "radd rsub rmul rmatmul rtruediv rfloordiv rmod rpow rdivmod rlshift rrshift rand ror rxor "
          "eq ne lt le gt ge").split()
IN_PLACE = "iadd isub imul itruediv ifloordiv imod ipow ilshift irshift iand ior ixor".split()
UNARY = "neg pos abs invert".split()


def unwrap(value, host_data=False):
    """NumPy's view of `value` for a CuPy call: stand-in arrays become their NumPy arrays, inside
    lists, tuples and dicts too. A NumPy array is refused, as CuPy refuses it, unless `host_data`
    (what the functions that copy from the host, such as cupy.asarray, accept)."""
    if isinstance(value, ndarray):
        return value._array
    if isinstance(value, np.ndarray) and not host_data:
        raise TypeError(f"Unsupported type {type(value)}: a NumPy array given to CuPy (move it with cupy.asarray)")
    if isinstance(value, (list, tuple)):
        return type(value)(unwrap(v, host_data) for v in value)
    if isinstance(value, dict):
        return {k: unwrap(v, host_data) for k, v in value.items()}
    return value


def from_host(value):
    """`value` (host data: lists, NumPy arrays, stand-in arrays) for a function that copies to the
    device: a copy, so that device and host never share memory, as they cannot on a GPU."""
    if isinstance(value, (np.ndarray, list, tuple)):
        transfers["to_device"] += 1
        return np.array(unwrap(value, host_data=True))
    return unwrap(value)


def index(key):
    """(the index for the NumPy array behind a stand-in, whether it holds index arrays): host index
    arrays (NumPy, lists) are copied to the device first, as CuPy does; a boolean mask makes the
    host wait for its count of True elements, which sizes the result."""
    parts = key if isinstance(key, tuple) else (key,)
    from_the_host = any(isinstance(part, (np.ndarray, list)) for part in parts)
    if from_the_host:
        transfers["to_device"] += 1
    if any(getattr(part, "dtype", None) == bool for part in parts):
        transfers["to_host"] += 1
    return unwrap(key, host_data=True), from_the_host or any(isinstance(part, ndarray) for part in parts)


def scalar(value):
    """`value` for ndarray.fill, as CuPy takes it: a scalar, or a 0-d NumPy array."""
    if isinstance(value, np.ndarray) and value.shape == ():
        return value.item()
    if isinstance(value, (np.ndarray, list, tuple)):
        raise ValueError(f"non-scalar {type(value).__name__} cannot be used for fill (move it with cupy.asarray)")
    return value


def wrap(value):
    """A NumPy result as CuPy returns it: arrays and scalars become (0-d) device arrays."""
    if isinstance(value, np.ndarray):
        return ndarray(value)
    if isinstance(value, np.generic):
        return ndarray(np.asarray(value))
    if hasattr(value, "_fields"):                                  # a named tuple (unique_counts, ...)
        return type(value)(*(wrap(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(wrap(v) for v in value)
    return value


def to_host(array):
    transfers["to_host"] += 1
    return array._array


def keywords(name, kwargs):
    """kwargs unwrapped for the CuPy function (or method) `name`; NumPy's own keywords are refused."""
    refused = set(kwargs) & NUMPY_ONLY_KEYWORDS - ({"where"} if name == "copyto" else set())
    if name in ("sort", "argsort") and kwargs.get("kind") not in (None, "stable"):
        refused.add("kind")
    if refused:
        raise TypeError(f"{name}() got keyword arguments CuPy does not take: {', '.join(sorted(refused))}")
    return unwrap(kwargs)


def function(name, f):
    """The CuPy function `name`: NumPy's `f` with CuPy's argument rules."""
    def call(*args, **kwargs):
        if name in READ_BACK:
            transfers["to_host"] += 1
        if name in TO_DEVICE and args:
            args = (from_host(args[0]),) + unwrap(args[1:])
        else:
            args = unwrap(args)
        result = f(*args, **keywords(name, kwargs))
        return wrap(np.asarray(result) if name in DEVICE_BOOL else result)
    call.__name__ = name
    return call


class ufunc:
    """A CuPy ufunc: callable, with reduce / accumulate / outer / at (NumPy's, with CuPy's rules)."""

    def __init__(self, numpy_ufunc):
        self._ufunc = numpy_ufunc
        self.__name__ = numpy_ufunc.__name__

    def __call__(self, *args, **kwargs):
        return wrap(self._ufunc(*unwrap(args), **keywords(self.__name__, kwargs)))

    def __getattr__(self, name):
        if name not in ("reduce", "accumulate", "reduceat", "outer", "at", "nin", "nout", "nargs", "types"):
            raise AttributeError(f"cupy.ufunc has no attribute {name!r}")
        attribute = getattr(self._ufunc, name)
        return function(name, attribute) if callable(attribute) else attribute


class Pointer:
    """ndarray.data: `ptr` is the address of the first element (here in host memory, which the
    emulator's kernels read and write)."""

    def __init__(self, ptr):
        self.ptr = ptr


class ndarray:
    """A device array: a NumPy array that obeys CuPy's rules (see the module docstring)."""

    __array_priority__ = 100     # NumPy scalars defer to us, as to CuPy
    __hash__ = None

    def __init__(self, array):
        self._array = array

    # -- what CuPy refuses -------------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    # -- the explicit ways to the host ----------------------------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        if out is None:
            return to_host(self).copy(order=order)
        out[...] = to_host(self)
        return out

    def item(self):
        return to_host(self).item()

    def tolist(self):
        return to_host(self).tolist()

    def __float__(self):
        return float(to_host(self))

    def __int__(self):
        return int(to_host(self))

    def __bool__(self):
        return bool(to_host(self))

    def __complex__(self):
        return complex(to_host(self))

    def __format__(self, spec):
        return format(to_host(self), spec)

    def __repr__(self):
        return repr(to_host(self))

    __str__ = __repr__

    def set(self, array, stream=None):
        if not isinstance(array, np.ndarray) or array.dtype != self.dtype or array.shape != self.shape:
            raise TypeError(f"set() wants a NumPy array of dtype {self.dtype} and shape {self.shape}, "
                            f"got {array!r:.80}")
        transfers["to_device"] += 1
        self._array[...] = array

    def fill(self, value):
        self._array.fill(scalar(value))

    def __copy__(self):
        return ndarray(self._array.copy())

    def __deepcopy__(self, memo):
        return ndarray(self._array.copy())

    # -- attributes --------------------------------------------------------------------------------
    shape = property(lambda self: self._array.shape)
    dtype = property(lambda self: self._array.dtype)
    ndim = property(lambda self: self._array.ndim)
    size = property(lambda self: self._array.size)
    itemsize = property(lambda self: self._array.itemsize)
    nbytes = property(lambda self: self._array.nbytes)
    strides = property(lambda self: self._array.strides)
    flags = property(lambda self: self._array.flags)
    T = property(lambda self: ndarray(self._array.T))
    mT = property(lambda self: ndarray(self._array.mT))
    real = property(lambda self: ndarray(self._array.real))
    imag = property(lambda self: ndarray(self._array.imag))
    data = property(lambda self: Pointer(self._array.ctypes.data))
    base = property(lambda self: None if self._array.base is None else ndarray(self._array.base))

    @shape.setter
    def shape(self, value):
        self._array.shape = value

    def __getattr__(self, name):
        if name not in METHODS:
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")
        return function(name, getattr(self._array, name))

    def __len__(self):
        return len(self._array)

    def __iter__(self):
        return (wrap(row) for row in self._array)

    def __getitem__(self, key):
        return wrap(self._array[index(key)[0]])

    def __setitem__(self, key, value):
        key, with_arrays = index(key)
        if isinstance(value, ndarray):
            value = value._array
        elif with_arrays:
            value = from_host(value)
        else:   # CuPy fills a slice with a scalar; a host array must be copied over first
            value = scalar(value)
        self._array[key] = value

    def __array_ufunc__(self, numpy_ufunc, method, *inputs, **kwargs):
        if numpy_ufunc.__name__ not in FUNCTIONS:
            return NotImplemented
        return wrap(getattr(numpy_ufunc, method)(*unwrap(inputs), **keywords(numpy_ufunc.__name__, kwargs)))

    def __array_function__(self, func, types, args, kwargs):
        if func.__name__ not in FUNCTIONS:
            return NotImplemented
        return function(func.__name__, func)(*args, **kwargs)


def _operator(name):
    numpy_operator = getattr(np.ndarray, f"__{name}__")
    return lambda self, *other: wrap(numpy_operator(self._array, *unwrap(other)))


def _in_place(name):
    numpy_operator = getattr(np.ndarray, f"__{name}__")

    def operator(self, other):
        numpy_operator(self._array, unwrap(other))
        return self
    return operator


for _name in BINARY + UNARY:
    setattr(ndarray, f"__{_name}__", _operator(_name))
for _name in IN_PLACE:
    setattr(ndarray, f"__{_name}__", _in_place(_name))


# -- the cupy module --------------------------------------------------------------------------------
def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def get_array_module(*args):
    return cupy if any(isinstance(a, ndarray) for a in args) else np


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    return a.get(order=order, out=out) if isinstance(a, ndarray) else np.asarray(a, order=order)


class Generator:
    """cupy.random.Generator: NumPy's generator behind CuPy's methods."""

    def __init__(self, seed=None):
        self._generator = np.random.default_rng(seed)

    def __getattr__(self, name):
        if name not in GENERATOR_METHODS:
            raise AttributeError(f"'cupy.random.Generator' object has no attribute {name!r}")
        return function(name, getattr(self._generator, name))


class MemoryPool:
    """The default memory pool's accounting; the stand-in's arrays live in host memory, so it holds none."""

    def used_bytes(self):
        return 0

    total_bytes = free_bytes = used_bytes

    def free_all_blocks(self, stream=None):
        pass


class Device:
    """One GPU of compute capability 9.0 (the tensor-core kernels run, under the emulator)."""

    compute_capability = "90"

    def __init__(self, device=0):
        self.id = device

    def synchronize(self):
        pass

    def use(self):
        pass


class Stream:
    ptr = 0

    def synchronize(self):
        pass


class RawModule:
    """cupy.RawModule: the CUDA source compiled for the emulator; kernels take stand-in arrays."""

    def __init__(self, code, options=(), **_):
        self.code = code
        self.functions = {}

    def get_function(self, name):
        if name not in self.functions:
            kernel = cuda_emulator.kernel_from(self.code, name)
            self.functions[name] = lambda grid, block, args, shared_mem=0, stream=None: kernel(
                grid, block, unwrap(tuple(args)), shared_mem)
        return self.functions[name]


def _erf(x):
    return wrap(numgpt.backend.erf(unwrap(x)))   # numgpt's own CPU erf (SciPy's, or the standard library's)


_pool = MemoryPool()
_linalg = _module("cupy._core._routines_linalg", COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7, _compute_types={},
                  set_compute_type=lambda dtype, kind: _linalg._compute_types.__setitem__(np.dtype(dtype).name, kind),
                  get_compute_type=lambda dtype: _linalg._compute_types.get(np.dtype(dtype).name, 1))
_core = _module("cupy._core", _routines_linalg=_linalg)
_runtime = _module("cupy.cuda.runtime", getDeviceCount=lambda: 1,
                   getDeviceProperties=lambda device: {"name": b"NumPy (the CuPy stand-in of numgpt's tests)"})
# CUDA's run-time compiler, "found"; CuPy's cupy.cuda.nvrtc is this module (an attribute, not a submodule)
_nvrtc = _module("cupy_backends.cuda.libs.nvrtc", getVersion=lambda: (12, 9))
cuda = _module("cupy.cuda", Device=Device, Stream=Stream, runtime=_runtime, nvrtc=_nvrtc, get_current_stream=Stream)


class NcclCommunicator:
    """cupy.cuda.nccl's communicator of one GPU per process, over MPI's processes on the host.
    allReduce sums the memory at the addresses it is given, as NCCL sums device memory: here they
    are the NumPy buffers' (`.data.ptr`). Both take their arguments in the order of CuPy 14.2's
    signatures, and refuse what numgpt must not pass: ranks other than MPI's, an id that is not
    get_unique_id()'s 128 bytes or differs between ranks, an operation other than a sum."""

    def __init__(self, ndev, commId, rank):
        from mpi4py import MPI
        self.comm = MPI.COMM_WORLD
        if (ndev, rank) != (self.comm.size, self.comm.rank) or not (isinstance(commId, bytes) and len(commId) == 128):
            raise ValueError(f"NcclCommunicator({ndev}, {commId!r:.20}, {rank}) on rank {self.comm.rank} of "
                             f"{self.comm.size}")
        if self.comm.bcast(commId) != commId:
            raise ValueError("the ranks were given different unique ids")
        self.allreduces = 0

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        from mpi4py import MPI
        if op != _nccl.NCCL_SUM or not all(isinstance(a, int) for a in (sendbuf, recvbuf, count, stream)):
            raise ValueError(f"allReduce({sendbuf}, {recvbuf}, {count}, {datatype}, {op}, {stream})")
        dtype = np.dtype({_nccl.NCCL_FLOAT32: np.float32, _nccl.NCCL_FLOAT64: np.float64}[datatype])
        send, recv = (np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(address), dtype)
                      for address in (sendbuf, recvbuf))
        self.comm.Allreduce(MPI.IN_PLACE if sendbuf == recvbuf else send, recv, op=MPI.SUM)
        self.allreduces += 1


# NCCL's numbers for float32, float64 and a sum (nccl.h's ncclFloat32, ncclFloat64, ncclSum)
_nccl = _module("cupy.cuda.nccl", available=True, get_unique_id=lambda: os.urandom(128),
                NcclCommunicator=NcclCommunicator, NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_SUM=0)
random = _module("cupy.random", default_rng=Generator, Generator=Generator)

cupy = _module("cupy", ndarray=ndarray, ufunc=ufunc, get_array_module=get_array_module, asnumpy=asnumpy,
               RawModule=RawModule, cuda=cuda, random=random, _core=_core, is_available=lambda: True,
               get_default_memory_pool=lambda: _pool, get_default_pinned_memory_pool=lambda: _pool,
               **{name: getattr(np, name) for name in SHARED})
for _name in FUNCTIONS:
    _numpy = getattr(np, _name, None)
    if _numpy is not None:
        setattr(cupy, _name, ufunc(_numpy) if isinstance(_numpy, np.ufunc) else function(_name, _numpy))

_special = _module("cupyx.scipy.special", erf=_erf)
_scipy = _module("cupyx.scipy", special=_special)
cupyx = _module("cupyx", scipy=_scipy, scatter_add=lambda a, index, values: np.add.at(*unwrap((a, index, values))))

MODULES = {"cupy": cupy, "cupy._core": _core, "cupy._core._routines_linalg": _linalg, "cupy.cuda": cuda,
           "cupy.cuda.runtime": _runtime, "cupy_backends.cuda.libs.nvrtc": _nvrtc, "cupy.cuda.nccl": _nccl,
           "cupy.random": random,
           "cupyx": cupyx, "cupyx.scipy": _scipy, "cupyx.scipy.special": _special}


def install(monkeypatch):
    """`import cupy` finds the stand-in and numgpt sees a GPU, until `monkeypatch` undoes it. Any
    other part of a real CuPy that was imported is hidden: importing it fails, as if it were absent."""
    for name in [name for name in sys.modules if name.split(".")[0] in ("cupy", "cupyx")]:
        monkeypatch.setitem(sys.modules, name, None)
    for name, module in MODULES.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(numgpt.backend, "_cupy", cupy)
    monkeypatch.setattr(kernels, "_modules", {})   # compiled for the stand-in, not for a real CuPy
    monkeypatch.setattr(kernels, "_tables", {})    # addresses of stand-in arrays
    transfers.clear()
    _linalg._compute_types.clear()


def remove_nvrtc(monkeypatch):
    """Take NVRTC away, as on a machine with an NVIDIA driver and no CUDA Toolkit: CuPy imports and
    sees the GPU, and its nvrtc.getVersion() raises what CuPy 14's raises there."""
    def missing():
        raise RuntimeError('Failure finding "libnvrtc.so.13 or libnvrtc.so.12": No such file')
    monkeypatch.setattr(_nvrtc, "getVersion", missing)
