"""Bias gradient of a linear layer on our kernels (kernels/bias.cu): dbias (OC,) += the column
sums of dout (N, OC), deterministic without atomics.

Phase 1: blocks of 8 warps own 256 columns and one contiguous range of rows; each thread reads 8
columns per row with one 16-byte load and sums its rows in order; the block writes fp32 partials
(one row of OC per row range). Phase 2 sums the ranges' partials in a fixed order into dbias.
The number of row ranges RB is chosen so phase 1 runs about BLOCKS_PER_SM blocks per SM
whatever OC is (OC = 768 -> 3 column tiles x 176 ranges; OC = 6400 -> 25 x 22 on 132 SMs), which
keeps the partials small: RB * OC <= (blocks + column tiles) * 256 floats. Measured on an H100:
N = 32768, OC = 3072 in 68 + 2 us (2.9 TB/s; torch's dout.sum(0) takes 80 us).

dout may be a column slice of a wider gradient (rows `ld` apart: the queries' part of dqkv), and
phase 2 can also write the fp32 sums (`sums`). qkv_backward gives the attention's qkv bias
gradient from the queries' columns alone plus a (C,) x (C, C) product (projected_bias_kernel):
the keys' part is exactly zero and the values' comes from the attention projection's bias
gradient (reference.qkv_bias_backward says why), a third of the reads of summing all of dqkv."""
import numpy as np
import torch

from distgpt.backends.cuda.runtime import KernelModule, check_tensor, ceil_div, i32, ptr, row_stride, sm_count

COLS = 256          # columns per phase-1 block: 32 lanes x 8
BIAS_WARPS = 8      # warps per phase-1 block
BLOCKS_PER_SM = 4   # phase-1 blocks per SM to aim for: 32 warps, each with 4 loads in flight
MIN_ROWS_PER_WARP = 4
RED_Y = 16          # warp rows of the phase-2 reduction
PROJ_WARPS = 32     # warps of a projected_bias_kernel block: C_out rows split 32 ways, one block per 256 columns
PROJ_ROWS = 4       # rows each of its lanes loads before multiplying (loads in flight per lane)
SPLIT_THREADS = 256  # threads a block of split_bias_column_*_kernel: a thread per 8 columns of a row
KERNELS = KernelModule("bias", BIAS_WARPS=BIAS_WARPS, RED_Y=RED_Y, PROJ_WARPS=PROJ_WARPS, PROJ_ROWS=PROJ_ROWS)


def partials_elements(C, sms):
    """The partials for every OC up to 4C (the MLP's fc bias is the widest):
    (BLOCKS_PER_SM * SMs + ceil(4C / 256)) * 256 fp32, about 0.57 MB at C = 1600 on 132 SMs."""
    return (BLOCKS_PER_SM * sms + ceil_div(4 * C, COLS)) * COLS


