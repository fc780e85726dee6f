"""Probe: does cuBLASLt's first heuristic answer leave time on the table at GPT-2's shapes?

Untuned (deterministic runs), Matmuls takes the heuristic's first algorithm for every plan. Here
each plan a step uses (the block's four forward products with their epilogues, the input and
weight gradients, the lm head's chunk products) is run through Matmuls once, then timed with
each of the candidates the plan keeps (matmul.CANDIDATES) back to back. The table gives the
first answer's time, the best one's and what the step would save with the best (times the calls
per step).

    python3 benchmarks/matmul_algo_probe.py [--models gpt2_124m:64 gpt2_1558m:16] [--candidates 32]
        [--sustained MS]

--sustained MS also times each answer in bursts of MS milliseconds back to back, after a burst as
long that brings the GPU to its power cap (where the clock follows each kernel's energy, not its
speed alone), the answers in turns over three rounds (runtime.sustained_median_ms), and adds the
columns: the answer fastest in bursts, and what a step would save with it instead of the answer
fastest alone (a step did not, tuned so: docs/measurements.md, 2026-12-06).
"""
import argparse
import math

import torch

from distgpt.backends.cuda import matmul
from distgpt.backends.cuda.bias import BiasGradients
from distgpt.backends.cuda.matmul import Matmuls, _agrees
from distgpt.backends.cuda.runtime import median_ms, sustained_median_ms
from distgpt.model.layout import CLASSIFIER_CHUNK_ROWS

SHAPES = {"gpt2_124m": (12, 768), "gpt2_350m": (24, 1024), "gpt2_774m": (36, 1280), "gpt2_1558m": (48, 1600)}
VP, T = 50304, 1024


