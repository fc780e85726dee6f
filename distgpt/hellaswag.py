"""HellaSwag, scored the way the GPT-2 reproductions score it.

Each item is a context and four endings, one right. The model reads context + " " + ending; an
ending's score is the cross-entropy of its own tokens given everything before them. `acc` picks
the ending with the lowest total loss, `acc_norm` the one with the lowest loss per token (which
does not favour short endings). Items are dealt round-robin to the ranks and the counts summed,
so any number of ranks gives the same numbers.
"""
import json
from pathlib import Path

import torch

from distgpt.data.tokenizer import encode

DEFAULT_PATH = "data/hellaswag_val.jsonl"
SOURCE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def load_items(path, limit=0):
    """[(context tokens, [ending tokens] * 4, label)] from a HellaSwag .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hellaswag: no file {path}; download it with 'curl -Lo {DEFAULT_PATH} "
                                f"{SOURCE_URL}' or set hellaswag_path=")
    items = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if limit and len(items) == limit:
                break
            try:
                row = json.loads(line)
                context = encode(row["ctx"])
                endings = [encode(" " + ending) for ending in row["endings"]]
                label = int(row["label"])
                if len(endings) != 4 or not 0 <= label < 4:
                    raise ValueError("four endings and a label in 0..3 are needed")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"hellaswag: {path} line {number} is not a HellaSwag item ({exc})") from None
            items.append((context, endings, label))
    return items


def ending_losses(model, rows):
    """rows: [(tokens, n)] where the last n tokens are the ending. Returns (sum, mean) of the
    cross-entropy of each row's ending tokens given what precedes them (fp32 at least). Rows run
    in chunks of the model's planned batch B; a row longer than its T keeps its last T + 1
    tokens (the ending is short, so only the start of the context is lost)."""
    sums, means = [], []
    for first in range(0, len(rows), model.acts.B):
        chunk = [(tokens[-(model.acts.T + 1):], n) for tokens, n in rows[first:first + model.acts.B]]
        t = max(len(tokens) for tokens, _ in chunk) - 1
        batch = torch.zeros(len(chunk), t + 1, dtype=torch.long)
        for i, (tokens, _) in enumerate(chunk):
            batch[i, :len(tokens)] = torch.tensor(tokens)  # padding sits after the row: causal, unread
        batch = batch.to(model.device)
        # the model's own per-token losses (fp32 on the GPU, fp64 stays fp64): the full logits
        # are never held; dloss 0 computes no gradient. Padding targets are token 0, a valid
        # id; their losses are never read. The kernels read contiguous token rows.
        model.forward(batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), dloss=0.0)
        losses = model.token_losses
        for i, (tokens, n) in enumerate(chunk):
            ending = losses[i, len(tokens) - 1 - n:len(tokens) - 1]  # predictions of the ending's tokens
            sums.append(float(ending.sum()))
            means.append(float(ending.mean()))
    return sums, means


def evaluate(model, items, comm):
    """{'acc', 'acc_norm', 'count'} over `items`; each rank scores items rank, rank + world, ...
    (four rows an item, as many items a forward as the planned batch holds)."""
    mine = items[comm.rank::comm.world]
    rows = [(context + ending, len(ending)) for context, endings, _ in mine for ending in endings]
    sums, means = ending_losses(model, rows)
    correct = correct_norm = 0
    for i, (_, _, label) in enumerate(mine):
        item_sums, item_means = sums[4 * i:4 * i + 4], means[4 * i:4 * i + 4]
        correct += min(range(4), key=item_sums.__getitem__) == label
        correct_norm += min(range(4), key=item_means.__getitem__) == label
    counts = torch.tensor([correct, correct_norm, len(mine)], dtype=torch.float64, device=model.device)
    comm.all_reduce(counts)
    comm.synchronize()  # the host waits where the watchdog sees it (a collective may hang)
    correct, correct_norm, count = counts.tolist()
    return {"acc": correct / count, "acc_norm": correct_norm / count, "count": int(count)}


def evaluate_checkpoint(path, file, limit):
    """`distgpt eval hellaswag`: score a checkpoint (or a run directory's latest) on one process."""
    from distgpt import checkpoint
    from distgpt.parallel.comm import LocalComm
    items = load_items(file, limit)
    model = checkpoint.inference_model(path, batch=16)
    result = evaluate(model, items, LocalComm())
    print(f"hellaswag: acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} | {result['count']} items "
          f"| {checkpoint.resolve(path)}", flush=True)
    return result
