"""Moving models between distgpt and the tools people already use: Hugging Face GPT-2
directories (hf.py) and llm.c's model files (llmc.py)."""
from pathlib import Path

import torch

from distgpt.interop.hf import FormatError, export_hf, import_hf
from distgpt.interop.llmc import read_llmc, write_llmc

FORMATS = ("hf", "llmc")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_pretrained(spec):
    """'hf:DIR' or 'llmc:FILE' -> (ModelConfig, {name: fp32 tensor})."""
    kind, _, path = spec.partition(":")
    if kind == "hf":
        return import_hf(path)
    if kind == "llmc":
        return read_llmc(path)
    raise FormatError(f"init_from='{spec}': write hf:DIR or llmc:FILE")


def export(source, fmt, out, dtype="float32"):
    """Write a checkpoint's (or a run directory's latest) weights as `fmt` to `out`."""
    from safetensors.torch import load_file

    from distgpt import checkpoint
    if fmt not in FORMATS:
        raise FormatError(f"export: format '{fmt}'; choose one of {', '.join(FORMATS)}")
    path = checkpoint.resolve(source)
    model_cfg = checkpoint.config_of(path).model
    named = load_file(str(Path(path) / checkpoint.MODEL_FILE))
    if fmt == "hf":
        return export_hf(named, model_cfg, out, DTYPES[dtype])
    return write_llmc(named, model_cfg, out, DTYPES[dtype])


def check_matches(model_cfg, file_cfg, spec):
    """init_from must hold the model the config builds: same shapes, named in one line."""
    fields = ("n_layer", "n_head", "n_embd", "vocab_size", "padded_vocab_size", "block_size")
    ours = {f: getattr(model_cfg, f) for f in fields}
    theirs = {f: getattr(file_cfg, f) for f in fields}
    if ours != theirs:
        differ = ", ".join(f"{f} {theirs[f]} vs model's {ours[f]}" for f in fields if ours[f] != theirs[f])
        raise FormatError(f"init_from={spec} holds another model shape ({differ}); pick the matching "
                          f"model= preset or override those model fields")
