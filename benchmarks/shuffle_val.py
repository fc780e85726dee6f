"""Val loss with and without shuffled training order (issue #11): GPT-2 124M on Shakespeare's
plays, B=8 x T=1024, constant lr 6e-4, 150 steps, val every 25 steps over 10 batches, twice
from the same weights (seed): data.shuffle=true and data.shuffle=false. Prints a markdown
table of val loss at each evaluation and the relative gap.

The text is an argument because ../shared/data/ does not reach the GPU machine: copy it into
the working tree first, at a path git does not ignore (/data/ is ignored), e.g.

    cp ../shared/data/shakespeare.txt benchmarks/shakespeare.txt     # untracked: it travels
    python benchmarks/shuffle_val.py benchmarks/shakespeare.txt      # on the GPU machine

(or keep it under data/ and name that path in the device tool's carry). Shakespeare's 37 plays
in order are an ordered corpus: the last 10% of tokens, the validation split, are the last
plays, and unshuffled training reads the plays one after another.

    python benchmarks/shuffle_val.py TEXT --smoke     # CPU: the tiny model, a few steps
"""
import argparse

from train_runs import distgpt, metrics, work_dir

GPU = ["model=gpt2_124m", "backend=cuda", "device=cuda", "dtype=bfloat16", "train.micro_batch=8",
       "train.seq_len=1024", "train.max_steps=150", "train.val_every=25", "train.val_steps=10",
       # deterministic: the two runs differ in their data order only, not in attention's atomics
       "deterministic=true"]
SMOKE = ["model=tiny", "backend=reference", "device=cpu", "dtype=float32", "train.micro_batch=2",
         "train.seq_len=64", "train.max_steps=4", "train.val_every=2", "train.val_steps=2"]
COMMON = ["optim.schedule=constant", "optim.lr=6e-4", "optim.warmup_steps=0", "train.total_batch_tokens=0",
          "train.sample_every=0", "train.checkpoint_every=0", "train.hellaswag_every=0", "seed=1337"]
RUNS = {"shuffled": "data.shuffle=true", "file order": "data.shuffle=false"}


def val_curve(run_dir):
    return {r["step"]: r["val_loss"] for r in metrics(run_dir) if "val_loss" in r}


def table(curves):
    shuffled, ordered = curves["shuffled"], curves["file order"]
    lines = ["| step | val loss, shuffled | val loss, file order | shuffled vs file order |", "|---|---|---|---|"]
    for step in sorted(shuffled):
        a, b = shuffled[step], ordered[step]
        lines.append(f"| {step} | {a:.4f} | {b:.4f} | {100 * (a - b) / b:+.2f}% |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text", help="shakespeare.txt, copied into the working tree (see the docstring)")
    parser.add_argument("--out", default=None, help="a new work directory (default: a new temporary one)")
    parser.add_argument("--smoke", action="store_true", help="CPU check: the tiny model, 4 steps")
    a = parser.parse_args(argv)
    root, shards = work_dir(a.text, a.out, "shuffle-val-")
    curves = {}
    for name, switch in RUNS.items():
        run = name.replace(" ", "_")
        distgpt("train", *(SMOKE if a.smoke else GPU), *COMMON, *shards, switch, f"out_dir={root}",
                f"name={run}", "resume=none")
        curves[name] = val_curve(root / run)
        print(f"{name}: val loss {curves[name]}", flush=True)
    print(table(curves))
    return curves


if __name__ == "__main__":
    main()
