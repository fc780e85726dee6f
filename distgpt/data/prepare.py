"""`distgpt prepare`: tokenize .txt/.jsonl/.parquet text into train and val token shards.

Every document becomes EOT_TOKEN followed by its GPT-2 tokens; all documents, in input order,
form one stream, tokenized on `workers` cores (the shards are the same for any count). The
validation split is either

- the first `val_tokens` tokens (FineWeb recipes: `--val-tokens 100000000`). Shards are then
  written as the tokens arrive and numbered along the stream as llm.c's fineweb.py numbers them
  (NAME_val_000000.bin, NAME_train_000001.bin, ...), so a corpus of any size needs no more disk
  than its shards; or
- the last `val_fraction` of tokens (10% when neither is given, as before). The split point is
  known only at the end, so the stream goes first to a temporary file (twice the shards' disk
  space for a while); shards are numbered per split (NAME_train_000000.bin, NAME_val_000000.bin).

Shards are written into a hidden staging directory inside `out_dir` and moved into place only
when the whole corpus has been read: a run that fails part way leaves earlier shards untouched.
Workers start by 'spawn', so a script that calls prepare() must guard its entry point with
`if __name__ == "__main__":`.
"""
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from distgpt.data.progress import Progress
from distgpt.data.shard_cutter import ShardCutter
from distgpt.data.shards import read_header
from distgpt.data.sources import (PrepareError, check_columns, default_name, expand_inputs, input_bytes,
                                  read_documents)
from distgpt.data.tokenize_pool import default_workers, tokenize_batches
from distgpt.data.tokenizer import load_gpt2_encoding

DEFAULT_VAL_FRACTION = 0.1
COPY_TOKENS = 16 * 2**20  # tokens copied at a time from the temporary stream into shards


