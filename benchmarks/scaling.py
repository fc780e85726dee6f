"""Scaling of the full training step from 1 GPU to N GPUs of one machine (NCCL, ZeRO-1), same
per-GPU batch, one call; a table at the end.

    python benchmarks/scaling.py gpt2_124m:64:2 gpt2_1558m:16:2 --gpus 1 2 [--accum 1] [--steps 30]

(model:batch[:recompute]). Each measurement is `distgpt bench --json` in its own process(es);
several GPUs run under `mpirun -np N`. Scaling = tok/s on N GPUs / tok/s on 1 GPU."""
import argparse
import json
import os
import shutil
import subprocess
import sys

from distgpt.bench import summarize

# NVLink SHARP (multicast) stays off on the lent machines; the rest is what launch/nccl.env sets
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def bench(model, batch, recompute, gpus, a):
    args = [sys.executable, "-m", "distgpt", "bench", "--model", model, "--batch", batch,
            "--recompute", recompute, "--seq", str(a.seq), "--steps", str(a.steps),
            "--accum", str(a.accum), "--zero-stage", str(a.zero_stage), "--json",
            *(["--deterministic"] if a.deterministic else [])]
    env = dict(os.environ, **NCCL_ENV)
    if gpus > 1:
        mpirun = shutil.which("mpirun")
        # every NCCL_* setting reaches every rank (NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1: the socket
        # transport two nodes would use)
        names = sorted({*NCCL_ENV, "PYTHONPATH", *(n for n in env if n.startswith("NCCL_"))})
        exports = [x for name in names if name in env for x in ("-x", name)]
        args = [mpirun, "--allow-run-as-root", "-np", str(gpus), "--bind-to", "none", *exports, *args]
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
        print(f"FAILED ({gpus} GPUs): {' '.join(args)}\n" + "\n".join(tail), file=sys.stderr, flush=True)
        return None
    return summarize(json.loads(lines[-1]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="model:batch[:recompute], e.g. gpt2_124m:64:2")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--deterministic", action="store_true")
    a = p.parse_args()
    rows = []
    for item in a.configs:
        model, batch, *rest = item.split(":")
        recompute = rest[0] if rest else "0"
        base = None
        for gpus in a.gpus:
            r = bench(model, batch, recompute, gpus, a)
            if r is None:
                continue
            print(json.dumps(r), flush=True)
            base = r if gpus == min(a.gpus) else base
            scale = r["tok_s"] / base["tok_s"] * min(a.gpus) if base else float("nan")
            rows.append((model, batch, recompute, gpus, r, scale))
    print(f"\n| model | B | recompute | deterministic | accum | GPUs | ms/step | tok/s (all) | tok/s per GPU | MFU | "
          f"device GB/GPU | torch peak GB | collectives ms | scaling vs {min(a.gpus)} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, batch, recompute, gpus, r, scale in rows:
        print(f"| {model} | {batch} | {recompute} | {a.deterministic} | {r['accum']} | {gpus} | {1000 * r['step_s']:.1f} | "
              f"{r['tok_s']:,.0f} | {r['tok_s'] / gpus:,.0f} | {100 * r['mfu']:.1f}% | {r['device_used_gb']:.1f} | "
              f"{r['torch_peak_gb']:.1f} | {1000 * r['comm_s']:.1f} | {scale:.3f} |")


if __name__ == "__main__":
    main()
