"""The reference backend: every op of the GPT-2 training step in plain PyTorch.

This file is the specification. `backends/cuda/` provides the same functions with the same
argument order, and every CUDA op is tested against the function of the same name here; each
function here is tested against torch autograd in float64 (tests/test_reference_ops.py).

Conventions (shared by every backend):
- Every op writes into outputs the caller preallocated; nothing here allocates a result that
  outlives the call, so the model's memory is planned once (model/layout.py).
- Forward and backward of each layer sit side by side.
- Parameter gradients ACCUMULATE (+=), so gradient-accumulation micro-batches add up; the
  trainer zeroes them once per optimizer step. Activation gradients OVERWRITE, with one
  exception: layernorm_backward ADDS into `dinp`, because a layernorm's input is the residual
  stream, whose gradient also arrives along the skip connection.
- Shapes: B batch, T time, C channels, NH heads, HS = C // NH, V vocab, Vp padded vocab
  (V rounded up for the kernels; padded columns never carry loss or gradient).
- Tensors may live on any device and have any float dtype; statistics (layernorm mean/rstd,
  attention logsumexp, losses) are kept in the buffers' own dtype here, in fp32 on the GPU.
"""
import math

import torch

LAYERNORM_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


# ---------------------------------------------------------------- encoder: token + position
def encoder_forward(out, tokens, wte, wpe):
    """out (B,T,C) = wte[tokens] + wpe[:T]; tokens (B,T) int, wte (Vp,C), wpe (maxT,C)."""
    T = tokens.shape[1]
    torch.add(wte[tokens], wpe[:T], out=out)


def encoder_backward(dwte, dwpe, dout, tokens):
    """dwte, dwpe += the scatter of dout (B,T,C) back to the rows that were read."""
    B, T, C = dout.shape
    dwpe[:T] += dout.sum(dim=0)
    dwte.index_add_(0, tokens.reshape(-1), dout.reshape(B * T, C))


# ---------------------------------------------------------------- layernorm
def merge_amax(amax, x):
    """amax = max(amax, max |x|) in place (one element; NaN wins, as in a cast's amax): what an
    op given `amax` takes of its output, so the fp8 cast of that output skips its own pass."""
    if amax is None or x.numel() == 0:
        return
    seen = float(x.abs().max())
    amax.fill_(seen if math.isnan(seen) else max(float(amax.reshape(-1)[0]), seen))


