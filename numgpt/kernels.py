"""Fused CUDA kernels: on CuPy arrays, each replaces a chain of elementwise passes of one layer.

A NumPy-style chain such as layernorm's (mean, subtract, square, mean, sqrt, divide, multiply,
add) launches one GPU kernel per step and streams the (B,T,C) array through memory each time.
The kernels read their inputs once and write their outputs once. Each has a twin: the NumPy code
of its layer, which runs on CuPy too when kernels are off, and which tests/test_kernels.py
compares it against (float32 and float64), on a GPU and on the CPU through a CUDA emulator.

The CUDA source is in numgpt/cuda, one file per concern; the functions of this module launch
its kernels (those of multi_array.cu are named *_chunks, the attention's flash_attention_* and
tc_attention_*):

    file             functions here                       how the work is split
    gelu.cu          gelu_forward, gelu_backward          elementwise, one thread per element
    layernorm.cu     layernorm_forward, layernorm_dx      one warp (32 threads) per row of C
    sum_rows.cu      sum_rows                             a block per 32 columns of SUM_ROWS_GROUP rows
    scatter_add.cu   scatter_add_rows                     a block per run of one id in the sorted ids
    softmax.cu       causal_softmax, softmax_backward     one warp per row of attention scores
                     softmax_parts                        one block per row of logits: the
                                                          cross-entropy's max, exp and sum
    flash_attention.cu         flash_attention_forward,   causal attention that never forms the
    tensor_core_attention.cu   flash_attention_backward   (T,T) matrix: on tensor cores with mma.sync,
                                                          FlashAttention-2 style (float32 arrays), or in
                                                          FMAs (float64, other head sizes, older GPUs)
    multi_array.cu   scale_all, accumulate_all,           one launch over many arrays (every
                     sum_of_squares_all, all_finite_all,  parameter or gradient), each block doing
                     adamw_all                            one chunk of one array (PyTorch's foreach)
    warp.cu          the shuffle reductions the others share
    float16.cu       the float16 stores of gelu_forward, layernorm_forward and softmax_parts, which
                     (for fp16 training) write an output that feeds only matmuls as float16 directly

The files are compiled as one program, written once with REAL for the element type, by NVRTC for
float and for double when first used (the tensor-core attention, and the `_half` variants for
fp16 training, for float only). Layers ask `enabled(xp)` (or `enabled(xp, "flash_attention")`) before calling a kernel
here; `disabled()` turns them all off in a block, `disabled("flash_attention")` that one,
`disabled("tensor_core_attention")` the attention's tensor cores (tests use them to run the
twins on the GPU, benchmarks to compare).
"""

import contextlib
import pathlib

import numpy as np

from numgpt.backend import array_module, backend_name

WARP = 32                 # threads per row in the row kernels: a warp reduces with shuffles, no shared memory
THREADS = 256             # threads per block in the elementwise, sum_rows, softmax_parts, multi-array and FMA
                          # flash kernels
MAX_BLOCKS = 65535        # per grid dimension: elementwise kernels loop over the rest (a grid-stride loop)
DIMS = 16                 # head dims per thread in the FMA attention kernels: a row takes the least power of
                          # two >= hs / DIMS threads (_flash_launch; group_sum needs a power of two)
TC_HEAD_SIZES = (16, 32, 64)  # head sizes the tensor-core attention kernels are compiled for (GPT-2's is 64)
TC_ROWS = 64                  # rows per block in those kernels (MMA_ROWS in the source): warps of 16 rows
TC_THREADS = TC_ROWS // 16 * 32
# the operand formats of those kernels (precision.tensor_core_operands) -> their names' part
TC_OPERANDS = {"float16": "half", "tf32": "tf32", "float32": "tf32x3"}
SUM_ROWS_GROUP = 256      # rows per block in sum_rows: GPT-2's 16 x 1024 rows of 768 make 24 x 64 blocks
CHUNK = 1 << 14           # elements per block in the multi-array kernels: GPT-2 124M's parameters are ~7600 blocks
MAX_TABLES = 8            # chunk tables kept for reuse (see _chunk_table)

