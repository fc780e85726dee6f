"""FP8 casts on our kernels (kernels/fp8.cu), the reference's fp8_* ops for bf16 inputs on the
GPU (issue #13): the per-tensor power-of-two scale from an amax, and the saturating cast to
e4m3 or e5m2 that also records the input's amax, plain or with the transposed copy that a
weight needs as the K-major operand of the backward's fp8 matmul; and the current-scaling
casts training uses (fp8_cast, fp8_cast_transpose): the amax, then the cast with the scale
taken from it, two launches (one where the kernel that wrote the tensor already took its amax:
fp8_cast's amax_known).

Outputs are torch float8 tensors (float8_e4m3fn, float8_e5m2), whose dtype picks the format;
scales and amaxes are one-element fp32 device tensors, so nothing waits for the host."""
import numpy as np
import torch

from distgpt.backends.cuda import bias
from distgpt.backends.cuda.runtime import KernelModule, ceil_div, check_scalars, check_tensor, i32, ptr
from distgpt.backends.reference import FP8_FORMATS, GELU_CUBIC, GELU_SCALE, fp8_max

THREADS = 256        # fp8_quantize: threads per block, 8 elements each per load ...
UNROLL = 4           # ... and this many loads in flight per thread
TILE = 32            # fp8_quantize_transpose: TILE x TILE elements per block ...
TILE_ROWS = THREADS // TILE  # ... of (TILE, TILE_ROWS) threads
VTILE = 64           # the vectorized transpose (R, C multiples of 8): VROWS x VTILE per block of THREADS ...
VROWS = 128          # ... (THREADS = VTILE / 4 x VROWS / 8: one 4 x 8 block of the transpose per thread)
VEC = 8              # ... in 16-byte loads of 8 bf16
KERNELS = KernelModule("fp8", FP8_THREADS=THREADS, FP8_UNROLL=UNROLL, FP8_TILE=TILE, FP8_VTILE=VTILE,
                       FP8_VROWS=VROWS, GELU_SCALE=f"{GELU_SCALE!r}f", GELU_CUBIC=f"{GELU_CUBIC!r}f")
FORMAT_OF = {dtype: name for name, dtype in FP8_FORMATS.items()}


def _check(op, out, inp, **one_elements):
    if out.dtype not in FORMAT_OF:
        raise ValueError(f"{op}: out must be float8_e4m3fn or float8_e5m2, got {out.dtype}")
    if inp.dtype != torch.bfloat16:
        raise ValueError(f"{op}: inp must be torch.bfloat16, got {inp.dtype}")
    for name, t in (("out", out), ("inp", inp)):
        if not t.is_cuda or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous CUDA tensor")
    if out.shape != inp.shape:
        raise ValueError(f"{op}: out {tuple(out.shape)} and inp {tuple(inp.shape)} differ in shape")
    check_scalars(op, **one_elements)


def _check_transposed(op, out, out_t, inp):
    if inp.dim() != 2 or out_t.shape != (inp.shape[1], inp.shape[0]) or out_t.dtype != out.dtype \
            or not out_t.is_cuda or not out_t.is_contiguous():
        raise ValueError(f"{op}: inp must be (R, C) and out_t a contiguous (C, R) tensor of out's dtype")


