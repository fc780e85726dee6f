"""Softmax + cross-entropy fused with its backward on our kernel (kernels/classifier.cu).

fused_classifier overwrites `losses` (fp32) and overwrites the bf16 logits in place with
dloss * (softmax - onehot(target)) over the first V columns and exact zeros in the padding
[V, Vp). One block of 512 threads per row: pass 1 an online max and sum of exp in fp32 over 16-byte
vectors (the last real vector masked at V), pass 2 the gradient. Deterministic: fixed-order block
reductions, no atomics. With dloss == 0 (validation) the kernel still writes the gradient, all
zeros, so the buffer is never left holding logits. A target outside [0, V) gives a NaN loss.
No scratch, so no plan()."""
import torch

from distgpt.backends.cuda.runtime import f32, i32, launch, ptr

MODULE = "classifier"
THREADS = 512  # CLS_THREADS in classifier.cu


def _check(op, name, t, dtype):
    if t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if not t.is_cuda or not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be a contiguous CUDA tensor")


def fused_classifier(logits, losses, targets, vocab_size, dloss):
    """losses (B,T) = -log softmax(logits[..., :V])[target]; logits (B,T,Vp) OVERWRITTEN by
    dloss * (softmax - onehot(target)) over the first V columns, 0 in the padding."""
    op = "fused_classifier"
    _check(op, "logits", logits, torch.bfloat16)
    _check(op, "losses", losses, torch.float32)
    _check(op, "targets", targets, torch.int64)
    Vp, V = logits.shape[-1], int(vocab_size)
    if Vp % 8:
        raise ValueError(f"{op}: padded vocab Vp={Vp} must be a multiple of 8 (16-byte rows)")
    if not 0 < V <= Vp:
        raise ValueError(f"{op}: vocab_size={V} must be in [1, Vp={Vp}]")
    if logits.data_ptr() % 16:
        raise ValueError(f"{op}: logits must be 16-byte aligned for 128-bit access")
    rows = tuple(logits.shape[:-1])
    for name, t in (("losses", losses), ("targets", targets)):
        if tuple(t.shape) != rows:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must be logits' leading shape {rows}")
    N = logits.numel() // Vp
    if N == 0:
        return
    launch(MODULE, "fused_classifier_kernel", N, THREADS,
           (ptr(logits), ptr(losses), ptr(targets), i32(V), i32(Vp), f32(dloss)))
