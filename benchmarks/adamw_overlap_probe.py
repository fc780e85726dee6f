"""Probe: would AdamW hide behind the matmuls if it ran beside the next step's work?

On one GPU the update is a memory-bound pass (1558M: about 10 ms a step on an H200) between two
compute-bound stretches. Run on a second stream beside the forward, the forward of layer l
would wait only for layer l's update. Before building that, this measures the ceiling: a
micro-step (forward + backward, its CUDA graph) and the whole AdamW update,
(a) one after the other on one stream, as the trainer runs them, and
(b) the update on a second stream, started with the micro-step (no dependencies: the timing
only; the weights the forward reads are racing with the update, so the losses are garbage),
each as the median of --steps, alternated. (a) - (b) is the most an overlapped update could save.

    python3 benchmarks/adamw_overlap_probe.py gpt2_1558m:16:1 gpt2_124m:64

Measured on an H200 (2026-12-03, median of 20): 1558M B=16 r1 micro-step 296.1 ms, AdamW with
its norm 11.1, one after the other 307.0, AdamW beside 305.6 (1.4 ms saved of 11.1, either
priority); 124M B=64 104.3 + 1.1 = 105.0, beside 105.3-105.6 (slower). cuBLASLt's kernels hold
every SM's registers, so the update's blocks only run in the gaps between kernels: an update
moved into the next forward would buy at most 0.5% at 1558M, and none at 124M. Not built.
"""
import argparse
import statistics

import torch


def build(model_name, B, recompute):
    from distgpt.backends import get_backend
    from distgpt.config import load_config
    from distgpt.model.gpt2 import GPT2
    from distgpt.model.micro_step import MicroStep
    from distgpt.optim import ShardedAdamW
    from distgpt.parallel.bootstrap import bootstrap
    from distgpt.parallel.data_parallel import DataParallel

    T = 1024
    cfg = load_config([f"model={model_name}", f"train.micro_batch={B}", f"train.seq_len={T}",
                       f"train.recompute={recompute}", "backend=cuda", "device=cuda", "dtype=bfloat16"])
    dist = bootstrap("cuda", comm_timeout_s=cfg.comm_timeout_s)
    backend = get_backend("cuda")
    model = GPT2(cfg.model, backend, B, T, torch.bfloat16, dist.device, recompute)
    model.init_weights(cfg.seed)
    dp = DataParallel(dist.comm, model.layout, 1, cfg.bucket_mb, model.grads.element_size(), dist.device)
    optimizer = ShardedAdamW(model, dp, cfg.optim, backend)
    gen = torch.Generator(device=dist.device).manual_seed(1000)
    x = torch.randint(0, cfg.model.vocab_size, (B, T), device=dist.device, generator=gen)
    y = torch.randint(0, cfg.model.vocab_size, (B, T), device=dist.device, generator=gen)
    return model, optimizer, MicroStep(model, use_graph=True), x, y, 1.0 / (B * T)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", help="model:B[:recompute]")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    rows = []
    for item in a.configs:
        name, B, *rest = item.split(":")
        model, optimizer, micro_step, x, y, dloss = build(name, int(B), int(rest[0]) if rest else 0)
        side = {"high": torch.cuda.Stream(priority=-1), "normal": torch.cuda.Stream(priority=0)}
        main_stream = torch.cuda.current_stream()

        def serial():
            micro_step(x, y, dloss)
            optimizer.step(1e-4)

        def beside(stream):
            def run():
                stream.wait_stream(main_stream)
                with torch.cuda.stream(stream):
                    optimizer.step(1e-4)
                micro_step(x, y, dloss)
                main_stream.wait_stream(stream)
            return run

        def update_only():
            optimizer.step(1e-4)

        def micro_only():
            micro_step(x, y, dloss)

        forms = {"micro-step": micro_only, "AdamW (with its norm)": update_only, "one after the other": serial,
                 "AdamW beside, high priority": beside(side["high"]),
                 "AdamW beside, normal priority": beside(side["normal"])}
        for run in forms.values():  # compile, plan, capture
            for _ in range(3):
                run()
        torch.cuda.synchronize()
        times = {k: [] for k in forms}
        for _ in range(a.steps):
            for label, run in forms.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times[label].append(start.elapsed_time(end))
        med = {k: statistics.median(v) for k, v in times.items()}
        for label, ms in med.items():
            rows.append(f"| {item} | {label} | {ms:.2f} | {med['one after the other'] - ms:+.2f} |")
        del model, optimizer, micro_step
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, median of {a.steps} (alternated)")
    print("| config | form | ms | saved against one after the other |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
