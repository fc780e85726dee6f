"""Where every tensor of a GPT-2 lives: one parameter table over one flat buffer, and an
activation plan sized once for (B, T).

The parameter table is the single source of truth for names, shapes, offsets and which tensors
get weight decay; the flat parameter and gradient buffers, the optimizer's ZeRO-1 shards,
checkpoints and every export format are all read off it. Names and order follow GPT-2's
published checkpoint (HF names), shapes follow nn.Linear (out, in), as llm.c stores them.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple
    offset: int  # into the flat buffer, in elements
    decay: bool  # weight decay applies (matmul weights and embeddings; not biases, not layernorm)

    @property
    def numel(self) -> int:
        return _numel(self.shape)


LAYER_PARAMS = (  # (suffix, shape as a function of C, decays?) in GPT-2's order
    ("ln_1.weight", lambda C: (C,), False),
    ("ln_1.bias", lambda C: (C,), False),
    ("attn.c_attn.weight", lambda C: (3 * C, C), True),
    ("attn.c_attn.bias", lambda C: (3 * C,), False),
    ("attn.c_proj.weight", lambda C: (C, C), True),
    ("attn.c_proj.bias", lambda C: (C,), False),
    ("ln_2.weight", lambda C: (C,), False),
    ("ln_2.bias", lambda C: (C,), False),
    ("mlp.c_fc.weight", lambda C: (4 * C, C), True),
    ("mlp.c_fc.bias", lambda C: (4 * C,), False),
    ("mlp.c_proj.weight", lambda C: (C, 4 * C), True),
    ("mlp.c_proj.bias", lambda C: (C,), False),
)
# residual projections: GPT-2 scales their init by 1/sqrt(2 * n_layer)
RESIDUAL_PROJECTIONS = ("attn.c_proj.weight", "mlp.c_proj.weight")
# every parameter starts at a multiple of this many elements: 16-byte aligned for bf16 and fp32,
# so kernels can use 128-bit loads on any tensor
ALIGN_ELEMENTS = 8
# The flat buffer's order as this table lays it out. Optimizer shards are stored as slices of the
# flat buffer, so a checkpoint written under another layout cannot be read as this one: its
# shards record the version, and a mismatch is refused (checkpoint.load_optimizer). Raise it
# whenever the offsets change. (The data-parallel layer's buckets need each layer's matrices
# contiguous, which this order already gives: wte, wpe, then layer 0's, 1's, ... matrices.)
LAYOUT_VERSION = 1


class ParameterLayout:
    """The parameter table for one model shape, with the flat buffer's padded size."""

    def __init__(self, n_layer, n_embd, vocab_size, padded_vocab_size, block_size, pad_multiple=1):
        C, Vp = n_embd, padded_vocab_size
        self.n_layer, self.n_embd = n_layer, n_embd
        self.vocab_size, self.padded_vocab_size = vocab_size, padded_vocab_size
        entries = [("transformer.wte.weight", (Vp, C), True),
                   ("transformer.wpe.weight", (block_size, C), True)]
        for layer in range(n_layer):
            for suffix, shape, decay in LAYER_PARAMS:
                entries.append((f"transformer.h.{layer}.{suffix}", shape(C), decay))
        entries += [("transformer.ln_f.weight", (C,), False), ("transformer.ln_f.bias", (C,), False)]
        # Offsets group the tensors that get weight decay before those that do not, so AdamW
        # covers the flat buffer in two launches instead of one per tensor (580 at 1558M).
        # `specs` itself stays in GPT-2's order: initialisation and exports walk it.
        offsets, offset = {}, 0
        for name, shape, decay in sorted(entries, key=lambda e: not e[2]):
            offset = -(-offset // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
            offsets[name] = offset
            offset += _numel(shape)
        self.specs = [ParamSpec(name, tuple(shape), offsets[name], decay) for name, shape, decay in entries]
        self.used = offset
        # ZeRO-1 cuts the flat buffer into world-size equal shards: pad rather than change the plan
        unit = ALIGN_ELEMENTS * pad_multiple
        self.total = -(-offset // unit) * unit

    @property
    def num_parameters(self) -> int:
        """GPT-2's own count: real vocabulary rows only, alignment and padding excluded."""
        padding_rows = (self.padded_vocab_size - self.vocab_size) * self.n_embd
        return sum(s.numel for s in self.specs) - padding_rows

    def layer_matrices(self, layer):
        """[start, end) of one layer's four matrices: contiguous, as the flat order puts the
        tensors with weight decay in GPT-2's order. Their gradients are final once that layer's
        backward has run, which is what the data-parallel layer's buckets are cut by."""
        specs = [s for s in self.specs if s.name.startswith(f"transformer.h.{layer}.") and s.decay]
        start, end = min(s.offset for s in specs), max(s.offset + s.numel for s in specs)
        if end - start >= sum(s.numel for s in specs) + ALIGN_ELEMENTS * len(specs):
            raise ValueError(f"layer {layer}'s matrices are not contiguous in the flat buffer")
        return start, end

    def block_matrices(self):
        """[start, end) of every layer's matrices together: contiguous, as the flat order puts
        wte and wpe first, then each layer's matrices, then the tensors without weight decay."""
        return self.layer_matrices(0)[0], self.layer_matrices(self.n_layer - 1)[1]

    def views(self, flat):
        """name -> view of `flat` with that parameter's shape."""
        return {s.name: flat[s.offset:s.offset + s.numel].view(s.shape) for s in self.specs}


class LayerTensors(NamedTuple):
    """One transformer block's parameters (or gradients), named as the kernels use them."""
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    attproj_w: torch.Tensor
    attproj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    fcproj_w: torch.Tensor
    fcproj_b: torch.Tensor


def layer_tensors(named, layer):
    return LayerTensors(*(named[f"transformer.h.{layer}.{suffix}"] for suffix, _, _ in LAYER_PARAMS))


# ---------------------------------------------------------------- activations
# The lm head + softmax + cross-entropy run over the B*T rows in chunks of at most this many
# (as in cut-cross-entropy), so the whole (B, T, Vp) logits never exist: one (R, Vp) chunk is
# the only vocabulary-wide buffer. 8192 rows keep the three lm-head matmuls of a chunk large
# (8192 x 768 x 50304 is ~0.6 TFLOP each at 124M, where cuBLAS runs at full speed) while the
# chunk is 8192 x 50304 bf16 = 0.8 GB, against 6.6 GB for the whole batch at B=64, T=1024.
CLASSIFIER_CHUNK_ROWS = 8192


def classifier_rows(B, T, chunk_rows=CLASSIFIER_CHUNK_ROWS):
    """R, the rows of the (R, Vp) logits scratch: chunk_rows, but at least T, so that a (1, T)
    forward without targets (sampling) holds all its logits at once, and at most B*T (B=8,
    T=1024 is one chunk, the whole batch)."""
    return min(B * T, max(T, chunk_rows))


# The layernorm outputs the qkv and fc products read can sit beside a column of ones, rows
# C + ONES_PAD apart (column C ones, the rest zeros, written once when the plan is made): the
# weight-gradient product over them then also sums the output gradient over the tokens, which is
# the bias gradient, with no pass of its own over a (B, T, 3C or 4C) gradient
# (matmul.weight_grad_bias_column; the CUDA backend's takes_bias_column says at which shapes that
# pays). 8 keeps the rows 16 bytes apart; with C + 1 rows cuBLASLt ran 4-5x slower, and rows 64
# or 128 wider were slower than 8 at 124M and 350M (benchmarks/bias_column_probe.py, H100,
# 2026-12-06).
ONES_PAD = 8
ONES_COLUMN_SLOTS = ("ln1", "ln2")


def takes_ones_column(backend, fp8, B, T, C):
    """Whether a model on this backend plans its layernorm outputs beside a column of ones: where
    the backend takes bias gradients from the weight-gradient products at this shape (its
    takes_bias_column(B * T, C); the fp8 path reads its own casts of those outputs, and keeps
    the column-sum kernels)."""
    takes = getattr(backend, "takes_bias_column", None)
    return takes is not None and not fp8 and bool(takes(B * T, C))


def with_ones_column(x):
    """x (..., C), a layernorm output the plan keeps beside its ones column, as the (..., C +
    ONES_PAD) tensor that includes the column: the same memory."""
    return x.as_strided(tuple(x.shape[:-1]) + (x.stride(-2),), x.stride())


# what each recompute level rebuilds in the backward instead of keeping per layer: the level
# from which that activation is one buffer shared by the layers that rebuild it
RECOMPUTED_FROM = {"fch_gelu": 1, "ln1": 2, "ln2": 2}


def recompute_levels(n_layer, recompute, recompute_layers=-1):
    """The recompute level of each layer: `recompute` for the first `recompute_layers` layers
    (-1: all of them) and one level less for the others. Partial recompute spends the memory a
    run has to spare on keeping some layers' activations (1558M B=16 fits in 56 GB with the
    layernorm outputs rebuilt in 20 of its 48 layers instead of all)."""
    if recompute_layers < 0 or recompute == 0:
        return (recompute,) * n_layer
    return tuple(recompute if layer < recompute_layers else recompute - 1 for layer in range(n_layer))


def activation_slots(n_layer, n_embd, n_head, padded_vocab_size, B, T, recompute,
                     chunk_rows=CLASSIFIER_CHUNK_ROWS, recompute_layers=-1, ones_column=False):
    """(name, shape, is_statistic) of every activation buffer for a step at (B, T).

    Per-layer buffers are named `name.l`. A layer at recompute level 1 keeps no GELU output: the
    backward rebuilds it from the pre-GELU activations into one buffer shared by such layers;
    level 2 also shares the layernorm outputs, rebuilt from the saved residual, mean and rstd
    (levels per layer: recompute_levels). The buffers marked as statistics stay in fp32 on the
    GPU. `logits` is the lm head's (R, Vp) chunk scratch, R = classifier_rows(B, T, chunk_rows),
    whatever the step's (b, t). ones_column: the layernorm outputs ln1 and ln2 are planned
    ONES_PAD columns wider (ActivationPlan.view hands out their first C)."""
    C, NH, Vp = n_embd, n_head, padded_vocab_size
    C_ln = C + ONES_PAD if ones_column else C
    R = classifier_rows(B, T, chunk_rows)
    levels = recompute_levels(n_layer, recompute, recompute_layers)
    slots = [("encoded", (B, T, C), False)]
    per_layer = [("residual2", (B, T, C), False), ("residual3", (B, T, C), False),
                 ("ln1_mean", (B, T), True), ("ln1_rstd", (B, T), True),
                 ("ln2_mean", (B, T), True), ("ln2_rstd", (B, T), True),
                 ("qkv", (B, T, 3 * C), False), ("atty", (B, T, C), False),
                 ("att_lse", (B, NH, T), True), ("fch", (B, T, 4 * C), False)]
    rebuildable = [("fch_gelu", (B, T, 4 * C)), ("ln1", (B, T, C_ln)), ("ln2", (B, T, C_ln))]
    for layer in range(n_layer):
        slots += [(f"{name}.{layer}", shape, stat) for name, shape, stat in per_layer]
        slots += [(f"{name}.{layer}", shape, False) for name, shape in rebuildable
                  if levels[layer] < RECOMPUTED_FROM[name]]
    slots += [(name, shape, False) for name, shape in rebuildable
              if max(levels) >= RECOMPUTED_FROM[name]]
    slots += [("lnf", (B, T, C), False), ("lnf_mean", (B, T), True), ("lnf_rstd", (B, T), True),
              ("logits", (R, Vp), False), ("losses", (B, T), True),
              # scratch: the backward's running gradients, one copy each, reused by every layer
              # (d_C also carries the lm head's dlnf from the forward to the start of the
              # backward)
              ("dresidual", (B, T, C), False), ("dproj_sum", (C,), True),
              ("d_C", (B, T, C), False), ("d_3C", (B, T, 3 * C), False)]
    # d_4C, fc's output gradient, is written by the fc projection's input gradient right after
    # its weight gradient read the rebuilt GELU output: with a shared rebuilt-GELU buffer the two
    # are one buffer (ActivationPlan.view), 200 MiB less at 1558M B=16
    if max(levels) < RECOMPUTED_FROM["fch_gelu"]:
        slots.append(("d_4C", (B, T, 4 * C), False))
    return slots


def pack_slots(slots):
    """Offsets of each slot in its flat buffer (activations or statistics), each start aligned,
    and the two buffers' sizes in elements: the one sizing rule the plan and the estimate share."""
    offsets, sizes = {}, {False: 0, True: 0}
    for name, shape, stat in slots:
        offsets[name] = (stat, sizes[stat])
        sizes[stat] += -(-_numel(shape) // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
    return offsets, sizes


class ActivationPlan:
    """All activation buffers for (B, T), carved out of two flat allocations (activations in the
    compute dtype, statistics in `stat_dtype`) made once. `view(b, t)` hands out the same
    buffers shaped for a smaller batch or sequence (validation, sampling) without allocating."""

    def __init__(self, n_layer, n_embd, n_head, padded_vocab_size, B, T, recompute,
                 dtype, stat_dtype, device, chunk_rows=CLASSIFIER_CHUNK_ROWS, recompute_layers=-1,
                 ones_column=False):
        self.B, self.T, self.n_layer, self.C = B, T, n_layer, n_embd
        self.slots = activation_slots(n_layer, n_embd, n_head, padded_vocab_size, B, T, recompute,
                                      chunk_rows, recompute_layers, ones_column)
        self.offsets, sizes = pack_slots(self.slots)
        self.buffers = {False: torch.empty(sizes[False], dtype=dtype, device=device),
                        True: torch.empty(sizes[True], dtype=stat_dtype, device=device)}
        # the slots planned beside a ones column, and their columns past C written once: nothing
        # writes there again
        self.padded = {name for name, _, _ in self.slots
                       if ones_column and name.split(".")[0] in ONES_COLUMN_SLOTS}
        for name, shape, stat in self.slots:
            if name in self.padded:
                _, off = self.offsets[name]
                padded = self.buffers[stat][off:off + _numel(shape)].view(shape)
                padded[..., n_embd:].zero_()
                padded[..., n_embd].fill_(1)

    def view(self, b, t):
        """name -> tensor for a (b, t) step, b <= B and t <= T. Every shape is (b, t, ...) except
        the attention statistics, (b, NH, t), the logits chunk, (R, Vp) whatever (b, t), and
        the one vector, dproj_sum (C,)."""
        if b > self.B or t > self.T:
            raise ValueError(f"batch ({b}, {t}) exceeds the planned ({self.B}, {self.T})")
        out = {}
        for name, shape, stat in self.slots:
            if name.startswith("att_lse"):
                shape = (b, shape[1], t)
            elif name not in ("logits", "dproj_sum"):
                shape = (b, t) + tuple(shape[2:])
            _, off = self.offsets[name]
            out[name] = self.buffers[stat][off:off + _numel(shape)].view(shape)
            if name in self.padded:
                out[name] = out[name][..., :self.C]  # with_ones_column() gives the whole rows
        out.setdefault("d_4C", out.get("fch_gelu"))  # one buffer when GELU is rebuilt (activation_slots)
        return out

