"""Each reference op against torch autograd in float64, on fresh random inputs.

Forward outputs are compared with the textbook formula; backward outputs with autograd of that
formula, including the accumulate (+=) / overwrite contract of each gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

from distgpt.backends import reference as ops

# float64: both sides differ only in rounding order (~1e-15); 1e-10 catches any wrong term
TOLERANCES = {"forward": 1e-10, "backward": 1e-10}
f64 = dict(dtype=torch.float64)


def check(name, got, want, kind):
    err = ((got - want).norm() / want.norm().clamp_min(1e-300)).item()
    assert err <= TOLERANCES[kind], f"{name}: relative error {err:.3e} over {TOLERANCES[kind]:.0e}"


def poisoned(*shape):
    return torch.full(shape, float("nan"), **f64)


@pytest.mark.parametrize("B,T,C,Vp", [(2, 5, 8, 16), (3, 7, 12, 24)])
def test_encoder(B, T, C, Vp):
    tokens = torch.randint(0, Vp - 3, (B, T))
    tokens[0, :2] = tokens[1, 0]  # repeated tokens must add their gradients
    wte = torch.randn(Vp, C, **f64, requires_grad=True)
    wpe = torch.randn(T + 3, C, **f64, requires_grad=True)
    out = poisoned(B, T, C)
    ops.encoder_forward(out, tokens, wte.detach(), wpe.detach())
    want = wte[tokens] + wpe[:T]
    check("encoder out", out, want, "forward")
    dout = torch.randn(B, T, C, **f64)
    want.backward(dout)
    dwte, dwpe = torch.randn(Vp, C, **f64), torch.randn(T + 3, C, **f64)  # prior contents
    dwte0, dwpe0 = dwte.clone(), dwpe.clone()
    ops.encoder_backward(dwte, dwpe, dout, tokens)
    check("dwte", dwte - dwte0, wte.grad, "backward")
    check("dwpe", dwpe - dwpe0, wpe.grad, "backward")


@pytest.mark.parametrize("B,T,C", [(2, 3, 16), (1, 9, 40)])
def test_layernorm(B, T, C):
    x = torch.randn(B, T, C, **f64, requires_grad=True)
    w = torch.randn(C, **f64, requires_grad=True)
    b = torch.randn(C, **f64, requires_grad=True)
    out, mean, rstd = poisoned(B, T, C), poisoned(B, T), poisoned(B, T)
    ops.layernorm_forward(out, mean, rstd, x.detach(), w.detach(), b.detach())
    want = F.layer_norm(x, (C,), w, b, eps=ops.LAYERNORM_EPS)
    check("ln out", out, want, "forward")
    check("ln mean", mean, x.detach().mean(-1), "forward")
    check("ln rstd", rstd, 1 / torch.sqrt(x.detach().var(-1, unbiased=False) + ops.LAYERNORM_EPS), "forward")
    dout = torch.randn(B, T, C, **f64)
    want.backward(dout)
    dx, dw, db = (torch.randn_like(t.detach()) for t in (x, w, b))
    dx0, dw0, db0 = dx.clone(), dw.clone(), db.clone()
    ops.layernorm_backward(dx, dw, db, dout, x.detach(), w.detach(), mean, rstd)
    check("ln dinp (+=)", dx - dx0, x.grad, "backward")
    check("ln dweight", dw - dw0, w.grad, "backward")
    check("ln dbias", db - db0, b.grad, "backward")


def test_layernorm_writing_its_fp8_cast():
    """An e4m3 out (fp8_layernorm_cast): the layernorm's output in inp's dtype, scaled and
    saturated into e4m3 exactly as fp8_quantize casts it, amax merged with max |output| (as the
    bf16 form's), and mean and rstd as the bf16 form saves them."""
    B, T, C = 2, 5, 32
    x = torch.randn(B, T, C, **f64) * 3
    w, b = torch.randn(C, **f64), torch.randn(C, **f64)
    out, mean, rstd = poisoned(B, T, C), poisoned(B, T), poisoned(B, T)
    amax = torch.tensor([0.5], dtype=torch.float32)
    ops.layernorm_forward(out, mean, rstd, x, w, b, amax=amax)
    for scale in (8.0, 2.0 ** 12):  # 2^12: most values saturate at 448
        want8, want_amax = torch.empty(B, T, C, dtype=torch.float8_e4m3fn), torch.zeros(1)
        ops.fp8_quantize(want8, want_amax, out, torch.tensor([scale]))
        out8, mean8, rstd8 = torch.empty(B, T, C, dtype=torch.float8_e4m3fn), poisoned(B, T), poisoned(B, T)
        amax8 = torch.tensor([0.5], dtype=torch.float32)
        ops.layernorm_forward(out8, mean8, rstd8, x, w, b, amax=amax8, scale=torch.tensor([scale]))
        assert torch.equal(out8.view(torch.uint8), want8.view(torch.uint8))
        assert torch.equal(mean8, mean) and torch.equal(rstd8, rstd) and torch.equal(amax8, amax)
        assert float(amax8) == float(out.abs().max().float()) > 0.5
    assert (out8.float().abs() == 448).float().mean() > 0.5 and not out8.float().isnan().any()


@pytest.mark.parametrize("B,T,C", [(2, 3, 16), (1, 9, 40)])
def test_layernorm_backward_takes_the_projection_bias_gradient(B, T, C):
    """r = x + (y @ W^T + b) feeds both ln(r) and the residual stream above: with dinp holding
    the stream's gradient d_above, the layernorm backward's dproj_bias is autograd's b.grad."""
    x, y = torch.randn(B, T, C, **f64), torch.randn(B, T, C, **f64)
    W, w, ln_b = torch.randn(C, C, **f64), torch.randn(C, **f64), torch.randn(C, **f64)
    b = torch.randn(C, **f64, requires_grad=True)
    r = x + y @ W.t() + b
    out = F.layer_norm(r, (C,), w, ln_b, eps=ops.LAYERNORM_EPS)
    dout, d_above = torch.randn(B, T, C, **f64), torch.randn(B, T, C, **f64)
    ((out * dout).sum() + (r * d_above).sum()).backward()
    mean, rstd = poisoned(B, T), poisoned(B, T)
    ops.layernorm_forward(poisoned(B, T, C), mean, rstd, r.detach(), w, ln_b)
    dinp, dw, dlb = d_above.clone(), torch.zeros(C, **f64), torch.zeros(C, **f64)
    dproj_bias = torch.randn(C, **f64)
    before = dproj_bias.clone()
    ops.layernorm_backward(dinp, dw, dlb, dout, r.detach(), w, mean, rstd, dproj_bias=dproj_bias)
    check("dproj_bias (+=)", dproj_bias - before, b.grad, "backward")
    without = d_above.clone()
    ops.layernorm_backward(without, torch.zeros(C, **f64), torch.zeros(C, **f64), dout, r.detach(), w,
                           mean, rstd)
    assert torch.equal(without, dinp), "dproj_bias must not change the residual gradient"


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("B,T,C,OC", [(2, 3, 8, 24), (1, 5, 16, 4)])
def test_matmul(B, T, C, OC, with_bias):
    x = torch.randn(B, T, C, **f64, requires_grad=True)
    w = torch.randn(OC, C, **f64, requires_grad=True)
    b = torch.randn(OC, **f64, requires_grad=True) if with_bias else None
    out = poisoned(B, T, OC)
    ops.matmul_forward(out, x.detach(), w.detach(), None if b is None else b.detach())
    want = F.linear(x, w, b)
    check("matmul out", out, want, "forward")
    dout = torch.randn(B, T, OC, **f64)
    want.backward(dout)
    dx = torch.randn(B, T, C, **f64)  # overwritten
    dw = torch.randn(OC, C, **f64)
    dw0 = dw.clone()
    db = torch.randn(OC, **f64) if with_bias else None
    db0 = None if db is None else db.clone()
    ops.matmul_backward(dx, dw, db, dout, x.detach(), w.detach())
    check("matmul dinp (=)", dx, x.grad, "backward")
    check("matmul dweight (+=)", dw - dw0, w.grad, "backward")
    if with_bias:
        check("matmul dbias (+=)", db - db0, b.grad, "backward")


def test_matmul_with_residual():
    """A projection that writes the residual sum: out = x @ w^T + b + residual, and the residual's
    gradient is out's (the model's residual stream carries it on unchanged)."""
    x = torch.randn(2, 3, 8, **f64, requires_grad=True)
    w = torch.randn(12, 8, **f64, requires_grad=True)
    b = torch.randn(12, **f64, requires_grad=True)
    residual = torch.randn(2, 3, 12, **f64, requires_grad=True)
    out = poisoned(2, 3, 12)
    ops.matmul_forward(out, x.detach(), w.detach(), b.detach(), residual=residual.detach())
    want = F.linear(x, w, b) + residual
    check("matmul + residual out", out, want, "forward")
    dout = torch.randn(2, 3, 12, **f64)
    want.backward(dout)
    check("the residual's gradient is out's", dout, residual.grad, "backward")


def test_matmul_with_gelu():
    """The MLP's fused forms: fc writes its pre-activation and gelu of it; the fc projection's
    backward hands back the gradient of that pre-activation (through gelu')."""
    B, T, C = 2, 3, 8
    x = torch.randn(B, T, C, **f64, requires_grad=True)
    w_fc = torch.randn(4 * C, C, **f64, requires_grad=True)
    b_fc = torch.randn(4 * C, **f64, requires_grad=True)
    w_proj = torch.randn(C, 4 * C, **f64, requires_grad=True)
    b_proj = torch.randn(C, **f64, requires_grad=True)
    pre, act = poisoned(B, T, 4 * C), poisoned(B, T, 4 * C)
    ops.matmul_forward(pre, x.detach(), w_fc.detach(), b_fc.detach(), gelu_out=act)
    want_pre = F.linear(x, w_fc, b_fc)
    want_pre.retain_grad()
    want_act = F.gelu(want_pre, approximate="tanh")
    check("fc pre-activation", pre, want_pre, "forward")
    check("fc gelu", act, want_act, "forward")
    y = F.linear(want_act, w_proj, b_proj)
    dout = torch.randn(B, T, C, **f64)
    y.backward(dout)
    dpre = poisoned(B, T, 4 * C)
    dw, db = torch.zeros(C, 4 * C, **f64), torch.zeros(C, **f64)
    ops.matmul_backward(dpre, dw, db, dout, act, w_proj.detach(), gelu_inp=pre)
    check("fcproj dgelu input (=)", dpre, want_pre.grad, "backward")
    check("fcproj dweight", dw, w_proj.grad, "backward")
    check("fcproj dbias", db, b_proj.grad, "backward")


@pytest.mark.parametrize("B,T,NH,HS", [(2, 6, 2, 4), (1, 11, 3, 8)])
def test_attention(B, T, NH, HS):
    C = NH * HS
    qkv = torch.randn(B, T, 3 * C, **f64, requires_grad=True)
    out, lse = poisoned(B, T, C), poisoned(B, NH, T)
    ops.attention_forward(out, lse, qkv.detach(), NH)
    q, k, v = (z.view(B, T, NH, HS).transpose(1, 2) for z in qkv.split(C, dim=-1))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    check("attention out", out, want, "forward")
    scores = (q @ k.transpose(-2, -1)).detach() / math.sqrt(HS)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    check("attention lse", lse, torch.logsumexp(scores, -1), "forward")
    dout = torch.randn(B, T, C, **f64)
    want.backward(dout)
    dqkv = poisoned(B, T, 3 * C)
    ops.attention_backward(dqkv, dout, qkv.detach(), out, lse, NH)
    check("attention dqkv", dqkv, qkv.grad, "backward")


@pytest.mark.parametrize("B,T,NH,HS", [(2, 7, 3, 4), (1, 1, 2, 8)])
def test_qkv_bias_backward(B, T, NH, HS):
    """The qkv bias gradient from dq's column sums, zero for the keys and the attention
    projection's column sums through its weight for the values, against autograd through
    qkv = x @ W^T + b -> causal attention -> atty @ Wp^T + bp."""
    C = NH * HS
    x = torch.randn(B, T, C, **f64)
    w, wp = torch.randn(3 * C, C, **f64), torch.randn(C, C, **f64)
    b = torch.randn(3 * C, **f64, requires_grad=True)
    qkv = F.linear(x, w, b)
    q, k, v = (z.view(B, T, NH, HS).transpose(1, 2) for z in qkv.split(C, dim=-1))
    atty = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    dres = torch.randn(B, T, C, **f64)
    F.linear(atty, wp).backward(dres)
    out, lse = poisoned(B, T, C), poisoned(B, NH, T)
    ops.attention_forward(out, lse, qkv.detach(), NH)
    dqkv = poisoned(B, T, 3 * C)
    ops.attention_backward(dqkv, dres @ wp, qkv.detach(), out, lse, NH)
    db0 = torch.randn(3 * C, **f64)
    db = db0.clone()
    ops.qkv_bias_backward(db, dqkv, dres.reshape(-1, C).sum(dim=0), wp)
    check("qkv dbias (+=)", db - db0, b.grad, "backward")
    assert b.grad[C:2 * C].abs().max() < 1e-9, "autograd's key-bias gradient is zero too"


def test_layernorm_backward_hands_over_the_projection_sums():
    """dproj_sum = exactly what dproj_bias gained."""
    N, C = 6, 8
    inp, dout, w = (torch.randn(N, C, **f64) for _ in range(3))
    w = w[0]
    mean, rstd = inp.mean(-1), torch.rsqrt(inp.var(-1, unbiased=False) + 1e-5)
    dinp, dw, db, dproj = torch.randn(N, C, **f64), torch.zeros(C, **f64), torch.zeros(C, **f64), torch.randn(C, **f64)
    before, sums = dproj.clone(), poisoned(C)
    ops.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, dproj_bias=dproj, dproj_sum=sums)
    assert torch.equal(sums, dinp.sum(dim=0))
    check("dproj_bias gained dproj_sum", dproj - before, sums, "backward")


