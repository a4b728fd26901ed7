"""Shared pieces of the benchmarks: the machine and device, timers, peak memory, child runs, results rows."""

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def machine():
    """A one-line description: CPU model, cores, OS."""
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def peak_rss_mib():
    """This process's peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_sync(backend):
    """A function that waits for the device's queued work (a no-op on the CPU): timers need it."""
    if backend == "numpy":
        return lambda: None
    import cupy
    return cupy.cuda.Device().synchronize


def gpu_memory_mib():
    """The most device memory CuPy's pool has held, in MiB (the pool keeps freed blocks, so its size
    is the high-water mark of what numgpt allocated)."""
    import cupy
    return cupy.get_default_memory_pool().total_bytes() / 2**20


def device_name(backend):
    """"cpu", or the GPU's name as CUDA gives it."""
    from numgpt.backend import get_xp, gpu_name   # here: bench_generate.py imports NumPy only in its children
    return "cpu" if backend == "numpy" else gpu_name(get_xp(backend))


def median_ms(samples):
    return 1000 * statistics.median(samples)


def timed(fn, sync=lambda: None):
    """(result, seconds) of fn(), synchronising the device before reading the clock."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


OUT_OF_MEMORY = 3   # a child's exit status when its device (or host) memory ran out


class ChildOutOfMemory(RuntimeError):
    """A child run that ran out of memory (exit status OUT_OF_MEMORY)."""


def is_out_of_memory(error):
    """Whether `error` says an allocation failed: NumPy's and CuPy's MemoryError, torch's
    OutOfMemoryError on CUDA and its allocator's error on the CPU (RuntimeErrors), or cuBLAS failing
    to allocate its workspace."""
    text = str(error)
    return (isinstance(error, MemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text
            or "can't allocate memory" in text)


def run_child(script, args):
    """Run `script` in a fresh Python process (so peak memory is its own) and parse its JSON line;
    ChildOutOfMemory when the child exited with OUT_OF_MEMORY."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode == OUT_OF_MEMORY:
        raise ChildOutOfMemory(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "out of memory")
    if out.returncode != 0:
        raise RuntimeError(f"{os.path.basename(script)} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def append_result(row):
    """Append one JSON row to bench/results.jsonl, stamped with the date and machine."""
    row = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), **row}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
