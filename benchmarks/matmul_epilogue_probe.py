"""Probe: can cuBLASLt's DGELU_BGRAD epilogue give the MLP's fc bias gradient for free?

The fc projection's input gradient is computed with the DGELU epilogue (dinp = dout @ W times
gelu'(pre-activation)); DGELU_BGRAD would also write the column sums of that result, the fc bias
gradient, which our bias kernel otherwise reads the (N, 4C) gradient again for. Timed against
DGELU plus our column-sum kernel, with the bias gradient checked against torch, for bf16 and
fp32 bias vectors (whichever cuBLASLt accepts).

    python3 benchmarks/matmul_epilogue_probe.py [--shapes 65536:768 32768:1024 16384:1600]
"""
import argparse

import numpy as np
import torch

from distgpt.backends.cuda.bias import BiasGradients
from distgpt.backends.cuda.matmul import CUDA_R_16BF, CUDA_R_32F, OP_N, Matmuls, _alignment, _Plan
from distgpt.backends.cuda.runtime import median_ms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["65536:768", "32768:1024", "16384:1600"], help="N:C")
    a = p.parse_args()
    mm = Matmuls(BiasGradients(1600, "cuda"))
    mm.plan("cuda")
    lt = mm.lt
    E, A = lt.Epilogue, lt.MatmulDescAttribute
    print("| N | C | DGELU us | + bias kernel us | DGELU_BGRAD bias dtype | us | dbias rel err |")
    print("|---|---|---|---|---|---|---|")
    for shape in a.shapes:
        N, C = (int(v) for v in shape.split(":"))
        OC = 4 * C  # the fc projection: dinp (N, 4C) = dout (N, C) @ W (C, 4C)
        bf = dict(device="cuda", dtype=torch.bfloat16)
        w, dout, pre = torch.randn(C, OC, **bf) * 0.02, torch.randn(N, C, **bf), torch.randn(N, OC, **bf)
        dinp = torch.empty(N, OC, **bf)
        dbias = torch.zeros(OC, **bf)
        # the dinp product alone, as Matmuls.backward runs it (key layout as there)
        key = (int(E.DGELU), OP_N, OP_N, OC, N, C, OC, C, OC, OC, tuple(_alignment(t) for t in (w, dout, dinp, dinp)))
        plan = _Plan(lt, mm.handle, 32 * 2**20, key, {A.EPILOGUE_AUX_POINTER: pre})
        dgelu_us = 1000 * median_ms(lambda: mm._run(plan, w, dout, dinp, beta=False), 5, 20)
        want = dinp.float().sum(0)
        sum_us = 1000 * median_ms(lambda: mm.bias_gradients.backward(dbias, dinp), 5, 20)
        for dtype, code in ((torch.bfloat16, CUDA_R_16BF), (torch.float32, CUDA_R_32F)):
            bias_out = torch.zeros(OC, device="cuda", dtype=dtype)
            out2 = torch.empty(N, OC, **bf)
            key2 = (int(E.DGELU_BGRAD),) + key[1:]
            try:
                plan2 = _Plan(lt, mm.handle, 32 * 2**20, key2, {A.EPILOGUE_AUX_POINTER: pre, A.BIAS_POINTER: bias_out},
                              attributes=[(A.BIAS_DATA_TYPE, np.int32(code))])
                us = 1000 * median_ms(lambda: mm._run(plan2, w, dout, out2, beta=False), 5, 20)
            except Exception as exc:
                print(f"| {N} | {C} | {dgelu_us:.1f} | {sum_us:.1f} | {dtype} | not supported: "
                      f"{str(exc).splitlines()[0][:50]} | |", flush=True)
                continue
            mm._run(plan2, w, dout, out2, beta=False)
            torch.cuda.synchronize()
            err = ((bias_out.float() - want).norm() / want.norm()).item()
            same = torch.equal(out2, dinp)
            print(f"| {N} | {C} | {dgelu_us:.1f} | {sum_us:.1f} | {dtype} | {us:.1f} | {err:.1e} "
                  f"(dinp {'bitwise' if same else 'differs'}) |", flush=True)


if __name__ == "__main__":
    main()