def layernorm_forward(out, mean, rstd, inp, weight, bias, amax=None, scale=None):
    """out (B,T,C) = (inp - mean) * rstd * weight + bias; saves mean, rstd (B,T) for backward.
    amax (fp8 runs): also amax = max(amax, max |out|), of out as stored. out an e4m3 tensor (with
    amax and scale, the fp8 recipe's delayed scale): the output y in inp's dtype, amax = max(amax,
    max |y|), and out = fp8_quantize of y with that scale: the layernorm writes the cast the next
    matmul reads, and no pass reads y back."""
    if out.dtype in FP8_FORMATS.values():
        y = torch.empty_like(inp)
        layernorm_forward(y, mean, rstd, inp, weight, bias, amax)
        fp8_quantize(out, torch.zeros(1, dtype=torch.float32, device=inp.device), y, scale)
        return
    mu = inp.mean(dim=-1, keepdim=True)
    centered = inp - mu
    var = (centered * centered).mean(dim=-1, keepdim=True)  # biased, as GPT-2
    r = torch.rsqrt(var + LAYERNORM_EPS)
    out.copy_(centered * r * weight + bias)
    mean.copy_(mu.squeeze(-1))
    rstd.copy_(r.squeeze(-1))
    merge_amax(amax, out)


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, dproj_bias=None, amax=None,
                       dproj_sum=None):
    """dinp += d(inp) (residual stream: see the module note); dweight, dbias += their grads.
    dproj_bias, when given, += the column sums of dinp after the update: dinp is then the
    gradient of a residual sum x + proj(y), so its column sums are the bias gradient of proj.
    The model lets the layernorm backward take that sum because it already holds the rows
    (the CUDA kernel saves a pass over a (B, T, C) gradient). dproj_sum (C,), with dproj_bias:
    also = those column sums alone (fp32 on the GPU; qkv_bias_backward takes them). amax (fp8
    runs): likewise amax = max(amax, max |dinp|) after the update."""
    C = inp.shape[-1]
    norm = (inp - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dbias += dout.reshape(-1, C).sum(dim=0)
    dweight += (dout * norm).reshape(-1, C).sum(dim=0)
    dnorm = dout * weight
    # d/dx of (x - mu) * rstd, with mu and rstd themselves functions of x
    dx = dnorm - dnorm.mean(dim=-1, keepdim=True) - norm * (dnorm * norm).mean(dim=-1, keepdim=True)
    dinp += dx * rstd.unsqueeze(-1)
    if dproj_bias is not None:
        sums = dinp.reshape(-1, C).sum(dim=0)
        dproj_bias += sums
        if dproj_sum is not None:
            dproj_sum.copy_(sums)
    merge_amax(amax, dinp)


# ---------------------------------------------------------------- matmul (nn.Linear layout)
def matmul_forward(out, inp, weight, bias, gelu_out=None, residual=None):
    """out (..., OC) = inp (..., C) @ weight (OC, C)^T + bias (OC) or no bias, + residual (..., OC)
    when given: a projection that writes the block's residual sum (out must be another buffer
    than residual). With gelu_out, also gelu_out = gelu(out): the MLP's fc layer, whose
    pre-activation the backward needs (no residual there)."""
    OC, C = weight.shape
    out2 = out.view(-1, OC)
    torch.matmul(inp.reshape(-1, C), weight.t(), out=out2)
    if bias is not None:
        out2 += bias
    if residual is not None:
        out2 += residual.reshape(-1, OC)
    if gelu_out is not None:
        gelu_forward(gelu_out, out)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, gelu_inp=None, accumulate=True, inp_ones=None,
                    exact_zero=None):
    """dinp = dout @ weight (overwrites); dweight += dout^T @ inp; dbias += column sums of dout.
    dbias may be None (the tied lm head has no bias). With gelu_inp, this layer's input was
    gelu(gelu_inp) and dinp is the gradient of gelu_inp instead: (dout @ weight) * gelu'(gelu_inp).
    dinp None: the weight's and bias's gradients only (fp8 runs compute dinp apart).
    accumulate False: dweight = dout^T @ inp, overwritten, whatever it held (the first backward
    after GPT2.zero_grad(matrices=False)); dbias still adds.
    inp_ones (..., ld): inp's memory with a column of ones at C (layout.with_ones_column). The
    bias gradient is then row C of the product dout^T @ inp_ones, one product for both
    gradients, as the CUDA backend computes them; the same sums, in another order.
    exact_zero = (begin, end): rows of dbias left as they are, whose sums are exactly zero in
    exact arithmetic (qkv's keys: qkv_bias_backward)."""
    OC, C = weight.shape
    dout2 = dout.reshape(-1, OC)
    # the weight's gradient first: dinp may be inp's own memory (the model's d_4C is the rebuilt
    # GELU output the fc projection's weight gradient reads)
    if inp_ones is not None:
        product = dout2.t() @ inp_ones.reshape(-1, inp_ones.shape[-1])
        grad, column_sums = product[:, :C], product[:, C]
    else:
        grad, column_sums = dout2.t() @ inp.reshape(-1, C), None
    if accumulate:
        dweight += grad
    else:
        dweight.copy_(grad)
    if dbias is not None:
        column_sums = dout2.sum(dim=0) if column_sums is None else column_sums
        if exact_zero is not None:
            column_sums = column_sums.clone()
            column_sums[exact_zero[0]:exact_zero[1]] = 0
        dbias += column_sums
    if dinp is not None:
        torch.matmul(dout2, weight, out=dinp.view(-1, C))
    if dinp is not None and gelu_inp is not None:
        gelu_backward(dinp, gelu_inp, dinp)


