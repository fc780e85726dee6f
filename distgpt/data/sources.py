"""Where `distgpt prepare` reads documents from: .txt, .jsonl and .parquet files.

Each input argument is a file, a directory (its .txt/.jsonl/.parquet files) or a glob. Every
input is checked before the first document is tokenized, so a typo in the tenth file of a
corpus fails in a second rather than after an hour. Readers stream: they yield documents in
batches, never a whole .jsonl or .parquet file at once (a .txt file is one document).
"""
import glob
import json
import os
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".parquet")
KINDS = ".txt (the whole file is one document), .jsonl (one JSON document per line), .parquet (one per row)"
BATCH_DOCS = 1024  # documents per batch: one task for a tokenizer worker
BATCH_BYTES = 16 * 2**20  # ... or fewer when they are long, to bound memory
DATA_EXTRA = "pip install 'distgpt[data]'"


class PrepareError(ValueError):
    """A mistake in what `distgpt prepare` was given; the one-line message names the input and the fix."""


def expand_inputs(inputs):
    """The files named by `inputs` (files, directories, globs), in order, each checked to be readable text."""
    if not inputs:
        raise PrepareError(f"prepare: no inputs given; pass files, directories or globs of {', '.join(SUFFIXES)}")
    files = []
    for arg in inputs:
        for path in _matches(arg):
            if path not in files:  # a file named twice (a glob and a path) is read once
                files.append(path)
    return files


def _matches(arg):
    if os.path.isfile(arg):  # even when its name holds glob characters such as '['
        _check_suffix(arg)
        return [arg]
    if os.path.isdir(arg):
        found = sorted(p for p in glob.glob(os.path.join(glob.escape(arg), "*"))
                       if os.path.isfile(p) and Path(p).suffix.lower() in SUFFIXES)
        if not found:
            raise PrepareError(f"prepare: directory {arg} holds no {'/'.join(SUFFIXES)} files; pass the "
                               f"directory that holds them, or a glob such as '{arg}/**/*.parquet'")
        return found
    if glob.has_magic(arg):
        found = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"prepare: input pattern {arg} matches no files")
        for path in found:
            _check_suffix(path)
        return found
    raise FileNotFoundError(f"prepare: input {arg} does not exist")


def _check_suffix(path):
    if Path(path).suffix.lower() not in SUFFIXES:
        raise PrepareError(f"prepare: input {path} has suffix '{Path(path).suffix}'; accepted: {KINDS}")


def default_name(arg):
    """Shard name prefix from the first input: a file's stem, a directory's name, a glob's last plain folder."""
    if os.path.isfile(arg):
        return Path(arg).stem
    if os.path.isdir(arg):
        return Path(os.path.abspath(arg)).name
    plain = [part for part in Path(arg).parent.parts if not glob.has_magic(part)]
    return Path(os.path.abspath(os.path.join(*plain))).name if plain else "corpus"


def check_columns(files, column):
    """Every .parquet file must hold a string column `column`; read from the footers only."""
    for path in files:
        if Path(path).suffix.lower() != ".parquet":
            continue
        pa, pq = import_pyarrow()
        schema = _open_parquet(pq, path).schema_arrow
        if column not in schema.names:
            raise PrepareError(f"prepare: input {path} has no column '{column}' (columns: "
                               f"{', '.join(schema.names)}); name the text column with --text-column")
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise PrepareError(f"prepare: input {path} column '{column}' holds {kind}, not text; name the "
                               f"text column with --text-column")


def import_pyarrow():
    """pyarrow is an extra (about 170 MB installed): only .parquet input needs it."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise PrepareError(f"prepare: reading .parquet needs pyarrow; {DATA_EXTRA}") from None
    return pyarrow, pyarrow.parquet


def _open_parquet(pq, path):
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError... for a file that is not parquet
        raise PrepareError(f"prepare: input {path} is not a readable parquet file ({e})") from None


def input_bytes(files):
    """Progress is measured in input bytes, the one unit every kind of file has."""
    return sum(os.path.getsize(p) for p in files)


def read_documents(files, column):
    """Yield (texts, input bytes consumed) batches from every file in order."""
    readers = {".txt": read_txt, ".jsonl": read_jsonl, ".parquet": read_parquet}
    for path in files:
        yield from readers[Path(path).suffix.lower()](path, column)


def read_txt(path, column):
    """The whole file as one document: yields ([text], bytes read)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")  # bytes, not text mode: '\r\n' must survive unchanged
    except UnicodeDecodeError as e:
        raise PrepareError(f"prepare: input {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                           f"convert it to UTF-8 first") from None
    yield [text], len(raw)


def read_jsonl(path, column):
    """One document per non-blank line, from field `column`: yields (texts, bytes read) in batches."""
    texts, n_bytes = [], 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            n_bytes += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # bad JSON or bad UTF-8
                raise PrepareError(f"prepare: input {path} line {number}: not valid JSON ({e}); "
                                   f"each line must be one JSON object") from None
            text = record.get(column) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise PrepareError(f"prepare: input {path} line {number}: no string field '{column}'; "
                                   f"name the field holding the text with --text-key")
            texts.append(text)
            if len(texts) >= BATCH_DOCS or n_bytes >= BATCH_BYTES:
                yield texts, n_bytes
                texts, n_bytes = [], 0
    if texts or n_bytes:
        yield texts, n_bytes


def read_parquet(path, column):
    """One document per row of `column`, a record batch at a time (pyarrow decodes one row group at a
    time); a file's bytes are credited to progress in proportion to its rows."""
    _, pq = import_pyarrow()
    parquet = _open_parquet(pq, path)
    size, rows = os.path.getsize(path), parquet.metadata.num_rows
    row = credited = 0
    for batch in parquet.iter_batches(batch_size=BATCH_DOCS, columns=[column]):
        texts = batch.column(0).to_pylist()
        if None in texts:
            raise PrepareError(f"prepare: input {path} row {row + texts.index(None)}: column '{column}' "
                               f"is null; drop such rows first")
        row += len(texts)
        done = size * row // rows
        yield texts, done - credited
        credited = done
    if credited < size:  # a file with no rows still counts as read
        yield [], size - credited
