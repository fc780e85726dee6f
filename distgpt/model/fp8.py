"""FP8 matmuls for the transformer blocks (`fp8=true`, issue #13): what the model keeps for them
and the order it casts in.

Each block's four matmuls (qkv, attention projection, fc, fc projection) take FP8 operands in
the forward and for the input gradient in the backward; the weight gradient is an fp8 product
too with fp8_weight_gradients (the config's default: backward() says how), else a bf16 product
of the bf16 activations the model then keeps, and the lm head, attention, master weights,
moments and the optimizer are unchanged. Formats:
- weights and activations: e4m3 (more precision), per-tensor scales;
- the gradient flowing into a matmul's backward (dout): e4m3 by default, or e5m2
  (`fp8_gradients`). e5m2's extra range is what delayed scaling needs (a scale from past
  amaxes must leave room); with current scaling the tensor's own amax sets the scale, and
  e4m3's extra mantissa bit measured closer to bf16: GPT-2 350M on Shakespeare (B=8, 500 steps,
  H100, 2026-11-23), val loss at step 100 was 1.4-2.1% below bf16's in all three e5m2 runs
  against +0.8% for e4m3, while two bf16 runs differed by up to 0.8% (benchmarks/fp8_parity.py).

Current scaling (fp8_scaling=current): before each cast, one pass takes the tensor's amax and
the cast uses the largest power-of-two scale that keeps it in range (fp8_cast).
fp8_scaling=delayed, the config's default, instead takes the scale of each cast that would need an amax
pass of its own (the attention output, the GELU output, the qkv gradient: tensors cuDNN and
cuBLASLt write) from the maximum of its site's last fp8_amax_history amaxes over 2^fp8_margin
(one fp8_delayed_scales launch before each forward), and the cast takes this step's amax as it
writes (fp8_quantize): one read of the tensor, and a value past the history's range saturates.
The casts whose producer takes the amax (PRODUCED, below) and the weights (cast once an
optimizer step) keep current scaling, the first forward casts by current scaling, and the
histories go to the checkpoint. With fp8 weight gradients (fuse_gelu: config fp8_fuse_gelu)
fc's output gradient takes a delayed scale too, so that the GELU derivative's own pass can
cast it into both layouts and take fc's bias gradient (fp8_gelu_quantize_transpose; the bf16
gradient is never written nor read back): 1558M B=16 on an H200, 236.2-239.9 -> 229.7 ms a
step. With fp8 weight gradients and delayed
scaling the fc matmul also writes its GELU output in fp8 (gelu_in_matmul: config
fp8_gelu_in_matmul): cuBLASLt's GELU_AUX_BIAS epilogue scales it by the fc projection's delayed
input scale and takes its amax, and one fp8 -> fp8 transpose fills the copy kept for the weight
gradient, so the bf16 GELU output is neither written nor read back by a cast: 1558M B=16 on an
H200, 229.4 and 227.1 -> 226.2 and 223.8 ms a step (2026-12-03, alternated in one call). The
recipe's val loss, deterministic, 500 steps, seeds 1337 / 2 / 3: 124M within 0.40 / 0.33 / 0.56%
of bf16's at every evaluation, 350M within 0.56 / 2.25 / 0.79% (seed 2: fp8 ahead at steps
100-150, as the cast apart was); one step skipped by the spike guard at 124M seed 1337 (README,
FP8, has the table).
layernorm_cast (config fp8_layernorm_cast) does the same for the
layernorms: with a delayed scale for the qkv and fc inputs, ln1 and ln2 write those casts in
e4m3 themselves (the bf16 outputs are never written nor read back; 78 of 156 MB a layernorm
less at 1558M B=16) and a byte transpose makes each kept copy.
delayed_weights (config fp8_delayed_weights) casts each weight in one
pass with a delayed scale, its amax taken as it casts, instead of an amax pass and a cast (2.95
GB read less a step at 1558M); a forward reusing the casts (fresh_weights=False) leaves the
weight sites out of fp8_delayed_scales, so their inverses stay those the copies were cast with.
Both on (the defaults since 2026-12-04), 1558M B=16 on an H200, alternated twice in one call:
229.2 and 229.8 -> 228.6 and 226.9 ms a step, about 1.7 ms less kernel time in casts and
layernorms; their val loss within the spread of bf16's own runs (README, FP8).
Measured at 1558M B=16 on an H200 (2026-12-03, fp8 weight gradients, before that fusion):
238.1 -> 232.1 ms a step for the three delayed sites; at 124M the val loss stayed within
0.66% of bf16's, and at 350M the early gap passes 1% (fp8 ahead), where two bf16 runs
differing only in the attention backward's rounding also land up to 3.7% apart (README, FP8).
Current scaling costs that second read of those three tensors, but there is no amax history
to warm up, checkpoint or resume, a tensor whose range jumps is never clipped, and a run is
bitwise reproducible by construction (the amax is an order-free maximum).

What is kept, planned once with the model:
- each block matrix's fp8 copy W8 (OC, C) for the forward and its transpose W8t (C, OC) for
  the input gradient (Hopper's fp8 tensor cores take both operands K-major), cast from the bf16
  weights in every forward, layer by layer (so a forward always reads the current weights,
  whatever changed them: an update, a gather, a checkpoint load), except where the caller
  promises the weights are those of the last forward (fresh_weights=False: the later
  micro-steps of an optimizer step, whose forwards then skip 2 reads and 2 writes a block
  parameter, about 3 ms at 1558M);
- one fp8 scratch of rows x 4C bytes (two with fp8_weight_gradients: the output gradient and
  its transpose at once): each cast activation or gradient lives there only until its matmul
  has read it;
- with fp8_weight_gradients, each block matmul's input cast transposed (C_in, rows) by its
  forward and kept for its weight gradient (7C bytes a token a layer), in place of the bf16
  layernorm and GELU outputs the backward would otherwise keep or rebuild;
- one fp32 amax and one inverse scale per cast ("site": layer x {weight, input, gradient} x
  matrix), the amaxes zeroed together at the start of each forward.

Where our own kernel writes the tensor a site casts, that kernel takes the amax as it writes
(PRODUCED): the layernorms' outputs ln1 and ln2 (the qkv and fc inputs), the layernorm
backwards' residual gradients (the attention and MLP projections' output gradients) and the GELU
derivative's d_4C (fc's output gradient); the model hands each producer its site's amax
(producer_amax), and those casts skip their amax pass. The amax is the same maximum either way,
so the run is bitwise the one with every pass (fuse_amax=False, which the tests compare with).
The other casts' inputs come from cuDNN (attention output, qkv gradient) or cuBLASLt's GELU
epilogue (fc projection input) and keep their pass. At 1558M B=16 that pass read 837 MB a layer
in all; the fused sites are half of it.
"""
import torch

