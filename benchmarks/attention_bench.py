"""Attention forward and backward, the three paths of backends/cuda/attention.py side by side on
one GPU at the training shapes (T=1024): 124M at B=64 (12 heads) and 1558M at B=16 (25 heads).

- aten: cuDNN through torch.ops.aten._scaled_dot_product_cudnn_attention, outputs allocated by
  ATen and copied into our buffers (the former default, now only for unplanned shapes);
- frontend: cuDNN's Python frontend, graphs planned once, writing into our buffers;
- fa2: FlashAttention-2 with the deterministic backward (deterministic=true), with its copies.

Each op is timed with CUDA events, median of 20 calls after 5 warm-up calls; every backward reads
its own path's forward. The frontend's out, lse and dqkv are checked against the aten path's
(max abs difference; dq differs in the last bits between any two cuDNN backwards, its atomics).

    python3 benchmarks/attention_bench.py [--shapes 64:1024:12:64 16:1024:25:64]
"""
import argparse
import time

import torch

from distgpt.backends.cuda.attention import Attention
from distgpt.backends.cuda.runtime import median_ms

WARMUP, REPEATS = 5, 20


def timed(fn):
    return median_ms(fn, WARMUP, REPEATS)


def measure(attention, qkv, dout, n_head):
    """(forward ms, backward ms, (out, lse, dqkv)) for one path."""
    B, T, C3 = qkv.shape
    out = torch.empty(B, T, C3 // 3, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(B, n_head, T, device="cuda")
    dqkv = torch.empty_like(qkv)
    fwd_ms = timed(lambda: attention.forward(out, lse, qkv, n_head))
    bwd_ms = timed(lambda: attention.backward(dqkv, dout, qkv, out, lse, n_head))
    return fwd_ms, bwd_ms, (out, lse, dqkv)


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["64:1024:12:64", "16:1024:25:64"], help="B:T:NH:HS")
    args = p.parse_args()
    import cudnn
    print(f"torch {torch.__version__}, torch's cuDNN {torch.backends.cudnn.version()}, cudnn-frontend "
          f"{cudnn.__version__} over cuDNN {cudnn.backend_version()}, {torch.cuda.get_device_name()}")
    rows = []
    for shape in args.shapes:
        B, T, NH, HS = map(int, shape.split(":"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        qkv = torch.randn(B, T, 3 * NH * HS, device="cuda", generator=gen).bfloat16()
        dout = torch.randn(B, T, NH * HS, device="cuda", generator=gen).bfloat16()
        aten, frontend, fa2 = Attention(), Attention(), Attention()
        start = time.perf_counter()
        frontend.plan(B, T, NH * HS, NH, "cuda")
        plan_s = time.perf_counter() - start
        fa2.set_deterministic(True)
        engines = ", ".join(f"{key[0]} {engine}" for key, engine in frontend.engines().items())
        print(f"{shape}: frontend plan() {plan_s:.2f} s, "
              f"workspace {frontend.workspace_bytes / 2**20:.1f} MiB, "
              f"engines: {engines}")
        results = {}
        for name, attention in (("aten", aten), ("frontend", frontend), ("fa2", fa2)):
            results[name] = measure(attention, qkv, dout, NH)
        assert not aten.engines(), "the aten row ran the frontend"
        old = results["aten"][2]
        for name, (fwd_ms, bwd_ms, got) in results.items():
            diffs = "-" if name == "aten" else " / ".join(f"{max_diff(g, o):.2e}" for g, o in zip(got, old))
            rows.append((shape, name, f"{fwd_ms:.3f}", f"{bwd_ms:.3f}", f"{fwd_ms + bwd_ms:.3f}", diffs))
        del aten, frontend, fa2, results, old
        torch.cuda.empty_cache()
    print("\n| B:T:NH:HS | path | fwd ms | bwd ms | fwd+bwd ms | max abs diff vs aten: out / lse / dqkv |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
