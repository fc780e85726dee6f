"""Our CUDA classifier, AdamW and gradient-norm kernels against the reference backend run in fp64
on the same inputs (upcast), at several sizes including odd lengths and slices inside bigger
buffers. Overwritten outputs are poisoned with NaN first; every op run twice on the same inputs
must give bitwise equal results."""
import functools
from types import SimpleNamespace

import pytest
import torch

from distgpt.backends import reference
from gpu_check import assert_close, planned_backend, requires_gpu, twice_equal

pytestmark = [pytest.mark.gpu, requires_gpu]

# (atol, rtol) per compared tensor, |got - want| <= atol + rtol * |want|, want in fp64.
# - losses: fp32 max + log(sum of ~5e4 exps) over bf16 logits; the sum's rounding is ~1e-6
#   relative, so the loss (~11 for GPT-2's vocabulary) is off by a few 1e-6 absolute: 1e-5 both ways.
# - dlogits: one rounding to bf16 (2^-9 relative) of an fp32 value within ~1e-6 of the exact one,
#   which may round to the neighbouring bf16 (2^-8 ~ 4e-3): rtol 1e-2. atol is 1e-3 * dloss
#   (DLOSS_SCALED), for probabilities so small that exp underflows to fp32 subnormals.
# - AdamW, inputs at the scales of adamw_inputs (grad ~1e-2, m ~1e-3, v ~1e-4, w ~2e-2): every
#   step is one or two fp32 roundings (~6e-8 relative each) of the fp64 result, plus the fp32
#   rounding of the hyperparameters: rtol 1e-6. atol covers results near 0 after cancellation:
#   ~2 ulp of the terms that cancelled (m: ulp(1e-3) ~ 1e-10; master: ulp(2e-2) ~ 2e-9).
# - norm: fp32 sums of squares, each thread's running sum over few terms, then fixed-order tree
#   sums: ~1e-6 relative at 4e7 elements; 1e-5 leaves 10x.
TOLERANCES = {
    "losses": (1e-5, 1e-5),
    "dlogits": (1e-3, 1e-2),
    "adamw_m": (1e-9, 1e-6),
    "adamw_v": (1e-15, 1e-6),
    "adamw_master": (1e-8, 1e-6),
    "norm": (0.0, 1e-5),
}
DLOSS_SCALED = {"dlogits"}
# Stochastic rounding: mean rounding error in bf16 ulps over >= 1e6 elements. Each element's error
# has standard deviation <= 0.5 ulp, so the mean's is <= 5e-4 ulp: 0.01 is 20 sigma, yet 25x
# smaller than round-to-nearest's bias on the directed test (0.25 ulp).
SR_MEAN_ULPS = 0.01

CLASSIFIER_SHAPES = [(2, 64, 50257, 50304), (1, 7, 65, 72), (3, 5, 1000, 1024), (2, 3, 512, 512), (4, 33, 4097, 4104)]
SIZES = [1, 7, 8, 4099, 1_000_003]
HYPER = [dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=7, grad_scale=0.5),
         dict(lr=6e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, grad_scale=1.0)]


@pytest.fixture(scope="module")
def ops():
    from distgpt.backends.cuda import classifier
    backend = planned_backend(1, 64, 64, 1)
    torch.manual_seed(0)
    return {"classifier": backend, "classifier module": classifier, "adamw": backend, "norm": backend}


def check(name, got, want, scale=1.0):
    atol, rtol = TOLERANCES[name]
    return assert_close(name, got, want, atol * scale if name in DLOSS_SCALED else atol, rtol)


# ---------------------------------------------------------------- classifier
def classifier_inputs(B, T, V, Vp):
    """Spread logits with NaN in the padding (must never be read), one row whose target dominates
    (loss ~ 0), and targets at both ends of the vocabulary."""
    logits = (torch.randn(B, T, Vp, device="cuda") * 4).to(torch.bfloat16)
    logits[..., V:] = float("nan")
    targets = torch.randint(0, V, (B, T), device="cuda")
    targets.view(-1)[0], targets.view(-1)[-1] = 0, V - 1
    logits.view(-1, Vp)[-1, V - 1] = 40.0
    return logits, targets


