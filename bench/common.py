"""Shared pieces of the benchmarks: the machine and device, timers, peak memory, child runs, results rows."""

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(CHECKOUT, "bench", "results.jsonl")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def available_cores():
    """The cores this process may run on: its affinity mask where the OS has one (a container or
    `taskset` can allow fewer than the machine has), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine():
    """A one-line description: CPU model, cores, OS."""
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def peak_rss_mib():
    """This process's peak resident memory in MiB: getrusage's ru_maxrss (in KiB on Linux, in bytes
    on macOS), or on Windows, which has no getrusage, the process's peak working set."""
    if sys.platform == "win32":
        return windows_peak_working_set() / 2**20
    import resource   # Unix only: imported here, so that the benchmarks start on Windows
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def windows_peak_working_set():
    """The peak working set of this process in bytes, from psapi's GetProcessMemoryInfo."""
    import ctypes
    size_t, dword = ctypes.c_size_t, ctypes.c_uint32

    class ProcessMemoryCounters(ctypes.Structure):   # PROCESS_MEMORY_COUNTERS, field by field
        _fields_ = [("cb", dword), ("PageFaultCount", dword), ("PeakWorkingSetSize", size_t),
                    ("WorkingSetSize", size_t), ("QuotaPeakPagedPoolUsage", size_t),
                    ("QuotaPagedPoolUsage", size_t), ("QuotaPeakNonPagedPoolUsage", size_t),
                    ("QuotaNonPagedPoolUsage", size_t), ("PagefileUsage", size_t), ("PeakPagefileUsage", size_t)]

    counters = ProcessMemoryCounters(cb=ctypes.sizeof(ProcessMemoryCounters))
    process = ctypes.windll.kernel32.GetCurrentProcess()
    if not ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb):
        raise OSError("GetProcessMemoryInfo failed")
    return counters.PeakWorkingSetSize


# OpenBLAS reads its own variable (else OpenMP's), MKL its own (else OpenMP's), an OpenMP pool such as
# torch's the last; each library reads them once, when it loads, never again (train.py names them too:
# it sets them before NumPy loads, importing nothing from here)
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


def blas_threads():
    """The number of threads NumPy's BLAS runs with: threadpoolctl's reading where it is installed,
    else what the environment tells the BLAS, else every core this process may use."""
    try:
        from threadpoolctl import threadpool_info
        return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    except Exception:   # not installed, or no BLAS among the pools it found
        pass
    for variable in BLAS_THREAD_VARIABLES:
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return available_cores()


def blas_thread_env(threads):
    """This process's environment with every BLAS thread variable set to `threads`: a child started
    with it runs NumPy's BLAS (and torch's OpenMP) on that many threads."""
    return {**os.environ, **{variable: str(threads) for variable in BLAS_THREAD_VARIABLES}}


def run_with_blas_threads(threads):
    """Make this process's BLAS run on `threads` threads: unless the environment already says so, set
    it and re-execute this same command line, in place of this process.

    The BLAS reads its thread count once, when NumPy loads it, and a benchmark has imported NumPy long
    before its arguments are parsed; setting the variables now would change nothing but the children's.
    Starting over is the one portable way (threadpoolctl could change a loaded BLAS, but it is not a
    dependency), and costs a second of start-up; the second time round the variables match."""
    if all(os.environ.get(variable) == str(threads) for variable in BLAS_THREAD_VARIABLES):
        return
    # sys.orig_argv (Python 3.10+) keeps the interpreter's own options, such as -m and -X
    command = [sys.executable, *(sys.orig_argv[1:] if hasattr(sys, "orig_argv") else sys.argv)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, blas_thread_env(threads))


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
    """"cpu", or the GPU's name as CUDA gives it (numgpt's ConfigError where CuPy cannot run)."""
    if backend == "numpy":
        return "cpu"
    from numgpt.backend import get_xp, gpu_name   # here: bench_generate.py imports NumPy only in its children
    return gpu_name(get_xp(backend))


def int_at_least(lowest):
    """An argparse type: an integer of at least `lowest`, else a one-line error naming the option."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = lowest - 1
        if value < lowest:
            wanted = "a positive integer" if lowest == 1 else f"an integer of at least {lowest}"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    return parse


positive_int = int_at_least(1)        # counts of steps, rounds, threads, tokens
non_negative_int = int_at_least(0)    # counts that may be none, such as warm-up steps


def device_name_or_error(parser, backend):
    """device_name(backend), or the parser's one-line error (exit status 2) with numgpt's reason where
    the backend cannot run here, such as CuPy missing or no GPU."""
    try:
        return device_name(backend)
    except Exception as error:
        from numgpt.errors import NumGPTError   # here: bench_generate.py imports NumPy only in its children
        if not isinstance(error, NumGPTError):
            raise
        parser.error(str(error))


def alternating(items, rounds):
    """Each of `items` once a round for `rounds` rounds, the order reversed every other round (A B,
    B A, ...; ABBA for two): a shared machine's speed drifts within minutes, and items measured in
    turns, each first as often, meet its slow moments alike."""
    for round_ in range(rounds):
        yield from (items if round_ % 2 == 0 else items[::-1])


def median_and_range(ratios):
    """(the median of the rounds' ratios, [their lowest, highest]), rounded for a results row: the
    ratio within a round compares runs made next to each other, which drift least."""
    return round(statistics.median(ratios), 3), [round(min(ratios), 3), round(max(ratios), 3)]


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


def run_child(script, args, env=None):
    """Run `script` in a fresh Python process (so peak memory is its own), with environment `env`
    (default: this process's), and parse its JSON line; ChildOutOfMemory when the child exited with
    OUT_OF_MEMORY."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if out.returncode == OUT_OF_MEMORY:
        raise ChildOutOfMemory(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "out of memory")
    if out.returncode != 0:
        raise RuntimeError(f"{os.path.basename(script)} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@functools.lru_cache(maxsize=None)   # once a run: the rows of one run measured one version of the code
def git_commit():
    """The checkout's commit, with "-dirty" when it has changes (untracked files included); None
    outside a git checkout or without git. bench/results.jsonl itself is left out of the check: the
    rows a run appends would make every row after its first look dirty."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True,
                              check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results.jsonl"],
                                 cwd=CHECKOUT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if changes.strip() else "")


@functools.lru_cache(maxsize=None)
def versions():
    """Python's version and those of the installed packages a timing depends on, read from their
    metadata (importing torch to ask it would take seconds), and NumPy's BLAS as NumPy reports it."""
    from importlib import metadata
    found = {"python": platform.python_version()}
    for package in ("numpy", "torch", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    # CuPy's distribution is named for its CUDA (cupy-cuda12x and the like); packages_distributions,
    # which would map the module to it, is Python 3.10's
    found.update({"cupy": d.version for d in metadata.distributions()
                  if (d.metadata["Name"] or "").lower().startswith("cupy")})
    try:
        import numpy
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        found["numpy_blas"] = f"{blas['name']} {blas['version']}"
    except Exception:   # an older NumPy without mode="dicts", or a build that does not say
        pass
    return found


def load_average():
    """The 1-minute load average (other processes competing for the cores), where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def append_result(row):
    """Append one JSON row to bench/results.jsonl, stamped with what it takes to trace and weigh it:
    the date and machine, the commit and command that measured it, the versions it ran, and the load
    average when it is written (right after the measurement; a benchmark that also measured it before
    stores that itself)."""
    row = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "commit": git_commit(), "command": sys.argv, "versions": versions(),
           "load_avg_1m": load_average(), **row}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