CUDA_DIR = pathlib.Path(__file__).with_name("cuda")
# compiled as one source, in this order (warp.cu's reductions and float16.cu's stores come first:
# the others use them)
CUDA_FILES = ("warp.cu", "float16.cu", "gelu.cu", "layernorm.cu", "sum_rows.cu", "scatter_add.cu", "softmax.cu",
              "flash_attention.cu", "tensor_core_attention.cu", "multi_array.cu")
SOURCE = "\n".join((CUDA_DIR / name).read_text(encoding="utf-8") for name in CUDA_FILES)

ALL = "all"
_off = set()      # kernels turned off by `disabled`: names, or ALL
_modules = {}   # dtype name -> compiled cupy.RawModule
_tables = {}    # the arrays' addresses, sizes, element size and tags -> their chunk table, the most recently used last


def enabled(xp, kernel=None):
    """True when the arrays of module `xp` should go through the kernels here: on CuPy, unless
    `disabled` turned them all off, or the one named `kernel`."""
    return _runs_kernels(xp) and ALL not in _off and kernel not in _off


def _runs_kernels(xp):
    """Whether arrays of `xp` live on the GPU (the tests' CUDA emulator says yes for NumPy)."""
    return backend_name(xp) == "cupy"


@contextlib.contextmanager
def disabled(*kernels):
    """Within the block, layers use their NumPy-style code (the kernels' twins) on CuPy too: in
    place of the named kernels (those that `enabled` is asked about by name), or of all of them."""
    global _off
    previous, _off = _off, _off | (set(kernels) or {ALL})
    try:
        yield
    finally:
        _off = previous


def source(dtype):
    """The CUDA source for element type `dtype` (float32 or float64): the files of numgpt/cuda after
    the definitions they share with this module (the element type and the launch shapes)."""
    real = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    defines = {"REAL": real, "REAL_IS_FLOAT": int(real == "float"), "DIMS": DIMS, "MMA_ROWS": TC_ROWS,
               # tensor_core_attention.cu instantiates its kernels once per head size through this
               "FOR_EACH_TC_HEAD_SIZE(KERNELS)": " ".join(f"KERNELS({hs})" for hs in TC_HEAD_SIZES)}
    return "".join(f"#define {name} {value}\n" for name, value in defines.items()) + SOURCE


def _kernel(name, dtype):
    """Kernel `name` compiled for `dtype` (once per dtype, by NVRTC through CuPy)."""
    key = np.dtype(dtype).name
    if key not in _modules:
        import cupy
        _modules[key] = cupy.RawModule(code=source(dtype))
    return _modules[key].get_function(name)