class Recorder(Matmuls):
    """Matmuls that remembers each plan's last call (its operands), to run it again."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {}  # id(plan) -> [plan, (a, b, d, beta), label, calls per step]
        self.label, self.per_step = None, 1

    def _run(self, plan, a, b, d, beta, c=None):
        self.calls.setdefault(id(plan), [plan, None, self.label, self.per_step])[1] = (a, b, d, beta, c)
        super()._run(plan, a, b, d, beta, c)


def run_model(model, B, burst_ms=0.0):
    L, C = SHAPES[model]
    N = B * T
    bf = dict(device="cuda", dtype=torch.bfloat16)
    mm = Recorder(BiasGradients(4 * C, "cuda"), dgelu="fused", tune=False)
    mm.plan("cuda")

    def t(*shape, scale=1.0):
        return torch.randn(*shape, **bf) * scale

    ln, atty, fch, fchg = t(N, C), t(N, C), t(N, 4 * C), t(N, 4 * C)
    out3, outC, residual = t(N, 3 * C), t(N, C), t(N, C)
    W = {"qkv": t(3 * C, C, scale=0.02), "attproj": t(C, C, scale=0.02), "fc": t(4 * C, C, scale=0.02),
         "fcproj": t(C, 4 * C, scale=0.02)}
    dW = {k: torch.zeros_like(w) for k, w in W.items()}
    b = {k: t(w.shape[0], scale=0.02) for k, w in W.items()}
    d3C, dC, d4C = t(N, 3 * C), t(N, C), t(N, 4 * C)
    mm.per_step = L
    for label, call in (
            ("fwd qkv", lambda: mm.forward(out3, ln, W["qkv"], b["qkv"])),
            ("fwd attproj+residual", lambda: mm.forward(outC, atty, W["attproj"], b["attproj"], residual=residual)),
            ("fwd fc+gelu", lambda: mm.forward(fch, ln, W["fc"], b["fc"], gelu_out=fchg)),
            ("fwd fcproj+residual", lambda: mm.forward(outC, fchg, W["fcproj"], b["fcproj"], residual=residual)),
            ("bwd qkv", lambda: mm.backward(dC, dW["qkv"], None, d3C, ln, W["qkv"])),
            ("bwd attproj", lambda: mm.backward(dC, dW["attproj"], None, outC, atty, W["attproj"])),
            ("bwd fc", lambda: mm.backward(dC, dW["fc"], None, d4C, ln, W["fc"])),
            ("bwd fcproj+dgelu", lambda: mm.backward(d4C, dW["fcproj"], None, dC, fchg, W["fcproj"],
                                                     gelu_inp=fch))):
        mm.label = label
        call()
    R = min(N, max(T, CLASSIFIER_CHUNK_ROWS))
    logits, x, dx, wte = t(R, VP), t(R, C), t(R, C), t(VP, C, scale=0.02)
    dwte = torch.zeros_like(wte)
    mm.per_step, mm.label = N // R, "lm head fwd"
    mm.forward(logits, x, wte, None)
    mm.label = "lm head bwd"
    mm.backward(dx, dwte, None, logits, x, wte)
    torch.cuda.synchronize()
    rows, total_first, total_best = [], 0.0, 0.0
    for plan, (a, b_, d, beta, c), label, per_step in mm.calls.values():
        found = plan.candidates  # the heuristic's answers the plan keeps (matmul.CANDIDATES)
        times = []
        for i in range(found):
            algo = plan.algorithm(i)
            try:
                times.append(median_ms(lambda: mm._launch(plan, algo, a, b_, d, beta, c), 3, 15))
            except Exception:  # an answer that does not run here: not a candidate
                times.append(float("inf"))
        # the fastest answer that computes what the first computes (what tuning would keep)
        saved = d.to("cpu") if beta and (c is None or c.data_ptr() == d.data_ptr()) else None
        want = mm._sample(plan, 0, a, b_, d, beta, saved, c)
        rank = next(i for i in sorted(range(found), key=times.__getitem__)
                    if i == 0 or _agrees(mm._sample(plan, i, a, b_, d, beta, saved, c), want))
        first, best = times[0], times[rank]
        sustained = ""
        if burst_ms:
            launches = [lambda algo=plan.algorithm(i): mm._launch(plan, algo, a, b_, d, beta, c)
                        for i in range(found)]
            held = sustained_median_ms(launches, times, burst_ms)
            if saved is not None:
                d.copy_(saved)
            srank = next(i for i in sorted(range(found), key=held.__getitem__)
                         if i == 0 or _agrees(mm._sample(plan, i, a, b_, d, beta, saved, c), want))
            sustained = (f" {held[0] * 1000:.0f} | {held[rank] * 1000:.0f} | {held[srank] * 1000:.0f} (#{srank}) | "
                         f"{(held[rank] - held[srank]) * per_step:.2f} |")
        total_first += first * per_step
        total_best += best * per_step
        # d (m x n) = a (m x k) b (k x n) in whichever layout: numel(a) numel(b) / numel(d) = k^2
        flops = 2 * d.numel() * math.isqrt(a.numel() * b_.numel() // d.numel())
        rows.append(f"| {model} | {label} | {per_step} | {found} | {first * 1000:.0f} | {best * 1000:.0f} "
                    f"(#{rank}) | {flops / best / 1e9:.0f} | {100 * (1 - best / first):.1f}% | "
                    f"{(first - best) * per_step:.2f} |{sustained}")
    return rows, total_first, total_best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["gpt2_124m:64", "gpt2_1558m:16"], help="model:B")
    p.add_argument("--candidates", type=int, default=matmul.CANDIDATES,
                   help="the heuristic's answers each plan keeps and times (matmul.CANDIDATES)")
    p.add_argument("--sustained", type=float, default=0.0, metavar="MS",
                   help="also time each answer in back-to-back bursts of MS ms (0: no)")
    a = p.parse_args()
    matmul.CANDIDATES = a.candidates
    more = (" sustained: first us | the isolated best's us | best us (rank) | ms/step saved over the isolated best |"
            if a.sustained else "")
    print("| model | product | calls/step | answers | first us | best agreeing us (rank) | best TFLOP/s | gain "
          "| ms/step saved |" + more)
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if a.sustained else ""))
    summary = []
    for item in a.models:
        model, B = item.split(":")
        rows, first, best = run_model(model, int(B), a.sustained)
        print("\n".join(rows), flush=True)
        summary.append(f"{model} B={B}: matmuls {first:.1f} ms a step with the first answers, {best:.1f} with "
                       f"the best ({first - best:.1f} ms saved)")
        torch.cuda.empty_cache()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
