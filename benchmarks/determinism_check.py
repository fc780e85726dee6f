"""Two identical runs with deterministic=true must log bitwise the same numbers.

Trains `+run=single_gpu deterministic=true` twice (30 steps, validation and checkpoints every
10, a sample at 15) into two directories, then compares every metrics record
field by field, leaving out wall-clock fields (times, throughput, timestamps). Prints the count
of records compared and exits 1 on the first difference.

    python3 benchmarks/determinism_check.py [--steps 30] [extra Hydra overrides ...]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CLOCK_FIELDS = ("time", "ms", "tok_s", "tokens_per_s", "mfu", "elapsed", "eta", "_s")


def is_clock(field):
    return any(part in field for part in CLOCK_FIELDS)


def records(run_dir):
    """A run's metrics.jsonl records, wall-clock fields left out: what two runs must share."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not is_clock(k)} for x in lines]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="determinism-"))
    runs = []
    for run in ("a", "b"):
        cmd = [sys.executable, "-m", "distgpt", "train", "+run=single_gpu", "deterministic=true",
               f"train.max_steps={a.steps}", "train.val_every=10", "train.checkpoint_every=10",
               "train.sample_every=15", f"out_dir={root}", f"name={run}", *a.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"run {run} failed:\n{proc.stderr[-3000:]}")
        runs.append(records(root / run))
    if len(runs[0]) != len(runs[1]):
        sys.exit(f"the runs logged {len(runs[0])} and {len(runs[1])} records")
    for i, (x, y) in enumerate(zip(*runs)):
        if x != y:
            diff = {k: (x.get(k), y.get(k)) for k in set(x) | set(y) if x.get(k) != y.get(k)}
            sys.exit(f"record {i} differs between the two runs: {diff}")
    print(f"deterministic: {len(runs[0])} metric records bitwise equal across two runs ({a.steps} steps)")


if __name__ == "__main__":
    main()
