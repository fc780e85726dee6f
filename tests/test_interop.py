"""Models in and out: Hugging Face GPT-2 directories (checked by loading them with transformers)
and llm.c model files (round trips and their header)."""
import json

import numpy as np
import pytest
import torch

from distgpt import cli, interop
from distgpt.backends import reference
from distgpt.config import ModelConfig, load_config
from distgpt.parallel.bootstrap import bootstrap
from distgpt.train import builtin_text
from distgpt.interop import hf, llmc
from distgpt.model.gpt2 import GPT2

transformers = pytest.importorskip("transformers")

CFG = ModelConfig(name="io", n_layer=2, n_head=2, n_embd=32, vocab_size=50257, padded_vocab_size=50304,
                  block_size=64)
# distgpt's reference ops against transformers' GPT-2, both fp32 on the CPU, same weights: the
# two compute the same function in another order (fused vs separate qkv, tanh-GELU written
# apart), so logits differ by float32 rounding. Measured max |difference| over 2 x 24 x 50257
# logits: 2.6e-6 for the export (logits up to 5.1), 1.8e-7 for the import (up to 0.6); 1e-4 is
# ~40x the larger, and a transposed or misplaced tensor gives O(1).
LOGITS_ATOL = 1e-4


def random_model(seed=3):
    m = GPT2(CFG, reference, 2, CFG.block_size, torch.float32, "cpu")
    m.init_weights(seed)
    m.params.mul_(3.0)  # livelier logits than GPT-2's init
    return m


def distgpt_logits(m, tokens):
    m.forward(tokens)
    return m.logits[:, :, :CFG.vocab_size].clone()


def tokens(seed=0, t=24):
    return torch.randint(0, CFG.vocab_size, (2, t), generator=torch.Generator().manual_seed(seed))


def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path):
    m, x = random_model(), tokens()
    hf.export_hf(m.p, CFG, tmp_path / "hf")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = theirs(x).logits
    diff = (distgpt_logits(m, x) - want).abs().max().item()
    assert diff <= LOGITS_ATOL, f"logits differ by {diff:.2e}"
    cfg, named = hf.import_hf(tmp_path / "hf")  # and back: every tensor bitwise
    assert (cfg.n_layer, cfg.n_embd, cfg.padded_vocab_size, cfg.block_size) == (2, 32, 50304, 64)
    assert all(torch.equal(named[k], m.p[k]) for k in m.p)


def test_a_transformers_model_imports_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    cfg, named = interop.load_pretrained(f"hf:{tmp_path / 'theirs'}")
    m = GPT2(cfg, reference, 2, cfg.block_size, torch.float32, "cpu")
    for name, view in m.p.items():
        view.copy_(named[name])
    x = tokens(1)
    with torch.no_grad():
        want = theirs(x).logits
    assert (distgpt_logits(m, x) - want).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llmc_round_trip(tmp_path, dtype):
    m = random_model()
    path = llmc.write_llmc(m.p, CFG, tmp_path / "model.bin", dtype)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert list(header[:8]) == [20240326, 3 if dtype == torch.float32 else 5, 64, 50257, 2, 2, 32, 50304]
    assert not header[8:].any()
    itemsize = 4 if dtype == torch.float32 else 2
    assert path.stat().st_size == 1024 + itemsize * sum(v.numel() for v in m.p.values())
    cfg, named = llmc.read_llmc(path)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.padded_vocab_size, cfg.block_size) == \
        (2, 2, 32, 50257, 50304, 64)
    for name, view in m.p.items():  # fp32 bitwise; bf16 equal to the bf16-rounded weights
        assert torch.equal(named[name], view.to(dtype).to(torch.float32)), name


def test_llmc_order_puts_each_kind_of_all_layers_together(tmp_path):
    """The second tensor after wpe in llm.c's file is layer 1's ln1 weight, not layer 0's ln1 bias."""
    m = random_model()
    path = llmc.write_llmc(m.p, CFG, tmp_path / "model.bin")
    data = np.fromfile(path, dtype=np.float32, offset=1024)
    start = 50304 * 32 + 64 * 32
    assert np.array_equal(data[start:start + 32], m.p["transformer.h.0.ln_1.weight"].numpy())
    assert np.array_equal(data[start + 32:start + 64], m.p["transformer.h.1.ln_1.weight"].numpy())


def test_bad_llmc_files_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.bin"
    header = np.zeros(256, dtype=np.int32)
    header[0] = 20240520  # a token shard, not a model
    bad.write_bytes(header.tobytes())
    with pytest.raises(hf.FormatError, match="not an llm.c model file"):
        llmc.read_llmc(bad)
    good = llmc.write_llmc(random_model().p, CFG, tmp_path / "good.bin")
    good.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(hf.FormatError, match="truncated"):
        llmc.read_llmc(good)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Two steps of a small model on Shakespeare, checkpointed: the source of the exports."""
    root = tmp_path_factory.mktemp("run")
    args = ["train", "+run=debug_cpu", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64",
            "train.seq_len=32", "train.micro_batch=2", "train.max_steps=2", "train.val_every=0",
            "train.sample_every=0", f"out_dir={root}", "name=src",
            f"data.train={root}/data/ts_train_*.bin", f"data.val={root}/data/ts_val_*.bin",
            f"data.source={builtin_text('tinyshakespeare')}"]
    assert cli.main(args) == 0
    return root


def test_cli_export_and_init_from_start_a_run_from_those_weights(trained_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from distgpt import checkpoint
    from distgpt.train import Trainer
    src = trained_run / "src"
    trained = load_file(str(checkpoint.find_latest(src) / checkpoint.MODEL_FILE))
    assert cli.main(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert cli.main(["export", str(src), "--format", "llmc", "--out", str(tmp_path / "m.bin")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_layer"] == 2
    for spec in (f"hf:{tmp_path / 'hf'}", f"llmc:{tmp_path / 'm.bin'}"):
        cfg = load_config(["+run=debug_cpu", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
                           "model.block_size=64", "train.seq_len=32", "train.micro_batch=2",
                           f"out_dir={tmp_path}", f"name=ft{len(spec)}", f"init_from={spec}",
                           f"data.train={trained_run}/data/ts_train_*.bin", f"data.val={trained_run}/data/ts_val_*.bin"])
        trainer = Trainer(cfg, bootstrap("cpu"))
        assert all(torch.equal(trainer.model.p[k], trained[k]) for k in trained), spec
    capsys.readouterr()
    # a preset of another shape: one line naming what differs
    assert cli.main(["train", "+run=debug_cpu", f"init_from=hf:{tmp_path / 'hf'}", f"out_dir={tmp_path}",
                     f"data.train={trained_run}/data/ts_train_*.bin", f"data.val={trained_run}/data/ts_val_*.bin"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_embd 32 vs model's 128" in err[0] and "model=" in err[0]