def test_fp8_gelu_quantize_transpose():
    """fc's output gradient straight into fp8 (the fp8 recipe's fused pass): gelu' of the
    pre-activation times the fc projection's input-gradient product, against autograd of the
    tanh GELU; cast with the given power-of-two scale (so the fp8 values are the gradient's own
    rounded to e4m3: within 2^-4 relative, or e4m3's smallest step near 0), the transpose the
    same bytes, amax the gradient's, and the bias gradient added to what dbias held."""
    R, C = 6, 16
    pre = (torch.randn(R, C, **f64) * 3).requires_grad_(True)
    g = torch.randn(R, C, **f64)
    F.gelu(pre, approximate="tanh").backward(g)
    want = pre.grad
    scale = torch.tensor([8.0])
    out, out_t = torch.empty(R, C, dtype=torch.float8_e4m3fn), torch.empty(C, R, dtype=torch.float8_e4m3fn)
    amax, dbias = torch.zeros(1), torch.full((C,), 0.5, **f64)
    ops.fp8_gelu_quantize_transpose(out, out_t, amax, dbias, g, pre.detach(), scale)
    got = ops.fp8_dequantize(out, scale)
    assert torch.all((got - want).abs() <= 2.0 ** -4 * want.abs() + 2.0 ** -9 / 8)
    assert torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))
    assert math.isclose(float(amax), float(want.abs().max()), rel_tol=1e-6)
    assert torch.allclose(dbias, 0.5 + want.sum(dim=0), rtol=1e-12, atol=1e-12)


