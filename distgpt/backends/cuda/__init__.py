"""The CUDA backend: the reference backend's functions, same names and arguments, as methods of
one CudaBackend object, over our kernels (kernels/*.cu, one module per layer kind here), cuBLASLt
matmuls and cuDNN attention. bf16 parameters, activations and gradients; fp32 statistics, master
weights (stored split: the bf16 parameter and a 16-bit low half, adamw.py) and moments.

The object owns everything the ops need besides their arguments: the kernels' planned scratch,
the cuBLASLt handle, workspace and plans, the cuDNN graphs and workspace, and the attention mode.
Nothing lives at module level, so two backends never share scratch, and the addresses a captured
CUDA graph bakes in belong to the one object that planned them. `plan(...)` reserves it all once,
before the first step; `scratch()` says what it took, and `estimate_scratch(...)` says it before
anything is allocated (the memory plan a run prints)."""
import torch

from distgpt.backends.cuda import classifier, fp8, gelu, layernorm
from distgpt.backends.cuda import adamw
from distgpt.backends.cuda.attention import Attention
from distgpt.backends.cuda.bias import BiasGradients, partials_elements as bias_partials
from distgpt.backends.cuda.encoder import EncoderGradients, encoder_forward, sort_buffer_bytes
from distgpt.backends.cuda.matmul import WORKSPACE_BYTES, Matmuls, dgelu_line
from distgpt.backends.cuda.norm import BLOCKS_PER_SM as NORM_BLOCKS_PER_SM, GlobalNorm, clip_scale, spike_guard
from distgpt.backends.cuda.runtime import sm_count
from distgpt.model.layout import ONES_PAD


def bias_column_elements(C):
    """The fp32 scratch of the widest bias-column product, fc's weight gradient: 4C rows of the
    layernorm output's width with its ones column (layout.ONES_PAD)."""
    return 4 * C * (C + ONES_PAD)


# Where the fc and qkv bias gradients come from their weight-gradient products (over the
# layernorm outputs with a column of ones beside them, layout.ONES_PAD) rather than the
# column-sum kernels: up to this width. The ones save the column sums' pass over a (B*T, 3C or 4C)
# gradient; they cost a product ONES_PAD rows taller, whose answers cuBLASLt ranks otherwise, and
# at C = 1600 the best of them ran slower. Alternated on H100s (2026-12-06, `distgpt bench
# --bias-column true|false`): 124M (C = 768) B=64 107.9 / 107.6 / 108.3 / 108.0 / 107.7 ms
# against 108.4 / 109.9 / 109.4 / 109.0 / 109.9, B=16 28.3 against 28.6, B=8 15.3 against 15.4;
# 350M (C = 1024) B=32 153.7 against 153.9; 1558M (C = 1600) B=16 317.0 / 320.9 against 315.8 /
# 312.9, where fc's weight gradient took 523 us a layer over 1608 rows against 464 over 1600.
BIAS_COLUMN_MAX_C = 1024
BIAS_COLUMN_MODES = ("auto", "true", "false")


