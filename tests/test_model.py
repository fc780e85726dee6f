"""The whole GPT-2 forward and hand-written backward against autograd of a plain PyTorch GPT-2,
in float64 on the CPU; and the parameter table against GPT-2's published sizes."""
import pytest
import torch

from distgpt.backends import reference
from distgpt.config import ModelConfig, load_config
from distgpt.model.gpt2 import GPT2
from distgpt.model import memory
from distgpt.model.layout import (CLASSIFIER_CHUNK_ROWS, ONES_PAD, ParameterLayout, activation_slots, pack_slots,
                                  with_ones_column)
from plain_gpt2 import plain_gpt2_loss

# float64 end to end: the two computations differ only in summation order, ~1e-15 relative;
# 1e-9 leaves six orders of margin and still catches any wrong term (those are >= 1e-3)
RTOL_F64 = 1e-9


# lm head chunk rows for the whole-model tests: the default (B*T = 32 rows, one chunk) and 20,
# which does not divide 32 (chunks of 20 and 12)
CHUNKS = [CLASSIFIER_CHUNK_ROWS, 20]


class OnesColumnReference:
    """The reference backend, taking the fc and qkv bias gradients from the weight-gradient
    products over the layernorm outputs' ones columns, as the CUDA backend does."""
    @staticmethod
    def takes_bias_column(tokens, C):
        return True

    def __getattr__(self, name):
        return getattr(reference, name)


def small_model(recompute=0, B=2, T=16, dtype=torch.float64, chunk_rows=CLASSIFIER_CHUNK_ROWS,
                recompute_layers=-1, n_layer=2, backend=reference):
    cfg = ModelConfig(name="t", n_layer=n_layer, n_head=4, n_embd=32, vocab_size=101,
                      padded_vocab_size=128, block_size=32)
    model = GPT2(cfg, backend, B, T, dtype=dtype, recompute=recompute,
                 classifier_chunk_rows=chunk_rows, recompute_layers=recompute_layers)
    model.init_weights(seed=torch.randint(0, 2**31, ()).item())
    # GPT-2's init leaves biases at 0 and layernorms at 1, which would hide errors in their
    # gradients: perturb everything except the padded vocabulary rows
    noise = torch.randn_like(model.params) * 0.05
    model.params += noise
    model.p["transformer.wte.weight"][cfg.vocab_size:] = 0
    return cfg, model


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("backend", [reference, OnesColumnReference()], ids=["column sums", "ones column"])
@pytest.mark.parametrize("chunk_rows", CHUNKS)
@pytest.mark.parametrize("recompute", [0, 1, 2])
def test_loss_and_every_gradient_match_autograd(recompute, chunk_rows, backend):
    cfg, model = small_model(recompute, chunk_rows=chunk_rows, backend=backend)
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


@pytest.mark.parametrize("recompute,layers", [(1, 1), (2, 1), (2, 0), (2, 3)])
def test_partial_recompute_gives_bitwise_the_gradients_of_keeping_everything(recompute, layers):
    """recompute_layers=N: the first N layers rebuild at the level, the others one level less;
    either way the rebuilt activations are the forward's bits, so every gradient equals
    recompute=0's exactly (float32, where a differently ordered sum would show)."""
    torch.manual_seed(5)
    cfg, model = small_model(recompute, dtype=torch.float32, recompute_layers=layers, n_layer=3)
    assert model.recompute_levels == tuple(recompute if i < layers else recompute - 1 for i in range(3))
    kept = GPT2(cfg, reference, 2, 16, dtype=torch.float32)
    kept.params.copy_(model.params)
    tokens, targets = (torch.randint(0, cfg.vocab_size, (2, 16)) for _ in range(2))
    for m in (model, kept):
        m.zero_grad()
        m.forward(tokens, targets, dloss=1.0 / 32)
        m.backward()
    assert torch.equal(model.grads, kept.grads)
    # the layers that keep an activation have their own buffer; the others share one
    names = {name for name, _, _ in model.acts.slots}
    for layer, level in enumerate(model.recompute_levels):
        assert (f"fch_gelu.{layer}" in names) == (level < 1)
        assert (f"ln1.{layer}" in names) == (f"ln2.{layer}" in names) == (level < 2)
    assert ("ln1" in names) == (max(model.recompute_levels) >= 2) and "fch_gelu" in names


