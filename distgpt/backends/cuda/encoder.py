"""Token + position embedding on our kernels (kernels/encoder.cu).

encoder_forward overwrites `out`; encoder_backward ACCUMULATES into dwte and dwpe. The dwte
scatter is deterministic without atomics: the flattened tokens are sorted with a stable sort into
buffers planned once, and the kernel's warp at the head of each run of equal tokens sums that
run's dout rows in position order and adds them into the token's row (see encoder.cu)."""
import numpy as np
import torch

from distgpt.backends.cuda.runtime import KernelModule, check_tensor, ceil_div, i32, ptr

THREADS = 256
ENC_WARPS = 4  # sorted positions (warps) per block of the dwte kernel
KERNELS = KernelModule("encoder", ENC_WARPS=ENC_WARPS)


def sort_buffer_bytes(BT):
    """The sort's input and outputs for steps up to B*T tokens: int32 tokens and sorted tokens,
    int64 positions."""
    return BT * (4 + 4 + 8)


def _check_shapes(op, C, T, wte, wpe, tokens):
    if C % 8:
        raise ValueError(f"{op}: C={C} must be a multiple of 8 (16-byte bf16 vectors)")
    if wte.dim() != 2 or wte.shape[1] != C or wpe.dim() != 2 or wpe.shape[1] != C:
        raise ValueError(f"{op}: wte {tuple(wte.shape)} and wpe {tuple(wpe.shape)} must both be (*, C={C})")
    if T > wpe.shape[0]:
        raise ValueError(f"{op}: T={T} exceeds the {wpe.shape[0]} positions of wpe")
    if tokens.dim() != 2:
        raise ValueError(f"{op}: tokens must be (B, T), got {tuple(tokens.shape)}")


def encoder_forward(out, tokens, wte, wpe):
    """out (B,T,C) = wte[tokens] + wpe[:T]; tokens (B,T) int64 on the GPU. A token outside
    [0, Vp) traps in the kernel (a launch failure), never a read outside wte."""
    op = "encoder_forward"
    B, T = tokens.shape
    C = wte.shape[1]
    _check_shapes(op, C, T, wte, wpe, tokens)
    for name, t in (("out", out), ("wte", wte), ("wpe", wpe)):
        check_tensor(op, name, t)
    check_tensor(op, "tokens", tokens, torch.int64)
    if out.shape != (B, T, C):
        raise ValueError(f"{op}: out {tuple(out.shape)} must be (B, T, C) = {(B, T, C)}")
    if B * T == 0:
        return
    n8 = B * T * C // 8
    KERNELS.launch("encoder_forward_kernel", ceil_div(n8, THREADS), THREADS,
                   (ptr(out), ptr(tokens), ptr(wte), ptr(wpe), i32(B * T), i32(T), i32(C), np.int64(wte.shape[0])))


class EncoderGradients:
    """encoder_backward and the sort buffers it plans once, for steps up to B*T tokens."""

    def __init__(self, BT, device):
        self.BT = BT
        self.tokens32 = torch.empty(BT, dtype=torch.int32, device=device)
        self.sorted = torch.empty(BT, dtype=torch.int32, device=device)
        self.order = torch.empty(BT, dtype=torch.int64, device=device)

    @property
    def nbytes(self):
        return self.tokens32.nbytes + self.sorted.nbytes + self.order.nbytes

    def backward(self, dwte, dwpe, dout, tokens):
        """dwte (Vp,C) += the scatter of dout (B,T,C) by token; dwpe[:T] += dout summed over B."""
        op = "encoder_backward"
        B, T, C = dout.shape
        _check_shapes(op, C, T, dwte, dwpe, tokens)
        for name, t in (("dwte", dwte), ("dwpe", dwpe), ("dout", dout)):
            check_tensor(op, name, t)
        check_tensor(op, "tokens", tokens, torch.int64)
        if tokens.shape != (B, T):
            raise ValueError(f"{op}: tokens {tuple(tokens.shape)} must be (B, T) = {(B, T)} like dout")
        BT = B * T
        if BT > self.BT:
            raise RuntimeError(f"{op}: B*T={BT} exceeds the planned {self.BT}; plan for the largest batch")
        if BT == 0:
            return
        # a stable sort keeps equal tokens in position order: the order the kernel adds their rows
        # in. Sorting int32 keys takes half the radix passes of int64 (tokens < Vp < 2^31; the
        # forward already trapped on any token outside [0, Vp)).
        tokens32, sorted_tokens, order = self.tokens32[:BT], self.sorted[:BT], self.order[:BT]
        tokens32.copy_(tokens.view(-1))
        torch.sort(tokens32, stable=True, out=(sorted_tokens, order))
        C8 = C // 8
        KERNELS.launch("encoder_backward_wpe_kernel", ceil_div(T * C8, THREADS), THREADS,
                       (ptr(dwpe), ptr(dout), i32(B), i32(T), i32(C)))
        KERNELS.launch("encoder_backward_wte_kernel", (ceil_div(BT, ENC_WARPS), ceil_div(C8, 32)), ENC_WARPS * 32,
                       (ptr(dwte), ptr(dout), ptr(sorted_tokens), ptr(order), i32(BT), i32(C),
                        np.int64(dwte.shape[0])))