def prepare(inputs, out_dir, name=None, val_fraction=None, shard_tokens=100_000_000, text_key="text",
            rank_file=None, progress=True, val_tokens=None, workers=None):
    """Tokenize `inputs` (files, directories, globs) into `<out_dir>/<name>_{train,val}_NNNNNN.bin`;
    returns (train_paths, val_paths). `text_key`: the .jsonl field or .parquet column holding the text."""
    inputs = [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    val_fraction = check_arguments(val_fraction, val_tokens, shard_tokens, workers)
    files = expand_inputs(inputs)
    check_columns(files, text_key)
    try:  # the rank file is checked here, once, rather than in every worker
        load_gpt2_encoding(rank_file)
    except ValueError as e:
        raise PrepareError(f"prepare: {e}") from None
    workers = workers or default_workers()
    name = name or default_name(inputs[0])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    staging.mkdir()
    start = time.perf_counter()
    bar = Progress(input_bytes(files), enabled=progress)
    finished = False
    try:
        batches = tokenize_batches(read_documents(files, text_key), rank_file, workers)
        if val_tokens is None:
            staged, n_docs = split_tail(batches, bar, staging, name, shard_tokens, val_fraction, inputs)
        else:
            staged, n_docs = split_head(batches, bar, staging, name, shard_tokens, val_tokens, inputs)
        finished = True
        paths = {split: [str(out / Path(p).name) for p in staged[split]] for split in ("train", "val")}
        for split in paths:
            for src, dst in zip(staged[split], paths[split]):
                os.replace(src, dst)
    finally:
        bar.close(finished)
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    stale = remove_stale_shards(out, name, paths["train"] + paths["val"])
    report(name, out, n_docs, paths, seconds, stale)
    return paths["train"], paths["val"]


def check_arguments(val_fraction, val_tokens, shard_tokens, workers):
    """Fail on any flag before tokenizing; returns the validation fraction to use (None with val_tokens)."""
    if val_tokens is not None:
        if val_fraction is not None:
            raise PrepareError("prepare: give --val-tokens (validation = the first N tokens) or "
                               "--val-fraction (the last fraction), not both")
        if not 1 <= val_tokens:
            raise PrepareError(f"prepare: --val-tokens {val_tokens} must be at least 1 "
                               f"(--val-fraction 0 writes no validation split)")
    elif val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise PrepareError(f"prepare: val_fraction {val_fraction} must be in [0, 1)")
    if not 1 <= shard_tokens < 2**31:
        raise PrepareError(f"prepare: shard_tokens {shard_tokens} must be in [1, 2**31) (int32 header count)")
    if workers is not None and workers < 1:
        raise PrepareError(f"prepare: --workers {workers} must be at least 1")
    return val_fraction


def split_head(batches, bar, staging, name, shard_tokens, val_tokens, inputs):
    """Validation = the stream's first `val_tokens`; shards written as the tokens come."""
    cutter = ShardCutter(staging, name, shard_tokens, [("val", val_tokens), ("train", float("inf"))],
                         one_counter=True)
    n_tokens, n_docs = consume(batches, bar, cutter.write)
    check_corpus(n_docs, n_tokens, inputs)
    if n_tokens <= val_tokens:
        raise PrepareError(f"prepare: {', '.join(inputs)} hold {n_tokens:,} tokens, not more than "
                           f"--val-tokens {val_tokens:,}, so no train tokens are left; lower --val-tokens")
    return cutter.close(), n_docs


def split_tail(batches, bar, staging, name, shard_tokens, val_fraction, inputs):
    """Validation = the stream's last `val_fraction`; the stream waits in a temporary file until its
    length is known."""
    stream_path = staging / "stream.tmp"
    with open(stream_path, "wb") as stream:
        n_tokens, n_docs = consume(batches, bar, lambda tokens: tokens.tofile(stream))
    check_corpus(n_docs, n_tokens, inputs)
    n_val = max(1, int(n_tokens * val_fraction)) if val_fraction > 0 else 0
    n_train = n_tokens - n_val
    if n_train < 1:
        raise PrepareError(f"prepare: {', '.join(inputs)} hold only {n_tokens} token(s), too few to split "
                           f"into train and val; add text or lower val_fraction")
    cutter = ShardCutter(staging, name, shard_tokens, [("train", n_train), ("val", n_val)], one_counter=False)
    tokens = np.memmap(stream_path, dtype="<u2", mode="r")
    for begin in range(0, n_tokens, COPY_TOKENS):
        cutter.write(tokens[begin:begin + COPY_TOKENS])
    del tokens
    stream_path.unlink()
    return cutter.close(), n_docs


def consume(batches, bar, sink):
    """Feed every tokenized batch to `sink` in order, counting; returns (tokens, documents)."""
    n_tokens = n_docs = 0
    for docs, tokens, n_bytes in batches:
        sink(tokens)
        n_tokens += len(tokens)
        n_docs += docs
        bar.update(n_bytes, docs, len(tokens))
    return n_tokens, n_docs


def check_corpus(n_docs, n_tokens, inputs):
    if n_docs == 0:
        raise PrepareError(f"prepare: {', '.join(inputs)} hold no documents (empty files or no rows); "
                           f"check the inputs")


def report(name, out, n_docs, paths, seconds, stale):
    """One line: what was written where, and how fast (tokens/s over the whole run, reading included)."""
    train, val = paths["train"], paths["val"]
    n_train, n_val = sum(map(read_header, train)), sum(map(read_header, val))
    rate = (n_train + n_val) / seconds if seconds > 0 else 0.0
    note = f"; removed {len(stale)} stale shard(s) of an earlier run" if stale else ""
    print(f"prepared {name}: {n_docs:,} document(s) -> {n_train:,} train tokens in {len(train)} file(s), "
          f"{n_val:,} val tokens in {len(val)} file(s), in {out}; {n_train + n_val:,} tokens in {seconds:.1f} s "
          f"({rate:,.0f} tokens/s){note}", flush=True)


def remove_stale_shards(out, name, written):
    """Delete shards of this name left by an earlier, longer run: the loader's glob would pick them up."""
    pattern = re.compile(re.escape(name) + r"_(train|val)_\d{6,}\.bin")
    keep = {os.path.abspath(p) for p in written}
    stale = [p for p in out.iterdir() if pattern.fullmatch(p.name) and os.path.abspath(p) not in keep]
    for path in stale:
        path.unlink()
    return stale
