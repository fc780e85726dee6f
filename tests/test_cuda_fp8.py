"""Our FP8 cast kernels (kernels/fp8.cu) against the reference's fp8_* ops on the same bf16
inputs. Tolerance: none. Both compute x * scale exactly (bf16 times a power of two, in fp32 or
fp64, is exact while it stays in range) and then round to the nearest fp8 value, ties to even,
saturating; amax is a maximum, exact in any order. So every byte and every amax must be equal,
and a second run bitwise equal to the first."""
import pytest
import torch

from distgpt.backends import reference
from gpu_check import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def inputs(shape, spread, seed):
    """bf16 values spread over many binades (so every fp8 exponent and the subnormals appear),
    a few past the scaled range (saturation), and exact zeros and negative zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-spread, spread + 1, shape, generator=gen).double())
    flat = x.view(-1)
    flat[:: 97] = 0.0
    flat[1:: 101] = -0.0
    return x.to(torch.bfloat16)


def as_bytes(t):
    return t.view(torch.uint8).cpu()


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("n", [1, 7, 8, 4096 + 5, 3 * 2**20 + 3])
def test_quantize_matches_the_reference_bit_for_bit(fmt, n):
    from distgpt.backends.cuda import fp8
    x = inputs((n,), 12, seed=n)
    # the scale of a smaller amax than the tensor's: some values saturate
    amax_for_scale = torch.tensor([float(x.abs().max().float()) / 4], dtype=torch.float32)
    scale = torch.zeros(1)
    reference.fp8_scale(scale, amax_for_scale, fmt)
    want, want_amax = torch.empty(n, dtype=FORMATS[fmt]), torch.zeros(1)
    reference.fp8_quantize(want, want_amax, x.double(), scale)
    runs = []
    for _ in range(2):
        got = torch.full((n + 8,), 0x55, dtype=torch.uint8, device="cuda").view(FORMATS[fmt])[:n]
        got_amax = torch.full((1,), float("nan"), device="cuda")
        fp8.fp8_quantize(got, got_amax, x.cuda(), scale.cuda())
        runs.append((as_bytes(got), got_amax.cpu()))
    assert torch.equal(runs[0][0], as_bytes(want)), f"{fmt} n={n}: bytes differ from the reference"
    assert float(runs[0][1]) == float(want_amax)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("fmt", list(FORMATS))
# (1, 1) and (33, 65) take the scalar kernel, the rest (multiples of 8) the 16-byte-vector one,
# (8, 8) and (72, 200) with partial tiles
@pytest.mark.parametrize("shape", [(1, 1), (33, 65), (8, 8), (72, 200), (768, 2304), (1600, 6400)])
def test_quantize_transpose_matches_the_reference_bit_for_bit(fmt, shape):
    from distgpt.backends.cuda import fp8
    R, C = shape
    x = inputs(shape, 6, seed=R * C)
    scale = torch.zeros(1)
    reference.fp8_scale(scale, x.abs().max().float().reshape(1), fmt, margin=1)
    want, want_t, want_amax = (torch.empty(R, C, dtype=FORMATS[fmt]), torch.empty(C, R, dtype=FORMATS[fmt]),
                               torch.zeros(1))
    reference.fp8_quantize_transpose(want, want_t, want_amax, x.double(), scale)
    got = torch.empty(R, C, dtype=FORMATS[fmt], device="cuda")
    got_t = torch.empty(C, R, dtype=FORMATS[fmt], device="cuda")
    got_amax = torch.full((1,), float("nan"), device="cuda")
    fp8.fp8_quantize_transpose(got, got_t, got_amax, x.cuda(), scale.cuda())
    assert torch.equal(as_bytes(got), as_bytes(want))
    assert torch.equal(as_bytes(got_t), as_bytes(want_t))
    assert float(got_amax) == float(want_amax)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_scale_matches_the_reference_at_and_around_powers_of_two(fmt):
    from distgpt.backends.cuda import fp8
    limit = reference.fp8_max(fmt)
    amaxes = [0.0, float("inf"), float("nan"), 1e-30, 3e38]
    for k in range(-20, 21, 3):
        amaxes += [limit / 2 ** k, limit / 2 ** k * (1 + 2 ** -20), limit / 2 ** k * (1 - 2 ** -20)]
    for margin in (0, 2):
        for a in amaxes:
            amax = torch.tensor([a], dtype=torch.float32)
            want, want_inv = torch.zeros(1), torch.zeros(1)
            reference.fp8_scale(want, amax, fmt, margin, inverse=want_inv)
            got, got_inv = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
            fp8.fp8_scale(got, amax.cuda(), fmt, margin, inverse=got_inv)
            assert float(got) == float(want) and float(got_inv) == float(want_inv), f"amax {a!r} margin {margin}"


def test_a_nan_input_gives_a_nan_amax():
    """A NaN must reach the next scale (which then falls back to 1) and the spike guard, not be
    dropped by a max that ignores NaN."""
    from distgpt.backends.cuda import fp8
    x = torch.ones(1000, dtype=torch.bfloat16)
    x[517] = float("nan")
    out = torch.empty(1000, dtype=torch.float8_e4m3fn, device="cuda")
    amax = torch.zeros(1, device="cuda")
    fp8.fp8_quantize(out, amax, x.cuda(), torch.ones(1, device="cuda"))
    assert torch.isnan(amax).all()


@pytest.fixture(scope="module")
def mm():
    """One planned Matmuls (handle, workspace, plan cache) for the fp8 product tests."""
    from distgpt.backends.cuda.matmul import Matmuls
    matmuls = Matmuls()
    matmuls.plan("cuda")
    return matmuls


# fp8 matmul: the tensor cores multiply fp8 values exactly and accumulate in fp32 (with
# fast_accum, partial sums are promoted to fp32 less often: still ~2^-13 relative per partial),
# then one bf16 rounding of the result (2^-9 relative, 2^-8 at a neighbouring value): rtol 2e-2
# for fast_accum, 1e-2 without. atol covers results near 0: sums of C terms of size ~|a||w|,
# about sqrt(C) * rms(terms) * 1e-2.
SHAPES = [(128, 768, 2304), (256, 1600, 6400), (1024, 3072, 768), (48, 64, 32)]


@pytest.mark.parametrize("fast_accum", [True, False])
@pytest.mark.parametrize("formats", [("e4m3", "e4m3"), ("e5m2", "e4m3")])
@pytest.mark.parametrize("N,C,OC", SHAPES)
def test_fp8_matmul_matches_the_reference(mm, N, C, OC, formats, fast_accum):
    from distgpt.backends.cuda import fp8
    from gpu_check import assert_close
    torch.manual_seed(N + C + OC)
    x = torch.randn(N, C).to(torch.bfloat16)
    w = (torch.randn(OC, C) * 0.05).to(torch.bfloat16)
    b = torch.randn(OC).to(torch.bfloat16)
    operands = []
    for t, fmt in ((x, formats[0]), (w, formats[1])):
        scale, inverse, amax = (torch.zeros(1, device="cuda") for _ in range(3))
        fp8.fp8_scale(scale, t.abs().max().float().reshape(1).cuda(), fmt, inverse=inverse)
        q = torch.empty(t.shape, dtype=FORMATS[fmt], device="cuda")
        fp8.fp8_quantize(q, amax, t.cuda(), scale)
        operands.append((q, inverse))
    (x8, x_inv), (w8, w_inv) = operands
    out = torch.full((N, OC), float("nan"), dtype=torch.bfloat16, device="cuda")
    mm.forward_fp8(out, x8, x_inv, w8, w_inv, b.cuda(), fast_accum=fast_accum)
    want = torch.empty(N, OC, dtype=torch.float64)
    reference.fp8_matmul_forward(want, x8.cpu(), x_inv.cpu(), w8.cpu(), w_inv.cpu(), b.double())
    rms = float(want.pow(2).mean().sqrt())
    assert_close("fp8 matmul", out, want, atol=1e-2 * rms, rtol=2e-2 if fast_accum else 1e-2)
    again = torch.empty_like(out)
    mm.forward_fp8(again, x8, x_inv, w8, w_inv, b.cuda(), fast_accum=fast_accum)
    assert torch.equal(again, out)


@pytest.mark.parametrize("N,C,OC", [(256, 1600, 1600), (48, 64, 32)])
def test_fp8_matmul_adds_the_residual(mm, N, C, OC):
    """A projection writing the residual sum: + residual in the epilogue (cuBLASLt's C, bf16)."""
    from gpu_check import assert_close
    torch.manual_seed(N + C)
    x, w = torch.randn(N, C).to(torch.bfloat16), (torch.randn(OC, C) * 0.05).to(torch.bfloat16)
    b, residual = torch.randn(OC).to(torch.bfloat16), torch.randn(N, OC).to(torch.bfloat16)
    (x8, x_inv), (w8, w_inv) = cast_pair(x, "e4m3"), cast_pair(w, "e4m3")
    out = torch.full((N, OC), float("nan"), dtype=torch.bfloat16, device="cuda")
    mm.forward_fp8(out, x8, x_inv, w8, w_inv, b.cuda(), residual=residual.cuda())
    want = torch.empty(N, OC, dtype=torch.float64)
    reference.fp8_matmul_forward(want, x8.cpu(), x_inv.cpu(), w8.cpu(), w_inv.cpu(), b.double(),
                                 residual=residual.double())
    rms = float(want.pow(2).mean().sqrt())
    assert_close("fp8 matmul + residual", out, want, atol=1e-2 * rms, rtol=2e-2)


# ---------------------------------------------------------------- current scaling (training's casts)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("n", [8, 4096 + 5, 3 * 2**20 + 3])
def test_cast_matches_the_reference_bit_for_bit(fmt, n):
    """fp8_cast: the amax pass, then the cast with the scale taken from it; bytes, amax and
    inverse all equal to the reference's, and a running amax already larger sets the scale."""
    from distgpt.backends.cuda import fp8
    x = inputs((n,), 12, seed=n + 1)
    for start in (0.0, float(x.abs().max().float()) * 64):
        want, want_amax, want_inv = torch.empty(n, dtype=FORMATS[fmt]), torch.tensor([start]), torch.zeros(1)
        reference.fp8_cast(want, want_inv, want_amax, x.double())
        got = torch.empty(n, dtype=FORMATS[fmt], device="cuda")
        got_amax, got_inv = torch.tensor([start], device="cuda"), torch.zeros(1, device="cuda")
        fp8.fp8_cast(got, got_inv, got_amax, x.cuda())
        assert torch.equal(as_bytes(got), as_bytes(want)), f"{fmt} n={n} amax from {start}: bytes differ"
        assert float(got_amax) == float(want_amax) and float(got_inv) == float(want_inv)


@pytest.mark.parametrize("shape", [(33, 65), (72, 200), (768, 2304), (6400, 1600)])
def test_cast_transpose_matches_the_reference_bit_for_bit(shape):
    from distgpt.backends.cuda import fp8
    R, C = shape
    x = inputs(shape, 6, seed=R + C)
    want, want_t = torch.empty(R, C, dtype=torch.float8_e4m3fn), torch.empty(C, R, dtype=torch.float8_e4m3fn)
    want_inv = torch.zeros(1)
    reference.fp8_cast_transpose(want, want_t, want_inv, torch.zeros(1), x.double())
    got = torch.empty(R, C, dtype=torch.float8_e4m3fn, device="cuda")
    got_t = torch.empty(C, R, dtype=torch.float8_e4m3fn, device="cuda")
    got_inv = torch.zeros(1, device="cuda")
    fp8.fp8_cast_transpose(got, got_t, got_inv, torch.zeros(1, device="cuda"), x.cuda())
    assert torch.equal(as_bytes(got), as_bytes(want)) and torch.equal(as_bytes(got_t), as_bytes(want_t))
    assert float(got_inv) == float(want_inv)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", [(33, 65), (2048, 768), (1024, 6400)])
def test_cast_transpose_of_activations_and_gradients_matches_the_reference(fmt, shape):
    """fp8 weight gradients cast the block matmuls' inputs (e4m3) and output gradients (either
    format) transposed, tokens last; with amax_known the amax pass is skipped and the amax given
    is trusted: the same bytes either way."""
    from distgpt.backends.cuda import fp8
    R, C = shape
    x = inputs(shape, 6, seed=R * C) if fmt == "e4m3" else (inputs(shape, 6, seed=R * C).double() * 1e-5).to(
        torch.bfloat16)
    want, want_t = torch.empty(R, C, dtype=FORMATS[fmt]), torch.empty(C, R, dtype=FORMATS[fmt])
    want_inv, want_amax = torch.zeros(1), torch.zeros(1)
    reference.fp8_cast_transpose(want, want_t, want_inv, want_amax, x.double())
    for known in (False, True):
        got = torch.empty(R, C, dtype=FORMATS[fmt], device="cuda")
        got_t = torch.empty(C, R, dtype=FORMATS[fmt], device="cuda")
        got_inv = torch.zeros(1, device="cuda")
        amax = want_amax.cuda() if known else torch.zeros(1, device="cuda")
        fp8.fp8_cast_transpose(got, got_t, got_inv, amax, x.cuda(), amax_known=known)
        assert torch.equal(as_bytes(got), as_bytes(want)) and torch.equal(as_bytes(got_t), as_bytes(want_t)), \
            f"{fmt} {shape} amax_known={known}: bytes differ"
        assert float(got_inv) == float(want_inv) and float(amax) == float(want_amax)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("N,C,OC", [(256, 768, 2304), (2048, 1600, 6400), (48, 64, 32)])
def test_fp8_weight_gradient_matches_the_reference(mm, fmt, N, C, OC):
    """dW (OC, C) += dout8_t (OC, N) @ x8_t (C, N)^T, scaled back: within the fp8 products'
    tolerance (full-precision accumulation, one bf16 rounding of dW: rtol 1e-2), the previous
    dW kept; and twice bitwise the same."""
    from gpu_check import assert_close
    torch.manual_seed(N + C)
    x, dout = torch.randn(N, C).to(torch.bfloat16), (torch.randn(N, OC) * 1e-3).to(torch.bfloat16)
    _, x8_t, x_inv = cast_pair(x, "e4m3", transpose=True)
    _, d8_t, d_inv = cast_pair(dout, fmt, transpose=True)
    before = (torch.randn(OC, C) * 1e-2).to(torch.bfloat16)
    dw = before.cuda()
    mm.weight_grad_fp8(dw, d8_t, d_inv, x8_t, x_inv)
    want = before.double()
    reference.fp8_matmul_weight_grad(want, d8_t.cpu(), d_inv.cpu(), x8_t.cpu(), x_inv.cpu())
    scale = float((want - before.double()).pow(2).mean().sqrt())
    assert_close(f"fp8 dW {fmt}", dw, want, 1e-2 * scale, 1e-2)
    again = before.cuda()
    mm.weight_grad_fp8(again, d8_t, d_inv, x8_t, x_inv)
    assert torch.equal(again, dw)


def test_cuda_bias_backward_matches_the_reference():
    """The bias gradient alone (fp8 weight gradients take it apart from the weight's): bias.cu's
    column sums, fp32 inside, one bf16 rounding: rtol 1e-2."""
    from gpu_check import assert_close, planned_backend
    backend = planned_backend(2, 64, 64, 1)
    dout = torch.randn(2, 64, 256).to(torch.bfloat16)
    before = (torch.randn(256) * 0.1).to(torch.bfloat16)
    db = before.cuda()
    backend.bias_backward(db, dout.cuda())
    want = before.double()
    reference.bias_backward(want, dout.double())
    assert_close("bias_backward", db, want, 1e-3, 1e-2)


def cast_pair(t, fmt, transpose=False):
    """t's fp8 copy by current scaling on the GPU (and its transpose), with the inverse scale."""
    from distgpt.backends.cuda import fp8
    t = t.cuda().contiguous()
    q = torch.empty(t.shape, dtype=FORMATS[fmt], device="cuda")
    inv = torch.zeros(1, device="cuda")
    if transpose:
        q_t = torch.empty(t.shape[1], t.shape[0], dtype=FORMATS[fmt], device="cuda")
        fp8.fp8_cast_transpose(q, q_t, inv, torch.zeros(1, device="cuda"), t)
        return q, q_t, inv
    fp8.fp8_cast(q, inv, torch.zeros(1, device="cuda"), t)
    return q, inv


# the GELU epilogues (or their split forms) add one bf16 rounding of the pre-activation and
# one of the result to the product's: rtol 2e-2 as above, atol a hundredth of the result's rms
@pytest.mark.parametrize("N,C,OC", [(256, 768, 3072), (512, 1600, 6400)])
def test_fp8_fc_forward_with_gelu_matches_the_reference(mm, N, C, OC):
    from gpu_check import assert_close
    torch.manual_seed(N + OC)
    x, w = torch.randn(N, C).to(torch.bfloat16), (torch.randn(OC, C) * 0.03).to(torch.bfloat16)
    b = (torch.randn(OC) * 0.1).to(torch.bfloat16)
    x8, x_inv = cast_pair(x, "e4m3")
    w8, w_inv = cast_pair(w, "e4m3")
    pre, act = (torch.full((N, OC), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(2))
    mm.forward_fp8(pre, x8, x_inv, w8, w_inv, b.cuda(), gelu_out=act)
    want_pre, want_act = torch.empty(N, OC, dtype=torch.float64), torch.empty(N, OC, dtype=torch.float64)
    reference.fp8_matmul_forward(want_pre, x8.cpu(), x_inv.cpu(), w8.cpu(), w_inv.cpu(), b.double(),
                                 gelu_out=want_act)
    for name, got, want in (("pre-activation", pre, want_pre), ("gelu", act, want_act)):
        rms = float(want.pow(2).mean().sqrt())
        assert_close(f"fp8 fc {name}", got, want, atol=1e-2 * rms, rtol=2e-2)


# fc with its GELU output written in fp8 by the epilogue (the fp8 recipe's forward): the
# pre-activation as above; the fp8 values against the reference's (GELU of the float64
# pre-activation, then the cast): the product's own error (rtol 2e-2, atol a hundredth of the rms)
# plus one e4m3 rounding, 2^-4 relative, of either side's value, and e4m3's smallest step at
# the scale near 0. The scale saturates the largest values: those must be +-448 (no NaN). The
# amax is the GELU output's before the cast (within the product's rtol), and two runs are the
# same bits.
@pytest.mark.parametrize("N,C,OC", [(256, 768, 3072), (512, 1600, 6400), (64, 64, 256)])
def test_fp8_fc_forward_with_an_fp8_gelu_output_matches_the_reference(mm, N, C, OC):
    from gpu_check import assert_close
    torch.manual_seed(N + OC + 1)
    x, w = torch.randn(N, C).to(torch.bfloat16), (torch.randn(OC, C) * 0.03).to(torch.bfloat16)
    b = (torch.randn(OC) * 0.1).to(torch.bfloat16)
    x8, x_inv = cast_pair(x, "e4m3")
    w8, w_inv = cast_pair(w, "e4m3")
    want_pre, want_act = torch.empty(N, OC, dtype=torch.float64), torch.empty(N, OC, dtype=torch.float64)
    reference.fp8_matmul_forward(want_pre, x8.cpu(), x_inv.cpu(), w8.cpu(), w_inv.cpu(), b.double(),
                                 gelu_out=want_act)
    scale = torch.zeros(1)
    reference.fp8_scale(scale, torch.tensor([float(want_act.abs().max()) / 3]), "e4m3")  # the top saturates
    limit = reference.fp8_max("e4m3") / float(scale)
    runs = []
    for _ in range(2):
        pre = torch.full((N, OC), float("nan"), dtype=torch.bfloat16, device="cuda")
        act8 = torch.full((N, OC), 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)  # NaN
        amax = torch.full((4,), float("nan"), device="cuda")[:1]  # a 16-byte aligned element
        mm.forward_fp8(pre, x8, x_inv, w8, w_inv, b.cuda(), gelu_out=act8, gelu_scale=scale.cuda(), gelu_amax=amax)
        runs.append((pre.cpu(), as_bytes(act8), amax.cpu()))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    pre, act8, amax = runs[0]
    rms = float(want_pre.pow(2).mean().sqrt())
    assert_close("fp8 fc pre-activation", pre, want_pre, atol=1e-2 * rms, rtol=2e-2)
    assert not ((act8 & 0x7F) == 0x7F).any(), "an fp8 GELU output is NaN (not saturated)"
    got = reference.fp8_dequantize(act8.view(torch.float8_e4m3fn), scale)
    clipped = want_act.abs() > 1.05 * limit  # past the range even with the product's error
    assert clipped.any() and torch.equal(got[clipped], want_act[clipped].sign() * limit)
    keep = ~clipped & (want_act.abs() < 0.95 * limit)
    act_rms = float(want_act.pow(2).mean().sqrt())
    assert_close("fp8 GELU output", got[keep], want_act[keep], atol=1e-2 * act_rms + 2.0 ** -9 / float(scale),
                 rtol=2e-2 + 2 * 2.0 ** -4)
    assert abs(float(amax) - float(want_act.abs().max())) <= 2e-2 * float(want_act.abs().max())


@pytest.mark.parametrize("R,C", [(8, 16), (200, 80), (1024, 3072), (16384, 6400)])
def test_fp8_transpose_is_the_bytes_transposed(R, C):
    """fp8_transpose (the fp8 GELU output's copy for the fc projection's weight gradient): every
    byte where the transpose puts it; (200, 80) leaves partial tiles both ways."""
    from distgpt.backends.cuda import fp8
    x = torch.randint(0, 256, (R, C), dtype=torch.uint8, device="cuda")
    out_t = torch.full((C, R), 0x55, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    fp8.fp8_transpose(out_t, x.view(torch.float8_e4m3fn))
    assert torch.equal(out_t.view(torch.uint8), x.t())
    with pytest.raises(ValueError, match="multiple of 16"):
        fp8.fp8_transpose(torch.empty(12, 8, dtype=torch.float8_e4m3fn, device="cuda"),
                          torch.empty(8, 12, dtype=torch.float8_e4m3fn, device="cuda"))


@pytest.mark.parametrize("dout_format", ["e4m3", "e5m2"])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("N,C,OC", [(256, 3072, 768), (512, 1600, 4800)])
def test_fp8_backward_input_matches_the_reference(mm, N, C, OC, gelu, dout_format):
    """dinp = dout (e4m3 or e5m2: fp8_gradients) @ W (from W^T's e4m3 copy), times gelu' of the
    pre-activation when gelu: the fc projection's backward (dGELU) and the others' (plain)."""
    from gpu_check import assert_close
    torch.manual_seed(N + C + int(gelu))
    w = (torch.randn(OC, C) * 0.03).to(torch.bfloat16)
    dout = (torch.randn(N, OC) * 1e-5).to(torch.bfloat16)
    pre = torch.randn(N, C).to(torch.bfloat16)
    _, w8_t, w_inv = cast_pair(w, "e4m3", transpose=True)
    d8, d_inv = cast_pair(dout, dout_format)
    dinp = torch.full((N, C), float("nan"), dtype=torch.bfloat16, device="cuda")
    mm.backward_input_fp8(dinp, d8, d_inv, w8_t, w_inv, gelu_inp=pre.cuda() if gelu else None)
    want = torch.empty(N, C, dtype=torch.float64)
    reference.fp8_matmul_backward_input(want, d8.cpu(), d_inv.cpu(), w8_t.cpu(), w_inv.cpu(),
                                        gelu_inp=pre.double() if gelu else None)
    rms = float(want.pow(2).mean().sqrt())
    assert_close("fp8 dinp", dinp, want, atol=1e-2 * rms, rtol=2e-2)


def rows(N, C, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(N, C, generator=gen) * scale).to(torch.bfloat16).cuda()


@pytest.mark.parametrize("C", [768, 1600])
def test_producers_take_the_amax_the_cast_would(C):
    """fp8=true's fused amax: each kernel given an amax writes exactly what it writes without
    one, and leaves in amax the bits fp8_amax (the cast's own pass) finds over that output. A
    row made large checks that the maximum is the whole tensor's, not one block's."""
    from distgpt.backends.cuda import fp8, gelu
    from gpu_check import planned_backend
    N = 4096
    backend = planned_backend(4, 1024, C, C // 64)
    weight, bias = rows(1, C, 1).view(C) * 1 + 1, rows(1, C, 2).view(C)
    mean, rstd = (torch.empty(N, device="cuda") for _ in range(2))

    def check(name, run, output):
        """run(amax or None) writes output; with an amax: same bytes, and amax = fp8_amax(output)."""
        run(None)
        plain = output.clone()
        amax = torch.zeros(1, device="cuda")
        run(amax)
        assert torch.equal(output, plain), f"{name}: the output changed with an amax"
        want = torch.zeros(1, device="cuda")
        fp8.fp8_amax(want, output)
        assert torch.equal(amax, want) and want.item() > 0, f"{name}: amax {amax.item()} != {want.item()}"

    x = rows(N, C, 3)
    x[N // 3] *= 40  # one large row, far from the first block's
    out = torch.empty_like(x)
    check("layernorm_forward", lambda a: backend.layernorm_forward(out, mean, rstd, x, weight, bias, amax=a), out)
    dout, dinp0 = rows(N, C, 5), rows(N, C, 6)
    dinp0[N - 7] *= 30
    dinp = torch.empty_like(dinp0)
    for dproj in (None, torch.zeros(C, dtype=torch.bfloat16, device="cuda")):
        def backward(a):
            dinp.copy_(dinp0)  # the residual gradient accumulates: the same start each run
            dw, db = (torch.zeros(C, dtype=torch.bfloat16, device="cuda") for _ in range(2))
            backend.layernorm_backward(dinp, dw, db, dout, x, weight, mean, rstd,
                                       dproj_bias=None if dproj is None else dproj.zero_(), amax=a)
        check(f"layernorm_backward (dproj_bias {dproj is not None})", backward, dinp)
    pre, g4 = rows(N, 4 * C, 7), rows(N, 4 * C, 8)
    g4[5] *= 50
    d4 = torch.empty_like(g4)
    check("gelu_backward", lambda a: gelu.gelu_backward(d4, pre, g4, a), d4)


@pytest.mark.parametrize("N,C", [(4096, 768), (4096, 1600), (1000, 1280)])
def test_layernorm_writing_its_fp8_cast_is_the_cast_of_its_bf16_output(N, C):
    """fp8_layernorm_cast: the layernorm with an e4m3 out writes bitwise what fp8_quantize makes
    of the bf16 layernorm's output with the same scale (saturation included: the second scale
    puts most values past 448), the same mean and rstd, and the amax the _amax twin takes."""
    from distgpt.backends.cuda import fp8
    from gpu_check import planned_backend
    backend = planned_backend(4, 1024, C, C // 64)
    x = rows(N, C, 21)
    x[N // 2] *= 40  # one large row: the amax is the whole tensor's
    weight, bias = rows(1, C, 22).view(C) + 1, rows(1, C, 23).view(C)
    out, mean, rstd, amax = torch.empty_like(x), *(torch.empty(N, device="cuda") for _ in range(2)), \
        torch.zeros(1, device="cuda")
    backend.layernorm_forward(out, mean, rstd, x, weight, bias, amax=amax)
    for scale in (8.0, 2.0 ** 12):
        scale = torch.full((1,), scale, device="cuda")
        want8, want_amax = torch.empty(N, C, dtype=torch.float8_e4m3fn, device="cuda"), torch.zeros(1, device="cuda")
        fp8.fp8_quantize(want8, want_amax, out, scale)
        out8 = torch.empty(N, C, dtype=torch.float8_e4m3fn, device="cuda")
        mean8, rstd8, amax8 = torch.empty_like(mean), torch.empty_like(rstd), torch.zeros(1, device="cuda")
        backend.layernorm_forward(out8, mean8, rstd8, x, weight, bias, amax=amax8, scale=scale)
        assert torch.equal(as_bytes(out8), as_bytes(want8)), f"scale {scale.item()}: the cast differs"
        assert torch.equal(mean8, mean) and torch.equal(rstd8, rstd)
        assert torch.equal(amax8, amax) and torch.equal(amax8, want_amax) and amax8.item() > 0
    assert not out8.float().isnan().any() and (out8.float().abs() == 448).float().mean() > 0.5
    with pytest.raises(ValueError, match="needs amax and scale"):
        backend.layernorm_forward(out8, mean8, rstd8, x, weight, bias, amax=amax8)


def test_delayed_scales_match_the_reference():
    """fp8_delayed_scales on the GPU: the same histories, scales and inverses as the reference,
    bit for bit (a shift, a maximum and a power of two), unmasked sites untouched, and the
    non-finite and all-zero histories giving scale 1."""
    from distgpt.backends.cuda import fp8
    S, H = 577, 5
    gen = torch.Generator().manual_seed(3)
    history = torch.rand(S, H, generator=gen) * torch.exp2(torch.randint(-20, 10, (S, 1), generator=gen).float())
    history[3] = 0.0
    history[4, 2] = float("nan")
    amax = torch.zeros(S, 4)
    amax[:, 0] = torch.rand(S, generator=gen) * 100
    limits = torch.where(torch.arange(S) % 3 == 2, 57344.0, 448.0).double()
    mask = torch.arange(S) % 4 != 0
    want = [torch.full((S, 4), 7.0), torch.full((S, 4), 7.0), history.clone()]
    reference.fp8_delayed_scales(want[0], want[1], want[2], amax, limits, mask)
    got = [t.cuda() for t in (torch.full((S, 4), 7.0), torch.full((S, 4), 7.0), history)]
    fp8.fp8_delayed_scales(got[0], got[1], got[2], amax.cuda(), limits.cuda(), mask.cuda())
    for name, g, w in zip(("scale", "inverse", "history"), got, want):
        assert torch.equal(g.cpu().view(torch.int32), w.view(torch.int32)), f"{name} differs from the reference"


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("R,C", [(8, 8), (200, 72), (1024, 3072), (2048, 6400)])
def test_fused_gelu_cast_is_the_separate_passes(fmt, R, C):
    """fp8_gelu_quantize_transpose (the fp8 recipe's fc output gradient) against the passes it
    replaces, on the GPU: gelu_backward, then fp8_quantize_transpose with the same scale. The
    bytes of both layouts and the amax: equal (the same bf16 gradient, the same rounding); fc's
    bias gradient: bias_backward's column sums of that gradient, in another order (fp32 sums,
    one bf16 rounding: rtol 1e-2), and the float64 reference's within the same tolerance.
    (200, 72) leaves partial tiles in both directions; the scale saturates some values."""
    from distgpt.backends.cuda import fp8, gelu
    from distgpt.backends.cuda.bias import BiasGradients
    from gpu_check import assert_close
    # the partials a backend plans for R rows of a model of width C / 4 (fc's gradient is 4 wide)
    partials = torch.empty(fp8.gelu_partials_elements(R, C // 4), dtype=torch.float32, device="cuda")
    gen = torch.Generator().manual_seed(R + C)
    inp = (torch.randn(R, C, generator=gen) * 0.02).to(torch.bfloat16).cuda()
    pre = (torch.randn(R, C, generator=gen) * 2).to(torch.bfloat16).cuda()
    before = (torch.randn(C, generator=gen) * 0.01).to(torch.bfloat16)
    d = torch.empty_like(inp)
    gelu.gelu_backward(d, pre, inp)
    scale = torch.zeros(1)
    reference.fp8_scale(scale, torch.tensor([float(d.abs().max()) / 2]), fmt)  # a little saturates
    scale = scale.cuda()
    want, want_t = torch.empty(R, C, dtype=FORMATS[fmt], device="cuda"), torch.empty(C, R, dtype=FORMATS[fmt], device="cuda")
    want_amax = torch.zeros(1, device="cuda")
    fp8.fp8_quantize_transpose(want, want_t, want_amax, d, scale)
    want_bias = before.cuda()
    BiasGradients(C // 4, "cuda").backward(want_bias, d)
    runs = []
    for _ in range(2):
        out = torch.full((R, C), 0x55, dtype=torch.uint8, device="cuda").view(FORMATS[fmt])
        out_t = torch.full((C, R), 0x55, dtype=torch.uint8, device="cuda").view(FORMATS[fmt])
        amax, dbias = torch.full((1,), float("nan"), device="cuda"), before.cuda()
        fp8.fp8_gelu_quantize_transpose(out, out_t, amax, dbias, inp, pre, scale, partials)
        runs.append((as_bytes(out), as_bytes(out_t), amax.cpu(), dbias.cpu()))
    out, out_t, amax, dbias = runs[0]
    assert torch.equal(out, as_bytes(want)) and torch.equal(out_t, as_bytes(want_t))
    assert float(amax) == float(want_amax.cpu())
    assert_close("fused GELU bias gradient", dbias, want_bias.cpu().double(), 1e-4, 1e-2)
    exact = before.double()
    reference.bias_backward(exact, d.cpu().double())
    assert_close("fused GELU bias gradient vs reference", dbias, exact, 1e-4, 1e-2)
    for a, b in zip(runs[0], runs[1]):  # deterministic: the same bits again
        assert torch.equal(a, b)
