"""out (C, R) = inp (R, C)^T for bf16 row-major matrices, on our kernel (kernels/transpose.cu).

The matmuls use it to hand cuBLASLt a weight's transpose where the transposed layout of a
product runs on a faster kernel (the fc projection's dGELU product at 350M: see matmul.py). The
caller plans the output buffer; nothing is allocated here."""
import numpy as np

from distgpt.backends.cuda.runtime import KernelModule, ceil_div, check_tensor, ptr

TILE = 64  # a block's tile is TILE x TILE elements (8 KiB of shared memory in bf16)
THREADS = 256
KERNELS = KernelModule("transpose", TRANSPOSE_TILE=TILE, TRANSPOSE_THREADS=THREADS)


def transpose(out, inp):
    """out (C, R) = inp (R, C)^T; both contiguous bf16 CUDA tensors, R and C even."""
    op = "transpose"
    check_tensor(op, "inp", inp)
    check_tensor(op, "out", out)
    if inp.dim() != 2 or out.shape != (inp.shape[1], inp.shape[0]):
        raise ValueError(f"{op}: out {tuple(out.shape)} must be inp {tuple(inp.shape)} transposed")
    R, C = inp.shape
    if R % 2 or C % 2:
        raise ValueError(f"{op}: the kernel moves bf16 pairs, so both dimensions must be even, got ({R}, {C})")
    if out.data_ptr() == inp.data_ptr():
        raise ValueError(f"{op}: out must be another buffer than inp (not in place)")
    if R and C:
        KERNELS.launch("transpose_kernel", (ceil_div(C, TILE), ceil_div(R, TILE)), THREADS,
                       (ptr(out), ptr(inp), np.int32(R), np.int32(C)))