class CudaBackend:
    def __init__(self):
        if not torch.cuda.is_available():
            raise ModuleNotFoundError("no CUDA GPU is visible")
        self.attention = Attention()
        self.deterministic = False
        self.dgelu = "auto"  # the dGELU form asked for (matmul_dgelu); Matmuls.dgelu_mode resolves it
        self.bias_column = "auto"  # matmul_bias_column: where the fc and qkv bias gradients come from
        self.matmuls = None  # made by plan(), with the bias gradients' kernels
        self.encoder_gradients = self.layernorm_gradients = self.bias_gradients = self.norm = None
        self.fp8_gelu_partials = None
        self.classifier_one_pass = True  # False: the two-pass classifier kernel (tests run both)

    # ------------------------------------------------------------ planning
    def plan(self, B, T, C, n_head, device):
        """Reserve every kernel's and library's scratch once, for steps up to (B, T) at width C.
        GELU, the classifier (its logits chunk is an activation slot) and AdamW need none."""
        self.bias_gradients = BiasGradients(C, device)  # per-block bias-gradient partials
        self.encoder_gradients = EncoderGradients(B * T, device)  # token sort buffers
        self.layernorm_gradients = layernorm.LayerNormGradients(C, device, self.bias_gradients)
        self.matmuls = self.make_matmuls()
        # cuBLASLt handle and workspace, the scratch the fc projection's weight (C, 4C) is
        # transposed into where its dGELU product runs faster from the transpose, and the fp32
        # scratch of the fc and qkv weight-gradient products over their ones columns (matmul.py)
        self.matmuls.plan(device, transpose_elements=4 * C * C,
                          bias_column_elements=bias_column_elements(C) if self.takes_bias_column(B * T, C) else 0)
        self.attention.plan(B, T, C, n_head, device)  # cuDNN graphs for (B, T) and their workspace
        self.norm = GlobalNorm(device)  # per-block squared-norm partials
        # fp8: the fused GELU cast's bias-gradient partials (fp8.gelu_partials_elements)
        self.fp8_gelu_partials = torch.empty(fp8.gelu_partials_elements(B * T, C), dtype=torch.float32,
                                             device=device)

    def takes_bias_column(self, tokens, C):
        """Whether a model of width C planned for `tokens` a micro-batch (B * T) should keep ones
        columns beside its layernorm outputs, for this backend to take the fc and qkv bias
        gradients from the weight-gradient products: as matmul_bias_column says, and under
        "auto" up to BIAS_COLUMN_MAX_C channels, whatever the tokens (the measured widths)."""
        if self.bias_column != "auto":
            return self.bias_column == "true"
        return C <= BIAS_COLUMN_MAX_C

    def set_bias_column(self, mode):
        """matmul_bias_column: auto | true | false, before the model is built (its activation
        plan depends on it)."""
        mode = str(mode).lower()
        if mode not in BIAS_COLUMN_MODES:
            raise ValueError(f"matmul_bias_column={mode}: choose one of {', '.join(BIAS_COLUMN_MODES)}")
        self.bias_column = mode

    def make_matmuls(self):
        """The Matmuls for this backend's modes (no GPU work: plan() then plans its handle and
        workspace): the dGELU form asked for, the algorithms timed unless deterministic."""
        dgelu, tune = self._matmul_modes()
        return Matmuls(self.bias_gradients, dgelu=dgelu, tune=tune)

    def _matmul_modes(self):
        """(dgelu, tune) for the Matmuls: the dGELU form asked for (fused when deterministic and
        not pinned), and the algorithms timed unless deterministic."""
        return Matmuls.dgelu_mode(self.dgelu, self.deterministic), not self.deterministic

    def set_deterministic(self, flag):
        """deterministic=true: FlashAttention-2 with a deterministic backward instead of cuDNN's
        (whose dq adds with atomics). Each matmul is deterministic for a given algorithm; what a
        deterministic run gives up is the timed choices, which could differ between two runs:
        the algorithm of each plan (the heuristic's first instead of the fastest of its
        candidates) and the choice between the dGELU epilogue and the plain product +
        gelu_backward (see matmul.py)."""
        self.deterministic = bool(flag)
        self.attention.set_deterministic(flag)
        self._sync_matmuls()

    def timed_choices(self):
        """Lines on what the first step's timing chose (the dGELU form of each shape), for the
        run's log; empty before that step, or where nothing was timed."""
        return [] if self.matmuls is None else [dgelu_line(c) for c in self.matmuls.dgelu_report()]

    def set_dgelu(self, form):
        """Pin the fc projection's dGELU form (matmul_dgelu: fused | transposed | split), or leave
        the choice to timing again (auto; fused when deterministic). Before or after plan()."""
        Matmuls.dgelu_mode(form, self.deterministic)  # refuses an unknown form before keeping it
        self.dgelu = form
        self._sync_matmuls()

    def _sync_matmuls(self):
        """Carry the modes into the Matmuls plan() already made, if any."""
        if self.matmuls is not None:
            self.matmuls.dgelu, self.matmuls.tune = self._matmul_modes()

    def scratch(self):
        """[(what, bytes)] of the scratch plan() allocated."""
        parts = [("cuBLASLt workspace", self.matmuls),
                 ("fc projection weight transpose", None if self.matmuls is None else self.matmuls.weight_t),
                 ("bias-column products", None if self.matmuls is None else self.matmuls.bias_column),
                 ("layernorm backward partials", self.layernorm_gradients),
                 ("bias gradient partials", self.bias_gradients), ("token sort buffers", self.encoder_gradients),
                 ("global norm partials", self.norm), ("fp8 GELU bias partials", self.fp8_gelu_partials)]
        rows = [(name, part.nbytes) for name, part in parts if part is not None]
        return rows + [("cuDNN attention workspace", self.attention.workspace_bytes)]

    def estimate_scratch(self, B, T, C, n_head, device):
        """[(what, bytes)] plan() will allocate, from the shapes alone. cuDNN sizes its attention
        workspace itself when it builds the graphs; its backward accumulates dQ in fp32, B*T*C
        floats, which is what it asked for at GPT-2's shapes on an H100 (195 MiB at 124M, B=64),
        so that is the estimate; scratch() reports what was taken."""
        sms = sm_count(device)
        return [("cuBLASLt workspace", WORKSPACE_BYTES),
                ("fc projection weight transpose", 2 * 4 * C * C),
                ("layernorm backward partials", 4 * layernorm.partials_elements(C, sms)),
                ("bias gradient partials", 4 * bias_partials(C, sms)),
                ("token sort buffers", sort_buffer_bytes(B * T)),
                ("global norm partials", 4 * NORM_BLOCKS_PER_SM * sms),
                ("fp8 GELU bias partials", 4 * fp8.gelu_partials_elements(B * T, C)),
                ("cuDNN attention workspace (estimate)", 4 * B * T * C)] + \
            ([("bias-column products", 4 * bias_column_elements(C))] if self.takes_bias_column(B * T, C) else [])

    def _planned(self, op, part):
        if part is None:
            raise RuntimeError(f"{op}: call the backend's plan(B, T, C, n_head, device) before the first step")
        return part

    # ------------------------------------------------------------ encoder
    def encoder_forward(self, out, tokens, wte, wpe):
        encoder_forward(out, tokens, wte, wpe)

    def encoder_backward(self, dwte, dwpe, dout, tokens):
        self._planned("encoder_backward", self.encoder_gradients).backward(dwte, dwpe, dout, tokens)

    # ------------------------------------------------------------ layernorm and the residual
    def layernorm_forward(self, out, mean, rstd, inp, weight, bias, amax=None, scale=None):
        layernorm.layernorm_forward(out, mean, rstd, inp, weight, bias, amax, scale)

    def layernorm_backward(self, dinp, dweight, dbias, dout, inp, weight, mean, rstd, dproj_bias=None, amax=None,
                           dproj_sum=None):
        self._planned("layernorm_backward", self.layernorm_gradients).backward(
            dinp, dweight, dbias, dout, inp, weight, mean, rstd, dproj_bias, amax, dproj_sum)

    # ------------------------------------------------------------ matmuls and GELU
    def matmul_forward(self, out, inp, weight, bias, gelu_out=None, residual=None):
        self._planned("matmul_forward", self.matmuls).forward(out, inp, weight, bias, gelu_out, residual)

    def matmul_backward(self, dinp, dweight, dbias, dout, inp, weight, gelu_inp=None, accumulate=True, inp_ones=None,
                        exact_zero=None):
        self._planned("matmul_backward", self.matmuls).backward(dinp, dweight, dbias, dout, inp, weight, gelu_inp,
                                                                accumulate, inp_ones, exact_zero)

    def bias_backward(self, dbias, dout):
        self._planned("bias_backward", self.bias_gradients).backward(dbias, dout)

    def qkv_bias_backward(self, dbias, dqkv, dproj_sum, attproj_weight):
        self._planned("qkv_bias_backward", self.bias_gradients).qkv_backward(dbias, dqkv, dproj_sum, attproj_weight)

    def gelu_forward(self, out, inp):
        gelu.gelu_forward(out, inp)

    def gelu_backward(self, dinp, inp, dout, amax=None):
        gelu.gelu_backward(dinp, inp, dout, amax)

    # ------------------------------------------------------------ attention
    def attention_forward(self, out, lse, qkv, n_head):
        self.attention.forward(out, lse, qkv, n_head)

    def attention_backward(self, dqkv, dout, qkv, out, lse, n_head):
        self.attention.backward(dqkv, dout, qkv, out, lse, n_head)

    # ------------------------------------------------------------ lm head and loss
    def fused_classifier(self, logits, losses, targets, vocab_size, dloss):
        classifier.fused_classifier(logits, losses, targets, vocab_size, dloss, self.classifier_one_pass)

    def lm_head_logits(self, logits, lnf, wte):
        classifier.lm_head_logits(self._planned("lm_head_logits", self.matmuls), logits, lnf, wte)

    def lm_head_loss(self, losses, dlnf, dwte, lnf, wte, targets, vocab_size, dloss, logits):
        classifier.lm_head_loss(self._planned("lm_head_loss", self.matmuls), losses, dlnf, dwte, lnf, wte,
                                targets, vocab_size, dloss, logits, self.classifier_one_pass)

    # ------------------------------------------------------------ optimizer
    def global_norm_squared(self, out, grad):
        self._planned("global_norm_squared", self.norm).squared(out, grad)

    def clip_scale(self, scale, norm, parts, clip):
        clip_scale(scale, norm, parts, clip)

    def spike_guard(self, verdict, scale, window, count, loss, norm, loss_zscore, norm_zscore, min_samples):
        spike_guard(verdict, scale, window, count, loss, norm, loss_zscore, norm_zscore, min_samples)

    def fp8_delayed_scales(self, scale, inverse, history, amax, limits, mask):
        fp8.fp8_delayed_scales(scale, inverse, history, amax, limits, mask)

    def fp8_scale(self, scale, amax, fmt, margin=0, inverse=None):
        fp8.fp8_scale(scale, amax, fmt, margin, inverse)

    def fp8_quantize(self, out, amax, inp, scale):
        fp8.fp8_quantize(out, amax, inp, scale)

    def fp8_quantize_transpose(self, out, out_t, amax, inp, scale):
        fp8.fp8_quantize_transpose(out, out_t, amax, inp, scale)

    def fp8_gelu_quantize_transpose(self, out, out_t, amax, dbias, inp, pre, scale):
        fp8.fp8_gelu_quantize_transpose(out, out_t, amax, dbias, inp, pre, scale,
                                        self._planned("fp8_gelu_quantize_transpose", self.fp8_gelu_partials))

    def fp8_cast(self, out, inverse, amax, inp, amax_known=False):
        fp8.fp8_cast(out, inverse, amax, inp, amax_known)

    def fp8_cast_transpose(self, out, out_t, inverse, amax, inp, amax_known=False):
        fp8.fp8_cast_transpose(out, out_t, inverse, amax, inp, amax_known)

    def fp8_transpose(self, out_t, x):
        fp8.fp8_transpose(out_t, x)

    def fp8_matmul_forward(self, out, inp, inp_inverse, weight, weight_inverse, bias, gelu_out=None,
                           residual=None, gelu_scale=None, gelu_amax=None):
        self._planned("fp8_matmul_forward", self.matmuls).forward_fp8(
            out, inp, inp_inverse, weight, weight_inverse, bias, gelu_out, residual=residual,
            gelu_scale=gelu_scale, gelu_amax=gelu_amax)

    def fp8_matmul_weight_grad(self, dweight, dout_t, dout_inverse, inp_t, inp_inverse, accumulate=True):
        self._planned("fp8_matmul_weight_grad", self.matmuls).weight_grad_fp8(dweight, dout_t, dout_inverse, inp_t,
                                                                               inp_inverse, accumulate)

    def fp8_matmul_backward_input(self, dinp, dout, dout_inverse, weight_t, weight_inverse, gelu_inp=None,
                                  amax=None):
        self._planned("fp8_matmul_backward_input", self.matmuls).backward_input_fp8(
            dinp, dout, dout_inverse, weight_t, weight_inverse, gelu_inp, amax)

    def adamw_update(self, param, grad, m, v, master, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                     seed=0):
        adamw.adamw_update(param, grad, m, v, master, lr, beta1, beta2, eps, weight_decay, step, grad_scale, seed)

    def master_dtype(self, param_dtype):
        return adamw.master_dtype(param_dtype)

    def master_split(self, param, master, values, seed, step):
        adamw.master_split(param, master, values, seed, step)

    def master_join(self, out, param, master, seed, step):
        adamw.master_join(out, param, master, seed, step)
