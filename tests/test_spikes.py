"""The spike guard's op (backends/reference.py spike_guard) against a plain-Python z-score,
AdamW's zero-scale rule, the guard's checkpointed window, and its config checks."""
import math
import random
import statistics

import pytest
import torch

from distgpt.backends import reference as ops
from distgpt.config import ConfigError, TrainConfig, load_config
from distgpt.spikes import SpikeGuard

W, MIN_SAMPLES, Z = 8, 4, 3.0
# (step, loss, norm) overrides of the random walk: upward spikes of ~50 std, a downward one (a
# sudden drop is no spike), and the three non-finite cases
EVENTS = {5: (9.0, None), 11: (None, 4.0), 13: (1.0, None), 17: (float("nan"), None),
          18: (None, float("inf")), 19: (float("inf"), float("nan")), 23: (None, 0.01)}


def sequence(steps=40, seed=0):
    rng = random.Random(seed)
    out = []
    for step in range(steps):
        loss, norm = 5.0 - 0.01 * step + rng.gauss(0, 0.1), 1.0 + rng.gauss(0, 0.05)
        over = EVENTS.get(step, (None, None))
        out.append((loss if over[0] is None else over[0], norm if over[1] is None else over[1]))
    return out


def plain_verdicts(values, window, min_samples, loss_z, norm_z):
    """The specification in plain Python: a step is skipped when loss or norm is not finite, or
    (x - mean) / std of the last `window` accepted values exceeds its threshold."""
    accepted, verdicts = [], []
    for loss, norm in values:
        recent = accepted[-window:]
        reason = None
        if not math.isfinite(loss):
            reason = "loss_not_finite"
        elif not math.isfinite(norm):
            reason = "norm_not_finite"
        elif len(recent) >= min_samples:
            for i, x, z, name in ((0, loss, loss_z, "loss_spike"), (1, norm, norm_z, "norm_spike")):
                column = [r[i] for r in recent]
                mean, std = statistics.fmean(column), statistics.pstdev(column)
                if z > 0 and (x - mean) / std > z:
                    reason = name
                    break
        verdicts.append(reason)
        if reason is None:
            accepted.append((loss, norm))
    return verdicts, accepted[-window:]


def guarded(values, guard, clip_scale=0.5):
    """Run the op step by step; returns the reasons and the scales it left."""
    reasons, scales = [], []
    scale = torch.zeros(1, dtype=torch.float32)
    for loss, norm in values:
        scale.fill_(clip_scale)
        guard.check(scale, torch.tensor([loss], dtype=torch.float64), torch.tensor([norm], dtype=torch.float64))
        reasons.append(guard.skipped())
        scales.append(scale.item())
    return reasons, scales


def make_guard(window=W, min_samples=MIN_SAMPLES, loss_z=Z, norm_z=Z):
    cfg = TrainConfig(skip_window=window, skip_min_samples=min_samples, skip_loss_zscore=loss_z,
                      skip_norm_zscore=norm_z)
    return SpikeGuard(cfg, ops, torch.device("cpu"))


@pytest.mark.parametrize("loss_z,norm_z", [(Z, Z), (Z, 0.0), (0.0, 0.0)])
def test_spike_guard_matches_a_plain_z_score(loss_z, norm_z):
    values = sequence()
    guard = make_guard(loss_z=loss_z, norm_z=norm_z)
    reasons, scales = guarded(values, guard)
    want, window = plain_verdicts(values, W, MIN_SAMPLES, loss_z, norm_z)
    assert reasons == want
    assert scales == [0.0 if r else 0.5 for r in reasons]  # the clip scale is kept on accepted steps
    state = guard.state_dict()
    assert list(zip(state["losses"], state["norms"])) == window
    # the test is not vacuous: each injected event did what it was injected for
    assert want[17] == want[19] == "loss_not_finite" and want[18] == "norm_not_finite"
    assert want[13] is None and want[23] is None  # drops are no spikes
    assert want[5] == ("loss_spike" if loss_z else None) and want[11] == ("norm_spike" if norm_z else None)
    assert sum(r is not None for r in want) == 3 + bool(loss_z) + bool(norm_z)


def test_no_spike_check_before_min_samples():
    values = [(5.0, 1.0), (5.1, 1.1), (4.9, 0.9), (5.0, 1.0), (5.05, 1.0), (50.0, 100.0)]
    assert guarded(values, make_guard(min_samples=5))[0] == [None] * 5 + ["loss_spike"]
    assert guarded(values, make_guard(min_samples=6))[0] == [None] * 6  # 5 samples behind the spike


def test_window_round_trips_through_the_checkpoint_state():
    """A window saved after the ring wrapped, loaded into a fresh guard (its ring starts at 0):
    the same decisions and statistics on what follows, and a smaller window keeps the newest."""
    values = sequence(60, seed=1)
    straight = make_guard()
    guarded(values[:30], straight)
    resumed = make_guard()
    resumed.load_state_dict(straight.state_dict())
    assert resumed.state_dict() == straight.state_dict()
    assert guarded(values[30:], resumed) == guarded(values[30:], straight)
    assert resumed.state_dict() == straight.state_dict()
    small = make_guard(window=4, min_samples=2)
    small.load_state_dict(straight.state_dict())
    assert small.state_dict()["losses"] == straight.state_dict()["losses"][-4:]


def test_adamw_zero_scale_leaves_everything_as_it_was_even_for_nan():
    """A skipped step (grad_scale 0) drops its batch: weights, m, v and the master stay bitwise
    as they were, NaN and Inf in the gradient included, where a zero gradient would still have
    moved the weights by their momentum."""
    f64 = dict(dtype=torch.float64)
    n = 16
    w0, m0, v0 = torch.randn(n, **f64), torch.randn(n, **f64) * 1e-2, torch.rand(n, **f64) * 1e-3
    bad = torch.randn(n, **f64)
    bad[0], bad[1], bad[2] = float("nan"), float("inf"), -float("inf")
    hyper = (1e-3, 0.9, 0.95, 1e-8, 0.1, 4)
    skipped = [t.clone() for t in (w0, m0, v0)]
    ops.adamw_update(skipped[0], bad, skipped[1], skipped[2], None, *hyper, torch.zeros(1, dtype=torch.float32))
    for a, b in zip(skipped, (w0, m0, v0)):
        assert torch.equal(a, b)
    zero = [t.clone() for t in (w0, m0, v0)]
    ops.adamw_update(zero[0], torch.zeros(n, **f64), zero[1], zero[2], None, *hyper, 1.0)
    assert not torch.equal(zero[0], w0), "a zero gradient moves the weights (momentum): a skip must not"
    # with a master (bf16 parameters): both stay
    param, master = w0.float().to(torch.bfloat16), w0.float()
    m, v = m0.float(), v0.float()
    kept = [t.clone() for t in (param, m, v, master)]
    ops.adamw_update(kept[0], bad.to(torch.bfloat16), kept[1], kept[2], kept[3], *hyper, 0.0)
    for a, b in zip(kept, (param, m, v, master)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("override,expected", [
    ("train.skip_loss_zscore=-1", "train.skip_loss_zscore=-1.0"),
    ("train.skip_min_samples=1", "need 2 <= skip_min_samples <= skip_window"),
    ("train.skip_min_samples=200", "need 2 <= skip_min_samples <= skip_window"),
    ("train.skip_window=100000", "skip_window <= 4096"),
    ("train.skip_max_in_a_row=0", "train.skip_max_in_a_row=0 must be at least 1"),
])
def test_guard_settings_are_validated(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")) as info:
        load_config(["+run=debug_cpu", override])
    assert "\n" not in str(info.value)
