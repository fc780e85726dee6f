"""The run survives what would end it: steps with non-finite or spiking loss and gradient norm
are skipped (spikes.py), and SIGTERM / SIGUSR1 stop it with a checkpoint (preemption.py); both
resume bitwise. Faults are injected by tests/faults.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distgpt import checkpoint
from distgpt.cli import main
from distgpt.preemption import PREEMPTED_EXIT_CODE
from faults import install
from test_train import SMALL, shards  # noqa: F401 (shards is a fixture)

TESTS = Path(__file__).resolve().parent
# 8 steps, validation every 4; the z-score check starts after 4 accepted steps
RUN = [*SMALL, "train.micro_batch=2", "train.seq_len=32", "train.max_steps=8", "train.val_every=4",
       "train.val_steps=1", "train.checkpoint_every=0", "train.skip_min_samples=4", "train.skip_window=8"]
# in the faulty run: step 3's gradient holds a NaN, step 6's loss is 100 too high (4 accepted
# steps behind it: 1, 2, 4, 5) and step 8's gradient 1000x too large
FAULTS = "nan@3,loss_spike@6,grad_spike@8"
SKIPPED = {3: "norm_not_finite", 6: "loss_spike", 8: "norm_spike"}


def records(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def numbers(run_dir):
    """Every logged number but the timings: step records, then validation records."""
    timing = ("time", "step_ms", "tokens_per_s")
    return [[{k: v for k, v in r.items() if k not in timing} for r in rows] for rows in records(run_dir)]


def weights(run_dir, step=None):
    """The model's tensors in the latest checkpoint, or in the one of `step`."""
    ckpt = checkpoint.find_latest(run_dir) if step is None else checkpoint.step_dir(run_dir, step)
    return load_file(str(ckpt / checkpoint.MODEL_FILE))


def optimizer_state(run_dir, step):
    return load_file(str(checkpoint.step_dir(run_dir, step) / checkpoint.optimizer_file(0)))


def bitwise_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train(monkeypatch, faults, *args):
    with monkeypatch.context() as patch:
        install(faults, patch.setattr)
        return main(["train", *RUN, *args])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards):  # noqa: F811
    """The uninterrupted faulty run, with a checkpoint after every step (all kept)."""
    tmp = tmp_path_factory.mktemp("straight")
    patch = pytest.MonkeyPatch()
    try:
        assert train(patch, FAULTS, *shards, f"out_dir={tmp}", "name=faulty", "train.checkpoint_every=1",
                     "train.keep_checkpoints=10") == 0
    finally:
        patch.undo()
    return tmp


def test_skipped_steps_leave_weights_and_moments_as_they_were(straight):
    """A skipped step drops its batch: the weights and AdamW's state after it are bitwise those
    after the step before (a zero-gradient update would have moved them by their momentum),
    while every accepted step changes them."""
    steps, _ = records(straight / "faulty")
    assert {r["step"]: r["skipped"] for r in steps if "skipped" in r} == SKIPPED
    for step in range(2, 9):
        same = bitwise_equal(weights(straight / "faulty", step), weights(straight / "faulty", step - 1))
        same_moments = bitwise_equal(optimizer_state(straight / "faulty", step),
                                     optimizer_state(straight / "faulty", step - 1))
        assert same == same_moments == (step in SKIPPED), f"step {step}"
    state = checkpoint.load_state(checkpoint.find_latest(straight / "faulty"))
    assert state["spike_guard"]["losses"] == [steps[s - 1]["loss"] for s in (1, 2, 4, 5, 7)]
    assert state["skips_in_a_row"] == 1


def test_resume_after_skips_is_bitwise(tmp_path, shards, straight, monkeypatch):  # noqa: F811
    """Stopped after step 5 and resumed: step 6's loss spike is judged against the window the
    checkpoint carried (without it, no sample would be there to call it a spike)."""
    args = [*shards, f"out_dir={tmp_path}", "name=resumed"]
    assert train(monkeypatch, FAULTS, *args, "train.stop_after=5") == 0
    assert train(monkeypatch, FAULTS, *args) == 0
    assert numbers(tmp_path / "resumed") == numbers(straight / "faulty")
    assert bitwise_equal(weights(tmp_path / "resumed"), weights(straight / "faulty"))


def test_preempted_run_checkpoints_and_resumes_bitwise(tmp_path, shards, straight, monkeypatch, capsys):  # noqa: F811
    """SIGTERM arrives during step 4's backward: the run finishes step 4 (its validation too),
    checkpoints it and returns the preemption exit code with one line; resume=auto continues
    to the uninterrupted run's weights and metrics; the signal handlers are restored."""
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    args = [*shards, f"out_dir={tmp_path}", "name=preempted"]
    assert train(monkeypatch, FAULTS + ",sigterm@4", *args) == PREEMPTED_EXIT_CODE == 75
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == handlers
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("preempted (SIGTERM): stopped after step 4 with checkpoint ") and "resume=auto" in out[-1]
    assert checkpoint.find_latest(tmp_path / "preempted").name == "step_00000004"
    steps, vals = records(tmp_path / "preempted")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in vals] == [0, 4]
    assert train(monkeypatch, FAULTS, *args) == 0
    assert numbers(tmp_path / "preempted") == numbers(straight / "faulty")
    assert bitwise_equal(weights(tmp_path / "preempted"), weights(straight / "faulty"))


