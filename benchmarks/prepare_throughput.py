"""Throughput of `distgpt prepare` on a synthetic parquet corpus, 1 worker against every core.

    python benchmarks/prepare_throughput.py TEXT.txt [--rows 20000] [--doc-chars 4000] [--workers 1 2 ...]

The corpus is TEXT cut into documents of about --doc-chars characters (at line ends), repeated
until there are --rows of them, written as one parquet file (FineWeb's layout: a `text` column,
row groups of 1024 rows). Each run tokenizes it with --val-tokens, as a FineWeb recipe does, and
is timed end to end: reading, pool start, tokenizing, writing shards. A markdown table at the end.
Wall tokens/s is what a user sees; on cores that other work shares it understates the pool, so the
table also gives tokens per CPU second (this process and its workers), which other work leaves alone.
"""
import argparse
import contextlib
import io
import os
import resource
import tempfile
import time
from pathlib import Path

# Only light imports at the top: 'spawn' re-imports this file in every worker, and distgpt.data.prepare
# pulls in torch (through shards.py), about 1.5 CPU seconds a worker that would count as the pool's cost
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


def cpu_seconds():
    """CPU time of this process and of its finished children (the pool's workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(corpus, out, workers):
    """Wall seconds, CPU seconds and tokens of one prepare run; its summary line is kept out of the table.
    CPU seconds per token show the pool's own cost even where other work shares the cores."""
    from distgpt.data.prepare import prepare
    from distgpt.data.shards import read_header
    start, cpu = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):
        train, val = prepare(corpus, out, name="synthetic", val_tokens=1_000_000, workers=workers,
                             progress=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return seconds, cpu, sum(read_header(p) for p in train + val)


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
            seconds, cpu, tokens = run(corpus, os.path.join(tmp, f"out{workers}"), workers)
            rows.append((workers, tokens, seconds, cpu))
            print(f"workers={workers}: {tokens:,} tokens in {seconds:.2f} s ({cpu:.2f} CPU s), load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    base = rows[0][1] / rows[0][2]
    print("\n| workers | tokens | seconds | tokens/s | MB/s of text | vs first row | CPU s | tokens per CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for workers, tokens, seconds, cpu in rows:
        print(f"| {workers} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.0f} | "
              f"{n_bytes / seconds / 1e6:.2f} | {tokens / seconds / base:.2f}x | {cpu:.2f} | {tokens / cpu:,.0f} |")


if __name__ == "__main__":  # prepare's workers start by 'spawn', which re-imports this file
    main()
