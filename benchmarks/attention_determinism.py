"""Is the fused attention backward bitwise reproducible, and at what cost? One GPU.

For each backend (cuDNN via ATen, FlashAttention-2 via ATen) and for torch's deterministic flag
off and on, run the backward 5 times on the same inputs, report whether dq, dk, dv are bitwise
equal every time, and the median forward and backward time.

    python benchmarks/attention_determinism.py [--shapes 64:12:64 16:25:64] [--seq 1024]
"""
import argparse
import statistics

import torch

CUDNN_FWD = torch.ops.aten._scaled_dot_product_cudnn_attention
CUDNN_BWD = torch.ops.aten._scaled_dot_product_cudnn_attention_backward
FLASH_FWD = torch.ops.aten._flash_attention_forward
FLASH_BWD = torch.ops.aten._flash_attention_backward


def timed(fn, repeats=10):
    times, result = [], None
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), result


def cudnn(q, k, v, do):  # (B, NH, T, HS) views
    T = q.shape[2]
    fwd = CUDNN_FWD(q, k, v, None, True, 0.0, True, False)
    out, lse, seed, offset = fwd[0], fwd[1], fwd[6], fwd[7]
    fwd_ms, _ = timed(lambda: CUDNN_FWD(q, k, v, None, True, 0.0, True, False))
    bwd = lambda: CUDNN_BWD(do, q, k, v, out, lse, seed, offset, None, None, None, T, T, 0.0, True)
    return fwd_ms, bwd


def flash(q, k, v, do):  # FlashAttention-2 takes (B, T, NH, HS)
    q, k, v, do = (x.transpose(1, 2) for x in (q, k, v, do))
    T = q.shape[1]
    fwd = FLASH_FWD(q, k, v, None, None, T, T, 0.0, True, False)
    out, lse, rng, unused = fwd[0], fwd[1], fwd[2], fwd[3]
    fwd_ms, _ = timed(lambda: FLASH_FWD(q, k, v, None, None, T, T, 0.0, True, False))
    bwd = lambda: FLASH_BWD(do, q, k, v, out, lse, None, None, T, T, 0.0, True, rng, unused)
    return fwd_ms, bwd


def cudnn_frontend(q, k, v, do):  # NVIDIA's cudnn-frontend torch ops, BHSD views
    import cudnn.sdpa.fwd.torch_op  # noqa: F401  (registers torch.ops.cudnn.*)
    scale = q.shape[-1] ** -0.5
    deterministic = torch.are_deterministic_algorithms_enabled()
    out, lse = torch.ops.cudnn.sdpa_fwd(q, k, v, scale, is_causal=True)
    fwd_ms, _ = timed(lambda: torch.ops.cudnn.sdpa_fwd(q, k, v, scale, is_causal=True))
    bwd = lambda: torch.ops.cudnn.sdpa_bwd(do, q, k, v, out, lse, scale, is_causal=True,
                                           is_deterministic=deterministic)
    return fwd_ms, bwd


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["64:12:64", "8:12:64", "16:25:64"], help="B:NH:HS")
    p.add_argument("--seq", type=int, default=1024)
    a = p.parse_args()
    rows = []
    for shape in a.shapes:
        B, NH, HS = map(int, shape.split(":"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        qkv = torch.randn(B, a.seq, 3, NH, HS, device="cuda", dtype=torch.bfloat16, generator=gen)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        do = torch.randn(B, NH, a.seq, HS, device="cuda", dtype=torch.bfloat16, generator=gen)
        for name, impl in (("cudnn", cudnn), ("flash2", flash), ("cudnn_frontend", cudnn_frontend)):
            for deterministic in ("off", "warn_only", "strict"):
                torch.use_deterministic_algorithms(deterministic != "off", warn_only=deterministic == "warn_only")
                try:
                    fwd_ms, bwd = impl(q, k, v, do)
                    bwd_ms, first = timed(bwd)
                    first = [t.clone() for t in first[:3]]
                    runs = [bwd()[:3] for _ in range(5)]
                    same = "".join(n if all(torch.equal(f, r[i]) for r in runs) else "-"
                                   for i, (n, f) in enumerate(zip("qkv", first)))
                    rows.append((shape, name, deterministic, f"{fwd_ms:.3f}", f"{bwd_ms:.3f}", same))
                except Exception as exc:  # an op or flag this torch lacks: say so and go on
                    rows.append((shape, name, deterministic, "-", "-", f"error: {str(exc).splitlines()[0][:80]}"))
                finally:
                    torch.use_deterministic_algorithms(False)
    print(f"\ntorch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}, T={a.seq}")
    print("| B:NH:HS | impl | deterministic flag | fwd ms | bwd ms | d? bitwise equal in 5 runs (q k v, - = differs) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
