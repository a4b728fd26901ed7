"""Generation benchmark: numgpt's KV-cached greedy generate against transformers' generate, on the CPU.

    python bench/bench_generate.py                      # GPT-2 124M shape, batch 1, 16-token prompt, 200 new tokens
    python bench/bench_generate.py --new-tokens 50 --repeats 1 --no-save

Both run the same random weights (the numgpt child saves them, the torch child loads them) in
float32 with the same thread count, each in its own process so peak memory is its own, the two
alternating over --rounds rounds in ABBA order (numgpt, torch, torch, numgpt, ...). Reports
tokens/s (new tokens over the whole generate call, prefill included; the median of --repeats
calls, then of the rounds), numgpt without its cache for scale, peak RSS while generating (the
rounds' highest), and the ratio (the median of the rounds' own ratios, their range in
`ratio_range`); checks that every run produced the same tokens; appends a row to
bench/results.jsonl. With --backend cupy numgpt
generates on the GPU alone: transformers runs on the CPU here, which is no reference for a GPU, so
that row has no ratio.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (alternating, append_result, available_cores, blas_thread_env,  # noqa: E402
                          device_name_or_error, load_average, median_and_range, non_negative_int, peak_rss_mib,
                          positive_int, run_child, timed)

SHAPE = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)   # GPT-2 124M


def reset_peak_rss():
    """Start peak-memory accounting afresh (Linux), so the peak is that of generating, not of
    building or loading the model (numgpt initialises in float64 before casting)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def prompt_ids(prompt_len, seed=0):
    import numpy as np
    return np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], size=(1, prompt_len))


def bench_numgpt(args):
    """Time model.generate (and, for scale, a shorter uncached run); save the weights for torch."""
    import numgpt
    model = numgpt.GPT(numgpt.GPTConfig(**SHAPE), backend=args.backend, dtype="float32", seed=args.seed)
    model.save_pretrained(args.weights)
    prompt = prompt_ids(args.prompt_len)
    reset_peak_rss()
    model.generate(prompt, 8, temperature=0)                                        # warm-up
    runs = [timed(lambda: model.generate(prompt, args.new_tokens, temperature=0)) for _ in range(args.repeats)]
    result = {"tokens": runs[0][0][0, args.prompt_len:].tolist(), "seconds": [t for _, t in runs]}
    if args.uncached_tokens:
        out, t = timed(lambda: model.generate(prompt, args.uncached_tokens, temperature=0, use_cache=False))
        assert out[0, args.prompt_len:].tolist() == result["tokens"][:args.uncached_tokens], "cache changed tokens"
        result["uncached_tok_s"] = args.uncached_tokens / t
    return result


def bench_torch(args):
    """Time transformers' GPT2LMHeadModel.generate on the saved weights (greedy, KV cache on)."""
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    model = transformers.GPT2LMHeadModel.from_pretrained(args.weights, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None           # random weights: never stop early
    prompt = torch.from_numpy(prompt_ids(args.prompt_len))
    reset_peak_rss()

    def generate(n):
        with torch.inference_mode():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  do_sample=False, use_cache=True, pad_token_id=0)

    generate(8)                                                                      # warm-up
    runs = [timed(lambda: generate(args.new_tokens)) for _ in range(args.repeats)]
    return {"tokens": runs[0][0][0, args.prompt_len:].tolist(), "seconds": [t for _, t in runs]}


def child(args):
    result = bench_numgpt(args) if args.impl == "numgpt" else bench_torch(args)
    result.update(tok_s=args.new_tokens / statistics.median(result.pop("seconds")), peak_rss_mib=peak_rss_mib())
    print(json.dumps(result))


