"""The squared L2 norm of a bf16 gradient slice on our kernels (kernels/norm.cu), for clipping by
the global norm: out (1,) fp32 = sum of grad**2, OVERWRITTEN (the optimizer adds the shards'
parts itself, in rank order); the clipping scale; and the spike guard that zeroes it on a
step to skip.

Deterministic without atomics: phase 1 runs a fixed grid of 2 blocks per SM (independent of the
length, so reruns add in the same order) that writes one fp32 partial per block into scratch
planned once; phase 2, one block, sums the partials in a fixed order and writes out."""
import numpy as np
import torch

from distgpt.backends.cuda.runtime import KernelModule, i32, ptr, sm_count
from distgpt.backends.reference import SKIP_CODES

THREADS = 512        # phase-1 threads per block
RED_THREADS = 256    # phase-2 threads
BLOCKS_PER_SM = 2    # 1024 threads per SM, each with 4 16-byte loads in flight
KERNELS = KernelModule("norm", NORM_THREADS=THREADS, NORM_RED_THREADS=RED_THREADS,
                       **{f"SKIP_{reason.upper()}": code for reason, code in SKIP_CODES.items()})


class GlobalNorm:
    """global_norm_squared and its planned phase-1 partials: (2 * SMs,) fp32, about 1 KB on a
    132-SM H100."""

    def __init__(self, device):
        self.P = BLOCKS_PER_SM * sm_count(device)
        self.partials = torch.empty(self.P, dtype=torch.float32, device=device)

    @property
    def nbytes(self):
        return self.partials.nbytes

    def squared(self, out, grad):
        """out (one-element fp32 tensor) = sum of grad**2 over the bf16 slice `grad` (any length)."""
        op = "global_norm_squared"
        if grad.dtype != torch.bfloat16:
            raise ValueError(f"{op}: grad must be torch.bfloat16, got {grad.dtype}")
        if not grad.is_cuda or not grad.is_contiguous():
            raise ValueError(f"{op}: grad must be a contiguous CUDA tensor")
        if grad.data_ptr() % 16:
            raise ValueError(f"{op}: grad must start 16-byte aligned (a multiple of 8 elements into its buffer)")
        if out.dtype != torch.float32 or out.numel() != 1 or not out.is_cuda:
            raise ValueError(f"{op}: out must be a one-element fp32 CUDA tensor, got {out.dtype} "
                             f"{tuple(out.shape)}")
        if self.partials.device != grad.device:
            raise RuntimeError(f"{op}: partials were planned on {self.partials.device}, grad is on {grad.device}")
        KERNELS.launch("global_norm_squared_kernel", self.P, THREADS,
                       (ptr(self.partials), ptr(grad), np.int64(grad.numel())))
        KERNELS.launch("global_norm_squared_reduce_kernel", 1, RED_THREADS, (ptr(out), ptr(self.partials), i32(self.P)))


def clip_scale(scale, norm, parts, clip):
    """On the device: norm (one fp64 element) = sqrt(sum of parts in order), scale (one fp32
    element) = clip / (norm + 1e-6) when 0 < clip < norm, else 1. parts: (world,) fp32."""
    op = "clip_scale"
    if parts.dtype != torch.float32 or not parts.is_cuda or not parts.is_contiguous():
        raise ValueError(f"{op}: parts must be a contiguous fp32 CUDA tensor, got {parts.dtype}")
    if scale.dtype != torch.float32 or scale.numel() != 1 or norm.dtype != torch.float64 or norm.numel() != 1:
        raise ValueError(f"{op}: scale must be one fp32 element and norm one fp64 element")
    KERNELS.launch("clip_scale_kernel", 1, 32, (ptr(scale), ptr(norm), ptr(parts), i32(parts.numel()),
                                                np.float64(clip)))


def spike_guard(verdict, scale, window, count, loss, norm, loss_zscore, norm_zscore, min_samples):
    """The reference's spike_guard on the device (same arguments): verdict one int32, scale one
    fp32, window (2, W) fp64, count one int64, loss and norm one fp64 element each."""
    op = "spike_guard"
    for name, t, dtype, numel in (("verdict", verdict, torch.int32, 1), ("scale", scale, torch.float32, 1),
                                  ("count", count, torch.int64, 1), ("loss", loss, torch.float64, 1),
                                  ("norm", norm, torch.float64, 1)):
        if t.dtype != dtype or t.numel() != numel or not t.is_cuda:
            raise ValueError(f"{op}: {name} must be {numel} {dtype} CUDA element(s), got {t.dtype} {tuple(t.shape)}")
    if window.dtype != torch.float64 or window.dim() != 2 or window.shape[0] != 2 or not window.is_cuda \
            or not window.is_contiguous():
        raise ValueError(f"{op}: window must be a contiguous (2, W) float64 CUDA tensor, got {window.dtype} "
                         f"{tuple(window.shape)}")
    KERNELS.launch("spike_guard_kernel", 1, 32, (ptr(verdict), ptr(scale), ptr(window), ptr(count), ptr(loss),
                                                  ptr(norm), i32(window.shape[1]), np.float64(loss_zscore),
                                                  np.float64(norm_zscore), i32(min_samples)))
