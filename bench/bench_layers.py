"""Per-layer benchmark: each layer's forward and backward time and GFLOP/s over GPT-sized shapes,
against the same computation in PyTorch (same thread count, same device) when torch is installed.

    python bench/bench_layers.py                     # the tutorial shape and GPT-2 124M's
    python bench/bench_layers.py --shape gpt2-124m
    python bench/bench_layers.py --backend cupy --shape gpt2-124m-1k --precision fp16

On the GPU each layer also runs with the fused kernels off (`twins`: the NumPy-style code on
CuPy), so the table shows what each layer's kernels gain, and which layers are worth a kernel next.

The `torch/numgpt` column is torch's forward + backward time over numgpt's (above 1: numgpt is the
faster); torch's leaf gradients are dropped between repeats, outside the clock, as numgpt's
backward returns fresh ones.

FLOPs count the matmuls of forward and backward (3x the forward's; elementwise work is free in this
accounting), so a layer without matmuls (embedding, layernorm) shows no GFLOP/s.
"""

import argparse
import contextlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_train import SHAPES, VOCAB  # noqa: E402
from bench.common import (append_result, blas_threads, device_name_or_error, device_sync, median_ms,  # noqa: E402
                          positive_int, run_with_blas_threads, timed)
from numgpt import kernels  # noqa: E402
from numgpt.allocator import keep_freed_memory  # noqa: E402
from numgpt.backend import get_xp  # noqa: E402
from numgpt.layers.attention import attention_backward, attention_forward  # noqa: E402
from numgpt.layers.classifier import classifier_backward, classifier_forward  # noqa: E402
from numgpt.layers.embedding import embedding_backward, embedding_forward  # noqa: E402
from numgpt.layers.layernorm import layernorm_backward, layernorm_forward  # noqa: E402
from numgpt.layers.mlp import mlp_backward, mlp_forward  # noqa: E402
from numgpt.precision import half_matmuls, set_tf32  # noqa: E402


def layer_cases(shape, rng, xp=np):
    """{name: (forward thunk, backward(forward's result) thunk, matmul FLOPs of the forward)}, on
    arrays of module xp."""
    B, T, C, H = shape["batch_size"], shape["block_size"], shape["n_embd"], shape["n_head"]
    f32 = lambda *s: xp.asarray(0.02 * rng.standard_normal(s), dtype=np.float32)   # noqa: E731
    x = xp.asarray(rng.standard_normal((B, T, C)), dtype=np.float32)
    dout = xp.asarray(rng.standard_normal((B, T, C)), dtype=np.float32)
    idx = xp.asarray(rng.integers(0, VOCAB, (B, T)))
    targets = xp.asarray(rng.integers(0, VOCAB, B * T))
    wte, wpe = f32(VOCAB, C), f32(T, C)
    attn = {"c_attn.weight": f32(C, 3 * C), "c_attn.bias": f32(3 * C),
            "c_proj.weight": f32(C, C), "c_proj.bias": f32(C)}
    mlp = {"c_fc.weight": f32(C, 4 * C), "c_fc.bias": f32(4 * C), "c_proj.weight": f32(4 * C, C), "c_proj.bias": f32(C)}
    w, b = xp.ones(C, np.float32), xp.zeros(C, np.float32)
    N = B * T
    return {
        "embedding": (lambda: embedding_forward(idx, wte, wpe), lambda r: embedding_backward(dout, r[1]), 0),
        "layernorm": (lambda: layernorm_forward(x, w, b), lambda r: layernorm_backward(dout, r[1]), 0),
        "attention": (lambda: attention_forward(x, attn, H), lambda r: attention_backward(dout, r[1]),
                      2 * N * C * 4 * C + 2 * 2 * B * T * T * C),
        "mlp": (lambda: mlp_forward(x, mlp), lambda r: mlp_backward(dout, r[1]), 2 * N * C * 8 * C),
        # the classifier computes its gradients inside the forward: 3 matmuls there, none after
        "classifier+loss": (lambda: classifier_forward(x.reshape(N, C), wte, targets, return_logits=False),
                            lambda r: classifier_backward(1.0, r[2]), 2 * N * C * VOCAB),
    }


