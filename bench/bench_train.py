"""Training-step benchmark: numgpt against PyTorch (transformers' GPT2LMHeadModel + torch.optim.AdamW)
on the same shapes and thread count, each in its own process so peak memory is its own, the two
alternating over --rounds rounds in ABBA order (numgpt, torch, torch, numgpt, ...).

    python bench/bench_train.py                       # the two CPU shapes below
    python bench/bench_train.py --shape tutorial --steps 10
    python bench/bench_train.py --backend cupy --shape gpt2-124m-1k --precision fp16 --batch-size 16
    python bench/bench_train.py --backend cupy --shape gpt2-124m-1k --precision fp16 --batch-size max

Reports tokens/s, milliseconds per step split into forward, backward and optimizer (on a GPU,
tokens/s and the step come from steps run back to back, the split from steps with a wait after each
part), achieved GFLOP/s, peak memory (RSS on the CPU, the memory pool on the GPU), each time the
median over the rounds and the memory their highest, and the ratios (tokens/s: the median of the
rounds' own ratios, their range in `ratio_range`); appends rows to bench/results.jsonl. Two
fractions of a peak: `roofline`, against the best matmul rate measured here in the same run (sgemm
on the CPU; on the GPU cuBLAS in the chosen precision), and on GPUs whose datasheet we know `mfu`,
against its dense peak (PaLM's model FLOPs utilization).
On the GPU, PyTorch runs on CUDA at the same precision: TF32 matmuls, or autocast to float16 with a
GradScaler; --torch-compile compiles its model as well. `--batch-size max` finds each side's
largest batch among 8, 16, 32, ... (from the shape's) with runs of three steps, compares the two at
the largest that fits both (over the rounds), and times a side that fits more at its own largest
too, once (`largest_batch_tok_s`, `ratio_vs_torch_at_largest`).
"""

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (OUT_OF_MEMORY, ChildOutOfMemory, alternating, append_result,  # noqa: E402
                          blas_thread_env, blas_threads, device_name_or_error, device_sync, gpu_memory_mib,
                          is_out_of_memory, load_average, median_and_range, median_ms, non_negative_int,
                          peak_rss_mib, positive_int, run_child, run_with_blas_threads, timed)

SHAPES = {   # vocab 50257; dropout as the tutorial preset, and 0 for GPT-2 pretraining (as nanoGPT and llm.c)
    "tutorial": dict(n_layer=4, n_embd=128, n_head=4, block_size=64, batch_size=32, dropout=0.1),
    "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12, block_size=256, batch_size=4, dropout=0.1),
    "gpt2-124m-1k": dict(n_layer=12, n_embd=768, n_head=12, block_size=1024, batch_size=8, dropout=0.0),   # GPUs
}
CPU_SHAPES = ("gpt2-124m", "tutorial")
VOCAB = 50257
# dense peak TFLOP/s from NVIDIA's datasheets (their tensor-core figures "with sparsity", halved), by a
# part of the name CUDA reports; the first match wins, so a variant comes before its family
DATASHEET_TFLOPS = (
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "fp16": 756.5}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5}),
    ("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5}),
    ("GH200", {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4}),   # its H100 (or H200) part
    ("H100", {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4}),   # SXM
    ("H200", {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4}),   # SXM
    ("A100", {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0}),
)


def flops_per_step(shape):
    """Matmul FLOPs of one forward+backward (nanoGPT's estimate_mfu): 6 N + 12 L C T per token,
    N the parameters that multiply (all but the position embedding; the tied wte as output layer)."""
    L, C, T, B = shape["n_layer"], shape["n_embd"], shape["block_size"], shape["batch_size"]
    n_matmul = 12 * L * C * C + VOCAB * C
    return (6 * n_matmul + 12 * L * C * T) * B * T


def matmul_peak_gflops(backend="numpy", precision="fp32", repeats=10):
    """The best matmul rate in GFLOP/s (the roofline): float32 BLAS on the CPU; on the GPU, cuBLAS
    in the precision under test (float32, TF32, or float16 operands with float32 accumulation)."""
    from numgpt.backend import get_xp
    from numgpt.precision import set_tf32
    xp = get_xp(backend)
    n = 2048 if backend == "numpy" else 8192
    dtype = np.float16 if precision == "fp16" else np.float32
    set_tf32(xp, precision == "tf32")
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), dtype=dtype)
    b = xp.asarray(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32), dtype=dtype)
    sync = device_sync(backend)
    a @ b
    best = min(timed(lambda: a @ b, sync)[1] for _ in range(repeats))
    if backend != "numpy":   # hand the pool's blocks back: the children need the GPU's memory
        del a, b
        xp.get_default_memory_pool().free_all_blocks()
    return 2 * n ** 3 / best / 1e9


