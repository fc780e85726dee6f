"""Every execution plan cuDNN offers for our attention graphs, timed: is the heuristic's first
choice (what backends/cuda/attention.py builds) the fastest at GPT-2's training shapes?

For each shape (B:T:NH:HS) and direction, the graph is declared as the backend declares it, then
each ranked plan that builds is run on the same buffers: median of 20 calls after 5, CUDA events.

    python3 benchmarks/attention_plans.py [--shapes 64:1024:12:64 32:1024:16:64 16:1024:25:64]
"""
import argparse

import torch

from distgpt.backends.cuda.attention import Attention, _heads
from distgpt.backends.cuda.runtime import median_ms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["64:1024:12:64", "32:1024:16:64", "16:1024:25:64"])
    a = p.parse_args()
    attention = Attention()
    print("| B:T:NH:HS | graph | plan | name | workspace MiB | ms |")
    print("|---|---|---|---|---|---|")
    for shape in a.shapes:
        B, T, NH, HS = (int(v) for v in shape.split(":"))
        C = NH * HS
        attention.plan(B, T, C, NH, "cuda")  # the handle, and the graphs the backend would use
        bf = dict(device="cuda", dtype=torch.bfloat16)
        qkv, dout = torch.randn(B, T, 3 * C, **bf), torch.randn(B, T, C, **bf)
        out, lse, dqkv = torch.empty(B, T, C, **bf), torch.empty(B, NH, T, device="cuda"), torch.empty_like(qkv)
        attention.forward(out, lse, qkv, NH)
        q, k, v = _heads(qkv, NH)
        o, do = (t.view(B, T, NH, HS).transpose(1, 2) for t in (out, dout))
        dq, dk, dv = _heads(dqkv, NH)
        operands = {"fwd": (q, k, v, o, lse.unsqueeze(-1)), "bwd": (q, k, v, o, do, lse.unsqueeze(-1), dq, dk, dv)}
        for kind in ("fwd", "bwd"):
            g, uids = attention._declare(kind, B, T, NH, HS)
            for i in range(g.get_execution_plan_count()):
                name = g.get_plan_name_at_index(i)
                try:
                    g.build_plan_at_index(i)
                    ws_bytes = int(g.get_workspace_size_plan_at_index(i))
                except Exception as exc:  # a plan that does not build: say so and go on
                    print(f"| {shape} | {kind} | {i} | {name} | - | not built: {str(exc).splitlines()[0][:60]} |")
                    continue
                ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device="cuda")
                buffers = list(operands[kind])

                def run():
                    g.execute_plan_at_index(buffers, ws, i, handle=attention._handle, tensor_uids=uids)
                try:
                    ms = median_ms(run, 5, 20)
                except Exception as exc:
                    print(f"| {shape} | {kind} | {i} | {name} | {ws_bytes / 2**20:.1f} | failed: "
                          f"{str(exc).splitlines()[0][:60]} |")
                    continue
                print(f"| {shape} | {kind} | {i} | {name} | {ws_bytes / 2**20:.1f} | {ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
