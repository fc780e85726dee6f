"""cuBLASLt matmuls with their epilogues (bias, GELU + aux, dGELU) and the bias gradient against the
reference backend in fp32 on the same bf16 inputs. Overwritten outputs are poisoned with NaN;
accumulated ones start from random values and are compared as before + reference increment."""
import pytest
import torch

from distgpt.backends import reference
from gpu_check import assert_close, requires_gpu, twice_equal

pytestmark = [pytest.mark.gpu, requires_gpu]

# (atol, rtol): the products sum K = C (forward) or N (weight gradient) O(1) terms in fp32, so
# they differ from the reference's by summation order, ~sqrt(K) * 6e-8 relative to sqrt(K), far
# below the final bf16 rounding (2^-9 relative, 2^-8 at a neighbouring value): rtol 1e-2. atol
# covers results near 0 after cancellation, scaled by sqrt(K) (the size of a sum of K O(1) terms).
# The bias gradient (bias.cu) sums N O(1) rows in fp32, added to bf16 once: the same budget.
# GELU in the epilogue is the tanh form (GPT-2's), compared with the reference's; it adds one
# fp32 evaluation (~1e-6) before the same bf16 rounding.
RTOL = 1e-2
ATOL_PER_SQRT_K = 2e-3

# (N rows, C in, OC out): 768 -> 2304 is GPT-2 124M's qkv, 1600 -> 6400 the 1558M fc; 111 rows
# and OC = 24 are the awkward sizes (not multiples of any tile)
SHAPES = [(111, 64, 24), (512, 768, 2304), (256, 1600, 6400), (1024, 3072, 768)]


@pytest.fixture(scope="module")
def mm():
    from distgpt.backends.cuda.bias import BiasGradients
    from distgpt.backends.cuda.matmul import Matmuls
    m = Matmuls(BiasGradients(1600, "cuda"))  # the bias gradient's column-sum kernels
    m.plan("cuda", transpose_elements=4 * 1600 * 1600)  # every weight of SHAPES fits
    torch.manual_seed(0)
    return m


def bf16(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)


def nan(*shape):
    return torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16)


def atol(K):
    return ATOL_PER_SQRT_K * K ** 0.5


@pytest.mark.parametrize("N,C,OC", SHAPES)
@pytest.mark.parametrize("form", ["plain", "bias", "gelu", "bias + residual"])
def test_forward(mm, N, C, OC, form):
    """bias + residual: a projection writing the residual sum (cuBLASLt's C, beta = 1)."""
    inp, weight = bf16(N, C), bf16(OC, C, scale=C ** -0.5)
    bias = None if form == "plain" else bf16(OC)
    residual = bf16(N, OC) if "residual" in form else None
    residual0 = None if residual is None else residual.clone()
    out, gelu_out = nan(N, OC), (nan(N, OC) if form == "gelu" else None)
    mm.forward(out, inp, weight, bias, gelu_out, residual)
    want, want_gelu = torch.empty(N, OC, device="cuda"), torch.empty(N, OC, device="cuda")
    reference.matmul_forward(want, inp.float(), weight.float(), None if bias is None else bias.float(),
                             gelu_out=None if gelu_out is None else want_gelu,
                             residual=None if residual is None else residual.float())
    if residual is not None:
        assert torch.equal(residual, residual0), "the residual is an input: left as it was"
    assert_close(f"out ({form})", out, want, 2e-3, RTOL)  # weights scaled by C^-1/2: O(1) results
    if gelu_out is not None:
        # compared with gelu of the reference pre-activation: the bf16 rounding of out is not in it
        assert_close("gelu_out", gelu_out, want_gelu, 2e-3, RTOL)