def datasheet_gflops(device, precision):
    """The datasheet's dense peak of `device` in `precision`, in GFLOP/s; None for one not listed."""
    for name, peaks in DATASHEET_TFLOPS:
        if name in device:
            return peaks[precision] * 1000
    return None


def batches(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    B, T = shape["batch_size"], shape["block_size"]
    return [(rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T))) for _ in range(steps)]


def time_steps(step_parts, shape, steps, warmup, sync, pipelined=False):
    """Run warmup + steps training steps; {part: [seconds of each timed step]}.

    step_parts(x, y) returns the step's three parts, forward, backward and optimizer, as functions
    to be called in that order (each is timed on its own, the device synchronised around it). With
    `pipelined` (on a GPU) `steps` more steps run back to back with one wait at the end, and
    "step" holds their mean: the throughput when the host queues work ahead of the device, as in
    training, which the per-part waits forbid. (Both wait once inside an fp16 step, for the
    overflow check that decides whether the step is applied: torch's GradScaler reads it back too.)"""
    times = {"forward": [], "backward": [], "optimizer": []}
    for i, (x, y) in enumerate(batches(shape, warmup + steps)):
        for part, fn in zip(times, step_parts(x, y)):
            _, seconds = timed(fn, sync)
            if i >= warmup:
                times[part].append(seconds)
    if pipelined:
        more = batches(shape, steps, seed=1)
        run = lambda: [fn() for x, y in more for fn in step_parts(x, y)]
        times["step"] = [timed(run, sync)[1] / steps]
    return times


def bench_numgpt(shape, steps, warmup, backend, precision):
    import numgpt
    from numgpt.backend import get_xp
    from numgpt.precision import DynamicLossScaler, all_finite, set_tf32
    xp = get_xp(backend)
    set_tf32(xp, precision == "tf32")
    config = numgpt.GPTConfig(vocab_size=VOCAB, block_size=shape["block_size"], n_layer=shape["n_layer"],
                              n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=shape["dropout"])
    model = numgpt.GPT(config, backend=backend, matmul_dtype="float16" if precision == "fp16" else None)
    opt = numgpt.AdamW(model.params, lr=1e-4, weight_decay=0.01)
    scaler = DynamicLossScaler() if precision == "fp16" else None
    state = {}

    def step_parts(x, y):
        def forward():
            model.forward(x, y, return_logits=False, loss_scale=scaler.scale if scaler else 1.0, loss_on_device=True)

        def backward():
            state["grads"] = model.backward()

        def optimizer():   # as train.py: an overflowed fp16 step lowers the scale and is skipped
            finite = scaler is None or all_finite(state["grads"].values())
            if scaler:
                scaler.update(finite)
            if finite:
                opt.step(state["grads"])
        return forward, backward, optimizer

    times = time_steps(step_parts, shape, steps, warmup, device_sync(backend), pipelined=backend == "cupy")
    return times, (gpu_memory_mib() if backend == "cupy" else peak_rss_mib())


def bench_torch(shape, steps, warmup, threads, backend, precision, compile_model):
    import torch
    import transformers
    torch.set_num_threads(threads)
    device = "cuda" if backend == "cupy" else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=shape["block_size"], n_embd=shape["n_embd"],
                                     n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=shape["dropout"],
                                     embd_pdrop=shape["dropout"], attn_pdrop=shape["dropout"])
    model = transformers.GPT2LMHeadModel(config).to(device).train()
    run_model = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    state = {}

    def step_parts(x, y):
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

        def forward():
            with torch.autocast(device, dtype=torch.float16, enabled=precision == "fp16"):
                logits = run_model(x).logits
            state["loss"] = torch.nn.functional.cross_entropy(logits.float().view(-1, VOCAB), y.view(-1))

        def backward():
            scaler.scale(state["loss"]).backward()

        def optimizer():
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        return forward, backward, optimizer

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = time_steps(step_parts, shape, steps, warmup, sync, pipelined=device == "cuda")
    return times, (torch.cuda.max_memory_reserved() / 2**20 if device == "cuda" else peak_rss_mib())


