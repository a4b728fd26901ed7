"""Training-step benchmark: numgpt against PyTorch (transformers' GPT2LMHeadModel + torch.optim.AdamW)
on the same shapes and thread count, each in its own process so peak memory is its own.

    python bench/bench_train.py                       # both shapes below
    python bench/bench_train.py --shape tutorial --steps 10

Reports tokens/s, milliseconds per step split into forward, backward and optimizer, achieved GFLOP/s
against the sgemm peak measured here, peak RSS, and the ratios; appends rows to bench/results.jsonl.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import append_result, median_ms, peak_rss_mib, run_child, timed  # noqa: E402

SHAPES = {   # (n_layer, n_embd, n_head, block_size, batch_size), vocab 50257
    "tutorial": dict(n_layer=4, n_embd=128, n_head=4, block_size=64, batch_size=32),
    "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12, block_size=256, batch_size=4),
}
VOCAB = 50257
DROPOUT = 0.1


def flops_per_step(shape):
    """Matmul FLOPs of one forward+backward (nanoGPT's estimate_mfu): 6 N + 12 L C T per token,
    N the parameters that multiply (all but the position embedding; the tied wte as output layer)."""
    L, C, T, B = shape["n_layer"], shape["n_embd"], shape["block_size"], shape["batch_size"]
    n_matmul = 12 * L * C * C + VOCAB * C
    return (6 * n_matmul + 12 * L * C * T) * B * T


def sgemm_peak_gflops(n=2048, repeats=10):
    """The best float32 matmul rate of this machine's BLAS, in GFLOP/s (the roofline)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(timed(lambda: a @ b)[1] for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def batches(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    B, T = shape["batch_size"], shape["block_size"]
    return [(rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T))) for _ in range(steps)]


def bench_numgpt(shape, steps, warmup, backend):
    import numgpt
    from numgpt.backend import get_xp
    xp = get_xp(backend)
    sync = (lambda: xp.cuda.Device().synchronize()) if backend == "cupy" else (lambda: None)
    config = numgpt.GPTConfig(vocab_size=VOCAB, block_size=shape["block_size"], n_layer=shape["n_layer"],
                              n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=DROPOUT)
    model = numgpt.GPT(config, backend=backend)
    opt = numgpt.AdamW(model.params, lr=1e-4, weight_decay=0.01)
    times = {"forward": [], "backward": [], "optimizer": []}
    for i, (x, y) in enumerate(batches(shape, warmup + steps)):
        _, t_fwd = timed(lambda: model.forward(x, y, return_logits=False), sync)
        grads, t_bwd = timed(model.backward, sync)
        _, t_opt = timed(lambda: opt.step(grads), sync)
        if i >= warmup:
            for k, t in zip(times, (t_fwd, t_bwd, t_opt)):
                times[k].append(t)
    return times


def bench_torch(shape, steps, warmup, threads):
    import torch
    import transformers
    torch.set_num_threads(threads)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=shape["block_size"], n_embd=shape["n_embd"],
                                     n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=DROPOUT,
                                     embd_pdrop=DROPOUT, attn_pdrop=DROPOUT)
    model = transformers.GPT2LMHeadModel(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    times = {"forward": [], "backward": [], "optimizer": []}
    for i, (x, y) in enumerate(batches(shape, warmup + steps)):
        x, y = torch.from_numpy(x), torch.from_numpy(y)

        def forward():
            logits = model(x).logits
            return torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), y.view(-1))

        loss, t_fwd = timed(forward)
        _, t_bwd = timed(loss.backward)
        _, t_opt = timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
        if i >= warmup:
            for k, t in zip(times, (t_fwd, t_bwd, t_opt)):
                times[k].append(t)
    return times