def _grid(inp):
    """A thread for every UNROLL vectors of 8: blocks that finish make room for the next, as in
    the AdamW launch (each element cast alike, the amax an order-free maximum: the same bytes as
    a grid of 4 blocks per SM looping). 1558M fp8 step, H100, 2026-11-23: casts 32.20 -> 31.42
    ms (fp8_cast 54.6 -> 53.3 us a call, fp8_amax 25.6 -> 24.8)."""
    return max(1, -(-inp.numel() // (8 * THREADS * UNROLL)))


def _transpose_launch(kernel, fmt, inp, out, out_t):
    """(name, grid, block) of a transposing cast: the 16-byte-vector kernel where R and C are
    multiples of 8 and the buffers aligned for it (every GPT-2 weight), else the scalar one."""
    R, C = inp.shape
    if R % VEC == 0 and C % VEC == 0 and inp.data_ptr() % 16 == 0 and out.data_ptr() % 8 == 0 \
            and out_t.data_ptr() % 8 == 0:
        return f"{kernel}_vec_{fmt}_kernel", (-(-C // VTILE), -(-R // VROWS)), THREADS
    return f"{kernel}_{fmt}_kernel", (-(-C // TILE), -(-R // TILE)), (TILE, TILE_ROWS)


def fp8_amax(amax, inp):
    """amax = max(amax, max |inp|) (the caller zeroes it first): current scaling's first read."""
    op = "fp8_amax"
    check_scalars(op, amax=amax)
    check_tensor(op, "inp", inp)
    if inp.numel():
        KERNELS.launch("fp8_amax_kernel", _grid(inp), THREADS, (ptr(amax), ptr(inp), np.int64(inp.numel())))


def fp8_cast(out, inverse, amax, inp, amax_known=False):
    """Current scaling: amax = max(amax, max |inp|) (zero on entry), out = fp8(inp * s) with s
    the power of two fp8_scale takes from amax, inverse = 1 / s. The reference's fp8_cast.
    amax_known: amax already is max |inp| (the kernel that wrote inp took it), so the amax pass
    is skipped: the same result, one read of inp fewer."""
    op = "fp8_cast"
    _check(op, out, inp, amax=amax, inverse=inverse)
    if inp.data_ptr() % 16 or out.data_ptr() % 8:
        raise ValueError(f"{op}: inp must start 16-byte aligned and out 8-byte aligned")
    if not amax_known:
        fp8_amax(amax, inp)
    fmt = FORMAT_OF[out.dtype]
    KERNELS.launch(f"fp8_cast_{fmt}_kernel", _grid(inp), THREADS,
                   (ptr(out), ptr(inverse), ptr(inp), ptr(amax), np.float64(fp8_max(fmt)), np.int64(inp.numel())))


def fp8_cast_transpose(out, out_t, inverse, amax, inp, amax_known=False):
    """fp8_cast of a (R, C) matrix into out (R, C) and out_t (C, R) in one pass after the amax
    pass (none when amax_known): weights in e4m3, and with fp8 weight gradients the block
    matmuls' output gradients (either format) and inputs."""
    op = "fp8_cast_transpose"
    _check(op, out, inp, amax=amax, inverse=inverse)
    _check_transposed(op, out, out_t, inp)
    if not amax_known:
        fp8_amax(amax, inp)
    R, C = inp.shape
    fmt = FORMAT_OF[out.dtype]
    name, grid, block = _transpose_launch("fp8_cast_transpose", fmt, inp, out, out_t)
    KERNELS.launch(name, grid, block, (ptr(out), ptr(out_t), ptr(inverse), ptr(inp), ptr(amax),
                                       np.float64(fp8_max(fmt)), i32(R), i32(C)))


def fp8_quantize(out, amax, inp, scale):
    """out = fp8(inp * scale), saturated, rounded to nearest even; amax = max |inp| (zeroed,
    then merged from every block: order-free, so deterministic)."""
    op = "fp8_quantize"
    _check(op, out, inp, amax=amax, scale=scale)
    if inp.data_ptr() % 16 or out.data_ptr() % 8:
        raise ValueError(f"{op}: inp must start 16-byte aligned and out 8-byte aligned")
    amax.zero_()
    n = inp.numel()
    if n == 0:
        return
    KERNELS.launch(f"fp8_quantize_{FORMAT_OF[out.dtype]}_kernel", _grid(inp), THREADS,
                   (ptr(out), ptr(amax), ptr(inp), ptr(scale), np.int64(n)))


def fp8_quantize_transpose(out, out_t, amax, inp, scale):
    """fp8_quantize of a (R, C) matrix into out (R, C) and out_t (C, R) in one pass."""
    op = "fp8_quantize_transpose"
    _check(op, out, inp, amax=amax, scale=scale)
    _check_transposed(op, out, out_t, inp)
    amax.zero_()
    R, C = inp.shape
    if R == 0 or C == 0:
        return
    name, grid, block = _transpose_launch("fp8_quantize_transpose", FORMAT_OF[out.dtype], inp, out, out_t)
    KERNELS.launch(name, grid, block, (ptr(out), ptr(out_t), ptr(amax), ptr(inp), ptr(scale), i32(R), i32(C)))


def fp8_transpose(out_t, x):
    """out_t (C, R) = x (R, C), fp8 bytes (the reference's fp8_transpose): R a multiple of 8, C of
    16, x 16-byte and out_t 8-byte aligned (GPT-2's (B*T, 4C) GELU output)."""
    op = "fp8_transpose"
    if x.dtype not in FORMAT_OF or out_t.dtype != x.dtype:
        raise ValueError(f"{op}: x and out_t must be float8 tensors of one format, got {x.dtype} and {out_t.dtype}")
    for name, t in (("x", x), ("out_t", out_t)):
        if not t.is_cuda or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous CUDA tensor")
    if x.dim() != 2 or out_t.shape != (x.shape[1], x.shape[0]):
        raise ValueError(f"{op}: x must be (R, C) and out_t (C, R), got {tuple(x.shape)} and {tuple(out_t.shape)}")
    R, C = x.shape
    if R % VEC or C % (2 * VEC) or x.data_ptr() % 16 or out_t.data_ptr() % 8:
        raise ValueError(f"{op}: R={R} must be a multiple of {VEC}, C={C} a multiple of {2 * VEC}, x 16-byte "
                         f"and out_t 8-byte aligned")
    if R:
        KERNELS.launch("fp8_transpose_vec_kernel", (ceil_div(C, VTILE), ceil_div(R, VROWS)), THREADS,
                       (ptr(out_t), ptr(x), i32(R), i32(C)))


def gelu_partials_elements(rows, C):
    """fp32 partials of fp8_gelu_quantize_transpose's bias gradient: one row of 4C per VROWS rows
    of the gradient (1558M B=16: 128 x 6400, 3.3 MB; 124M B=64: 512 x 3072, 6.3 MB)."""
    return ceil_div(rows, VROWS) * 4 * C


def fp8_gelu_quantize_transpose(out, out_t, amax, dbias, inp, pre, scale, partials):
    """The reference's fp8_gelu_quantize_transpose: d = gelu'(pre) * inp (rounded to bf16, as
    gelu_backward writes it) cast with `scale` into out (R, C) and out_t (C, R), amax = max |d|,
    dbias (C,) += the column sums of d, in one pass over inp and pre (d itself is never
    written). R and C multiples of 8 and the buffers 16-byte aligned (GPT-2's fc gradient);
    partials: the backend's planned fp32 scratch (gelu_partials_elements)."""
    op = "fp8_gelu_quantize_transpose"
    _check(op, out, inp, amax=amax, scale=scale)
    _check_transposed(op, out, out_t, inp)
    check_tensor(op, "pre", pre)
    check_tensor(op, "dbias", dbias)
    R, C = inp.shape
    if pre.shape != inp.shape or dbias.shape != (C,):
        raise ValueError(f"{op}: pre {tuple(pre.shape)} must be inp's shape and dbias {tuple(dbias.shape)} ({C},)")
    if R % VEC or C % VEC or any(t.data_ptr() % 16 for t in (inp, pre, out, out_t)):
        raise ValueError(f"{op}: R={R} and C={C} must be multiples of {VEC}, the buffers 16-byte aligned")
    RB = ceil_div(R, VROWS)
    if partials.dtype != torch.float32 or partials.numel() < RB * C:
        raise RuntimeError(f"{op}: the planned partials hold {partials.numel()} fp32, {RB * C} needed")
    amax.zero_()
    if R == 0:
        return
    KERNELS.launch(f"fp8_gelu_quantize_transpose_vec_{FORMAT_OF[out.dtype]}_kernel", (ceil_div(C, VTILE), RB),
                   THREADS, (ptr(out), ptr(out_t), ptr(amax), ptr(partials), ptr(inp), ptr(pre), ptr(scale),
                             i32(R), i32(C)))
    bias.reduce_partials(dbias, partials, RB, C)


def fp8_scale(scale, amax, fmt, margin=0, inverse=None):
    """On the device: scale = the largest power of two with amax * scale <= fp8_max(fmt) /
    2^margin (1 when amax is 0 or not finite); inverse (optional) = 1 / scale."""
    op = "fp8_scale"
    for name, t in (("scale", scale), ("amax", amax), ("inverse", inverse)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != 1 or not t.is_cuda):
            raise ValueError(f"{op}: {name} must be one fp32 CUDA element")
    if fmt not in FP8_FORMATS:
        raise ValueError(f"{op}: fmt={fmt!r}: choose one of {', '.join(FP8_FORMATS)}")
    KERNELS.launch("fp8_scale_kernel", 1, 32, (ptr(scale), ptr(inverse), ptr(amax),
                                               np.float64(fp8_max(fmt) / 2 ** margin)))


def fp8_delayed_scales(scale, inverse, history, amax, limits, mask):
    """Delayed scaling for every site where mask: its amax (sites, stride) joins its history
    (sites, H), oldest out, and scale and inverse (sites, stride) become the largest power of
    two that keeps the history's maximum under limits (sites,) fp64 (1 for a non-finite
    history), and its inverse. The reference's fp8_delayed_scales; one launch for all sites."""
    op = "fp8_delayed_scales"
    S, H = history.shape
    for name, t, dtype in (("scale", scale, torch.float32), ("inverse", inverse, torch.float32),
                           ("history", history, torch.float32), ("amax", amax, torch.float32),
                           ("limits", limits, torch.float64), ("mask", mask, torch.bool)):
        if t.dtype != dtype or not t.is_cuda or not t.is_contiguous() or t.shape[0] != S:
            raise ValueError(f"{op}: {name} must be a contiguous {dtype} CUDA tensor with {S} rows")
    stride = amax.shape[1] if amax.dim() == 2 else 1
    if scale.shape != amax.shape or inverse.shape != amax.shape:
        raise ValueError(f"{op}: scale, inverse and amax must share a shape")
    if S:
        KERNELS.launch("fp8_delayed_scales_kernel", -(-S // THREADS), THREADS,
                       (ptr(scale), ptr(inverse), ptr(history), ptr(amax), ptr(limits), ptr(mask), i32(S), i32(H),
                        i32(stride)))