@pytest.mark.parametrize("N,C,OC", SHAPES)
@pytest.mark.parametrize("form", ["plain", "bias", "dgelu", "dgelu transposed", "dgelu split"])
def test_backward(mm, N, C, OC, form, monkeypatch):
    """dgelu: the DGELU epilogue; dgelu transposed: the same epilogue on the weight's transpose
    (TN); dgelu split: the plain product, then our gelu_backward."""
    monkeypatch.setattr(mm, "dgelu", form.split()[1] if form.startswith("dgelu ") else "fused")
    dout, inp, weight = bf16(N, OC), bf16(N, C), bf16(OC, C, scale=OC ** -0.5)
    gelu_inp = bf16(N, C) if form.startswith("dgelu") else None
    dinp = nan(N, C)
    dweight0, dbias0 = bf16(OC, C), (bf16(OC) if form != "plain" else None)
    dweight, dbias = dweight0.clone(), (None if dbias0 is None else dbias0.clone())
    mm.backward(dinp, dweight, dbias, dout, inp, weight, gelu_inp)
    want_dinp = torch.empty(N, C, device="cuda")
    want_dw = torch.zeros(OC, C, device="cuda")
    want_db = None if dbias is None else torch.zeros(OC, device="cuda")
    reference.matmul_backward(want_dinp, want_dw, want_db, dout.float(), inp.float(), weight.float(),
                              gelu_inp=None if gelu_inp is None else gelu_inp.float())
    assert_close(f"dinp ({form})", dinp, want_dinp, 2e-3, RTOL)
    assert_close("dweight (+=)", dweight, dweight0.float() + want_dw, atol(N), RTOL)
    if dbias is not None:
        assert_close("dbias (+=)", dbias, dbias0.float() + want_db, atol(N), RTOL)


def ones_column(inp, pad=8):
    """inp (N, C) in the first C columns of (N, C + pad), ones in column C, zeros after."""
    N, C = inp.shape
    out = torch.zeros(N, C + pad, dtype=inp.dtype, device=inp.device)
    out[:, :C], out[:, C] = inp, 1
    return out


@pytest.mark.parametrize("N,C,OC", SHAPES[1:])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("product", ["fp32", "bf16"])
def test_weight_grad_bias_column(N, C, OC, accumulate, product):
    """The weight and bias gradients out of one product over the input with a column of ones:
    dweight written or added, dbias added, against the reference's column sums; the same budget
    as the column-sum kernel (one fp32 sum over N, one bf16 rounding: two with a bf16 product)."""
    from distgpt.backends.cuda.bias import BiasGradients
    from distgpt.backends.cuda.matmul import Matmuls
    m = Matmuls(BiasGradients(C, "cuda"))
    m.plan("cuda", bias_column_elements=OC * (C + 8))
    dout, inp = bf16(N, OC), bf16(N, C)
    dweight0, dbias0 = bf16(OC, C), bf16(OC)
    dweight = dweight0.clone() if accumulate else nan(OC, C)
    dbias = dbias0.clone()
    scratch = None if product == "fp32" else nan(OC, C + 8)
    m.weight_grad_bias_column(dweight, dbias, dout, ones_column(inp), accumulate, product=scratch)
    want_dw, want_db = torch.zeros(OC, C, device="cuda"), torch.zeros(OC, device="cuda")
    reference.matmul_backward(None, want_dw, want_db, dout.float(), inp.float(), bf16(OC, C).float())
    assert_close("dweight", dweight, (dweight0.float() if accumulate else 0) + want_dw, atol(N), RTOL)
    assert_close("dbias (+=)", dbias, dbias0.float() + want_db, atol(N), RTOL)


def test_weight_grad_bias_column_fp32_rounds_as_the_plain_product():
    """With the heuristic's first answers, the fp32 bias-column product rounds dweight once, as
    backward()'s beta = 1 product does: each element within one bf16 ulp of it (matmul._agrees,
    the tuner's test: the two products may sum in another order), and bitwise the same from one
    run to the next."""
    from distgpt.backends.cuda.bias import BiasGradients
    from distgpt.backends.cuda.matmul import Matmuls
    N, C, OC = 2048, 768, 3072
    m = Matmuls(BiasGradients(C, "cuda"), tune=False)
    m.plan("cuda", bias_column_elements=OC * (C + 8))
    dout, inp, weight = bf16(N, OC), bf16(N, C), bf16(OC, C)
    plain_w, plain_b = bf16(OC, C), bf16(OC)
    column_w, column_b = plain_w.clone(), plain_b.clone()
    m.backward(None, plain_w, plain_b, dout, inp, weight)
    m.weight_grad_bias_column(column_w, column_b, dout, ones_column(inp))
    from distgpt.backends.cuda.matmul import _agrees
    assert _agrees(column_w.float(), plain_w.float()), "within one bf16 ulp (or 2^-10 of the rms where it cancels)"
    assert_close("dbias", column_b, plain_b.float(), atol(N), RTOL)
    twice_equal(lambda dw, db: m.weight_grad_bias_column(dw, db, dout, ones_column(inp), False),
                [nan(OC, C), bf16(OC)])


