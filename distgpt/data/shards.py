"""llm.c-compatible token shards and the loader that walks them.

A shard is a 1024-byte header of 256 little-endian int32, [MAGIC, VERSION, n_tokens, 0, ...],
followed by n_tokens little-endian uint16 tokens. Files in this format are interchangeable
with llm.c's `dev/data` shards.

The loader reads one contiguous span of G = accum_steps * world * B * T tokens per global
step (+1 for the shifted targets); micro-batch k of rank r reads rows (k*world + r) of it.
So the tokens one optimizer step sees depend only on B, T and G, never on how the global
batch is split between ranks and accumulation steps.
"""
import glob
import os
import warnings

import numpy as np
import torch

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2  # uint16
MAX_TOKEN = 2**16 - 1
REMAKE = "re-create it with 'distgpt prepare'"


class ShardError(ValueError):
    """A token shard is missing, malformed or unusable; the one-line message names the file and the fix."""


def write_shard(path, tokens):
    """Write `tokens` (1-D ints in [0, 65535]) as one shard; atomic, so a crash leaves no half file."""
    path = os.fspath(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ShardError(f"data shard {path}: tokens must be 1-D, got shape {tokens.shape}; flatten them first")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ShardError(f"data shard {path}: tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi > MAX_TOKEN:
            bad = lo if lo < 0 else hi
            raise ShardError(f"data shard {path}: token {bad} at index {int(np.argmax(tokens == bad))} "
                             f"does not fit in uint16 [0, {MAX_TOKEN}]; shards hold vocabularies of at "
                             f"most 65,536 tokens (GPT-2 has 50,257)")
    if tokens.size > np.iinfo(np.int32).max:
        raise ShardError(f"data shard {path}: {tokens.size:,} tokens overflow the int32 count in the "
                         f"header; write them as several shards")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)


def read_header(path):
    """Check the file is a complete, well-formed shard and return how many tokens it holds."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ShardError(f"data shard {path}: no such file; run 'distgpt prepare <text file>' or fix "
                         f"data.train/data.val")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"data shard {path}: truncated header ({size} bytes, the header alone is "
                         f"{HEADER_BYTES}); {REMAKE}")
    magic, version, n_tokens = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic != MAGIC:
        raise ShardError(f"data shard {path}: bad magic {magic} (expected {MAGIC}); is it an "
                         f"llm.c/distgpt token shard? {REMAKE}")
    if version != VERSION:
        raise ShardError(f"data shard {path}: unsupported version {version} (expected {VERSION}); {REMAKE}")
    if n_tokens < 0:
        raise ShardError(f"data shard {path}: corrupt header (negative token count {n_tokens}); {REMAKE}")
    body = size - HEADER_BYTES
    if body < n_tokens * TOKEN_BYTES:
        raise ShardError(f"data shard {path}: truncated: the header promises {n_tokens:,} tokens "
                         f"({n_tokens * TOKEN_BYTES:,} bytes) but only {body:,} bytes follow it; {REMAKE}")
    if body > n_tokens * TOKEN_BYTES:
        raise ShardError(f"data shard {path}: corrupt: {body - n_tokens * TOKEN_BYTES:,} bytes beyond the "
                         f"{n_tokens:,} tokens the header promises; {REMAKE}")
    return n_tokens


def read_shard(path):
    """The shard's tokens as a read-only uint16 memmap (nothing is read until it is indexed)."""
    n_tokens = read_header(path)
    if n_tokens == 0:  # mmap cannot map zero bytes
        empty = np.zeros(0, dtype=np.uint16)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def shard_paths(pattern):
    """Files matching the glob `pattern`, sorted; an existing plain path is taken as it is."""
    pattern = os.fspath(pattern)
    if os.path.isfile(pattern):  # even when its name holds glob characters such as '['
        return [pattern]
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"data: no shard matches '{pattern}'; run 'distgpt prepare <text file>' "
                                f"or set data.train/data.val")
    return paths