def queue_ahead(patch):
    """The trainer as on a GPU: the next step queued before the last one is read (on a CPU each
    step is done when queued, so the trainer queues none ahead there by itself)."""
    from distgpt.train import Trainer
    init = Trainer.__init__

    def init_ahead(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.ahead = 1
    patch.setattr(Trainer, "__init__", init_ahead)


def test_steps_queued_ahead_train_bitwise_and_stop_after_the_queued_one(tmp_path, shards, straight,  # noqa: F811
                                                                       monkeypatch, capsys):
    """With a step queued ahead: the same numbers and weights as one step at a time; SIGTERM in
    step 3 (step 4 already queued, since nothing happens between them on the host) stops after
    step 4 with its checkpoint, and the resumed run ends as the uninterrupted one."""
    queue_ahead(monkeypatch)
    assert train(monkeypatch, FAULTS, *shards, f"out_dir={tmp_path}", "name=ahead") == 0
    assert numbers(tmp_path / "ahead") == numbers(straight / "faulty")
    assert bitwise_equal(weights(tmp_path / "ahead"), weights(straight / "faulty"))
    args = [*shards, f"out_dir={tmp_path}", "name=stopped"]
    assert train(monkeypatch, FAULTS + ",sigterm@3", *args) == PREEMPTED_EXIT_CODE
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("preempted (SIGTERM): stopped after step 4 with checkpoint "), out[-1]
    assert checkpoint.find_latest(tmp_path / "stopped").name == "step_00000004"
    assert train(monkeypatch, FAULTS, *args) == 0
    assert numbers(tmp_path / "stopped") == numbers(straight / "faulty")
    assert bitwise_equal(weights(tmp_path / "stopped"), weights(straight / "faulty"))


def run_cli(tmp_path, faults, *args):
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent), WANDB_MODE="offline")
    return [sys.executable, str(TESTS / "faults.py"), faults, "train", *RUN, f"out_dir={tmp_path}", *args], env


def test_many_skips_in_a_row_stop_with_one_line(tmp_path, shards):  # noqa: F811
    cmd, env = run_cli(tmp_path, "nan@3,nan@4,nan@5", *shards, "name=diverged", "train.skip_max_in_a_row=3",
                       "train.checkpoint_every=2")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    latest = tmp_path / "diverged" / "checkpoints" / "step_00000002"
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for words in ("steps 3-5 were all skipped", "train.skip_max_in_a_row=3", "norm not finite",
                  "lower optim.lr or raise optim.warmup_steps", f"resume from checkpoint {latest}"):
        assert words in lines[0], lines[0]
    assert proc.stdout.count("SKIPPED (norm not finite)") == 3


def test_sigusr1_from_outside_stops_the_cli_with_a_checkpoint(tmp_path, shards):  # noqa: F811
    """The real thing: a running `distgpt train` gets SIGUSR1 from another process."""
    cmd, env = run_cli(tmp_path, "", *shards, "name=slurm", "train.max_steps=200", "train.val_every=0")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "slurm" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "Traceback" not in err
    last_step = records(tmp_path / "slurm")[0][-1]["step"]
    assert 2 <= last_step < 200
    assert checkpoint.find_latest(tmp_path / "slurm").name == f"step_{last_step:08d}"
    assert out.strip().splitlines()[-1].startswith(f"preempted (SIGUSR1): stopped after step {last_step} ")


SBATCH = TESTS.parent / "launch" / "slurm.sbatch"


@pytest.mark.parametrize("srun_exit,requeued", [(75, True), (0, False), (1, False)])
def test_slurm_script_requeues_after_a_preemption(tmp_path, srun_exit, requeued):
    """launch/slurm.sbatch with stand-ins for srun and scontrol: it requeues itself exactly when
    the ranks exit with the preemption code, and exits with their code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\necho \"srun $*\" >> {tmp_path}/calls\nexit {srun_exit}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"scontrol $*\" >> {tmp_path}/calls\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    proc = subprocess.run(["bash", str(SBATCH), "model=tiny"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == srun_exit, proc.stdout + proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "srun --mpi=pmix distgpt train model=tiny"
    assert calls[1:] == (["scontrol requeue 4242"] if requeued else [])
    header = SBATCH.read_text()
    assert "#SBATCH --signal=USR1@" in header and "#SBATCH --requeue" in header


def test_skipped_steps_reach_wandb(tmp_path, shards, monkeypatch):  # noqa: F811
    """W&B charts `skipped` (1 on a skipped step, 0 otherwise), read back from its offline log."""
    from wandb_records import history
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials either
    assert train(monkeypatch, "nan@2", *shards, f"out_dir={tmp_path}", "name=wb", "wandb=true",
                 "train.max_steps=3", "train.val_every=0") == 0
    log = next((tmp_path / "wb" / "wandb").glob("offline-run-*/*.wandb"))
    assert {r["_step"]: r["skipped"] for r in history(log) if "skipped" in r} == {1: 0, 2: 1, 3: 0}
