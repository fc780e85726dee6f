"""The training loop on the GPU: a run stopped at a checkpoint and resumed is bitwise the straight
run. Its bf16 parameters' fp32 master weights live split on the device (the parameter's bits and
a 16-bit low half, backends/cuda/adamw.py); a checkpoint writes them joined, as fp32, and a resume
splits them again with the rounding of the step they were saved at."""
import pytest
from safetensors.torch import load_file

from distgpt import checkpoint
from distgpt.cli import main
from distgpt.train import builtin_text
from gpu_check import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

SMALL_GPU = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "train.sample_every=0", "train.log_every=5",
             "+run=debug_cpu", "backend=cuda", "device=cuda", "dtype=bfloat16", "deterministic=true"]


def test_gpu_resume_is_bitwise_identical(tmp_path):
    data = [f"data.train={tmp_path}/data/tinyshakespeare_train_*.bin",
            f"data.val={tmp_path}/data/tinyshakespeare_val_*.bin",
            f"data.source={builtin_text('tinyshakespeare')}"]
    common = [*SMALL_GPU, *data, f"out_dir={tmp_path}", "train.val_every=5", "train.checkpoint_every=10",
              "train.total_batch_tokens=512", "train.micro_batch=2", "train.seq_len=64", "optim.lr=3e-3"]
    assert main(["train", *common, "name=straight", "train.max_steps=20"]) == 0
    assert main(["train", *common, "name=resumed", "train.max_steps=20", "train.stop_after=10"]) == 0
    assert main(["train", *common, "name=resumed", "train.max_steps=20", "resume=auto"]) == 0
    from test_train import read_metrics
    straight, straight_val = read_metrics(tmp_path / "straight")
    resumed, resumed_val = read_metrics(tmp_path / "resumed")
    assert len(straight) == 20 and straight[-1]["loss"] < straight[0]["loss"] - 1.0  # it learns
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    assert [r["grad_norm"] for r in straight] == [r["grad_norm"] for r in resumed]
    assert [r["val_loss"] for r in straight_val] == [r["val_loss"] for r in resumed_val]
    a, b = (checkpoint.find_latest(tmp_path / name) for name in ("straight", "resumed"))
    for file in (checkpoint.MODEL_FILE, checkpoint.optimizer_file(0)):
        ta, tb = load_file(str(a / file)), load_file(str(b / file))
        assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta), f"{file} differs"
    assert load_file(str(a / checkpoint.optimizer_file(0)))["master"].dtype.itemsize == 4