# ---------------------------------------------------------------- causal self-attention
def _split_heads(qkv, n_head):
    """(B,T,3C) -> q, k, v each (B,NH,T,HS)."""
    B, T, C3 = qkv.shape
    HS = C3 // 3 // n_head
    q, k, v = qkv.view(B, T, 3, n_head, HS).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _causal_scores(q, k):
    """Scaled scores (B,NH,T,T) with the future masked to -inf."""
    T, HS = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(HS))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf"))


def set_deterministic(flag):
    """The reference ops are deterministic already; the CUDA backend picks kernels by it."""


def set_dgelu(form):
    """matmul_dgelu: the CUDA backend's form of the GELU derivative's product; the reference
    computes that product one way, exactly."""


def set_bias_column(mode):
    """matmul_bias_column: where the CUDA backend takes the fc and qkv bias gradients from; the
    reference sums the columns (a model built on it keeps no ones columns)."""


def timed_choices():
    """The reference times nothing: no choices to report (the CUDA backend's, for the run log)."""
    return []


def attention_forward(out, lse, qkv, n_head):
    """out (B,T,C) = causal softmax(q k^T / sqrt(HS)) v; lse (B,NH,T) = log-sum-exp of each
    score row, all the backward needs to rebuild the probabilities (as fused attention does)."""
    B, T, C = out.shape
    q, k, v = _split_heads(qkv, n_head)
    scores = _causal_scores(q, k)
    row_lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - row_lse.unsqueeze(-1))
    out.copy_((probs @ v).transpose(1, 2).reshape(B, T, C))
    lse.copy_(row_lse)


def attention_backward(dqkv, dout, qkv, out, lse, n_head):
    """dqkv (B,T,3C) = gradient through attention (overwrites), from the forward's out and lse."""
    B, T, C = dout.shape
    HS = C // n_head
    q, k, v = _split_heads(qkv, n_head)
    probs = torch.exp(_causal_scores(q, k) - lse.unsqueeze(-1))
    dout_h = dout.view(B, T, n_head, HS).transpose(1, 2)
    out_h = out.view(B, T, n_head, HS).transpose(1, 2)
    dv = probs.transpose(-2, -1) @ dout_h
    dprobs = dout_h @ v.transpose(-2, -1)
    # softmax backward: sum_j p_ij dp_ij equals dout_i . out_i, which avoids a (T,T) reduction
    delta = (dout_h * out_h).sum(dim=-1, keepdim=True)
    dscores = probs * (dprobs - delta) * (1.0 / math.sqrt(HS))
    dq = dscores @ k
    dk = dscores.transpose(-2, -1) @ q
    dqkv.view(B, T, 3, n_head, HS).copy_(torch.stack((dq, dk, dv), dim=0).permute(1, 3, 0, 2, 4))


def bias_backward(dbias, dout):
    """dbias (OC,) += the column sums of dout (..., OC): a linear layer's bias gradient alone
    (matmul_backward's dbias, for products whose weight gradient is taken elsewhere)."""
    dbias += dout.reshape(-1, dout.shape[-1]).sum(dim=0)


def qkv_bias_backward(dbias, dqkv, dproj_sum, attproj_weight):
    """dbias (3C,) += the qkv bias gradient, from what the attention's backward already has:
    - query: the column sums of dq (dqkv[..., :C]);
    - key: exactly 0. A key bias adds q_i . b to every score of row i, and softmax ignores a
      constant added to a whole row (each dk row sums dS_ij q_i, and every row of dS sums to 0);
    - value: the column sums of dv, which equal those of datty (each softmax row sums to 1, so
      sum_j dv_j = sum_i datty_i), and datty = dres @ attproj_weight, so they are
      dproj_sum @ attproj_weight, dproj_sum being the column sums of dres (the attention
      projection's bias gradient, from layernorm_backward's dproj_sum): a (C,) x (C, C)
      product instead of two passes over (B, T, C) gradients.
    dqkv (B, T, 3C); dproj_sum (C,); attproj_weight (C, C) as the projection's (out, in)."""
    C = attproj_weight.shape[1]
    dbias[:C] += dqkv[..., :C].reshape(-1, C).sum(dim=0)
    dbias[2 * C:] += dproj_sum.to(attproj_weight.dtype) @ attproj_weight


