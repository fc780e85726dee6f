"""LayerNorm forward and backward on our kernels (kernels/layernorm.cu); the residual adds
before them happen in the projections' matmul epilogues. One warp per row of C channels, the row held in registers.

Forward ops overwrite their outputs. layernorm_backward ADDS into dinp (the residual stream) and
into dweight/dbias, deterministically: a fixed grid of (up to) 2 blocks per SM writes fp32 partial
sums of dweight/dbias (2*C floats per block) into a buffer planned once, and a second kernel sums
the blocks' partials in a fixed order into the bf16 gradients. Given dproj_bias, it also adds the
column sums of the updated dinp there: the bias gradient of the projection (attention or MLP)
whose output joined the residual stream at this point, which would otherwise take its own pass
over a (B, T, C) gradient (bias.cu). That third sum costs shared memory (3*C floats per warp);
where it leaves room for fewer blocks per SM than the plain kernel (C > 1200 on an H100), the
_sum_narrow kernel runs it with half the warps a block, two blocks per SM (or, where even that
does not fit, the plain kernel and the separate pass). Measured on an H100
(benchmarks/layernorm_bias_bench.py, 2026-11-22), plain + bias_backward against fused: N = 65536,
C = 768: 214.8 against 197.1 us; N = 32768, C = 1024: 159.5 against 135.9; N = 16384, C = 1600:
147.5 against 149.5 with 8 warps (one block per SM); 2026-11-23, N = 16384, C = 1600: 186.6
against 160.1 with 4 (narrow), 120 against 115 in the 1558M step.

At C = 1600 (1558M) the row kernels run out of memory parallelism: with one row a warp and a
block's sums in shared memory, 8 rows of loads are in flight per SM, and the _sum_narrow kernel
took 114.8 us a call in the 1558M step where its 210 MB need about 75. From C = 1200 on
(COLS_FROM_C) the column-owned kernel runs instead: a thread per 8 channels with its sums in
registers, and each thread's chunks of the next COLS_STAGES - 1 groups of rows copied into
shared memory by cp.async while it computes. In the step: 94.0 against 114.8 us a call, layernorms 16.70 -> 14.73
ms a step, and 324.4 / 324.0 -> 319.9 / 321.3 ms a step alternated in one call (1558M B=16,
recompute 2 in 20 layers, H100, 2026-11-23). Replayed from a CUDA graph
(benchmarks/layernorm_bias_bench.py --forms), plain / with dproj_bias, rows against cols:
N = 16384, C = 1600: 97.4 / 108.6 against 91.3 / 93.8 us; C = 1280: 72.1 / 77.6 against 68.9 /
75.3; at C = 1024 (32768 rows) the cols kernel loses with dproj_bias (114.2 against 108.3) and
at C = 768 (65536 rows) both ways, so the narrower models keep the row kernels.

Measured on an H100 (kernel time, B*T = 32768, C = 768): layernorm_forward 36 us (2.8 TB/s;
torch's layer_norm 70 us), layernorm_backward 73 + 3 us (2.7 TB/s counting inp, dout, dinp read
and dinp written). At C = 1600, B*T = 16384: 40 and 93 + 3 us."""
import numpy as np
import torch

from distgpt.backends.reference import LAYERNORM_EPS
from distgpt.backends.cuda.runtime import KernelModule, check_scalars, check_tensor, ceil_div, i32, ptr, row_stride

CHUNK = 256          # channels one warp covers per 16-byte step (32 lanes x 8 bf16)
MAX_C = 7 * CHUNK    # kernels exist for 1..7 chunks per lane (GPT-2 XL: C = 1600)
FWD_WARPS = 8        # rows per block of the forward kernels
FWD_MIN_BLOCKS = 3   # __launch_bounds__ minimum blocks per SM of the forward kernels: caps the
#                      CH = 7 residual kernel at 80 registers (from 118: 3 blocks per SM instead of
#                      2), 95.0 -> 86.2 us at (16384, 1600) on an H100; no change at C = 768, 1024
BWD_WARPS = 8        # warps per block of the backward
NARROW_WARPS = 4     # ... of its _sum_narrow twin, where 8 warps' three sums fit one block per SM
BWD_BLOCKS_PER_SM = 2  # at most 2 x 8 warps per SM (__launch_bounds__(256, 2) in the kernels)
COLS_ROWS = 4        # rows a group of the column-owned backward (_cols) computes at once
COLS_STAGES = 2      # groups of it in shared memory: the one computed and 1 in flight behind it
#                      (4 x 2: one barrier every 4 rows, the same bytes in flight as 2 rows x 3
#                      stages; with dproj_bias at N = 16384, C = 1600 on an H200, 80.3 -> 75.7 us,
#                      benchmarks/layernorm_bias_bench.py --sweep, 2026-12-04)
COLS_MIN_BLOCKS = 2  # its __launch_bounds__ minimum blocks per SM (caps its registers at 128)
COLS_WARPS_PER_SM = 16  # at most about this many of its warps per SM (fewer where shared memory is short)
COLS_FROM_C = 1200   # form="auto": the column-owned backward from this width on
RED_Y = 16           # warp rows of the partials reduction
SMEM_RESERVED = 1024  # shared memory the driver keeps per block on sm_80+
KERNELS = KernelModule("layernorm", LN_EPS=f"{LAYERNORM_EPS!r}f", LN_FWD_WARPS=FWD_WARPS, LN_FWD_MIN_BLOCKS=FWD_MIN_BLOCKS,
                       LN_BWD_WARPS=BWD_WARPS, LN_BWD_NARROW_WARPS=NARROW_WARPS, RED_Y=RED_Y,
                       LN_COLS_ROWS=COLS_ROWS, LN_COLS_STAGES=COLS_STAGES, LN_COLS_MIN_BLOCKS=COLS_MIN_BLOCKS)


