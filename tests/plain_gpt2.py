"""A plain PyTorch GPT-2 for tests: the textbook model with autograd, written independently of
distgpt's ops, reading its weights from distgpt's named parameter views. Its loss and its
autograd gradients are what the hand-written forward and backward must reproduce."""
import math

import torch
import torch.nn.functional as F


def plain_gpt2_loss(named, tokens, targets, n_layer, n_head, vocab_size):
    """Mean cross-entropy of GPT-2 over (B, T) tokens; `named` maps HF-style names to tensors."""
    B, T = tokens.shape
    wte = named["transformer.wte.weight"]
    x = wte[tokens] + named["transformer.wpe.weight"][:T]
    C = x.shape[-1]
    HS = C // n_head
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    for i in range(n_layer):
        w = lambda s: named[f"transformer.h.{i}.{s}"]  # noqa: E731
        h = F.layer_norm(x, (C,), w("ln_1.weight"), w("ln_1.bias"), eps=1e-5)
        qkv = h @ w("attn.c_attn.weight").t() + w("attn.c_attn.bias")
        q, k, v = qkv.split(C, dim=-1)
        q, k, v = (z.view(B, T, n_head, HS).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(HS)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ w("attn.c_proj.weight").t() + w("attn.c_proj.bias")
        h = F.layer_norm(x, (C,), w("ln_2.weight"), w("ln_2.bias"), eps=1e-5)
        h = F.gelu(h @ w("mlp.c_fc.weight").t() + w("mlp.c_fc.bias"), approximate="tanh")
        x = x + h @ w("mlp.c_proj.weight").t() + w("mlp.c_proj.bias")
    x = F.layer_norm(x, (C,), named["transformer.ln_f.weight"], named["transformer.ln_f.bias"], eps=1e-5)
    logits = x @ wte[:vocab_size].t()
    return F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))
