"""AdamW on our kernel (kernels/adamw.cu): one fp32 update over one contiguous slice of the flat
buffers, as ShardedAdamW hands them out (a parameter tensor, or the part of one inside this
rank's ZeRO-1 shard: the start is 16-byte aligned, the length is anything).

bf16 parameters have an fp32 master: the update runs on the master and the bf16 parameter
receives it stochastically rounded, with noise drawn from (seed, step, index). The caller passes
seed = the slice's absolute offset in the flat buffer, so each element's noise depends only on its
position and step, and ZeRO-0 and ZeRO-1 round identically. fp32 parameters are their own master
(master=None). No scratch, so no plan().

The master is stored split: the bf16 parameter holds its top half (up to the rounding's carry,
which the kernel recomputes from the noise of the step that rounded it), and `master` (int16)
holds its low half. Bitwise the update an fp32 master gets, in 2 bytes of state a parameter
instead of 4, and 26 instead of 28 bytes of traffic a step (kernels/adamw.cu says how).
master_split and master_join convert between plain fp32 masters and the split form."""
import numpy as np
import torch

from distgpt.backends.cuda.runtime import KernelModule, ceil_div, f32, ptr, u32

THREADS = 256
KERNELS = KernelModule("adamw", ADAMW_THREADS=THREADS)


def _check(op, name, t, dtypes, n, aligned=True):
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if not t.is_cuda or not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be a contiguous CUDA tensor")
    if aligned and t.data_ptr() % 16:
        raise ValueError(f"{op}: {name} must start 16-byte aligned (a multiple of 8 elements into its buffer)")
    if t.numel() != n:
        raise ValueError(f"{op}: {name} has {t.numel()} elements, param has {n}")


MASTER_DTYPE = torch.int16  # a split master's low halves (bit patterns; the kernels read them unsigned)


def master_dtype(param_dtype):
    """The storage of a master for parameters of param_dtype: None when they are their own."""
    return None if param_dtype == torch.float32 else MASTER_DTYPE


def master_split(param, master, values, seed, step):
    """Store fp32 masters `values` split: master = their low halves, param = them rounded as
    adamw_update at `step` rounds (so that step + 1 finds them; step 0 before any update). One
    element a thread: any start, any length."""
    op = "master_split"
    n = param.numel()
    _check(op, "param", param, (torch.bfloat16,), n, aligned=False)
    _check(op, "master", master, (MASTER_DTYPE,), n, aligned=False)
    _check(op, "values", values, (torch.float32,), n, aligned=False)
    if n:
        KERNELS.launch("master_split_kernel", ceil_div(n, THREADS), THREADS,
                       (ptr(param), ptr(master), ptr(values), np.int64(n), u32(int(seed)), u32(int(step))))


def master_join(out, param, master, seed, step):
    """out (fp32) = the masters that param (last rounded at `step`) and master hold split."""
    op = "master_join"
    n = param.numel()
    _check(op, "out", out, (torch.float32,), n, aligned=False)
    _check(op, "param", param, (torch.bfloat16,), n, aligned=False)
    _check(op, "master", master, (MASTER_DTYPE,), n, aligned=False)
    if n:
        KERNELS.launch("master_join_kernel", ceil_div(n, THREADS), THREADS,
                       (ptr(out), ptr(param), ptr(master), np.int64(n), u32(int(seed)), u32(int(step))))


def adamw_update(param, grad, m, v, master, lr, beta1, beta2, eps, weight_decay, step, grad_scale, seed=0):
    """One AdamW step over one slice; m, v fp32, updated in place; param bf16 with its split master
    (master_split), both updated, or param fp32 and itself the master (master=None)."""
    op = "adamw_update"
    n = param.numel()
    _check(op, "param", param, (torch.bfloat16, torch.float32), n)
    _check(op, "grad", grad, (param.dtype,), n)
    _check(op, "m", m, (torch.float32,), n)
    _check(op, "v", v, (torch.float32,), n)
    if param.dtype == torch.bfloat16:
        if master is None:
            raise ValueError(f"{op}: a bf16 param needs its master's low halves (master is None)")
        _check(op, "master", master, (MASTER_DTYPE,), n)
    elif master is not None:
        raise ValueError(f"{op}: an fp32 param is its own master: pass master=None")
    if int(step) < 1:
        raise ValueError(f"{op}: step={step} must be >= 1 (the bias corrections divide by 1 - beta^step)")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"{op}: beta1={beta1}, beta2={beta2} must be in [0, 1)")
    if n == 0:
        return
    # the scalars in double on the host, each rounded once to fp32
    # grad_scale: a float, or a one-element fp32 CUDA tensor the kernel reads itself (the
    # optimizer's clipping scale, computed on the device: no host sync before the update)
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.dtype != torch.float32 or grad_scale.numel() != 1 or not grad_scale.is_cuda:
            raise ValueError(f"{op}: a tensor grad_scale must be one fp32 CUDA element, got {grad_scale.dtype} "
                             f"{tuple(grad_scale.shape)}")
        scale_value, scale_ptr = 1.0, ptr(grad_scale)
    else:
        scale_value, scale_ptr = float(grad_scale), ptr(None)
    scalars = (f32(lr), f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2),
               f32(1.0 / (1.0 - beta1 ** step)), f32(1.0 / (1.0 - beta2 ** step)), f32(eps),
               f32(weight_decay), f32(scale_value), scale_ptr, u32(int(seed)), u32(int(step)))
    # one 8-element vector per thread, every vector its own thread: the blocks that finish make
    # room for the next, which keeps more loads in flight than a grid of 4 blocks per SM looping
    # over the slice (the same arithmetic per element, so the same bits): 778M elements, one of
    # 1558M's two launches, 7718 against 8196 us, 2.83 against 2.66 TB/s (H100, 2026-11-23).
    # At least one block: with n < 8 the whole slice is the scalar tail.
    grid = max(1, ceil_div(n // 8, THREADS))
    if param.dtype == torch.bfloat16:
        KERNELS.launch("adamw_kernel_bf16", grid, THREADS,
                       (ptr(param), ptr(grad), ptr(m), ptr(v), ptr(master), np.int64(n)) + scalars)
    else:
        KERNELS.launch("adamw_kernel_fp32", grid, THREADS,
                       (ptr(param), ptr(grad), ptr(m), ptr(v), np.int64(n)) + scalars)