def child(args):
    """Run one implementation on one shape and print its medians as one JSON line."""
    shape = SHAPES[args.shape]
    if args.impl == "numgpt":
        times = bench_numgpt(shape, args.steps, args.warmup, args.backend)
    else:
        times = bench_torch(shape, args.steps, args.warmup, args.threads)
    steps = [sum(parts) for parts in zip(*times.values())]
    result = {k + "_ms": median_ms(v) for k, v in times.items()}
    result.update(step_ms=median_ms(steps), peak_rss_mib=peak_rss_mib())
    print(json.dumps(result))


def blas_threads():
    try:
        from threadpoolctl import threadpool_info
        return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    except Exception:
        return int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), action="append", help="repeatable; default: all")
    p.add_argument("--steps", type=int, default=10, help="timed steps (medians are reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--impl", choices=["numgpt", "torch"], help=argparse.SUPPRESS)   # child mode
    p.add_argument("--threads", type=int, default=blas_threads(), help="threads for BLAS and torch")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results.jsonl")
    args = p.parse_args()
    if args.impl:
        args.shape = args.shape[0]
        return child(args)

    peak = sgemm_peak_gflops()
    header = f"{'shape':<10} {'impl':<7} {'tok/s':>8} {'step ms':>8} {'fwd':>7} {'bwd':>7} {'opt':>6} " \
             f"{'GFLOP/s':>8} {'roofline':>8} {'RSS MiB':>8}"
    for name in args.shape or sorted(SHAPES):
        shape = SHAPES[name]
        common = ["--shape", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--threads", str(args.threads), "--backend", args.backend]
        results = {"numgpt": run_child(__file__, ["--impl", "numgpt", *common])}
        # a shared machine's speed drifts: the roofline is the best sgemm rate seen before and right
        # after the run, so a slow moment of the machine never inflates the fraction
        peak = max(peak, sgemm_peak_gflops())
        print(f"sgemm peak: {peak:.1f} GFLOP/s ({args.threads} threads)")
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
            results["torch"] = run_child(__file__, ["--impl", "torch", *common])
        except ImportError:
            print("(torch/transformers not installed: no reference)")
        tokens = shape["batch_size"] * shape["block_size"]
        print(header)
        for impl, r in results.items():
            r["tok_s"] = tokens / (r["step_ms"] / 1000)
            r["gflops"] = flops_per_step(shape) / (r["step_ms"] / 1000) / 1e9
            print(f"{name:<10} {impl:<7} {r['tok_s']:>8.0f} {r['step_ms']:>8.1f} {r['forward_ms']:>7.1f} "
                  f"{r['backward_ms']:>7.1f} {r['optimizer_ms']:>6.1f} {r['gflops']:>8.1f} "
                  f"{r['gflops'] / peak:>8.0%} {r['peak_rss_mib']:>8.0f}")
        ours, ref = results["numgpt"], results.get("torch")
        row = {"backend": args.backend, "device": "cpu" if args.backend == "numpy" else "gpu", "bench": "train",
               "shape": {**shape, "vocab_size": VOCAB, "dropout": DROPOUT}, "threads": args.threads,
               "tok_s": round(ours["tok_s"], 1), "step_ms": round(ours["step_ms"], 2),
               "forward_ms": round(ours["forward_ms"], 2), "backward_ms": round(ours["backward_ms"], 2),
               "optimizer_ms": round(ours["optimizer_ms"], 2), "peak_rss_mib": round(ours["peak_rss_mib"], 1),
               "mfu": round(ours["gflops"] / peak, 3), "sgemm_peak_gflops": round(peak, 1)}
        if ref:
            row.update(ratio_vs_torch=round(ours["tok_s"] / ref["tok_s"], 3), torch_tok_s=round(ref["tok_s"], 1),
                       memory_ratio_vs_torch=round(ours["peak_rss_mib"] / ref["peak_rss_mib"], 3))
            print(f"{name}: numgpt / torch = {row['ratio_vs_torch']:.2f}x tokens/s, "
                  f"{row['memory_ratio_vs_torch']:.2f}x peak memory")
        if not args.no_save:
            append_result(row)


if __name__ == "__main__":
    main()
