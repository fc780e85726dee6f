"""Throughput of `distgpt prepare` on a synthetic parquet corpus, 1 worker against every core.

    python benchmarks/prepare_throughput.py TEXT.txt [--rows 20000] [--doc-chars 4000] [--workers 1 2 ...]

The corpus is TEXT cut into documents of about --doc-chars characters (at line ends), repeated
until there are --rows of them, written as one parquet file (FineWeb's layout: a `text` column,
row groups of 1024 rows). Each run tokenizes it with --val-tokens, as a FineWeb recipe does, and
is timed end to end: reading, pool start, tokenizing, writing shards. A markdown table at the end.
"""
import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

from distgpt.data.prepare import prepare
from distgpt.data.shards import read_header
from distgpt.data.sources import import_pyarrow
from distgpt.data.tokenize_pool import default_workers


def documents(text, rows, doc_chars):
    """`rows` documents of about `doc_chars` characters each, cycling through `text`'s lines."""
    lines = text.splitlines(keepends=True)
    docs, doc, i = [], [], 0
    while len(docs) < rows:
        doc.append(lines[i % len(lines)])
        i += 1
        if sum(map(len, doc)) >= doc_chars:
            docs.append("".join(doc))
            doc = []
    return docs


def write_corpus(path, docs):
    pa, pq = import_pyarrow()
    pq.write_table(pa.table({"text": docs}), path, row_group_size=1024)


def run(corpus, out, workers):
    """Seconds and tokens of one prepare run; its one-line summary is kept out of the table."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        train, val = prepare(corpus, out, name="synthetic", val_tokens=1_000_000, workers=workers,
                             progress=False)
    seconds = time.perf_counter() - start
    return seconds, sum(read_header(p) for p in train + val)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", help="a UTF-8 text file to build the corpus from (e.g. shakespeare.txt)")
    parser.add_argument("--rows", type=int, default=20_000, help="documents in the corpus")
    parser.add_argument("--doc-chars", type=int, default=4000, help="characters per document, about")
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, default_workers()}))
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.parquet")
        docs = documents(Path(a.text).read_text(encoding="utf-8"), a.rows, a.doc_chars)
        write_corpus(corpus, docs)
        n_bytes = sum(len(d.encode()) for d in docs)
        print(f"corpus: {len(docs):,} documents, {n_bytes / 1e6:.1f} MB of text "
              f"({os.path.getsize(corpus) / 1e6:.1f} MB parquet); {default_workers()} cores, load average "
              f"{os.getloadavg()[0]:.1f} (other work on the cores shows up as lost speed-up)", flush=True)
        rows = []
        for workers in a.workers:
            seconds, tokens = run(corpus, os.path.join(tmp, f"out{workers}"), workers)
            rows.append((workers, tokens, seconds))
            print(f"workers={workers}: {tokens:,} tokens in {seconds:.2f} s", flush=True)
    base = rows[0][1] / rows[0][2]
    print("\n| workers | tokens | seconds | tokens/s | MB/s of text | vs first row |")
    print("|---|---|---|---|---|---|")
    for workers, tokens, seconds in rows:
        print(f"| {workers} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.0f} | "
              f"{n_bytes / seconds / 1e6:.2f} | {tokens / seconds / base:.2f}x |")


if __name__ == "__main__":  # prepare's workers start by 'spawn', which re-imports this file
    main()
