"""llm.c-compatible token shards and the loader that walks them.

A shard is a 1024-byte header of 256 little-endian int32, [MAGIC, VERSION, n_tokens, 0, ...],
followed by n_tokens little-endian uint16 tokens. Files in this format are interchangeable
with llm.c's `dev/data` shards.

The loader reads one contiguous span of G = accum_steps * world * B * T tokens per global
step (+1 for the shifted targets); micro-batch k of rank r reads rows (k*world + r) of it.
So the tokens one optimizer step sees depend only on B, T and G, never on how the global
batch is split between ranks and accumulation steps.

That span is a window: shard i holds (n_i - 1) // G of them, at token offsets 0, G, 2G, ...
Shuffled, epoch e visits the shards in a permutation drawn from (seed, e) and the windows of
each shard in one drawn from (seed, e, shard); unshuffled, both in file order. The order
depends on G, the seed and the epoch only, so every rank computes the same one without talking,
and a resumed run (on any split of G) continues it from (epoch, shard, window, micro-step).
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


SCAN_CHUNK = 1 << 24  # tokens checked per pass of check_vocabulary (32 MB of uint16)


def check_vocabulary(path, tokens, vocab_size):
    """Refuse a shard holding a token id >= vocab_size, naming the file and the first position:
    such an id would index past the embedding in the encoder kernel (on the GPU, a trap that
    kills the CUDA context) instead of ending the run with a line that says why."""
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = np.asarray(tokens[start:start + SCAN_CHUNK])
        if chunk.size and int(chunk.max()) >= vocab_size:
            at = start + int(np.argmax(chunk >= vocab_size))
            raise ShardError(f"data shard {path}: token {int(tokens[at])} at position {at:,} is outside the "
                             f"model's vocabulary (model.vocab_size={vocab_size}); was it made with another "
                             f"tokenizer, or is it damaged? {REMAKE}")


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


def permutation(n, seed, key):
    """A uniformly random permutation of range(n), fixed by `seed` and the tuple `key`.

    numpy fixes the streams of its bit generators and of SeedSequence across versions but not
    those of Generator's methods (NEP 19), so the order is drawn from PCG64's raw 64-bit output
    (argsort of n random keys; stable, so even a tie is broken the same everywhere): a run
    resumed on another machine or numpy reads the same windows. `key` goes in the spawn key,
    which SeedSequence keeps apart from the seed's words, so no (seed, key) pair aliases another.
    """
    sequence = np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in key))
    return np.argsort(np.random.PCG64(sequence).random_raw(n), kind="stable")


class ShardedLoader:
    """(x, y) micro-batches of shape (B, T) from the shards matching `pattern`, cycling forever;
    with `shuffle`, in an order drawn from `seed` that changes every epoch (module docstring)."""

    STATE_KEYS = ("epoch", "shard", "window", "micro_step", "B", "T", "world", "accum_steps", "shuffle",
                  "seed", "n_shards", "n_windows")

    def __init__(self, pattern, B, T, rank=0, world=1, accum_steps=1, shuffle=False, seed=0, vocab_size=None):
        if min(B, T, world, accum_steps) < 1 or not 0 <= rank < world or seed < 0:
            raise ValueError(f"ShardedLoader: need B, T, world, accum_steps >= 1, 0 <= rank < world and "
                             f"seed >= 0; got B={B} T={T} rank={rank} world={world} "
                             f"accum_steps={accum_steps} seed={seed}")
        self.pattern, self.B, self.T = pattern, B, T
        self.rank, self.world, self.accum_steps = rank, world, accum_steps
        self.shuffle, self.seed = bool(shuffle), int(seed)
        # vocab_size: every shard's tokens are checked against it the first time it is opened
        self.vocab_size, self._checked = vocab_size, set()
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
        self.windows = [(n - 1) // self.tokens_per_step for n in self.lengths]  # per usable shard
        self.reset()

    @property
    def tokens_per_step(self):
        """G: tokens one global step consumes over all ranks and micro-batches (targets excluded)."""
        return self.accum_steps * self.world * self.B * self.T

    def reset(self):
        """Back to the very first step (validation always reads the same first batches)."""
        self.epoch, self.shard, self.window, self.micro_step = 0, 0, 0, 0
        self._enter_epoch()

    def _order(self, n, key):
        return permutation(n, self.seed, key) if self.shuffle else np.arange(n)

    def _enter_epoch(self):
        # keys (epoch, 0, 0) for the shard order and (epoch, 1, shard) for a shard's windows: distinct draws
        self._shard_order = self._order(len(self.paths), (self.epoch, 0, 0))
        self._enter_shard()

    def _enter_shard(self):
        self._window_order = self._order(self.windows[self.file_index], (self.epoch, 1, self.file_index))
        self._tokens = None  # memmap of the current shard only

    @property
    def file_index(self):
        """Which of self.paths is being read: the epoch's `shard`-th in its order."""
        return int(self._shard_order[self.shard])

    @property
    def position(self):
        """Token offset of the current window in its shard."""
        return int(self._window_order[self.window]) * self.tokens_per_step

    def next_batch(self):
        B, T = self.B, self.T
        if self._tokens is None:
            path = self.paths[self.file_index]
            self._tokens = read_shard(path)
            if self.vocab_size is not None and path not in self._checked:
                check_vocabulary(path, self._tokens, self.vocab_size)
                self._checked.add(path)
        row = self.micro_step * self.world + self.rank
        start = self.position + row * B * T
        # np.array copies out of the memmap: the tensors own their memory
        span = np.array(self._tokens[start:start + B * T + 1], dtype=np.int64)
        x = torch.from_numpy(span[:-1].copy()).view(B, T)
        y = torch.from_numpy(span[1:].copy()).view(B, T)
        self.micro_step += 1
        if self.micro_step == self.accum_steps:
            self._finish_step()
        return x, y

    def _finish_step(self):
        self.micro_step = 0
        self.window += 1
        if self.window < self.windows[self.file_index]:
            return
        self.window = 0
        self.shard += 1
        if self.shard < len(self.paths):
            self._enter_shard()
        else:
            self.shard = 0
            self.epoch += 1
            self._enter_epoch()

    def state_dict(self):
        # n_shards and n_windows only check, on resume, that the data is what it was
        return {"epoch": self.epoch, "shard": self.shard, "window": self.window, "micro_step": self.micro_step,
                "B": self.B, "T": self.T, "world": self.world, "accum_steps": self.accum_steps,
                "shuffle": self.shuffle, "seed": self.seed, "n_shards": len(self.paths),
                "n_windows": sum(self.windows)}

    def load_state_dict(self, state):
        state = self._upgrade(state)
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {', '.join(missing)}; it was not made by ShardedLoader.state_dict")
        epoch, shard, window, micro_step = (int(state[k]) for k in self.STATE_KEYS[:4])
        self._check_geometry(state, micro_step)
        if bool(state["shuffle"]) != self.shuffle:
            flag = str(bool(state["shuffle"])).lower()
            raise ValueError(f"loader state was saved with data.shuffle={flag}; resume with data.shuffle={flag}")
        if self.shuffle and int(state["seed"]) != self.seed:
            raise ValueError(f"loader state was saved with seed={state['seed']}, which fixes the data order; "
                             f"resume with seed={state['seed']}")
        if (state["n_shards"], state["n_windows"]) != (len(self.paths), sum(self.windows)) or \
                not 0 <= shard < len(self.paths) or epoch < 0:
            raise ValueError(f"loader state ({state['n_shards']} shard(s), {state['n_windows']:,} steps an epoch) "
                             f"does not fit the {len(self.paths)} usable shard(s), {sum(self.windows):,} steps, "
                             f"matching '{self.pattern}'; were the shards re-made since it was saved?")
        self.epoch, self.shard, self.micro_step = epoch, shard, micro_step
        self._enter_epoch()  # the orders of this epoch and shard, before the window is checked
        if not 0 <= window < len(self._window_order):
            raise ValueError(f"loader state (window {window} of shard {shard}) does not fit shard "
                             f"{self.paths[self.file_index]}; were the shards re-made since it was saved?")
        self.window = window

    def _check_geometry(self, state, micro_step):
        geometry = ("B", "T", "world", "accum_steps")
        saved_G = state["accum_steps"] * state["world"] * state["B"] * state["T"]
        same_geometry = all(state[k] == getattr(self, k) for k in geometry)
        # another split of the same global batch reads the same windows, but only at a step boundary
        if not same_geometry and not (saved_G == self.tokens_per_step and micro_step == 0):
            raise ValueError(
                f"loader state was saved with B={state['B']} T={state['T']} world={state['world']} "
                f"accum_steps={state['accum_steps']} at micro-step {micro_step}; this loader has B={self.B} "
                f"T={self.T} world={self.world} accum_steps={self.accum_steps}; resume with the same "
                f"tokens per step ({saved_G:,}) and from a step boundary")
        if not 0 <= micro_step < self.accum_steps:
            raise ValueError(f"loader state at micro-step {micro_step} does not fit accum_steps={self.accum_steps}")

    def _upgrade(self, state):
        """State written before shuffling existed read the shards in file order and kept a token
        offset; it continues exactly, unshuffled, and a shuffled run is refused (its order differs)."""
        if "shuffle" in state or any(k not in state for k in ("position", "B", "T", "world", "accum_steps")):
            return state  # current, or so incomplete that the missing keys are the message
        if self.shuffle:
            raise ValueError("loader state was saved before data.shuffle existed and read the data in file "
                             "order; resume it with data.shuffle=false")
        saved_G = state["accum_steps"] * state["world"] * state["B"] * state["T"]
        window, offset = divmod(int(state["position"]), saved_G)
        if offset:
            raise ValueError(f"loader state position {state['position']} is not a multiple of its "
                             f"{saved_G:,} tokens per step; it was not made by ShardedLoader.state_dict")
        return dict(state, window=window, shuffle=False, seed=self.seed,
                    n_shards=len(self.paths), n_windows=sum(self.windows))