def combine(runs):
    """One side's result from its runs in several rounds: the median tokens/s (and uncached tokens/s),
    the highest peak memory."""
    medians = {key: statistics.median(r[key] for r in runs) for key in ("tok_s", "uncached_tok_s") if key in runs[0]}
    return {**runs[0], **medians, "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=positive_int, default=200)
    p.add_argument("--prompt-len", type=positive_int, default=16)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed generate calls (the median is reported)")
    p.add_argument("--uncached-tokens", type=non_negative_int, default=16,
                   help="also time numgpt without its KV cache for this many tokens (0: skip)")
    p.add_argument("--threads", type=positive_int, default=available_cores(),
                   help="BLAS threads for NumPy and torch.set_num_threads (default: this process's cores)")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--rounds", type=positive_int, default=2,
                   help="runs of each side, in ABBA order; the ratio is the median of the rounds' (default 2)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results.jsonl")
    p.add_argument("--impl", choices=["numgpt", "torch"], help=argparse.SUPPRESS)   # child mode
    p.add_argument("--weights", help=argparse.SUPPRESS)                             # child mode
    args = p.parse_args()
    if args.impl:
        return child(args)
    if args.uncached_tokens > args.new_tokens:
        p.error(f"--uncached-tokens {args.uncached_tokens} is more than --new-tokens {args.new_tokens}: the uncached "
                f"run checks the first of the cached run's tokens")
    if args.prompt_len + args.new_tokens > SHAPE["block_size"]:   # transformers refuses what numgpt would crop
        p.error(f"--prompt-len + --new-tokens must fit GPT-2's {SHAPE['block_size']} positions")

    device = device_name_or_error(p, args.backend)
    env = blas_thread_env(args.threads)   # read by the children's BLAS when they import NumPy and torch
    common = ["--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len), "--repeats",
              str(args.repeats), "--uncached-tokens", str(args.uncached_tokens), "--threads", str(args.threads),
              "--backend", args.backend, "--seed", str(args.seed)]
    load_before = load_average()          # other processes competing for the cores skew the timings
    impls = ["numgpt"]
    if args.backend != "numpy":
        print(f"(numgpt on {device}: transformers' generate here runs on the CPU, no reference for a GPU)")
    elif importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        print("(torch/transformers not installed: no reference)")
    else:
        impls.append("torch")
    runs = {impl: [] for impl in impls}
    with tempfile.TemporaryDirectory(prefix="numgpt-bench-") as weights:   # numgpt runs first: it saves them
        for impl in alternating(impls, args.rounds):
            runs[impl].append(run_child(__file__, ["--impl", impl, "--weights", weights, *common], env))
    ratios = [ours["tok_s"] / ref["tok_s"] for ours, ref in zip(runs["numgpt"], runs.get("torch", ()))]
    ours, ref = combine(runs["numgpt"]), combine(runs["torch"]) if "torch" in runs else None
    # greedy decoding of the same weights: every run of either side the same tokens, or a bug
    tokens = [r["tokens"] for side in runs.values() for r in side]
    same = all(t == tokens[0] for t in tokens)

    print(f"greedy generation, GPT-2 124M shape (random weights), float32, batch 1, {args.prompt_len}-token "
          f"prompt, {args.new_tokens} new tokens, {args.threads} threads, backend {args.backend} on {device}; "
          f"medians of {args.rounds} rounds (load average before: {load_before})")
    print(f"{'impl':<22} {'tok/s':>8} {'ms/token':>9} {'peak RSS MiB':>13}")
    rows = [("numgpt (KV cache)", ours)] + ([("transformers generate", ref)] if ref else [])
    for name, r in rows:
        print(f"{name:<22} {r['tok_s']:>8.1f} {1000 / r['tok_s']:>9.1f} {r['peak_rss_mib']:>13.0f}")
    if "uncached_tok_s" in ours:
        print(f"{'numgpt (no cache)':<22} {ours['uncached_tok_s']:>8.1f} {1000 / ours['uncached_tok_s']:>9.1f}"
              f"   (first {args.uncached_tokens} tokens only)")

    row = {"backend": args.backend, "device": device, "bench": "generate",
           "shape": {**SHAPE, "batch": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "dtype": "float32"},
           "threads": args.threads, "rounds": args.rounds, "tok_s": round(ours["tok_s"], 2),
           "peak_rss_mib": round(ours["peak_rss_mib"], 1), "tokens_identical": same, "load_avg_1m_before": load_before}
    if ref:
        ratio, ratio_range = median_and_range(ratios)
        row.update(ratio_vs_torch=ratio, ratio_range=ratio_range, torch_tok_s=round(ref["tok_s"], 2))
        print(f"numgpt / transformers = {ratio:.2f}x tokens/s (the median of the rounds' ratios, "
              f"{ratio_range[0]:.2f}-{ratio_range[1]:.2f}x)")
    print(f"every run generated the same tokens: {same}")
    if not args.no_save:
        append_result(row)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
