"""`distgpt prepare` at corpus scale: parquet input, worker pools, shard cutting, --val-tokens,
progress, and one-line errors through the CLI."""
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from distgpt.cli import main
from distgpt.data.prepare import prepare
from distgpt.data import tokenize_pool
from distgpt.data.progress import Progress
from distgpt.data.shard_cutter import ShardCutter
from distgpt.data.shards import read_shard
from distgpt.data.sources import BATCH_DOCS
from distgpt.data.tokenizer import EOT_TOKEN, decode, encode

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WORDS = "the quick brown fox jumps over a lazy dog while héllo wörld 日本語 🙂 sings 12,345.6".split()


def documents(n, seed=0):
    """n documents of varied length; distinct, so a reordering would show."""
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 60)))) for i in range(n)]


def write_parquet(path, texts, column="text", row_group_size=700):
    table = pa.table({"id": list(range(len(texts))), column: texts})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def stream_of(paths):
    return np.concatenate([read_shard(p) for p in paths]).astype(np.int64)


def split_documents(stream):
    """The texts of a stream of [EOT, tokens...] documents."""
    starts = np.flatnonzero(stream == EOT_TOKEN).tolist() + [len(stream)]
    return [decode(stream[a + 1:b]) for a, b in zip(starts, starts[1:])]


def expected_stream(texts):
    return np.array([t for text in texts for t in [EOT_TOKEN] + encode(text)], dtype=np.int64)


