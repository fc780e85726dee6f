"""The memory a run will take, from its shape alone, before anything is allocated."""
import torch

from distgpt.model.fp8 import activation_recompute, fp8_bytes
from distgpt.model.layout import ParameterLayout, activation_slots, pack_slots


def estimate(model_cfg, B, T, recompute, dtype, world, zero_stage, backend_scratch=(), fp8=False,
             recompute_layers=-1, master_dtype="fp32", fp8_weight_gradients=False, ones_column=False):
    """[(buffer, bytes)] for one rank: parameters, gradients, optimizer state, activations, the
    fp8 path's copies and scratch (fp8=True), and the backend's own scratch (backend_scratch:
    its estimate_scratch() rows, if it has any). master_dtype: how the backend stores AdamW's
    master weights (its master_dtype(dtype): None, or a torch dtype; "fp32": the reference's
    fp32 masters for any dtype below fp32). fp8_weight_gradients: the fp8 path's larger scratch.
    ones_column: the layernorm outputs planned beside a column of ones (layout.takes_ones_column)."""
    m = model_cfg
    layout = ParameterLayout(m.n_layer, m.n_embd, m.vocab_size, m.padded_vocab_size,
                             m.block_size, pad_multiple=world)
    elt = torch.empty((), dtype=dtype).element_size()
    state_elt = 8 if dtype == torch.float64 else 4
    shard = layout.total // world if zero_stage == 1 else layout.total
    if master_dtype == "fp32":
        master_dtype = None if dtype in (torch.float32, torch.float64) else torch.float32
    master_elt = 0 if master_dtype is None else torch.empty((), dtype=master_dtype).element_size()
    master_name = {0: "", 2: " + master low halves", 4: " + fp32 master"}.get(master_elt, " + master")
    plan_recompute, plan_layers = activation_recompute(recompute, recompute_layers, fp8 and fp8_weight_gradients)
    kept = ("layernorm and GELU outputs in fp8 only" if fp8 and fp8_weight_gradients else
            f"recompute={recompute}{'' if recompute_layers < 0 else f' in {recompute_layers} layers'}")
    _, act_elems = pack_slots(activation_slots(m.n_layer, m.n_embd, m.n_head, m.padded_vocab_size,
                                               B, T, plan_recompute, recompute_layers=plan_layers,
                                               ones_column=ones_column))
    return [("parameters", layout.total * elt),
            ("gradients", layout.total * elt),
            (f"AdamW m, v{master_name} (1/{world if zero_stage == 1 else 1} of the model)",
             shard * (2 * state_elt + master_elt)),
            (f"activations (B={B}, T={T}, {kept})",
             act_elems[False] * elt + act_elems[True] * max(elt, 4))] + \
        (fp8_bytes(m.n_layer, m.n_embd, B * T, fp8_weight_gradients) if fp8 else []) + \
        [(f"backend: {name}", nbytes) for name, nbytes in backend_scratch]


def format_estimate(rows):
    total = sum(b for _, b in rows)
    lines = [f"  {name:<58} {b / 2**30:9.3f} GiB" for name, b in rows]
    lines.append(f"  {'total (planned)':<58} {total / 2**30:9.3f} GiB")
    return "memory plan per rank:\n" + "\n".join(lines), total
