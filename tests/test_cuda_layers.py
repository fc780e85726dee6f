"""Our CUDA layer kernels (encoder, layernorm, GELU, bias gradients) against the reference backend
run in fp32 on the same bf16 inputs (upcast), at several shapes; every backward run twice must
give bitwise equal results. Overwritten outputs are poisoned with NaN first; accumulated (+=) outputs start from
random values and are compared as before + reference increment."""
import pytest
import torch

from distgpt.backends import reference
from gpu_check import assert_close, planned_backend, requires_gpu, twice_equal

pytestmark = [pytest.mark.gpu, requires_gpu]

# (atol, rtol) per compared tensor, |got - want| <= atol + rtol * |want|. Inputs are O(1) (randn).
# - bf16 outputs: one rounding to bf16 is <= 2^-9 ~ 2e-3 relative, and an fp32 result that differs
#   from the reference's in its last bits can round to the neighbouring bf16 (2^-8 ~ 4e-3):
#   rtol 1e-2 leaves 2.5x over that; atol 1e-5 covers results near 0 after cancellation, where the
#   fp32 difference (~1e-6 for O(1) terms) is all that is left.
# - fp32 statistics (mean, rstd): only summation order and rsqrtf's ~2 ulp differ, ~1e-6 relative.
# - reductions over rows (SCALED below): the fp32 sums differ from the reference's by summation
#   order, ~sqrt(rows) * 6e-8 of their size; their atol is the factor here times the largest
#   |reference increment| (1e-3: 100x that bound, yet a lost or doubled row, an O(1) error,
#   still fails). rtol covers the final bf16 rounding of before + increment, as above.
TOLERANCES = {
    "encoder_out": (1e-5, 1e-2),
    "dwte": (1e-3, 1e-2),
    "dwpe": (1e-3, 1e-2),
    "ln_out": (1e-4, 1e-2),   # n * w + b in a different order: ~1e-6 of |n * w| + |b| <= ~5e-6
    "ln_mean": (1e-5, 1e-5),
    "ln_rstd": (0.0, 1e-4),
        "ln_dinp": (1e-3, 1e-2),  # fp32 error ~1e-6 of O(1) terms, times rstd = 316 in the constant row
    "ln_dweight": (1e-3, 1e-2),
    "ln_dbias": (1e-3, 1e-2),
    "gelu_out": (1e-5, 1e-2),
    "gelu_dinp": (1e-5, 1e-2),
    "dbias": (1e-3, 1e-2),
}
SCALED = {"dwte", "dwpe", "ln_dweight", "ln_dbias", "dbias"}

# C = 64, 128 (1 chunk per lane, part of the warp idle), 768 (3, exact), 1024 (4), 1600 (7, the
# last partial); B*T = 111 is odd; 4096 rows give every warp of the layernorm backward several rows.
SHAPES = [(1, 8, 64), (3, 37, 128), (2, 64, 768), (2, 33, 1024), (4, 128, 1600), (8, 512, 768)]
MAX_B, MAX_T, MAX_C = 8, 512, 1600
MAX_POSITIONS, VOCAB = 600, 1000
BIAS_SHAPES = [(8, 64), (111, 384), (512, 768), (4096, 2304), (2048, 6400)]


