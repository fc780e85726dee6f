"""The training loop end to end on the CPU: learning, bitwise resume, atomic checkpoints,
schedules, and one-line errors for bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distgpt import checkpoint
from distgpt.cli import main
from distgpt.config import OptimConfig, load_config
from distgpt.data.shards import read_shard, shard_paths
from distgpt.optim import learning_rate
from distgpt.train import builtin_text

# a GPT-2 small enough for CI: 2 layers, width 64 (the 50257-row embedding is most of it)
SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "train.sample_every=0",
         "train.log_every=5", "+run=debug_cpu"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """tinyshakespeare shards, made once by the trainer's own first-use preparation (from the
    shipped text, named as data.source: the built-in preset alone fills its paths by itself)."""
    root = tmp_path_factory.mktemp("data")
    data = [f"data.train={root}/tinyshakespeare_train_*.bin", f"data.val={root}/tinyshakespeare_val_*.bin"]
    assert main(["train", *SMALL, *data, f"data.source={builtin_text('tinyshakespeare')}", f"out_dir={root}/runs",
                 "train.max_steps=1", "train.val_every=0"]) == 0
    return data


def read_metrics(run_dir):
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r]


def best_unigram_val_loss(train_tokens, val_tokens, vocab=50257):
    """The val loss of the best context-free model fit on the training tokens: their add-alpha
    smoothed frequencies, with alpha chosen on the val set itself (a generous bar)."""
    counts = np.bincount(train_tokens, minlength=vocab).astype(np.float64)
    return min(-np.log(((counts + a) / (counts.sum() + a * vocab))[val_tokens]).mean()
               for a in (0.01, 0.03, 0.1, 0.3, 1.0))


@pytest.mark.slow
def test_tiny_model_learns_shakespeare(tmp_path, shards):
    """Val loss starts at ln(50257) = 10.82 (GPT-2's init makes the logits ~0: uniform guessing)
    and must end below what any model that ignores context reaches: the best smoothed unigram
    fit on the training tokens scores ~6.45 nats on val (computed here). The run reaches ~6.3."""
    args = ["model=tiny", *shards, f"out_dir={tmp_path}", "name=learn", "train.max_steps=200",
            "train.val_every=100", "train.val_steps=8", "train.sample_every=200",
            "train.checkpoint_every=0", "train.log_every=50"]
    assert main(["train", *args]) == 0
    _, evals = read_metrics(tmp_path / "learn")
    train = np.concatenate([read_shard(p) for p in shard_paths(shards[0].split("=", 1)[1])])
    val = np.concatenate([read_shard(p) for p in shard_paths(shards[1].split("=", 1)[1])])
    bar = best_unigram_val_loss(train.astype(np.int64), val.astype(np.int64))
    assert 6.3 < bar < 6.6  # the bar itself, so a broken data path cannot make the test easy
    assert abs(evals[0]["val_loss"] - math.log(50257)) < 0.1
    assert evals[-1]["step"] == 200
    assert evals[-1]["val_loss"] < bar, f"val loss {evals[-1]['val_loss']:.3f} did not beat unigram {bar:.3f}"


@pytest.mark.parametrize("precision", [[], ["fp8=true", "fp8_scaling=current", "fp8_weight_gradients=false"],
                                       ["fp8=true", "fp8_scaling=current"], ["fp8=true", "fp8_amax_history=4"],
                                       ["fp8=true", "fp8_amax_history=4", "fp8_layernorm_cast=false",
                                        "fp8_delayed_weights=false"]],
                         ids=["dtype", "fp8_current", "fp8_current_wgrad", "fp8", "fp8_switches_off"])
def test_resume_is_bitwise_identical(tmp_path, shards, precision):
    """Also with fp8=true: current scaling keeps no state besides the weights, so a resumed run
    recomputes the same scales; delayed scaling's amax histories go to the checkpoint."""
    common = [*SMALL, *shards, f"out_dir={tmp_path}", "train.val_every=5", "train.checkpoint_every=10",
              "train.total_batch_tokens=512", "train.micro_batch=2", "train.seq_len=64", *precision]  # 2 micro-steps
    assert main(["train", *common, "name=straight", "train.max_steps=20"]) == 0
    assert main(["train", *common, "name=resumed", "train.max_steps=20", "train.stop_after=10"]) == 0
    assert checkpoint.find_latest(tmp_path / "resumed").name == "step_00000010"
    assert main(["train", *common, "name=resumed", "train.max_steps=20", "resume=auto"]) == 0
    straight, straight_val = read_metrics(tmp_path / "straight")
    resumed, resumed_val = read_metrics(tmp_path / "resumed")
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    assert [r["grad_norm"] for r in straight] == [r["grad_norm"] for r in resumed]
    assert [r["val_loss"] for r in straight_val] == [r["val_loss"] for r in resumed_val]
    assert len(straight) == 20
    a = checkpoint.load_state(checkpoint.find_latest(tmp_path / "straight"))
    b = checkpoint.load_state(checkpoint.find_latest(tmp_path / "resumed"))
    assert a["train_loader"] == b["train_loader"] and a["step"] == b["step"] == 20
    from safetensors.torch import load_file
    wa = load_file(str(checkpoint.find_latest(tmp_path / "straight") / checkpoint.MODEL_FILE))
    wb = load_file(str(checkpoint.find_latest(tmp_path / "resumed") / checkpoint.MODEL_FILE))
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_training_order_is_shuffled_and_validation_is_not(tmp_path, shards):
    common = [*SMALL, *shards, f"out_dir={tmp_path}", "train.val_every=2", "train.val_steps=2",
              "train.max_steps=2", "train.micro_batch=2", "train.seq_len=32"]
    assert main(["train", *common, "name=on"]) == 0  # data.shuffle is on by default
    assert main(["train", *common, "name=off", "data.shuffle=false"]) == 0
    assert main(["train", *common, "name=on_again", "data.shuffle=true"]) == 0
    (on, on_val), (off, off_val), (again, _) = (read_metrics(tmp_path / n) for n in ("on", "off", "on_again"))
    # the same weights see other training tokens, then the same validation tokens
    assert on_val[0]["val_loss"] == off_val[0]["val_loss"] and on[0]["loss"] != off[0]["loss"]
    assert [r["loss"] for r in on] == [r["loss"] for r in again]
    # unshuffled, step 1 reads the first 64 tokens of the train shard: its loss is theirs
    state = checkpoint.load_state(checkpoint.find_latest(tmp_path / "off"))["train_loader"]
    assert (state["shuffle"], state["epoch"], state["shard"], state["window"]) == (False, 0, 0, 2)
    state = checkpoint.load_state(checkpoint.find_latest(tmp_path / "on"))["train_loader"]
    assert state["shuffle"] is True and state["seed"] == 1337 and state["n_windows"] > 1000


def test_loader_state_from_before_shuffling(tmp_path, shards, capsys):
    """A checkpoint written before data.shuffle existed: refused in one line naming the fix by a
    shuffled run, continued exactly by an unshuffled one."""
    common = [*SMALL, *shards, f"out_dir={tmp_path}", "train.val_every=0", "train.micro_batch=2",
              "train.seq_len=32", "train.max_steps=6", "data.shuffle=false"]
    assert main(["train", *common, "name=straight"]) == 0
    assert main(["train", *common, "name=old", "train.stop_after=3"]) == 0
    state_file = checkpoint.find_latest(tmp_path / "old") / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    loader = state["train_loader"]
    assert (loader["shard"], loader["window"]) == (0, 3)  # 64 tokens a step
    state["train_loader"] = {"shard": loader["shard"], "position": loader["window"] * 64, "epoch": 0,
                             "micro_step": 0, "B": 2, "T": 32, "world": 1, "accum_steps": 1}
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", *common[:-1], "name=old"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resume it with data.shuffle=false" in err[0] and str(state_file.parent) in err[0]
    assert main(["train", *common, "name=old"]) == 0
    old, straight = read_metrics(tmp_path / "old")[0], read_metrics(tmp_path / "straight")[0]
    assert [(r["loss"], r["grad_norm"]) for r in old] == [(r["loss"], r["grad_norm"]) for r in straight]
    assert len(old) == 6


def test_raising_max_steps_on_resume_says_the_schedule_changes(tmp_path, shards, capsys):
    common = [*SMALL, *shards, f"out_dir={tmp_path}", "name=r", "train.val_every=0",
              "train.micro_batch=2", "train.seq_len=32", "optim.warmup_steps=2"]
    optim = load_config(common).optim  # tiny's cosine at lr 5e-3
    assert main(["train", *common, "train.max_steps=4"]) == 0
    assert "lr schedule" not in capsys.readouterr().out
    assert main(["train", *common, "train.max_steps=8", "train.stop_after=2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "lr schedule" in line]
    assert learning_rate(4, 8, optim) != learning_rate(4, 4, optim)
    assert lines == [f"train.max_steps changed from 4 to 8 on resume: the cosine lr schedule follows the new "
                     f"length from the next step (5) on; at step 5 the lr is {learning_rate(4, 8, optim):.4g}, "
                     f"not {learning_rate(4, 4, optim):.4g}"]
    steps, _ = read_metrics(tmp_path / "r")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[4]["lr"] == pytest.approx(learning_rate(4, 8, optim), rel=1e-12)
    assert main(["train", *common, "train.max_steps=8"]) == 0  # saved with 8: the same schedule
    assert "lr schedule" not in capsys.readouterr().out
    # in the warm-up (and at the first step after it) the lr does not depend on max_steps: the line
    # names the first step where it does
    assert main(["train", *common, "name=w", "optim.warmup_steps=6", "train.max_steps=3"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "name=w", "optim.warmup_steps=6", "train.max_steps=12", "train.stop_after=1"]) == 0
    assert "from the next step (4) on; at step 8 the lr is" in capsys.readouterr().out


def test_the_first_steps_timed_choices_are_logged_once_a_run(tmp_path, shards, capsys, monkeypatch):
    """What the backend's timing chose on the first step (the CUDA backend's dGELU forms) is one
    log line each, after this process's first step: once per run, and again in a resumed one
    (the timing runs again there). The reference times nothing; a stand-in reports two choices."""
    from distgpt.backends import reference
    monkeypatch.setattr(reference, "timed_choices", lambda: ["choice one", "choice two"])
    common = [*SMALL, *shards, f"out_dir={tmp_path}", "name=c", "train.val_every=0",
              "train.micro_batch=2", "train.seq_len=32"]
    assert main(["train", *common, "train.max_steps=3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out.count("choice one") == 1 and out.count("choice two") == 1
    assert main(["train", *common, "train.max_steps=5"]) == 0
    assert capsys.readouterr().out.splitlines().count("choice one") == 1


def test_a_half_written_checkpoint_is_never_the_latest(tmp_path, shards):
    common = [*SMALL, *shards, f"out_dir={tmp_path}", "name=r", "train.val_every=0",
              "train.checkpoint_every=5", "train.micro_batch=2", "train.seq_len=32"]
    assert main(["train", *common, "train.max_steps=10", "train.keep_checkpoints=1"]) == 0
    root = checkpoint.checkpoint_root(tmp_path / "r")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010"]
    # a crash while writing step 15: its directory exists only under the temporary name
    crashed = root / "step_00000015.tmp"
    crashed.mkdir()
    (crashed / checkpoint.MODEL_FILE).write_bytes(b"partial")
    assert checkpoint.find_latest(tmp_path / "r").name == "step_00000010"
    (root / "latest").unlink()  # even without the pointer, only complete directories count
    assert checkpoint.find_latest(tmp_path / "r").name == "step_00000010"


def _checkpointed(tmp_path, shards, steps=4):
    common = [*SMALL, *shards, f"out_dir={tmp_path}", "name=c", "train.val_every=0", "train.micro_batch=2",
              "train.seq_len=32", "train.checkpoint_every=2"]
    assert main(["train", *common, f"train.max_steps={steps}"]) == 0
    return common, checkpoint.checkpoint_root(tmp_path / "c")


def test_a_checkpoint_of_another_model_is_refused_naming_the_fields(tmp_path, shards, capsys):
    """A head count changes no tensor's shape: the fields are compared, before any weight moves."""
    common, _ = _checkpointed(tmp_path, shards)
    capsys.readouterr()
    assert main(["train", *common, "train.max_steps=6", "model.n_head=4", "model.block_size=512"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model" in err[0], err
    assert "n_head=2 (this run: 4)" in err[0] and "block_size=" in err[0] and "n_embd" not in err[0]


def test_a_damaged_checkpoint_names_the_newest_intact_one(tmp_path, shards, capsys):
    common, root = _checkpointed(tmp_path, shards)
    model_file = root / "step_00000004" / checkpoint.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:-100])  # a copy cut short
    capsys.readouterr()
    assert main(["train", *common, "train.max_steps=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged" in err[0] and str(model_file) in err[0], err
    assert f"resume={root / 'step_00000002'}" in err[0]
    assert main(["train", *common, "train.max_steps=6", f"resume={root / 'step_00000002'}"]) == 0


def test_optimizer_state_of_another_flat_layout_is_refused(tmp_path, shards, capsys):
    """Optimizer shards are flat-buffer slices: a checkpoint from another layout version (the
    version its shards record) is refused in one line, not read into the wrong elements."""
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    common, root = _checkpointed(tmp_path, shards)
    shard = root / "step_00000004" / checkpoint.optimizer_file(0)
    with safe_open(str(shard), framework="pt") as f:
        meta = _json.loads(f.metadata()["meta"])
    assert meta["layout_version"] == 1
    save_file(load_file(str(shard)), str(shard), metadata={"meta": _json.dumps(dict(meta, layout_version=99))})
    capsys.readouterr()
    assert main(["train", *common, "train.max_steps=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flat-buffer version 99" in err[0] and "init_from=hf:" in err[0], err


def test_a_full_disk_during_a_save_leaves_latest_intact(tmp_path, shards, capsys, monkeypatch):
    """The second checkpoint's write fails as a full disk does: the run ends with one line, the
    half-written directory is gone, and `latest` still names the first checkpoint."""
    import errno
    real, calls = checkpoint.save_tensors, []

    def fills_up(tensors, file, metadata=None):
        calls.append(file)
        if len(calls) > 2:  # the first save writes two files (optimizer shard, model)
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real(tensors, file, metadata)
    monkeypatch.setattr(checkpoint, "save_tensors", fills_up)
    common = [*SMALL, *shards, f"out_dir={tmp_path}", "name=c", "train.val_every=0", "train.micro_batch=2",
              "train.seq_len=32", "train.checkpoint_every=2", "train.max_steps=4"]
    capsys.readouterr()
    assert main(["train", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    root = checkpoint.checkpoint_root(tmp_path / "c")
    assert len(err) == 1 and "No space left on device" in err[0] and "step_00000004.tmp" in err[0], err
    assert "latest checkpoint is still" in err[0] and "step_00000002" in err[0]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert checkpoint.find_latest(tmp_path / "c").name == "step_00000002"


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_checkpoint_files_follow_the_umask(tmp_path, shards, umask):
    """Every file a checkpoint (or an export) writes gets 0666 less the umask, as open() gives
    the metrics beside it; safetensors on its own writes 0600."""
    before = os.umask(umask)
    try:
        args = [*SMALL, *shards, f"out_dir={tmp_path}", "name=u", "train.val_every=0", "train.max_steps=1",
                "train.micro_batch=2", "train.seq_len=32"]
        assert main(["train", *args]) == 0
        assert main(["export", str(tmp_path / "u"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(before)
    files = [p for p in (tmp_path / "u").rglob("*") if p.is_file()] + [tmp_path / "hf" / "model.safetensors"]
    names = {p.name for p in files}
    assert {checkpoint.MODEL_FILE, checkpoint.optimizer_file(0), checkpoint.STATE_FILE, "latest",
            "metrics.jsonl"} <= names and not any(n.endswith(".mode") for n in names)
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in files} == {str(p): oct(0o666 & ~umask) for p in files}
    step_dir = checkpoint.find_latest(tmp_path / "u")
    assert step_dir.stat().st_mode & 0o777 == 0o777 & ~umask


def test_finished_run_says_so(tmp_path, shards, capsys):
    common = [*SMALL, *shards, f"out_dir={tmp_path}", "name=r", "train.val_every=0",
              "train.micro_batch=2", "train.seq_len=32", "train.max_steps=2"]
    assert main(["train", *common]) == 0
    capsys.readouterr()
    assert main(["train", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already finished 2" in err[0] and "train.max_steps" in err[0]


@pytest.mark.parametrize("override,expected", [
    ("model.n_head=3", "model.n_head: 3 heads do not divide model.n_embd=64"),
    ("train.total_batch_tokens=1000", "not a multiple of micro_batch x seq_len x world size"),
    ("model=gpt2_125m", "unknown model preset 'gpt2_125m'"),
    ("+run=repro_gpt2_125m", "unknown run preset 'repro_gpt2_125m'"),
    ("train.micro_batchh=4", "train.micro_batchh: Key 'micro_batchh' not in 'TrainConfig'"),
    ("train.seq_len=2048", "train.seq_len=2048 must be in 1..model.block_size=1024"),
    ("seed=-1", "seed=-1 must be >= 0"),
    ("data.shuffle=maybe", "data.shuffle: "),
    ("overlap_comm=sometimes", "overlap_comm=sometimes: choose auto, true or false"),
    ("bucket_mb=0", "bucket_mb=0.0 must be > 0"),
    ("fp8=maybe", "fp8: "),
    ("gather_in_forward=sometimes", "gather_in_forward=sometimes: choose auto, true or false"),
    ("train.recompute_layers=1", "train.recompute_layers=1: with train.recompute >= 1"),
    ("train.recompute=2 train.recompute_layers=99", "choose 0 to n_layer="),
    ("fp8_scaling=late", "fp8_scaling=late: choose current or delayed"),
    ("matmul_dgelu=epilogue", "matmul_dgelu=epilogue: choose one of auto, fused, transposed, split"),
    ("matmul_bias_column=sometimes", "matmul_bias_column=sometimes: choose auto, true or false"),
    ("fp8_amax_history=0", "fp8_amax_history=0 must be >= 1"),
    ("fp8_margin=-1", "fp8_margin=-1 must be in 0..8"),
    ("fp8=true fp8_weight_gradients=true train.micro_batch=1 train.seq_len=20 train.total_batch_tokens=20",
     "fp8_weight_gradients=true: train.micro_batch x train.seq_len = 20 tokens must be a multiple of 16"),
])
def test_bad_config_is_one_clear_line(tmp_path, capsys, override, expected):
    assert main(["train", *SMALL, f"out_dir={tmp_path}", *override.split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_fp8_at_a_width_fp8_matmuls_cannot_take_is_one_clear_line(tmp_path, capsys):
    assert main(["train", *SMALL, f"out_dir={tmp_path}", "fp8=true", "model.n_embd=72", "model.n_head=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp8=true: model.n_embd=72 must be a multiple of 16" in err[0], err


def test_missing_data_file_is_one_clear_line(tmp_path, capsys):
    args = [*SMALL, f"out_dir={tmp_path}", f"data.train={tmp_path}/nowhere/x_train_*.bin",
            "data.source="]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path}/nowhere/x_train_*.bin" in err[0] and "distgpt prepare" in err[0]


@pytest.mark.parametrize("which", ["train", "val", "both"])
def test_a_user_path_is_never_filled_with_the_shipped_corpus(tmp_path, capsys, which):
    """The built-in source (the default) fills the built-in preset's own paths only: a data path
    the user gave that matches nothing is one line naming it, and nothing is written there."""
    paths = {"train": f"data.train={tmp_path}/mine/x_train_*.bin", "val": f"data.val={tmp_path}/mine/x_val_*.bin"}
    chosen = list(paths.values()) if which == "both" else [paths[which]]
    assert main(["train", *SMALL, f"out_dir={tmp_path}", *chosen]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    named = f"{tmp_path}/mine/x_{'val' if which == 'val' else 'train'}_*.bin"
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "mine").exists()


def test_bad_shard_is_one_clear_line_without_traceback(tmp_path, shards):
    bad = tmp_path / "bad_train_000000.bin"
    bad.write_bytes(np.array([12345, 1, 10] + [0] * 253, dtype=np.int32).tobytes() + b"\0" * 20)
    proc = subprocess.run([sys.executable, "-m", "distgpt", "train", *SMALL, f"out_dir={tmp_path}",
                           f"data.train={bad}", shards[1]], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "magic" in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_plan_that_cannot_fit_says_so_and_what_to_change():
    """Before anything is allocated: the planned and free sizes, and the knobs that shrink the plan."""
    import torch
    from distgpt.train import TrainingError, check_fits
    with pytest.raises(TrainingError) as error:
        check_fits(2**60, torch.device("cpu"))
    message = str(error.value)
    assert message.startswith(f"the plan needs {2**30:.1f} GiB but this machine has ")
    for knob in ("train.micro_batch", "train.recompute", "train.recompute_layers", "zero_stage=1"):
        assert knob in message, message


def test_schedules():
    o = OptimConfig(lr=1.0, warmup_steps=10, final_lr_frac=0.1, schedule="cosine")
    assert learning_rate(0, 100, o) == pytest.approx(0.1)
    assert learning_rate(9, 100, o) == pytest.approx(1.0)
    assert learning_rate(10, 100, o) == pytest.approx(1.0)
    assert learning_rate(99, 100, o) == pytest.approx(0.1)
    assert learning_rate(int(10 + 89 / 2), 100, o) == pytest.approx(0.55, abs=0.02)
    o.schedule = "linear"
    assert learning_rate(99, 100, o) == pytest.approx(0.1)
    assert learning_rate(54, 100, o) == pytest.approx(1.0 - 0.9 * 44 / 89)
    o.schedule = "constant"
    assert learning_rate(99, 100, o) == 1.0
    o.schedule, o.decay_frac = "wsd", 0.2  # stable until step 80, then linear to 0.1 at 99
    assert learning_rate(79, 100, o) == 1.0
    assert learning_rate(80, 100, o) == 1.0
    assert learning_rate(99, 100, o) == pytest.approx(0.1)
    assert 0.1 < learning_rate(90, 100, o) < 1.0


HELLASWAG = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag_val.jsonl"


@pytest.mark.skipif(not HELLASWAG.exists(), reason="needs ../shared/data/hellaswag_val.jsonl")
def test_wandb_logs_offline_and_reads_back(tmp_path, shards, monkeypatch):
    """No key, no mode: W&B logs offline into the run directory. What it logged, read back from
    its own log file: the config, every step's loss (equal to metrics.jsonl), val loss,
    HellaSwag and the samples table; a resumed run continues the same W&B run id."""
    from wandb_records import config, history
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials either
    args = [*SMALL, *shards, f"out_dir={tmp_path}", "name=wb", "wandb=true", "train.max_steps=4",
            "train.val_every=2", "train.sample_every=2", "train.hellaswag_every=2", "train.hellaswag_limit=4",
            f"hellaswag_path={HELLASWAG}", "train.micro_batch=2", "train.seq_len=32"]
    assert main(["train", *args, "train.stop_after=2"]) == 0
    assert main(["train", *args]) == 0  # resume=auto: steps 3 and 4
    run_id = (tmp_path / "wb" / "wandb_id.txt").read_text().strip()
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    # one W&B run, twice opened (W&B adds "-1" to the directory when both open in the same second)
    assert len(runs) == 2 and all(f"-{run_id}" in r.name for r in runs)
    logs = [next(r.glob("*.wandb")) for r in runs]
    assert config(logs[0])["model"]["n_layer"] == 2 and config(logs[0])["train"]["max_steps"] == 4
    rows = history(logs[0]) + history(logs[1])
    steps, _ = read_metrics(tmp_path / "wb")
    logged = {r["_step"]: r["loss"] for r in rows if "loss" in r}
    assert logged == {r["step"]: r["loss"] for r in steps} and sorted(logged) == [1, 2, 3, 4]
    assert sorted(r["_step"] for r in rows if "val_loss" in r) == [0, 2, 4]
    hs = [r for r in rows if "hellaswag_acc_norm" in r]
    assert [r["_step"] for r in hs] == [0, 2, 4] and all(r["hellaswag_count"] == 4 for r in hs)
    tables = [r for r in rows if r.get("samples/_type") == "table-file"]
    assert [t["samples/nrows"] for t in tables] == [1, 2]  # step 4's table holds both samples
    table = json.loads(next(runs[1].glob("files/media/table/samples_4_*.table.json")).read_text())
    assert table["columns"] == ["step", "text"] and [row[0] for row in table["data"]] == [2, 4]


def test_sample_streams_text_from_a_run(tmp_path, shards, capsys):
    args = [*SMALL, *shards, f"out_dir={tmp_path}", "name=s", "train.val_every=0", "train.max_steps=2",
            "train.micro_batch=2", "train.seq_len=32"]
    assert main(["train", *args]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "s"), "--prompt", "ROMEO:", "--tokens", "8", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.strip()) > len("ROMEO:")
    assert main(["sample", str(tmp_path / "s"), "--prompt", "ROMEO:", "--tokens", "8", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # seeded: the same text again
    assert main(["sample", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("first", ["fp8_scaling=current", "fp8=false"])
def test_resuming_with_delayed_fp8_scaling_from_a_checkpoint_without_histories_starts_them_afresh(
        tmp_path, shards, capsys, first):
    """A run switches to the fp8 recipe at a resume (e.g. from bf16, or from a checkpoint of the
    old current-scaling default): the histories start as in a new run, and the log says so."""
    common = [*SMALL, *shards, f"out_dir={tmp_path}", "train.val_every=0", "train.checkpoint_every=2",
              "train.micro_batch=2", "train.seq_len=32", "fp8=true", "train.max_steps=2", "name=switch"]
    assert main(["train", *common, first]) == 0
    capsys.readouterr()
    assert main(["train", *common, "train.max_steps=4", "fp8_scaling=delayed"]) == 0
    out = capsys.readouterr()
    assert "delayed scaling starts them afresh" in out.out + out.err
    rows, _ = read_metrics(tmp_path / "switch")
    assert [r["step"] for r in rows][-2:] == [3, 4] and all(math.isfinite(r["loss"]) for r in rows)


def test_fp8_summary_names_the_recipe_and_says_nothing_without_fp8():
    from distgpt.config import load_config
    from distgpt.train import fp8_summary
    assert fp8_summary(load_config([])) == ""  # the fp8_* defaults alone switch nothing on
    assert fp8_summary(load_config(["fp8=true"])) == ", fp8 block matmuls: fp8 weight gradients, delayed scaling"
    assert fp8_summary(load_config(["fp8=true", "fp8_weight_gradients=false", "fp8_scaling=current"])) == \
        ", fp8 block matmuls: bf16 weight gradients, current scaling"
    assert fp8_summary(load_config(["fp8=true", "fp8_fuse_gelu=false"])) == \
        ", fp8 block matmuls: fp8 weight gradients, delayed scaling, fc's gradient cast apart from the GELU derivative"
    assert fp8_summary(load_config(["fp8=true", "fp8_layernorm_cast=false", "fp8_delayed_weights=false"])) == \
        ", fp8 block matmuls: fp8 weight gradients, delayed scaling, ln1 and ln2 outputs cast apart, " \
        "weights cast by current scaling"
    # where the fusion cannot act, turning it off changes nothing to name
    assert fp8_summary(load_config(["fp8=true", "fp8_fuse_gelu=false", "fp8_scaling=current"])) == \
        ", fp8 block matmuls: fp8 weight gradients, current scaling"