def _elementwise_grid(n):
    return (min(max(1, -(-n // THREADS)), MAX_BLOCKS),), (THREADS,)


def _scalar(value, dtype):
    return np.dtype(dtype).type(value)


def _output(name, x, out_dtype):
    """(kernel, dtype of its output) for kernel `name` over x when the caller wants the output in
    `out_dtype`: float16 from float32 x is written by the kernel's `_half` variant (one rounding of
    its float32 result, as astype's); anything else comes in x's dtype, for the caller to cast."""
    if out_dtype is not None and np.dtype(out_dtype) == np.float16 and x.dtype == np.float32:
        return _kernel(name + "_half", x.dtype), np.dtype(np.float16)
    return _kernel(name, x.dtype), x.dtype


def gelu_forward(x, out_dtype=None):
    """y = gelu(x), GPT-2's tanh form, in one pass (see _output for `out_dtype`)."""
    x = _contiguous(x)
    kernel, dtype = _output("gelu_forward", x, out_dtype)
    y = array_module(x).empty(x.shape, dtype=dtype)
    kernel(*_elementwise_grid(x.size), (x, y, np.int64(x.size)))
    return y


def gelu_backward(dy, x):
    """dx of gelu for upstream dy, in one pass."""
    x, dy = _contiguous(x), _contiguous(dy)
    dx = _empty_like(x)
    _kernel("gelu_backward", x.dtype)(*_elementwise_grid(x.size), (x, dy, dx, np.int64(x.size)))
    return dx


def layernorm_forward(x, w, b, eps, out_dtype=None):
    """(y, xhat, rstd) of layernorm over the last axis; rstd has shape (..., 1) like the twin's
    (see _output for `out_dtype`, y's)."""
    x = _contiguous(x)
    C = x.shape[-1]
    N = x.size // C
    xp = array_module(x)
    kernel, dtype = _output("layernorm_forward", x, out_dtype)
    y, xhat = xp.empty(x.shape, dtype=dtype), _empty_like(x)
    rstd = xp.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    w = _contiguous(w)
    has_bias = b is not None
    b = _contiguous(b) if has_bias else w   # without a bias, any valid pointer: the kernel never reads it
    kernel((N,), (WARP,), (x, w, b, np.int32(has_bias), y, xhat, rstd, np.int32(N), np.int32(C), _scalar(eps, x.dtype)))
    return y, xhat, rstd


def layernorm_dx(dy, xhat, rstd, w):
    """dx of layernorm from the cached xhat and rstd."""
    dy = _contiguous(dy)
    C = dy.shape[-1]
    N = dy.size // C
    dx = _empty_like(dy)
    _kernel("layernorm_dx", dy.dtype)((N,), (WARP,), (dy, _contiguous(xhat), _contiguous(rstd), _contiguous(w), dx,
                                                       np.int32(N), np.int32(C)))
    return dx


def sum_rows(x, w=None):
    """(C,): the sum over every row of x (..., C), or of x * w elementwise.

    A launch turns groups of SUM_ROWS_GROUP rows into one row of partial sums each; the partial
    sums go through again until one row is left (two launches up to 65536 rows). CuPy's own sum
    over a first axis runs one block per 32 columns, each looping over every row: 24 blocks of an
    H100's 132 SMs for C = 768 (read in its _reduction.pyx; cupy#8092 measured one such block summing
    2^24 floats in 16 ms)."""
    xp = array_module(x)
    C = x.shape[-1]
    x = _contiguous(x).reshape(-1, C)                                       # (N,C)
    has_w = w is not None
    w = _contiguous(w) if has_w else x   # without w, any valid pointer: the kernel never reads it
    while True:
        N = x.shape[0]
        groups = max(1, min(-(-N // SUM_ROWS_GROUP), MAX_BLOCKS))
        out = xp.empty((groups, C), dtype=x.dtype)                          # (G,C)
        grid = (-(-C // WARP), groups)   # a block per 32 columns (a warp's lanes) of each group
        _kernel("sum_rows", x.dtype)(grid, (THREADS,), (x, w, np.int32(has_w), out, np.int64(N), np.int32(C),
                                                        np.int64(-(-N // groups))))
        if groups == 1:
            return out.reshape(C)
        x, w, has_w = out, out, False


def scatter_add_rows(target, index, values):
    """target (V,C) += values (N,C) at rows index (N,), in place, the rows of one id added in their
    order: the same sums, to the bit, on every run (see scatter_add.cu). The ids must be in [0, V):
    the kernel does not check them (the model checks its ids on the host), nor wraps negative ones."""
    assert target.flags.c_contiguous, "scatter_add_rows adds in place: target must be C-contiguous"
    xp = array_module(target)
    N, C = values.shape
    if N == 0:
        return
    index = xp.ascontiguousarray(index, dtype=np.int64)
    # the keys are unique, so any sort gives the one order: by id, and within an id by row
    order = xp.argsort(index * N + xp.arange(N, dtype=np.int64))
    _kernel("scatter_add_rows", target.dtype)((N, -(-C // THREADS)), (THREADS,),
                                              (target, _contiguous(values.astype(target.dtype, copy=False)),
                                               index, order, np.int64(N), np.int32(C)))


def causal_softmax(scores):
    """Masked softmax of (..., Tq, Tk) scores in their own memory (as the twin): the probabilities."""
    assert scores.flags.c_contiguous, "causal_softmax works in place: scores must be C-contiguous"
    Tq, Tk = scores.shape[-2:]
    rows = scores.size // Tk
    _kernel("causal_softmax", scores.dtype)((rows,), (WARP,), (scores, np.int64(rows), np.int32(Tq), np.int32(Tk)))
    return scores


def softmax_backward(dprobs, probs):
    """ds = p (dp - sum(dp p)) along the last axis."""
    dprobs, probs = _contiguous(dprobs), _contiguous(probs)
    T = probs.shape[-1]
    rows = probs.size // T
    ds = _empty_like(probs)
    _kernel("softmax_backward", probs.dtype)((rows,), (WARP,), (dprobs, probs, ds, np.int64(rows), np.int32(T)))
    return ds


def softmax_parts(logits, out=None, out_dtype=None):
    """(exps, sumexp, shift) of logits (N,V): shift (N,) the row maxima, exps (N,V) = exp(logits -
    shift), sumexp (N,1) its row sums (of the unrounded exps). The exps are written into `out`
    (which may be `logits`) unless `out_dtype` asks for another dtype (see _output)."""
    logits = _contiguous(logits)
    N, V = logits.shape
    xp = array_module(logits)
    kernel, dtype = _output("softmax_parts", logits, out_dtype)
    exps = out if out is not None and out.dtype == dtype else xp.empty((N, V), dtype=dtype)
    assert exps.flags.c_contiguous and exps.shape == logits.shape, "out must be a C-contiguous (N,V) array"
    sumexp, shift = xp.empty((N, 1), dtype=logits.dtype), xp.empty((N,), dtype=logits.dtype)
    kernel((N,), (THREADS,), (logits, exps, sumexp, shift, np.int32(V)))
    return exps, sumexp, shift


def flash_attention_supports(head_size):
    """Whether the attention kernels take heads of this size: up to 32 threads of DIMS dims each."""
    return head_size <= 32 * DIMS


def tensor_core_attention_supports(xp, head_size):
    """Whether the tensor-core attention kernels take heads of this size on this device: they are
    compiled for TC_HEAD_SIZES, and mma.sync's float16 and TF32 shapes need compute capability 8.0
    (Ampere) or newer."""
    if head_size not in TC_HEAD_SIZES:
        return False
    return backend_name(xp) != "cupy" or int(xp.cuda.Device().compute_capability) >= 80   # else: the emulator


def _flash_launch(T, n_head, B, head_size):
    """(G, grid, block): G threads per row, the fewest (a power of two) that hold a head's dims."""
    G = 1
    while G * DIMS < head_size:
        G *= 2
    rows = THREADS // G
    return G, (-(-T // rows), n_head, B), (THREADS,)


def _tensor_core_launch(operands, T, n_head, B, head_size):
    """(name suffix, grid, block) of the tensor-core attention kernels for `operands` (a key of
    TC_OPERANDS): 4 warps of 16 rows a block."""
    return f"_{TC_OPERANDS[operands]}_{head_size}", (-(-T // TC_ROWS), n_head, B), (TC_THREADS,)


def flash_attention_forward(qkv, n_head, scale, operands=None):
    """Causal attention of qkv (B,T,3C) -> y (B,T,C) with heads merged, lse (B,nh,T) for the backward.

    With operands None the kernels multiply in the arrays' dtype, in FMAs. With operands "float16"
    or "tf32" (float32 arrays, see tensor_core_attention_supports) the matrix products run on tensor
    cores with their operands rounded to that format (the one the twin's matmuls round to:
    precision.tensor_core_operands), with "float32" on TF32 tensor cores at float32's accuracy
    (three products each); the softmax and every sum stay float32, as in torch's fused attention."""
    qkv = _contiguous(qkv)
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    hs, xp, t = C // n_head, array_module(qkv), qkv.dtype
    y, lse = xp.empty((B, T, C), dtype=t), xp.empty((B, n_head, T), dtype=t)
    if operands is not None:
        assert t == np.float32, "the tensor-core attention takes float32 arrays"
        suffix, grid, block = _tensor_core_launch(operands, T, n_head, B, hs)
        _kernel("tc_attention_forward" + suffix, t)(grid, block, (qkv, y, lse, np.int32(T), np.int32(n_head),
                                                                  np.float32(scale)))
        return y, lse
    G, grid, block = _flash_launch(T, n_head, B, hs)
    _kernel("flash_attention_forward", t)(grid, block, (qkv, y, lse, np.int32(T), np.int32(n_head), np.int32(hs),
                                                        np.int32(G), _scalar(scale, t)))
    return y, lse


def flash_attention_backward(dy, qkv, y, lse, n_head, scale, operands=None):
    """dqkv (B,T,3C) of flash_attention_forward for upstream dy (B,T,C): two kernels, over the
    queries (dq, and D = dy . y per row) and over the keys (dk, dv), each recomputing the
    probabilities it needs; with the forward's `operands`, and dy rounded to them too."""
    dy, qkv, y = _contiguous(dy), _contiguous(qkv), _contiguous(y)
    B, T, C = dy.shape
    hs, xp, t = C // n_head, array_module(dy), dy.dtype
    D, dqkv = xp.empty((B, n_head, T), dtype=t), _empty_like(qkv)      # D (B,nh,T): written by the dq kernel
    if operands is not None:
        assert t == np.float32, "the tensor-core attention takes float32 arrays"
        suffix, grid, block = _tensor_core_launch(operands, T, n_head, B, hs)
        shape = (np.int32(T), np.int32(n_head), np.float32(scale))
        _kernel("tc_attention_dq" + suffix, t)(grid, block, (qkv, dy, y, lse, D, dqkv, *shape))
        _kernel("tc_attention_dkv" + suffix, t)(grid, block, (qkv, dy, lse, D, dqkv, *shape))
        return dqkv
    G, grid, block = _flash_launch(T, n_head, B, hs)
    shape = (np.int32(T), np.int32(n_head), np.int32(hs), np.int32(G), _scalar(scale, t))
    _kernel("flash_attention_dq", t)(grid, block, (qkv, dy, y, lse, D, dqkv, *shape))
    _kernel("flash_attention_dkv", t)(grid, block, (qkv, dy, lse, D, dqkv, *shape))
    return dqkv


def chunkable(*columns):
    """Whether lists of arrays can go to a multi-array kernel: C-contiguous, all of one floating
    dtype, the i-th array of every list the size of the first list's (the kernel reads and writes
    as many elements of each)."""
    first = columns[0]
    arrays = [a for column in columns for a in column]
    return bool(arrays) and arrays[0].dtype in (np.float32, np.float64) \
        and all(a.flags.c_contiguous and a.dtype == arrays[0].dtype for a in arrays) \
        and all(len(column) == len(first) and all(a.size == b.size for a, b in zip(column, first))
                for column in columns)


def scale_all(arrays, factor):
    """a *= factor for every array, in one launch."""
    _launch_over_chunks("scale_chunks", [arrays], _scalar(factor, arrays[0].dtype))


def accumulate_all(dsts, srcs, divisor, add):
    """d = s / divisor (or, with `add`, d += s / divisor) for each pair, in one launch."""
    _launch_over_chunks("accumulate_chunks", [dsts, srcs], _scalar(divisor, dsts[0].dtype), np.int32(add))


def sum_of_squares_all(arrays):
    """The sum of every element squared, over all the arrays: a float64 scalar on their device."""
    n_chunks = sum(-(-a.size // CHUNK) for a in arrays)
    partial = array_module(arrays[0]).empty(n_chunks, dtype=np.float64)   # one sum per chunk
    _launch_over_chunks("sum_squares_chunks", [arrays], partial)
    return partial.sum()


def all_finite_all(arrays):
    """Whether no element of any of the arrays is inf or nan: one launch, then one wait for the answer."""
    found = array_module(arrays[0]).zeros(1, dtype=np.int32)
    _launch_over_chunks("nonfinite_chunks", [arrays], found)
    return not int(found[0])


def adamw_all(params, grads, ms, vs, decays, grad_scale, decay, b1, b2, bias_correction2_sqrt, eps, step_size):
    """One AdamW update of every parameter and its moments, in place, in one launch; `decays[i]`
    says whether params[i] gets the weight decay factor `decay`; every gradient is multiplied by
    grad_scale, a float64 array of one element on the device, first."""
    t = params[0].dtype
    _launch_over_chunks("adamw_chunks", [params, grads, ms, vs], grad_scale, _scalar(decay, t), _scalar(1.0 - b1, t),
                        _scalar(b2, t), _scalar(1.0 - b2, t), _scalar(bias_correction2_sqrt, t), _scalar(eps, t),
                        _scalar(step_size, t), tags=decays)


def _launch_over_chunks(name, columns, *args, tags=None):
    """Run multi-array kernel `name` with one block of THREADS per chunk of `columns` (see
    _chunk_table) and arguments (table, *args); nothing when the arrays are empty."""
    table = _chunk_table(columns, tags)
    if len(table):
        _kernel(name, columns[0][0].dtype)((len(table),), (THREADS,), (table, *args))


def _chunk_table(columns, tags=None):
    """The table a multi-array kernel reads: one row per CHUNK elements of each array of
    `columns` (lists of arrays for chunkable(), the i-th of each list the same size), holding the
    chunk's address in every list, its length and tags[i]: an (n_chunks, len(columns) + 2) int64
    array on the arrays' device.

    The table follows from the addresses, sizes, element size and tags alone, so those are its
    key: it is kept for the next call with arrays at the same addresses (a training step's
    parameters, moments and flat gradients never move), and most steps copy nothing to the device."""
    first = columns[0]
    tags = [0] * len(first) if tags is None else [int(tag) for tag in tags]
    xp, itemsize = array_module(first[0]), first[0].itemsize
    # where each array's first element is: a device address for CuPy, a host one for NumPy (the emulator)
    address = (lambda a: a.data.ptr) if backend_name(xp) == "cupy" else (lambda a: a.ctypes.data)
    addresses = np.array([[address(a) for a in column] for column in columns], dtype=np.int64)   # (columns, arrays)
    sizes = np.array([a.size for a in first], dtype=np.int64)
    key = (xp.__name__, CHUNK, itemsize, addresses.tobytes(), sizes.tobytes(), tuple(tags))
    if key in _tables:
        _tables[key] = _tables.pop(key)                                   # now the most recently used
    else:
        counts = -(-sizes // CHUNK)                                       # chunks of each array
        array_of = np.repeat(np.arange(len(first)), counts)               # (n_chunks,)
        start = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)) * CHUNK
        table = np.empty((len(array_of), len(columns) + 2), dtype=np.int64)
        table[:, :-2] = (addresses[:, array_of] + start * itemsize).T
        table[:, -2] = np.minimum(CHUNK, sizes[array_of] - start)
        table[:, -1] = np.asarray(tags, dtype=np.int64)[array_of]
        if len(_tables) == MAX_TABLES:
            del _tables[next(iter(_tables))]                              # the least recently used
        _tables[key] = xp.asarray(table)   # CuPy copies through pinned memory: no wait for the device
    return _tables[key]


def _contiguous(a):
    return a if a.flags.c_contiguous else a.copy()


def _empty_like(a):
    return array_module(a).empty(a.shape, dtype=a.dtype)