@pytest.mark.parametrize("N,C,OC", SHAPES[1:])
@pytest.mark.parametrize("form", ["bias", "gelu"])
def test_forward_reads_rows_beside_a_ones_column(mm, N, C, OC, form):
    """inp a column slice of (N, C + 8), the plan's layernorm outputs beside their ones column:
    the qkv (bias) and fc (GELU) products against the reference, as from a contiguous inp; the
    ones are never read (K = C)."""
    inp, weight, bias = bf16(N, C), bf16(OC, C, scale=C ** -0.5), bf16(OC)
    wide = ones_column(inp)
    out, gelu_out = nan(N, OC), (nan(N, OC) if form == "gelu" else None)
    mm.forward(out, wide[:, :C], weight, bias, gelu_out)
    want, want_gelu = torch.empty(N, OC, device="cuda"), torch.empty(N, OC, device="cuda")
    reference.matmul_forward(want, inp.float(), weight.float(), bias.float(),
                             gelu_out=None if gelu_out is None else want_gelu)
    assert_close(f"out ({form}, rows C + 8 apart)", out, want, 2e-3, RTOL)
    if gelu_out is not None:
        assert_close("gelu_out (rows C + 8 apart)", gelu_out, want_gelu, 2e-3, RTOL)


def test_weight_grad_bias_column_refuses_what_it_cannot_do(mm):
    with pytest.raises(ValueError, match="do not fit"):
        mm.weight_grad_bias_column(bf16(64, 32), bf16(64), bf16(16, 64), bf16(16, 32))  # no room for ones
    with pytest.raises(RuntimeError, match="planned no scratch"):
        mm.weight_grad_bias_column(bf16(64, 32), bf16(64), bf16(16, 64), bf16(16, 40))
    inp = bf16(16, 40)
    with pytest.raises(ValueError, match="inp's own rows"):  # a ones column that is not beside inp
        mm.backward(None, bf16(64, 32), bf16(64), bf16(16, 64), inp[:, :32], bf16(64, 32), inp_ones=bf16(16, 40))


def test_dgelu_auto_measures_once_and_keeps_its_choice(mm, monkeypatch):
    """"auto" times the three forms on the first call at a shape, keeps the choice for that
    shape, and computes exactly what the chosen form computes."""
    monkeypatch.setattr(mm, "dgelu", "auto")
    monkeypatch.setattr(mm, "dgelu_choice", {})
    N, C, OC = 1024, 3072, 768
    dout, inp, weight, gelu_inp = bf16(N, OC), bf16(N, C), bf16(OC, C, scale=OC ** -0.5), bf16(N, C)
    runs = {}
    for form in ("auto", "auto", "fused", "transposed", "split"):
        mm.dgelu = form
        dinp = nan(N, C)
        mm.backward(dinp, bf16(OC, C), None, dout, inp, weight, gelu_inp)
        runs.setdefault(form, []).append(dinp)
    assert len(mm.dgelu_choice) == 1, "one shape, one measured choice"
    chosen = next(iter(mm.dgelu_choice.values()))
    assert all(torch.equal(d, runs[chosen][0]) for d in runs["auto"]), f"auto differs from its choice {chosen}"


@pytest.mark.parametrize("R,C", [(6400, 1600), (64, 128), (130, 66), (2, 2)])
def test_transpose_is_exact(R, C):
    """kernels/transpose.cu moves bits: out equals inp.t() exactly, partial edge tiles included
    (130 x 66 leaves 2-row and 2-column tiles past the 64-element tiles)."""
    from distgpt.backends.cuda.transpose import transpose
    inp = bf16(R, C)
    out = nan(C, R)
    transpose(out, inp)
    assert torch.equal(out, inp.t())