# ---------------------------------------------------------------- GELU (tanh form, as GPT-2)
def gelu_forward(out, inp):
    x = inp
    out.copy_(0.5 * x * (1.0 + torch.tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x))))


def gelu_backward(dinp, inp, dout, amax=None):
    """dinp = gelu'(inp) * dout (overwrites; dinp may be the same tensor as dout); amax (fp8
    runs): also amax = max(amax, max |dinp|)."""
    x = inp
    inner = GELU_SCALE * (x + GELU_CUBIC * x * x * x)
    t = torch.tanh(inner)
    dinner = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x)
    grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner
    dinp.copy_(grad * dout)
    merge_amax(amax, dinp)


# ---------------------------------------------------------------- softmax + cross-entropy
def fused_classifier(logits, losses, targets, vocab_size, dloss):
    """In one pass: losses (B,T) = -log softmax(logits[..., :V])[target], and logits (B,T,Vp)
    OVERWRITTEN by dloss * (softmax - onehot(target)) over the first V columns, 0 in the padding.
    Probabilities are never stored: the logits buffer becomes its own gradient. dloss is the
    scale of each token's loss in the optimised objective (1 / tokens in the global batch)."""
    V = vocab_size
    real = logits[..., :V]
    log_probs = torch.log_softmax(real, dim=-1)
    losses.copy_(-log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    grad = torch.exp(log_probs)
    grad.scatter_add_(-1, targets.unsqueeze(-1), -torch.ones_like(losses).unsqueeze(-1))
    real.copy_(grad * dloss)
    logits[..., V:].zero_()


# ---------------------------------------------------------------- the tied lm head + classifier
def lm_head_logits(logits, lnf, wte):
    """logits (..., Vp) = lnf (..., C) @ wte (Vp, C)^T: the lm head alone, for sampling."""
    matmul_forward(logits, lnf, wte, None)


def lm_head_loss(losses, dlnf, dwte, lnf, wte, targets, vocab_size, dloss, logits):
    """The tied lm head, softmax + cross-entropy and the lm head's backward, chunk by chunk, so
    the whole (B, T, Vp) logits never exist (as in cut-cross-entropy). The B*T rows of lnf
    (B,T,C) go R = logits.shape[0] at a time through the (R, Vp) scratch `logits`; per chunk:
        logits_chunk = lnf_chunk @ wte^T                      (matmul_forward)
        losses_chunk, logits_chunk <- fused_classifier(...)   (now dloss * (softmax - onehot))
        dlnf_chunk = dlogits_chunk @ wte                      (OVERWRITES)
        dwte += dlogits_chunk^T @ lnf_chunk                   (ACCUMULATES)
    losses (B,T) are overwritten; dlnf (B,T,C) is the gradient into ln_f's output. dwte
    accumulates once per chunk: in bf16 that is one rounding per chunk, as with gradient
    accumulation across micro-steps (the fp32 sum inside each matmul is rounded once).
    dloss == 0 (evaluation) computes the losses only: the two backward matmuls are skipped and
    dlnf and dwte are left untouched (the scratch is left holding zeros)."""
    Vp, C = wte.shape
    R = logits.shape[0]
    x, dx = lnf.reshape(-1, C), dlnf.view(-1, C)
    loss_rows, target_rows = losses.view(-1), targets.reshape(-1)
    N = x.shape[0]
    for start in range(0, N, R):
        rows = slice(start, min(start + R, N))
        chunk = logits[:rows.stop - start]  # (n, Vp), n <= R rows of the scratch
        matmul_forward(chunk, x[rows], wte, None)
        fused_classifier(chunk, loss_rows[rows], target_rows[rows], vocab_size, dloss)
        if dloss != 0:
            matmul_backward(dx[rows], dwte, None, chunk, x[rows], wte)


# ---------------------------------------------------------------- AdamW and the gradient norm
def adamw_update(param, grad, m, v, master, lr, beta1, beta2, eps, weight_decay, step, grad_scale, seed=0):
    """One AdamW step over one contiguous slice of the flat buffers (so ZeRO-1 can hand it any
    shard). m, v are fp32. master is the fp32 copy of param, or None when param is already the
    master (fp32/fp64 training); with a master, param receives the updated value rounded to its
    own dtype (the CUDA backend rounds stochastically). grad_scale folds in gradient clipping.
    The CUDA backend's stochastic rounding draws from (seed, step, index); the reference rounds
    to nearest (seed is unused here).
    Weight decay is decoupled, as in AdamW: w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w).
    grad_scale == 0 is a step the spike guard skipped: param, m, v and master stay as they were,
    whatever grad holds (the batch is dropped; spikes.py says why not a zero gradient)."""
    if isinstance(grad_scale, torch.Tensor):  # the optimizer's device-side clipping scale
        grad_scale = grad_scale.item()
    if grad_scale == 0.0:  # a skipped step (spike_guard): nothing changes
        return
    g = grad.to(m.dtype)
    if grad_scale != 1.0:
        g = g * grad_scale
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    # in place where possible: this runs over every parameter each step
    denom = v.div(1.0 - beta2 ** step).sqrt_().add_(eps)
    update = m.div(1.0 - beta1 ** step).div_(denom)
    w = master if master is not None else param
    if weight_decay:
        update.add_(w, alpha=weight_decay)
    w.add_(update, alpha=-lr)
    if master is not None:
        param.copy_(w)


def master_dtype(param_dtype):
    """The storage of AdamW's master weights for parameters of param_dtype: fp32 (or None when
    the parameters are fp32 or fp64, their own masters). The CUDA backend stores them split in 16
    bits (its adamw.py); these three functions are what the optimizer knows of the form."""
    return None if param_dtype in (torch.float32, torch.float64) else torch.float32


def master_split(param, master, values, seed, step):
    """Store fp32 master weights `values`: master = values, param = values rounded as
    adamw_update rounds (to nearest here; seed and step, the CUDA backend's noise, unused)."""
    master.copy_(values)
    param.copy_(values)


def master_join(out, param, master, seed, step):
    """out (fp32) = the master weights stored by master_split or adamw_update."""
    out.copy_(master)


def global_norm_squared(out, grad):
    """out (one-element tensor) = sum of grad**2, in fp32 or better; the caller sums shards."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    out.copy_((grad.to(acc) ** 2).sum().reshape(out.shape))


def clip_scale(scale, norm, parts, clip):
    """norm (one element) = sqrt(sum of parts in order, in double); scale (one element) =
    clip / (norm + 1e-6) when 0 < clip < norm, else 1: the clipping factor of the gradient."""
    total = 0.0
    for part in parts.tolist():
        total += part
    value = math.sqrt(total)
    norm.fill_(value)
    scale.fill_(clip / (value + 1e-6) if clip > 0 and value > clip else 1.0)


# ---------------------------------------------------------------- the spike guard
# Why a step is skipped, as spike_guard writes it into `verdict` (0: the update goes ahead). The
# CUDA kernel receives these codes as -D defines (backends/cuda/norm.py), so they live here once.
SKIP_REASONS = {1: "loss_not_finite", 2: "norm_not_finite", 3: "loss_spike", 4: "norm_spike"}
SKIP_CODES = {reason: code for code, reason in SKIP_REASONS.items()}


def _window_stats(row, count, n):
    """Mean and population std of the last n values pushed into the ring `row` (W,) after
    `count` pushes, summed oldest first in double, one rounding per operation: the same order
    as the CUDA kernel, and independent of where the ring starts (a resumed run refills it)."""
    W = len(row)
    recent = [row[(count - n + i) % W] for i in range(n)]
    total = 0.0
    for x in recent:
        total += x
    mean = total / n
    squares = 0.0
    for x in recent:
        squares += (x - mean) * (x - mean)
    return mean, math.sqrt(squares / n)


def spike_guard(verdict, scale, window, count, loss, norm, loss_zscore, norm_zscore, min_samples):
    """Decide whether this step's update goes ahead, from its loss and gradient norm.
    window (2, W) float64: the losses (row 0) and norms (row 1) of the last accepted steps, a ring
    with `count` (one int64) pushes so far. loss (the mean over ranks) and norm (one float64
    element each). A step is skipped when its loss or norm is not finite, or, once min_samples
    steps were accepted, when x - mean > zscore * std over the last min(count, W) accepted values
    (a one-sided z-score: only upward spikes; zscore 0 turns that check off). verdict (one int32)
    = 0 or the SKIP_CODES reason; a skipped step sets scale (one float32, the clipping factor) to
    0, which AdamW reads as "change nothing"; an accepted step is pushed into the window."""
    W = window.shape[1]
    pushed = int(count.item())
    n = min(pushed, W)
    x = (float(loss.item()), float(norm.item()))
    code = 0
    if not math.isfinite(x[0]):
        code = SKIP_CODES["loss_not_finite"]
    elif not math.isfinite(x[1]):
        code = SKIP_CODES["norm_not_finite"]
    elif n >= min_samples:
        rows = window.tolist()
        for row, zscore, reason in ((0, loss_zscore, "loss_spike"), (1, norm_zscore, "norm_spike")):
            mean, std = _window_stats(rows[row], pushed, n)
            if zscore > 0 and x[row] - mean > zscore * std:
                code = SKIP_CODES[reason]
                break
    verdict.fill_(code)
    if code:
        scale.fill_(0.0)
    else:
        window[:, pushed % W] = torch.tensor(x, dtype=window.dtype)
        count.fill_(pushed + 1)


# ---------------------------------------------------------------- FP8, per-tensor scaled (issue #13)
# The formats Hopper's tensor cores multiply: e4m3 (more precision; activations and weights) and
# e5m2 (more range; gradients). A tensor is stored as fp8(x * scale) with one fp32 scale per
# tensor; a product of two such tensors is divided by both scales afterwards.
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_max(fmt):
    return torch.finfo(FP8_FORMATS[fmt]).max


def fp8_scale(scale, amax, fmt, margin=0, inverse=None):
    """scale (one fp32 element) = the largest power of two s with amax * s <= fp8_max(fmt) / 2^margin,
    or 1 when amax is 0 or not finite. A power of two, so x * s and the later division by s
    are exact, and only the fp8 rounding itself loses precision. amax: one fp32 element (the
    tensor's own, for current scaling, or a history's maximum, for delayed scaling). inverse
    (one fp32 element, optional) = 1 / s: what a scaled fp8 matmul multiplies its product by.
    floor(log2(q)) is taken as frexp's exponent less one, exact at and around powers of two."""
    value = _pow2_scale(float(amax.reshape(-1)[0]), fp8_max(fmt) / 2 ** margin)
    scale.fill_(value)
    if inverse is not None:
        inverse.fill_(1.0 / value)


def _pow2_scale(a, limit):
    """The largest power of two s with a * s <= limit (1 for a zero or non-finite a): floor(log2(q))
    as frexp's exponent less one."""
    if not (math.isfinite(a) and a > 0.0):
        return 1.0
    _, exponent = math.frexp(limit / a)
    return 2.0 ** (exponent - 1)


def fp8_delayed_scales(scale, inverse, history, amax, limits, mask):
    """Delayed scaling for every site (row) where mask: the site's amax (its row's first element)
    joins its history row (the oldest entry drops out), and its scale and inverse (first
    elements) become fp8_scale of the history's maximum under its limit (limits: fp8_max of the
    site's format over 2^margin, float64), 1 when the history holds a non-finite value. One call
    for all sites before a forward: the casts then need no amax of their own first."""
    for s in torch.nonzero(mask).flatten().tolist():
        history[s, 1:] = history[s, :-1].clone()
        history[s, 0] = amax.reshape(len(mask), -1)[s, 0]
        h = history[s]
        value = _pow2_scale(float(h.max()) if bool(torch.isfinite(h).all()) else math.nan, float(limits[s]))
        scale.reshape(len(mask), -1)[s, 0] = value
        inverse.reshape(len(mask), -1)[s, 0] = 1.0 / value


def fp8_quantize(out, amax, inp, scale):
    """out (a float8 tensor; its dtype picks the format) = inp * scale, saturated to the format's
    largest finite value and rounded to the nearest (even) fp8 value; amax (one fp32 element) =
    max |inp| over the tensor, for the next scale. Saturating instead of overflowing: e4m3 has
    no infinity, and a value past the range is better clipped than turned into NaN."""
    fmt = next(name for name, dtype in FP8_FORMATS.items() if dtype == out.dtype)
    limit = fp8_max(fmt)
    x = inp.double() * float(scale.reshape(-1)[0])
    out.copy_(x.clamp(-limit, limit).to(out.dtype))
    amax.fill_(float(inp.abs().max()) if inp.numel() else 0.0)


def fp8_quantize_transpose(out, out_t, amax, inp, scale):
    """fp8_quantize of a matrix inp (R, C) into out (R, C), and its transpose into out_t (C, R):
    Hopper's fp8 matmuls take both operands K-major, so the backward's dinp = dout @ W reads the
    weight as W^T."""
    fp8_quantize(out, amax, inp, scale)
    out_t.copy_(out.t())


def fp8_gelu_quantize_transpose(out, out_t, amax, dbias, inp, pre, scale):
    """The fc layer's output gradient straight into fp8, in one pass over what the fc
    projection's backward leaves: d = gelu'(pre) * inp, in inp's dtype (what gelu_backward
    would write; inp the projection's input-gradient product, pre the fc pre-activation), then
    fp8_quantize_transpose(out, out_t, amax, d, scale) and dbias (C,) += the column sums of d.
    Delayed scaling only: the scale must be known before d is (current scaling would need d's
    amax first, a second read)."""
    d = torch.empty_like(inp)
    gelu_backward(d, pre, inp)
    fp8_quantize_transpose(out, out_t, amax, d, scale)
    bias_backward(dbias, d)


def fp8_cast(out, inverse, amax, inp, amax_known=False):
    """Current scaling, as training casts each matmul operand: amax = max(amax, max |inp|) (the
    caller zeroes it first), out = fp8(inp * s) with s = fp8_scale's power of two for that amax
    and out's format, inverse = 1 / s (one fp32 element: what the scaled matmul multiplies by).
    amax_known: the op that wrote inp already merged max |inp| into amax (its `amax` argument),
    so max(amax, max |inp|) is amax: the CUDA op skips that pass; here it is taken anyway."""
    fmt = next(name for name, dtype in FP8_FORMATS.items() if dtype == out.dtype)
    merge_amax(amax, inp)
    scale = torch.zeros(1, dtype=torch.float32, device=inp.device)
    fp8_scale(scale, amax, fmt, inverse=inverse)
    fp8_quantize(out, torch.zeros_like(scale), inp, scale)


def fp8_cast_transpose(out, out_t, inverse, amax, inp, amax_known=False):
    """fp8_cast of a matrix inp (R, C) into out (R, C) and its transpose into out_t (C, R): a
    weight, read as W by the forward and as W^T by the backward's input gradient; with fp8
    weight gradients also a matmul's output gradient and input, whose transposes (tokens
    last) are the weight gradient's K-major operands."""
    fp8_cast(out, inverse, amax, inp, amax_known)
    out_t.copy_(out.t())


def fp8_dequantize(x8, scale):
    """The values an fp8 tensor stands for: x8 / scale, in float64."""
    return x8.double() / float(scale.reshape(-1)[0])


def fp8_matmul_forward(out, inp, inp_inverse, weight, weight_inverse, bias, gelu_out=None, residual=None,
                       gelu_scale=None, gelu_amax=None):
    """out (..., OC) = dequant(inp) (..., C) @ dequant(weight) (OC, C)^T + bias: what a scaled fp8
    matmul computes (the tensor cores multiply the fp8 values exactly and accumulate in fp32;
    here in float64), written in out's dtype. Each operand comes with the inverse of the scale it
    was quantized with (one fp32 element, from fp8_scale(inverse=)): cuBLASLt multiplies by it.
    residual and gelu_out as matmul_forward.
    gelu_out a float8 tensor (with gelu_scale and gelu_amax, one fp32 element each): the GELU
    output goes straight to fp8, fp8_quantize(gelu_out, gelu_amax, gelu(pre), gelu_scale), with
    GELU taken of the pre-activation before it is rounded to out's dtype (cuBLASLt's epilogue
    works on its fp32 sum): the delayed-scaling cast of the fc projection's input, done by the
    fc matmul that makes it, so the bf16 GELU output is never written nor read back."""
    OC, C = weight.shape
    product = ((inp.double() * float(inp_inverse.reshape(-1)[0])).reshape(-1, C)
               @ (weight.double() * float(weight_inverse.reshape(-1)[0])).t())
    if bias is not None:
        product = product + bias.double()
    if residual is not None:
        product = product + residual.double().reshape(-1, OC)
    out.view(-1, OC).copy_(product)
    if gelu_out is None:
        return
    if gelu_out.dtype not in FP8_FORMATS.values():
        gelu_forward(gelu_out, out)
        return
    if gelu_scale is None or gelu_amax is None:
        raise ValueError("fp8_matmul_forward: an fp8 gelu_out needs gelu_scale and gelu_amax")
    activated = torch.empty_like(product)
    gelu_forward(activated, product)
    fp8_quantize(gelu_out.view(-1, OC), gelu_amax, activated, gelu_scale)


def fp8_transpose(out_t, x):
    """out_t (C, R) = x (R, C) transposed, both float8 of one format: the copy, tokens last, that the
    fc projection's weight gradient reads of the GELU output the fc matmul wrote in fp8."""
    if out_t.dtype != x.dtype or x.dtype not in FP8_FORMATS.values() or out_t.shape != (x.shape[1], x.shape[0]):
        raise ValueError("fp8_transpose: x (R, C) and out_t (C, R) must be float8 tensors of one format")
    out_t.copy_(x.t())


def fp8_matmul_backward_input(dinp, dout, dout_inverse, weight_t, weight_inverse, gelu_inp=None, amax=None):
    """dinp (..., C) = dequant(dout) (..., OC) @ dequant(weight_t)^T, weight_t the (C, OC)
    transposed fp8 copy of the layer's weight (both operands K-major); with gelu_inp, times
    gelu'(gelu_inp), as matmul_backward's input gradient. The weight gradient stays a bf16
    product (matmul_backward with dinp None). amax (with gelu_inp): also amax = max(amax,
    max |dinp|), taken with the GELU derivative (the CUDA op's gelu_backward writes dinp)."""
    if amax is not None and gelu_inp is None:
        raise ValueError("fp8_matmul_backward_input: amax is taken with the GELU derivative; pass gelu_inp")
    fp8_matmul_forward(dinp, dout, dout_inverse, weight_t, weight_inverse, None)
    if gelu_inp is not None:
        gelu_backward(dinp, gelu_inp, dinp, amax)


def fp8_matmul_weight_grad(dweight, dout_t, dout_inverse, inp_t, inp_inverse, accumulate=True):
    """dweight (OC, C) += dequant(dout_t) (OC, N) @ dequant(inp_t) (C, N)^T, rounded once to
    dweight's dtype: a linear layer's weight gradient as an fp8 product (fp8_weight_gradients).
    Its operands are the fp8 copies of the output gradient and the input transposed, tokens last
    (fp8_cast_transpose's out_t): the tensor cores want both K-major, and K is the tokens.
    accumulate False: dweight = the product, overwritten (matmul_backward's accumulate)."""
    product = (dout_t.double() * float(dout_inverse.reshape(-1)[0])) @ \
        (inp_t.double() * float(inp_inverse.reshape(-1)[0])).t()
    dweight.copy_(dweight.double() + product if accumulate else product)
