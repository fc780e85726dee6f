"""Shuffled training order: a permutation of the shards and of each shard's windows (one global
step's span) per epoch, from the seed and the epoch; the same on every rank and on any split of
the global batch; resumed exactly, mid-epoch and across an epoch boundary."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import numbered_shards, step_rows

from distgpt.data.shards import ShardedLoader, permutation
from distgpt.train import builtin_text

SIZES = [500, 300, 700, 400]  # G = 16 below: 31 + 18 + 43 + 24 = 116 windows an epoch
WINDOWS = [(n - 1) // 16 for n in SIZES]
STARTS = np.cumsum([0] + SIZES[:-1])  # the first token of each numbered shard


def window_starts(loader, steps, micro_steps=1):
    """The first token of each global step's window (tokens are their running index)."""
    return [int(step_rows([loader], micro_steps)[0][0, 0]) for _ in range(steps)]


def file_order():
    return [int(STARTS[i]) + 16 * w for i in range(len(SIZES)) for w in range(WINDOWS[i])]


def test_permutation_is_pinned_across_machines_and_numpy_versions():
    # drawn from PCG64's raw stream, which numpy keeps fixed: this list must never change,
    # or every shuffled run's resume would read other data than it was trained on
    assert permutation(10, 1337, (0, 0, 0)).tolist() == [2, 9, 8, 1, 4, 5, 7, 3, 0, 6]
    assert sorted(permutation(1000, 3, (2, 1, 5)).tolist()) == list(range(1000))
    assert permutation(0, 1, (0, 0, 0)).tolist() == []


def test_each_epoch_reads_every_window_once_in_a_new_order(tmp_path):
    pattern = numbered_shards(tmp_path, SIZES)
    n = sum(WINDOWS)
    loader = ShardedLoader(pattern, 2, 8, shuffle=True, seed=1337)
    epochs = [window_starts(loader, n) for _ in range(3)]
    assert loader.epoch == 3 and loader.window == loader.shard == 0
    for starts in epochs:
        assert sorted(starts) == sorted(file_order())  # each window exactly once
        # a shard is read whole before the next: its windows are one run of the epoch
        shard_of = [int(np.searchsorted(STARTS, s, side="right")) - 1 for s in starts]
        runs = [s for k, s in enumerate(shard_of) if k == 0 or s != shard_of[k - 1]]
        assert sorted(runs) == list(range(len(SIZES)))
        assert starts != file_order()
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    # and inside every shard, the windows come in another order each epoch
    in_shard = [[[s for s in e if STARTS[i] <= s < STARTS[i] + SIZES[i]] for i in range(len(SIZES))]
                for e in epochs]
    assert all(in_shard[0][i] != in_shard[1][i] != in_shard[2][i] for i in range(len(SIZES)))
    shard_orders = [[int(np.searchsorted(STARTS, s, side="right")) - 1 for s in e[:1]] for e in epochs]
    assert len({tuple(o) for o in shard_orders}) > 1  # the shard order changes too (first shards differ)
    other_seed = ShardedLoader(pattern, 2, 8, shuffle=True, seed=1338)
    assert window_starts(other_seed, n) != epochs[0]
    again = ShardedLoader(pattern, 2, 8, shuffle=True, seed=1337)
    assert window_starts(again, n) == epochs[0]  # the seed fixes it


def test_shuffle_off_reads_file_order_every_epoch(tmp_path):
    loader = ShardedLoader(numbered_shards(tmp_path, SIZES), 2, 8, shuffle=False, seed=1337)
    assert window_starts(loader, 2 * sum(WINDOWS)) == 2 * file_order()


def test_ranks_agree_on_the_order_and_take_disjoint_rows(tmp_path):
    # G = 4 x 2 x 8 = 64 tokens: world 4, world 2 x accum 2 and accum 4 read the same windows
    pattern = numbered_shards(tmp_path, [1000, 600, 1300])
    n = 999 // 64 + 599 // 64 + 1299 // 64
    four = [ShardedLoader(pattern, 2, 8, rank=r, world=4, shuffle=True, seed=9) for r in range(4)]
    two = [ShardedLoader(pattern, 2, 8, rank=r, world=2, accum_steps=2, shuffle=True, seed=9) for r in range(2)]
    one = ShardedLoader(pattern, 2, 8, accum_steps=4, shuffle=True, seed=9)
    seen = []
    for _ in range(n + 5):  # into the second epoch
        x4, y4 = step_rows(four, 1)
        x2, y2 = step_rows(two, 2)
        x1, y1 = step_rows([one], 4)
        assert torch.equal(x4, x1) and torch.equal(y4, y1) and torch.equal(x2, x1)
        # rank r's rows are r*16 .. r*16+15 of the window: together one contiguous span
        assert torch.equal(x4.flatten(), torch.arange(int(x4[0, 0]), int(x4[0, 0]) + 64))
        seen.append(x4.flatten())
    epoch = torch.cat(seen[:n])
    assert len(set(epoch.tolist())) == n * 64  # no token read twice within an epoch
    assert [int(s[0]) for s in seen[:n]] != sorted(int(s[0]) for s in seen[:n])  # and shuffled
    assert four[0].epoch == one.epoch == 1


