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


def step_dir(run_dir, step):
    """The directory of the checkpoint of `step` (written under step_dir(...).tmp first)."""
    return checkpoint_root(run_dir) / f"step_{step:08d}"


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


def save_tensors(tensors, file, metadata=None):
    """safetensors' save_file makes its files 0600 whatever the umask (0.8.0, measured); give
    them the mode open() gives any new file in that directory (0666 less the umask), so a run
    directory shared with a group is readable like the metrics and configs beside it. The mode
    is read off a probe file: os.umask can only be read by setting it, which races other threads."""
    save_file(tensors, str(file), metadata=metadata)
    probe = Path(f"{file}.mode")
    probe.unlink(missing_ok=True)  # a stale probe would keep its old mode
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        os.chmod(file, probe.stat().st_mode & 0o777)
    finally:
        probe.unlink()


def save(run_dir, step, model, optimizer, state, dist, keep=2):
    """Write the checkpoint of `step` collectively (every rank calls this). `state` is the
    JSON-able run state from rank 0 (loader position, config, ...). A write that fails on any
    rank (a full disk, a quota) fails the save on every rank alike: the half-written step_N.tmp
    is removed, `latest` still names the previous checkpoint, and CheckpointError says so."""
    root = checkpoint_root(run_dir)
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    failure = None
    try:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as exc:
        failure = exc
    failure = _first_failure(dist, failure)
    if failure is None:
        try:
            tensors, meta = optimizer.state_dict()
            save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                         tmp / optimizer_file(dist.rank), metadata={"meta": json.dumps(meta)})
            if dist.is_main:
                weights = {name: t.detach().to("cpu").clone() for name, t in model.p.items()}
                save_tensors(weights, tmp / MODEL_FILE)
                _write_json(tmp / STATE_FILE, dict(state, step=step, world=dist.world))
        except OSError as exc:
            failure = exc
        # every shard is on disk (or some rank failed) before the directory is published
        failure = _first_failure(dist, failure)
    if failure is not None:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = find_latest(run_dir)
        error = CheckpointError(f"saving checkpoint {final.name} failed ({failure}); removed the partial "
                                f"{tmp.name}, the latest checkpoint is still "
                                f"{latest if latest is not None else 'none'}; free space (or fix the "
                                f"cause) and resume=auto")
        error.same_on_every_rank = True
        raise error
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


def _first_failure(dist, failure):
    """Every rank learns whether any rank failed (and the first failure's text), in one
    collective that also serves as the barrier the save needs at this point."""
    texts = dist.comm.all_gather_object(None if failure is None else f"rank {dist.rank}: {failure}")
    return next((text for text in texts if text is not None), None)


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
    complete = _complete(root)
    return complete[-1] if complete else None


def find_before(run_dir, step):
    """The newest complete checkpoint of a run written before optimizer step `step`, or None."""
    complete = [p for p in _complete(checkpoint_root(run_dir)) if int(p.name[len("step_"):]) < step]
    return complete[-1] if complete else None


def _complete(root):
    """The published checkpoint directories under `root` (state.json written), oldest first."""
    return sorted(p for p in root.glob("step_*")
                  if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).exists())


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
    """Copy the named weights of a checkpoint into the model's flat buffer: every tensor is
    checked first, so a checkpoint that does not fit leaves the model untouched."""
    file = Path(path) / MODEL_FILE
    weights = _load(file)
    for name, view in model.p.items():
        if name not in weights:
            raise CheckpointError(f"checkpoint {file}: no tensor '{name}'; it was written for "
                                  f"another model shape (check model=)")
        if tuple(weights[name].shape) != tuple(view.shape):
            raise CheckpointError(f"checkpoint {file}: '{name}' has shape {tuple(weights[name].shape)}, "
                                  f"the model needs {tuple(view.shape)}; check model=")
    for name, view in model.p.items():
        view.copy_(weights[name])


def check_model(path, model_cfg):
    """Refuse a checkpoint written for another model, naming every field that differs (a head
    count changes no tensor's shape, so shapes alone would not catch it)."""
    from dataclasses import fields
    saved = config_of(path).model
    differ = [f"{f.name}={getattr(saved, f.name)} (this run: {getattr(model_cfg, f.name)})"
              for f in fields(model_cfg) if f.name != "name" and getattr(saved, f.name) != getattr(model_cfg, f.name)]
    if differ:
        raise CheckpointError(f"checkpoint {path} was written for another model: {', '.join(differ)}; "
                              f"resume it with those model settings, or start a new run with name=")


def verify(path, run_dir=None):
    """Check that a checkpoint is whole before anything is loaded: state.json parses, and the
    model file and every optimizer shard have a readable safetensors header and their full
    length. A damaged one is refused naming the newest intact checkpoint of `run_dir`."""
    path = Path(path)
    try:
        _check_whole(path)
    except CheckpointError as exc:
        reason = str(exc)
        intact = _newest_intact(run_dir if run_dir is not None else path.parent.parent, exclude=path)
        fix = (f"resume from the newest intact one with resume={intact}" if intact is not None
               else "no intact checkpoint is left: resume=none starts over")
        raise CheckpointError(f"{reason.rstrip('.')}; {fix}") from None


