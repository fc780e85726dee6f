"""`distgpt prepare`: tokenize .txt/.jsonl text into train and val token shards.

Every document becomes EOT_TOKEN followed by its tokens; all documents form one stream, whose
last `val_fraction` of tokens is the validation split. The stream first goes to a temporary
file in `out_dir`, so memory stays small however large the corpus is: the split point is only
known once every document has been tokenized.
"""
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from distgpt.data.shards import write_shard
from distgpt.data.tokenizer import EOT_TOKEN, load_gpt2_encoding

SUFFIXES = (".txt", ".jsonl")
BATCH_DOCS = 1024  # jsonl documents tokenized together; tiktoken spreads a batch over threads
BATCH_BYTES = 16 * 2**20  # ... or fewer when they are long, to bound memory


def prepare(inputs, out_dir, name=None, val_fraction=0.1, shard_tokens=100_000_000,
            text_key="text", rank_file=None, progress=True):
    """Tokenize `inputs` into `<out_dir>/<name>_{train,val}_NNNNNN.bin`; returns (train_paths, val_paths)."""
    inputs = [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    check_arguments(inputs, val_fraction, shard_tokens)
    enc = load_gpt2_encoding(rank_file)
    name = name or Path(inputs[0]).stem
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stream_path = out / f".{name}_stream.tmp"
    try:
        with open(stream_path, "wb") as stream:
            n_total, n_docs = tokenize_into(stream, inputs, enc, text_key, progress)
        n_val = max(1, int(n_total * val_fraction)) if val_fraction > 0 else 0
        n_train = n_total - n_val
        if n_train < 1:
            raise ValueError(f"prepare: {', '.join(inputs)} hold only {n_total} token(s), too few to split "
                             f"into train and val; add text or lower val_fraction")
        tokens = np.memmap(stream_path, dtype="<u2", mode="r")
        train_paths = write_split(tokens[:n_train], out, f"{name}_train", shard_tokens)
        val_paths = write_split(tokens[n_train:], out, f"{name}_val", shard_tokens)
        del tokens
    finally:
        stream_path.unlink(missing_ok=True)
    stale = remove_stale_shards(out, name, train_paths + val_paths)
    note = f"; removed {len(stale)} stale shard(s) of an earlier run" if stale else ""
    print(f"prepared {name}: {n_docs:,} document(s) -> {n_train:,} train tokens in {len(train_paths)} "
          f"file(s), {n_val:,} val tokens in {len(val_paths)} file(s), in {out}{note}", flush=True)
    return train_paths, val_paths


def check_arguments(inputs, val_fraction, shard_tokens):
    """Fail on any input before tokenizing the first one."""
    if not inputs:
        raise ValueError("prepare: no input files given; pass one or more .txt/.jsonl files")
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prepare: input {path} does not exist (or is not a file)")
        if Path(path).suffix.lower() not in SUFFIXES:
            raise ValueError(f"prepare: input {path} has suffix '{Path(path).suffix}'; accepted: .txt "
                             f"(the whole file is one document), .jsonl (one JSON document per line)")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"prepare: val_fraction {val_fraction} must be in [0, 1)")
    if not 1 <= shard_tokens < 2**31:
        raise ValueError(f"prepare: shard_tokens {shard_tokens} must be in [1, 2**31) (int32 header count)")


def tokenize_into(stream, inputs, enc, text_key, progress):
    """Append every document's [EOT, tokens...] to `stream` as uint16; returns (tokens, documents)."""
    n_tokens = n_docs = 0
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
              disable=not progress) as bar:
        for path in inputs:
            reader = read_jsonl if Path(path).suffix.lower() == ".jsonl" else read_txt
            for texts, n_bytes in reader(path, text_key):
                for doc in enc.encode_ordinary_batch(texts, num_threads=min(8, os.cpu_count() or 1)):
                    ids = np.empty(len(doc) + 1, dtype="<u2")
                    ids[0] = EOT_TOKEN
                    ids[1:] = doc
                    ids.tofile(stream)
                    n_tokens += len(ids)
                n_docs += len(texts)
                bar.update(n_bytes)
    return n_tokens, n_docs


def read_txt(path, text_key):
    """The whole file as one document: yields ([text], bytes read)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")  # bytes, not text mode: '\r\n' must survive unchanged
    except UnicodeDecodeError as e:
        raise ValueError(f"prepare: input {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                         f"convert it to UTF-8 first") from None
    yield [text], len(raw)


def read_jsonl(path, text_key):
    """One document per non-blank line, from field `text_key`: yields (texts, bytes read) in batches."""
    texts, n_bytes = [], 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            n_bytes += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # bad JSON or bad UTF-8
                raise ValueError(f"prepare: input {path} line {number}: not valid JSON ({e}); "
                                 f"each line must be one JSON object") from None
            text = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"prepare: input {path} line {number}: no string field '{text_key}'; "
                                 f"name the field holding the text with text_key (--text-key)")
            texts.append(text)
            if len(texts) >= BATCH_DOCS or n_bytes >= BATCH_BYTES:
                yield texts, n_bytes
                texts, n_bytes = [], 0
    if texts or n_bytes:
        yield texts, n_bytes


def write_split(tokens, out, prefix, shard_tokens):
    """Cut `tokens` into files of at most `shard_tokens`: <prefix>_000000.bin, _000001, ..."""
    paths = []
    for index, start in enumerate(range(0, len(tokens), shard_tokens)):
        path = str(out / f"{prefix}_{index:06d}.bin")
        write_shard(path, tokens[start:start + shard_tokens])
        paths.append(path)
    return paths


def remove_stale_shards(out, name, written):
    """Delete shards of this name left by an earlier, longer run: the loader's glob would pick them up."""
    pattern = re.compile(re.escape(name) + r"_(train|val)_\d{6,}\.bin")
    keep = {os.path.abspath(p) for p in written}
    stale = [p for p in out.iterdir() if pattern.fullmatch(p.name) and os.path.abspath(p) not in keep]
    for path in stale:
        path.unlink()
    return stale
