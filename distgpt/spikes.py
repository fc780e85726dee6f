"""The spike guard: a step whose loss or gradient norm is not finite, or is an outlier against
the recent accepted steps, does not change the weights, and the run goes on.

The decision is made on the device (the backend's spike_guard op, after the clipping scale and
before AdamW), so the step still queues without waiting for the GPU; it reads the loss already
averaged over ranks and the global norm, both identical on every rank, so every rank skips the
same steps. A skipped step's clipping scale becomes 0, and AdamW leaves every element as it was
where it reads that scale:

    the loader has consumed the batch and the step count and the LR schedule advance with it;
    the weights (the bf16 copies are rounded again from their unchanged masters), m and v are
    those of the step before, whatever the gradient held.

An earlier form ran the update with a zero gradient instead (m and v decaying, weight decay
applied). That is not "no change": Adam then moves each weight by m / sqrt(v), the momentum of
the steps that led into the spike, and over a burst of skips the decaying moments add up to about
13 full-size updates in that direction with no gradient to correct it. A 124M run on Shakespeare
(B=8, lr 6e-4, warm-up 200, seed 3; H100, 2026-12-05) went from loss 5.1 to 7.2 over 20 such
steps and was stopped as diverged; the same run without the guard trained on normally. The bias
corrections now count one step per batch consumed, skipped or not: the guard acts only after
skip_min_samples (20) accepted steps, where one uncounted skip makes the next update at most
2.5% smaller (beta2 = 0.95), an effect that fades as beta^t.

Only accepted steps enter the window, so a burst of spikes cannot raise the bar for the next.
The window (values oldest first) travels in the checkpoint, so a resumed run decides as the
uninterrupted one would.
"""
import torch

from distgpt.backends.reference import SKIP_REASONS


class SpikeGuard:
    def __init__(self, train_cfg, backend, device):
        t = train_cfg
        self.ops = backend
        self.loss_zscore, self.norm_zscore = t.skip_loss_zscore, t.skip_norm_zscore
        self.min_samples = t.skip_min_samples
        # (2, W): accepted losses and grad norms, a ring with `count` pushes so far
        self.window = torch.zeros(2, t.skip_window, dtype=torch.float64, device=device)
        self.count = torch.zeros(1, dtype=torch.int64, device=device)
        self.verdict = torch.zeros(1, dtype=torch.int32, device=device)

    def check(self, scale, loss, norm):
        """Queue this step's decision: scale (the clipping factor) becomes 0 on a skip."""
        self.ops.spike_guard(self.verdict, scale, self.window, self.count, loss, norm,
                             self.loss_zscore, self.norm_zscore, self.min_samples)

    def skipped(self):
        """Why the last checked step was skipped ("loss_spike", ...), or None: a host read, made
        once the step is queued."""
        return self.reason(int(self.verdict.item()))

    @staticmethod
    def reason(verdict):
        """The skip reason of a verdict code read from the device (readout.py), or None."""
        return SKIP_REASONS.get(verdict)

    def state_dict(self):
        """The window's values oldest first (JSON-able: Python floats round-trip exactly)."""
        count, W = int(self.count.item()), self.window.shape[1]
        order = [(count - min(count, W) + i) % W for i in range(min(count, W))]
        rows = self.window.tolist()
        return {"losses": [rows[0][j] for j in order], "norms": [rows[1][j] for j in order]}

    def load_state_dict(self, state):
        """Refill the window from state_dict()'s lists; a smaller window keeps the newest."""
        W = self.window.shape[1]
        losses, norms = state["losses"][-W:], state["norms"][-W:]
        self.window.zero_()
        self.window[0, :len(losses)] = torch.tensor(losses, dtype=torch.float64)
        self.window[1, :len(norms)] = torch.tensor(norms, dtype=torch.float64)
        self.count.fill_(len(losses))