def _row_ranges(N, OC, blocks):
    """(RB, rows per range): enough ranges for `blocks` phase-1 blocks, none with fewer than
    MIN_ROWS_PER_WARP rows per warp (unless N itself is that small), none empty."""
    tiles = ceil_div(OC, COLS)
    RB = max(1, min(ceil_div(blocks, tiles), N // (MIN_ROWS_PER_WARP * BIAS_WARPS)))
    rows = ceil_div(N, RB)
    return ceil_div(N, rows), rows




def reduce_partials(dbias, partials, RB, OC, sums=None):
    """Phase 2: dbias (OC,) += the sums of partials' first RB rows of OC fp32, each column in a
    fixed order (and sums = those totals, when given). Also the last step of fp8.py's fused GELU
    cast, whose tiles write such rows."""
    KERNELS.launch("bias_backward_reduce_kernel", ceil_div(OC // 4, 32), (32, RED_Y),
                   (ptr(dbias), ptr(sums), ptr(partials), i32(RB), i32(OC)))


def split_bias_column(dweight, dbias, product, accumulate, exact_zero=None):
    """dweight (OC, C) = (or += when accumulate) product[:, :C], dbias (OC,) += product[:, C]
    except in rows exact_zero = (begin, end), left as they are: the weight and bias gradients
    out of one product over an input with a column of ones at C (matmul.py's
    weight_grad_bias_column). product (OC, ld) fp32 or bf16, ld > C."""
    op = "split_bias_column"
    check_tensor(op, "dweight", dweight)
    check_tensor(op, "dbias", dbias)
    OC, C = dweight.shape
    if product.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{op}: product must be fp32 or bf16, got {product.dtype}")
    check_tensor(op, "product", product, product.dtype)
    if product.dim() != 2 or product.shape[0] != OC or product.shape[1] <= C or dbias.shape != (OC,):
        raise ValueError(f"{op}: product {tuple(product.shape)} and dbias {tuple(dbias.shape)} must be (OC, > C) "
                         f"and (OC,) for dweight {tuple(dweight.shape)}")
    if C % 8 or (product.shape[1] * product.element_size()) % 16:
        raise ValueError(f"{op}: C={C} and product's rows must be multiples of 16 bytes (128-bit access)")
    skip_begin, skip_end = exact_zero or (0, 0)
    if not 0 <= skip_begin <= skip_end <= OC:
        raise ValueError(f"{op}: exact_zero rows {exact_zero} must lie within [0, {OC}]")
    kind = "f32" if product.dtype == torch.float32 else "bf16"
    KERNELS.launch(f"split_bias_column_{kind}_kernel", ceil_div(OC * (C // 8 + 1), SPLIT_THREADS), SPLIT_THREADS,
                   (ptr(dweight), ptr(dbias), ptr(product), i32(OC), i32(C), np.int64(product.shape[1]),
                    i32(bool(accumulate)), i32(skip_begin), i32(skip_end)))


class BiasGradients:
    """The column-sum kernels and their partials, planned once for bias gradients up to 4C wide."""

    def __init__(self, C, device):
        sms = sm_count(device)
        self.blocks, self.max_OC = BLOCKS_PER_SM * sms, 4 * C
        self.partials = torch.empty(partials_elements(C, sms), dtype=torch.float32, device=device)

    @property
    def nbytes(self):
        return self.partials.nbytes

    def backward(self, dbias, dout, sums=None):
        """dbias (OC,) += dout (..., OC) summed over all leading dimensions; dout's rows may be
        any equal number of elements apart (a column slice). sums (OC,) fp32, when given, = the
        column sums themselves."""
        op = "bias_backward"
        check_tensor(op, "dbias", dbias)
        OC = dout.shape[-1]
        if OC % 8:
            raise ValueError(f"{op}: OC={OC} must be a multiple of 8 (16-byte bf16 vectors)")
        ld = row_stride(op, "dout", dout)
        if sums is not None:
            check_tensor(op, "sums", sums, torch.float32)
            if sums.shape != dbias.shape:
                raise ValueError(f"{op}: sums {tuple(sums.shape)} must have dbias's shape {tuple(dbias.shape)}")
        if dbias.shape != (OC,):
            raise ValueError(f"{op}: dbias {tuple(dbias.shape)} must be (OC,) = ({OC},)")
        if OC > self.max_OC:
            raise RuntimeError(f"{op}: OC={OC} exceeds the planned 4C={self.max_OC}")
        N = dout.numel() // OC
        if N == 0:
            return
        RB, rows = _row_ranges(N, OC, self.blocks)
        assert RB * OC <= self.partials.numel(), "bias partials smaller than the bound in partials_elements()"
        KERNELS.launch("bias_backward_kernel", (ceil_div(OC, COLS), RB), BIAS_WARPS * 32,
                       (ptr(self.partials), ptr(dout), i32(N), i32(OC), np.int64(ld), i32(rows)))
        reduce_partials(dbias, self.partials, RB, OC, sums)

    def qkv_backward(self, dbias, dqkv, dproj_sum, attproj_weight):
        """The reference's qkv_bias_backward: dbias (3C,) += [column sums of dqkv's queries, 0,
        dproj_sum @ attproj_weight]."""
        op = "qkv_bias_backward"
        check_tensor(op, "dbias", dbias)
        check_tensor(op, "dqkv", dqkv)
        check_tensor(op, "attproj_weight", attproj_weight)
        check_tensor(op, "dproj_sum", dproj_sum, torch.float32)
        C_out, C = attproj_weight.shape
        if dqkv.shape[-1] != 3 * C or dbias.shape != (3 * C,) or dproj_sum.shape != (C_out,):
            raise ValueError(f"{op}: dqkv (..., {dqkv.shape[-1]}), dbias {tuple(dbias.shape)}, dproj_sum "
                             f"{tuple(dproj_sum.shape)} do not fit attproj_weight {tuple(attproj_weight.shape)}: "
                             f"want (..., 3C), (3C,), (C_out,)")
        self.backward(dbias[:C], dqkv[..., :C])
        KERNELS.launch("projected_bias_kernel", ceil_div(C, COLS), PROJ_WARPS * 32,
                       (ptr(dbias[2 * C:]), ptr(dproj_sum), ptr(attproj_weight), i32(C_out), i32(C)))