from distgpt.backends.reference import FP8_FORMATS, fp8_max as fp8_max_of

MATRICES = ("qkv", "attproj", "fc", "fcproj")  # the block's matmuls, in forward order
WEIGHT, INPUT, GRADIENT = range(3)  # what a site casts
# the sites whose tensor our own kernels write, taking its amax as they do (see the module note)
PRODUCED = frozenset({(INPUT, "qkv"), (INPUT, "fc"), (GRADIENT, "attproj"), (GRADIENT, "fcproj"),
                      (GRADIENT, "fc")})
LAYERNORM_INPUTS = ("qkv", "fc")  # the matmuls whose input is a layernorm's output (ln1, ln2)
ACTIVATION_FORMAT = torch.float8_e4m3fn  # weights and matmul inputs
SITE_STRIDE = 4  # fp32 elements between two sites' scales: cuBLASLt wants its scale pointers
#                  16-byte aligned (a packed array failed with NOT_SUPPORTED at every odd site)


def fp8_weight_numel(n_layer, C):
    """Elements of the block matrices: 3C^2 + C^2 + 4C^2 + 4C^2 per layer."""
    return n_layer * 12 * C * C


def scratch_regions(weight_gradients):
    """Regions of rows x 4C bytes the casts use at once: the operand of the product at hand;
    with fp8 weight gradients, also the output gradient's transpose."""
    return 2 if weight_gradients else 1