def cols_warps(C):
    """Warps a block of the column-owned backward: a thread for every 8 channels."""
    return -(-C // CHUNK)


def cols_smem(C):
    """Its dynamic shared memory: COLS_STAGES groups of COLS_ROWS rows of inp, dout and dinp."""
    return COLS_STAGES * COLS_ROWS * 3 * C * 2


def cols_blocks(C, sms, smem_per_sm):
    """Blocks of its fixed grid: as many per SM as shared memory holds, up to about
    COLS_WARPS_PER_SM warps."""
    by_smem = smem_per_sm // (cols_smem(C) + SMEM_RESERVED + 1024)  # + its static row sums
    return sms * max(1, min(by_smem, COLS_WARPS_PER_SM // cols_warps(C)))


def partials_elements(C, sms, smem_per_sm=228 * 1024):
    """layernorm_backward's partials: (blocks, 3 * C) fp32 for the larger of the two kernels'
    grids, about 5 MB at C = 1600 on a 132-SM H100. B and T do not matter: the grid is fixed and
    loops over the rows."""
    return max(BWD_BLOCKS_PER_SM * sms, cols_blocks(C, sms, smem_per_sm)) * 3 * C


def backward_grid(C, nsum, sms, smem_per_sm, warps=BWD_WARPS):
    """(blocks, shared bytes per block) of layernorm_backward: `warps` warps each with nsum * C
    fp32 sums, as many blocks per SM (up to 2) as the SM's shared memory holds."""
    smem = warps * nsum * C * 4
    per_sm = max(1, min(BWD_BLOCKS_PER_SM, smem_per_sm // (smem + SMEM_RESERVED)))
    return per_sm * sms, smem


def _check_width(op, C):
    if C % 8 or not 8 <= C <= MAX_C:
        raise ValueError(f"{op}: C={C} must be a multiple of 8 in [8, {MAX_C}] (16-byte rows held in registers)")




def _kind(amax):
    """The kernel name's middle: the _amax twin merges max |output| into amax (fp8 runs)."""
    return "_kernel" if amax is None else "_amax_kernel"


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


def layernorm_forward(out, mean, rstd, inp, weight, bias, amax=None, scale=None):
    """out (B,T,C) = (inp - mean) * rstd * weight + bias; mean, rstd (B,T) fp32 saved for backward.
    A bf16 out may be a column slice of a wider tensor (rows evenly spaced, 16-byte aligned).
    amax (one fp32 element, fp8 runs): also amax = max(amax, max |out|). out float8_e4m3fn (with
    amax and scale, one fp32 element): out = fp8(bf16 output * scale), saturated, and the bf16
    output is never written (the reference's layernorm_forward with scale)."""
    op = "layernorm_forward"
    out8 = out.dtype == torch.float8_e4m3fn
    if out8:
        if amax is None or scale is None:
            raise ValueError(f"{op}: an e4m3 out needs amax and scale (the delayed scale it is cast with)")
        check_scalars(op, amax=amax, scale=scale)
        if out.shape != inp.shape or not out.is_cuda or not out.is_contiguous() or out.data_ptr() % 8:
            raise ValueError(f"{op}: an e4m3 out must be a contiguous CUDA tensor of inp's shape, 8-byte aligned")
    elif scale is not None:
        raise ValueError(f"{op}: scale is for an e4m3 out (a bf16 out is not scaled)")
    N, C = _check_row_op(op, [("inp", inp)], [("mean", mean), ("rstd", rstd)], [("weight", weight), ("bias", bias)])
    # a bf16 out may be a column slice: the plan's layernorm outputs sit beside a column of ones
    out_ld = C if out8 else row_stride(op, "out", out)
    if not out8 and out.shape != inp.shape:
        raise ValueError(f"{op}: out {tuple(out.shape)} must match inp {tuple(inp.shape)}")
    if amax is not None:
        check_scalars(op, amax=amax)
    if N == 0:
        return
    kind = "_fp8_kernel" if out8 else _kind(amax)
    args = (ptr(out), ptr(mean), ptr(rstd), ptr(inp), ptr(weight), ptr(bias), ptr(amax)) + \
        ((ptr(scale),) if out8 else ()) + (i32(N), i32(C)) + (() if out8 else (np.int64(out_ld),))
    KERNELS.launch(f"layernorm_forward{kind}_{ceil_div(C, CHUNK)}", ceil_div(N, FWD_WARPS), FWD_WARPS * 32, args)


class LayerNormGradients:
    """layernorm_backward and its planned partials, for widths up to C. The projections' bias
    gradients it may take (dproj_bias) fall back to `bias_gradients` where shared memory is short."""

    def __init__(self, C, device, bias_gradients, form="auto"):
        """form: which phase-1 kernel runs, "rows" (a warp a row, sums in shared memory), "cols"
        (a thread per 8 channels, sums in registers, rows staged ahead by cp.async) or "auto"
        (cols from COLS_FROM_C on)."""
        _check_width("layernorm plan", C)
        if form not in ("auto", "rows", "cols"):
            raise ValueError(f"layernorm plan: form={form!r}: choose auto, rows or cols")
        self.form = form
        props = torch.cuda.get_device_properties(device)
        self.C, self.sms = C, props.multi_processor_count
        self.smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
        self.bias_gradients = bias_gradients
        self.partials = torch.empty(partials_elements(C, self.sms, self.smem_per_sm), dtype=torch.float32,
                                    device=device)

    @property
    def nbytes(self):
        return self.partials.nbytes

    def backward(self, dinp, dweight, dbias, dout, inp, weight, mean, rstd, dproj_bias=None, amax=None,
                 dproj_sum=None):
        """dinp += d(inp) (the residual stream accumulates); dweight, dbias += their gradients;
        dproj_bias, when given, += the column sums of dinp after the update (and dproj_sum, fp32,
        = those sums); amax (fp8 runs), when given, = max(amax, max |dinp| after the update)."""
        op = "layernorm_backward"
        if amax is not None:
            check_scalars(op, amax=amax)
        params = [("weight", weight), ("dweight", dweight), ("dbias", dbias)]
        if dproj_bias is not None:
            params.append(("dproj_bias", dproj_bias))
        if dproj_sum is not None:
            if dproj_bias is None:
                raise ValueError(f"{op}: dproj_sum comes with dproj_bias (the sums it adds)")
            check_tensor(op, "dproj_sum", dproj_sum, torch.float32)
            if dproj_sum.shape != dproj_bias.shape:
                raise ValueError(f"{op}: dproj_sum {tuple(dproj_sum.shape)} must have dproj_bias's shape")
        N, C = _check_row_op(op, [("inp", inp), ("dout", dout), ("dinp", dinp)],
                             [("mean", mean), ("rstd", rstd)], params)
        if C > self.C:
            raise RuntimeError(f"{op}: C={C} exceeds the planned C={self.C}")
        if N == 0:
            return
        nsum = 2 if dproj_bias is None else 3
        if self.form == "cols" or (self.form == "auto" and C >= COLS_FROM_C):
            # the column-owned kernel: its grid, capped by what the partials hold
            name = f"{'layernorm_backward_cols' if nsum == 2 else 'layernorm_backward_sum_cols'}{_kind(amax)}"
            P = min(cols_blocks(C, self.sms, self.smem_per_sm), ceil_div(N, COLS_ROWS),
                    self.partials.numel() // (nsum * C))
            threads, smem = cols_warps(C) * 32, cols_smem(C)
        else:
            name, warps = ("layernorm_backward" if nsum == 2 else "layernorm_backward_sum"), BWD_WARPS
            P, smem = backward_grid(C, nsum, self.sms, self.smem_per_sm)
            plain_blocks = backward_grid(C, 2, self.sms, self.smem_per_sm)[0]
            if P < plain_blocks:
                # the third sum would halve the blocks per SM: half the warps a block keep two
                # blocks per SM where that fits, else two passes
                name, warps = "layernorm_backward_sum_narrow", NARROW_WARPS
                P, smem = backward_grid(C, nsum, self.sms, self.smem_per_sm, warps)
                if P < plain_blocks:
                    self.backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, amax=amax)
                    self.bias_gradients.backward(dproj_bias, dinp, sums=dproj_sum)
                    return
            name, threads = f"{name}{_kind(amax)}_{ceil_div(C, CHUNK)}", warps * 32
        KERNELS.launch(name, P, threads,
                       (ptr(dinp), ptr(self.partials), ptr(dout), ptr(inp), ptr(weight), ptr(mean), ptr(rstd),
                        ptr(amax), i32(N), i32(C)), shared_mem=smem)
        # phase 2: the P blocks' partials, in block order, added into the gradients
        KERNELS.launch("layernorm_backward_reduce_kernel", ceil_div(nsum * C // 4, 32), (32, RED_Y),
                       (ptr(dweight), ptr(dbias), ptr(dproj_bias), ptr(dproj_sum), ptr(self.partials), i32(P),
                        i32(C), i32(nsum)))
