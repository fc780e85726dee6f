"""GPT-2: forward and backward by hand, layer by layer, over a backend's ops (no autograd).

The model owns three planned allocations: the flat parameter buffer, the flat gradient buffer
(same layout) and the activation plan for (B, T). A training micro-step is
    loss = model.forward(tokens, targets, dloss); model.backward()
and gradients accumulate into `model.grads` until the trainer zeroes them (the trainer zeroes all
but the blocks' matrices, and the step's first backward writes those: zero_grad). As in llm.c, the lm
head's backward runs inside forward(), chunk by chunk so that the (B, T, Vp) logits never exist:
forward() with targets already adds the lm head's part of wte's gradient, and backward() starts
at ln_f. Which backend runs the ops (reference PyTorch or our CUDA kernels) is the only thing
that changes between CPU and GPU runs.
"""
import math

import torch

from distgpt.model.fp8 import GRADIENT, Fp8Matmuls, activation_recompute
from distgpt.model.layout import (CLASSIFIER_CHUNK_ROWS, RESIDUAL_PROJECTIONS, ActivationPlan,
                                  ParameterLayout, layer_tensors, recompute_levels, takes_ones_column,
                                  with_ones_column)

INIT_STD = 0.02


class GPT2:
    def __init__(self, model_cfg, backend, B, T, dtype=torch.float32, device="cpu", recompute=0,
                 pad_multiple=1, classifier_chunk_rows=CLASSIFIER_CHUNK_ROWS, fp8=False, fp8_gradients="e4m3",
                 recompute_layers=-1, fp8_weight_gradients=False, fp8_scaling="current", fp8_amax_history=16,
                 fp8_margin=0, fp8_fuse_gelu=True, fp8_gelu_in_matmul=True, fp8_layernorm_cast=True,
                 fp8_delayed_weights=True):
        m = model_cfg
        self.cfg, self.ops = m, backend
        # fp8 weight gradients read the blocks' inputs from fp8 copies kept by the forward: the
        # layernorm and GELU outputs are then planned as recompute 2 plans them and never rebuilt
        recompute, recompute_layers = activation_recompute(recompute, recompute_layers,
                                                           fp8 and fp8_weight_gradients)
        self.rebuilds = not (fp8 and fp8_weight_gradients)
        self.recompute_levels = recompute_levels(m.n_layer, recompute, recompute_layers)
        self.n_layer, self.n_head, self.n_embd = m.n_layer, m.n_head, m.n_embd
        self.vocab_size = m.vocab_size
        self.dtype, self.device = dtype, torch.device(device)
        self.layout = ParameterLayout(m.n_layer, m.n_embd, m.vocab_size, m.padded_vocab_size,
                                      m.block_size, pad_multiple)
        self.params = torch.zeros(self.layout.total, dtype=dtype, device=self.device)
        self.grads = torch.zeros(self.layout.total, dtype=dtype, device=self.device)
        self.p = self.layout.views(self.params)
        self.g = self.layout.views(self.grads)
        self.matrix_span = self.layout.block_matrices()  # what zero_grad(matrices=False) leaves
        self.p_layers = [layer_tensors(self.p, i) for i in range(m.n_layer)]
        self.g_layers = [layer_tensors(self.g, i) for i in range(m.n_layer)]
        # statistics (layernorm mean/rstd, attention logsumexp, losses) stay fp32 under bf16
        stat_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        # the backend's bias gradients from the weight-gradient products: the layernorm outputs
        # sit beside a column of ones (layout.ONES_PAD)
        self.ones_column = takes_ones_column(backend, fp8, B, T, m.n_embd)
        self.acts = ActivationPlan(m.n_layer, m.n_embd, m.n_head, m.padded_vocab_size, B, T,
                                   recompute, dtype, stat_dtype, self.device, classifier_chunk_rows,
                                   recompute_layers, self.ones_column)
        self._saved = None  # (activations view, tokens) of the last forward, for backward
        self.logits = None  # (b, t, Vp) after a forward without targets
        self.token_losses = None  # (b, t) losses of each position after a forward with targets
        # fp8=True: the blocks' matmuls take fp8 operands (model/fp8.py); None: all bf16 (or the dtype)
        self.fp8 = (Fp8Matmuls(backend, self.p_layers, m.n_layer, m.n_embd, B * T, self.device, fp8_gradients,
                               weight_gradients=fp8_weight_gradients, scaling=fp8_scaling,
                               amax_history=fp8_amax_history, margin=fp8_margin, fuse_gelu=fp8_fuse_gelu,
                               gelu_in_matmul=fp8_gelu_in_matmul, layernorm_cast=fp8_layernorm_cast,
                               delayed_weights=fp8_delayed_weights)
                    if fp8 else None)
        if hasattr(backend, "plan"):  # kernels reserve their scratch once, here
            backend.plan(B, T, m.n_embd, m.n_head, self.device)

    # ------------------------------------------------------------ parameters
    def init_weights(self, seed):
        """GPT-2 initialisation, drawn on the CPU in fp32 in table order from one seeded
        generator, so every backend, device and dtype starts from the same numbers."""
        gen = torch.Generator().manual_seed(seed)
        residual_std = INIT_STD / math.sqrt(2 * self.n_layer)
        for spec in self.layout.specs:
            if spec.name.endswith(".bias"):
                values = torch.zeros(spec.shape)
            elif "ln_" in spec.name:
                values = torch.ones(spec.shape)
            else:
                std = residual_std if spec.name.endswith(RESIDUAL_PROJECTIONS) else INIT_STD
                values = torch.randn(spec.shape, generator=gen) * std
            if spec.name == "transformer.wte.weight":
                values[self.vocab_size:] = 0  # padded rows: never read, never updated
            self.p[spec.name].copy_(values)

    def zero_grad(self, matrices=True):
        """Zero the gradients. matrices=False leaves the blocks' matrices (all but 5-6% of the
        buffer) as they are, for the next backward(write_matrices=True) to overwrite: their weight
        gradient products then write (beta 0) instead of adding to zeros, which saves a pass
        that writes the whole buffer (1 ms of a 1558M step) and the products' reads of it. Until
        that backward has run, those gradients hold stale values."""
        if matrices:
            self.grads.zero_()
            return
        start, end = self.matrix_span
        self.grads[:start].zero_()
        self.grads[end:].zero_()

    # ------------------------------------------------------------ forward
    def forward(self, tokens, targets=None, dloss=0.0, layer_needed=None, fresh_weights=True):
        """tokens (b, t) on the model's device, b <= B, t <= T. With targets (b, t): returns the
        mean loss (a 0-d tensor), leaves each position's loss in `self.token_losses` (b, t) and
        runs the lm head's backward for the objective sum(dloss * loss per token): wte's
        gradient accumulates here, dlnf waits for backward(). dloss 0 (evaluation) computes
        the losses only. Without targets: leaves logits (b, t, Vp) in `self.logits` and
        returns None; only b * t <= R rows fit in the logits chunk (R >= T: see
        layout.classifier_rows). layer_needed(layer), if given, is called before a layer's
        weights are first read (layer None: the embeddings and the small tensors, before the
        encoder), so weights still arriving from other ranks can be waited for one layer at a time.
        fresh_weights False promises that the weights have not changed since the last forward
        (a later micro-step of the same optimizer step): fp8 runs then reuse that forward's fp8
        copies of the block matrices instead of casting them again (about 3 ms a forward at
        1558M); bf16 runs do not care."""
        ops, P, NH = self.ops, self.p, self.n_head
        b, t = tokens.shape
        a = self.acts.view(b, t)
        if layer_needed is not None:
            layer_needed(None)
        # an evaluation or sampling forward (no backward follows) leaves the fp8 scaling state alone
        # and casts the weights with its own scales
        training = targets is not None and dloss != 0
        cast_weights = self.fp8 is not None and (fresh_weights or not self.fp8.weights_cast or not training)
        if self.fp8 is not None:
            self.fp8.begin_forward(cast_weights, training=training)
        ops.encoder_forward(a["encoded"], tokens, P["transformer.wte.weight"],
                            P["transformer.wpe.weight"])
        residual = a["encoded"]
        for layer, lp in enumerate(self.p_layers):
            ln1, ln2, fch_gelu = (self._act(a, n, layer) for n in ("ln1", "ln2", "fch_gelu"))
            if layer == 0:
                self._layernorm(0, "qkv", ln1, a["ln1_mean.0"], a["ln1_rstd.0"], residual, lp.ln1_w, lp.ln1_b)
            # (the previous block already wrote this block's ln1, from the residual sum its
            # projection wrote)
            if layer_needed is not None:
                layer_needed(layer)
            if cast_weights:
                self.fp8.cast_weights(layer)
            self._matmul(layer, "qkv", a[f"qkv.{layer}"], ln1, lp.qkv_b)  # (b, t, 3C)
            ops.attention_forward(a[f"atty.{layer}"], a[f"att_lse.{layer}"], a[f"qkv.{layer}"], NH)
            # each projection adds the residual stream in its epilogue and writes the sum, which
            # the next layernorm then reads alone (one pass over (B, T, C) instead of two inputs)
            self._matmul(layer, "attproj", a[f"residual2.{layer}"], a[f"atty.{layer}"], lp.attproj_b,
                         residual=residual)
            self._layernorm(layer, "fc", ln2, a[f"ln2_mean.{layer}"], a[f"ln2_rstd.{layer}"], a[f"residual2.{layer}"],
                            lp.ln2_w, lp.ln2_b)
            # fc and its GELU in one op (one matmul epilogue on the GPU): fch keeps the
            # pre-activation for the backward, fch_gelu feeds the projection
            self._matmul(layer, "fc", a[f"fch.{layer}"], ln2, lp.fc_b, gelu_out=fch_gelu)  # (b, t, 4C)
            self._matmul(layer, "fcproj", a[f"residual3.{layer}"], fch_gelu, lp.fcproj_b,
                         residual=a[f"residual2.{layer}"])
            # the block's output residual goes through the next block's ln1 (or the final ln_f)
            if layer + 1 < self.n_layer:
                nxt = self.p_layers[layer + 1]
                self._layernorm(layer + 1, "qkv", self._act(a, "ln1", layer + 1), a[f"ln1_mean.{layer + 1}"],
                                a[f"ln1_rstd.{layer + 1}"], a[f"residual3.{layer}"], nxt.ln1_w, nxt.ln1_b)
            else:  # the lm head is a bf16 matmul: no cast reads ln_f's output
                ops.layernorm_forward(a["lnf"], a["lnf_mean"], a["lnf_rstd"], a[f"residual3.{layer}"],
                                      P["transformer.ln_f.weight"], P["transformer.ln_f.bias"])
            residual = a[f"residual3.{layer}"]
        # tied lm head: logits = lnf @ wte^T over the padded vocabulary, R rows at a time
        # through the (R, Vp) scratch
        wte, logits = P["transformer.wte.weight"], a["logits"]
        if targets is None:
            R = logits.shape[0]
            if b * t > R:
                raise ValueError(f"forward without targets: {b} x {t} = {b * t} rows of logits do not "
                                 f"fit the planned logits chunk of {R} rows; pass targets to get "
                                 f"each position's loss (token_losses), or run fewer rows at once")
            self.logits = logits[:b * t].view(b, t, -1)
            ops.lm_head_logits(self.logits, a["lnf"], wte)
            self._saved, self.token_losses = None, None
            return None
        # losses and the lm head's backward, chunk by chunk: dwte accumulates now, and dlnf goes
        # to d_C, backward scratch that nothing writes between here and backward()'s first op,
        # ln_f's layernorm_backward, which reads it
        ops.lm_head_loss(a["losses"], a["d_C"], self.g["transformer.wte.weight"], a["lnf"], wte,
                         targets, self.vocab_size, dloss, logits)
        if dloss == 0:  # no gradient was computed: a backward() after evaluation adds exact zeros
            a["d_C"].zero_()
        self.logits, self.token_losses = None, a["losses"]
        self._saved = (a, tokens)
        return a["losses"].mean()

    # ------------------------------------------------------------ backward
    def backward(self, layer_done=None, write_matrices=False):
        """Gradients of sum(dloss * loss per token) into self.grads (+=), from the last forward.
        layer_done(layer), if given, is called once a layer's matrices have their final
        gradients (the data-parallel layer starts summing them over ranks while the backward goes
        on with the layers below). write_matrices: the blocks' matrices get their gradients
        written (=) rather than added, as after zero_grad(matrices=False); everything else adds."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() with targets first")
        ops, P, G, NH = self.ops, self.p, self.g, self.n_head
        a, tokens = self._saved
        self._saved = None
        add = not write_matrices
        dres, d_C, d_3C, d_4C = a["dresidual"], a["d_C"], a["d_3C"], a["d_4C"]
        L = self.n_layer
        # ln_f, from the dlnf the forward's lm_head_loss left in d_C (the lm head's own backward
        # ran there); the first gradient into the residual stream overwrites it.
        # Each layernorm backward below ends with dres = d(a residual sum x + proj(y)), whose
        # column sums are proj's bias gradient: the layernorm takes them (dproj_bias) while it
        # holds the rows, so the projections' matmul_backward gets no dbias.
        dres.zero_()
        ops.layernorm_backward(dres, G["transformer.ln_f.weight"], G["transformer.ln_f.bias"], d_C,
                               a[f"residual3.{L - 1}"], P["transformer.ln_f.weight"],
                               a["lnf_mean"], a["lnf_rstd"], dproj_bias=self.g_layers[L - 1].fcproj_b,
                               amax=self._amax(L - 1, GRADIENT, "fcproj"))
        for layer in reversed(range(L)):
            lp, lg = self.p_layers[layer], self.g_layers[layer]
            residual_in = a["encoded"] if layer == 0 else a[f"residual3.{layer - 1}"]
            ln1, ln2, fch_gelu = (self._act(a, n, layer) for n in ("ln1", "ln2", "fch_gelu"))
            if self.rebuilds:
                self._recompute(a, layer, residual_in, ln1, ln2, fch_gelu)
            # MLP branch; dres is d(residual3) and flows on unchanged to residual2
            # d_4C is the gradient of fc's pre-activation: the projection's input gradient
            # times gelu'(fch), fused (the dGELU epilogue on the GPU); where GELU is rebuilt it
            # is fch_gelu's buffer, written after the weight gradient has read fch_gelu
            # (fp8 recipe: fcproj's backward casts fc's output gradient and takes fc's bias gradient
            # with the GELU derivative, in one pass; fc's backward then reads that cast)
            self._matmul_backward(layer, "fcproj", d_4C, None, dres, fch_gelu, add, gelu_inp=a[f"fch.{layer}"],
                                  gelu_dbias=lg.fc_b)
            self._matmul_backward(layer, "fc", d_C, lg.fc_b, d_4C, ln2, add)
            # (dproj_sum: the attention projection's bias sums, from which qkv_bias_backward
            # takes the values' bias gradient; with ones columns the qkv product gives it)
            ops.layernorm_backward(dres, lg.ln2_w, lg.ln2_b, d_C, a[f"residual2.{layer}"],
                                   lp.ln2_w, a[f"ln2_mean.{layer}"], a[f"ln2_rstd.{layer}"],
                                   dproj_bias=lg.attproj_b, amax=self._amax(layer, GRADIENT, "attproj"),
                                   dproj_sum=None if self.ones_column else a["dproj_sum"])
            # attention branch; dres is now d(residual2)
            self._matmul_backward(layer, "attproj", d_C, None, dres, a[f"atty.{layer}"], add)
            ops.attention_backward(d_3C, d_C, a[f"qkv.{layer}"], a[f"atty.{layer}"],
                                   a[f"att_lse.{layer}"], NH)
            if self.ones_column:
                # qkv's bias gradient from its weight-gradient product, the keys' left at zero
                self._matmul_backward(layer, "qkv", d_C, lg.qkv_b, d_3C, ln1, add)
            else:
                self._matmul_backward(layer, "qkv", d_C, None, d_3C, ln1, add)
                # qkv's bias gradient: the queries' column sums, zero for the keys, and the values'
                # from the projection's bias gradient of this backward (dproj_sum) through its weight
                ops.qkv_bias_backward(lg.qkv_b, d_3C, a["dproj_sum"], lp.attproj_w)
            if layer_done is not None:
                layer_done(layer)
            # dres becomes d(residual3) of the layer below, whose MLP projection added into it
            ops.layernorm_backward(dres, lg.ln1_w, lg.ln1_b, d_C, residual_in, lp.ln1_w,
                                   a[f"ln1_mean.{layer}"], a[f"ln1_rstd.{layer}"],
                                   dproj_bias=self.g_layers[layer - 1].fcproj_b if layer else None,
                                   amax=self._amax(layer - 1, GRADIENT, "fcproj") if layer else None)
        ops.encoder_backward(G["transformer.wte.weight"], G["transformer.wpe.weight"], dres, tokens)

    # ------------------------------------------------------------ helpers
    def _matmul(self, layer, m, out, inp, bias, gelu_out=None, residual=None):
        """One of a block's matmuls (m: qkv, attproj, fc, fcproj): out = inp @ W^T + bias (+ the
        residual stream, for the projections), and gelu_out = gelu(out) for fc; in bf16 (the
        dtype), or with fp8 operands when fp8=True."""
        if self.fp8 is not None:
            self.fp8.forward(layer, m, out, inp, bias, gelu_out, residual=residual)
        else:
            self.ops.matmul_forward(out, inp, getattr(self.p_layers[layer], f"{m}_w"), bias, gelu_out=gelu_out,
                                    residual=residual)

    def _matmul_backward(self, layer, m, dinp, dbias, dout, inp, accumulate, gelu_inp=None, gelu_dbias=None):
        """Its backward: dinp = dout @ W (times gelu'(gelu_inp)), dW += dout^T @ inp (= when not
        accumulate), dbias += column sums of dout. With fp8 the input gradient is an fp8 product;
        dW too with fp8_weight_gradients, else it stays in the dtype, as dbias does. gelu_dbias:
        the bias gradient of the layer below (fc), which the fp8 recipe takes with the GELU
        derivative."""
        weight, dweight = getattr(self.p_layers[layer], f"{m}_w"), getattr(self.g_layers[layer], f"{m}_w")
        if self.fp8 is None and self.ones_column and m in ("qkv", "fc"):
            # inp is a layernorm output beside its ones column: the bias gradient comes with the
            # weight's, from one product (qkv's keys' rows left at their exact zero)
            C = self.n_embd
            self.ops.matmul_backward(dinp, dweight, dbias, dout, inp, weight, accumulate=accumulate,
                                     inp_ones=with_ones_column(inp), exact_zero=(C, 2 * C) if m == "qkv" else None)
            return
        if self.fp8 is None:
            self.ops.matmul_backward(dinp, dweight, dbias, dout, inp, weight, gelu_inp=gelu_inp,
                                     accumulate=accumulate)
            return
        if self.fp8.weight_gradients:  # dW an fp8 product too; the bias from the bf16 dout
            if dbias is not None and not self.fp8.gradient_cast(layer, m):
                self.ops.bias_backward(dbias, dout)
            self.fp8.backward(layer, m, dinp, dweight, dout, gelu_inp, gelu_dbias,  # inp: its kept fp8 copy
                              accumulate=accumulate)
            return
        # the weight's gradient first: dinp may be inp's memory (d_4C is the rebuilt fch_gelu)
        self.ops.matmul_backward(None, dweight, dbias, dout, inp, weight, accumulate=accumulate)
        self.fp8.backward_input(layer, m, dinp, dout, gelu_inp)

    def _layernorm(self, layer, m, out, mean, rstd, inp, weight, bias):
        """A layernorm whose output the layer's block matmul m reads (ln1: qkv, ln2: fc). With fp8
        the fp8 path runs it: it takes the amax for that matmul's input cast, or writes the cast
        itself (fp8_layernorm_cast)."""
        if self.fp8 is None:
            self.ops.layernorm_forward(out, mean, rstd, inp, weight, bias)
        else:
            self.fp8.layernorm(layer, m, out, mean, rstd, inp, weight, bias)

    def _amax(self, layer, what, m):
        """With fp8: the amax of the cast that will read this op's output (for the op to take as
        it writes), or None (bf16, or a cast that takes its own)."""
        return None if self.fp8 is None else self.fp8.producer_amax(layer, what, m)

    def _act(self, a, name, layer):
        """A per-layer activation, or the one shared buffer when recompute rebuilds it."""
        return a.get(f"{name}.{layer}", a.get(name))

    def _recompute(self, a, layer, residual_in, ln1, ln2, fch_gelu):
        """Rebuild what this layer's recompute level >= 1 (GELU) and >= 2 (layernorms) did not
        keep. The saved mean/rstd are rewritten with the same values, so results match
        recompute=0 exactly."""
        ops, lp, level = self.ops, self.p_layers[layer], self.recompute_levels[layer]
        if level >= 2:
            ops.layernorm_forward(ln1, a[f"ln1_mean.{layer}"], a[f"ln1_rstd.{layer}"],
                                  residual_in, lp.ln1_w, lp.ln1_b)
            ops.layernorm_forward(ln2, a[f"ln2_mean.{layer}"], a[f"ln2_rstd.{layer}"],
                                  a[f"residual2.{layer}"], lp.ln2_w, lp.ln2_b)
        if level >= 1:
            ops.gelu_forward(fch_gelu, a[f"fch.{layer}"])

    @property
    def num_parameters(self):
        return self.layout.num_parameters