def test_transpose_refuses_what_the_kernel_cannot_do():
    from distgpt.backends.cuda.transpose import transpose
    with pytest.raises(ValueError, match="must be even"):
        transpose(nan(64, 63), bf16(63, 64))
    with pytest.raises(ValueError, match="transposed"):
        transpose(nan(64, 64), bf16(64, 32))


def test_dgelu_transposed_form_needs_its_planned_scratch(monkeypatch):
    """A Matmuls planned without transpose scratch has no "transposed" form: asked for it by
    name, it says so; "auto" chooses between the other two."""
    from distgpt.backends.cuda.matmul import Matmuls
    m = Matmuls()
    m.plan("cuda")
    N, C, OC = 256, 1024, 256
    args = (nan(N, C), bf16(OC, C), None, bf16(N, OC), bf16(N, C), bf16(OC, C), bf16(N, C))
    m.dgelu = "transposed"
    with pytest.raises(ValueError, match="transpose_elements"):
        m.backward(*args)
    m.dgelu = "auto"
    m.backward(*args)
    assert set(m.dgelu_choice.values()) <= {"fused", "split"}


def test_residual_must_be_its_own_buffer(mm):
    out = bf16(8, 16)
    with pytest.raises(ValueError, match="another buffer than out"):
        mm.forward(out, bf16(8, 32), bf16(16, 32), bf16(16), residual=out)


def test_backward_deterministic(mm):
    N, C, OC = 2048, 768, 3072
    dout, inp, weight, gelu_inp = bf16(N, OC), bf16(N, C), bf16(OC, C), bf16(N, C)
    twice_equal(lambda dinp, dw, db: mm.backward(dinp, dw, db, dout, inp, weight, gelu_inp),
                [nan(N, C), bf16(OC, C), bf16(OC)])


def test_no_allocation_after_plan(mm):
    N, C, OC = 512, 768, 3072
    inp, weight, bias = bf16(N, C), bf16(OC, C), bf16(OC)
    pre, act = nan(N, OC), nan(N, OC)
    mm.forward(pre, inp, weight, bias, act)  # first call makes the plans
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        mm.forward(pre, inp, weight, bias, act)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_tuning_times_once_keeps_its_choice_and_restores_the_accumulator():
    """tune=True: each plan's first call times the heuristic's candidates and keeps one; the
    weight gradient (beta = 1) still ends as before + the product (the timed runs added into
    it, and it was put back); a second call takes the same algorithm: the same increment, bitwise."""
    from distgpt.backends.cuda.bias import BiasGradients
    from distgpt.backends.cuda.matmul import Matmuls
    m = Matmuls(BiasGradients(768, "cuda"), dgelu="fused", tune=True)
    m.plan("cuda")
    N, C, OC = 4096, 768, 2304
    dout, inp, weight = bf16(N, OC), bf16(N, C), bf16(OC, C, scale=OC ** -0.5)
    dweight0 = bf16(OC, C)
    dweight, dinp = dweight0.clone(), nan(N, C)
    m.backward(dinp, dweight, None, dout, inp, weight)
    assert len(m.plans) == 2 and all(p.choice is not None for p in m.plans.values())
    assert any(p.candidates > 1 for p in m.plans.values()), "the heuristic offered one algorithm only"
    want_dinp, want_dw = torch.empty(N, C, device="cuda"), torch.zeros(OC, C, device="cuda")
    reference.matmul_backward(want_dinp, want_dw, None, dout.float(), inp.float(), weight.float())
    assert_close("dinp (tuned)", dinp, want_dinp, 2e-3, RTOL)
    assert_close("dweight (+=, tuned)", dweight, dweight0.float() + want_dw, atol(N), RTOL)
    choices = {k: p.choice for k, p in m.plans.items()}
    zeros_a, zeros_b = torch.zeros_like(dweight), torch.zeros_like(dweight)
    m.backward(nan(N, C), zeros_a, None, dout, inp, weight)
    m.backward(nan(N, C), zeros_b, None, dout, inp, weight)
    assert {k: p.choice for k, p in m.plans.items()} == choices
    assert torch.equal(zeros_a, zeros_b)
