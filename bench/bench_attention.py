"""The heads' causal attention on a GPU, forward + backward: numgpt's flash kernels (no (T,T)
matrix), numgpt's matrix path (cuBLAS matmuls around the fused softmax kernels), and PyTorch's
scaled_dot_product_attention when torch is installed. Same qkv, same gradients.

    python bench/bench_attention.py                          # GPT-2 124M's heads: B=8, T=1024, 12 x 64
    python bench/bench_attention.py --precision fp16         # as --precision fp16 trains
    python bench/bench_attention.py --precision tf32         # as --precision tf32 trains
    python bench/bench_attention.py --batch-size 16 --block-size 2048

"flash" is the tensor-core kernels, "flash fma" the float32 FMA kernels they replace. fp32:
everything in float32, numgpt's tensor cores at float32's accuracy (three TF32 products), torch's
memory-efficient SDPA kernel (CUTLASS's 3xTF32, the same). fp16: numgpt inside half_matmuls, as
training with --precision fp16 runs it; torch gets float16 q, k, v (what its autocast hands
attention) and picks FlashAttention-2. tf32: numgpt after set_tf32, TF32 operands; torch float32
with TF32 matmuls allowed, which its SDPA kernel ignores (it runs 3xTF32 either way), so torch's
tf32 row is its fp32 row.

The flash kernels are on by default wherever CuPy runs (`kernels.disabled("flash_attention")`
turns them off, `kernels.disabled("tensor_core_attention")` the tensor-core ones); this is the
measurement that says whether they should be. Memory is what each path held beyond its inputs
(CuPy's pool, torch's allocator), so the (B,nh,T,T) arrays show.
"""

import argparse
import contextlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import append_result, device_name, device_sync, median_ms, positive_int, timed  # noqa: E402
from numgpt import kernels  # noqa: E402
from numgpt.backend import cupy_available, get_xp  # noqa: E402
from numgpt.layers.attention import causal_attention_backward, causal_attention_forward  # noqa: E402
from numgpt.precision import half_matmuls, set_tf32  # noqa: E402


def measure(step, sync, repeats):
    """Median milliseconds of step() after two warm-up calls."""
    for _ in range(2):
        step()
    return median_ms([timed(step, sync)[1] for _ in range(repeats)])


def numgpt_step(qkv, dy, n_head):
    def step():
        _, cache = causal_attention_forward(qkv, n_head)
        return causal_attention_backward(dy, cache)
    return step


def torch_step(qkv, dy, n_head, dtype):
    import torch
    import torch.nn.functional as F
    B, T, C3 = qkv.shape
    dtype = getattr(torch, dtype)
    qkv_t = torch.as_tensor(qkv, device="cuda").to(dtype).requires_grad_()   # shares CuPy's memory in float32
    dy_t = torch.as_tensor(dy, device="cuda").to(dtype)

    def step():
        q, k, v = (part.reshape(B, T, n_head, -1).transpose(1, 2) for part in qkv_t.split(C3 // 3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        qkv_t.grad = None
        y.backward(dy_t)
    return step


def torch_tf32(enabled):
    """torch's float32 matmuls on TF32 tensor cores or not (as bench_train.py sets them), where torch is installed."""
    try:
        import torch
    except ImportError:
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--block-size", type=positive_int, default=1024)
    p.add_argument("--n-head", type=positive_int, default=12)
    p.add_argument("--head-size", type=positive_int, default=64)
    p.add_argument("--precision", choices=("fp32", "tf32", "fp16"), default="fp32")
    p.add_argument("--repeats", type=positive_int, default=20)
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results.jsonl")
    args = p.parse_args()
    if not cupy_available():
        sys.exit("bench_attention.py measures the GPU kernels: it needs CuPy and a GPU")
    cp = get_xp("cupy")
    B, T, nh, hs = args.batch_size, args.block_size, args.n_head, args.head_size
    rng = np.random.default_rng(0)
    qkv = cp.asarray(rng.standard_normal((B, T, 3 * nh * hs)), dtype=cp.float32)
    dy = cp.asarray(rng.standard_normal((B, T, nh * hs)), dtype=cp.float32)
    sync, pool = device_sync("cupy"), cp.get_default_memory_pool()
    # a causal attention's matmul FLOPs, forward and backward: 4 T^2 hs per head for q k^T and p v
    # forward, twice that backward, halved by the mask (what a kernel that skips masked tiles does)
    flops = 3 * 4 * B * nh * T * T * hs / 2
    half = args.precision == "fp16"
    set_tf32(cp, args.precision == "tf32")
    torch_tf32(args.precision == "tf32")
    turned_off = {"flash": (), "flash fma": ("tensor_core_attention",), "matrix": ("flash_attention",)}
    rows = {}
    for name in ("flash", "flash fma", "matrix", "torch sdpa"):
        if name == "torch sdpa":
            try:
                import torch
            except ImportError:
                continue
            if not torch.cuda.is_available():   # a CPU build of torch beside CuPy
                print("(this torch has no CUDA: no torch row)")
                continue
            # its inputs first: under fp16 they are torch's float16 copies, which are inputs, not what
            # attention holds (in float32 torch shares CuPy's arrays and allocates nothing for them)
            step = torch_step(qkv, dy, nh, "float16" if half else "float32")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            inputs = torch.cuda.memory_allocated()
            ms = measure(step, sync, args.repeats)
            mib = (torch.cuda.max_memory_allocated() - inputs) / 2**20
        else:
            pool.free_all_blocks()
            inputs = pool.total_bytes()
            with kernels.disabled(*turned_off[name]) if turned_off[name] else contextlib.nullcontext(), \
                    half_matmuls("float16" if half else None):
                ms = measure(numgpt_step(qkv, dy, nh), sync, args.repeats)
            mib = (pool.total_bytes() - inputs) / 2**20
        rows[name] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 2), "memory_mib": round(mib)}
        print(f"{name:>11}: {ms:8.2f} ms  {flops / ms / 1e9:6.1f} TFLOP/s (causal FLOPs)  {mib:7.0f} MiB")
    if not args.no_save:
        append_result({"bench": "attention", "device": device_name("cupy"), "precision": args.precision,
                       "shape": {"batch_size": B, "block_size": T, "n_head": nh, "head_size": hs},
                       "results": rows})


if __name__ == "__main__":
    main()
