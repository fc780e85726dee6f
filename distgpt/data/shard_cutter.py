"""Cut one token stream into train and val shard files as the tokens arrive.

The stream is a sequence of segments, e.g. [("val", 100M), ("train", rest)]; a shard never
spans two segments, and holds at most `shard_tokens`. Documents are cut wherever a boundary
falls, as llm.c's fineweb.py cuts them. Numbering is either one counter along the stream
(llm.c's FineWeb names: NAME_val_000000.bin, NAME_train_000001.bin, ...) or a counter per
split (NAME_train_000000.bin, NAME_val_000000.bin), which `distgpt prepare` has always written
when validation is the stream's tail.
"""
import numpy as np

from distgpt.data.shards import write_shard


class ShardCutter:
    def __init__(self, directory, name, shard_tokens, segments, one_counter):
        self.directory = directory
        self.name = name
        self.shard_tokens = shard_tokens
        self.paths = {split: [] for split, _ in segments}
        # [(split, n_tokens)], the last may be float("inf"); an empty segment holds no shard
        self.segments = [(split, n) for split, n in segments if n > 0]
        self.one_counter = one_counter
        self.parts, self.filled = [], 0  # the open shard's tokens, not yet written
        self.left = self.segments[0][1] if self.segments else 0  # tokens left in the current segment

    def write(self, tokens):
        """Append uint16 `tokens` to the stream, writing every shard they complete."""
        while len(tokens):
            if not self.segments:
                raise ValueError(f"shard cutter: {len(tokens)} tokens past the end of the last segment")
            room = int(min(self.shard_tokens - self.filled, self.left))
            head, tokens = tokens[:room], tokens[room:]
            self.parts.append(head)
            self.filled += len(head)
            self.left -= len(head)
            if self.filled == self.shard_tokens or self.left == 0:
                self._flush()
            if self.left == 0:
                self.segments.pop(0)
                self.left = self.segments[0][1] if self.segments else 0

    def close(self):
        """Write the last, partly filled shard; returns {split: [paths in order]}."""
        if self.filled:
            self._flush()
        return self.paths

    def _flush(self):
        split = self.segments[0][0]
        index = sum(map(len, self.paths.values())) if self.one_counter else len(self.paths[split])
        path = str(self.directory / f"{self.name}_{split}_{index:06d}.bin")
        write_shard(path, np.concatenate(self.parts))
        self.paths[split].append(path)
        self.parts, self.filled = [], 0
