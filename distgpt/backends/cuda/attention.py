"""Causal self-attention through fused (flash) attention, called as ATen ops without autograd:
forward returns the output and the per-row log-sum-exp, backward takes them back.

Two implementations, chosen for the whole run by `set_deterministic_attention`:
- cuDNN (default, fastest on H100): its backward adds the query gradient up across key tiles
  with atomics, so dq, and from there the whole run, differs in the last bits between two
  identical runs (dk and dv do not);
- FlashAttention-2 with torch's deterministic switch on around its backward: dq is reduced in
  a fixed order, so runs and resumes are bitwise reproducible, at about 0.9 ms more per layer
  at B=64, T=1024, 12 heads on an H100 (benchmarks/attention_determinism.py measures both).

q, k, v are strided views into the (B, T, 3C) qkv buffer, so nothing is split or transposed
in memory on the way in. cuDNN returns freshly allocated outputs (served by torch's caching
allocator, so no cudaMalloc after the first step); we copy them into the planned (B, T, C)
and (B, T, 3C) buffers, a known cost of one extra pass over those tensors."""
import torch

ATTENTION = torch.ops.aten._scaled_dot_product_cudnn_attention
ATTENTION_BACKWARD = torch.ops.aten._scaled_dot_product_cudnn_attention_backward
FLASH = torch.ops.aten._flash_attention_forward
FLASH_BACKWARD = torch.ops.aten._flash_attention_backward
_deterministic = [False]


def set_deterministic_attention(flag):
    _deterministic[0] = bool(flag)
# the forward's dropout RNG state (philox seed, offset): meaningless without dropout, but the
# backward op takes them as tensors, so the first forward's are kept and handed back
_philox = {}


def _heads(qkv, n_head):
    """(B, T, 3C) -> q, k, v as (B, NH, T, HS) views."""
    B, T, C3 = qkv.shape
    HS = C3 // 3 // n_head
    return qkv.view(B, T, 3, n_head, HS).permute(2, 0, 3, 1, 4).unbind(0)


def attention_forward(out, lse, qkv, n_head):
    """out (B,T,C) = causal softmax(q k^T / sqrt(HS)) v; lse (B,NH,T) fp32 saved for backward."""
    if _deterministic[0]:
        return _flash_forward(out, lse, qkv, n_head)
    B, T, C = out.shape
    q, k, v = _heads(qkv, n_head)
    result = ATTENTION(q, k, v, None, True, 0.0, True, False)
    out.view(B, T, n_head, C // n_head).copy_(result[0].transpose(1, 2))
    lse.copy_(result[1].view(B, n_head, T))
    _philox.setdefault(qkv.device, (result[6], result[7], result[1].dim()))


def attention_backward(dqkv, dout, qkv, out, lse, n_head):
    """dqkv (B,T,3C) = gradient through attention (overwrites)."""
    if _deterministic[0]:
        return _flash_backward(dqkv, dout, qkv, out, lse, n_head)
    B, T, C = dout.shape
    HS = C // n_head
    q, k, v = _heads(qkv, n_head)
    o = out.view(B, T, n_head, HS).transpose(1, 2)
    do = dout.view(B, T, n_head, HS).transpose(1, 2)
    seed, offset, lse_dims = _philox[qkv.device]
    stats = lse.unsqueeze(-1) if lse_dims == 4 else lse
    # no bias and no variable-length sequences: None, as torch's own autograd passes them
    dq, dk, dv = ATTENTION_BACKWARD(do, q, k, v, o, stats, seed, offset, None, None, None, T, T, 0.0, True)
    dq_heads = dqkv.view(B, T, 3, n_head, HS)
    dq_heads[:, :, 0].copy_(dq.transpose(1, 2))
    dq_heads[:, :, 1].copy_(dk.transpose(1, 2))
    dq_heads[:, :, 2].copy_(dv.transpose(1, 2))


# ---------------------------------------------------------------- FlashAttention-2, deterministic
def _flash_heads(qkv, n_head):
    """(B, T, 3C) -> q, k, v as (B, T, NH, HS) views: FlashAttention's own layout."""
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, n_head, C3 // 3 // n_head).unbind(2)


def _flash_forward(out, lse, qkv, n_head):
    B, T, C = out.shape
    q, k, v = _flash_heads(qkv, n_head)
    result = FLASH(q, k, v, None, None, T, T, 0.0, True, False)
    out.view(B, T, n_head, C // n_head).copy_(result[0])
    lse.copy_(result[1])
    _philox.setdefault(("flash", qkv.device), (result[2], result[3]))


def _flash_backward(dqkv, dout, qkv, out, lse, n_head):
    B, T, C = dout.shape
    q, k, v = _flash_heads(qkv, n_head)
    o, do = out.view(B, T, n_head, C // n_head), dout.view(B, T, n_head, C // n_head)
    rng_state, unused = _philox[("flash", qkv.device)]
    # FlashAttention-2 reads torch's deterministic switch when it launches (and only in strict
    # mode); switched on for this call alone, it touches nothing else of the step
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        dq, dk, dv = FLASH_BACKWARD(do, q, k, v, o, lse, None, None, T, T, 0.0, True, rng_state, unused)[:3]
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    heads = dqkv.view(B, T, 3, n_head, C // n_head)
    heads[:, :, 0].copy_(dq)
    heads[:, :, 1].copy_(dk)
    heads[:, :, 2].copy_(dv)