def use_kernel(ops, monkeypatch, kernel, V):
    """Route fused_classifier to one of its two kernels: "smem" (the row in shared memory, skipped
    where the row does not fit this device) or "two_pass" (the fallback for rows that do not)."""
    if kernel == "smem" and not ops["classifier module"].smem_row_fits(V):
        pytest.skip(f"a row of V={V} does not fit this device's shared memory per block")
    monkeypatch.setattr(ops["classifier"], "classifier_one_pass", kernel == "smem")


@pytest.mark.parametrize("B,T,V,Vp", CLASSIFIER_SHAPES)
@pytest.mark.parametrize("dloss_kind", ["mean", "zero"])
@pytest.mark.parametrize("kernel", ["smem", "two_pass"])
def test_fused_classifier(ops, monkeypatch, kernel, B, T, V, Vp, dloss_kind):
    use_kernel(ops, monkeypatch, kernel, V)
    dloss = 1.0 / (B * T) if dloss_kind == "mean" else 0.0
    logits0, targets = classifier_inputs(B, T, V, Vp)
    logits, losses = logits0.clone(), torch.full((B, T), float("nan"), device="cuda")
    ops["classifier"].fused_classifier(logits, losses, targets, V, dloss)
    want_logits, want_losses = logits0.double(), torch.empty(B, T, dtype=torch.float64, device="cuda")
    reference.fused_classifier(want_logits, want_losses, targets, V, dloss)
    check("losses", losses, want_losses)
    if dloss:
        check("dlogits", logits[..., :V], want_logits[..., :V], scale=dloss)
    else:  # validation: zeros everywhere (a relative budget around 0 would be 0 / 0)
        assert (logits == 0).all(), "dloss = 0 must leave an all-zero gradient"
    assert (logits[..., V:] == 0).all(), "padding columns of dlogits must be exactly 0"
    twice_equal(lambda lg, ls: ops["classifier"].fused_classifier(lg, ls, targets, V, dloss),
                [logits0, torch.full((B, T), float("nan"), device="cuda")])


@pytest.mark.parametrize("kernel", ["smem", "two_pass"])
def test_fused_classifier_bad_target_gives_nan_loss(ops, monkeypatch, kernel):
    use_kernel(ops, monkeypatch, kernel, 65)
    logits, targets = classifier_inputs(1, 4, 65, 72)
    targets[0, 1] = 65  # == V: out of range
    losses = torch.zeros(1, 4, device="cuda")
    ops["classifier"].fused_classifier(logits, losses, targets, 65, 0.25)
    assert torch.isnan(losses[0, 1]) and torch.isfinite(losses[0, [0, 2, 3]]).all()


@pytest.mark.parametrize("B,T,V,Vp", [CLASSIFIER_SHAPES[0], CLASSIFIER_SHAPES[-1]])
def test_fused_classifier_kernels_bitwise_equal(ops, monkeypatch, B, T, V, Vp):
    """The shared-memory kernel and the two-pass fallback share their thread layout and arithmetic
    (classifier.cu): the same losses and gradients to the bit, so where a row fits does not change
    a run's numbers."""
    logits0, targets = classifier_inputs(B, T, V, Vp)
    runs = []
    for kernel in ("smem", "two_pass"):
        use_kernel(ops, monkeypatch, kernel, V)
        logits, losses = logits0.clone(), torch.full((B, T), float("nan"), device="cuda")
        ops["classifier"].fused_classifier(logits, losses, targets, V, 1.0 / (B * T))
        runs.append((logits, losses))
    assert torch.equal(runs[0][1], runs[1][1]), "losses differ between the two kernels"
    assert torch.equal(runs[0][0], runs[1][0]), "dlogits differ between the two kernels"