@pytest.mark.parametrize("steps", [40, sum(WINDOWS) - 1, sum(WINDOWS), sum(WINDOWS) + 3])
def test_resume_continues_the_same_order(tmp_path, steps):
    # mid-epoch, one step before the boundary, on it, and just after it
    pattern = numbered_shards(tmp_path, SIZES)
    loader = ShardedLoader(pattern, 1, 8, rank=0, world=2, shuffle=True, seed=4)
    partner = ShardedLoader(pattern, 1, 8, rank=1, world=2, shuffle=True, seed=4)
    step_rows([loader, partner], steps)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = step_rows([loader, partner], 150)  # crosses the (next) epoch boundary
    resumed = [ShardedLoader(pattern, 1, 8, rank=r, world=2, shuffle=True, seed=4) for r in range(2)]
    for r in resumed:
        r.load_state_dict(state)
    got = step_rows(resumed, 150)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert resumed[0].state_dict() == loader.state_dict()
    # another split of the same 16 tokens per step goes on with the same windows
    single = ShardedLoader(pattern, 2, 8, shuffle=True, seed=4)
    single.load_state_dict(state)
    for r in resumed:
        r.load_state_dict(state)
    assert torch.equal(step_rows([single], 30)[0], step_rows(resumed, 30)[0])


def test_resume_refuses_another_order(tmp_path):
    pattern = numbered_shards(tmp_path, SIZES)
    shuffled = ShardedLoader(pattern, 2, 8, shuffle=True, seed=4)
    window_starts(shuffled, 10)
    state = shuffled.state_dict()
    cases = [(ShardedLoader(pattern, 2, 8, shuffle=False, seed=4), "resume with data.shuffle=true"),
             (ShardedLoader(pattern, 2, 8, shuffle=True, seed=5), "resume with seed=4"),
             (ShardedLoader(numbered_shards(tmp_path, SIZES[:3], name="t"), 2, 8, shuffle=True, seed=4),
              "were the shards re-made")]
    for loader, words in cases:
        with pytest.raises(ValueError) as e:
            loader.load_state_dict(state)
        assert words in str(e.value) and "\n" not in str(e.value)
    # unshuffled, the seed does not enter the order: any seed resumes it
    plain = ShardedLoader(pattern, 2, 8, seed=4)
    window_starts(plain, 10)
    ShardedLoader(pattern, 2, 8, seed=6).load_state_dict(plain.state_dict())


def test_state_from_before_shuffling(tmp_path):
    """Checkpoints written before data.shuffle kept (shard, token position): they continue
    exactly in file order, and a shuffled run refuses them naming the switch."""
    pattern = numbered_shards(tmp_path, SIZES)
    plain = ShardedLoader(pattern, 1, 8, accum_steps=2)
    step_rows([plain], 2 * 40 + 1)  # 40 steps: shard 0's 31, then window 9 of shard 1, mid-step
    old = {"shard": 1, "position": 9 * 16, "micro_step": 1, "epoch": 0, "B": 1, "T": 8, "world": 1,
           "accum_steps": 2}
    assert (plain.file_index, plain.position, plain.micro_step) == (1, 9 * 16, 1)
    resumed = ShardedLoader(pattern, 1, 8, accum_steps=2)
    resumed.load_state_dict(old)
    assert resumed.state_dict() == plain.state_dict()
    assert torch.equal(step_rows([resumed], 99)[0], step_rows([plain], 99)[0])
    with pytest.raises(ValueError) as e:
        ShardedLoader(pattern, 1, 8, accum_steps=2, shuffle=True).load_state_dict(old)
    assert "resume it with data.shuffle=false" in str(e.value) and "\n" not in str(e.value)


def test_shuffle_val_benchmark_smoke(tmp_path, capsys, monkeypatch):
    """benchmarks/shuffle_val.py --smoke: both runs on the CPU, from the same weights, validated
    on the same (unshuffled) tokens; the table has a row per evaluation."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shuffle_val.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its helpers (train_runs.py), as when run as a script
    spec = importlib.util.spec_from_file_location("shuffle_val", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    curves = bench.main([str(builtin_text("tinyshakespeare")), "--smoke", "--out", str(tmp_path)])
    shuffled, ordered = curves["shuffled"], curves["file order"]
    assert sorted(shuffled) == sorted(ordered) == [0, 2, 4]
    assert shuffled[0] == ordered[0] and abs(shuffled[0] - np.log(50257)) < 0.1
    assert shuffled[2] != ordered[2] and max(shuffled[4], ordered[4]) < shuffled[0] - 0.2
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and rows[2].startswith("| 2 | ")
    assert rows[1] == f"| 0 | {shuffled[0]:.4f} | {ordered[0]:.4f} | +0.00% |"


def test_a_failed_benchmark_run_is_named_in_the_exit_message(monkeypatch):
    """benchmarks/train_runs.distgpt stops a sweep at the first failed run and names that run
    (its name= override): a parity sweep runs bf16 and fp8 of each model and seed, and the
    error alone does not say which one diverged."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    import train_runs
    with pytest.raises(SystemExit) as stop:
        train_runs.distgpt("train", "model=no_such_preset", "name=gpt2_124m_bf16_seed3")
    message = str(stop.value.code)
    assert message.startswith("distgpt train name=gpt2_124m_bf16_seed3 failed (2):")
    assert "unknown model preset 'no_such_preset'" in message
