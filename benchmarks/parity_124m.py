"""Training parity: GPT-2 124M on tiny Shakespeare, 200 steps of B=8 x T=1024 from one seed,
with the CUDA backend (bf16 kernels) and with the reference backend in fp32 on the same GPU.
Prints both val-loss curves and the relative gap at the end (the acceptance asks for <= 1%)."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from distgpt.train import builtin_text

COMMON = ["model=gpt2_124m", "train.micro_batch=8", "train.seq_len=1024", "train.max_steps=200",
          "train.val_every=50", "train.val_steps=4", "train.sample_every=0", "train.checkpoint_every=0",
          "train.log_every=50", "optim.warmup_steps=20", "device=cuda", "seed=1337"]
RUNS = {"cuda bf16": ["backend=cuda", "dtype=bfloat16"], "reference fp32": ["backend=reference", "dtype=float32"]}


def main():
    root = Path(tempfile.mkdtemp(prefix="parity-"))
    curves = {}
    for name, extra in RUNS.items():
        run = name.replace(" ", "_")
        cmd = [sys.executable, "-m", "distgpt", "train", *COMMON, *extra, f"out_dir={root}", f"name={run}",
               f"data.train={root}/data/tinyshakespeare_train_*.bin", f"data.val={root}/data/tinyshakespeare_val_*.bin",
               f"data.source={builtin_text('tinyshakespeare')}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print(proc.stdout[-1500:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
        lines = [json.loads(x) for x in (root / run / "metrics.jsonl").read_text().splitlines()]
        curves[name] = {r["step"]: r["val_loss"] for r in lines if "val_loss" in r}
        speeds = [r["step_ms"] for r in lines if "step_ms" in r][10:]
        curves[name]["ms"] = sorted(speeds)[len(speeds) // 2] if speeds else float("nan")
    print("\n| step | " + " | ".join(f"{n} val loss" for n in RUNS) + " | gap |")
    print("|---|" + "---|" * (len(RUNS) + 1))
    a, b = (curves[n] for n in RUNS)
    for step in sorted(k for k in b if k != "ms"):
        print(f"| {step} | {a.get(step, float('nan')):.4f} | {b[step]:.4f} | {100 * (a.get(step, 0) - b[step]) / b[step]:+.2f}% |")
    print(f"median step: cuda {a['ms']:.1f} ms, reference {b['ms']:.1f} ms")


if __name__ == "__main__":
    main()
