"""`distgpt bench`: time distgpt's full training step on synthetic tokens.

One step = forward + backward + gradient norm + AdamW, the same calls the trainer makes. After
warm-up, each step is timed with CUDA events and the median is reported, with tokens/s, MFU as
llm.c counts it, and peak memory both as the device sees it (cudaMemGetInfo) and as torch's
allocator saw it."""
import argparse
import json
import statistics

import torch

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM)


def model_flops_per_token(num_params, n_layer, n_embd, T):
    """llm.c's count: 6 N for the matmuls plus 6 L C T for attention, per token."""
    return 6 * num_params + 6 * n_layer * n_embd * T


def peak_flops():
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 989e12)


def measure_distgpt(model_name, B, T, steps, warmup, recompute):
    from distgpt.backends import get_backend
    from distgpt.config import load_config
    from distgpt.dist.comm import LocalComm
    from distgpt.model.gpt2 import GPT2
    from distgpt.optim import ShardedAdamW

    cfg = load_config([f"model={model_name}", f"train.micro_batch={B}", f"train.seq_len={T}",
                       "backend=cuda", "device=cuda", "dtype=bfloat16"])
    backend = get_backend("cuda")
    torch.cuda.reset_peak_memory_stats()
    model = GPT2(cfg.model, backend, B, T, torch.bfloat16, "cuda", recompute)
    model.init_weights(cfg.seed)
    optimizer = ShardedAdamW(model, LocalComm(), cfg.optim, 1, backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (B, T), device="cuda", generator=gen)
    y = torch.randint(0, cfg.model.vocab_size, (B, T), device="cuda", generator=gen)
    times, losses = [], []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model.zero_grad()
        loss = model.forward(x, y, 1.0 / (B * T))
        model.backward()
        optimizer.step(1e-4)
        end.record()
        torch.cuda.synchronize()
        losses.append(loss.item())
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1000)
    free, total = torch.cuda.mem_get_info()
    return {"impl": "distgpt", "model": model_name, "B": B, "T": T, "recompute": recompute,
            "step_s": statistics.median(times), "steps": steps,
            "num_params": model.num_parameters, "n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd,
            "device_used_gb": (total - free) / 1e9, "torch_peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "first_loss": losses[0], "last_loss": losses[-1]}


def summarize(result):
    tokens = result["B"] * result["T"]
    result["tok_s"] = tokens / result["step_s"]
    result["mfu"] = result["tok_s"] * model_flops_per_token(
        result["num_params"], result["n_layer"], result["n_embd"], result["T"]) / peak_flops()
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="distgpt bench", description=__doc__)
    p.add_argument("--model", default="gpt2_124m")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--recompute", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise RuntimeError("distgpt bench needs an NVIDIA GPU")
    r = summarize(measure_distgpt(a.model, a.batch, a.seq, a.steps, a.warmup, a.recompute))
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} B={r['B']} T={r['T']}: {r['step_s'] * 1000:.1f} ms/step, "
              f"{r['tok_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, device memory {r['device_used_gb']:.1f} GB "
              f"(torch peak {r['torch_peak_gb']:.1f} GB), loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
    return 0