def test_partial_recompute_plans_the_memory_between_the_two_levels():
    """1558M B=16: each layer that keeps its layernorm outputs costs 2 x (B, T, C) bf16, 100 MiB;
    recompute=2 in 20 of 48 layers plans 19 such pairs under recompute=1 (20 layers' own, less
    the pair the 20 share: 1.9 GiB, the 56 GB run) and 28 over recompute=2."""
    m = load_config(["model=gpt2_1558m"]).model

    def activations(recompute, layers=-1):
        rows = memory.estimate(m, 16, 1024, recompute, torch.bfloat16, 1, 1, recompute_layers=layers)
        return next(b for name, b in rows if name.startswith("activations"))

    per_layer = 2 * 16 * 1024 * 1600 * 2
    assert activations(2, 48) == activations(2) and activations(2, 0) == activations(1)
    assert activations(1) - activations(2, 20) == 19 * per_layer
    assert activations(2, 20) - activations(2) == 28 * per_layer


@pytest.mark.parametrize("chunk_rows", CHUNKS)
def test_gradients_accumulate_across_micro_batches(chunk_rows):
    cfg, model = small_model(chunk_rows=chunk_rows)
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


def test_zero_grad_without_matrices_zeroes_exactly_the_rest():
    """zero_grad(matrices=False) zeroes every gradient but the blocks' four matrices (and
    whatever alignment lies between those), which it leaves untouched."""
    cfg, model = small_model(n_layer=3)
    model.grads.copy_(torch.randn_like(model.grads).add_(5.0))  # no element is 0
    stale = model.grads.clone()
    model.zero_grad(matrices=False)
    matrices = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    for spec in model.layout.specs:
        grad = model.g[spec.name]
        if spec.name.startswith("transformer.h.") and spec.name.endswith(matrices):
            assert torch.equal(grad, stale[spec.offset:spec.offset + spec.numel].view(spec.shape)), spec.name
        else:
            assert grad.abs().max().item() == 0.0, spec.name
    kept = model.grads != 0
    assert kept.sum().item() == sum(s.numel for s in model.layout.specs if s.name.endswith(matrices))
    model.zero_grad()
    assert model.grads.abs().max().item() == 0.0


@pytest.mark.parametrize("recompute", [0, 2])
def test_writing_the_matrices_gradients_equals_zeroing_then_adding(recompute):
    """The trainer's step: zero_grad(matrices=False), then the first micro-step's backward writes
    the matrices' gradients and later ones add. Every gradient equals zero_grad() then adding,
    exactly (float32: 0 + x is x), over stale values that would show if any were read."""
    torch.manual_seed(11)
    cfg, model = small_model(recompute, dtype=torch.float32, n_layer=3)
    B, T = 2, 16
    batches = [(torch.randint(0, cfg.vocab_size, (B, T)), torch.randint(0, cfg.vocab_size, (B, T)))
               for _ in range(2)]

    def gradients(write_first):
        model.grads.copy_(torch.randn_like(model.grads))  # the last step's, as far as anyone knows
        model.zero_grad(matrices=not write_first)
        for i, (x, y) in enumerate(batches):
            model.forward(x, y, dloss=1.0 / (2 * B * T))
            model.backward(write_matrices=write_first and i == 0)
        return model.grads.clone()

    assert torch.equal(gradients(True), gradients(False))


@pytest.mark.parametrize("recompute", [0, 2])
def test_ones_columns_are_planned_once_and_never_overwritten(recompute):
    """With ones columns the layernorm outputs are views of C of C + ONES_PAD columns: column C
    holds ones and the rest zeros after forwards, backwards (where recompute rebuilds them) and a
    smaller view's forward; the estimate plans exactly the buffer the model allocates; and the
    keys' bias gradient stays exactly zero."""
    cfg, model = small_model(recompute, backend=OnesColumnReference(), n_layer=3)
    C = cfg.n_embd
    B, T = 2, 16
    model.zero_grad()
    for b, t in ((B, T), (1, 5)):
        tokens, targets = torch.randint(0, cfg.vocab_size, (2, b, t))
        model.forward(tokens, targets, dloss=1.0 / (b * t))
        model.backward()
    padded = [x for name, x in model.acts.view(B, T).items() if name.split(".")[0] in ("ln1", "ln2")]
    assert len(padded) == (2 if recompute == 2 else 2 * cfg.n_layer)
    for x in padded:
        assert x.shape == (B, T, C) and x.stride(-2) == C + ONES_PAD
        whole = with_ones_column(x)
        assert torch.equal(whole[..., C], torch.ones(B, T, dtype=x.dtype))
        assert whole[..., C + 1:].abs().max().item() == 0.0
    for layer in model.g_layers:
        assert layer.qkv_b[C:2 * C].abs().max().item() == 0.0
    _, elements = pack_slots(activation_slots(cfg.n_layer, C, cfg.n_head, cfg.padded_vocab_size, B, T, recompute,
                                              ones_column=True))
    assert model.acts.buffers[False].numel() == elements[False]
    _, plain = pack_slots(activation_slots(cfg.n_layer, C, cfg.n_head, cfg.padded_vocab_size, B, T, recompute))
    assert elements[False] - plain[False] == len(padded) * B * T * ONES_PAD


