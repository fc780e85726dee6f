"""Probe: does the fc projection's fused dGELU product run faster with the weight transposed?

The fc projection's input gradient, dinp (N, 4C) = (dout (N, C) @ W (C, 4C)) * gelu'(pre), is
cuBLASLt's "NN" product with the DGELU epilogue, and at 1558M B=16 the heuristic serves it with
an sm90_xmma kernel at 583 us a layer (575 TFLOP/s), where the plain products of the same size
run on nvjet kernels at about 470 us (H100, 2026-12-05 profile). With W's transpose stored
(4C, C) the same product is "TN", the layout of the fc forward, whose GELU epilogue runs on nvjet.
This times both layouts (each with its best of the heuristic's answers, as the backend tunes),
the plain product beside them, and the transpose that the TN form needs once a layer (torch's
copy and our kernel), checks that
the two layouts compute the same dinp (within one bf16 ulp), and names each one's kernel.

Measured on an H200 (2026-12-05, before the transpose kernel): NN / TN dGELU 585 / 573 us at
124M's shape (N = 65536, C = 768), 771 / 485 at 350M's (the NN one an Ampere cutlass_80 kernel,
the TN one sm90_xmma), 546 / 553 at 1558M's; the plain NN product 432, 381, 495 (nvjet); torch's
transpose of W 31, 45, 89 us. Neither layout gets an nvjet kernel with the DGELU epilogue.

    python3 benchmarks/dgelu_layout_probe.py [--shapes 65536:768 32768:1024 16384:1600]
"""
import argparse

import torch

from distgpt.backends.cuda.matmul import OP_N, OP_T, Matmuls, _agrees, _alignment
from distgpt.backends.cuda.runtime import median_ms
from distgpt.backends.cuda.transpose import transpose

WARMUP, REPEATS = 5, 20


def kernel_name(fn):
    """The name of the longest GPU kernel one call of fn launches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return max(events, key=lambda e: e.device_time_total).name[:60] if events else "?"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["65536:768", "32768:1024", "16384:1600"], help="N:C")
    a = p.parse_args()
    mm = Matmuls()
    mm.plan("cuda")
    E, A = mm.lt.Epilogue, mm.lt.MatmulDescAttribute
    print("| N | C | form | us | TFLOP/s | kernel |")
    print("|---|---|---|---:|---:|---|")
    for shape in a.shapes:
        N, C = (int(v) for v in shape.split(":"))
        H = 4 * C  # W (C, 4C) as the fc projection stores it; dinp (N, 4C)
        bf = dict(device="cuda", dtype=torch.bfloat16)
        w, dout = torch.randn(C, H, **bf) * 0.02, torch.randn(N, C, **bf)
        pre = torch.randn(N, H, **bf)
        w_t = torch.empty(H, C, **bf)
        nn_out, tn_out, plain_out = (torch.empty(N, H, **bf) for _ in range(3))
        align = tuple(_alignment(t) for t in (w, dout, nn_out, nn_out))
        nn_key = (int(E.DGELU), OP_N, OP_N, H, N, C, H, C, H, H, align)
        tn_key = (int(E.DGELU), OP_T, OP_N, H, N, C, C, C, H, H, align)
        plain_key = (int(E.DEFAULT), OP_N, OP_N, H, N, C, H, C, H, 0, align)
        forms = {
            "NN dGELU (today)": lambda: mm._run(mm._get(nn_key, {A.EPILOGUE_AUX_POINTER: pre}), w, dout, nn_out, False),
            "TN dGELU (W^T stored)": lambda: mm._run(mm._get(tn_key, {A.EPILOGUE_AUX_POINTER: pre}), w_t, dout,
                                                      tn_out, False),
            "NN plain product": lambda: mm._run(mm._get(plain_key, {}), w, dout, plain_out, False),
            "transpose W (C, 4C), torch": lambda: w_t.copy_(w.t()),
            "transpose W (C, 4C), kernels/transpose.cu": lambda: transpose(w_t, w),
        }
        transpose(w_t, w)
        flops = 2 * N * C * H
        for form, fn in forms.items():
            fn()  # plan and tune
            us = 1000 * median_ms(fn, WARMUP, REPEATS)
            tflops = "" if form.startswith("transpose") else f"{flops / us / 1e6:.0f}"
            print(f"| {N} | {C} | {form} | {us:.1f} | {tflops} | {kernel_name(fn)} |", flush=True)
        torch.cuda.synchronize()
        print(f"| {N} | {C} | TN = NN within one bf16 ulp | {_agrees(tn_out, nn_out)} | | "
              f"max abs diff {(tn_out.float() - nn_out.float()).abs().max().item():.2e} |", flush=True)


if __name__ == "__main__":
    main()
