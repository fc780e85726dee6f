"""LayerNorm, the fused residual add + LayerNorm, and the residual add on our kernels
(kernels/layernorm.cu). One warp per row of C channels, the row held in registers.

Forward ops overwrite their outputs. layernorm_backward ADDS into dinp (the residual stream) and
into dweight/dbias, deterministically: a fixed grid of 2 blocks per SM writes fp32 partial sums
of dweight/dbias (2*C floats per block) into a buffer planned once, and a second kernel sums the
blocks' partials in a fixed order into the bf16 gradients. residual_layernorm_forward gives
bitwise the ln_out/mean/rstd of residual_forward followed by layernorm_forward.

Measured on an H100 (kernel time, B*T = 32768, C = 768): layernorm_forward 36 us (2.8 TB/s;
torch's layer_norm 70 us), residual_layernorm_forward 55 us, layernorm_backward 73 + 3 us
(2.7 TB/s counting inp, dout, dinp read and dinp written). At C = 1600, B*T = 16384: 40, 72, 93 + 3 us."""
import numpy as np
import torch

from distgpt.backends.cuda.runtime import check_tensor, ceil_div, i32, launch, ptr

MODULE = "layernorm"
CHUNK = 256          # channels one warp covers per 16-byte step (32 lanes x 8 bf16)
MAX_C = 7 * CHUNK    # kernels exist for 1..7 chunks per lane (GPT-2 XL: C = 1600)
FWD_WARPS = 8        # rows per block of the forward kernels (LN_FWD_WARPS)
BWD_WARPS = 8        # warps per block of the backward (LN_BWD_WARPS)
BWD_BLOCKS_PER_SM = 2  # 2 x 8 warps per SM: the most that 2 x 64*C bytes of shared memory allow at C = 1600
RED_Y = 16           # warp rows of the partials reduction (RED_Y)

_plan = {}  # "C": planned width, "P": backward blocks, "partials": (P, 2C) fp32


def plan(B, T, C, device):
    """Reserve layernorm_backward's partials: (2 * SMs, 2 * C) fp32, about 3.4 MB at C = 1600
    on a 132-SM H100. B and T do not matter: the grid is fixed and loops over the rows."""
    _check_width("layernorm.plan", C)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    P = BWD_BLOCKS_PER_SM * sms
    _plan.update(C=C, P=P, partials=torch.empty(P * 2 * C, dtype=torch.float32, device=device))


def _check_width(op, C):
    if C % 8 or not 8 <= C <= MAX_C:
        raise ValueError(f"{op}: C={C} must be a multiple of 8 in [8, {MAX_C}] (16-byte rows held in registers)")




def _check_row_op(op, rows_like, stats, params):
    """rows_like: (..., C) bf16 tensors of the same shape; stats: fp32 (...) mean/rstd; params:
    bf16 (C,) weight/bias. Returns (N rows, C)."""
    name0, t0 = rows_like[0]
    C = t0.shape[-1]
    _check_width(op, C)
    N = t0.numel() // C
    for name, t in rows_like:
        check_tensor(op, name, t)
        if t.shape != t0.shape:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must match {name0} {tuple(t0.shape)}")
    for name, t in stats:
        check_tensor(op, name, t, torch.float32)
        if t.numel() != N:
            raise ValueError(f"{op}: {name} has {t.numel()} elements, one per row needs {N}")
    for name, t in params:
        check_tensor(op, name, t)
        if t.shape != (C,):
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must be (C,) = ({C},)")
    return N, C


def layernorm_forward(out, mean, rstd, inp, weight, bias):
    """out (B,T,C) = (inp - mean) * rstd * weight + bias; mean, rstd (B,T) fp32 saved for backward."""
    op = "layernorm_forward"
    N, C = _check_row_op(op, [("inp", inp), ("out", out)], [("mean", mean), ("rstd", rstd)],
                         [("weight", weight), ("bias", bias)])
    if N == 0:
        return
    launch(MODULE, f"layernorm_forward_kernel_{ceil_div(C, CHUNK)}", ceil_div(N, FWD_WARPS), FWD_WARPS * 32,
           (ptr(out), ptr(mean), ptr(rstd), ptr(inp), ptr(weight), ptr(bias), i32(N), i32(C)))


def residual_layernorm_forward(residual_out, ln_out, mean, rstd, a, b, weight, bias):
    """residual_out = a + b (bf16), then ln_out/mean/rstd = its layernorm: one pass over memory."""
    op = "residual_layernorm_forward"
    N, C = _check_row_op(op, [("a", a), ("b", b), ("residual_out", residual_out), ("ln_out", ln_out)],
                         [("mean", mean), ("rstd", rstd)], [("weight", weight), ("bias", bias)])
    if N == 0:
        return
    launch(MODULE, f"residual_layernorm_forward_kernel_{ceil_div(C, CHUNK)}", ceil_div(N, FWD_WARPS),
           FWD_WARPS * 32, (ptr(residual_out), ptr(ln_out), ptr(mean), ptr(rstd), ptr(a), ptr(b),
                            ptr(weight), ptr(bias), i32(N), i32(C)))


def residual_forward(out, a, b):
    """out = a + b, elementwise in bf16 (any shape whose size is a multiple of 8)."""
    op = "residual_forward"
    for name, t in (("out", out), ("a", a), ("b", b)):
        check_tensor(op, name, t)
        if t.shape != out.shape:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must match out {tuple(out.shape)}")
    if out.numel() % 8:
        raise ValueError(f"{op}: {out.numel()} elements is not a multiple of 8 (16-byte vectors)")
    n8 = out.numel() // 8
    if n8 == 0:
        return
    launch(MODULE, "residual_forward_kernel", ceil_div(n8, 256), 256, (ptr(out), ptr(a), ptr(b), np.int64(n8)))


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """dinp += d(inp) (the residual stream accumulates); dweight, dbias += their gradients."""
    op = "layernorm_backward"
    N, C = _check_row_op(op, [("inp", inp), ("dout", dout), ("dinp", dinp)], [("mean", mean), ("rstd", rstd)],
                         [("weight", weight), ("dweight", dweight), ("dbias", dbias)])
    if "P" not in _plan:
        raise RuntimeError(f"{op}: call layernorm.plan(B, T, C, device) (backends.cuda.plan) before the first step")
    if C > _plan["C"]:
        raise RuntimeError(f"{op}: C={C} exceeds the planned C={_plan['C']}")
    if N == 0:
        return
    P, partials = _plan["P"], _plan["partials"]
    smem = BWD_WARPS * 2 * C * 4  # per warp: C fp32 dweight sums + C fp32 dbias sums
    launch(MODULE, f"layernorm_backward_kernel_{ceil_div(C, CHUNK)}", P, BWD_WARPS * 32,
           (ptr(dinp), ptr(partials), ptr(dout), ptr(inp), ptr(weight), ptr(mean), ptr(rstd), i32(N), i32(C)),
           shared_mem=smem)
    launch(MODULE, "layernorm_backward_reduce_kernel", ceil_div(2 * C // 4, 32), (32, RED_Y),
           (ptr(dweight), ptr(dbias), ptr(partials), i32(P), i32(C)))
