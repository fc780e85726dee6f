"""Read back what W&B logged offline: the records of a run's .wandb file (a log of 32 KiB blocks,
each record split into fragments with a 7-byte header: crc32, length, type), parsed with the
protobuf classes wandb ships. Test-only: wandb's own reader is not public API."""
import json
import os
import struct
import time

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def settled(path, quiet_s=2.0, timeout_s=60.0):
    """Wait until W&B's writer has stopped appending to `path`. It is a separate service process:
    under load (a busy 2-core CI machine) the end of a run can reach the file a moment after
    wandb.finish() returned, and a test that reads at once sees a partial log."""
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        size = os.path.getsize(path)
        if size == last:
            return
        last = size
        time.sleep(quiet_s)


def records(path):
    settled(path)
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path}: not a W&B log"
    pos, out, pending = HEADER, [], b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
    parsed = []
    for raw in out:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def history(path):
    """[{key: value}] of every history row, values decoded from JSON."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def config(path):
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.run.config.update}
    return {}
