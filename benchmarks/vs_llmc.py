"""distgpt beside llm.c on the same GPU, in one call: the bar the project measures itself against.

    python benchmarks/vs_llmc.py --llmc PATH/train_gpt2cu gpt2_124m:8 gpt2_124m:64 gpt2_1558m:16:2:20

(model:batch[:recompute[:layers]] as throughput.py takes them.) For each config llm.c trains from
random weights (`-e dL`, L the preset's layers) for --steps + 5 steps on Shakespeare tokens that
this script prepares, then `distgpt bench` times the same shape; the table gives both medians,
the memory each held and distgpt's speed-up.

llm.c is not part of distgpt: build its `train_gpt2cu` yourself (github.com/karpathy/llm.c, `make
train_gpt2cu USE_CUDNN=1`, its README says how) and pass the binary. Where that binary was linked
against the cuBLAS and cuDNN of NVIDIA's pip wheels, this script puts their lib folders on
LD_LIBRARY_PATH. How it was measured (2026-12-05, README): llm.c at `-r 0` for 124M (its fastest
there) and its defaults elsewhere (--llmc-args MODEL=ARGS changes that).

llm.c's step time is its own CUDA-event time of each step, printed per step; the median skips
the first 5. Its memory is nvidia-smi's peak while it runs (sampled every 250 ms); distgpt's is
cudaMemGetInfo after its timed steps, as `distgpt bench` reports it. Both in GB (1e9 bytes)."""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from distgpt.config import ConfigError, load_config
from throughput import recompute_label, run  # beside this file

STEP_LINE = re.compile(r"^step\s+(\d+)/\d+ \|.*\| ([0-9.]+) ms \|", re.MULTILINE)
WARMUP_STEPS = 5  # llm.c steps left out of the median (its first includes cuBLAS/cuDNN set-up)
DEFAULT_LLMC_ARGS = {"gpt2_124m": "-r 0"}  # llm.c's fastest setting at 124M; its defaults elsewhere


def llmc_step_ms(log_text, warmup=WARMUP_STEPS):
    """The median step time (ms) llm.c printed, its first `warmup` steps left out; None if none."""
    times = [float(ms) for step, ms in STEP_LINE.findall(log_text) if int(step) > warmup]
    return statistics.median(times) if times else None


def preset_layers(model):
    """n_layer of a model preset (llm.c's -e dL), from the composed config."""
    try:
        return load_config([f"model={model}"]).model.n_layer
    except ConfigError as exc:
        fail(str(exc))


def llmc_command(binary, data_dir, model, batch, steps, extra):
    """train_gpt2cu's arguments: random weights of the preset's depth, B x 1024 tokens a step
    (no accumulation), evaluation and sampling out of the way."""
    return [str(binary), "-i", f"{data_dir}/shk_train_*.bin", "-j", f"{data_dir}/shk_val_*.bin",
            "-e", f"d{preset_layers(model)}", "-b", str(batch), "-t", "1024", "-d", str(batch * 1024),
            "-x", str(steps + WARMUP_STEPS), "-v", "100000", "-m", "1", "-s", "0", "-h", "0", "-n", "0",
            *extra.split()]


def nvidia_library_path():
    """LD_LIBRARY_PATH with the lib folders of NVIDIA's pip wheels (cuBLAS, cuDNN, NVRTC) first."""
    try:
        import nvidia
        folders = sorted(str(p) for root in nvidia.__path__ for p in Path(root).glob("*/lib"))
    except ImportError:
        folders = []
    return ":".join(folders + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p])


