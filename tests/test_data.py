"""Data layer: shard format, loader geometry and resumption, tokenizer, prepare."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distgpt.data.prepare import prepare
from distgpt.data.shards import (HEADER_INTS, MAGIC, VERSION, ShardedLoader, ShardError, read_shard,
                                 shard_paths, write_shard)
from distgpt.data.tokenizer import (EOT_TOKEN, PACKAGED_RANK_FILE, decode, encode,
                                    load_gpt2_encoding)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PACKAGED_TINY = Path(PACKAGED_RANK_FILE).parent / "tinyshakespeare.txt"
TINY = SHARED_DATA / "tinyshakespeare.txt" if (SHARED_DATA / "tinyshakespeare.txt").exists() else PACKAGED_TINY
TINY_TOKENS = 338_025
UNICODE = "héllo wörld — ñandú 日本語のテキスト 🙂🚀 Ελληνικά\r\n\ttabs  and   spaces' 's 123,456.7"


def raw_shard(path, header, body=b""):
    """A file with any header (padded to 256 int32) and body, for the corruption tests."""
    ints = np.zeros(HEADER_INTS, dtype="<i4")
    ints[:len(header)] = header
    Path(path).write_bytes(ints.tobytes() + body)
    return str(path)


def one_line_naming(message, path):
    return "\n" not in message and str(path) in message


# ------------------------------------------------------------------ shard format
def test_write_read_round_trip_and_exact_header(tmp_path):
    rng = np.random.default_rng()  # fresh tokens every run
    n = int(rng.integers(1000, 5000))
    tokens = rng.integers(0, 65536, size=n)
    tokens[:2] = (0, 65535)  # both ends of uint16
    path = str(tmp_path / "sub" / "dir" / "s.bin")  # parents are created
    write_shard(path, tokens)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    assert header[0] == MAGIC == 20240520 and header[1] == VERSION == 1 and header[2] == n
    assert not header[3:].any()
    assert np.array_equal(np.fromfile(path, dtype="<u2", offset=4 * HEADER_INTS), tokens)
    assert Path(path).stat().st_size == 4 * HEADER_INTS + 2 * n
    assert not Path(path + ".tmp").exists()
    back = read_shard(path)
    assert back.dtype == np.uint16 and not back.flags.writeable and np.array_equal(back, tokens)
    write_shard(path, [7, 8, 9])  # plain lists work, and overwrite
    assert read_shard(path).tolist() == [7, 8, 9]


@pytest.mark.parametrize("case, header, body, words", [
    ("bad_magic", [12345, VERSION, 10], bytes(20), "bad magic 12345"),
    ("bad_version", [MAGIC, 2, 10], bytes(20), "version 2"),
    ("truncated_body", [MAGIC, VERSION, 10], bytes(15), "promises 10 tokens"),
    ("trailing_bytes", [MAGIC, VERSION, 10], bytes(25), "corrupt"),
])
def test_malformed_shard_is_one_line_naming_the_file(tmp_path, case, header, body, words):
    path = raw_shard(tmp_path / f"{case}.bin", header, body)
    with pytest.raises(ShardError) as e:
        read_shard(path)
    assert one_line_naming(str(e.value), path) and words in str(e.value) and "distgpt prepare" in str(e.value)


def test_truncated_header_and_missing_file(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(np.array([MAGIC, VERSION, 0], dtype="<i4").tobytes())
    for path, words in [(short, "truncated header"), (tmp_path / "absent.bin", "no such file")]:
        with pytest.raises(ShardError) as e:
            read_shard(path)
        assert one_line_naming(str(e.value), path) and words in str(e.value)


@pytest.mark.parametrize("bad", [65536, -1])
def test_token_outside_uint16_is_refused_on_write(tmp_path, bad):
    path = tmp_path / "big.bin"
    with pytest.raises(ShardError) as e:
        write_shard(str(path), [1, 2, bad, 3])
    assert one_line_naming(str(e.value), path) and str(bad) in str(e.value)
    assert not path.exists()


# ------------------------------------------------------------------ loader
def numbered_shards(tmp_path, sizes, name="s"):
    """Shards whose tokens are unique across all of them (token = running count), so every
    batch says exactly where it was read from."""
    start = 0
    for i, n in enumerate(sizes):
        write_shard(str(tmp_path / f"{name}_{i:06d}.bin"), np.arange(start, start + n))
        start += n
    return str(tmp_path / f"{name}_*.bin")


def step_rows(loaders, calls):
    """x and y rows of one global step read by `loaders` (one per rank), `calls` micro-batches each."""
    xs, ys = [], []
    for _ in range(calls):
        for loader in loaders:
            x, y = loader.next_batch()
            xs.append(x), ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def test_targets_are_inputs_shifted_by_one(tmp_path):
    pattern = numbered_shards(tmp_path, [1000])
    loader = ShardedLoader(pattern, B=3, T=5, rank=1, world=2, accum_steps=2)
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, 5)
    offset = 1 * 15  # micro-batch 0, rank 1: row 0 * world + 1
    assert torch.equal(x.flatten(), torch.arange(offset, offset + 15))
    assert torch.equal(y.flatten(), torch.arange(offset + 1, offset + 16))
    x[:] = -1  # fresh tensors: writing to them cannot change the shard
    loader.reset()
    assert torch.equal(loader.next_batch()[0].flatten(), torch.arange(offset, offset + 15))


def test_two_ranks_read_what_two_accumulation_steps_read(tmp_path):
    pattern = numbered_shards(tmp_path, [1000])
    ranks = [ShardedLoader(pattern, 2, 8, rank=r, world=2, accum_steps=1) for r in range(2)]
    single = ShardedLoader(pattern, 2, 8, rank=0, world=1, accum_steps=2)
    for step in range(5):
        x2, y2 = step_rows(ranks, 1)
        x1, y1 = step_rows([single], 2)
        assert torch.equal(x2, x1) and torch.equal(y2, y1)
        assert x1[0, 0] == step * 32  # consecutive steps read consecutive spans


def test_four_ranks_match_four_micro_steps_across_shard_switches(tmp_path):
    # G = 4 * 2 * 8 = 64: shard 0 holds 3 steps, shard 1 two (a third would need token 192 as
    # its last target), shard 2 four, then back to shard 0
    pattern = numbered_shards(tmp_path, [200, 192, 300])
    ranks = [ShardedLoader(pattern, 2, 8, rank=r, world=4) for r in range(4)]
    single = ShardedLoader(pattern, 2, 8, accum_steps=4)
    assert single.tokens_per_step == ranks[0].tokens_per_step == 64
    firsts = []
    for _ in range(11):
        x4, y4 = step_rows(ranks, 1)
        x1, y1 = step_rows([single], 4)
        assert torch.equal(x4, x1) and torch.equal(y4, y1)
        firsts.append(int(x1[0, 0]))
    assert firsts == [0, 64, 128, 200, 264, 392, 456, 520, 584, 0, 64]
    assert single.epoch == ranks[3].epoch == 1


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_mid_step_gives_the_same_batches(tmp_path, shuffle):
    rng = np.random.default_rng()
    for i, n in enumerate([300, 200, 400]):  # G = 48: 6 + 4 + 8 steps an epoch
        write_shard(str(tmp_path / f"r_{i}.bin"), rng.integers(0, 50257, size=n))
    pattern = str(tmp_path / "r_*.bin")
    loader = ShardedLoader(pattern, 2, 4, rank=1, world=2, accum_steps=3, shuffle=shuffle, seed=5)
    for _ in range(31):  # 10 steps and one micro-batch: a shard switch behind, mid-step now
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint's JSON
    assert state["micro_step"] == 1 and all(type(v) in (int, bool) for v in state.values())
    expected = [loader.next_batch() for _ in range(40)]  # 13 more steps: into the next epoch
    assert loader.epoch == 1
    resumed = ShardedLoader(pattern, 2, 4, rank=1, world=2, accum_steps=3, shuffle=shuffle, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(40))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == loader.state_dict()


def test_resharding_at_a_step_boundary_keeps_the_data_order(tmp_path):
    pattern = numbered_shards(tmp_path, [2000])
    single = ShardedLoader(pattern, 2, 8, accum_steps=4)
    step_rows([single], 8)  # two steps
    state = single.state_dict()
    ranks = [ShardedLoader(pattern, 2, 8, rank=r, world=2, accum_steps=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    x1, _ = step_rows([single], 4)
    # world 2 x accum 2 reads rows in order (k0 r0, k0 r1, k1 r0, k1 r1): the same as accum 4
    x2, _ = step_rows(ranks, 2)
    assert torch.equal(x1, x2) and x1[0, 0] == 128

    single.next_batch()  # mid-step: another split cannot continue it
    with pytest.raises(ValueError, match="micro-step 1") as e:
        ranks[0].load_state_dict(single.state_dict())
    assert "\n" not in str(e.value)
    other_G = ShardedLoader(pattern, 2, 16, accum_steps=4)
    with pytest.raises(ValueError, match="tokens per step"):
        other_G.load_state_dict(state)


def test_shard_too_small_for_one_step(tmp_path):
    pattern = numbered_shards(tmp_path, [40, 64, 50])  # a step of 4 x 2 x 8 needs 65 tokens
    with pytest.raises(ShardError) as e:
        ShardedLoader(pattern, 2, 8, accum_steps=4)
    message = str(e.value)
    assert one_line_naming(message, tmp_path / "s_000001.bin") and "65" in message
    with pytest.warns(UserWarning, match="skipping 2 shard"):  # the ones too small are left out
        loader = ShardedLoader(numbered_shards(tmp_path, [40, 300, 50], name="t"), 2, 8, accum_steps=4)
    assert loader.next_batch()[0][0, 0] == 40  # the first token of the usable shard


def test_bad_shard_fails_at_construction_and_no_match_says_prepare(tmp_path):
    pattern = numbered_shards(tmp_path, [500, 500])
    bad = raw_shard(tmp_path / "s_000002.bin", [MAGIC, VERSION, 100], bytes(10))
    with pytest.raises(ShardError, match="promises 100 tokens") as e:
        ShardedLoader(pattern, 2, 8)
    assert one_line_naming(str(e.value), bad)
    missing = str(tmp_path / "nowhere" / "x_train_*.bin")
    with pytest.raises(FileNotFoundError) as e:
        ShardedLoader(missing, 2, 8)
    assert one_line_naming(str(e.value), missing) and "distgpt prepare" in str(e.value)
    assert shard_paths(bad) == [bad]  # a plain path is a pattern too


def test_token_outside_the_vocabulary_is_refused_naming_file_and_position(tmp_path, monkeypatch):
    """An id >= vocab_size must never reach the encoder kernel: the loader checks each shard the
    first time it opens it (in chunks: the bad token here lies in the third)."""
    import distgpt.data.shards as shards
    monkeypatch.setattr(shards, "SCAN_CHUNK", 64)
    good = np.arange(200) % 100
    write_shard(str(tmp_path / "v_000000.bin"), good)
    bad = good.copy()
    bad[150] = 100  # == vocab_size: one past the last valid id
    write_shard(str(tmp_path / "v_000001.bin"), bad)
    loader = ShardedLoader(str(tmp_path / "v_*.bin"), 2, 8, accum_steps=4, vocab_size=100)
    for _ in range(3 * 4):  # shard 0 holds (200 - 1) // 64 = 3 windows of 4 micro-steps
        loader.next_batch()
    with pytest.raises(ShardError) as e:
        while True:
            loader.next_batch()
    message = str(e.value)
    assert one_line_naming(message, tmp_path / "v_000001.bin")
    assert "token 100 at position 150" in message and "model.vocab_size=100" in message
    # the same shard passes a model with a larger vocabulary
    wide = ShardedLoader(str(tmp_path / "v_000001.bin"), 2, 8, vocab_size=101)
    assert wide.next_batch()[0].max() < 101


# ------------------------------------------------------------------ tokenizer
def test_packaged_encoding():
    enc = load_gpt2_encoding()
    assert enc is load_gpt2_encoding(PACKAGED_RANK_FILE)  # built once
    assert encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_TOKEN
    assert decode(encode(UNICODE)) == UNICODE
    assert EOT_TOKEN not in encode("<|endoftext|>")  # ordinary text, never the special token
    assert decode(np.array([15496, 995])) == "Hello world"


def test_shared_rank_file_gives_the_same_encoding():
    rank_file = SHARED_DATA / "gpt2.tiktoken"
    if not rank_file.exists():
        pytest.skip(f"{rank_file} is absent")
    sample = TINY.read_text()[:20_000] + UNICODE
    assert encode(sample, load_gpt2_encoding(str(rank_file))) == encode(sample)


def test_bad_rank_files(tmp_path):
    lines = Path(PACKAGED_RANK_FILE).read_bytes().splitlines()
    cases = {"absent": None, "garbled": lines[:5] + [b"not-base64! 5"] + lines[6:],
             "short": lines[:1000]}
    for name, content in cases.items():
        path = tmp_path / f"{name}.tiktoken"
        if content is not None:
            path.write_bytes(b"\n".join(content))
        with pytest.raises(ValueError) as e:
            load_gpt2_encoding(str(path))
        assert one_line_naming(str(e.value), path), name
        if name == "garbled":
            assert "line 6" in str(e.value)


# ------------------------------------------------------------------ prepare
def stream_of(paths):
    return np.concatenate([read_shard(p) for p in paths]).astype(np.int64)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return prepare([str(TINY)], str(out), progress=False)


def test_prepare_tinyshakespeare(tiny_shards):
    train, val = tiny_shards
    assert [Path(p).name for p in train + val] == ["tinyshakespeare_train_000000.bin",
                                                   "tinyshakespeare_val_000000.bin"]
    stream = stream_of(train + val)
    assert len(stream) == TINY_TOKENS + 1 and stream[0] == EOT_TOKEN
    assert len(read_shard(val[0])) == int(0.1 * (TINY_TOKENS + 1))  # the last 10% of the stream
    text = TINY.read_text()
    assert stream[1:].tolist() == encode(text) and decode(stream[1:]) == text


def test_prepare_jsonl(tmp_path, capsys):
    docs = ["First document.", UNICODE, "third <|endoftext|> is just text"]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)) + "\n\n")
    train, val = prepare([str(path)], str(tmp_path / "out"), name="d", val_fraction=0.2,
                         text_key="body", progress=False)
    stream = stream_of(train + val)
    assert int((stream == EOT_TOKEN).sum()) == 3
    starts = np.flatnonzero(stream == EOT_TOKEN).tolist() + [len(stream)]
    assert [decode(stream[a + 1:b]) for a, b in zip(starts, starts[1:])] == docs
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "3 document(s)" in summary[0]


def test_prepare_rejects_bad_inputs(tmp_path):
    bad_json, no_field = tmp_path / "bad.jsonl", tmp_path / "nofield.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": oops}\n')
    no_field.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    for path, words in [(bad_json, "line 2"), (no_field, "line 2: no string field 'text'")]:
        with pytest.raises(ValueError, match=words) as e:
            prepare([str(path)], str(tmp_path / "out"), progress=False)
        assert one_line_naming(str(e.value), path)
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.txt.*\.jsonl"):
        prepare([str(csv)], str(tmp_path / "out"), progress=False)
    with pytest.raises(FileNotFoundError) as e:
        prepare([str(tmp_path / "absent.txt")], str(tmp_path / "out"), progress=False)
    assert one_line_naming(str(e.value), tmp_path / "absent.txt")
    assert not list((tmp_path / "out").glob("*.bin"))  # nothing half-made


def test_shard_tokens_splits_the_same_stream(tmp_path, tiny_shards):
    out = tmp_path / "split"
    train, val = prepare([str(TINY)], str(out), val_fraction=0.1, shard_tokens=100_000, progress=False)
    assert [len(read_shard(p)) for p in train] == [100_000, 100_000, 100_000, 4_224]
    assert len(val) == 1
    assert np.array_equal(stream_of(train + val), stream_of(tiny_shards[0] + tiny_shards[1]))
    # a second run with bigger shards leaves no stale file for the loader's glob to pick up
    train, _ = prepare([str(TINY)], str(out), shard_tokens=200_000, progress=False)
    assert shard_paths(str(out / "tinyshakespeare_train_*.bin")) == train and len(train) == 2
