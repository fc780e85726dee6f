"""llm.c's model checkpoint files (gpt2_124M.bin, gpt2_124M_bf16.bin): read and write.

The layout, as llm.c's train_gpt2 reads it: 256 int32 of header
    [20240326, version, max_seq_len, vocab_size, n_layer, n_head, channels, padded_vocab_size, 0...]
with version 3 for fp32 parameters and 5 for bf16, then every parameter, all layers of one kind
together, in this order (matmul weights (out, in), like distgpt):
    wte (Vp, C), wpe (maxT, C), ln1 w, ln1 b (L, C), qkv w (L, 3C, C), qkv b (L, 3C),
    attn proj w (L, C, C), attn proj b (L, C), ln2 w, ln2 b (L, C), fc w (L, 4C, C), fc b (L, 4C),
    fc proj w (L, C, 4C), fc proj b (L, C), lnf w, lnf b (C)."""
from pathlib import Path

import numpy as np
import torch

from distgpt.config import ModelConfig
from distgpt.interop.hf import FormatError
from distgpt.model.layout import LAYER_PARAMS

MAGIC = 20240326
VERSIONS = {3: torch.float32, 5: torch.bfloat16}
HEADER_INTS = 256
# per-layer tensors in llm.c's order, by distgpt's name within layer i: the parameter table's
# own order (GPT-2's), which llm.c follows kind by kind
LAYER_ORDER = tuple(suffix for suffix, _, _ in LAYER_PARAMS)


def _order(n_layer):
    """distgpt names, in the order llm.c writes them (a kind's layers one after another)."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for kind in LAYER_ORDER:
        names += [f"transformer.h.{i}.{kind}" for i in range(n_layer)]
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def write_llmc(named, model_cfg, path, dtype=torch.float32):
    version = {v: k for k, v in VERSIONS.items()}[dtype]
    m = model_cfg
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:8] = [MAGIC, version, m.block_size, m.vocab_size, m.n_layer, m.n_head, m.n_embd, m.padded_vocab_size]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for name in _order(m.n_layer):
            tensor = named[name].detach().to("cpu", dtype).contiguous()
            raw = tensor.view(torch.int16) if dtype == torch.bfloat16 else tensor  # numpy has no bf16
            f.write(raw.numpy().tobytes())
    return path


def read_llmc(path, name="llmc"):
    """(ModelConfig, {distgpt name: fp32 tensor}) from an llm.c model file."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"init_from=llmc:{path}: no such file")
    data = path.read_bytes()
    if len(data) < 4 * HEADER_INTS:
        raise FormatError(f"{path}: {len(data)} bytes, shorter than llm.c's 1024-byte header")
    header = np.frombuffer(data[:4 * HEADER_INTS], dtype=np.int32)
    magic, version, max_t, vocab, n_layer, n_head, channels, padded = (int(x) for x in header[:8])
    if magic != MAGIC:
        raise FormatError(f"{path}: magic {magic}, not an llm.c model file ({MAGIC}); llm.c's token "
                          f"shards (20240520) are data, read by data.train=")
    if version not in VERSIONS:
        raise FormatError(f"{path}: llm.c model version {version}; distgpt reads 3 (fp32) and 5 (bf16)")
    dtype = VERSIONS[version]
    cfg = ModelConfig(name=name, n_layer=n_layer, n_head=n_head, n_embd=channels, vocab_size=vocab,
                      padded_vocab_size=padded, block_size=max_t)
    shapes = _shapes(cfg)
    itemsize = 4 if dtype == torch.float32 else 2
    need = 4 * HEADER_INTS + itemsize * sum(int(np.prod(s)) for s in shapes.values())
    if len(data) != need:
        raise FormatError(f"{path}: {len(data):,} bytes, but its header ({n_layer} layers, width {channels}, "
                          f"vocab {padded}) needs {need:,}; the file is truncated or not from llm.c")
    named, offset = {}, 4 * HEADER_INTS
    for key in _order(n_layer):
        count = int(np.prod(shapes[key]))
        raw = np.frombuffer(data, dtype=np.float32 if dtype == torch.float32 else np.int16,
                            count=count, offset=offset)
        tensor = torch.from_numpy(raw.copy())
        if dtype == torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        named[key] = tensor.view(shapes[key]).to(torch.float32)
        offset += count * itemsize
    return cfg, named


def _shapes(m):
    from distgpt.model.layout import ParameterLayout
    layout = ParameterLayout(m.n_layer, m.n_embd, m.vocab_size, m.padded_vocab_size, m.block_size)
    return {spec.name: tuple(spec.shape) for spec in layout.specs}
