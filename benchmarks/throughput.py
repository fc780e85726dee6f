"""distgpt against the PyTorch baseline, same GPU, same shapes, one call; a table at the end.

    python benchmarks/throughput.py gpt2_124m:64:2 gpt2_350m:32 gpt2_1558m:16:2:20 [--steps 30] [--fp8-too]

(model:batch[:recompute[:layers]]; recompute defaults to --recompute; layers: only the first
that many layers recompute at that level, the others one level less, train.recompute_layers). --fp8-too also runs distgpt with
fp8=true at each config (the ratio column is then fp8 against bf16).

Each measurement runs in its own process, so peak memory is each one's own."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from distgpt.bench import summarize

HERE = Path(__file__).resolve().parent


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        print(f"FAILED: {' '.join(cmd)}\n" + "\n".join(tail), file=sys.stderr)
        return None
    return summarize(json.loads(lines[-1]))


def recompute_label(r):
    """A result's recompute setting as the tables print it: '1', or '2 in 20 layers'."""
    return r["recompute"] if r.get("recompute_layers", -1) < 0 else f"{r['recompute']} in {r['recompute_layers']} layers"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("configs", nargs="+", help="model:batch[:recompute[:layers]], e.g. gpt2_124m:64:1")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--recompute", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--fp8-too", action="store_true", help="also distgpt with the fp8 block matmuls")
    a = p.parse_args()
    rows = []
    for item in a.configs:
        model, batch, *rest = item.split(":")
        recompute = rest[0] if rest else str(a.recompute)
        layers = ["--recompute-layers", rest[1]] if len(rest) > 1 else []
        common = ["--model", model, "--batch", batch, "--seq", str(a.seq), "--steps", str(a.steps)]
        ours = run([sys.executable, "-m", "distgpt", "bench", *common, "--recompute", recompute, *layers, "--json"])
        base = None if a.no_baseline else run([sys.executable, str(HERE / "torch_baseline.py"), *common])
        rows.append((model, batch, ours, base))
        if a.fp8_too:
            fp8 = run([sys.executable, "-m", "distgpt", "bench", *common, "--recompute", recompute, *layers, "--json",
                       "--fp8"])
            if fp8:
                fp8["impl"] = "distgpt fp8"
            rows.append((model, batch, fp8, ours))
        for r in (ours, base) + ((fp8,) if a.fp8_too else ()):
            if r:
                print(json.dumps(r), flush=True)
    print("\n| model | B | impl | recompute | ms/step | tok/s | MFU | device GB | torch peak GB | SM MHz | speed ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, batch, ours, base in rows:
        for r in (ours, base):
            if r is None or (r is base and r["impl"] == "distgpt"):  # fp8 rows: base is the bf16 row above
                continue
            ratio = f"{ours['tok_s'] / base['tok_s']:.3f}" if ours and base and r is ours else ""
            print(f"| {model} | {batch} | {r['impl']} | {recompute_label(r)} | {1000 * r['step_s']:.1f} | {r['tok_s']:,.0f} | "
                  f"{100 * r['mfu']:.1f}% | {r['device_used_gb']:.1f} | {r['torch_peak_gb']:.1f} | "
                  f"{format(r['sm_clock_mhz'], '.0f') if r.get('sm_clock_mhz') else ''} | {ratio} |")


if __name__ == "__main__":
    main()
