"""The GPT-2 BPE tokenizer, built offline from a tiktoken rank file.

tiktoken would otherwise download r50k_base on first use; the package ships the same rank file
(distgpt/assets/gpt2.tiktoken, byte-identical to r50k_base.tiktoken) so nothing is fetched.
"""
import base64
import binascii
import functools
from pathlib import Path

import tiktoken

EOT_TOKEN = 50256  # <|endoftext|>: one past the last BPE rank
GPT2_RANKS = 50256  # 256 byte tokens + 50,000 merges
PACKAGED_RANK_FILE = str(Path(__file__).resolve().parent.parent / "assets" / "gpt2.tiktoken")
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbols, whitespace;
# a leading space stays attached to the word that follows it
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_gpt2_encoding(rank_file=None):
    """The GPT-2 encoding from `rank_file` (default: the packaged one), built once per file."""
    path = Path(rank_file if rank_file is not None else PACKAGED_RANK_FILE).expanduser().resolve()
    return _build_encoding(str(path))


@functools.lru_cache(maxsize=None)
def _build_encoding(path):
    fix = "pass a GPT-2 rank file (r50k_base.tiktoken format: base64 token, space, rank per line)"
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"tokenizer rank file {path}: cannot read it ({e.strerror}); {fix}") from None
    ranks = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"tokenizer rank file {path} line {number}: expected '<base64 bytes> <rank>', "
                             f"got {line[:60]!r}; {fix}") from None
    # a different vocabulary would silently clash with EOT_TOKEN: insist on exactly GPT-2's ranks
    if sorted(ranks.values()) != list(range(GPT2_RANKS)):
        raise ValueError(f"tokenizer rank file {path}: holds {len(ranks):,} distinct tokens with ranks "
                         f"other than 0..{GPT2_RANKS - 1}, so it is not GPT-2's; {fix}")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=EOT_TOKEN + 1)


def encode(text, enc=None):
    """Token ids of ordinary text: '<|endoftext|>' inside `text` is plain text, not the special token."""
    return (enc or load_gpt2_encoding()).encode_ordinary(text)


def decode(tokens, enc=None):
    """Text of token ids (list, numpy array or tensor); bytes that are not valid UTF-8 become U+FFFD."""
    tokens = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
    return (enc or load_gpt2_encoding()).decode(tokens)
