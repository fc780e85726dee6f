"""Fused attention, every path of backends/cuda/attention.py against the reference run in fp32 on
the same bf16 inputs: cuDNN's Python frontend writing into our buffers (planned shapes, and graphs
built later for smaller batches), cuDNN through ATen with its copies (shapes nobody planned), and
FlashAttention-2 with a deterministic backward. Then what the frontend path promises the step:
nothing allocated, and a forward + backward that replays from a CUDA graph; and the deterministic
path bitwise reproducible at a size where cuDNN's backward is not (its dq is summed with atomics)."""
import pytest
import torch

from distgpt.backends import reference
from gpu_check import assert_close, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

# Inputs are randn: scores q.k/sqrt(HS) are O(1) and every softmax row has many terms.
# out and dqkv are bf16 results of fp32 accumulations over up to T terms: one bf16 rounding of
# the result (2^-8 relative) plus bf16 rounding of the probabilities inside the fused kernels
# (they feed P @ V in bf16), ~1e-2 relative of the largest terms; atol 2e-2 covers sums that
# cancel to near 0. lse is fp32 from fp32 scores: only exp/log and order differ, ~1e-5. The lse
# compared is the same quantity on every path: the natural-log log-sum-exp of each row of the
# scaled, causally masked scores (cuDNN's Stats, max + ln(sum exp(s - max)); FA2's softmax_lse;
# the reference's torch.logsumexp).
TOLERANCES = {"out": (2e-2, 2e-2), "lse": (1e-4, 1e-4), "dqkv": (2e-2, 2e-2)}


