"""benchmarks/vs_llmc.py on the CPU: llm.c's printed step times read back, its command built from
the model presets, and a missing binary refused in one line (the GPU runs are the device's)."""
import importlib.util
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_llmc.py"


@pytest.fixture(scope="module")
def vs_llmc():
    if str(SCRIPT.parent) not in sys.path:  # it imports throughput.py from beside it, as a script does
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("vs_llmc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llmc_log(times):
    """Lines as llm.c's train_gpt2cu prints them, with the evaluation lines between."""
    lines = ["| val_loss_every        | 100000 |", "val loss 10.98"]
    for step, ms in enumerate(times, start=1):
        lines.append(f"step {step:4d}/{len(times)} | loss {random.uniform(5, 11):7.6f} (+0.00z)| norm 1.2345 "
                     f"(+0.00z)| lr 3.00e-04 | {ms:.2f} ms | 47.5% bf16 MFU | {int(16384 / ms * 1000)} tok/s")
    lines += ["val loss 6.56", "total average iteration time: 341.5 ms"]
    return "\n".join(lines)


def test_llmc_step_times_are_read_without_the_warmup(vs_llmc):
    times = [round(random.uniform(100, 400), 2) for _ in range(40)]
    times[0] = 5000.0  # the first step carries cuBLAS/cuDNN set-up
    assert vs_llmc.llmc_step_ms(llmc_log(times)) == pytest.approx(statistics.median(times[vs_llmc.WARMUP_STEPS:]))
    assert vs_llmc.llmc_step_ms("no steps here\nval loss 6.5") is None


@pytest.mark.parametrize("model,depth", [("gpt2_124m", 12), ("gpt2_350m", 24), ("gpt2_1558m", 48)])
def test_llmc_command_takes_the_preset_depth_and_batch(vs_llmc, model, depth):
    cmd = vs_llmc.llmc_command(Path("/bin/llmc"), Path("/data"), model, 16, 30, "-r 0")
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert flags["-e"] == f"d{depth}" and flags["-b"] == "16" and flags["-t"] == "1024"
    assert flags["-d"] == str(16 * 1024)  # one micro-step a step: no gradient accumulation in llm.c either
    assert flags["-x"] == str(30 + vs_llmc.WARMUP_STEPS) and flags["-r"] == "0"


def test_missing_binary_unknown_preset_or_bad_config_is_one_line_exit_2(tmp_path):
    for args in (["--llmc", str(tmp_path / "train_gpt2cu"), "gpt2_124m:8"],
                 ["--llmc", sys.executable, "gpt2_9000m:8"], ["--llmc", sys.executable, "gpt2_124m"],
                 ["--llmc", sys.executable, "gpt2_124m:8:x"]):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("vs_llmc: ")


def test_run_llmc_reads_a_binary_s_output_and_keeps_its_log(vs_llmc, tmp_path):
    """A stand-in for train_gpt2cu that prints llm.c's lines: the median comes back and the log
    is kept; one that exits non-zero comes back as (None, None)."""
    times = [round(random.uniform(10, 20), 2) for _ in range(12)]
    (tmp_path / "out.txt").write_text(llmc_log(times) + "\n")
    fake = tmp_path / "train_gpt2cu"
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'out.txt'}\nexit 0\n")
    fake.chmod(0o755)
    ms, _ = vs_llmc.run_llmc([str(fake)], tmp_path / "llmc.log")
    assert ms == pytest.approx(statistics.median(times[vs_llmc.WARMUP_STEPS:]))
    assert "total average iteration time" in (tmp_path / "llmc.log").read_text()
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'out.txt'}\nexit 3\n")
    assert vs_llmc.run_llmc([str(fake)], tmp_path / "failed.log") == (None, None)