def kept_inputs_numel(n_layer, C, rows):
    """fp8 weight gradients: the block matmuls' inputs kept transposed from the forward, (C, rows)
    for qkv, the attention projection and fc, (4C, rows) for the fc projection: 7C x rows a layer."""
    return n_layer * 7 * C * rows


def activation_recompute(recompute, recompute_layers, weight_gradients):
    """The (recompute, recompute_layers) the activation plan takes. With fp8 weight gradients the
    backward reads the blocks' inputs from their kept fp8 copies, so the layernorm and GELU
    outputs are needed in bf16 by the forward alone: one shared buffer each, as recompute 2
    plans them, and nothing is rebuilt (GPT2.rebuilds)."""
    return (2, -1) if weight_gradients else (recompute, recompute_layers)


def fp8_bytes(n_layer, C, rows, weight_gradients=False):
    """[(what, bytes)] the fp8 path plans: the weights' two fp8 copies, the cast scratch and,
    with fp8 weight gradients, the inputs kept for them."""
    regions = scratch_regions(weight_gradients)
    rows_out = [("fp8 weights (W and W^T per block matrix)", 2 * fp8_weight_numel(n_layer, C)),
                (f"fp8 cast scratch ({regions} x {rows} rows x 4C)", regions * rows * 4 * C)]
    if weight_gradients:
        rows_out.append(("fp8 block inputs kept transposed for the weight gradients",
                         kept_inputs_numel(n_layer, C, rows)))
    return rows_out


