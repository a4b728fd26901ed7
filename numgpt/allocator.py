"""Host memory between training steps: keep what a step frees for the next step to reuse.

A NumPy training step allocates its activations and gradients afresh and frees them by its end,
and the next step asks for the same sizes again. glibc's malloc serves a block above its mmap
threshold with a fresh mapping that it unmaps on free, and returns the free top of its heap to the
kernel beyond its trim threshold. Either way the next step's arrays land on new pages, which the
kernel faults in and zeroes one at a time: at the TinyStories tutorial's shape ~19,000 page faults
a step and ~10% of its time (measured: 19,400 -> 110 faults and 662 -> 601 ms a step). Raising both
thresholds keeps freed blocks in the heap, where the next step finds them. PyTorch's caching
allocator on the GPU exists for the same reason; on the CPU, its tuning guides suggest preloading
jemalloc or tcmalloc.
"""

import ctypes
import ctypes.util
import platform

# mallopt's parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above 32 MiB on 64-bit machines: bigger blocks, such as the
# output layer's ~100 MB logits buffer, are still mapped afresh (measured: under 1% of a step)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory():
    """Have glibc's malloc keep freed blocks of up to 32 MiB for reuse. True when it took effect,
    False where the C library is not glibc (macOS, musl), which are left as they are.

    Process-wide and for the process's lifetime: the Trainer (train.py) and the benchmarks call it
    once. Peak memory grows little, because what is kept is what the next step allocates again
    (measured at the tutorial's shape: +6%).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
