"""The GPU's SM clock and power draw while a benchmark's steps run.

H100s hold their 700 W cap through a training step, and the SM clock they keep under it differs
between machines of one kind: the same 1558M B=16 code took 313.4 ms a step on one H100 and
327.5 on another the same morning (README, 2026-12-05). A timing printed with the clock it ran
at says which of two numbers came from a slower card. Read through NVML (torch.cuda.clock_rate
and power_draw, nvidia-ml-py); where NVML is missing or refuses, nothing is sampled and the
benchmark goes on without these numbers."""
import statistics

import torch


class GpuClocks:
    """Samples of one GPU's SM clock (MHz) and power draw (W), taken between steps."""

    def __init__(self, device):
        self.device = device
        self.sm_mhz, self.power_w = [], []
        self.available = True

    def sample(self):
        if not self.available:
            return
        try:
            sm_mhz, power_mw = torch.cuda.clock_rate(self.device), torch.cuda.power_draw(self.device)
        except Exception:  # no nvidia-ml-py, no NVML, or a GPU it does not report: no samples
            self.available = False
            return
        self.sm_mhz.append(sm_mhz)
        self.power_w.append(power_mw / 1000)

    def summary(self):
        """{"sm_clock_mhz", "power_w"}: the medians of the samples, or {} without any."""
        if not self.sm_mhz:
            return {}
        return {"sm_clock_mhz": statistics.median(self.sm_mhz), "power_w": statistics.median(self.power_w)}


def format_clocks(result):
    """', SM clock 1615 MHz at 699 W' for a result carrying them, '' otherwise."""
    if result.get("sm_clock_mhz") is None:
        return ""
    return f", SM clock {result['sm_clock_mhz']:.0f} MHz at {result['power_w']:.0f} W"