class Fp8Matmuls:
    """The fp8 state of one model: weight copies, cast scratch, amaxes and inverse scales, and
    the forward / input-gradient products of the block matmuls over the backend's fp8 ops."""

    def __init__(self, ops, p_layers, n_layer, C, rows, device, gradient_format="e4m3", fuse_amax=True,
                 weight_gradients=False, scaling="current", amax_history=16, margin=0, fuse_gelu=True,
                 gelu_in_matmul=True, layernorm_cast=True, delayed_weights=True):
        self.ops, self.p_layers = ops, p_layers
        self.fuse_amax = fuse_amax  # False: every cast takes its own amax pass (tests compare the two)
        self.gradient_format = FP8_FORMATS[gradient_format]  # of the gradients entering a backward
        self.weight_gradients = weight_gradients  # the weight gradients as fp8 products too (backward())
        self.weights8, self.weights8_t = [], []  # [layer] -> {matrix: (OC, C)} and {matrix: (C, OC)}
        self.flat = flat = torch.zeros(2 * fp8_weight_numel(n_layer, C), dtype=torch.uint8, device=device)
        offset = 0
        for layer in range(n_layer):
            w8, w8_t = {}, {}
            for m in MATRICES:
                OC, Cin = getattr(p_layers[layer], f"{m}_w").shape
                n = OC * Cin
                w8[m] = flat[offset:offset + n].view(ACTIVATION_FORMAT).view(OC, Cin)
                w8_t[m] = flat[offset + n:offset + 2 * n].view(ACTIVATION_FORMAT).view(Cin, OC)
                offset += 2 * n
            self.weights8.append(w8)
            self.weights8_t.append(w8_t)
        self.region = rows * 4 * C  # bytes of one scratch region
        self.scratch = torch.zeros(scratch_regions(weight_gradients) * self.region, dtype=torch.uint8,
                                   device=device)
        # fp8 weight gradients: each block matmul's input, cast transposed in the forward and kept
        # for its weight gradient ([layer] -> {matrix: flat bytes for (C_in, rows)})
        self.kept = torch.zeros(kept_inputs_numel(n_layer, C, rows) if weight_gradients else 0,
                                dtype=torch.uint8, device=device)
        self.kept_inputs, offset = [], 0
        for layer in range(n_layer if weight_gradients else 0):
            kept = {}
            for m in MATRICES:
                n = getattr(p_layers[layer], f"{m}_w").shape[1] * rows
                kept[m] = self.kept[offset:offset + n]
                offset += n
            self.kept_inputs.append(kept)
        self.weights_cast = False  # whether W8/W8t hold a cast of the weights yet
        sites = n_layer * 3 * len(MATRICES)
        self.amax = torch.zeros(sites, SITE_STRIDE, dtype=torch.float32, device=device)
        self.inverse = torch.ones(sites, SITE_STRIDE, dtype=torch.float32, device=device)
        # evaluation and sampling forwards cast into their own amaxes and inverses (see
        # begin_forward), so the training step's, and the histories built from them, stay as they were
        self._eval_amax, self._eval_inverse = torch.zeros_like(self.amax), torch.ones_like(self.inverse)
        self.evaluating = False
        # delayed scaling (scaling="delayed"): the casts that would need an amax pass of their
        # own (inputs cuDNN or cuBLASLt wrote) take their scale from the amaxes of the last
        # amax_history forwards and backwards (history) and take this one's amax as they cast,
        # one read instead of two. The sites whose producer takes the amax (PRODUCED) read
        # their tensor once by current scaling already, so a delayed scale would buy nothing
        # there and only risk clipping: they keep current scaling, as do the weights, cast once
        # an optimizer step. GPT-2 124M on Shakespeare (H200, 2026-12-03, deterministic, 500
        # steps): every activation and gradient delayed ran 0.5-1.1% above bf16's val loss
        # from step 100 on, current scaling 0.0-0.35% below. The first forward, with no history
        # yet, casts by current scaling everywhere (forwards counts them).
        if scaling not in ("current", "delayed"):
            raise ValueError(f"fp8 scaling={scaling!r}: choose current or delayed")
        self.delayed = scaling == "delayed"
        # delayed scaling with fp8 weight gradients: fc's output gradient is cast by the GELU
        # derivative's own pass (fp8_gelu_quantize_transpose, with a delayed scale: the scale
        # must be known before the values are), which also takes fc's bias gradient; neither the
        # bf16 gradient nor a separate cast or bias pass is left (see _input_gradient)
        self.fuses_gelu = self.delayed and weight_gradients and fuse_gelu
        self._fc_gradient_delayed = self.fuses_gelu  # its site's scale, whether fused or not (tests)
        # delayed scaling with fp8 weight gradients and layernorm_cast: ln1 and ln2 write the qkv and
        # fc inputs' e4m3 casts themselves, with a delayed scale for those two sites (so they
        # leave current scaling), and a byte transpose fills the kept copies (see layernorm)
        self.layernorm_cast = self.delayed and weight_gradients and layernorm_cast
        self._ln8 = None  # (layer, matrix, the e4m3 layernorm output in scratch region 0)
        # delayed scaling with delayed_weights: the weights' casts take their scales from the
        # weight amaxes' history too, one pass a matrix instead of an amax pass and a cast
        # (weights move little between steps, and a scale is a power of two: a history maximum
        # a few steps old is this step's, or one power of two off)
        self.delayed_weights = self.delayed and delayed_weights
        self._fused_gradient = None  # (layer, out, out_t, inverse): fc's gradient, cast by the fusion
        # delayed scaling with fp8 weight gradients: the fc matmul's epilogue writes the GELU
        # output straight in fp8 with the fc projection's delayed input scale (and takes its
        # amax), and one fp8 -> fp8 transpose makes the copy kept for the weight gradient; the bf16
        # GELU output is never written, nor read back by a cast (see forward)
        self.gelu_in_matmul = self.delayed and weight_gradients and gelu_in_matmul
        self._gelu8 = None  # (layer, the fp8 GELU output in scratch region 1), for fcproj's forward
        self.forwards = 0
        n = sites if self.delayed else 0
        self.history = torch.zeros(n, amax_history, dtype=torch.float32, device=device)
        self.scale = torch.ones(n, SITE_STRIDE, dtype=torch.float32, device=device)
        kinds = [(what, m) for layer in range(n_layer) for what in range(3) for m in MATRICES][:n]  # by _index
        whats = [what for what, _ in kinds]
        # a forward that reuses the weights' fp8 copies (fresh_weights False) moves no weight site:
        # their scales must stay those the copies were cast with
        self.delayed_activations = torch.tensor([self._delays(what, m) and what != WEIGHT for what, m in kinds],
                                                dtype=torch.bool, device=device)
        self.delayed_sites = torch.tensor([self._delays(what, m) for what, m in kinds], dtype=torch.bool,
                                          device=device)
        # a delayed scale puts the history's amax at the format's largest value over 2^margin
        self.limits = torch.tensor([fp8_max_of(gradient_format if w == GRADIENT else "e4m3") / 2 ** margin
                                    for w in whats], dtype=torch.float64, device=device)

    @property
    def nbytes(self):
        return sum(t.nbytes for t in (self.flat, self.scratch, self.kept, self.amax, self.inverse, self._eval_amax,
                                       self._eval_inverse, self.history, self.scale, self.limits,
                                       self.delayed_sites, self.delayed_activations))

    @property
    def amaxes(self):
        """Each site's amax from the last forward and backward (one per site)."""
        return self.amax[:, 0]

    @property
    def inverses(self):
        return self.inverse[:, 0]

    @staticmethod
    def _index(layer, what, m):
        """The site's row in amax, inverse, scale and history."""
        return (layer * 3 + what) * len(MATRICES) + MATRICES.index(m)

    def _site(self, layer, what, m):
        i = self._index(layer, what, m)
        amax, inverse = (self._eval_amax, self._eval_inverse) if self.evaluating else (self.amax, self.inverse)
        return amax[i, :1], inverse[i, :1]

    def _delays(self, what, m):
        """Whether delayed scaling takes this kind of site's scale from its history: not a
        weight's, nor one whose producer takes the amax (see __init__; also with fuse_amax off,
        so that switch stays bitwise)."""
        if (what, m) == (GRADIENT, "fc") and self._fc_gradient_delayed:
            return True
        if what == INPUT and m in LAYERNORM_INPUTS and self.layernorm_cast:
            return True
        if what == WEIGHT:
            return self.delayed_weights
        return self.delayed and what != WEIGHT and (what, m) not in PRODUCED

    def _delaying(self, layer, what, m):
        """This site's scale when its cast takes it from the history (a delayed site, once a
        forward has left amaxes), else None (current scaling)."""
        if self.forwards < 2 or self.evaluating or not self._delays(what, m):
            return None
        return self.scale[self._index(layer, what, m), :1]

    def _kept_input(self, layer, m, rows):
        """The kept transposed fp8 copy of the layer's matmul m's input, (C_in, rows)."""
        C_in = self.weights8[layer][m].shape[1]
        return self.kept_inputs[layer][m][:C_in * rows].view(ACTIVATION_FORMAT).view(C_in, rows)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self):
        """Delayed scaling's state, for a checkpoint: the amaxes not yet in the history, the
        histories and the number of forwards; current scaling keeps none."""
        if not self.delayed:
            return {}, {}
        return {"fp8_amax": self.amax, "fp8_history": self.history}, {"fp8_forwards": self.forwards}

    def load_state_dict(self, tensors, meta):
        self.amax.copy_(tensors["fp8_amax"])
        self.history.copy_(tensors["fp8_history"])
        self.forwards = int(meta["fp8_forwards"])

    def producer_amax(self, layer, what, m):
        """The amax the kernel writing this site's tensor merges into, or None where the cast
        takes its own (not a PRODUCED site, or fuse_amax off)."""
        if not self.fuse_amax or (what, m) not in PRODUCED:
            return None
        return self._site(layer, what, m)[0]

    def _cast(self, x, fmt, layer, what, m):
        """x's fp8 copy in the scratch (x contiguous, its own shape) and its inverse scale."""
        out = self._region(0, x.numel(), fmt).view(x.shape)
        amax, inverse = self._site(layer, what, m)
        scale = self._delaying(layer, what, m)
        if scale is not None:
            self.ops.fp8_quantize(out, amax, x, scale)
        else:
            self.ops.fp8_cast(out, inverse, amax, x, amax_known=self.producer_amax(layer, what, m) is not None)
        return out, inverse

    def _region(self, i, n, fmt):
        """The first n bytes of scratch region i, as fp8 of format fmt."""
        return self.scratch[i * self.region:i * self.region + n].view(fmt)

    def _cast_transposed(self, x, fmt, layer, what, m, out_t, amax_known):
        """x (rows, cols) cast into scratch region 0 (rows, cols) and its transpose into out_t
        (cols, rows), with the site's scale: (x8, inverse)."""
        x = x.reshape(-1, x.shape[-1])
        out = self._region(0, x.numel(), fmt).view(x.shape)
        amax, inverse = self._site(layer, what, m)
        scale = self._delaying(layer, what, m)
        if scale is not None:
            self.ops.fp8_quantize_transpose(out, out_t, amax, x, scale)
        else:
            self.ops.fp8_cast_transpose(out, out_t, inverse, amax, x, amax_known=amax_known)
        return out, inverse

    # ------------------------------------------------------------ forward
    def begin_forward(self, cast_weights=True, training=True):
        """Zero the amaxes this forward's and backward's casts take their maximum into: one
        launch a forward. cast_weights False: the weights' fp8 copies from an earlier forward
        are reused (see GPT2.forward's fresh_weights), and their sites keep amax and scale.
        Delayed scaling first moves the last forward's and backward's amaxes into the histories
        and takes this forward's scales from them (one launch).
        training False (evaluation, sampling: no backward follows; the caller casts the weights):
        every cast takes current scaling into amaxes and inverses of its own, so the histories,
        the forward count and the training step's amaxes stay as they were for the next training
        forward, also when that one is a CUDA graph replay (which runs none of this Python).
        Before 2026-12-03 an evaluation pushed its amaxes into the histories, zeros for every
        gradient site: after the evaluation at step 0 the first training step cast its delayed
        gradients with a scale of 1 (their small values flushed to zero), and 16 evaluation
        batches in a row would have done it to any step."""
        self.evaluating = not training
        if not training:
            self._eval_amax.zero_()
            return
        if self.delayed:
            if self.forwards:
                self.ops.fp8_delayed_scales(self.scale, self.inverse, self.history, self.amax, self.limits,
                                            self.delayed_sites if cast_weights else self.delayed_activations)
            self.forwards += 1
        if cast_weights:
            self.amax.zero_()
        else:
            self.amax.view(len(self.weights8), 3, -1)[:, INPUT:].zero_()

    def cast_weights(self, layer):
        """The layer's four matrices into W8 and W8t, before its first matmul reads them."""
        self.weights_cast = True
        for m in MATRICES:
            amax, inverse = self._site(layer, WEIGHT, m)
            weight, scale = getattr(self.p_layers[layer], f"{m}_w"), self._delaying(layer, WEIGHT, m)
            if scale is not None:  # delayed_weights: one pass, taking this cast's amax for the history
                self.ops.fp8_quantize_transpose(self.weights8[layer][m], self.weights8_t[layer][m], amax, weight,
                                                scale)
            else:
                self.ops.fp8_cast_transpose(self.weights8[layer][m], self.weights8_t[layer][m], inverse, amax, weight)

    def forward(self, layer, m, out, inp, bias, gelu_out=None, residual=None):
        """out = inp @ W^T + bias (+ residual; and gelu_out = gelu(out)) with inp and W in e4m3;
        with weight_gradients inp is cast transposed too, into its kept copy. With gelu_in_matmul
        (and a delayed scale for it) fc writes its GELU output in fp8 instead of gelu_out, and
        the fc projection reads that (_gelu_forward)."""
        if gelu_out is not None and self._fp8_gelu_output(layer, gelu_out):
            return self._gelu_forward(layer, out, inp, bias, gelu_out)
        if self._gelu8 is not None and self._gelu8[0] == layer and m == "fcproj":
            _, inp8 = self._gelu8
            self._gelu8 = None
            _, inp_inverse = self._site(layer, INPUT, m)
        elif self.weight_gradients:
            inp8, inp_inverse = self._input_cast(layer, m, inp)
        else:
            inp8, inp_inverse = self._cast(inp, ACTIVATION_FORMAT, layer, INPUT, m)
        _, w_inverse = self._site(layer, WEIGHT, m)
        self.ops.fp8_matmul_forward(out, inp8, inp_inverse, self.weights8[layer][m], w_inverse, bias,
                                    gelu_out=gelu_out, residual=residual)

    def layernorm(self, layer, m, out, mean, rstd, inp, weight, bias):
        """The layernorm whose output the layer's matmul m (qkv: ln1, fc: ln2) reads. As a rule
        it writes the bf16 out and takes the amax for that input's cast (producer_amax). With
        layernorm_cast and a delayed scale for the site (_produced_cast_scale) it writes the cast
        itself, e4m3 with that scale, into scratch region 0 (the matmul before it has
        read its operand from there), takes the amax for the site's history, and leaves out
        unwritten: the matmul reads the cast (_input_cast)."""
        scale = self._produced_cast_scale(layer, m, out) if self.layernorm_cast else None
        if scale is None:
            self.ops.layernorm_forward(out, mean, rstd, inp, weight, bias, amax=self.producer_amax(layer, INPUT, m))
            return
        out8 = self._region(0, out.numel(), ACTIVATION_FORMAT).view(out.shape)
        amax, _ = self._site(layer, INPUT, m)
        self.ops.layernorm_forward(out8, mean, rstd, inp, weight, bias, amax=amax, scale=scale)
        self._ln8 = (layer, m, out8)

    def _input_cast(self, layer, m, inp):
        """With weight_gradients: inp's e4m3 copy (in scratch region 0, inp's shape) and its
        inverse scale, its transpose in the kept copy: the layernorm's own cast where it wrote one
        (then only the transpose runs), else one cast pass writing both."""
        rows = inp.numel() // inp.shape[-1]
        kept = self._kept_input(layer, m, rows)
        if self._ln8 is not None and self._ln8[:2] == (layer, m):
            inp8 = self._ln8[2]
            self._ln8 = None
            self.ops.fp8_transpose(kept, inp8.view(rows, -1))
            return inp8, self._site(layer, INPUT, m)[1]
        inp8, inverse = self._cast_transposed(inp, ACTIVATION_FORMAT, layer, INPUT, m, kept,
                                              amax_known=self.producer_amax(layer, INPUT, m) is not None)
        return inp8.view(inp.shape), inverse

    def _produced_cast_scale(self, layer, m, t):
        """The scale the kernel writing t (the input of the layer's matmul m) casts it with in
        place of its bf16 output, a byte transpose then making the kept copy: the site's delayed
        scale (none in the first forward, nor in an evaluation), where t's shape is one the
        transpose kernel takes (rows a multiple of 8, columns of 16: every GPT-2 run); else None."""
        rows, cols = t.numel() // t.shape[-1], t.shape[-1]
        return None if rows % 8 or cols % 16 else self._delaying(layer, INPUT, m)

    def _fp8_gelu_output(self, layer, gelu_out):
        """Whether fc's GELU output goes to fp8 in its matmul (gelu_in_matmul, with a scale for it)."""
        return self.gelu_in_matmul and self._produced_cast_scale(layer, "fcproj", gelu_out) is not None

    def _gelu_forward(self, layer, out, inp, bias, gelu_out):
        """fc with its GELU output in fp8: inp (ln2) is cast transposed as any block input (into
        scratch region 0 and its kept copy, _input_cast), the product writes the pre-activation into out and
        fp8(gelu(out) * the fc projection's delayed input scale) into scratch region 1 (free in
        the forward: the backward's output-gradient transposes use it), taking its amax for that
        site's history, and the transpose pass fills the fc projection's kept input from it."""
        inp8, inp_inverse = self._input_cast(layer, "fc", inp)
        _, w_inverse = self._site(layer, WEIGHT, "fc")
        rows, C4 = gelu_out.numel() // gelu_out.shape[-1], gelu_out.shape[-1]
        gelu8 = self._region(1, rows * C4, ACTIVATION_FORMAT).view(rows, C4)
        amax, _ = self._site(layer, INPUT, "fcproj")
        self.ops.fp8_matmul_forward(out, inp8, inp_inverse, self.weights8[layer]["fc"], w_inverse,
                                    bias, gelu_out=gelu8.view(gelu_out.shape),
                                    gelu_scale=self._delaying(layer, INPUT, "fcproj"), gelu_amax=amax)
        self.ops.fp8_transpose(self._kept_input(layer, "fcproj", rows), gelu8)
        self._gelu8 = (layer, gelu8.view(gelu_out.shape))

    # ------------------------------------------------------------ backward
    def gradient_cast(self, layer, m):
        """Whether this matmul's output gradient is already cast, with its bias gradient taken
        (fc's, by the fused GELU derivative of the fc projection's backward just before)."""
        return self._fused_gradient is not None and self._fused_gradient[0] == layer and m == "fc"

    def backward(self, layer, m, dinp, dweight, dout, gelu_inp=None, gelu_dbias=None, accumulate=True):
        """With weight_gradients: dW += dout^T @ inp and dinp = dout @ W (times gelu'(gelu_inp)),
        both fp8 products. Hopper's fp8 tensor cores take both operands K-major, and the weight
        gradient's K is the tokens: it reads the transposes of dout (OC, rows) and of the input
        (C, rows). The input's is the copy its forward cast kept (with that cast's scale, which
        its site keeps until the next forward); dout is cast once into both layouts, the input
        gradient reading the first, unless the fused GELU derivative cast it already
        (gradient_cast). gelu_dbias (with gelu_inp): fc's bias gradient, for that fusion.
        accumulate False: dW is overwritten (GPT2.backward's write_matrices)."""
        _, inp_inverse = self._site(layer, INPUT, m)
        OC = dout.shape[-1]
        rows = dout.numel() // OC
        if self.gradient_cast(layer, m):
            _, dout8, dout8_t, dout_inverse = self._fused_gradient
            self._fused_gradient = None
        else:
            dout8_t = self._region(1, dout.numel(), self.gradient_format).view(OC, rows)
            dout8, dout_inverse = self._cast_transposed(
                dout, self.gradient_format, layer, GRADIENT, m, dout8_t,
                amax_known=self.producer_amax(layer, GRADIENT, m) is not None)
        self.ops.fp8_matmul_weight_grad(dweight, dout8_t, dout_inverse, self._kept_input(layer, m, rows),
                                        inp_inverse, accumulate=accumulate)
        self._input_gradient(layer, m, dinp, dout8.view(dout.shape), dout_inverse, gelu_inp, gelu_dbias)

    def backward_input(self, layer, m, dinp, dout, gelu_inp=None):
        """dinp = dout @ W (times gelu'(gelu_inp)) with dout in e4m3 (or e5m2) and W^T in e4m3."""
        dout8, dout_inverse = self._cast(dout, self.gradient_format, layer, GRADIENT, m)
        self._input_gradient(layer, m, dinp, dout8, dout_inverse, gelu_inp)

    def _input_gradient(self, layer, m, dinp, dout8, dout_inverse, gelu_inp, gelu_dbias=None):
        _, w_inverse = self._site(layer, WEIGHT, m)
        fused = self.fuses_gelu and gelu_inp is not None and gelu_dbias is not None
        scale = self._delaying(layer, GRADIENT, "fc") if fused else None
        if scale is not None:
            # the plain product into dinp, then one pass over it and the pre-activation casts fc's
            # output gradient into both layouts (scratch regions 0 and 1: this product has read
            # region 0 by then, the weight gradient region 1) and adds fc's bias gradient
            self.ops.fp8_matmul_backward_input(dinp, dout8, dout_inverse, self.weights8_t[layer][m], w_inverse)
            C4 = dinp.shape[-1]
            rows = dinp.numel() // C4
            out = self._region(0, dinp.numel(), self.gradient_format).view(rows, C4)
            out_t = self._region(1, dinp.numel(), self.gradient_format).view(C4, rows)
            amax, inverse = self._site(layer, GRADIENT, "fc")
            self.ops.fp8_gelu_quantize_transpose(out, out_t, amax, gelu_dbias, dinp.view(rows, C4),
                                                 gelu_inp.view(rows, C4), scale)
            self._fused_gradient = (layer, out, out_t, inverse)
            return
        # fc projection: the GELU derivative writes d_4C, fc's output gradient, and takes its amax
        amax = None if gelu_inp is None else self.producer_amax(layer, GRADIENT, "fc")
        self.ops.fp8_matmul_backward_input(dinp, dout8, dout_inverse, self.weights8_t[layer][m], w_inverse,
                                           gelu_inp=gelu_inp, amax=amax)