class ShardedLoader:
    """(x, y) micro-batches of shape (B, T) from the shards matching `pattern`, cycling forever."""

    def __init__(self, pattern, B, T, rank=0, world=1, accum_steps=1):
        if min(B, T, world, accum_steps) < 1 or not 0 <= rank < world:
            raise ValueError(f"ShardedLoader: need B, T, world, accum_steps >= 1 and 0 <= rank < world; "
                             f"got B={B} T={T} rank={rank} world={world} accum_steps={accum_steps}")
        self.pattern, self.B, self.T = pattern, B, T
        self.rank, self.world, self.accum_steps = rank, world, accum_steps
        # every header is checked now, so a bad shard stops the run before training starts
        sizes = {path: read_header(path) for path in shard_paths(pattern)}
        need = self.tokens_per_step + 1
        self.paths = [p for p, n in sizes.items() if n >= need]
        self.lengths = [sizes[p] for p in self.paths]
        if not self.paths:
            largest = max(sizes, key=sizes.get)
            raise ShardError(
                f"data shard {largest}: the largest shard matching '{pattern}' holds {sizes[largest]:,} "
                f"tokens but one step needs {need:,} (accum {accum_steps} x world {world} x B {B} x "
                f"T {T} + 1); lower train.micro_batch, train.seq_len or the total batch, or add more data")
        skipped = [p for p in sizes if sizes[p] < need]
        if skipped:
            warnings.warn(f"data: skipping {len(skipped)} shard(s) matching '{pattern}' smaller than one "
                          f"step ({need:,} tokens), e.g. {skipped[0]}", stacklevel=2)
        self._tokens = None  # memmap of the current shard only
        self.reset()

    @property
    def tokens_per_step(self):
        """G: tokens one global step consumes over all ranks and micro-batches (targets excluded)."""
        return self.accum_steps * self.world * self.B * self.T

    def reset(self):
        """Back to the very first step (validation always reads the same first batches)."""
        self.shard, self.position, self.micro_step, self.epoch = 0, 0, 0, 0
        self._tokens = None

    def _current_tokens(self):
        if self._tokens is None:
            self._tokens = read_shard(self.paths[self.shard])
        return self._tokens

    def next_batch(self):
        B, T = self.B, self.T
        row = self.micro_step * self.world + self.rank
        start = self.position + row * B * T
        # np.array copies out of the memmap: the tensors own their memory
        span = np.array(self._current_tokens()[start:start + B * T + 1], dtype=np.int64)
        x = torch.from_numpy(span[:-1].copy()).view(B, T)
        y = torch.from_numpy(span[1:].copy()).view(B, T)
        self.micro_step += 1
        if self.micro_step == self.accum_steps:
            self._finish_step()
        return x, y

    def _finish_step(self):
        G = self.tokens_per_step
        self.micro_step = 0
        self.position += G
        if self.position + G + 1 > self.lengths[self.shard]:
            self.shard = (self.shard + 1) % len(self.paths)
            self.position = 0
            self._tokens = None
            if self.shard == 0:
                self.epoch += 1

    def state_dict(self):
        return {"shard": self.shard, "position": self.position, "micro_step": self.micro_step,
                "epoch": self.epoch, "B": self.B, "T": self.T, "world": self.world,
                "accum_steps": self.accum_steps}

    def load_state_dict(self, state):
        keys = ("shard", "position", "micro_step", "epoch", "B", "T", "world", "accum_steps")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {', '.join(missing)}; it was not made by ShardedLoader.state_dict")
        shard, position, micro_step, epoch = (int(state[k]) for k in keys[:4])
        saved_G = state["accum_steps"] * state["world"] * state["B"] * state["T"]
        same_geometry = all(state[k] == getattr(self, k) for k in keys[4:])
        # another split of the same global batch reads the same tokens, but only at a step boundary
        if not same_geometry and not (saved_G == self.tokens_per_step and micro_step == 0):
            raise ValueError(
                f"loader state was saved with B={state['B']} T={state['T']} world={state['world']} "
                f"accum_steps={state['accum_steps']} at micro-step {micro_step}; this loader has B={self.B} "
                f"T={self.T} world={self.world} accum_steps={self.accum_steps}; resume with the same "
                f"tokens per step ({saved_G:,}) and from a step boundary")
        if not 0 <= shard < len(self.paths) or not 0 <= micro_step < self.accum_steps or \
                position < 0 or position + self.tokens_per_step + 1 > self.lengths[shard]:
            raise ValueError(f"loader state (shard {shard}, position {position}, micro-step {micro_step}) "
                             f"does not fit the {len(self.paths)} usable shard(s) matching '{self.pattern}'; "
                             f"were the shards re-made since it was saved?")
        self.shard, self.position, self.micro_step, self.epoch = shard, position, micro_step, epoch
        self._tokens = None