def torch_cases(shape, rng, threads, device="cpu"):
    """The same layers in PyTorch: ({name: (forward thunk returning output, matmul FLOPs)}, a function
    that drops the leaves' gradients). A backward adds into each leaf's .grad: left in place, every
    repeat after the first would time an extra addition that numgpt's backward, returning fresh
    gradients, never does (nor does training, whose optimizer step drops them: zero_grad(set_to_none))."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    B, T, C, H = shape["batch_size"], shape["block_size"], shape["n_embd"], shape["n_head"]
    tensor = lambda a, grad=True: torch.tensor(a, dtype=torch.float32, device=device, requires_grad=grad)  # noqa: E731
    p = lambda *s: tensor(0.02 * rng.standard_normal(s))  # noqa: E731
    x = tensor(rng.standard_normal((B, T, C)))
    idx = torch.tensor(rng.integers(0, VOCAB, (B, T)), device=device)
    targets = torch.tensor(rng.integers(0, VOCAB, B * T), device=device)
    wte, wpe, w, b = p(VOCAB, C), p(T, C), tensor(np.ones(C)), tensor(np.zeros(C))
    w_attn, b_attn, w_proj, b_proj = p(C, 3 * C), p(3 * C), p(C, C), p(C)
    w_fc, b_fc, w_fc2, b_fc2 = p(C, 4 * C), p(4 * C), p(4 * C, C), p(C)
    leaves = (x, wte, wpe, w, b, w_attn, b_attn, w_proj, b_proj, w_fc, b_fc, w_fc2, b_fc2)

    def drop_grads():
        for leaf in leaves:
            leaf.grad = None

    def attention():
        q, k, v = (x @ w_attn + b_attn).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        return y @ w_proj + b_proj

    N = B * T
    return {
        "embedding": (lambda: F.embedding(idx, wte) + wpe, 0),
        "layernorm": (lambda: F.layer_norm(x, (C,), w, b, 1e-5), 0),
        "attention": (attention, 2 * N * C * 4 * C + 2 * 2 * B * T * T * C),
        "mlp": (lambda: F.gelu(x @ w_fc + b_fc, approximate="tanh") @ w_fc2 + b_fc2, 2 * N * C * 8 * C),
        "classifier+loss": (lambda: F.cross_entropy(x.view(N, C) @ wte.T, targets), 2 * N * C * VOCAB),
    }, drop_grads


def measure(forward, backward, repeats, sync=lambda: None, context=contextlib.nullcontext, after=lambda: None):
    """Median milliseconds of forward and of backward, each run inside a fresh `context()`, then
    `after()` outside the clock."""
    f_times, b_times = [], []
    for i in range(repeats + 1):
        with context():
            out, t_f = timed(forward, sync)
            _, t_b = timed(lambda: backward(out), sync)
        after()
        if i:   # the first call warms up (and on a GPU compiles the kernels)
            f_times.append(t_f)
            b_times.append(t_b)
    return median_ms(f_times), median_ms(b_times)


def torch_settings(precision, device):
    """(context for each forward and backward, sync) that run PyTorch in `precision` on `device`."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    if device == "cpu":
        return contextlib.nullcontext, lambda: None
    context = (lambda: torch.autocast("cuda", dtype=torch.float16)) if precision == "fp16" else contextlib.nullcontext
    return context, torch.cuda.synchronize


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), action="append", help="repeatable; default: all")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "fp16"], help="tf32 and fp16: GPU only")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=blas_threads(),
                   help="threads for NumPy's BLAS and torch (default: NumPy's BLAS's own count)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    if args.precision != "fp32" and args.backend == "numpy":
        p.error(f"--precision {args.precision} is a GPU mode: add --backend cupy")
    device = device_name_or_error(p, args.backend)
    # numgpt's layers run in this process, whose BLAS took its thread count from the environment
    # when NumPy loaded: where that count is not --threads, this starts over with it (after the
    # checks above, so that bad input is refused at once, not after a restart)
    run_with_blas_threads(args.threads)
    keep_freed_memory()   # the allocator train.py runs with, for both frameworks
    xp, gpu = get_xp(args.backend), args.backend == "cupy"
    set_tf32(xp, args.precision == "tf32")
    sync = device_sync(args.backend)
    ours_context = (lambda: half_matmuls("float16")) if args.precision == "fp16" else contextlib.nullcontext
    try:
        import torch
        torch_context, torch_sync = torch_settings(args.precision, "cuda" if gpu else "cpu")
    except ImportError:
        torch = None
        print("(torch not installed: no reference)")
    for name in args.shape or sorted(SHAPES):
        shape = SHAPES[name]
        rng = np.random.default_rng(0)
        cases = layer_cases(shape, rng, xp)
        ours = {layer: measure(fwd, bwd, args.repeats, sync, ours_context) + (flops,)
                for layer, (fwd, bwd, flops) in cases.items()}
        twins = {}
        if gpu:   # the same layers with the kernels off: what the kernels gain
            with kernels.disabled():
                twins = {layer: sum(measure(fwd, bwd, args.repeats, sync, ours_context))
                         for layer, (fwd, bwd, _) in cases.items()}
        ref = {}
        if torch is not None:
            cases, drop_grads = torch_cases(shape, rng, args.threads, "cuda" if gpu else "cpu")
            for layer, (fwd, flops) in cases.items():
                ref[layer] = measure(fwd, lambda out: out.backward(torch.ones_like(out)), args.repeats, torch_sync,
                                     torch_context, after=drop_grads)
        print(f"\n{name}: {shape} ({device}, {args.precision})")
        # the ratio is of times: above 1, numgpt's forward + backward is the faster
        print(f"{'layer':<16} {'fwd ms':>8} {'bwd ms':>8} {'GFLOP/s':>8} {'twins ms':>9} {'torch fwd':>10} "
              f"{'torch bwd':>10} {'torch/numgpt':>12}")
        for layer, (f_ms, b_ms, flops) in ours.items():
            gflops = 3 * flops / ((f_ms + b_ms) / 1000) / 1e9 if flops else float("nan")
            r = ref.get(layer)
            ratio = (r[0] + r[1]) / (f_ms + b_ms) if r else float("nan")
            print(f"{layer:<16} {f_ms:>8.2f} {b_ms:>8.2f} {gflops:>8.1f} {twins.get(layer, float('nan')):>9.2f} "
                  f"{r[0] if r else float('nan'):>10.2f} {r[1] if r else float('nan'):>10.2f} {ratio:>12.2f}")
            if not args.no_save:
                row = {"backend": args.backend, "device": device, "bench": f"layer:{layer}",
                       "precision": args.precision, "shape": shape, "threads": args.threads,
                       "forward_ms": round(f_ms, 3), "backward_ms": round(b_ms, 3),
                       "gflops": None if not flops else round(gflops, 1),
                       "ratio_vs_torch": None if not r else round(ratio, 3)}   # torch's time over numgpt's
                if r:
                    row.update(torch_forward_ms=round(r[0], 3), torch_backward_ms=round(r[1], 3))
                if gpu:
                    row["twins_ms"] = round(twins[layer], 3)
                append_result(row)


if __name__ == "__main__":
    main()
