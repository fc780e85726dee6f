"""Hugging Face GPT-2 directories: write what `transformers.GPT2LMHeadModel.from_pretrained`
loads (config.json + model.safetensors), and read such a directory back (GPT-2's own weights
included) as a distgpt model config and named tensors.

Two differences between the layouts: HF's GPT-2 stores its matmul weights as Conv1D, (in, out),
where distgpt keeps nn.Linear's (out, in); and distgpt pads the embedding to a multiple of 128
rows for the kernels, which HF does not have."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from distgpt.checkpoint import save_tensors
from distgpt.config import ModelConfig
from distgpt.model.layout import LAYER_PARAMS

# the block's matmul weights, (out, in) in the parameter table: HF stores them transposed
CONV1D = tuple(suffix for suffix, shape, _ in LAYER_PARAMS if len(shape(1)) == 2)
WTE = "transformer.wte.weight"


class FormatError(ValueError):
    """A model file that cannot be read; the message names the file and what is wrong."""


def padded_vocab(vocab_size, multiple=128):
    return (vocab_size + multiple - 1) // multiple * multiple


def export_hf(named, model_cfg, out_dir, dtype=torch.float32):
    """named: distgpt's tensors by name (vocab padded); writes out_dir/config.json and
    out_dir/model.safetensors."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in named.items():
        tensor = tensor.detach().to("cpu", dtype)
        if name == WTE:
            tensor = tensor[:model_cfg.vocab_size]
        elif name.endswith(CONV1D):
            tensor = tensor.t()
        tensors[name] = tensor.contiguous()
    save_tensors(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": model_cfg.vocab_size, "n_positions": model_cfg.block_size, "n_ctx": model_cfg.block_size,
        "n_embd": model_cfg.n_embd, "n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def import_hf(path, name="hf"):
    """(ModelConfig, {distgpt name: fp32 tensor}) from a HF GPT-2 directory: config.json plus
    model.safetensors or pytorch_model.bin (read with weights_only, never unpickling code)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FormatError(f"init_from=hf:{path}: no config.json; point it at a directory written by "
                          f"save_pretrained or 'distgpt export --format hf'")
    config = json.loads(config_file.read_text())
    if config.get("model_type", "gpt2") != "gpt2":
        raise FormatError(f"{config_file}: model_type '{config.get('model_type')}' is not gpt2")
    model_cfg = ModelConfig(name=name, n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                            vocab_size=config["vocab_size"], padded_vocab_size=padded_vocab(config["vocab_size"]),
                            block_size=config["n_positions"])
    if (path / "model.safetensors").is_file():
        raw = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        raw = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FormatError(f"init_from=hf:{path}: neither model.safetensors nor pytorch_model.bin")
    named = {}
    for key, tensor in raw.items():
        key = key if key.startswith("transformer.") else f"transformer.{key}"  # GPT2Model saves unprefixed
        if key.endswith(".attn.bias") or key.endswith(".attn.masked_bias") or key.startswith("transformer.lm_head"):
            continue  # the causal-mask buffers of older versions; the tied head is wte
        tensor = tensor.to(torch.float32)
        if key.endswith(CONV1D):
            tensor = tensor.t()
        if key == WTE:
            padded = torch.zeros(model_cfg.padded_vocab_size, tensor.shape[1])
            padded[:tensor.shape[0]] = tensor
            tensor = padded
        named[key] = tensor.contiguous()
    return model_cfg, named
