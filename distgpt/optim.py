"""AdamW over the flat parameter buffer, sharded across ranks (ZeRO-1), and the LR schedules.

The optimizer updates the parts of the flat buffers that the data-parallel layer
(parallel/data_parallel.py) gives this rank (`dp.owned`: one part of every gradient bucket under
ZeRO-1, everything at zero_stage 0), from gradients that layer has already summed over ranks; it
keeps fp32 master weights and the two moments for those parts only, end to end in one state
buffer. How a master is stored is the backend's (the CUDA one keeps it split, in 16 bits beside
the bf16 parameter): write_master and master_values convert from and to plain fp32, which is
what checkpoints hold. Parts cut straight through tensors; the parameter table says which pieces get weight
decay. It updates one bucket's parts at a time, in the layer's order, and tells the layer after
each, so the new weights of one bucket travel while the next is updated; moving them is the
layer's job, not this one's.
"""
import math

import torch

from distgpt.model.layout import ALIGN_ELEMENTS, LAYOUT_VERSION

MASTER_CHUNK = 1 << 24  # masters converted at a time between fp32 and the backend's form (64 MiB)


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
        it). guard: a spikes.SpikeGuard that may turn a step into no update at all (None:
        every step updates)."""
        self.model, self.dp, self.cfg, self.ops = model, dp, optim_cfg, backend
        self.comm, self.zero_stage = dp.comm, dp.zero_stage
        self.guard = guard
        self.owned = dp.owned  # [(start, end)] of the flat buffers, ascending
        if self.owned[-1][1] > model.layout.total:
            raise ValueError(f"the data-parallel parts end at {self.owned[-1][1]}, beyond the model's "
                             f"{model.layout.total} flat elements")
        params, device = model.params, model.params.device
        # moments and master in fp32; a float64 model (tests) keeps float64 throughout
        state_dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
        n = dp.state_size
        self.m = torch.zeros(n, dtype=state_dtype, device=device)
        self.v = torch.zeros(n, dtype=state_dtype, device=device)
        # the masters start as the parameters themselves (step 0: nothing rounded yet)
        self.step_count = 0
        master_dtype = backend.master_dtype(params.dtype)
        self.master = None if master_dtype is None else torch.empty(n, dtype=master_dtype, device=device)
        if self.master is not None:
            for (lo, hi), at in zip(self.owned, dp.state_starts):
                self.write_master(at, lo, params[lo:hi], 0)
        # (bucket, [(flat start, flat end, state offset, decays)]): updated in turn, each sent
        # once done; with nothing to send (one rank, or zero_stage 0), all in one go (bucket
        # None), so one GPU runs two AdamW launches, not one per bucket
        if dp.world > 1 and dp.zero_stage == 1:
            self.pieces = [(bucket, [seg for start, end, at in dp.owned_in(bucket)
                                     for seg in self._segments(start, end, at)])
                           for bucket in dp.update_order]
        else:
            self.pieces = [(None, [seg for (start, end), at in zip(self.owned, dp.state_starts)
                                   for seg in self._segments(start, end, at)])]
        # one slot per ZeRO-1 range of every rank for its squared gradient norm, in rank order
        # (see global_grad_norm)
        self.norm_ranges = [dp.shard_of(r) for r in range(dp.world)]
        self.norm_parts = torch.zeros(sum(map(len, self.norm_ranges)), dtype=state_dtype, device=device)
        self._my_norm_slot = sum(map(len, self.norm_ranges[:dp.rank]))
        # the global norm and the clipping factor, computed on the device (no host sync in step)
        self.norm = torch.zeros(1, dtype=torch.float64, device=device)
        self.grad_scale = torch.ones(1, dtype=torch.float32, device=device)

    def write_master(self, at, flat, values, step):
        """The masters of flat elements [flat, flat + len(values)), kept at state offset `at`, set
        to `values` (any float tensor, any device), and their parameters to them rounded as step
        `step`'s update rounded them. In MASTER_CHUNK pieces: no whole-shard fp32 temporary on
        the device (1558M on one GPU: 6.2 GB)."""
        params = self.model.params
        for k in range(0, len(values), MASTER_CHUNK):
            chunk = values[k:k + MASTER_CHUNK].to(device=params.device, dtype=torch.float32)
            c = len(chunk)
            self.ops.master_split(params[flat + k:flat + k + c], self.master[at + k:at + k + c], chunk,
                                  flat + k, step)

    def master_values(self):
        """This rank's fp32 masters, end to end as its state holds them, on the CPU."""
        params = self.model.params
        out = torch.empty(len(self.master), dtype=torch.float32)
        scratch = torch.empty(min(MASTER_CHUNK, len(self.master)), dtype=torch.float32, device=params.device)
        for (lo, hi), at in zip(self.owned, self.dp.state_starts):
            for k in range(0, hi - lo, MASTER_CHUNK):
                c = min(MASTER_CHUNK, hi - lo - k)
                self.ops.master_join(scratch[:c], params[lo + k:lo + k + c], self.master[at + k:at + k + c],
                                     lo + k, self.step_count)
                out[at + k:at + k + c].copy_(scratch[:c])
        return out

    def _segments(self, lo, hi, at):
        """(start, end, state offset, decays) pieces of the parameter table inside the flat range
        [lo, hi), whose AdamW state starts at `at`; neighbours with the same decay merged: the
        alignment gaps between tensors hold zeros that stay zero under AdamW, so a merged segment
        updates exactly the same values."""
        out = []
        for spec in sorted(self.model.layout.specs, key=lambda s: s.offset):
            start, end = max(lo, spec.offset), min(hi, spec.offset + spec.numel)
            if start >= end:
                continue
            if out and out[-1][3] == spec.decay and start - out[-1][1] < ALIGN_ELEMENTS:
                out[-1] = (out[-1][0], end, out[-1][2], spec.decay)
            else:
                out.append((start, end, at + start - lo, spec.decay))
        return out

    def step(self, lr, loss=None):
        """Clip by the global norm and update this rank's slice, from gradients already summed
        over ranks (dp.reduce_gradients); the caller then shares the new weights
        (dp.gather_weights). Returns the global gradient norm before clipping as a one-element
        fp64 tensor on the device: the clipping scale is computed there too, so the whole step
        is queued without waiting for the GPU (read it with float() once the step's work is
        queued). With a guard, loss (one fp64 device element, the mean over ranks) and the norm
        decide there whether this update runs with the real gradient or a zero one (spikes.py)."""
        self.global_grad_norm()
        if self.guard is not None:
            if loss is None:
                raise ValueError("ShardedAdamW.step: a guarded optimizer needs the step's loss")
            self.guard.check(self.grad_scale, loss, self.norm)
        self.step_count += 1
        params, grads, o = self.model.params, self.model.grads, self.cfg
        for bucket, segments in self.pieces:
            for start, end, at, decays in segments:
                n = end - start
                master = None if self.master is None else self.master[at:at + n]
                self.ops.adamw_update(params[start:end], grads[start:end], self.m[at:at + n], self.v[at:at + n],
                                      master, lr, o.beta1, o.beta2, o.eps, o.weight_decay if decays else 0.0,
                                      self.step_count, self.grad_scale, seed=start)
            if bucket is not None:
                self.dp.weights_updated(bucket, params)
        return self.norm

    def global_grad_norm(self):
        """self.norm = sqrt of the sum of the squared gradient norms of every rank's owned
        ranges, added in rank order, and self.grad_scale = the clipping factor, both on the
        device. zero_stage=1 ranks each compute their own ranges' parts and share them (an
        all-reduce of otherwise-zero slots, exact whatever the reduction order); zero_stage=0
        ranks compute every part themselves, over the same ranges the ZeRO-1 ranks would own.
        Both sum the same numbers in the same order, so the clipping, and therefore training,
        is bitwise the same in both stages."""
        grads = self.model.grads
        if self.zero_stage == 1:
            self.norm_parts.zero_()
            for i, (lo, hi) in enumerate(self.norm_ranges[self.comm.rank]):
                slot = self._my_norm_slot + i
                self.ops.global_norm_squared(self.norm_parts[slot:slot + 1], grads[lo:hi])
            self.dp.sum_over_ranks(self.norm_parts)
        else:
            slot = 0
            for ranges in self.norm_ranges:
                for lo, hi in ranges:
                    self.ops.global_norm_squared(self.norm_parts[slot:slot + 1], grads[lo:hi])
                    slot += 1
        self.ops.clip_scale(self.grad_scale, self.norm, self.norm_parts, self.cfg.grad_clip)
        return self.norm

    def state_dict(self):
        state = {"m": self.m, "v": self.v}
        if self.master is not None:
            state["master"] = self.master_values()
        # this rank's fp8 delayed-scaling state rides along (its amaxes are its own batch's)
        fp8_tensors, fp8_meta = self.model.fp8.state_dict() if self.model.fp8 is not None else ({}, {})
        return {**state, **fp8_tensors}, {"step": self.step_count, "ranges": [list(r) for r in self.owned],
                                          "total": self.model.layout.total, "zero_stage": self.zero_stage,
                                          "layout_version": LAYOUT_VERSION, **fp8_meta}

    def load_fp8_state(self, tensors, meta):
        """The model's fp8 delayed-scaling state from a shard's tensors and meta, if the model has
        any and the shard holds it. A shard written with current scaling or without fp8 has none:
        the histories then start afresh, as in a new run (the first forward casts by current
        scaling), so a run can switch to the fp8 recipe at a resume; the trainer says so."""
        fp8 = self.model.fp8
        if fp8 is None or not fp8.delayed or "fp8_history" not in tensors:
            return
        if tuple(tensors["fp8_history"].shape) != tuple(fp8.history.shape):
            raise ValueError(f"the checkpoint's fp8 amax histories are {tuple(tensors['fp8_history'].shape)}, this "
                             f"run's {tuple(fp8.history.shape)}; resume with the fp8_amax_history it was written with")
        fp8.load_state_dict(tensors, meta)

    def load_state_dict(self, tensors, meta):
        if saved_ranges(meta) != self.owned:
            raise ValueError("optimizer shard: its parts of the flat buffer do not match this rank's; "
                             "resume with the same world size, zero_stage and bucket_mb")
        self.load_fp8_state(tensors, meta)
        self.m.copy_(tensors["m"])
        self.v.copy_(tensors["v"])
        self.step_count = meta["step"]
        if self.master is not None:
            for (lo, hi), at in zip(self.owned, self.dp.state_starts):
                self.write_master(at, lo, tensors["master"][at:at + hi - lo], self.step_count)


def saved_ranges(meta):
    """[(start, end)] of the flat buffer an optimizer shard holds, end to end in its state
    (shards written before ZeRO-1 sharded every bucket hold one slice [lo, hi))."""
    if "ranges" in meta:
        return [tuple(r) for r in meta["ranges"]]
    return [(meta["lo"], meta["hi"])]
