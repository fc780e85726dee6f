"""AdamW over the flat parameter buffer, sharded across ranks (ZeRO-1), and the LR schedules.

The optimizer updates the slice [lo, hi) of the flat buffers that the data-parallel layer
(parallel/data_parallel.py) gives this rank, from gradients that layer has already summed over
ranks; it keeps fp32 master weights and the two moments for that slice only. The slice
boundaries cut straight through tensors; the parameter table says which pieces of the slice
get weight decay. Moving the gradients and weights between ranks is the layer's job, not this one's.
"""
import math

import torch

from distgpt.model.layout import ALIGN_ELEMENTS, LAYOUT_VERSION


def learning_rate(step, max_steps, o):
    """LR for optimizer step `step` (0-based) of `max_steps`, under OptimConfig `o`."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    min_lr = o.lr * o.final_lr_frac
    if o.schedule == "wsd":  # warm-up, stable at lr, then linear decay over the last decay_frac
        decay_start = max(o.warmup_steps, max_steps - math.ceil(o.decay_frac * max_steps))
        if step < decay_start:
            return o.lr
        progress = (step - decay_start) / max(1, max_steps - 1 - decay_start)
        return o.lr - min(1.0, progress) * (o.lr - min_lr)
    progress = min(1.0, (step - o.warmup_steps) / max(1, max_steps - 1 - o.warmup_steps))
    if o.schedule == "linear":
        return o.lr - progress * (o.lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - min_lr)  # cosine


class ShardedAdamW:
    def __init__(self, model, dp, optim_cfg, backend, guard=None):
        """dp: the DataParallel layer (this rank's slice; the norm's one collective goes through
        it). guard: a spikes.SpikeGuard that may turn a step into a zero-gradient update (None:
        every step updates)."""
        self.model, self.dp, self.cfg, self.ops = model, dp, optim_cfg, backend
        self.comm, self.zero_stage = dp.comm, dp.zero_stage
        self.guard = guard
        self.lo, self.hi = dp.lo, dp.hi
        if dp.hi > model.layout.total:
            raise ValueError(f"the data-parallel slice [{dp.lo}, {dp.hi}) lies outside the model's "
                             f"{model.layout.total} flat elements")
        params, device = model.params, model.params.device
        # moments and master in fp32; a float64 model (tests) keeps float64 throughout
        state_dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
        n = self.hi - self.lo
        self.m = torch.zeros(n, dtype=state_dtype, device=device)
        self.v = torch.zeros(n, dtype=state_dtype, device=device)
        self.master = None if params.dtype == state_dtype else params[self.lo:self.hi].to(state_dtype)
        self.segments = self._segments()
        # one slot per rank for the squared norm of each shard's slice (see global_grad_norm)
        self.norm_parts = torch.zeros(dp.world, dtype=state_dtype, device=device)
        # the global norm and the clipping factor, computed on the device (no host sync in step)
        self.norm = torch.zeros(1, dtype=torch.float64, device=device)
        self.grad_scale = torch.ones(1, dtype=torch.float32, device=device)
        self.shard_size = dp.shard_size
        self.step_count = 0

    def _segments(self):
        """(start, end, decays) pieces of the parameter table inside [lo, hi), shard-relative,
        neighbours with the same decay merged: the alignment gaps between tensors hold zeros
        that stay zero under AdamW, so a merged segment updates exactly the same values."""
        out = []
        for spec in sorted(self.model.layout.specs, key=lambda s: s.offset):
            start, end = max(self.lo, spec.offset), min(self.hi, spec.offset + spec.numel)
            if start >= end:
                continue
            start, end = start - self.lo, end - self.lo
            if out and out[-1][2] == spec.decay and start - out[-1][1] < ALIGN_ELEMENTS:
                out[-1] = (out[-1][0], end, spec.decay)
            else:
                out.append((start, end, spec.decay))
        return out

    def step(self, lr, loss=None):
        """Clip by the global norm and update this rank's slice, from gradients already summed
        over ranks (dp.reduce_gradients); the caller then shares the new weights
        (dp.gather_weights). Returns the global gradient norm before clipping as a one-element
        fp64 tensor on the device: the clipping scale is computed there too, so the whole step
        is queued without waiting for the GPU (read it with float() once the step's work is
        queued). With a guard, loss (one fp64 device element, the mean over ranks) and the norm
        decide there whether this update runs with the real gradient or a zero one (spikes.py)."""
        grad_shard = self.model.grads[self.lo:self.hi]
        self.global_grad_norm()
        if self.guard is not None:
            if loss is None:
                raise ValueError("ShardedAdamW.step: a guarded optimizer needs the step's loss")
            self.guard.check(self.grad_scale, loss, self.norm)
        self.step_count += 1
        params = self.model.params[self.lo:self.hi]
        o = self.cfg
        for start, end, decays in self.segments:
            master = None if self.master is None else self.master[start:end]
            self.ops.adamw_update(params[start:end], grad_shard[start:end], self.m[start:end],
                                  self.v[start:end], master, lr, o.beta1, o.beta2, o.eps,
                                  o.weight_decay if decays else 0.0, self.step_count, self.grad_scale,
                                  seed=self.lo + start)
        return self.norm

    def global_grad_norm(self):
        """self.norm = sqrt of the sum over the world-size slices of the flat gradient of their
        squared norms, added in rank order, and self.grad_scale = the clipping factor, both on
        the device. zero_stage=1 ranks each compute their own slice's part and share it (an
        all-reduce of otherwise-zero slots, exact whatever the reduction order); zero_stage=0
        ranks compute every part themselves. Both sum the same numbers in the same order, so the
        clipping, and therefore training, is bitwise the same in both stages."""
        grads, size = self.model.grads, self.shard_size
        if self.zero_stage == 1:
            self.norm_parts.zero_()
            rank = self.comm.rank
            self.ops.global_norm_squared(self.norm_parts[rank:rank + 1], grads[self.lo:self.hi])
            self.dp.sum_over_ranks(self.norm_parts)
        else:
            for r in range(self.comm.world):
                self.ops.global_norm_squared(self.norm_parts[r:r + 1], grads[r * size:(r + 1) * size])
        self.ops.clip_scale(self.grad_scale, self.norm, self.norm_parts, self.cfg.grad_clip)
        return self.norm

    def state_dict(self):
        state = {"m": self.m, "v": self.v}
        if self.master is not None:
            state["master"] = self.master
        return state, {"step": self.step_count, "lo": self.lo, "hi": self.hi,
                       "total": self.model.layout.total, "zero_stage": self.zero_stage,
                       "layout_version": LAYOUT_VERSION}

    def load_state_dict(self, tensors, meta):
        if (meta["lo"], meta["hi"]) != (self.lo, self.hi):
            raise ValueError(f"optimizer shard [{meta['lo']}, {meta['hi']}) does not match this "
                             f"rank's [{self.lo}, {self.hi}); resume with the same world size and zero_stage")
        self.m.copy_(tensors["m"])
        self.v.copy_(tensors["v"])
        if self.master is not None:
            self.master.copy_(tensors["master"])
        self.step_count = meta["step"]
