"""Per-layer benchmark: each layer's forward and backward time and GFLOP/s over GPT-sized shapes,
against the same computation in PyTorch (same thread count) when torch is installed.

    python bench/bench_layers.py                     # the tutorial shape and GPT-2 124M's
    python bench/bench_layers.py --shape gpt2-124m

FLOPs count the matmuls of forward and backward (3x the forward's; elementwise work is free in this
accounting), so a layer without matmuls (embedding, layernorm) shows no GFLOP/s.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_train import SHAPES, VOCAB, blas_threads  # noqa: E402
from bench.common import append_result, median_ms, timed  # noqa: E402
from numgpt.allocator import keep_freed_memory  # noqa: E402
from numgpt.layers.attention import attention_backward, attention_forward  # noqa: E402
from numgpt.layers.classifier import classifier_backward, classifier_forward  # noqa: E402
from numgpt.layers.embedding import embedding_backward, embedding_forward  # noqa: E402
from numgpt.layers.layernorm import layernorm_backward, layernorm_forward  # noqa: E402
from numgpt.layers.mlp import mlp_backward, mlp_forward  # noqa: E402


def layer_cases(shape, rng):
    """{name: (forward thunk, backward(forward's result) thunk, matmul FLOPs of the forward)}."""
    B, T, C, H = shape["batch_size"], shape["block_size"], shape["n_embd"], shape["n_head"]
    f32 = lambda *s: (0.02 * rng.standard_normal(s)).astype(np.float32)   # noqa: E731
    x = rng.standard_normal((B, T, C)).astype(np.float32)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    idx = rng.integers(0, VOCAB, (B, T))
    targets = rng.integers(0, VOCAB, B * T)
    wte, wpe = f32(VOCAB, C), f32(T, C)
    attn = {"c_attn.weight": f32(C, 3 * C), "c_attn.bias": f32(3 * C), "c_proj.weight": f32(C, C), "c_proj.bias": f32(C)}
    mlp = {"c_fc.weight": f32(C, 4 * C), "c_fc.bias": f32(4 * C), "c_proj.weight": f32(4 * C, C), "c_proj.bias": f32(C)}
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
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


def torch_cases(shape, rng, threads):
    """The same layers in PyTorch: {name: (forward thunk returning output, matmul FLOPs)}."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    B, T, C, H = shape["batch_size"], shape["block_size"], shape["n_embd"], shape["n_head"]
    p = lambda *s: torch.tensor(0.02 * rng.standard_normal(s), dtype=torch.float32, requires_grad=True)  # noqa: E731
    x = torch.tensor(rng.standard_normal((B, T, C)), dtype=torch.float32, requires_grad=True)
    idx = torch.tensor(rng.integers(0, VOCAB, (B, T)))
    targets = torch.tensor(rng.integers(0, VOCAB, B * T))
    wte, wpe, w, b = p(VOCAB, C), p(T, C), torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    w_attn, b_attn, w_proj, b_proj = p(C, 3 * C), p(3 * C), p(C, C), p(C)
    w_fc, b_fc, w_fc2, b_fc2 = p(C, 4 * C), p(4 * C), p(4 * C, C), p(C)

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
    }


def measure(forward, backward, repeats):
    f_times, b_times = [], []
    for i in range(repeats + 1):
        out, t_f = timed(forward)
        _, t_b = timed(lambda: backward(out))
        if i:   # the first call warms up
            f_times.append(t_f)
            b_times.append(t_b)
    return median_ms(f_times), median_ms(b_times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), action="append", help="repeatable; default: all")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=blas_threads())
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    keep_freed_memory()   # the allocator train.py runs with, for both frameworks
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
        print("(torch not installed: no reference)")
    for name in args.shape or sorted(SHAPES):
        shape = SHAPES[name]
        rng = np.random.default_rng(0)
        ours = {layer: measure(fwd, bwd, args.repeats) + (flops,)
                for layer, (fwd, bwd, flops) in layer_cases(shape, rng).items()}
        ref = {}
        if have_torch:
            for layer, (fwd, flops) in torch_cases(shape, rng, args.threads).items():
                ref[layer] = measure(fwd, lambda out: out.backward(torch.ones_like(out)), args.repeats)
        print(f"\n{name}: {shape}")
        print(f"{'layer':<16} {'fwd ms':>8} {'bwd ms':>8} {'GFLOP/s':>8} {'torch fwd':>10} {'torch bwd':>10} {'ratio':>6}")
        for layer, (f_ms, b_ms, flops) in ours.items():
            gflops = 3 * flops / ((f_ms + b_ms) / 1000) / 1e9 if flops else float("nan")
            r = ref.get(layer)
            ratio = (r[0] + r[1]) / (f_ms + b_ms) if r else float("nan")
            print(f"{layer:<16} {f_ms:>8.2f} {b_ms:>8.2f} {gflops:>8.1f} "
                  f"{r[0] if r else float('nan'):>10.2f} {r[1] if r else float('nan'):>10.2f} {ratio:>6.2f}")
            if not args.no_save:
                append_result({"backend": "numpy", "device": "cpu", "bench": f"layer:{layer}", "shape": shape,
                               "threads": args.threads, "forward_ms": round(f_ms, 3), "backward_ms": round(b_ms, 3),
                               "gflops": None if not flops else round(gflops, 1),
                               "ratio_vs_torch": None if not r else round(ratio, 3)})


if __name__ == "__main__":
    main()