def test_fp8_matmul_forward_writes_the_gelu_output_in_fp8():
    """fc with its GELU output in fp8 (the fp8 recipe's forward): the pre-activation is the
    dequantized product plus the bias, and the fp8 output is F.gelu (tanh) of that, times the
    given power-of-two scale, rounded to e4m3 (within 2^-4 relative, or e4m3's smallest step near
    0) and saturated at 448 where the scale pushes it past (no NaN); amax is the GELU output's."""
    N, C, OC = 12, 16, 32
    x8 = (torch.randn(N, C, **f64) * 8).to(torch.float8_e4m3fn)
    w8 = (torch.randn(OC, C, **f64) * 8).to(torch.float8_e4m3fn)
    x_inv, w_inv, bias = torch.tensor([2.0 ** -3]), torch.tensor([2.0 ** -5]), torch.randn(OC, **f64)
    pre, g8 = poisoned(N, OC), torch.empty(N, OC, dtype=torch.float8_e4m3fn)
    want_pre = (x8.double() / 8) @ (w8.double() / 32).t() + bias
    want = F.gelu(want_pre, approximate="tanh")
    scale = torch.zeros(1)
    ops.fp8_scale(scale, torch.tensor([float(want.abs().max()) / 4]), "e4m3")  # the largest saturate
    amax = torch.full((1,), float("nan"))
    ops.fp8_matmul_forward(pre, x8, x_inv, w8, w_inv, bias, gelu_out=g8, gelu_scale=scale, gelu_amax=amax)
    check("fp8 fc pre-activation", pre, want_pre, "forward")
    got, limit = ops.fp8_dequantize(g8, scale), ops.fp8_max("e4m3") / float(scale)
    inside = want.abs() <= limit
    assert (~inside).any() and inside.any()
    assert torch.all((got - want)[inside].abs() <= 2.0 ** -4 * want[inside].abs() + 2.0 ** -9 / float(scale))
    assert torch.equal(got[~inside], want[~inside].sign() * limit)
    assert math.isclose(float(amax), float(want.abs().max()), rel_tol=1e-6)
    with pytest.raises(ValueError, match="gelu_scale and gelu_amax"):
        ops.fp8_matmul_forward(pre, x8, x_inv, w8, w_inv, bias, gelu_out=g8)


