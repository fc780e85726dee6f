"""The CUDA backend: the reference backend's functions, same names and arguments, over our
kernels (kernels/*.cu, one module per layer kind here), cuBLASLt matmuls and cuDNN attention.
bf16 parameters, activations and gradients; fp32 statistics, master weights and moments.

`plan(...)` reserves every kernel's scratch once, before the first step."""
import torch

if not torch.cuda.is_available():
    raise ModuleNotFoundError("no CUDA GPU is visible")

from distgpt.backends.cuda import attention, bias, encoder, layernorm, matmul, norm  # noqa: E402
from distgpt.backends.cuda.adamw import adamw_update  # noqa: E402,F401
from distgpt.backends.cuda.attention import attention_backward, attention_forward  # noqa: E402,F401
from distgpt.backends.cuda.classifier import (fused_classifier, lm_head_logits,  # noqa: E402,F401
                                              lm_head_loss)
from distgpt.backends.cuda.encoder import encoder_backward, encoder_forward  # noqa: E402,F401
from distgpt.backends.cuda.gelu import gelu_backward, gelu_forward  # noqa: E402,F401
from distgpt.backends.cuda.layernorm import (layernorm_backward, layernorm_forward,  # noqa: E402,F401
                                             residual_forward, residual_layernorm_forward)
from distgpt.backends.cuda.matmul import matmul_backward, matmul_forward  # noqa: E402,F401
from distgpt.backends.cuda.norm import clip_scale, global_norm_squared  # noqa: E402,F401


def plan(B, T, C, n_head, device):
    """Reserve every kernel's and library's scratch once, for steps up to (B, T) at width C.
    GELU, the classifier (its logits chunk is an activation slot) and AdamW need none."""
    encoder.plan(B, T, C, device)  # token sort buffers
    layernorm.plan(B, T, C, device)  # per-block dweight/dbias partials
    matmul.plan(B, T, C, device)  # cuBLASLt handle and workspace
    bias.plan(B, T, C, device)  # per-block bias-gradient partials
    attention.plan(B, T, C, n_head, device)  # cuDNN graphs for (B, T) and their workspace
    norm.plan(device)  # per-block squared-norm partials


def set_deterministic(flag):
    """deterministic=true: FlashAttention-2 with a deterministic backward instead of cuDNN's
    (whose dq adds with atomics). The matmuls are deterministic either way: one algorithm per
    plan, the heuristic's first (timing the candidates on the first call and keeping the fastest
    measured no faster, 2026-11-22, and would make the choice differ between runs)."""
    attention.set_deterministic_attention(flag)