def test_forward_on_a_smaller_view_matches_a_model_planned_for_it():
    cfg, model = small_model(B=4, T=16)
    small = GPT2(cfg, reference, 1, 5, dtype=torch.float64)
    small.params.copy_(model.params)
    tokens = torch.randint(0, cfg.vocab_size, (1, 5))
    model.forward(tokens)
    small.forward(tokens)
    assert torch.equal(model.logits, small.logits)


def test_evaluation_forward_gives_token_losses_and_touches_no_gradient():
    cfg, model = small_model(chunk_rows=20)
    B, T = 2, 16
    tokens, targets = torch.randint(0, cfg.vocab_size, (B, T)), torch.randint(0, cfg.vocab_size, (B, T))
    model.grads.normal_()
    before = model.grads.clone()
    loss = model.forward(tokens, targets, dloss=0.0)
    assert torch.equal(model.grads, before), "dloss 0 must not touch the gradients"
    model.backward()  # after evaluation, a backward adds exact zeros
    assert torch.equal(model.grads, before)
    want = torch.empty(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):  # one position's loss: every other target ignored (-100)
            one = torch.full((1, T), -100)
            one[0, i] = targets[b, i]
            want[b, i] = plain_gpt2_loss(model.p, tokens[b:b + 1], one, cfg.n_layer, cfg.n_head,
                                         cfg.vocab_size)
    assert model.token_losses.shape == (B, T)
    assert relative_error(model.token_losses, want) <= RTOL_F64
    assert abs(loss.item() - want.mean().item()) <= RTOL_F64 * loss.item()


def test_logits_without_targets_only_up_to_one_chunk():
    """The (R, Vp) scratch holds R = max(T, chunk rows) rows, capped at B*T: a (1, T) forward
    always fits (sampling); more rows than R must say so, not write past the chunk."""
    cfg, model = small_model(B=4, T=16, chunk_rows=20)
    assert model.acts.view(4, 16)["logits"].shape == (20, cfg.padded_vocab_size)
    model.forward(torch.randint(0, cfg.vocab_size, (1, 16)))
    assert model.logits.shape == (1, 16, cfg.padded_vocab_size)
    with pytest.raises(ValueError, match="20 rows"):
        model.forward(torch.randint(0, cfg.vocab_size, (2, 16)))


def test_logits_slot_is_one_chunk_of_rows():
    """(R, Vp) with R = min(B*T, max(T, 8192)): B=8, T=1024 is one chunk, as the whole batch; the
    124M B=64 plan holds 8192 rows (0.8 GB in bf16, not 6.6 GB), and the estimate counts them."""
    m = load_config(["model=gpt2_124m"]).model

    def logits_shape(B, T):
        slots = activation_slots(m.n_layer, m.n_embd, m.n_head, m.padded_vocab_size, B, T, 0)
        return next(shape for name, shape, _ in slots if name == "logits")

    assert logits_shape(8, 1024) == (8192, 50304) and logits_shape(64, 1024) == (8192, 50304)
    assert logits_shape(1, 1024) == (1024, 50304) and logits_shape(4, 16) == (64, 50304)
    assert logits_shape(1, 16384) == (16384, 50304)  # at least T rows, whatever the chunk size
    rows = dict(memory.estimate(m, 64, 1024, 0, torch.bfloat16, 1, 1))
    planned = sum(rows.values())
    # the target: 124M at B=64 (recompute 0) within 25 GB measured; cuBLAS/cuDNN
    # workspaces and the CUDA context added ~1.3 GB on top of the plan when it was measured
    assert planned <= 23.5e9, f"planned {planned / 1e9:.2f} GB"


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
