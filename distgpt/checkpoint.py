"""Atomic checkpoints: weights, optimizer shards, loader position and run state.

    <run_dir>/checkpoints/step_00000100/
        model.safetensors                every parameter by name (rank 0)
        optimizer_rank00000.safetensors  this rank's AdamW slice: m, v, fp32 master (every rank)
        state.json                       step, loader state, config, world size (rank 0)
    <run_dir>/checkpoints/latest         the name of the newest complete checkpoint

Everything is written into `step_N.tmp/` first; only when every rank has finished does rank 0
rename it to `step_N/` and then replace `latest`, so a crash at any moment leaves the previous
checkpoint as the latest. Files are safetensors and JSON: loading never unpickles anything.
"""
import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

LATEST = "latest"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def optimizer_file(rank):
    return f"optimizer_rank{rank:05d}.safetensors"


def checkpoint_root(run_dir):
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def save(run_dir, step, model, optimizer, state, dist, keep=2):
    """Write the checkpoint of `step` collectively (every rank calls this). `state` is the
    JSON-able run state from rank 0 (loader position, config, ...)."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.comm.barrier()
    tensors, meta = optimizer.state_dict()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
              str(tmp / optimizer_file(dist.rank)), metadata={"meta": json.dumps(meta)})
    if dist.is_main:
        weights = {name: t.detach().to("cpu").clone() for name, t in model.p.items()}
        save_file(weights, str(tmp / MODEL_FILE))
        _write_json(tmp / STATE_FILE, dict(state, step=step, world=dist.world))
    dist.comm.barrier()  # every shard is on disk before the directory is published
    if dist.is_main:
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        _prune(root, keep)
    dist.comm.barrier()
    return final


def _prune(root, keep):
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def find_latest(run_dir):
    """The newest complete checkpoint directory of a run, or None if it has none."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).exists():
            return candidate
    complete = sorted(p for p in root.glob("step_*")
                      if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).exists())
    return complete[-1] if complete else None


def find_before(run_dir, step):
    """The newest complete checkpoint of a run written before optimizer step `step`, or None."""
    root = checkpoint_root(run_dir)
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                      and (p / STATE_FILE).exists() and int(p.name[len("step_"):]) < step)
    return complete[-1] if complete else None


def load_state(path):
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise CheckpointError(f"checkpoint {path}: no {STATE_FILE}; it is not a complete distgpt "
                              f"checkpoint (use resume=none to start over)")
    try:
        return json.loads(state_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {state_file}: unreadable JSON ({exc.msg}); "
                              f"point resume= at an earlier checkpoint") from None


def resolve(path):
    """A checkpoint directory as given, or a run directory's latest checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a run directory with one")
    return latest


def config_of(path):
    """The run's Config, as the checkpoint recorded it."""
    from omegaconf import OmegaConf

    from distgpt.config import Config
    state = load_state(path)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(state["config"])))


def inference_model(path, batch=1):
    """A GPT2 holding a checkpoint's weights (a run directory: its latest), fp32 on the reference
    ops, on the GPU when there is one, planned for `batch` rows of up to block_size tokens."""
    import torch

    from distgpt.backends import reference
    from distgpt.model.gpt2 import GPT2
    path = resolve(path)
    cfg = config_of(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPT2(cfg.model, reference, batch, cfg.model.block_size, torch.float32, device)
    load_weights(path, model)
    return model


def load_weights(path, model):
    """Copy the named weights of a checkpoint into the model's flat buffer."""
    file = Path(path) / MODEL_FILE
    weights = _load(file)
    for name, view in model.p.items():
        if name not in weights:
            raise CheckpointError(f"checkpoint {file}: no tensor '{name}'; it was written for "
                                  f"another model shape (check model=)")
        if tuple(weights[name].shape) != tuple(view.shape):
            raise CheckpointError(f"checkpoint {file}: '{name}' has shape {tuple(weights[name].shape)}, "
                                  f"the model needs {tuple(view.shape)}; check model=")
        view.copy_(weights[name])


def load_optimizer(path, optimizer, rank, saved_world):
    """Fill this rank's AdamW slice from a checkpoint written by `saved_world` ranks. The flat
    layout's offsets do not depend on the world size (only its end padding does), so a slice
    of any new sharding is copied from whichever saved shards overlap it: 1 -> N, N -> 1 and
    zero_stage changes all re-shard the same way."""
    path = Path(path)
    if saved_world == optimizer.comm.world:
        tensors, meta = _load_optimizer_file(path, rank)
        if (meta["lo"], meta["hi"]) == (optimizer.lo, optimizer.hi):
            optimizer.load_state_dict(tensors, meta)
            return
    # the part of this rank's slice that holds parameters; the padding after them stays zero
    want_lo, want_hi = optimizer.lo, min(optimizer.hi, optimizer.model.layout.used)
    covered, step = 0, None
    for saved_rank in range(saved_world):
        tensors, meta = _load_optimizer_file(path, saved_rank)
        lo, hi = max(meta["lo"], want_lo), min(meta["hi"], want_hi)
        if lo >= hi:
            continue
        for name in ("m", "v", "master"):
            ours = getattr(optimizer, name)
            if ours is None:
                continue
            if name not in tensors:
                raise CheckpointError(f"checkpoint {path}: no fp32 master weights in "
                                      f"{optimizer_file(saved_rank)}; resume with the dtype it was written with")
            ours[lo - optimizer.lo:hi - optimizer.lo].copy_(tensors[name][lo - meta["lo"]:hi - meta["lo"]])
        covered += hi - lo
        step = meta["step"]
        if covered >= want_hi - want_lo and meta["zero_stage"] == 0:
            break  # zero_stage 0 shards each hold everything: one is enough
    if step is None or covered < want_hi - want_lo:
        raise CheckpointError(f"checkpoint {path}: its {saved_world} optimizer shard(s) do not cover "
                              f"elements [{want_lo}, {want_hi}); the checkpoint is incomplete")
    optimizer.step_count = step


def _load_optimizer_file(path, rank):
    file = Path(path) / optimizer_file(rank)
    tensors = _load(file)
    with safe_open(str(file), framework="pt") as f:
        return tensors, json.loads(f.metadata()["meta"])


def _load(file):
    if not file.exists():
        raise CheckpointError(f"checkpoint file {file} is missing; the checkpoint is incomplete "
                              f"(resume from another one, or resume=none)")
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"checkpoint file {file} is unreadable ({exc}); "
                              f"resume from another checkpoint") from None

