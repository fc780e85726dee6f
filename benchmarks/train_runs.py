"""What the loss-comparison benchmarks share (shuffle_val.py, fp8_parity.py): `distgpt` run as
a subprocess, a text prepared into shards once, and a run's metrics read back."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def distgpt(*args):
    """`python -m distgpt ARGS`; its stdout, or exit with its output's tail when it fails."""
    proc = subprocess.run([sys.executable, "-m", "distgpt", *args], capture_output=True, text=True)
    if proc.returncode:  # named by its run (name=...), so a sweep says which of its runs failed
        run = next((f" {arg}" for arg in args if arg.startswith("name=")), "")
        sys.exit(f"distgpt {args[0]}{run} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def work_dir(text, out, prefix):
    """The run directory (out, or a new temporary one) with `text` prepared in it; the data.*
    overrides that train on it. A missing text ends the script with one line."""
    if not Path(text).is_file():
        sys.exit(f"{text}: no such file; copy ../shared/data/shakespeare.txt into the working tree first")
    root = Path(out or tempfile.mkdtemp(prefix=prefix))
    print(f"work directory: {root}", flush=True)
    return root, prepared(text, root)


def prepared(text, root, name="shakespeare"):
    """Tokenize `text` into root/data once; the data.* overrides that train on it."""
    data = Path(root) / "data"
    distgpt("prepare", str(text), "--out", str(data), "--name", name)
    return [f"data.train={data}/{name}_train_*.bin", f"data.val={data}/{name}_val_*.bin", "data.source="]


def metrics(run_dir):
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