def child(args):
    """Run one implementation on one shape and print its medians as one JSON line.

    Both implementations run with the malloc setting train.py uses (numgpt.keep_freed_memory):
    the same allocator for both, so the ratio compares the two frameworks, not two mallocs."""
    from numgpt.allocator import keep_freed_memory
    keep_freed_memory()
    shape = {**SHAPES[args.shape], "batch_size": args.batch_size}   # child_args always passes it
    try:
        if args.impl == "numgpt":
            times, memory = bench_numgpt(shape, args.steps, args.warmup, args.backend, args.precision)
        else:
            times, memory = bench_torch(shape, args.steps, args.warmup, args.threads, args.backend,
                                        args.precision, args.torch_compile)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        print(f"{args.impl} ran out of memory at batch size {shape['batch_size']}: {error}", file=sys.stderr)
        sys.exit(OUT_OF_MEMORY)
    pipelined = times.pop("step", None)   # on a GPU: one figure, the mean of steps run back to back
    steps = pipelined or [sum(parts) for parts in zip(*times.values())]
    result = {k + "_ms": median_ms(v) for k, v in times.items()}
    result.update(step_ms=median_ms(steps), peak_mem_mib=memory,
                  step_stat=f"mean of {args.steps} pipelined steps" if pipelined else f"median of {args.steps} steps")
    print(json.dumps(result))


def batch_size_arg(text):
    if text == "max":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'max', got {text!r}") from None


def child_args(name, args, batch_size):
    """The command line of a child run of shape `name` (its batch size `batch_size`)."""
    return ["--shape", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads), "--backend", args.backend, "--precision", args.precision,
            "--batch-size", str(batch_size), *(["--torch-compile"] if args.torch_compile else [])]


def run_side(impl, name, args, batch_size):
    """The result of a child run of `impl` at shape `name` and batch size `batch_size` (the rest of its
    command line from `args`), its batch size included; ChildOutOfMemory when it runs out of memory.
    The child's environment gives its BLAS --threads threads: NumPy reads it when it loads, before
    the child could act on its own --threads (which sets torch's)."""
    command = ["--impl", impl, *child_args(name, args, batch_size)]
    result = run_child(__file__, command, env=blas_thread_env(args.threads))
    return {**result, "batch_size": batch_size}


# --batch-size max probes a batch size with one warmup step, one timed and (on the GPU) one pipelined:
# three steps allocate all that a step ever holds (AdamW's moments appear in the first; from the second
# on, a step starts while numgpt still holds the previous one's gradients), in a fraction of a whole run
PROBE = {"warmup": 1, "steps": 1}


def largest_batch(impl, name, args, start):
    """The largest of the batch sizes start, 2 start, 4 start, ... with which `impl` runs shape `name`:
    each is probed with a short run until one runs out of memory. ChildOutOfMemory when `start` does."""
    probe = argparse.Namespace(**{**vars(args), **PROBE})
    batch_size = start
    while True:
        try:
            run_side(impl, name, probe, batch_size)
        except ChildOutOfMemory:
            if batch_size == start:
                raise
            print(f"{impl}: batch size {batch_size} runs out of memory")
            return batch_size // 2
        print(f"{impl}: batch size {batch_size} fits")
        batch_size *= 2


def combine(runs):
    """One side's result from its runs in several rounds: the median of each time, the highest peak memory."""
    times = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key.endswith("_ms")}
    return {**runs[0], **times, "peak_mem_mib": max(r["peak_mem_mib"] for r in runs)}


def compare(name, args, impls, batch_size):
    """({impl: its runs combined}, [numgpt's tokens/s over torch's in each round]) of --rounds rounds
    at `batch_size`. Each round runs every side once, in ABBA order (numgpt, torch, torch, numgpt, ...):
    a shared machine's speed drifts within minutes, so two processes run one after the other compare
    two moments as much as two frameworks, and a ratio within a round, its sides run next to each
    other and in turns first, drifts least. Its median over the rounds is the one reported."""
    runs = {impl: [] for impl in impls}
    for impl in alternating(impls, args.rounds):
        runs[impl].append(run_side(impl, name, args, batch_size))
    ratios = [ref["step_ms"] / ours["step_ms"] for ours, ref in zip(runs["numgpt"], runs.get("torch", ()))]
    return {impl: combine(r) for impl, r in runs.items()}, ratios


