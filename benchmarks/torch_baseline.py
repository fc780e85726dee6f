"""The PyTorch baseline distgpt is measured against: a nanoGPT-style GPT-2 with torch.compile,
bf16 autocast over fp32 weights, flash scaled-dot-product attention and fused AdamW. Written
for this repo; prints one JSON line with the same fields as `distgpt bench --json`."""
import argparse
import json
import math
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = {"gpt2_124m": (12, 12, 768), "gpt2_350m": (24, 16, 1024), "gpt2_774m": (36, 20, 1280),
          "gpt2_1558m": (48, 25, 1600)}
V, VP, MAX_T = 50257, 50304, 1024


class Block(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.NH, C // self.NH).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, L, NH, C):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VP, C), nn.Embedding(MAX_T, C)
        self.blocks = nn.ModuleList(Block(C, NH) for _ in range(L))
        self.ln_f = nn.LayerNorm(C)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * L) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe.weight[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()  # tied lm head
        return F.cross_entropy(logits[..., :V].float().reshape(-1, V), targets.reshape(-1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2_124m")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    L, NH, C = SHAPES[a.model]
    torch.manual_seed(0)
    model = GPT(L, NH, C).cuda()
    num_params = sum(p.numel() for p in model.parameters()) - (VP - V) * C
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    step_fn = torch.compile(model)
    x = torch.randint(0, V, (a.batch, a.seq), device="cuda")
    y = torch.randint(0, V, (a.batch, a.seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        losses.append(loss.item())
        if i >= a.warmup:
            times.append(start.elapsed_time(end) / 1000)
    free, total = torch.cuda.mem_get_info()
    print(json.dumps({"impl": "pytorch", "model": a.model, "B": a.batch, "T": a.seq, "recompute": 0,
                      "step_s": statistics.median(times), "steps": a.steps, "num_params": num_params,
                      "n_layer": L, "n_embd": C, "device_used_gb": (total - free) / 1e9,
                      "torch_peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                      "first_loss": losses[0], "last_loss": losses[-1]}))


if __name__ == "__main__":
    main()