def test_fp8_transpose():
    x = (torch.randn(6, 16, **f64) * 50).to(torch.float8_e5m2)
    out_t = torch.empty(16, 6, dtype=torch.float8_e5m2)
    ops.fp8_transpose(out_t, x)
    assert torch.equal(out_t.view(torch.uint8), x.view(torch.uint8).t())
    with pytest.raises(ValueError, match="float8 tensors of one format"):
        ops.fp8_transpose(out_t.view(torch.float8_e4m3fn), x)


def test_gelu():
    x = torch.randn(3, 5, 16, **f64, requires_grad=True) * 3
    x.retain_grad()
    out = poisoned(3, 5, 16)
    ops.gelu_forward(out, x.detach())
    want = F.gelu(x, approximate="tanh")
    check("gelu out", out, want, "forward")
    dout = torch.randn(3, 5, 16, **f64)
    want.backward(dout)
    d = dout.clone()
    ops.gelu_backward(d, x.detach(), d)  # in place, as the model calls it
    check("gelu dinp", d, x.grad, "backward")


@pytest.mark.parametrize("V,Vp", [(50, 64), (37, 37)])
def test_fused_classifier(V, Vp):
    B, T = 2, 5
    logits = torch.randn(B, T, Vp, **f64, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    dloss = 1.0 / (B * T)
    buf, losses = logits.detach().clone(), poisoned(B, T)
    ops.fused_classifier(buf, losses, targets, V, dloss)
    per_token = F.cross_entropy(logits[..., :V].reshape(-1, V), targets.reshape(-1), reduction="none")
    check("losses", losses.reshape(-1), per_token, "forward")
    (per_token.sum() * dloss).backward()
    check("dlogits (in place)", buf, logits.grad, "backward")
    assert buf[..., V:].abs().sum().item() == 0.0


def lm_head_inputs(B, T, C, V, Vp):
    """lnf, wte (padding rows random too: the op must ignore them), targets at both vocab ends."""
    lnf = torch.randn(B, T, C, **f64, requires_grad=True)
    wte = torch.randn(Vp, C, **f64, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    targets.view(-1)[0], targets.view(-1)[-1] = 0, V - 1
    return lnf, wte, targets


# 12 rows: 5 rows a chunk does not divide them (5, 5, 2), 12 is exactly one chunk, and a scratch
# of 16 rows holds more than the step has (a smaller (b, t) view of a bigger plan)
@pytest.mark.parametrize("R", [5, 12, 16])
@pytest.mark.parametrize("V,Vp", [(50, 64), (37, 37)])
def test_lm_head_loss_in_chunks(R, V, Vp):
    B, T, C = 3, 4, 8
    lnf, wte, targets = lm_head_inputs(B, T, C, V, Vp)
    dloss = 1.0 / (B * T)
    losses, dlnf, scratch = poisoned(B, T), poisoned(B, T, C), poisoned(R, Vp)
    dwte = torch.randn(Vp, C, **f64)  # prior contents: the gradient accumulates
    dwte0 = dwte.clone()
    ops.lm_head_loss(losses, dlnf, dwte, lnf.detach(), wte.detach(), targets, V, dloss, scratch)
    per_token = F.cross_entropy((lnf @ wte[:V].t()).reshape(-1, V), targets.reshape(-1), reduction="none")
    check("lm head losses", losses.reshape(-1), per_token, "forward")
    (per_token.sum() * dloss).backward()
    check("lm head dlnf (=)", dlnf, lnf.grad, "backward")
    check("lm head dwte (+=)", dwte - dwte0, wte.grad, "backward")
    assert torch.equal(dwte[V:], dwte0[V:]), "padded vocabulary rows must get exactly no gradient"


def test_lm_head_loss_with_dloss_zero_computes_losses_only():
    B, T, C, V, Vp = 2, 5, 8, 50, 64
    lnf, wte, targets = lm_head_inputs(B, T, C, V, Vp)
    losses, dlnf, dwte = poisoned(B, T), torch.randn(B, T, C, **f64), torch.randn(Vp, C, **f64)
    dlnf0, dwte0 = dlnf.clone(), dwte.clone()
    ops.lm_head_loss(losses, dlnf, dwte, lnf.detach(), wte.detach(), targets, V, 0.0, poisoned(3, Vp))
    per_token = F.cross_entropy((lnf @ wte[:V].t()).reshape(-1, V), targets.reshape(-1), reduction="none")
    check("lm head losses (dloss 0)", losses.reshape(-1), per_token.detach(), "forward")
    assert torch.equal(dlnf, dlnf0) and torch.equal(dwte, dwte0), "dloss 0 must leave dlnf, dwte untouched"


def test_lm_head_logits():
    lnf, wte = torch.randn(2, 3, 8, **f64), torch.randn(24, 8, **f64)
    out = poisoned(2, 3, 24)
    ops.lm_head_logits(out, lnf, wte)
    check("lm head logits", out, lnf @ wte.t(), "forward")


def test_adamw_matches_torch_adamw_with_and_without_master():
    n, steps = 64, 5
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    start = torch.randn(n, **f64)
    ref = torch.nn.Parameter(start.clone())
    torch_opt = torch.optim.AdamW([ref], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    ours = start.clone()
    m, v = torch.zeros(n, **f64), torch.zeros(n, **f64)
    # master variant: a float32 working copy updated from a float64 master
    master, working = start.clone(), start.float()
    m2, v2 = torch.zeros(n, **f64), torch.zeros(n, **f64)
    for step in range(1, steps + 1):
        g = torch.randn(n, **f64)
        ref.grad = g.clone()
        torch_opt.step()
        ops.adamw_update(ours, g, m, v, None, lr, b1, b2, eps, wd, step, 1.0)
        ops.adamw_update(working, g.float(), m2, v2, master, lr, b1, b2, eps, wd, step, 1.0)
    # torch computes p*(1 - lr*wd) - lr*update, ours p - lr*(update + wd*p): the same AdamW
    check("adamw vs torch.optim.AdamW", ours, ref.detach(), "forward")
    assert torch.equal(working, master.float())


def test_adamw_follows_the_written_formula_exactly():
    n = 32
    lr, b1, b2, eps, wd, step, scale = 3e-3, 0.8, 0.9, 1e-8, 0.05, 3, 0.5
    p, g = torch.randn(n, **f64), torch.randn(n, **f64)
    m, v = torch.rand(n, **f64), torch.rand(n, **f64)
    gs = g * scale
    m_new, v_new = b1 * m + (1 - b1) * gs, b2 * v + (1 - b2) * gs * gs
    want = p - lr * ((m_new / (1 - b1 ** step)) / (torch.sqrt(v_new / (1 - b2 ** step)) + eps) + wd * p)
    ops.adamw_update(p, g, m, v, None, lr, b1, b2, eps, wd, step, scale)
    check("adamw param", p, want, "forward")
    check("adamw m", m, m_new, "forward")
    check("adamw v", v, v_new, "forward")


def test_global_norm_squared():
    g = torch.randn(1000, **f64)
    out = torch.zeros(1, **f64)
    ops.global_norm_squared(out, g)
    check("norm^2", out, (g * g).sum().reshape(1), "forward")


# ---------------------------------------------------------------- FP8 (issue #13)
# e4m3 keeps 3 mantissa bits, e5m2 2: rounding to nearest loses at most half a unit in the last
# place, 2^-4 and 2^-3 of a normal value; below the smallest normal the step is fixed, so the
# error is at most half of it (2^-10 for e4m3, 2^-17 for e5m2).
FP8_CASES = {"e4m3": (2.0 ** -4, 2.0 ** -10), "e5m2": (2.0 ** -3, 2.0 ** -17)}


@pytest.mark.parametrize("fmt", sorted(FP8_CASES))
def test_fp8_scale_is_the_largest_power_of_two_that_fits(fmt):
    for a in (1e-3, 0.37, 1.0, 3.0, 448.0, 1e4):
        amax, scale = torch.tensor([a]), torch.empty(1)
        ops.fp8_scale(scale, amax, fmt)
        s = float(scale)
        assert math.log2(s) == int(math.log2(s)), "not a power of two"
        assert a * s <= ops.fp8_max(fmt) < a * s * 2
        ops.fp8_scale(scale, amax, fmt, margin=1)
        assert float(scale) == s / 2
    for a in (0.0, float("inf"), float("nan")):
        ops.fp8_scale(scale, torch.tensor([a]), fmt)
        assert float(scale) == 1.0


@pytest.mark.parametrize("fmt", sorted(FP8_CASES))
def test_fp8_quantize_rounds_saturates_and_reports_amax(fmt):
    rel, floor_abs = FP8_CASES[fmt]
    x = torch.randn(4096, **f64) * torch.logspace(-6, 2, 4096, dtype=torch.float64)  # many magnitudes
    amax, scale = torch.empty(1), torch.empty(1)
    ops.fp8_scale(scale, x.abs().max().float().reshape(1), fmt)
    out = torch.empty(4096, dtype=ops.FP8_FORMATS[fmt])
    ops.fp8_quantize(out, amax, x, scale)
    assert float(amax) == pytest.approx(float(x.abs().max()), rel=1e-7)  # fp32 of the exact max
    scaled = x * float(scale)
    error = (ops.fp8_dequantize(out, scale) * float(scale) - scaled).abs()
    bound = torch.maximum(rel * scaled.abs(), torch.full_like(scaled, floor_abs))
    assert (error <= bound).all(), f"worst {float((error / bound).max()):.2f}x the rounding bound"
    # past the range: clipped to the largest finite value, never inf or NaN
    big = torch.tensor([1e6, -1e6, ops.fp8_max(fmt) * 1.01], **f64)
    clipped = torch.empty(3, dtype=ops.FP8_FORMATS[fmt])
    ops.fp8_quantize(clipped, amax, big, torch.ones(1))
    assert clipped.double().tolist() == [ops.fp8_max(fmt), -ops.fp8_max(fmt), ops.fp8_max(fmt)]


def test_fp8_scale_at_powers_of_two_and_its_inverse():
    """Exactly at a power of two the quotient's floor(log2) is that power: amax = limit / 2^k
    gives scale 2^k, and a hair above gives 2^(k-1); the inverse is 1 / scale."""
    scale, inverse = torch.zeros(1), torch.zeros(1)
    for k in (-3, 0, 5):
        ops.fp8_scale(scale, torch.tensor([448.0 / 2 ** k]), "e4m3", inverse=inverse)
        assert float(scale) == 2.0 ** k and float(inverse) == 2.0 ** -k
        ops.fp8_scale(scale, torch.tensor([448.0 / 2 ** k * (1 + 2 ** -20)]), "e4m3")
        assert float(scale) == 2.0 ** (k - 1)


def test_fp8_quantize_transpose_is_the_quantized_matrix_transposed():
    x = torch.randn(5, 7, dtype=torch.float64) * 30
    scale, amax, amax_t = torch.ones(1), torch.zeros(1), torch.zeros(1)
    ops.fp8_scale(scale, x.abs().max().float().reshape(1), "e4m3")
    out = torch.empty(5, 7, dtype=torch.float8_e4m3fn)
    ops.fp8_quantize(out, amax, x, scale)
    out2, out_t = torch.empty_like(out), torch.empty(7, 5, dtype=torch.float8_e4m3fn)
    ops.fp8_quantize_transpose(out2, out_t, amax_t, x, scale)
    assert torch.equal(out2.view(torch.uint8), out.view(torch.uint8))
    assert torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))
    assert float(amax_t) == float(amax) == float(x.abs().max().float())


def test_fp8_matmul_is_the_product_of_the_dequantised_operands():
    B, T, C, OC = 2, 3, 16, 8
    x, w, b = torch.randn(B, T, C, **f64), torch.randn(OC, C, **f64) * 0.1, torch.randn(OC, **f64)
    scales, quantized = [], []
    inverses = []
    for t, fmt in ((x, "e4m3"), (w, "e4m3")):
        scale, inverse, amax = torch.empty(1), torch.empty(1), torch.empty(1)
        ops.fp8_scale(scale, t.abs().max().float().reshape(1), fmt, inverse=inverse)
        q = torch.empty(t.shape, dtype=ops.FP8_FORMATS[fmt])
        ops.fp8_quantize(q, amax, t, scale)
        scales.append(scale)
        inverses.append(inverse)
        quantized.append(q)
    out = poisoned(B, T, OC)
    ops.fp8_matmul_forward(out, quantized[0], inverses[0], quantized[1], inverses[1], b)
    want = ops.fp8_dequantize(quantized[0], scales[0]) @ ops.fp8_dequantize(quantized[1], scales[1]).t() + b
    check("fp8 matmul", out, want, "forward")
    # and it is close to the unquantised product: e4m3 operands, ~2^-4 each, errors averaging out
    full = x @ w.t() + b
    assert ((out - full).norm() / full.norm()).item() < 0.05


@pytest.mark.parametrize("fmt", sorted(FP8_CASES))
def test_fp8_cast_is_current_scaling(fmt):
    """fp8_cast = the amax folded in, fp8_scale of it, fp8_quantize with that scale, and the
    inverse: the values land in range whatever the tensor's magnitude."""
    for magnitude in (1e-6, 1.0, 1e4):
        x = torch.randn(64, 48, **f64) * magnitude
        amax, inverse = torch.zeros(1), torch.full((1,), float("nan"))
        out = torch.empty(64, 48, dtype=ops.FP8_FORMATS[fmt])
        ops.fp8_cast(out, inverse, amax, x)
        scale, want_amax = torch.empty(1), torch.empty(1)
        ops.fp8_scale(scale, x.abs().max().float().reshape(1), fmt)
        want = torch.empty_like(out)
        ops.fp8_quantize(want, want_amax, x, scale)
        assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
        assert float(amax) == float(want_amax) and float(inverse) == 1.0 / float(scale)
        assert ops.fp8_max(fmt) / 2 <= float(out.double().abs().max()) <= ops.fp8_max(fmt)  # range used
    # amax is a running maximum: a larger value already there sets the scale
    amax = torch.tensor([1e3])
    ops.fp8_cast(out, inverse, amax, torch.ones(64, 48, **f64))
    assert float(amax) == 1e3 and float(out.double().max()) < ops.fp8_max(fmt) / 100
    t_out, t_t = torch.empty(64, 48, dtype=torch.float8_e4m3fn), torch.empty(48, 64, dtype=torch.float8_e4m3fn)
    ops.fp8_cast_transpose(t_out, t_t, inverse, torch.zeros(1), x)
    assert torch.equal(t_t.view(torch.uint8), t_out.t().contiguous().view(torch.uint8))


@pytest.mark.parametrize("gelu", [False, True])
def test_fp8_matmul_backward_input_against_autograd(gelu):
    """The input gradient from fp8 operands is autograd's gradient of x @ W^T (through GELU when
    gelu) taken with the dequantised dout and W; and matmul_backward with dinp None leaves
    dinp alone and still accumulates dW and dbias."""
    N, C, OC = 6, 16, 32
    w = torch.randn(OC, C, **f64) * 0.1
    dout = torch.randn(N, OC, **f64) * 1e-4  # gradient-sized: e5m2's range must be scaled into
    pre = torch.randn(N, C, **f64)
    w8, w8_t = torch.empty(OC, C, dtype=torch.float8_e4m3fn), torch.empty(C, OC, dtype=torch.float8_e4m3fn)
    w_inv, d_inv = torch.empty(1), torch.empty(1)
    ops.fp8_cast_transpose(w8, w8_t, w_inv, torch.zeros(1), w)
    d8 = torch.empty(N, OC, dtype=torch.float8_e5m2)
    ops.fp8_cast(d8, d_inv, torch.zeros(1), dout)
    dinp = poisoned(N, C)
    ops.fp8_matmul_backward_input(dinp, d8, d_inv, w8_t, w_inv, gelu_inp=pre if gelu else None)
    wq, dq = w8.double() * float(w_inv), d8.double() * float(d_inv)
    x = pre.clone().requires_grad_(True)
    y = (F.gelu(x, approximate="tanh") if gelu else x) @ wq.t()
    y.backward(dq)
    check("fp8 dinp", dinp, x.grad, "backward")
    if not gelu:  # and close to the exact product: e5m2 (2^-3) and e4m3 (2^-4) operands
        exact = dout @ w
        assert ((dinp - exact).norm() / exact.norm()).item() < 0.15
    dw, db, untouched = torch.zeros(OC, C, **f64), torch.zeros(OC, **f64), poisoned(N, C)
    ops.matmul_backward(None, dw, db, dout, pre, w)
    check("dW without dinp", dw, dout.t() @ pre, "backward")
    check("dbias without dinp", db, dout.sum(0), "backward")
    assert untouched.isnan().all()


def test_bias_backward_accumulates_the_column_sums():
    """bias_backward is autograd's bias gradient of x @ W^T + b, added to what dbias holds."""
    dout, x, w = torch.randn(2, 3, 8, **f64), torch.randn(2, 3, 4, **f64), torch.randn(8, 4, **f64)
    b = torch.randn(8, **f64, requires_grad=True)
    (x @ w.t() + b).backward(dout)
    before = torch.randn(8, **f64)
    db = before.clone()
    ops.bias_backward(db, dout)
    check("bias_backward", db, before + b.grad, "backward")


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_weight_gradient_against_autograd(fmt):
    """fp8_matmul_weight_grad adds autograd's weight gradient of x @ W^T, taken with the
    dequantised dout and x, to dW: its operands are the transposed copies fp8_cast_transpose
    makes of dout (in the gradient format) and x (e4m3), with their inverse scales; and it is
    close to the exact gradient."""
    N, C, OC = 32, 16, 48
    x, dout = torch.randn(N, C, **f64), torch.randn(N, OC, **f64) * 1e-4
    copies = {}
    for name, t, f in (("x", x, "e4m3"), ("dout", dout, fmt)):
        q, q_t, inv = (torch.empty(t.shape, dtype=ops.FP8_FORMATS[f]),
                       torch.empty(t.shape[1], t.shape[0], dtype=ops.FP8_FORMATS[f]), torch.empty(1))
        ops.fp8_cast_transpose(q, q_t, inv, torch.zeros(1), t)
        assert torch.equal(q_t.view(torch.uint8), q.t().contiguous().view(torch.uint8))
        copies[name] = (q, q_t, inv)
    before = torch.randn(OC, C, **f64)
    dw = before.clone()
    ops.fp8_matmul_weight_grad(dw, copies["dout"][1], copies["dout"][2], copies["x"][1], copies["x"][2])
    xq, dq = (copies[n][0].double() * float(copies[n][2]) for n in ("x", "dout"))
    w = torch.zeros(OC, C, **f64, requires_grad=True)
    (xq @ w.t()).backward(dq)
    check("fp8 dW", dw, before + w.grad, "backward")
    exact = dout.t() @ x
    assert (((dw - before) - exact).norm() / exact.norm()).item() < (0.15 if fmt == "e5m2" else 0.1)


def test_fp8_cast_transpose_with_a_known_amax_skips_nothing_it_needs():
    """amax_known: the caller's amax is taken as max |inp| (the producer merged it); the result is
    the cast with the amax taken here."""
    x = torch.randn(24, 16, **f64)
    outs = []
    for known in (False, True):
        amax = torch.full((1,), float(x.abs().max())) if known else torch.zeros(1)
        q, q_t, inv = torch.empty(24, 16, dtype=torch.float8_e5m2), torch.empty(16, 24, dtype=torch.float8_e5m2), \
            torch.empty(1)
        ops.fp8_cast_transpose(q, q_t, inv, amax, x, amax_known=known)
        outs.append((q.view(torch.uint8), q_t.view(torch.uint8), inv, amax))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_fp8_delayed_scales_push_the_amax_and_scale_from_the_history():
    """Masked sites: the amax joins the history (oldest out) and the scale is fp8_scale of the
    history's maximum, 1 for a non-finite history; unmasked sites are untouched."""
    S, H = 4, 3
    history = torch.tensor([[1.0, 8.0, 2.0], [0.0, 0.0, 0.0], [1.0, float("inf"), 1.0], [5.0, 5.0, 5.0]])
    amax = torch.zeros(S, 4)
    amax[:, 0] = torch.tensor([3.0, 0.0, 1.0, 100.0])
    scale, inverse = torch.full((S, 4), 7.0), torch.full((S, 4), 7.0)
    limits = torch.tensor([448.0, 448.0, 448.0, 57344.0], dtype=torch.float64)
    mask = torch.tensor([True, True, True, False])
    before = history.clone()
    ops.fp8_delayed_scales(scale, inverse, history, amax, limits, mask)
    assert torch.equal(history[0], torch.tensor([3.0, 1.0, 8.0])) and torch.equal(history[3], before[3])
    want = torch.empty(1)
    ops.fp8_scale(want, torch.tensor([8.0]), "e4m3")
    assert float(scale[0, 0]) == float(want) == 32.0 and float(inverse[0, 0]) == 1 / 32
    assert float(scale[1, 0]) == 1.0 and float(scale[2, 0]) == 1.0  # all zero; an inf in the history
    assert float(scale[3, 0]) == 7.0 and float(inverse[3, 0]) == 7.0  # masked out
