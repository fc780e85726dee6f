"""The whole GPT-2 forward and hand-written backward against autograd of a plain PyTorch GPT-2,
in float64 on the CPU; and the parameter table against GPT-2's published sizes."""
import pytest
import torch

from distgpt.backends import reference
from distgpt.config import ModelConfig, load_config
from distgpt.model.gpt2 import GPT2
from distgpt.model.layout import ParameterLayout
from plain_gpt2 import plain_gpt2_loss

# float64 end to end: the two computations differ only in summation order, ~1e-15 relative;
# 1e-9 leaves six orders of margin and still catches any wrong term (those are >= 1e-3)
RTOL_F64 = 1e-9


def small_model(recompute=0, B=2, T=16, dtype=torch.float64):
    cfg = ModelConfig(name="t", n_layer=2, n_head=4, n_embd=32, vocab_size=101,
                      padded_vocab_size=128, block_size=32)
    model = GPT2(cfg, reference, B, T, dtype=dtype, recompute=recompute)
    model.init_weights(seed=torch.randint(0, 2**31, ()).item())
    # GPT-2's init leaves biases at 0 and layernorms at 1, which would hide errors in their
    # gradients: perturb everything except the padded vocabulary rows
    noise = torch.randn_like(model.params) * 0.05
    model.params += noise
    model.p["transformer.wte.weight"][cfg.vocab_size:] = 0
    return cfg, model


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("recompute", [0, 1, 2])
def test_loss_and_every_gradient_match_autograd(recompute):
    cfg, model = small_model(recompute)
    B, T = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    targets = torch.randint(0, cfg.vocab_size, (B, T))
    model.zero_grad()
    loss = model.forward(tokens, targets, dloss=1.0 / (B * T))
    model.backward()

    named = {n: t.detach().clone().requires_grad_(True) for n, t in model.p.items()}
    expected = plain_gpt2_loss(named, tokens, targets, cfg.n_layer, cfg.n_head, cfg.vocab_size)
    expected.backward()
    assert abs(loss.item() - expected.item()) <= RTOL_F64 * expected.item()
    for name, ref in named.items():
        err = relative_error(model.g[name], ref.grad)
        assert err <= RTOL_F64, f"{name}: relative error {err:.3e} > {RTOL_F64}"
    # padded vocabulary rows get no gradient at all
    assert model.g["transformer.wte.weight"][cfg.vocab_size:].abs().max().item() == 0.0


def test_gradients_accumulate_across_micro_batches():
    cfg, model = small_model()
    B, T = 2, 16
    batches = [(torch.randint(0, cfg.vocab_size, (B, T)), torch.randint(0, cfg.vocab_size, (B, T)))
               for _ in range(2)]
    model.zero_grad()
    for x, y in batches:
        model.forward(x, y, dloss=1.0 / (2 * B * T))
        model.backward()
    named = {n: t.detach().clone().requires_grad_(True) for n, t in model.p.items()}
    total = sum(plain_gpt2_loss(named, x, y, cfg.n_layer, cfg.n_head, cfg.vocab_size)
                for x, y in batches) / 2
    total.backward()
    for name, ref in named.items():
        assert relative_error(model.g[name], ref.grad) <= RTOL_F64, name


def test_forward_on_a_smaller_view_matches_a_model_planned_for_it():
    cfg, model = small_model(B=4, T=16)
    small = GPT2(cfg, reference, 1, 5, dtype=torch.float64)
    small.params.copy_(model.params)
    tokens = torch.randint(0, cfg.vocab_size, (1, 5))
    model.forward(tokens)
    small.forward(tokens)
    assert torch.equal(model.logits, small.logits)


@pytest.mark.parametrize("preset,count", [("gpt2_124m", 124_439_808), ("gpt2_350m", 354_823_168),
                                          ("gpt2_774m", 774_030_080), ("gpt2_1558m", 1_557_611_200)])
def test_presets_have_gpt2_parameter_counts(preset, count):
    m = load_config([f"model={preset}"]).model
    layout = ParameterLayout(m.n_layer, m.n_embd, m.vocab_size, m.padded_vocab_size, m.block_size)
    assert layout.num_parameters == count
    # every tensor starts 16-byte aligned and none overlaps the next in the buffer
    by_offset = sorted(layout.specs, key=lambda s: s.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        assert a.offset % 8 == 0 and a.offset + a.numel <= b.offset
    # tensors with weight decay come first, so AdamW needs one launch per kind
    assert [s.decay for s in by_offset] == sorted((s.decay for s in by_offset), reverse=True)


def test_layout_pads_to_a_multiple_of_the_world_size():
    for world in (1, 2, 3, 4, 8):
        layout = ParameterLayout(2, 32, 101, 128, 32, pad_multiple=world)
        assert layout.total % world == 0 and layout.total >= layout.used


def test_init_follows_gpt2():
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=64, vocab_size=1000, padded_vocab_size=1024)
    model = GPT2(cfg, reference, 1, 8, dtype=torch.float32)
    model.init_weights(seed=0)
    fc = model.p["transformer.h.0.mlp.c_fc.weight"]
    proj = model.p["transformer.h.0.mlp.c_proj.weight"]
    assert abs(fc.std().item() - 0.02) < 0.002
    assert abs(proj.std().item() - 0.02 / (2 * 4) ** 0.5) < 0.001
    assert model.p["transformer.h.1.ln_1.weight"].eq(1).all()
    assert model.p["transformer.h.1.attn.c_attn.bias"].eq(0).all()
    assert model.p["transformer.wte.weight"][1000:].eq(0).all()
    again = GPT2(cfg, reference, 1, 8, dtype=torch.float32)
    again.init_weights(seed=0)
    assert torch.equal(model.params, again.params)