# ---------------------------------------------------------------- lm head + classifier in chunks
# (rows N, chunk rows R, C, V, Vp): GPT-2's vocabulary in 3 chunks (the last one partial); 5
# chunks of 8 rows, the last of 5; exactly one chunk; a scratch with more rows than the step
LM_HEAD_SHAPES = [(1000, 384, 768, 50257, 50304), (37, 8, 32, 1000, 1024), (64, 64, 64, 65, 72),
                  (48, 64, 64, 65, 72)]


def lm_head_tolerances(name, chunks):
    """(atol, rtol) for the CUDA lm_head_loss against the reference in fp64 on the same bf16
    inputs, at the scales of lm_head_inputs (logits ~ N(0, 2)); atol is in units of the scale
    lm_head_scale gives. Set from an fp32/bf16 emulation of the kernels' roundings (worst over
    4 seeds of these shapes: 41% of the losses budget, 37% of dlnf's, 30% of dwte's):
    - losses: the logits are rounded to bf16 (2^-9 relative) before the softmax, which moves the
      target's logit and the log-sum-exp by up to |logit| * 2^-9 (|logit| <= ~12): measured 1.8e-2
      absolute at most; 3e-2 + 5e-3 relative.
    - dlnf = dlogits @ wte, scale dloss * max|wte|: dlogits carry the bf16 logits' softmax error
      (~1e-2 relative) plus their own bf16 rounding, and the sum over V cancels (sum of
      p - onehot is 0): measured <= 5e-3 of the scale; 1.5e-2 of it, and 1e-2 relative.
    - dwte += dlogits^T @ lnf, scale dloss * max|lnf|: the same dlogits error (measured <= 6e-3
      of the scale) plus one bf16 rounding of the running sum per chunk (2^-9 of partial sums
      of a few times the scale each): 1e-2 + 2^-8 per chunk of the scale, and 1e-2 relative."""
    return {"losses": (3e-2, 5e-3), "dlnf": (1.5e-2, 1e-2),
            "dwte": (1e-2 + chunks * 2 ** -8, 1e-2)}[name]


@pytest.fixture
def lm_head_cuda():
    from distgpt.backends.cuda import classifier
    from distgpt.backends.cuda.matmul import Matmuls

    def planned(N, C):  # the lm head's functions over planned matmuls, as the backend calls them
        matmuls = Matmuls()
        matmuls.plan("cuda")
        return SimpleNamespace(lm_head_loss=functools.partial(classifier.lm_head_loss, matmuls),
                               lm_head_logits=functools.partial(classifier.lm_head_logits, matmuls))
    return planned


def lm_head_inputs(N, C, V, Vp):
    """lnf ~ N(0, 1) as a layernorm gives; wte scaled so logits ~ N(0, 2), its padding rows
    random too (they must get no gradient); targets at both ends of the vocabulary; a prior
    dwte of the gradient's own size (it must accumulate)."""
    lnf = torch.randn(N, C, device="cuda").to(torch.bfloat16)
    wte = (torch.randn(Vp, C, device="cuda") * 2 / C ** 0.5).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[0], targets[-1] = 0, V - 1
    dwte0 = (torch.randn(Vp, C, device="cuda") * 1e-3 / N ** 0.5).to(torch.bfloat16)
    return lnf, wte, targets, dwte0