def run_llmc(cmd, log_path):
    """(median ms, peak GB or None) of one llm.c run, its output kept in log_path; (None, None)
    when it fails."""
    env = dict(os.environ, LD_LIBRARY_PATH=nvidia_library_path())
    smi = shutil.which("nvidia-smi") and subprocess.Popen(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
         "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0], "-lms", "250"],
        stdout=subprocess.PIPE, text=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        samples = ""
        if smi:
            smi.terminate()
            samples, _ = smi.communicate()
    log_path.write_text(proc.stdout + proc.stderr)
    ms = llmc_step_ms(proc.stdout)
    if proc.returncode != 0 or ms is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        print(f"llm.c FAILED ({' '.join(cmd)}), log {log_path}:\n{tail}", file=sys.stderr)
        return None, None
    peak_mib = max((int(x) for x in samples.split() if x.isdigit()), default=0)
    return ms, (peak_mib * 2**20 / 1e9) or None  # None: no nvidia-smi to sample


def run_distgpt(model, batch, recompute, layers, steps):
    """distgpt bench at one shape, as throughput.py runs it (its summarized JSON, None on failure)."""
    return run([sys.executable, "-m", "distgpt", "bench", "--model", model, "--batch", batch, "--steps", str(steps),
                "--recompute", recompute, *(["--recompute-layers", layers] if layers else []), "--json"])


def prepare_tokens(out_dir):
    """Shakespeare (the package's builtin text) as llm.c-format shards named shk_*."""
    from distgpt.train import builtin_text
    subprocess.run([sys.executable, "-m", "distgpt", "prepare", str(builtin_text("tinyshakespeare")), "--out",
                    str(out_dir), "--name", "shk", "--no-progress"], check=True, capture_output=True)


def table_row(model, batch, ours, llmc_ms, llmc_gb):
    llmc = f"{llmc_ms:.1f} ({int(batch) * 1024 / llmc_ms * 1000:,.0f})" if llmc_ms else "failed"
    speedup = f"{llmc_ms / (1000 * ours['step_s']):.2f}x" if llmc_ms else ""
    return (f"| {model} | {batch} | {recompute_label(ours)} | {1000 * ours['step_s']:.1f} ({ours['tok_s']:,.0f}) | "
            f"{100 * ours['mfu']:.1f}% | {ours['device_used_gb']:.1f} | {llmc} | "
            f"{f'{llmc_gb:.1f}' if llmc_gb else ''} | {speedup} |")


def parse_config(item):
    """model:batch[:recompute[:layers]] -> (model, batch, recompute, layers or "")."""
    parts = item.split(":")
    if not 2 <= len(parts) <= 4 or not all(p.isdigit() for p in parts[1:]):
        fail(f"{item!r}: write model:batch[:recompute[:layers]], e.g. gpt2_1558m:16:2:20")
    model, batch, *rest = parts
    return model, batch, (rest[0] if rest else "0"), (rest[1] if len(rest) > 1 else "")


def fail(message):
    print(f"vs_llmc: {message}", file=sys.stderr)
    raise SystemExit(2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="model:batch[:recompute[:layers]], e.g. gpt2_1558m:16:2:20")
    p.add_argument("--llmc", required=True, type=Path, help="llm.c's train_gpt2cu, built by you")
    p.add_argument("--steps", type=int, default=30, help="timed steps of each (after 5 warm-up)")
    p.add_argument("--llmc-args", action="append", default=[], metavar="MODEL=ARGS",
                   help="llm.c flags for one model (default: '-r 0' at gpt2_124m, none elsewhere)")
    p.add_argument("--logs", type=Path, default=None, help="a folder for llm.c's logs (default: a temporary one)")
    a = p.parse_args()
    if not (a.llmc.is_file() and os.access(a.llmc, os.X_OK)):
        fail(f"--llmc {a.llmc} is not an executable file; build llm.c's train_gpt2cu first (see --help)")
    llmc_args = dict(DEFAULT_LLMC_ARGS)
    for item in a.llmc_args:
        model, sep, args = item.partition("=")
        if not sep:
            fail(f"--llmc-args {item!r}: write MODEL=ARGS, e.g. gpt2_124m='-r 0 -ge 2'")
        llmc_args[model] = args
    configs = [parse_config(item) for item in a.configs]
    for model, *_ in configs:  # every preset known before the first run, not after an hour of them
        preset_layers(model)
    work = Path(tempfile.mkdtemp(prefix="vs-llmc-"))
    logs = a.logs or work
    logs.mkdir(parents=True, exist_ok=True)
    prepare_tokens(work / "data")
    rows = []
    for model, batch, recompute, layers in configs:
        extra = llmc_args.get(model, "")
        ms, gb = run_llmc(llmc_command(a.llmc, work / "data", model, int(batch), a.steps, extra),
                          logs / f"llmc_{model}_{batch}.log")
        ours = run_distgpt(model, batch, recompute, layers, a.steps)
        if ours:
            rows.append(table_row(model, batch, ours, ms, gb))
            print(json.dumps({"model": model, "B": int(batch), "llmc_args": extra, "llmc_ms": ms, "llmc_gb": gb,
                              "distgpt_ms": 1000 * ours["step_s"], "distgpt_gb": ours["device_used_gb"]}), flush=True)
    print("\n| model | B | recompute | distgpt ms (tok/s) | MFU | GB | llm.c ms (tok/s) | llm.c GB | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
