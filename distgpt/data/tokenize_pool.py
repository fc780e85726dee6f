"""Tokenize batches of documents on several cores, keeping their order.

Each batch becomes one uint16 array: every document as EOT_TOKEN followed by its tokens. The
batches come back in the order they went in, whatever the number of workers, so the shards
are bitwise the same with 1 worker or 64.

This module imports only the tokenizer (not torch): workers are started with 'spawn', which
re-imports it in every worker, and 'spawn' because 'fork' would copy a parent whose pyarrow
and torch thread pools may be mid-operation (a known source of deadlocks).
"""
import itertools
import multiprocessing
import os
from collections import deque

import numpy as np

from distgpt.data.tokenizer import EOT_TOKEN, load_gpt2_encoding

IN_FLIGHT_PER_WORKER = 2  # batches queued per worker: enough to keep it busy, bounded memory

_encoding = None  # the worker's own GPT-2 encoding, built once by _start_worker


def default_workers():
    """The cores this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tokenize_batches(batches, rank_file, workers):
    """For each (texts, extra) in `batches`, in order, yield (len(texts), tokens uint16 array, extra)."""
    batches = iter(batches)
    head = list(itertools.islice(batches, 2))
    if workers == 1 or len(head) < 2:
        # no pool: the same function in this process, so the output is the same; a single batch
        # (a .txt file, a small corpus, the trainer preparing its source) is not worth a pool's start
        _start_worker(rank_file)
        for texts, extra in itertools.chain(head, batches):
            yield len(texts), encode_documents(texts), extra
        return
    batches = itertools.chain(head, batches)
    # Pool.imap would read `batches` ahead as fast as it can (its feeder thread has no bound), so a
    # corpus larger than memory would be pulled in whole; apply_async with a bounded queue reads only
    # as far ahead as the workers keep up, and taking results from the queue's head keeps the order
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(rank_file,)) as pool:
        pending = deque()
        for texts, extra in batches:
            pending.append((len(texts), pool.apply_async(encode_documents, (texts,)), extra))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                n_docs, result, extra_done = pending.popleft()
                yield n_docs, result.get(), extra_done
        while pending:
            n_docs, result, extra_done = pending.popleft()
            yield n_docs, result.get(), extra_done


def _start_worker(rank_file):
    global _encoding
    _encoding = load_gpt2_encoding(rank_file)


def encode_documents(texts):
    """[EOT, tokens of texts[0], EOT, tokens of texts[1], ...] as one uint16 array."""
    ids = []
    for text in texts:
        ids.append(EOT_TOKEN)
        ids.extend(_encoding.encode_ordinary(text))  # '<|endoftext|>' inside a text is plain text
    return np.array(ids, dtype="<u2")
