"""distgpt.gpu_clock: the SM clock and power a benchmark's steps ran at, and nothing (no error)
where NVML cannot say. NVML is stood in for here (no GPU on CI)."""
import itertools
import random
import statistics

import torch

from distgpt.gpu_clock import GpuClocks, format_clocks


def test_samples_give_the_medians_in_mhz_and_watts(monkeypatch):
    clocks_mhz = [random.randint(1400, 1980) for _ in range(31)]
    power_mw = [random.randint(400_000, 700_000) for _ in range(31)]
    seen = []
    readings, draws = iter(clocks_mhz), iter(power_mw)
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device=None: seen.append(device) or next(readings))
    monkeypatch.setattr(torch.cuda, "power_draw", lambda device=None: next(draws))
    sampler = GpuClocks("cuda:1")
    for _ in range(31):
        sampler.sample()
    summary = sampler.summary()
    assert summary == {"sm_clock_mhz": statistics.median(clocks_mhz),
                       "power_w": statistics.median(power_mw) / 1000}
    assert set(seen) == {"cuda:1"}  # the benchmark's own GPU, not NVML's first
    line = format_clocks(summary)
    assert line == f", SM clock {summary['sm_clock_mhz']:.0f} MHz at {summary['power_w']:.0f} W"


def test_without_nvml_nothing_is_sampled_and_nothing_fails(monkeypatch):
    calls = itertools.count()

    def refuse(device=None):
        next(calls)
        raise ModuleNotFoundError("nvidia-ml-py does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "clock_rate", refuse)
    sampler = GpuClocks("cuda:0")
    for _ in range(30):
        sampler.sample()
    assert next(calls) == 1  # asked once, then left alone: no exception per step
    assert sampler.summary() == {} and format_clocks({"model": "gpt2_124m"}) == ""