def _check_whole(path):
    """state.json parses, and every file it implies has a readable header and its full length."""
    state = load_state(path)
    for file in [MODEL_FILE] + [optimizer_file(r) for r in range(int(state.get("world", 1)))]:
        _check_header(path / file)


def _check_header(file):
    if not file.exists():
        raise CheckpointError(f"checkpoint file {file} is missing")
    try:
        with safe_open(str(file), framework="pt") as f:  # checks the header and the file's length
            f.keys()
    except Exception as exc:  # safetensors has its own error types for a damaged file
        raise CheckpointError(f"checkpoint file {file} is damaged ({str(exc).splitlines()[0]})") from None


def _newest_intact(run_dir, exclude):
    for candidate in reversed(_complete(checkpoint_root(run_dir))):
        if candidate.resolve() == Path(exclude).resolve():
            continue
        try:
            _check_whole(candidate)
            return candidate
        except CheckpointError:
            continue
    return None


def load_optimizer(path, optimizer, rank, saved_world):
    """Fill this rank's AdamW state from a checkpoint written by `saved_world` ranks. Each shard
    records which ranges of the flat buffer its state holds, end to end, and the flat layout's
    offsets do not depend on the world size (only its end padding does), so any new sharding is
    copied from whichever saved ranges overlap it: 1 -> N, N -> 1, zero_stage and bucket_mb
    changes all re-shard the same way."""
    from distgpt.optim import saved_ranges
    path = Path(path)
    if saved_world == optimizer.comm.world:
        tensors, meta = _load_optimizer_file(path, rank)
        if saved_ranges(meta) == optimizer.owned:
            try:
                optimizer.load_state_dict(tensors, meta)
            except ValueError as exc:
                raise CheckpointError(f"checkpoint {path}: {exc}") from None
            return
    # the parts of this rank's ranges that hold parameters; the padding after them stays zero
    used = optimizer.model.layout.used
    wanted = [(lo, min(hi, used)) for lo, hi in optimizer.owned if lo < used]
    need = sum(hi - lo for lo, hi in wanted)
    covered, step, seen = 0, None, set()
    for saved_rank in range(saved_world):
        tensors, meta = _load_optimizer_file(path, saved_rank)
        at = 0
        for saved_lo, saved_hi in saved_ranges(meta):
            for want_lo, want_hi in wanted:
                lo, hi = max(saved_lo, want_lo), min(saved_hi, want_hi)
                if lo >= hi or (lo, hi) in seen:  # zero_stage 0 shards each hold everything
                    continue
                seen.add((lo, hi))
                ours_at = optimizer.dp.state_offset(lo)
                theirs_at = at + lo - saved_lo
                for name in ("m", "v"):
                    getattr(optimizer, name)[ours_at:ours_at + hi - lo].copy_(
                        tensors[name][theirs_at:theirs_at + hi - lo])
                if optimizer.master is not None:
                    if "master" not in tensors:
                        raise CheckpointError(f"checkpoint {path}: no fp32 master weights in "
                                              f"{optimizer_file(saved_rank)}; resume with the dtype it was "
                                              f"written with")
                    optimizer.write_master(ours_at, lo, tensors["master"][theirs_at:theirs_at + hi - lo],
                                           meta["step"])
                covered += hi - lo
                step = meta["step"]
            at += saved_hi - saved_lo
        if covered >= need:
            break
    if step is None or covered < need:
        raise CheckpointError(f"checkpoint {path}: its {saved_world} optimizer shard(s) do not cover this "
                              f"rank's parts of the flat buffer; the checkpoint is incomplete")
    try:  # fp8 delayed scaling: this rank's own amax histories where it had a shard, else rank 0's
        optimizer.load_fp8_state(*_load_optimizer_file(path, min(rank, saved_world - 1)))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    optimizer.step_count = step


def _load_optimizer_file(path, rank):
    from distgpt.model.layout import LAYOUT_VERSION
    file = Path(path) / optimizer_file(rank)
    tensors = _load(file)
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    version = meta.get("layout_version", 1)  # shards from before the field: layout 1
    if version != LAYOUT_VERSION:
        raise CheckpointError(f"checkpoint {path}: its optimizer state is laid out as flat-buffer version "
                              f"{version}, this distgpt uses {LAYOUT_VERSION}; resume it with the distgpt "
                              f"that wrote it, or keep its weights alone: distgpt export RUN --format hf --out "
                              f"DIR, then init_from=hf:DIR with a new name=")
    return tensors, meta


def _load(file):
    if not file.exists():
        raise CheckpointError(f"checkpoint file {file} is missing; the checkpoint is incomplete "
                              f"(resume from another one, or resume=none)")
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"checkpoint file {file} is unreadable ({exc}); "
                              f"resume from another checkpoint") from None

