"""Scaling of the full training step from 1 GPU to N GPUs of one machine (NCCL, ZeRO-1), same
per-GPU batch, one call; a table at the end.

    python benchmarks/scaling.py gpt2_124m:64 gpt2_1558m:16:2 --gpus 1 2 [--accum 1] [--steps 30]
        [--no-overlap-too] [--independent]

(model:batch[:recompute]). Each measurement is `distgpt bench --json` in its own process(es);
several GPUs run under `mpirun -np N`. Scaling = tok/s on N GPUs / (N x tok/s on 1 GPU).

The 1-GPU baseline runs on GPU 0 while the others idle. GPUs of one machine differ (power
caps, clocks, temperature: a few percent), and N GPUs at work at once may run slower than one
alone, whatever the code does. --independent also runs N single-GPU benches at the same time,
one per GPU, with no communication at all: their summed tok/s is what N GPUs deliver at best
here, and "scaling vs independent" is the share of it the data-parallel run keeps.
By default each run takes overlap_comm=auto (overlap only across nodes or over NCCL's socket
transport); --no-overlap-too runs each N-GPU measurement twice instead, overlap_comm=true and
false, the before/after of the overlap in one call."""
import argparse
import json
import os
import shutil
import subprocess
import sys

from distgpt.bench import summarize

# NVLink SHARP (multicast) stays off on the lent machines; the rest is what launch/nccl.env sets
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def bench_args(model, batch, recompute, a, overlap="auto"):
    return [sys.executable, "-m", "distgpt", "bench", "--model", model, "--batch", batch,
            "--recompute", recompute, "--seq", str(a.seq), "--steps", str(a.steps),
            "--accum", str(a.accum), "--zero-stage", str(a.zero_stage), "--json",
            *(["--deterministic"] if a.deterministic else []), "--overlap", overlap,
            "--gather-in-forward", "true" if a.gather_in_forward else "auto"]


def result_of(proc, what):
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
        print(f"FAILED ({what})\n" + "\n".join(tail), file=sys.stderr, flush=True)
        return None
    return summarize(json.loads(lines[-1]))


def bench(model, batch, recompute, gpus, a, overlap="auto"):
    args = bench_args(model, batch, recompute, a, overlap)
    env = dict(os.environ, **NCCL_ENV)
    if gpus > 1:
        mpirun = shutil.which("mpirun")
        # every NCCL_* setting reaches every rank (NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1: the socket
        # transport two nodes would use)
        names = sorted({*NCCL_ENV, "PYTHONPATH", *(n for n in env if n.startswith("NCCL_"))})
        exports = [x for name in names if name in env for x in ("-x", name)]
        args = [mpirun, "--allow-run-as-root", "-np", str(gpus), "--bind-to", "none", *exports, *args]
    return result_of(subprocess.run(args, capture_output=True, text=True, env=env), " ".join(args))


def independent(model, batch, recompute, gpus, a):
    """N single-GPU benches at once, GPU i each: their tok/s summed (None if one failed)."""
    env = dict(os.environ, **NCCL_ENV)
    procs = [subprocess.Popen(bench_args(model, batch, recompute, a), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(env, CUDA_VISIBLE_DEVICES=str(i))) for i in range(gpus)]
    results = []
    for i, proc in enumerate(procs):
        out, err = proc.communicate()
        results.append(result_of(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                                 f"independent GPU {i}"))
    if any(r is None for r in results):
        return None
    return {"tok_s": sum(r["tok_s"] for r in results), "each_ms": [1000 * r["step_s"] for r in results]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="model:batch[:recompute], e.g. gpt2_124m:64:2")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--overlap", default="auto", choices=["auto", "true", "false"],
                   help="overlap_comm of the N-GPU runs (auto: only across a network)")
    p.add_argument("--no-overlap-too", action="store_true",
                   help="run each N-GPU measurement with overlap_comm=true and with false")
    p.add_argument("--gather-in-forward", action="store_true",
                   help="all-gather the updated weights during the next forward (gather_in_forward=true; "
                        "without it: auto)")
    p.add_argument("--independent", action="store_true",
                   help="also run N single-GPU benches at once (the machine's best case for N GPUs)")
    a = p.parse_args()
    rows, notes = [], []
    for item in a.configs:
        model, batch, *rest = item.split(":")
        recompute = rest[0] if rest else "0"
        base = None
        for gpus in a.gpus:
            for overlap in (["true", "false"] if a.no_overlap_too and gpus > 1 else [a.overlap]):
                r = bench(model, batch, recompute, gpus, a, overlap)
                if r is None:
                    continue
                print(json.dumps(r), flush=True)
                base = r if gpus == min(a.gpus) else base
                scale = r["tok_s"] / base["tok_s"] * min(a.gpus) / gpus if base else float("nan")
                together = None
                if a.independent and gpus > 1 and overlap != "false":
                    ind = independent(model, batch, recompute, gpus, a)
                    if ind is not None:
                        together = r["tok_s"] / ind["tok_s"]
                        notes.append(f"{model} B={batch}: {gpus} independent 1-GPU benches at once: "
                                     f"{ind['tok_s']:,.0f} tok/s in all, step ms "
                                     + ", ".join(f"{x:.1f}" for x in ind["each_ms"]))
                rows.append((model, batch, recompute, gpus, overlap, r, scale, together))
    print(f"\n| model | B | recompute | accum | GPUs | overlap | ms/step | tok/s (all) | tok/s per GPU | MFU | "
          f"device GB/GPU | collectives alone ms | step without them ms | exposed ms | "
          f"per-GPU scaling vs 1 GPU | vs independent GPUs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, batch, recompute, gpus, overlap, r, scale, together in rows:
        local = r.get("local_step_s", 0.0)
        print(f"| {model} | {batch} | {recompute} | {r['accum']} | {gpus} | {'yes' if r['overlap'] else 'no'} | "
              f"{1000 * r['step_s']:.1f} | {r['tok_s']:,.0f} | {r['tok_s'] / gpus:,.0f} | {100 * r['mfu']:.1f}% | "
              f"{r['device_used_gb']:.1f} | {1000 * r['comm_s']:.1f} | {1000 * local:.1f} | "
              f"{1000 * (r['step_s'] - local) if gpus > 1 else 0:.1f} | {scale:.3f} | "
              f"{'' if together is None else f'{together:.3f}'} |")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
