"""HellaSwag scoring against an independent computation: the plain PyTorch GPT-2 of the tests,
one (context + ending) at a time, the context's targets ignored by cross_entropy."""
import sys
from pathlib import Path

import pytest
import torch

from distgpt import cli, hellaswag
from distgpt.backends import reference
from distgpt.config import ModelConfig
from distgpt.parallel.comm import LocalComm
from distgpt.model.gpt2 import GPT2
from plain_gpt2 import plain_gpt2_loss

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag_val.jsonl"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data/hellaswag_val.jsonl")
CFG = ModelConfig(name="hs", n_layer=2, n_head=2, n_embd=32, vocab_size=50257, padded_vocab_size=50304,
                  block_size=128)


class ShardOf(LocalComm):
    """Rank `rank` of `world`, whose all_reduce leaves its own counts (summed by the test)."""

    def __init__(self, rank, world):
        self.rank, self.world = rank, world


def model(B):
    m = GPT2(CFG, reference, B, CFG.block_size, torch.float64, "cpu")
    m.init_weights(5)
    # GPT-2's init gives near-uniform predictions; larger weights make the endings' losses differ
    m.params.mul_(4.0)
    return m


def independent_scores(m, items):
    """(sum, mean) loss of each ending, by the plain model on one row at a time."""
    scores = []
    for context, endings, _ in items:
        for ending in endings:
            row = torch.tensor([context + ending])
            targets = row[:, 1:].clone()
            targets[:, :len(context) - 1] = -100  # cross_entropy's ignore_index: context predictions
            mean = float(plain_gpt2_loss(m.p, row[:, :-1], targets, CFG.n_layer, CFG.n_head, CFG.vocab_size))
            scores.append((mean * len(ending), mean))
    return scores


def test_scores_match_an_independent_computation():
    items = hellaswag.load_items(DATA, limit=8)
    m = model(B=3)  # 3 rows a forward: items straddle forwards
    rows = [(c + e, len(e)) for c, es, _ in items for e in es]
    sums, means = hellaswag.ending_losses(m, rows)
    want = independent_scores(m, items)
    assert sums == pytest.approx([s for s, _ in want], rel=1e-10)
    assert means == pytest.approx([mu for _, mu in want], rel=1e-10)
    # accuracy as the reproductions define it, from the independent numbers
    acc = sum(min(range(4), key=lambda j: want[4 * i + j][0]) == label for i, (_, _, label) in enumerate(items))
    acc_norm = sum(min(range(4), key=lambda j: want[4 * i + j][1]) == label for i, (_, _, label) in enumerate(items))
    result = hellaswag.evaluate(m, items, LocalComm())
    assert result == {"acc": acc / 8, "acc_norm": acc_norm / 8, "count": 8}


def test_ranks_split_the_items_and_add_up_to_one_process():
    items = hellaswag.load_items(DATA, limit=10)
    m = model(B=8)
    whole = hellaswag.evaluate(m, items, LocalComm())
    parts = [hellaswag.evaluate(m, items, ShardOf(r, 3)) for r in range(3)]
    assert sum(p["count"] for p in parts) == 10 and [p["count"] for p in parts] == [4, 3, 3]
    assert sum(p["acc"] * p["count"] for p in parts) == pytest.approx(whole["acc"] * 10)
    assert sum(p["acc_norm"] * p["count"] for p in parts) == pytest.approx(whole["acc_norm"] * 10)


def test_long_rows_keep_their_last_tokens():
    """T smaller than context + ending: the row keeps its last T + 1 tokens, so the ending is
    scored on the truncated context, exactly as the plain model scores that truncated row."""
    items = hellaswag.load_items(DATA, limit=2)
    m = GPT2(CFG, reference, 4, 16, torch.float64, "cpu")
    m.init_weights(5)
    context, endings, _ = items[0]
    rows = [(context + e, len(e)) for e in endings]
    sums, _ = hellaswag.ending_losses(m, rows)
    for (tokens, n), got in zip(rows, sums):
        kept = tokens[-17:]
        row = torch.tensor([kept])
        targets = row[:, 1:].clone()
        targets[:, :len(kept) - 1 - n] = -100
        mean = float(plain_gpt2_loss(m.p, row[:, :-1], targets, CFG.n_layer, CFG.n_head, CFG.vocab_size))
        assert got == pytest.approx(mean * n, rel=1e-10)


def test_missing_file_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["eval", "hellaswag", str(tmp_path), "--file", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jsonl" in err[0] and "curl" in err[0]
    assert "Traceback" not in " ".join(err)
    sys.stderr.flush()
