"""Shared pieces of the benchmarks: the machine's description, peak memory, results rows."""

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


def median_ms(samples):
    return 1000 * statistics.median(samples)


def timed(fn, sync=lambda: None):
    """(result, seconds) of fn(), synchronising the device before reading the clock."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def run_child(script, args):
    """Run `script` in a fresh Python process (so peak memory is its own) and parse its JSON line."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
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