def runs_at_largest(name, args, impls):
    """--batch-size max: ({impl: timed runs combined} at the largest batch that fits every side, the
    comparison; its per-round ratios; {impl: timed run} at each side's own largest batch), the batches
    doubled from the shape's.

    The side that fits the least has its comparison run there. A side that fits more runs again at its
    own largest, and is left out of the second if that run runs out of memory: a whole run can need a
    little more memory than the probe did."""
    largest = {impl: largest_batch(impl, name, args, SHAPES[name]["batch_size"]) for impl in impls}
    batch_size = min(largest.values())
    results, ratios = compare(name, args, impls, batch_size)
    at_largest = {}
    for impl, size in largest.items():
        try:
            at_largest[impl] = results[impl] if size == batch_size else run_side(impl, name, args, size)
        except ChildOutOfMemory:
            print(f"{impl}: batch size {size} fit the probe but runs out of memory in a whole run: left out")
    return results, ratios, at_largest


def add_rates(result, name):
    """Add tokens/s and GFLOP/s to `result`, a run of shape `name` at its own batch size."""
    shape = {**SHAPES[name], "batch_size": result["batch_size"]}
    seconds = result["step_ms"] / 1000
    result.update(tok_s=shape["batch_size"] * shape["block_size"] / seconds,
                  gflops=flops_per_step(shape) / seconds / 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), action="append",
                   help=f"repeatable; default: {', '.join(CPU_SHAPES)}")
    p.add_argument("--steps", type=positive_int, default=10,
                   help="timed steps: the medians of the forward, backward and optimizer are reported, and on the "
                        "CPU the step's; on a GPU the step (and tokens/s) is the mean of as many steps again, run "
                        "back to back (step_stat in the row)")
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--rounds", type=positive_int, default=2,
                   help="runs of each side, in ABBA order; the ratio is the median of the rounds' (default 2)")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "fp16"], help="tf32 and fp16: GPU only")
    p.add_argument("--batch-size", type=batch_size_arg,
                   help="override the shape's batch size; 'max': compare at the largest (doubling) that fits "
                        "both sides, and time each side at its own largest too")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the reference model")
    p.add_argument("--impl", choices=["numgpt", "torch"], help=argparse.SUPPRESS)   # child mode
    p.add_argument("--threads", type=positive_int, default=blas_threads(),
                   help="threads for NumPy's BLAS and torch (default: NumPy's BLAS's own count)")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results.jsonl")
    args = p.parse_args()
    if args.impl:
        args.shape = args.shape[0]
        return child(args)
    if args.precision != "fp32" and args.backend == "numpy":
        p.error(f"--precision {args.precision} is a GPU mode: add --backend cupy")
    if args.batch_size == "max" and args.backend == "numpy":
        p.error("--batch-size max searches for what fits in GPU memory: add --backend cupy")
    device = device_name_or_error(p, args.backend)
    run_with_blas_threads(args.threads)   # the matmul peak below is measured in this process
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        impls = ("numgpt", "torch")
    except ImportError:
        print("(torch/transformers not installed: no reference)")
        impls = ("numgpt",)

    peak = matmul_peak_gflops(args.backend, args.precision)
    datasheet = datasheet_gflops(device, args.precision)
    memory = "RSS MiB" if args.backend == "numpy" else "GPU MiB"
    header = f"{'shape':<12} {'impl':<7} {'batch':>5} {'tok/s':>8} {'step ms':>8} {'fwd':>7} {'bwd':>7} " \
             f"{'opt':>6} {'GFLOP/s':>8} {'roofline':>8} {'MFU':>5} {memory:>8}"
    for name in args.shape or CPU_SHAPES:
        load_before = load_average()
        try:
            if args.batch_size == "max":
                results, ratios, at_largest = runs_at_largest(name, args, impls)
            else:
                results, ratios = compare(name, args, impls, args.batch_size or SHAPES[name]["batch_size"])
                at_largest = {}
        except ChildOutOfMemory as error:
            hint = "" if args.batch_size == "max" else "; try a smaller --batch-size, or --batch-size max"
            print(f"{name}: {error}{hint}: skipped")
            continue
        # the comparison's runs, then those of a side at a larger batch of its own
        runs = [*results.items(), *((impl, r) for impl, r in at_largest.items() if r is not results[impl])]
        for _, r in runs:
            add_rates(r, name)
        # a shared machine's speed drifts: the roofline is the best matmul rate measured so far in this
        # invocation (before the first shape and after each), so a slow moment never inflates the fraction
        peak = max(peak, matmul_peak_gflops(args.backend, args.precision))
        load_after = load_average()
        print(f"matmul peak: {peak:.1f} GFLOP/s measured"
              + (f", {datasheet:.0f} on the datasheet" if datasheet else "")
              + f" ({args.precision}, {device}, {args.threads} CPU threads); medians of {args.rounds} rounds; "
              + f"load average {load_before} before, {load_after} after")
        print(header)
        for impl, r in runs:
            mfu = f"{r['gflops'] / datasheet:.0%}" if datasheet else "-"
            print(f"{name:<12} {impl:<7} {r['batch_size']:>5} {r['tok_s']:>8.0f} {r['step_ms']:>8.1f} "
                  f"{r['forward_ms']:>7.1f} {r['backward_ms']:>7.1f} {r['optimizer_ms']:>6.1f} {r['gflops']:>8.1f} "
                  f"{r['gflops'] / peak:>8.0%} {mfu:>5} {r['peak_mem_mib']:>8.0f}")
        ours, ref = results["numgpt"], results.get("torch")
        shape = {**SHAPES[name], "batch_size": ours["batch_size"]}
        memory_key = "peak_rss_mib" if args.backend == "numpy" else "peak_gpu_mib"
        row = {"backend": args.backend, "device": device, "bench": "train",
               "precision": args.precision, "shape": {**shape, "vocab_size": VOCAB},
               "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
               "load_avg_1m_before": load_before,
               "tok_s": round(ours["tok_s"], 1), "step_ms": round(ours["step_ms"], 2), "step_stat": ours["step_stat"],
               "forward_ms": round(ours["forward_ms"], 2), "backward_ms": round(ours["backward_ms"], 2),
               "optimizer_ms": round(ours["optimizer_ms"], 2), memory_key: round(ours["peak_mem_mib"], 1),
               "gflops": round(ours["gflops"], 1), "roofline": round(ours["gflops"] / peak, 3),
               "matmul_peak_gflops": round(peak, 1)}
        if datasheet:
            row.update(mfu=round(ours["gflops"] / datasheet, 3), datasheet_peak_gflops=datasheet)
        if at_largest:   # --batch-size max: what each side does with all the memory it can use (a side
            # whose whole run at its largest ran out of memory has no entry: no run measured it there)
            row.update(largest_batch={impl: r["batch_size"] for impl, r in at_largest.items()},
                       largest_batch_tok_s={impl: round(r["tok_s"], 1) for impl, r in at_largest.items()})
        if ref:
            ratio, ratio_range = median_and_range(ratios)
            row.update(ratio_vs_torch=ratio, ratio_range=ratio_range, torch_tok_s=round(ref["tok_s"], 1),
                       torch_gflops=round(ref["gflops"], 1), torch_compile=args.torch_compile,
                       **{f"torch_{memory_key}": round(ref["peak_mem_mib"], 1)},
                       memory_ratio_vs_torch=round(ours["peak_mem_mib"] / ref["peak_mem_mib"], 3))
            if datasheet:
                row.update(torch_mfu=round(ref["gflops"] / datasheet, 3))
            print(f"{name}: numgpt / torch = {row['ratio_vs_torch']:.2f}x tokens/s (the median of {len(ratios)} "
                  f"rounds' ratios, {min(ratios):.2f}-{max(ratios):.2f}x), "
                  f"{row['memory_ratio_vs_torch']:.2f}x peak memory")
        if {"numgpt", "torch"} <= at_largest.keys():
            ours_largest, ref_largest = at_largest["numgpt"], at_largest["torch"]
            row.update(ratio_vs_torch_at_largest=round(ours_largest["tok_s"] / ref_largest["tok_s"], 3))
            print(f"{name}: numgpt / torch = {row['ratio_vs_torch_at_largest']:.2f}x tokens/s, each at its "
                  f"largest batch ({ours_largest['batch_size']} / {ref_largest['batch_size']})")
        if not args.no_save:
            append_result(row)


if __name__ == "__main__":
    main()