@pytest.mark.parametrize("N,R,C,V,Vp", LM_HEAD_SHAPES)
@pytest.mark.parametrize("dloss_kind", ["mean", "zero"])
def test_lm_head_loss(lm_head_cuda, N, R, C, V, Vp, dloss_kind):
    cuda = lm_head_cuda(N, C)
    dloss = 1.0 / N if dloss_kind == "mean" else 0.0
    lnf, wte, targets, dwte0 = lm_head_inputs(N, C, V, Vp)
    nan = dict(dtype=torch.bfloat16, device="cuda")
    losses0 = torch.full((N,), float("nan"), device="cuda")
    # dlnf is overwritten when there is a gradient; with dloss 0 it must keep its contents
    dlnf0 = torch.full((N, C), float("nan"), **nan) if dloss else torch.randn(N, C, **nan)
    scratch0 = torch.full((R, Vp), float("nan"), **nan)
    losses, dlnf, dwte, scratch = losses0.clone(), dlnf0.clone(), dwte0.clone(), scratch0.clone()
    cuda.lm_head_loss(losses, dlnf, dwte, lnf, wte, targets, V, dloss, scratch)
    f64 = dict(dtype=torch.float64, device="cuda")
    want_losses, want_dlnf, want_dwte = torch.empty(N, **f64), torch.empty(N, C, **f64), dwte0.double()
    reference.lm_head_loss(want_losses, want_dlnf, want_dwte, lnf.double(), wte.double(), targets, V,
                           dloss, torch.empty(R, Vp, **f64))
    chunks = -(-N // R)
    assert_close("lm head losses", losses, want_losses, *lm_head_tolerances("losses", chunks))
    if dloss:
        for name, got, want, scale in (("dlnf", dlnf, want_dlnf, dloss * wte.double().abs().max()),
                                       ("dwte", dwte, want_dwte, dloss * lnf.double().abs().max())):
            atol, rtol = lm_head_tolerances(name, chunks)
            assert_close(f"lm head {name}", got, want, atol * float(scale), rtol)
        assert torch.equal(dwte[V:], dwte0[V:]), "padded vocabulary rows of dwte must not change"
    else:
        assert torch.equal(dlnf, dlnf0) and torch.equal(dwte, dwte0), "dloss 0 must leave dlnf, dwte untouched"
    twice_equal(lambda ls, dl, dw, sc: cuda.lm_head_loss(ls, dl, dw, lnf, wte, targets, V, dloss, sc),
                [losses0, dlnf0, dwte0, torch.zeros_like(scratch0)])  # rows past N stay unwritten: not NaN


def test_lm_head_logits(lm_head_cuda):
    """Sampling's lm head: the matmul alone, into a (b, t, Vp) view of the scratch."""
    cuda = lm_head_cuda(24, 64)
    lnf, wte, _, _ = lm_head_inputs(24, 64, 65, 72)
    scratch = torch.full((30, 72), float("nan"), dtype=torch.bfloat16, device="cuda")
    logits = scratch[:24].view(2, 12, 72)
    cuda.lm_head_logits(logits, lnf.view(2, 12, 64), wte)
    # fp32 accumulation rounded once to bf16: 2^-9 relative, 1e-2 leaves a margin for the sum
    assert_close("lm head logits", logits, lnf.double().view(2, 12, 64) @ wte.double().t(), 1e-3, 1e-2)
    assert scratch[24:].isnan().all(), "rows past the view must not be written"


# ---------------------------------------------------------------- AdamW
def adamw_inputs(n, pad=0):
    """(param, grad, m, v, master), each n + 2 * pad long: bf16 grad, fp32 m, v >= 0 and master
    at the scales the tolerances assume, and the bf16 param poisoned (the update overwrites it)."""
    N = n + 2 * pad
    grad = (torch.randn(N, device="cuda") * 1e-2).to(torch.bfloat16)
    m, v = torch.randn(N, device="cuda") * 1e-3, torch.rand(N, device="cuda") * 1e-4
    master = torch.randn(N, device="cuda") * 2e-2
    param = torch.full((N,), float("nan"), dtype=torch.bfloat16, device="cuda")
    return param, grad, m, v, master


def adamw_reference(grad, m, v, master, h):
    """The reference in fp64 with master as its own param: returns (m, v, master)."""
    m64, v64, w64 = m.double(), v.double(), master.double()
    reference.adamw_update(w64, grad.double(), m64, v64, None, **_args(h))
    return m64, v64, w64


def _args(h):
    return dict(lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"], weight_decay=h["weight_decay"],
                step=h["step"], grad_scale=h["grad_scale"])


def ulp_and_check_neighbours(param, master):
    """param (bf16) must be master truncated toward zero, or the next bf16 away from zero (only
    when master is not a bf16 itself). Returns |param| - |master| in units of that bf16 gap: in
    [-1, 1], > 0 where it rounded away from zero; its mean is 0 for unbiased rounding."""
    bits = master.view(torch.int32)
    down_bits = bits & -65536  # clear the 16 bits bf16 drops: rounds toward zero
    down, up = down_bits.view(torch.float32), (down_bits + 65536).view(torch.float32)
    p = param.float()
    ok = (p == down) | (((bits & 65535) != 0) & (p == up))
    bad = int((~ok).sum())
    assert bad == 0, f"{bad} params are not a bf16 neighbour of their master, e.g. index {int((~ok).nonzero()[0])}"
    return (p.double().abs() - master.double().abs()) / (up.double() - down.double()).abs()


def adamw_step(ops, param, grad, m, v, master, seed=0, **h):
    """One CUDA AdamW step on an fp32 master: stored split (the parameter as the previous step
    rounded it, and the low halves) for the update, joined back into `master` after it."""
    low = torch.full(param.shape, -1, dtype=torch.int16, device="cuda")
    ops.master_split(param, low, master, seed, h["step"] - 1)
    ops.adamw_update(param, grad, m, v, low, **h, seed=seed)
    ops.master_join(master, param, low, seed, h["step"])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("h", HYPER, ids=["decay_clip", "plain_step1"])
def test_adamw_update(ops, n, h):
    param, grad, m, v, master = adamw_inputs(n)
    m0, v0, master0 = m.clone(), v.clone(), master.clone()
    adamw_step(ops["adamw"], param, grad, m, v, master, **_args(h), seed=123)
    want_m, want_v, want_w = adamw_reference(grad, m0, v0, master0, h)
    check("adamw_m", m, want_m)
    check("adamw_v", v, want_v)
    check("adamw_master", master, want_w)
    err = ulp_and_check_neighbours(param, master)
    if n >= 1_000_000:
        mean = float(err.mean())
        assert abs(mean) < SR_MEAN_ULPS, f"stochastic rounding biased: mean error {mean:.4f} ulp"
    twice_equal(lambda *b: adamw_step(ops["adamw"], *b, **_args(h), seed=123), [param, grad, m0, v0, master0])


def test_split_master_round_trips_every_bit(ops):
    """Any finite fp32 master (and +-inf, +-0, subnormals, the largest finite, values a carry
    takes across an exponent), split at a step and joined at the same step, comes back bit for
    bit, and its parameter is one of its two bf16 neighbours; a NaN comes back a NaN."""
    n = 1_000_003
    bits = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
    special = torch.tensor([0x00000000, -2**31, 0x00000001, 0x007fffff, 0x7f7fffff, -0x00800001, 0x3f7fffff,
                            0x3f80ffff, 0x7f800000, -0x00800000, 0x7fc00000, 0x7f800001], dtype=torch.int32,
                           device="cuda")
    bits[:len(special)] = special
    values = bits.view(torch.float32)
    nan = values.isnan()
    for step in (0, 1, 12345):
        param = torch.full((n,), float("nan"), dtype=torch.bfloat16, device="cuda")
        low = torch.empty(n, dtype=torch.int16, device="cuda")
        ops["adamw"].master_split(param, low, values, 17, step)
        back = torch.full((n,), float("nan"), device="cuda")
        ops["adamw"].master_join(back, param, low, 17, step)
        assert torch.equal(back.view(torch.int32)[~nan], bits[~nan]), f"step {step}: masters changed"
        assert back[nan].isnan().all(), f"step {step}: a NaN master came back a number"
        finite = values.isfinite() & ~(param.float().isinf())  # the largest finite may round up to inf
        ulp_and_check_neighbours(param[finite], values[finite])
        assert (low == (bits & 0xffff).to(torch.int16)).all(), "low halves are not the masters' low 16 bits"


def test_split_master_steps_match_fp32_masters_every_step(ops):
    """Ten steps on split masters that carry the rounding from step to step: after each, the joined
    master is the reference's step from the previous joined master (so every carry was found),
    and the same ten steps with the master joined to fp32 and split again between steps are
    bitwise equal (the split form holds exactly what an fp32 master would)."""
    n = 100_003
    param, grad, m, v, master = adamw_inputs(n)
    low = torch.empty(n, dtype=torch.int16, device="cuda")
    ops["adamw"].master_split(param, low, master, 40, 0)
    other = [param.clone(), m.clone(), v.clone(), master.clone()]
    joined = torch.empty(n, device="cuda")
    for step in range(1, 11):
        h = dict(HYPER[0], step=step, lr=3e-2)  # big steps: many parameters change their bf16 every step
        g = (torch.randn(n, device="cuda") * 1e-2).to(torch.bfloat16)
        before = joined.clone() if step > 1 else master.clone()
        m0, v0 = m.clone(), v.clone()
        ops["adamw"].adamw_update(param, g, m, v, low, **_args(h), seed=40)
        ops["adamw"].master_join(joined, param, low, 40, step)
        want_m, want_v, want_w = adamw_reference(g, m0, v0, before, h)
        check("adamw_master", joined, want_w)
        check("adamw_m", m, want_m)
        adamw_step(ops["adamw"], other[0], g, other[1], other[2], other[3], **_args(h), seed=40)
        assert torch.equal(joined, other[3]) and torch.equal(param, other[0]), f"step {step}: split != fp32"
    changed = float((param.float() != ulp_round_down(master)).double().mean())
    assert changed > 0.5, f"only {changed:.2f} of the parameters moved: the test did not exercise the carry"


def ulp_round_down(x):
    return (x.view(torch.int32) & -65536).view(torch.float32)


@pytest.mark.parametrize("n", [4099, 1_000_003])
def test_adamw_slice_leaves_the_rest_untouched(ops, n):
    pad = 24  # the slice starts 24 elements in: 16-byte aligned in the bf16 and fp32 buffers
    bufs = adamw_inputs(n, pad)
    bufs[0].fill_(1.5)  # param outside the slice must keep this
    low = torch.full((n + 2 * pad,), 7, dtype=torch.int16, device="cuda")
    before = [b.clone() for b in bufs] + [low.clone()]
    param, grad, m, v, master = (b[pad:pad + n] for b in bufs)
    ops["adamw"].master_split(param, low[pad:pad + n], master, pad, HYPER[0]["step"] - 1)
    ops["adamw"].adamw_update(param, grad, m, v, low[pad:pad + n], **_args(HYPER[0]), seed=pad)
    for name, b, b0 in zip(("param", "grad", "m", "v", "master", "master low halves"), list(bufs) + [low], before):
        outside_same = torch.equal(b[:pad], b0[:pad]) and torch.equal(b[pad + n:], b0[pad + n:])
        assert outside_same, f"{name} written outside the slice"
    ops["adamw"].master_join(master, param, low[pad:pad + n], pad, HYPER[0]["step"])
    want_m, want_v, want_w = adamw_reference(grad, before[2][pad:pad + n], before[3][pad:pad + n],
                                             before[4][pad:pad + n], HYPER[0])
    check("adamw_m", m, want_m)
    check("adamw_v", v, want_v)
    check("adamw_master", master, want_w)
    ulp_and_check_neighbours(param, master)


def test_adamw_stochastic_rounding_is_unbiased(ops):
    """lr = 0 keeps master fixed at 1/4 of a bf16 gap past a bf16 value (in magnitude): rounding to
    nearest would always round back (mean error -0.25 ulp); stochastic rounding goes away from
    zero 1 time in 4 (mean 0)."""
    n = 1_000_000
    base = torch.randn(n, device="cuda").to(torch.bfloat16).float()
    master = (base.view(torch.int32) | 0x4000).view(torch.float32)  # low 16 bits = 1/4 of the gap
    master0 = master.clone()
    param = torch.full((n,), float("nan"), dtype=torch.bfloat16, device="cuda")
    zeros = torch.zeros(n, device="cuda")
    adamw_step(ops["adamw"], param, zeros.to(torch.bfloat16), zeros.clone(), zeros.clone(), master,
               lr=0.0, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=3, grad_scale=1.0)
    assert torch.equal(master, master0), "lr = 0 must leave master unchanged"
    err = ulp_and_check_neighbours(param, master)
    up = float((err > 0).double().mean())
    assert abs(up - 0.25) < 0.01, f"rounded away from zero {up:.4f} of the time, expected 0.25"
    assert abs(float(err.mean())) < SR_MEAN_ULPS, f"mean rounding error {float(err.mean()):.4f} ulp"


def test_adamw_seed(ops):
    """The same seed rounds identically; another seed rounds differently somewhere, master the same."""
    start = adamw_inputs(4099)

    def run(seed):
        bufs = [b.clone() for b in start]
        adamw_step(ops["adamw"], *bufs, **_args(HYPER[0]), seed=seed)
        return bufs

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a[0], b[0]), "same seed, different bf16 params"
    assert torch.equal(a[4], c[4]), "the seed must not change the fp32 master"
    assert not torch.equal(a[0], c[0]), "a different seed rounded every element the same way"


