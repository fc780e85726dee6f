"""Fused attention, both implementations (cuDNN, and FlashAttention-2 with a deterministic
backward), against the reference run in fp32 on the same bf16 inputs; and the deterministic one
bitwise reproducible at a size where cuDNN's backward is not (its dq is summed with atomics)."""
import pytest
import torch

from distgpt.backends import reference
from gpu_check import assert_close, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

# Inputs are randn: scores q.k/sqrt(HS) are O(1) and every softmax row has many terms.
# out and dqkv are bf16 results of fp32 accumulations over up to T terms: one bf16 rounding of
# the result (2^-8 relative) plus bf16 rounding of the probabilities inside the fused kernels
# (they feed P @ V in bf16), ~1e-2 relative of the largest terms; atol 2e-2 covers sums that
# cancel to near 0. lse is fp32 from fp32 scores: only exp/log and order differ, ~1e-5.
TOLERANCES = {"out": (2e-2, 2e-2), "lse": (1e-4, 1e-4), "dqkv": (2e-2, 2e-2)}


def attention_case(B, T, n_head, HS, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    C = n_head * HS
    qkv = torch.randn(B, T, 3 * C, device="cuda", generator=gen).bfloat16()
    dout = torch.randn(B, T, C, device="cuda", generator=gen).bfloat16()
    return qkv, dout


def run_cuda(qkv, dout, n_head):
    from distgpt.backends import cuda
    B, T, C3 = qkv.shape
    out = torch.full((B, T, C3 // 3), float("nan"), device="cuda", dtype=torch.bfloat16)
    lse = torch.full((B, n_head, T), float("nan"), device="cuda")
    dqkv = torch.full_like(qkv, float("nan"))
    cuda.attention_forward(out, lse, qkv, n_head)
    cuda.attention_backward(dqkv, dout, qkv, out, lse, n_head)
    return out, lse, dqkv


@pytest.fixture(params=[False, True], ids=["cudnn", "deterministic"])
def implementation(request):
    from distgpt.backends import cuda
    cuda.set_deterministic_attention(request.param)
    yield request.param
    cuda.set_deterministic_attention(False)


@pytest.mark.parametrize("B,T,n_head,HS", [(2, 64, 2, 64), (4, 256, 4, 64), (1, 1024, 12, 64)])
def test_attention_matches_reference(implementation, B, T, n_head, HS):
    qkv, dout = attention_case(B, T, n_head, HS, seed=T + B)
    out, lse, dqkv = run_cuda(qkv, dout, n_head)
    C = n_head * HS
    want_out, want_lse = torch.empty(B, T, C, device="cuda"), torch.empty(B, n_head, T, device="cuda")
    reference.attention_forward(want_out, want_lse, qkv.float(), n_head)
    want_dqkv = torch.empty(B, T, 3 * C, device="cuda")
    # the reference backward from the reference forward: the gradient of the exact function
    reference.attention_backward(want_dqkv, dout.float(), qkv.float(), want_out, want_lse, n_head)
    for name, got, want in (("out", out, want_out), ("lse", lse, want_lse), ("dqkv", dqkv, want_dqkv)):
        assert_close(name, got, want, *TOLERANCES[name])


def test_deterministic_attention_is_bitwise_reproducible():
    from distgpt.backends import cuda
    qkv, dout = attention_case(16, 1024, 12, 64, seed=7)
    cuda.set_deterministic_attention(True)
    try:
        runs = [run_cuda(qkv, dout, 12) for _ in range(5)]
    finally:
        cuda.set_deterministic_attention(False)
    for other in runs[1:]:
        for name, a, b in zip(("out", "lse", "dqkv"), runs[0], other):
            assert torch.equal(a, b), f"deterministic attention: {name} differs between identical calls"