def attention_case(B, T, n_head, HS, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    C = n_head * HS
    qkv = torch.randn(B, T, 3 * C, device="cuda", generator=gen).bfloat16()
    dout = torch.randn(B, T, C, device="cuda", generator=gen).bfloat16()
    return qkv, dout


def poisoned(qkv, n_head):
    """out, lse, dqkv full of NaN: anything the call leaves unwritten fails assert_close."""
    B, T, C3 = qkv.shape
    out = torch.full((B, T, C3 // 3), float("nan"), device="cuda", dtype=torch.bfloat16)
    lse = torch.full((B, n_head, T), float("nan"), device="cuda")
    return out, lse, torch.full_like(qkv, float("nan"))


def run(attention, qkv, dout, n_head):
    """Forward then backward through an Attention, into poisoned buffers."""
    return run_ops(attention.forward, attention.backward, qkv, dout, n_head)


def run_ops(forward, backward, qkv, dout, n_head):
    out, lse, dqkv = poisoned(qkv, n_head)
    forward(out, lse, qkv, n_head)
    backward(dqkv, dout, qkv, out, lse, n_head)
    return out, lse, dqkv


def check_against_reference(qkv, dout, n_head, got):
    B, T, C3 = qkv.shape
    C = C3 // 3
    want_out, want_lse = torch.empty(B, T, C, device="cuda"), torch.empty(B, n_head, T, device="cuda")
    reference.attention_forward(want_out, want_lse, qkv.float(), n_head)
    want_dqkv = torch.empty(B, T, 3 * C, device="cuda")
    # the reference backward from the reference forward: the gradient of the exact function
    reference.attention_backward(want_dqkv, dout.float(), qkv.float(), want_out, want_lse, n_head)
    for name, g, want in zip(("out", "lse", "dqkv"), got, (want_out, want_lse, want_dqkv)):
        assert_close(name, g, want, *TOLERANCES[name])


def planned(B, T, n_head, HS):
    from distgpt.backends.cuda.attention import Attention
    attention = Attention()
    attention.plan(B, T, n_head * HS, n_head, "cuda")
    return attention


@pytest.fixture(params=["aten", "deterministic"])
def unplanned(request):
    """An Attention nobody planned: cuDNN through ATen, or FlashAttention-2."""
    from distgpt.backends.cuda.attention import Attention
    attention = Attention()
    attention.set_deterministic(request.param == "deterministic")
    return attention


@pytest.mark.parametrize("B,T,n_head,HS", [(2, 64, 2, 64), (4, 256, 4, 64), (1, 1024, 12, 64)])
def test_attention_matches_reference(unplanned, B, T, n_head, HS):
    qkv, dout = attention_case(B, T, n_head, HS, seed=T + B)
    check_against_reference(qkv, dout, n_head, run(unplanned, qkv, dout, n_head))
    assert not unplanned.engines(), "an unplanned Attention built cuDNN frontend graphs"


# the last one is GPT-2 1558M's head layout (25 heads of 64) at its training length
@pytest.mark.parametrize("B,T,n_head,HS", [(2, 64, 4, 64), (4, 256, 12, 64), (2, 1024, 25, 64)])
def test_frontend_matches_reference(B, T, n_head, HS):
    attention = planned(B, T, n_head, HS)
    assert set(attention.engines()) == {("fwd", B, T, n_head, HS), ("bwd", B, T, n_head, HS)}
    qkv, dout = attention_case(B, T, n_head, HS, seed=3 * T + B)
    check_against_reference(qkv, dout, n_head, run(attention, qkv, dout, n_head))


def test_frontend_smaller_batches_and_other_lengths():
    """b < B at the planned T: graphs built on first use, sharing the planned workspace. Another
    t (sampling's (1, t)): the ATen path, no graph built."""
    B, T, n_head, HS = 4, 128, 4, 64
    attention = planned(B, T, n_head, HS)
    workspace = attention.workspace_bytes
    for b in (1, 3):
        qkv, dout = attention_case(b, T, n_head, HS, seed=b)
        check_against_reference(qkv, dout, n_head, run(attention, qkv, dout, n_head))
        assert {("fwd", b, T, n_head, HS), ("bwd", b, T, n_head, HS)} <= set(attention.engines())
    assert attention.workspace_bytes == workspace, "a smaller batch's graph grew the workspace"
    qkv, dout = attention_case(1, 96, n_head, HS, seed=96)
    check_against_reference(qkv, dout, n_head, run(attention, qkv, dout, n_head))
    assert not any(key[2] == 96 for key in attention.engines()), "built a graph for an unplanned T"


def planned_step(B, T, n_head, HS, seed):
    """A planned frontend attention on fresh inputs and poisoned outputs, and its forward +
    backward as one call: (qkv, dout, (out, lse, dqkv), step)."""
    attention = planned(B, T, n_head, HS)
    qkv, dout = attention_case(B, T, n_head, HS, seed=seed)
    out, lse, dqkv = poisoned(qkv, n_head)

    def step():
        attention.forward(out, lse, qkv, n_head)
        attention.backward(dqkv, dout, qkv, out, lse, n_head)

    return qkv, dout, (out, lse, dqkv), step


def test_frontend_step_allocates_nothing():
    """After plan() and one warm call, forward + backward leave torch's allocator untouched (no
    tensor made, no block reserved) and the device's free memory unchanged (nor did cuDNN
    cudaMalloc anything behind torch's back)."""
    B, T, n_head, HS = 8, 256, 12, 64
    qkv, dout, (out, lse, dqkv), step = planned_step(B, T, n_head, HS, seed=11)
    step()
    torch.cuda.synchronize()
    before = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), torch.cuda.mem_get_info()[0])
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    after = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), torch.cuda.mem_get_info()[0])
    for what, b, a in zip(("memory_allocated", "memory_reserved", "device free memory"), before, after):
        assert a == b, f"the frontend step changed {what}: {b} -> {a} bytes"
    check_against_reference(qkv, dout, n_head, (out, lse, dqkv))


def test_frontend_replays_in_a_cuda_graph():
    """Forward + backward captured once (on torch's capture stream, so the handle follows a
    stream other than the default), then replayed on new inputs written into the same buffers."""
    B, T, n_head, HS = 2, 256, 4, 64
    qkv, dout, (out, lse, dqkv), step = planned_step(B, T, n_head, HS, seed=21)
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_qkv, new_dout = attention_case(B, T, n_head, HS, seed=22)
    qkv.copy_(new_qkv)
    dout.copy_(new_dout)
    for t in (out, lse, dqkv):
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_against_reference(new_qkv, new_dout, n_head, (out, lse, dqkv))
    step()  # eager again, back on the default stream
    check_against_reference(new_qkv, new_dout, n_head, (out, lse, dqkv))


def test_deterministic_attention_is_bitwise_reproducible():
    from distgpt.backends.cuda import CudaBackend
    qkv, dout = attention_case(16, 1024, 12, 64, seed=7)
    backend = CudaBackend()
    backend.set_deterministic(True)
    runs = [run_ops(backend.attention_forward, backend.attention_backward, qkv, dout, 12) for _ in range(5)]
    for other in runs[1:]:
        for name, a, b in zip(("out", "lse", "dqkv"), runs[0], other):
            assert torch.equal(a, b), f"deterministic attention: {name} differs between identical calls"