def test_adamw_split_slices_match_one_slice(ops):
    """Cut like a ZeRO-1 shard boundary, with seed = each piece's offset: bitwise the same as one call."""
    n, cut = 1_000_003, 8 * 12345
    whole = adamw_inputs(n)
    pieces = [b.clone() for b in whole]
    adamw_step(ops["adamw"], *whole, **_args(HYPER[0]), seed=1000)
    adamw_step(ops["adamw"], *(b[:cut] for b in pieces), **_args(HYPER[0]), seed=1000)
    adamw_step(ops["adamw"], *(b[cut:] for b in pieces), **_args(HYPER[0]), seed=1000 + cut)
    for name, a, b in zip(("param", "grad", "m", "v", "master"), whole, pieces):
        assert torch.equal(a, b), f"{name} differs between one slice and two"


def test_adamw_fp32_param_is_its_own_master(ops):
    _, grad, m, v, w = adamw_inputs(4099)
    grad, m0, v0, w0 = grad.float(), m.clone(), v.clone(), w.clone()
    ops["adamw"].adamw_update(w, grad, m, v, None, **_args(HYPER[0]))
    want_m, want_v, want_w = adamw_reference(grad, m0, v0, w0, HYPER[0])
    check("adamw_m", m, want_m)
    check("adamw_master", w, want_w)
    param, grad, m, v, _ = adamw_inputs(16)
    with pytest.raises(ValueError, match="master"):
        ops["adamw"].adamw_update(param, grad, m, v, None, **_args(HYPER[0]))


