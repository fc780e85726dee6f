"""Causal self-attention through cuDNN's fused (flash) attention, called as ATen ops without
autograd: forward returns the output and the per-row log-sum-exp, backward takes them back.

q, k, v are strided views into the (B, T, 3C) qkv buffer, so nothing is split or transposed
in memory on the way in. cuDNN returns freshly allocated outputs (served by torch's caching
allocator, so no cudaMalloc after the first step); we copy them into the planned (B, T, C)
and (B, T, 3C) buffers, a known cost of one extra pass over those tensors."""
import torch

ATTENTION = torch.ops.aten._scaled_dot_product_cudnn_attention
ATTENTION_BACKWARD = torch.ops.aten._scaled_dot_product_cudnn_attention_backward
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
    B, T, C = out.shape
    q, k, v = _heads(qkv, n_head)
    result = ATTENTION(q, k, v, None, True, 0.0, True, False)
    out.view(B, T, n_head, C // n_head).copy_(result[0].transpose(1, 2))
    lse.copy_(result[1].view(B, n_head, T))
    _philox.setdefault(qkv.device, (result[6], result[7], result[1].dim()))


def attention_backward(dqkv, dout, qkv, out, lse, n_head):
    """dqkv (B,T,3C) = gradient through attention (overwrites)."""
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
