"""Matmuls through cuBLAS(Lt), called through torch with preallocated outputs.

These are the one op family where a library is the best tool: cuBLASLt reaches 680-707
TFLOP/s on the H100's GPT-2 shapes. The forward bias add rides in cuBLASLt's epilogue
(torch.addmm with a 1-D bias takes that path); the weight gradient accumulates in place with
beta = 1 (cuBLAS sums in fp32 before the single rounding to bf16); the bias gradient is our
deterministic column-sum kernel (bias.cu)."""
import torch

from distgpt.backends.cuda.bias import bias_backward


def matmul_forward(out, inp, weight, bias):
    """out (..., OC) = inp (..., C) @ weight (OC, C)^T + bias (OC) or no bias."""
    OC, C = weight.shape
    out2, inp2 = out.view(-1, OC), inp.reshape(-1, C)
    if bias is None:
        torch.mm(inp2, weight.t(), out=out2)
    else:
        torch.addmm(bias, inp2, weight.t(), out=out2)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
    """dinp = dout @ weight (overwrites); dweight += dout^T @ inp; dbias += column sums of dout."""
    OC, C = weight.shape
    dout2, inp2 = dout.reshape(-1, OC), inp.reshape(-1, C)
    torch.mm(dout2, weight, out=dinp.view(-1, C))
    dweight.addmm_(dout2.t(), inp2)
    if dbias is not None:
        bias_backward(dbias, dout2)