# ---------------------------------------------------------------- global gradient norm
@pytest.mark.parametrize("n", [0] + SIZES + [40_000_001])
def test_global_norm_squared(ops, n):
    grad = torch.randn(n, device="cuda").to(torch.bfloat16)
    out = torch.full((1,), float("nan"), device="cuda")
    ops["norm"].global_norm_squared(out, grad)
    if n == 0:
        assert out.item() == 0.0
        return
    want = torch.empty(1, dtype=torch.float64, device="cuda")
    reference.global_norm_squared(want, grad.double())
    check("norm", out, want)
    twice_equal(lambda o: ops["norm"].global_norm_squared(o, grad), [out])


def test_global_norm_squared_of_a_slice(ops):
    """A slice 8 elements into a buffer whose other elements are NaN: none of them may be read."""
    n = 1_000_003
    buf = torch.full((n + 24,), float("nan"), dtype=torch.bfloat16, device="cuda")
    buf[8:8 + n] = torch.randn(n, device="cuda").to(torch.bfloat16)
    out = torch.full((1,), float("nan"), device="cuda")
    ops["norm"].global_norm_squared(out, buf[8:8 + n])
    want = torch.empty(1, dtype=torch.float64, device="cuda")
    reference.global_norm_squared(want, buf[8:8 + n].double())
    check("norm", out, want)


