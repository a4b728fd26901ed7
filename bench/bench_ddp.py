"""Data-parallel throughput: train.py's training step (Trainer.train_step) on N MPI ranks against 1
process, on the same global batch, each configuration under its own `mpiexec`.

    python bench/bench_ddp.py                        # 1 rank x 2 threads, 1 x 1, 2 ranks x 1 thread
    python bench/bench_ddp.py --config 2x1 --config 1x2 --steps 10 --rounds 3

A configuration RxT is R ranks with T BLAS threads each. Every configuration runs once a round,
in turn, for --rounds rounds (the order reversed every other round), so a drift of a shared
machine's speed weighs on them alike. Reports tokens/s of the global batch, milliseconds per step
and the time of one gradient allreduce on its own (medians over the rounds), and the largest peak
RSS of a rank; appends a row per configuration to bench/results.jsonl, with ratio_vs_1rank the
median over the rounds of the tokens/s over those of the 1-rank configuration with the most
threads in the same round (ratio_range: the lowest and highest).
Needs mpi4py and mpiexec: pip install "numgpt[mpi]".
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (alternating, append_result, blas_thread_env, median_and_range, median_ms,  # noqa: E402
                          non_negative_int, peak_rss_mib, positive_int)

# the TinyStories tutorial's model and global batch (vocab 50257, dropout 0.1, as train.py's preset)
SHAPE = dict(n_layer=4, n_embd=128, n_head=4, block_size=64, batch_size=32)
DROPOUT = 0.1
DEFAULT_CONFIGS = ["1x2", "1x1", "2x1"]


def child(args):
    """One rank: time train_step on the embedded stories; rank 0 prints the results as JSON."""
    from mpi4py import MPI

    from numgpt.distributed import mpi_world
    from numgpt.errors import NumGPTError
    from numgpt.training import TrainConfig, Trainer

    comm = mpi_world()
    cfg = TrainConfig(dataset="embedded", cache_dir=args.cache_dir, out_dir=args.out_dir, dropout=DROPOUT,
                      num_samples=0, **SHAPE)
    trainer = Trainer(cfg, log=lambda message: None, progress=False, comm=comm)
    try:
        trainer.setup()
    except NumGPTError as error:   # an unwritable --cache-dir, say: its message, for the parent to show
        sys.exit(comm.fail(f"error: {error}", 2))
    times = []
    for step in range(args.warmup + args.steps):
        comm.barrier()
        started = time.perf_counter()
        trainer.train_step()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    allreduce = []
    for _ in range(5):   # the gradients are spent: average them again, for the clock alone
        comm.barrier()
        started = time.perf_counter()
        comm.allreduce_mean(trainer.flat_grads)
        allreduce.append(time.perf_counter() - started)
    rss = comm.comm.allreduce(peak_rss_mib(), op=MPI.MAX)
    if comm.rank == 0:
        print(json.dumps({"step_ms": median_ms(times), "allreduce_ms": median_ms(allreduce), "peak_rss_mib": rss,
                          "grad_mib": trainer.flat_grads.nbytes / 2**20}))


def run_config(mpiexec, ranks, threads, args, cache_dir, out_dir):
    """Results of `ranks` ranks with `threads` BLAS threads each, from a fresh mpiexec. `out_dir` is
    the run's own: Trainer.setup cleans the out-dir of stale temporary files, which in the token cache
    could be another process's tokenization in progress."""
    command = [mpiexec, "-n", str(ranks), sys.executable, os.path.abspath(__file__), "--child",
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--cache-dir", cache_dir, "--out-dir", out_dir]
    out = subprocess.run(command, capture_output=True, text=True, env=blas_thread_env(threads))
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        sys.exit(f"bench_ddp: {ranks}x{threads} failed: {lines[0] if lines else f'exit status {out.returncode}'}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def config_arg(text):
    """An argparse type: RxT, R ranks with T BLAS threads each, as (R, T)."""
    match = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected RxT, R ranks with T threads each (such as 2x1), got {text!r}")
    return int(match[1]), int(match[2])


def run_rounds(mpiexec, configs, args, cache_dir):
    """{config: [its result in each round]}: every configuration once a round, in turn, the order
    reversed every other round (A B, B A, ...). The shared machines' speed drifts within minutes, so
    configurations timed one after the other would compare two moments as much as two set-ups."""
    results = {config: [] for config in configs}
    with tempfile.TemporaryDirectory(prefix="numgpt-bench-ddp-") as out_dirs:
        for config in alternating(configs, args.rounds):
            out_dir = tempfile.mkdtemp(dir=out_dirs)   # a fresh one each: no run sees another's files
            results[config].append(run_config(mpiexec, *config, args, cache_dir, out_dir))
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=config_arg, action="append", metavar="RxT",
                   help=f"repeatable; default: {' '.join(DEFAULT_CONFIGS)}")
    p.add_argument("--steps", type=positive_int, default=8, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=2,
                   help="times each configuration runs, alternating with the others (medians are reported)")
    p.add_argument("--cache-dir", help="token cache (default: a temporary directory)")
    p.add_argument("--out-dir", help=argparse.SUPPRESS)   # child mode
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results.jsonl")
    args = p.parse_args()
    if args.child:
        return child(args)

    configs = list(dict.fromkeys(args.config or map(config_arg, DEFAULT_CONFIGS)))
    baseline = max((c for c in configs if c[0] == 1), key=lambda c: c[1], default=None)   # 1 rank, most threads
    if baseline is None:
        p.error("give a 1-rank configuration (1xT) too: it is the baseline")
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None or importlib.util.find_spec("mpi4py") is None:
        sys.exit('bench_ddp needs mpiexec and mpi4py: pip install "numgpt[mpi]"')
    tokens = SHAPE["batch_size"] * SHAPE["block_size"]
    if args.cache_dir:
        runs = run_rounds(mpiexec, configs, args, args.cache_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="numgpt-bench-tokens-") as cache_dir:
            runs = run_rounds(mpiexec, configs, args, cache_dir)
    print(f"tutorial shape {SHAPE}, global batch {SHAPE['batch_size']} x {SHAPE['block_size']} tokens, "
          f"gradients {runs[baseline][0]['grad_mib']:.1f} MiB; medians of {args.rounds} alternating rounds")
    versus = "vs " + "x".join(map(str, baseline))
    print(f"{'ranks':>5} {'threads':>7} {'tok/s':>8} {'step ms':>8} {'allreduce ms':>12} {versus:>7} "
          f"{'RSS MiB/rank':>12}")
    for (ranks, threads), rounds in runs.items():
        step_ms = statistics.median(r["step_ms"] for r in rounds)
        allreduce_ms = statistics.median(r["allreduce_ms"] for r in rounds)
        rss = max(r["peak_rss_mib"] for r in rounds)
        # each round's ratio compares runs minutes apart at most; their median is the one reported
        ratio, ratio_range = median_and_range([ref["step_ms"] / r["step_ms"] for r, ref in zip(rounds, runs[baseline])])
        print(f"{ranks:>5} {threads:>7} {tokens / (step_ms / 1000):>8.0f} {step_ms:>8.1f} {allreduce_ms:>12.2f} "
              f"{ratio:>7.2f} {rss:>12.0f}")
        if not args.no_save:
            append_result({"backend": "numpy", "device": "cpu", "bench": "ddp",
                           "shape": {**SHAPE, "vocab_size": 50257, "dropout": DROPOUT}, "ranks": ranks,
                           "threads_per_rank": threads, "tok_s": round(tokens / (step_ms / 1000), 1),
                           "ratio_vs_1rank": ratio, "ratio_range": ratio_range,
                           "grad_mib": round(rounds[0]["grad_mib"], 1),
                           "peak_rss_mib": round(rss, 1), "step_ms": round(step_ms, 2),
                           "allreduce_ms": round(allreduce_ms, 2), "steps": args.steps, "warmup": args.warmup,
                           "rounds": args.rounds})


if __name__ == "__main__":
    main()