def run_cli(args, capsys):
    """distgpt prepare through main(): (exit code, stderr lines)."""
    code = main(["prepare", *map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------ parquet
def test_parquet_rows_are_documents_in_order(tmp_path, capsys):
    docs = documents(2500)  # several row groups and several BATCH_DOCS batches
    path = write_parquet(tmp_path / "part.parquet", docs, column="content")
    train, val = prepare(path, tmp_path / "out", text_key="content", workers=1, progress=False)
    stream = stream_of(train + val)
    assert np.array_equal(stream, expected_stream(docs))
    assert split_documents(stream) == docs
    assert len(read_shard(val[0])) == int(0.1 * len(stream))  # default: the last 10%, as for .txt
    assert [Path(p).name for p in train + val] == ["part_train_000000.bin", "part_val_000000.bin"]
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "2,500 document(s)" in summary[0] and "tokens/s" in summary[0]


def test_directory_glob_and_mixed_kinds_read_in_order(tmp_path):
    docs = documents(300)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_parquet(corpus / "b.parquet", docs[100:200])
    write_parquet(corpus / "a.parquet", docs[:100])
    (corpus / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[200:]))
    (corpus / "README.md").write_text("not a document")  # other files in a directory are not read
    by_dir = prepare(corpus, tmp_path / "dir", name="c", val_fraction=0, workers=1, progress=False)[0]
    by_glob = prepare(str(corpus / "[abc].*"), tmp_path / "glob", val_fraction=0, workers=1, progress=False)[0]
    assert np.array_equal(stream_of(by_dir), expected_stream(docs))  # sorted by file name
    assert np.array_equal(stream_of(by_glob), expected_stream(docs))
    assert Path(by_glob[0]).name == "corpus_train_000000.bin"  # a glob is named after its folder


# ------------------------------------------------------------------ workers
def test_one_and_two_workers_write_identical_shards(tmp_path, monkeypatch):
    docs = documents(3 * BATCH_DOCS + 17, seed=1)
    write_parquet(tmp_path / "a.parquet", docs[:2000])
    write_parquet(tmp_path / "b.parquet", docs[2000:])
    pools = []  # the start methods of the pools made: 2 workers must really run a pool
    real_context = tokenize_pool.multiprocessing.get_context
    monkeypatch.setattr(tokenize_pool.multiprocessing, "get_context", lambda m: pools.append(m) or real_context(m))
    shards = {}
    for workers in (1, 2):
        train, val = prepare(str(tmp_path / "*.parquet"), tmp_path / f"w{workers}", name="fw", val_tokens=5000,
                             shard_tokens=20_000, workers=workers, progress=False)
        shards[workers] = [(Path(p).name, Path(p).read_bytes()) for p in val + train]
    assert pools == ["spawn"] and len(shards[1]) > 3 and shards[1] == shards[2]
    stream = np.concatenate([np.frombuffer(body[1024:], dtype="<u2") for _, body in shards[1]])
    assert np.array_equal(stream, expected_stream(docs))


# ------------------------------------------------------------------ shards and validation split
def test_val_tokens_takes_the_stream_head_numbered_like_llmc(tmp_path):
    docs = documents(400, seed=2)
    path = write_parquet(tmp_path / "fineweb.parquet", docs)
    whole = expected_stream(docs)
    train, val = prepare(path, tmp_path / "out", val_tokens=2500, shard_tokens=1000, workers=1, progress=False)
    names = [Path(p).name for p in val + train]
    n_train_shards = -(-(len(whole) - 2500) // 1000)
    assert names == ["fineweb_val_000000.bin", "fineweb_val_000001.bin", "fineweb_val_000002.bin"] + \
        [f"fineweb_train_{i:06d}.bin" for i in range(3, 3 + n_train_shards)]
    # the val shards end exactly at 2500 tokens, mid-document if need be; train starts a fresh shard
    assert [len(read_shard(p)) for p in val] == [1000, 1000, 500]
    assert all(len(read_shard(p)) == 1000 for p in train[:-1]) and 1 <= len(read_shard(train[-1])) <= 1000
    assert np.array_equal(stream_of(val), whole[:2500]) and np.array_equal(stream_of(train), whole[2500:])


def test_shard_tokens_cuts_the_tail_split_per_split_names(tmp_path):
    docs = documents(400, seed=3)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    whole = expected_stream(docs)
    train, val = prepare(path, tmp_path / "out", shard_tokens=700, workers=1, progress=False)
    n_val = int(0.1 * len(whole))
    assert [Path(p).name for p in val] == [f"docs_val_{i:06d}.bin" for i in range(len(val))]
    assert Path(train[0]).name == "docs_train_000000.bin"
    assert [len(read_shard(p)) for p in train[:-1]] == [700] * (len(train) - 1)
    assert len(stream_of(val)) == n_val and np.array_equal(stream_of(train + val), whole)


def test_failed_run_leaves_earlier_shards_untouched(tmp_path, capsys):
    good = write_parquet(tmp_path / "a.parquet", documents(50))
    out = tmp_path / "out"
    train, val = prepare(good, out, name="c", val_tokens=100, shard_tokens=200, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "z.jsonl"  # read after the parquet file, when shards have been cut already
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    code, err = run_cli([good, bad, "--out", out, "--name", "c", "--val-tokens", 100, "--shard-tokens", 10,
                         "--workers", 1], capsys)
    assert code == 2 and len(err) == 1 and f"{bad} line 2" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging dir left either


def test_shard_cutter_skips_empty_segments(tmp_path):
    cutter = ShardCutter(tmp_path, "x", 4, [("train", 0), ("val", 6), ("train", float("inf"))], one_counter=True)
    for piece in np.array_split(np.arange(13, dtype="<u2"), 5):  # pieces that straddle the cuts
        cutter.write(piece)
    paths = cutter.close()
    assert {Path(p).name: read_shard(p).tolist() for p in paths["val"] + paths["train"]} == {
        "x_val_000000.bin": [0, 1, 2, 3], "x_val_000001.bin": [4, 5],
        "x_train_000002.bin": [6, 7, 8, 9], "x_train_000003.bin": [10, 11, 12]}


# ------------------------------------------------------------------ progress
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_into_a_log_prints_a_line_per_interval():
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(1000, stream=out, log_every_s=60, clock=clock)
    for _ in range(4):  # 30 s apart: a line every other update
        clock.now += 30
        bar.update(250, 10, 2_000_000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert "50.0%" in lines[0] and "20 docs" in lines[0] and "4,000,000 tokens" in lines[0]
    assert "0.07M tokens/s" in lines[0] and "ETA 1m00s" in lines[0]  # 60 s for half: 60 s to go
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("tokenizing 100.0% [" + "#" * 24 + "]")


def test_progress_on_a_terminal_redraws_one_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock, out = FakeClock(), Terminal()
    bar = Progress(100, stream=out, clock=clock)
    for _ in range(3):
        clock.now += 1
        bar.update(10, 1, 5)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    failed = Progress(100, stream=Terminal(), clock=clock)
    clock.now += 1
    failed.update(10, 1, 5)
    failed.close(finished=False)  # a failed run: the line ends, no final redraw before the error
    assert failed.stream.getvalue().count("\r") == 1 and failed.stream.getvalue().endswith("\n")


# ------------------------------------------------------------------ one-line errors, exit 2
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    good = write_parquet(tmp_path / "good.parquet", documents(20))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), empty)
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
    with_null = tmp_path / "with_null.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), with_null)
    not_parquet = tmp_path / "not_parquet.parquet"
    not_parquet.write_text('{"text": "a .jsonl by another name"}\n')
    cases = [
        ([csv], ["data.csv", "suffix '.csv'", ".parquet"]),
        ([tmp_path / "absent.parquet"], ["absent.parquet does not exist"]),
        ([str(tmp_path / "nothing" / "*.parquet")], ["matches no files"]),
        ([good, "--text-column", "body"], ["no column 'body'", "columns: id, text", "--text-column"]),
        ([numbers], ["column 'text' holds int64, not text"]),
        ([not_parquet], ["not_parquet.parquet is not a readable parquet file"]),
        ([with_null], ["with_null.parquet row 1: column 'text' is null"]),
        ([empty], ["hold no documents"]),
        ([good, "--val-tokens", 10, "--val-fraction", 0.1], ["not both"]),
        ([good, "--val-tokens", 10**9], ["not more than --val-tokens 1,000,000,000"]),
        ([good, "--workers", 0], ["--workers 0 must be at least 1"]),
        ([good, "--tokenizer", csv], ["tokenizer rank file"]),
    ]
    for args, words in cases:
        code, err = run_cli([*args, "--out", tmp_path / "out"], capsys)  # progress on: still one line
        assert code == 2 and len(err) == 1, (args, err)
        assert err[0].startswith("distgpt: error: ") and all(w in err[0] for w in words), (args, err)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing half-made


def test_empty_directory_and_missing_pyarrow(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    code, err = run_cli([tmp_path / "empty", "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1 and "holds no .txt/.jsonl/.parquet files" in err[0]
    good = write_parquet(tmp_path / "good.parquet", documents(5))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now fails as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, err = run_cli([good, "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1 and "pip install 'distgpt[data]'" in err[0]