# ---------------------------------------------------------------- the spike guard
def test_spike_guard_matches_the_reference(ops):
    """The same decisions, the same clip scales left and the same window to the bit: both sum
    the window oldest first with one rounding per double operation (kernels/norm.cu)."""
    from distgpt.config import TrainConfig
    from distgpt.spikes import SpikeGuard
    from test_spikes import MIN_SAMPLES, W, Z, guarded, plain_verdicts, sequence
    cfg = TrainConfig(skip_window=W, skip_min_samples=MIN_SAMPLES, skip_loss_zscore=Z, skip_norm_zscore=Z)
    values = sequence(60)
    cuda_guard, ref_guard = SpikeGuard(cfg, ops["norm"], torch.device("cuda")), SpikeGuard(cfg, reference, "cpu")
    got, want = guarded_on(values, cuda_guard), guarded(values, ref_guard)
    # the injected events and whatever the random walk itself makes an outlier, as the spec says
    assert got == want and want[0] == plain_verdicts(values, W, MIN_SAMPLES, Z, Z)[0]
    assert sum(r is not None for r in want[0]) >= 5
    assert cuda_guard.state_dict() == ref_guard.state_dict()


def guarded_on(values, guard):
    """test_spikes.guarded with the scalars on the GPU."""
    reasons, scales = [], []
    scale = torch.zeros(1, dtype=torch.float32, device="cuda")
    for loss, norm in values:
        scale.fill_(0.5)
        guard.check(scale, torch.tensor([loss], dtype=torch.float64, device="cuda"),
                    torch.tensor([norm], dtype=torch.float64, device="cuda"))
        reasons.append(guard.skipped())
        scales.append(scale.item())
    return reasons, scales


