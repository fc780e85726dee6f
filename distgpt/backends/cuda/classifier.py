"""The tied lm head and softmax + cross-entropy fused with its backward, on our kernels
(kernels/classifier.cu) between cuBLAS matmuls.

fused_classifier overwrites `losses` (fp32) and overwrites the bf16 logits in place with
dloss * (softmax - onehot(target)) over the first V columns and exact zeros in the padding
[V, Vp). One block of 512 threads per row: pass 1 an online max and sum of exp in fp32 over 16-byte
vectors (the last real vector masked at V), pass 2 the gradient (the target's -1 written last by
thread 0, out of the hot loop). Deterministic: fixed-order block
reductions, no atomics. With dloss == 0 (validation) the kernel still writes the gradient, all
zeros, so the buffer is never left holding logits. A target outside [0, V) gives a NaN loss.

Two kernels, the same arithmetic and thread layout, so bitwise the same results:
- fused_classifier_smem_kernel copies the row's ceil(V/8) 16-byte vectors into dynamic shared
  memory in pass 1 (cp.async) and computes the gradient from there: the row is read once and
  written once. Used whenever the row fits the device's opt-in shared memory per block (GPT-2's
  100,528 bytes: H100 227 KB, A100 163 KB). On an H100 two blocks share an SM (2 x ~101.7 KB of
  228 KB), so one's arithmetic overlaps the other's memory traffic (an A100 SM holds one).
- fused_classifier_kernel, for rows that do not fit, reads the row twice and writes it once.
At 124M, B = 64 (8 launches of 8192 x 50304 per step) the two-pass kernel measured 932 us per
launch on an H100 (2.5 GB at 2.65 TB/s); the one-pass kernel moves 1.65 GB: predicted ~620 us
at the same bandwidth (2026-11-22, to be measured), about 2.5 ms less per step.

lm_head_loss runs the lm head, the classifier and the lm head's backward over chunks of rows
through the model's planned (R, Vp) logits scratch, so the whole (B, T, Vp) logits never exist
(see the reference for the contract). No scratch of its own: the backend hands it its Matmuls."""
import functools

import torch

from distgpt.backends.cuda.runtime import KernelModule, _cupy, ceil_div, f32, i32, ptr

THREADS = 512  # threads per row-block, both kernels (the same count keeps them bitwise equal)
KERNELS = KernelModule("classifier", CLS_THREADS=THREADS)
SMEM_KERNEL, TWO_PASS_KERNEL = "fused_classifier_smem_kernel", "fused_classifier_kernel"


@functools.lru_cache(maxsize=None)
def _smem_budget(device_index):
    """Dynamic shared memory one block of the one-pass kernel may use on this device: the opt-in
    limit per block less the kernel's static shared memory (its reduction scratch). Also asks for
    the largest shared-memory carveout once, so that two rows fit on one SM where they can."""
    cp = _cupy()
    optin = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                               device_index)
    fn = KERNELS.function(SMEM_KERNEL)
    fn.preferred_shared_memory_carveout = 100  # percent of the most shared memory an SM can have
    return optin - fn.shared_size_bytes


def smem_row_bytes(vocab_size):
    """Dynamic shared memory the one-pass kernel needs: the row's vectors holding a real column."""
    return ceil_div(int(vocab_size), 8) * 16


def smem_row_fits(vocab_size, device_index=None):
    """True if a row of vocab_size logits fits the one-pass kernel's shared memory on the device
    (the current one by default)."""
    index = torch.cuda.current_device() if device_index is None else device_index
    return smem_row_bytes(vocab_size) <= _smem_budget(index)


def _check(op, name, t, dtype):
    if t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if not t.is_cuda or not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be a contiguous CUDA tensor")


def fused_classifier(logits, losses, targets, vocab_size, dloss, one_pass=True):
    """losses (B,T) = -log softmax(logits[..., :V])[target]; logits (B,T,Vp) OVERWRITTEN by
    dloss * (softmax - onehot(target)) over the first V columns, 0 in the padding. one_pass=False
    forces the two-pass kernel (the tests run both)."""
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
    args = (ptr(logits), ptr(losses), ptr(targets), i32(V), i32(Vp), f32(dloss))
    if one_pass and smem_row_fits(V, logits.device.index):
        KERNELS.launch(SMEM_KERNEL, N, THREADS, args, shared_mem=smem_row_bytes(V))
    else:
        KERNELS.launch(TWO_PASS_KERNEL, N, THREADS, args)


def lm_head_logits(matmuls, logits, lnf, wte):
    """logits (..., Vp) = lnf (..., C) @ wte (Vp, C)^T: the lm head alone, for sampling."""
    matmuls.forward(logits, lnf, wte, None)


def lm_head_loss(matmuls, losses, dlnf, dwte, lnf, wte, targets, vocab_size, dloss, logits, one_pass=True):
    """Per chunk of R = logits.shape[0] rows of lnf (B,T,C), through the (R, Vp) scratch:
    logits_chunk = lnf_chunk @ wte^T; fused_classifier writes losses_chunk (fp32) and turns
    the chunk into dloss * (softmax - onehot); dlnf_chunk = dlogits_chunk @ wte (overwrites);
    dwte += dlogits_chunk^T @ lnf_chunk. cuBLAS sums each chunk's dwte product in fp32 and
    rounds once into the bf16 dwte, so dwte takes one bf16 rounding per chunk (8 at 124M,
    B=64, T=1024), like gradient accumulation across micro-steps. Chunks run in a fixed order:
    deterministic. dloss == 0 (evaluation): losses only, dlnf and dwte untouched."""
    op = "lm_head_loss"
    Vp, C = wte.shape
    R = logits.shape[0]
    if logits.dim() != 2 or logits.shape[1] != Vp:
        raise ValueError(f"{op}: logits scratch {tuple(logits.shape)} must be (R, Vp={Vp})")
    _check(op, "logits", logits, torch.bfloat16)
    for name, t, dtype in (("lnf", lnf, torch.bfloat16), ("dlnf", dlnf, torch.bfloat16),
                           ("dwte", dwte, torch.bfloat16), ("losses", losses, torch.float32),
                           ("targets", targets, torch.int64)):
        _check(op, name, t, dtype)
    if tuple(dwte.shape) != (Vp, C) or lnf.shape[-1] != C or tuple(dlnf.shape) != tuple(lnf.shape):
        raise ValueError(f"{op}: lnf {tuple(lnf.shape)}, dlnf {tuple(dlnf.shape)} and dwte "
                         f"{tuple(dwte.shape)} must be (..., C={C}), the same, and (Vp={Vp}, C)")
    x, dx = lnf.view(-1, C), dlnf.view(-1, C)
    loss_rows, target_rows = losses.view(-1), targets.view(-1)
    N = x.shape[0]
    if loss_rows.numel() != N or target_rows.numel() != N:
        raise ValueError(f"{op}: losses {tuple(losses.shape)} and targets {tuple(targets.shape)} "
                         f"must hold one entry per row of lnf ({N})")
    for start in range(0, N, R):
        stop = min(start + R, N)
        chunk = logits[:stop - start]  # the scratch's first rows: contiguous, 16-byte aligned
        matmuls.forward(chunk, x[start:stop], wte, None)
        fused_classifier(chunk, loss_rows[start:stop], target_rows[start:stop], vocab_size, dloss, one_pass)
        if dloss != 0:
            matmuls.backward(dx[start:stop], dwte, None, chunk, x[start:stop], wte)
