"""Loss parity of the fp8 block matmuls against bf16 (issue #13): GPT-2 124M and 350M on
Shakespeare's plays, B=8 x T=1024, lr 6e-4 with a cosine schedule, 500 steps, val loss every 50
steps over 10 batches, twice from the same weights and data order: fp8=false and fp8=true.
Prints a markdown table per model (val loss at each evaluation, the relative gap), the skipped
and non-finite steps of each run, and each run's median tok/s; exits 1 when a gap passes 1% or a
step was skipped or not finite.

The text is an argument because ../shared/data/ does not reach the GPU machine: copy it into
the working tree first, at a path git does not ignore, e.g.

    cp ../shared/data/shakespeare.txt benchmarks/shakespeare.txt     # untracked: it travels
    python benchmarks/fp8_parity.py benchmarks/shakespeare.txt       # on the GPU machine

    python benchmarks/fp8_parity.py TEXT --smoke     # CPU: the tiny model on the reference ops

--noise also runs bf16 a second time: bf16 runs are not bitwise reproducible unless
deterministic=true (cuDNN's attention backward adds with atomics), so two bf16 runs differ too,
most while the loss falls fastest; their gap is the noise floor the fp8 gap is read against.
"""
import argparse
import math
import statistics
import sys

from train_runs import distgpt, metrics, work_dir

TOLERANCE = 0.01  # the acceptance: fp8's val loss within 1% of bf16's at every evaluation
GPU = ["backend=cuda", "device=cuda", "dtype=bfloat16", "train.micro_batch=8", "train.seq_len=1024",
       "train.max_steps=500", "train.val_every=50", "train.val_steps=10"]
SMOKE = ["model=tiny", "backend=reference", "device=cpu", "dtype=float32", "train.micro_batch=2",
         "train.seq_len=64", "train.max_steps=6", "train.val_every=3", "train.val_steps=2"]
COMMON = ["optim.schedule=cosine", "optim.lr=6e-4", "optim.warmup_steps=20", "train.total_batch_tokens=0",
          "train.sample_every=0", "train.checkpoint_every=0", "train.hellaswag_every=0", "train.log_every=50",
          "seed=1337"]


def read_run(run_dir):
    """(val loss by step, skipped steps, non-finite steps, median tok/s) from metrics.jsonl."""
    rows = metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    skipped = [r["step"] for r in steps if r.get("skipped")]
    not_finite = [r["step"] for r in steps if not math.isfinite(r["loss"]) or not math.isfinite(r["grad_norm"])]
    tok_s = statistics.median(r["tokens_per_s"] for r in steps[1:] or steps)
    return val, skipped, not_finite, tok_s


def report(model, runs):
    """The markdown table of one model's runs and whether fp8 agrees with bf16 within TOLERANCE."""
    (bf16, bf16_skips, bf16_bad, bf16_tok), (fp8, fp8_skips, fp8_bad, fp8_tok) = runs["bf16"], runs["fp8"]
    again = runs.get("bf16_again", (None,))[0]
    noise_head = " val loss bf16, again | bf16 again vs bf16 |" if again else ""
    lines = [f"### {model}", "", f"| step | val loss bf16 | val loss fp8 | fp8 vs bf16 |{noise_head}",
             "|---|---|---|---|" + ("---|---|" if again else "")]
    worst = 0.0
    for step in sorted(bf16):
        a, b = bf16[step], fp8.get(step, float("nan"))
        gap = (b - a) / a
        worst = max(worst, abs(gap)) if math.isfinite(gap) else float("inf")
        noise = ""
        if again:
            c = again.get(step, float("nan"))
            noise = f" {c:.4f} | {100 * (c - a) / a:+.2f}% |"
        lines.append(f"| {step} | {a:.4f} | {b:.4f} | {100 * gap:+.2f}% |{noise}")
    lines += ["", f"largest gap {100 * worst:.2f}% (tolerance {100 * TOLERANCE:.0f}%); skipped steps: bf16 "
              f"{bf16_skips or 'none'}, fp8 {fp8_skips or 'none'}; non-finite steps: bf16 {bf16_bad or 'none'}, "
              f"fp8 {fp8_bad or 'none'}; median tok/s: bf16 {bf16_tok:,.0f}, fp8 {fp8_tok:,.0f} "
              f"({fp8_tok / bf16_tok:.3f}x)", ""]
    ok = worst <= TOLERANCE and not (bf16_skips or fp8_skips or bf16_bad or fp8_bad)
    return "\n".join(lines), ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text", help="shakespeare.txt, copied into the working tree (see the docstring)")
    parser.add_argument("--models", nargs="+", default=["gpt2_124m", "gpt2_350m"])
    parser.add_argument("--out", default=None, help="a new work directory (default: a new temporary one)")
    parser.add_argument("--smoke", action="store_true", help="CPU check: the tiny model, 6 steps")
    parser.add_argument("--noise", action="store_true", help="a second bf16 run: the noise floor (see above)")
    a = parser.parse_args(argv)
    root, shards = work_dir(a.text, a.out, "fp8-parity-")
    tables, all_ok = [], True
    for model in (["tiny"] if a.smoke else a.models):
        runs = {}
        for precision in ("bf16", "fp8") + (("bf16_again",) if a.noise else ()):
            name = f"{model}_{precision}"
            distgpt("train", *(SMOKE if a.smoke else GPU + [f"model={model}"]), *COMMON, *shards,
                    f"fp8={'true' if precision == 'fp8' else 'false'}", f"out_dir={root}", f"name={name}",
                    "resume=none")
            runs[precision] = read_run(root / name)
            print(f"{name}: val loss {runs[precision][0]}", flush=True)
        table, ok = report(model, runs)
        tables.append(table)
        all_ok &= ok
    print("\n".join(tables))
    print("PASS" if all_ok else "FAIL", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