@pytest.mark.parametrize("n", [7, 4099])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_adamw_zero_scale_leaves_everything_as_it_was_even_for_nan(ops, n, dtype):
    """grad_scale 0 (a skipped step) with NaN and Inf in the gradient: m, v and the master come
    back bitwise as they were (bf16: stored split, re-rounded and joined again; fp32: the
    parameter is its own master), where a zero gradient moves them."""
    param, grad, m, v, master = adamw_inputs(n)
    if dtype == torch.float32:
        param, grad, master = master, grad.float(), None
    grad[0], grad[n // 2], grad[-1] = float("nan"), float("inf"), -float("inf")
    h = _args(HYPER[0])

    def update(g, scale):
        bufs = [param.clone(), m.clone(), v.clone(), None if master is None else master.clone()]
        if master is None:
            ops["adamw"].adamw_update(bufs[0], g, bufs[1], bufs[2], None, **dict(h, grad_scale=scale), seed=9)
        else:
            adamw_step(ops["adamw"], bufs[0], g, bufs[1], bufs[2], bufs[3], **dict(h, grad_scale=scale), seed=9)
        return bufs

    skipped = update(grad, torch.zeros(1, device="cuda"))
    for name, a, b in zip(("param", "m", "v", "master"), skipped, (param, m, v, master)):
        if a is not None and not (name == "param" and master is not None):  # bf16 param: re-rounded
            assert torch.equal(a, b), f"{name}: a skipped step changed it"
    if master is not None:  # the re-rounded parameter is one of the master's two bf16 neighbours
        ulp_and_check_neighbours(skipped[0], master)
    zero = update(torch.zeros_like(grad), 1.0)
    assert not torch.equal(zero[1], m), "a zero gradient decays m: the skip is not that"