@pytest.fixture(scope="module")
def ops():
    backend = planned_backend(MAX_B, MAX_T, MAX_C, MAX_C // 64)
    torch.manual_seed(0)
    # the backend's ops by layer kind; the bias gradients' kernels, which only matmul_backward
    # calls in the model, directly
    return {"encoder": backend, "layernorm": backend, "gelu": backend, "bias": backend.bias_gradients}


def bf16(*shape, scale=1.0, offset=0.0):
    return (torch.randn(*shape, device="cuda") * scale + offset).to(torch.bfloat16)


def poisoned(*shape, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def check(name, got, want):
    return assert_close(name, got, want, *TOLERANCES[name])


def check_accumulated(name, got, before, increment):
    """got must be before + increment (rounded once to bf16)."""
    atol, rtol = TOLERANCES[name]
    if name in SCALED:
        atol *= float(increment.abs().max())
    return assert_close(name, got, before.double() + increment.double(), atol, rtol)


def skewed_tokens(B, T):
    """Tokens from a small vocabulary with every other one the same token: long runs of equal
    tokens (many groups of 32 in the dwte kernel) beside short ones, and the last row of wte."""
    tokens = torch.randint(0, 50, (B, T), device="cuda")
    tokens.view(-1)[::2] = 3
    tokens.view(-1)[-1] = VOCAB - 1
    return tokens


# ---------------------------------------------------------------- encoder
@pytest.mark.parametrize("B,T,C", SHAPES)
def test_encoder_forward(ops, B, T, C):
    wte, wpe = bf16(VOCAB, C), bf16(MAX_POSITIONS, C)
    tokens = torch.randint(0, VOCAB, (B, T), device="cuda")
    out = poisoned(B, T, C)
    ops["encoder"].encoder_forward(out, tokens, wte, wpe)
    want = torch.empty(B, T, C, device="cuda")
    reference.encoder_forward(want, tokens, wte.float(), wpe.float())
    check("encoder_out", out, want)


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_encoder_backward(ops, B, T, C):
    dout, tokens = bf16(B, T, C), skewed_tokens(B, T)
    dwte0, dwpe0 = bf16(VOCAB, C), bf16(MAX_POSITIONS, C)
    dwte, dwpe = dwte0.clone(), dwpe0.clone()
    ops["encoder"].encoder_backward(dwte, dwpe, dout, tokens)
    inc_wte, inc_wpe = torch.zeros(VOCAB, C, device="cuda"), torch.zeros(MAX_POSITIONS, C, device="cuda")
    reference.encoder_backward(inc_wte, inc_wpe, dout.float(), tokens)
    check_accumulated("dwte", dwte, dwte0, inc_wte)
    check_accumulated("dwpe", dwpe, dwpe0, inc_wpe)
    twice_equal(lambda w, p: ops["encoder"].encoder_backward(w, p, dout, tokens), [dwte0, dwpe0])


# ---------------------------------------------------------------- layernorm and residual
def ln_inputs(B, T, C):
    """A residual-like input with a non-zero mean (the two-pass variance matters) and one
    constant row (variance exactly 0, rstd = 1/sqrt(eps)); weight near 1, bias near 0."""
    inp = bf16(B, T, C, scale=2.0, offset=0.5)
    inp[0, 0] = 3.0
    return inp, bf16(C, scale=0.1, offset=1.0), bf16(C, scale=0.1)


def reference_layernorm(inp, weight, bias):
    B, T, C = inp.shape
    out, mean, rstd = (torch.empty(B, T, C, device="cuda"), torch.empty(B, T, device="cuda"),
                       torch.empty(B, T, device="cuda"))
    reference.layernorm_forward(out, mean, rstd, inp.float(), weight.float(), bias.float())
    return out, mean, rstd


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_layernorm_forward(ops, B, T, C):
    inp, weight, bias = ln_inputs(B, T, C)
    out, mean, rstd = poisoned(B, T, C), poisoned(B, T, dtype=torch.float32), poisoned(B, T, dtype=torch.float32)
    ops["layernorm"].layernorm_forward(out, mean, rstd, inp, weight, bias)
    want_out, want_mean, want_rstd = reference_layernorm(inp, weight, bias)
    check("ln_out", out, want_out)
    check("ln_mean", mean, want_mean)
    check("ln_rstd", rstd, want_rstd)


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_layernorm_forward_into_rows_beside_a_ones_column(ops, B, T, C):
    """out a column slice of (B, T, C + 8), as the plan keeps the layernorm outputs the qkv and
    fc products read (layout.ONES_PAD): bitwise what a contiguous out gets, mean and rstd too,
    and nothing written past column C."""
    inp, weight, bias = ln_inputs(B, T, C)
    whole = torch.full((B, T, C + 8), 7.0, dtype=torch.bfloat16, device="cuda")
    stats = [poisoned(B, T, dtype=torch.float32) for _ in range(4)]
    ops["layernorm"].layernorm_forward(whole[..., :C], stats[0], stats[1], inp, weight, bias)
    out = poisoned(B, T, C)
    ops["layernorm"].layernorm_forward(out, stats[2], stats[3], inp, weight, bias)
    assert torch.equal(whole[..., :C], out), "a strided out differs from a contiguous one"
    assert torch.equal(stats[0], stats[2]) and torch.equal(stats[1], stats[3])
    assert bool((whole[..., C:] == 7.0).all()), "layernorm_forward wrote past column C"


@pytest.fixture(params=["rows", "cols"])
def ln_form(ops, request):
    """Each layernorm backward test runs on both phase-1 kernels: a warp per row with the column
    sums in shared memory, and a thread per 8 channels with them in registers (rows staged)."""
    gradients = ops["layernorm"].layernorm_gradients
    gradients.form = request.param
    yield request.param
    gradients.form = "auto"


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_layernorm_backward(ops, ln_form, B, T, C):
    inp, weight, _ = ln_inputs(B, T, C)
    _, mean, rstd = reference_layernorm(inp, weight, torch.zeros_like(weight))
    dout = bf16(B, T, C)
    dinp0, dweight0, dbias0 = bf16(B, T, C), bf16(C), bf16(C)
    dinp, dweight, dbias = dinp0.clone(), dweight0.clone(), dbias0.clone()
    ops["layernorm"].layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd)
    inc = [torch.zeros(B, T, C, device="cuda"), torch.zeros(C, device="cuda"), torch.zeros(C, device="cuda")]
    reference.layernorm_backward(*inc, dout.float(), inp.float(), weight.float(), mean, rstd)
    check_accumulated("ln_dinp", dinp, dinp0, inc[0])
    check_accumulated("ln_dweight", dweight, dweight0, inc[1])
    check_accumulated("ln_dbias", dbias, dbias0, inc[2])
    twice_equal(lambda di, dw, db: ops["layernorm"].layernorm_backward(di, dw, db, dout, inp, weight, mean, rstd),
                [dinp0, dweight0, dbias0])


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_layernorm_backward_with_projection_bias(ops, ln_form, B, T, C):
    """The _sum kernels: dinp bitwise as without dproj_bias (rows are computed alone; the
    block count, and so the order of the dweight/dbias sums, may differ where shared memory
    allows fewer blocks), dweight/dbias against the reference, and dproj_bias += the column
    sums of the updated bf16 dinp."""
    ln = ops["layernorm"]
    inp, weight, _ = ln_inputs(B, T, C)
    _, mean, rstd = reference_layernorm(inp, weight, torch.zeros_like(weight))
    dout = bf16(B, T, C)
    dinp0, dweight0, dbias0, dproj0 = bf16(B, T, C), bf16(C), bf16(C), bf16(C)
    plain = [t.clone() for t in (dinp0, dweight0, dbias0)]
    ln.layernorm_backward(*plain, dout, inp, weight, mean, rstd)
    fused = [t.clone() for t in (dinp0, dweight0, dbias0, dproj0)]
    sums = poisoned(C, dtype=torch.float32)
    ln.layernorm_backward(*fused[:3], dout, inp, weight, mean, rstd, dproj_bias=fused[3], dproj_sum=sums)
    assert torch.equal(fused[0], plain[0]), "layernorm_backward dinp changed when dproj_bias was given"
    # the fp32 sums handed over are what dproj_bias gained (one bf16 rounding of before + sums)
    assert torch.equal(fused[3], (dproj0.float() + sums).to(torch.bfloat16)), "dproj_sum is not what dproj_bias gained"
    inc = [torch.zeros(C, device="cuda"), torch.zeros(C, device="cuda")]
    reference.layernorm_backward(torch.zeros(B, T, C, device="cuda"), *inc, dout.float(), inp.float(),
                                 weight.float(), mean, rstd)
    check_accumulated("ln_dweight", fused[1], dweight0, inc[0])
    check_accumulated("ln_dbias", fused[2], dbias0, inc[1])
    check_accumulated("dbias", fused[3], dproj0, fused[0].float().reshape(-1, C).sum(0))
    twice_equal(lambda di, dw, db, dp: ln.layernorm_backward(di, dw, db, dout, inp, weight, mean, rstd,
                                                             dproj_bias=dp),
                [dinp0, dweight0, dbias0, dproj0])


# ---------------------------------------------------------------- GELU
@pytest.mark.parametrize("B,T,C", SHAPES)
def test_gelu(ops, B, T, C):
    gelu = ops["gelu"]
    inp, dout = bf16(B, T, 4 * C, scale=3.0), bf16(B, T, 4 * C)
    out = poisoned(B, T, 4 * C)
    gelu.gelu_forward(out, inp)
    want = torch.empty(B, T, 4 * C, device="cuda")
    reference.gelu_forward(want, inp.float())
    check("gelu_out", out, want)
    dinp = poisoned(B, T, 4 * C)
    gelu.gelu_backward(dinp, inp, dout)
    reference.gelu_backward(want, inp.float(), dout.float())
    check("gelu_dinp", dinp, want)
    in_place = dout.clone()  # the model's use: dinp is dout
    gelu.gelu_backward(in_place, inp, in_place)
    assert torch.equal(in_place, dinp), "in-place gelu_backward differs from out-of-place"


# ---------------------------------------------------------------- bias gradient
@pytest.mark.parametrize("N,OC", BIAS_SHAPES)
def test_bias_backward(ops, N, OC):
    dout, dbias0 = bf16(N, OC), bf16(OC)
    dbias = dbias0.clone()
    ops["bias"].backward(dbias, dout)
    check_accumulated("dbias", dbias, dbias0, dout.float().sum(dim=0))
    twice_equal(lambda db: ops["bias"].backward(db, dout), [dbias0])


def test_bias_backward_of_a_column_slice_with_sums(ops):
    """dout a column slice of a wider gradient (rows 3C apart, as the queries' part of dqkv), and
    phase 2's fp32 sums: the same bits as the contiguous copy, and dbias gained exactly the sums."""
    N, C = 4096, 768
    wide = bf16(N, 3 * C)
    dbias0 = bf16(C)
    strided, contiguous = dbias0.clone(), dbias0.clone()
    sums = poisoned(C, dtype=torch.float32)
    ops["bias"].backward(strided, wide[:, :C], sums=sums)
    ops["bias"].backward(contiguous, wide[:, :C].contiguous())
    assert torch.equal(strided, contiguous)
    assert torch.equal(strided, (dbias0.float() + sums).to(torch.bfloat16))
    check_accumulated("dbias", strided, dbias0, wide[:, :C].float().sum(dim=0))


@pytest.mark.parametrize("N,NH,C", [(512, 12, 768), (2048, 25, 1600), (64, 1, 64)])
def test_qkv_bias_backward(ops, N, NH, C):
    """The queries' column sums, the keys' zero (left as they were) and the values' from the
    projection's sums through its weight, against the reference on the same inputs in fp32."""
    dqkv, dproj_sum = bf16(N, 3 * C), torch.randn(C, device="cuda") * N ** 0.5
    w = bf16(C, C, scale=C ** -0.5)
    dbias0 = bf16(3 * C)
    dbias = dbias0.clone()
    ops["bias"].qkv_backward(dbias, dqkv, dproj_sum, w)
    want = torch.zeros(3 * C, device="cuda")
    reference.qkv_bias_backward(want, dqkv.float(), dproj_sum, w.float())
    check_accumulated("dbias", dbias, dbias0, want)
    assert torch.equal(dbias[C:2 * C], dbias0[C:2 * C]), "the keys' bias gradient is zero: untouched"
    twice_equal(lambda db: ops["bias"].qkv_backward(db, dqkv, dproj_sum, w), [dbias0])


def test_checks_raise_clear_errors(ops):
    x32 = torch.zeros(8, 64, device="cuda")
    with pytest.raises(ValueError, match="bfloat16"):
        ops["gelu"].gelu_forward(x32, x32)
    odd = bf16(2, 3, 100)  # C % 8 != 0
    with pytest.raises(ValueError, match="multiple of 8"):
        ops["layernorm"].layernorm_forward(odd, torch.zeros(2, 3, device="cuda"), torch.zeros(2, 3, device="cuda"),
                                           odd, bf16(100), bf16(100))
    with pytest.raises(ValueError, match="multiple of 8"):
        ops["bias"].backward(bf16(100), odd.view(6, 100))
