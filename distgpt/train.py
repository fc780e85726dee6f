"""The training loop: data -> forward -> backward -> reduce -> AdamW -> log/eval/checkpoint.

Everything is sized and allocated in Trainer.__init__; `run()` only moves data through it.
On a GPU the loop keeps one optimizer step queued ahead of the one it reads: step N+1 is on the
GPU while the host reads step N's loss, logs it and loads the next batch (except where the host
then uses the model: evaluations, samples, checkpoints). The GPU runs the same work in the same
order either way, so the results are the same bits.
"""
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distgpt import checkpoint, hellaswag
from distgpt.backends import get_backend
from distgpt.config import FP8_SWITCHES, DataConfig, accumulation_steps, fp8_switch_notes, to_yaml, validate
from distgpt.data.prepare import prepare
from distgpt.data.shards import ShardedLoader, read_shard, shard_paths
from distgpt.data.tokenizer import EOT_TOKEN, decode, encode
from distgpt.evaluate import validation_loss
from distgpt.logging import RunLogger, format_duration
from distgpt.model import memory
from distgpt.model.gpt2 import GPT2
from distgpt.model.layout import takes_ones_column
from distgpt.model.micro_step import MicroStep
from distgpt.optim import ShardedAdamW, learning_rate
from distgpt.parallel.data_parallel import DataParallel, gather_in_forward_wanted, overlap_wanted
from distgpt.preemption import PREEMPTED_EXIT_CODE, StopSignals
from distgpt.readout import StepReadout
from distgpt.sample import generate
from distgpt.spikes import SpikeGuard

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
BUILTIN_PREFIX = "builtin:"


class TrainingError(RuntimeError):
    """The run cannot go on (finished run, diverged, ...); the message says why and what to do."""


class TooManySkips(TrainingError):
    """train.skip_max_in_a_row steps in a row were skipped: the run diverged."""
    same_on_every_rank = True  # every rank skips the same steps: rank 0 alone says so


@dataclass
class StepResult:
    loss: float  # mean over the global batch
    lr: float
    norm: float  # global gradient norm before clipping
    skipped: str | None  # why the spike guard skipped the update (spikes.py), or None
    stop: bool  # some rank was signalled to stop (preemption.py): every rank stops after this step


@dataclass
class PendingStep:
    ticket: int  # its numbers' slot in the StepReadout
    lr: float
    queued_at: float  # time.time() when its queueing began


class Trainer:
    def __init__(self, cfg, dist):
        validate(cfg, dist.world)
        self.cfg, self.dist = cfg, dist
        t = cfg.train
        self.B, self.T = t.micro_batch, t.seq_len
        self.accum = accumulation_steps(cfg, dist.world)
        self.tokens_per_step = self.B * self.T * dist.world * self.accum
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.log = RunLogger(self.run_dir, cfg, dist.is_main,
                             OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
        # data first: a missing or bad shard fails before any memory is taken
        ensure_shards(cfg.data, dist, self.log)
        self.train_loader = ShardedLoader(cfg.data.train, self.B, self.T, dist.rank, dist.world, self.accum,
                                          shuffle=cfg.data.shuffle, seed=cfg.seed,
                                          vocab_size=cfg.model.vocab_size)
        # a validation step reads one global batch, like a training step: the same val tokens
        # whatever the number of ranks
        self.val_loader = ShardedLoader(cfg.data.val, self.B, self.T, dist.rank, dist.world, self.accum,
                                        vocab_size=cfg.model.vocab_size)
        self.val_steps = self._val_steps_that_fit()
        self.hellaswag_items = (hellaswag.load_items(cfg.hellaswag_path, t.hellaswag_limit)
                                if t.hellaswag_every > 0 else None)
        dtype = DTYPES[cfg.dtype]
        self.backend = get_backend(cfg.backend)  # allocates nothing until the model plans it
        self.backend.set_deterministic(cfg.deterministic)
        self.backend.set_dgelu(cfg.matmul_dgelu)
        self.backend.set_bias_column(cfg.matmul_bias_column)  # before the memory plan: it changes it
        scratch = getattr(self.backend, "estimate_scratch", None)
        scratch_rows = [] if scratch is None else scratch(self.B, self.T, cfg.model.n_embd, cfg.model.n_head,
                                                           dist.device)
        plan, planned_bytes = memory.format_estimate(memory.estimate(
            cfg.model, self.B, self.T, t.recompute, dtype, dist.world, cfg.zero_stage, scratch_rows, cfg.fp8,
            t.recompute_layers, self.backend.master_dtype(dtype), cfg.fp8_weight_gradients,
            takes_ones_column(self.backend, cfg.fp8, self.B, self.T, cfg.model.n_embd)))
        self.log.info(plan)
        check_fits(planned_bytes, dist.device)
        if cfg.fp8:
            check_fp8_device(dist.device)
        self.model = GPT2(cfg.model, self.backend, self.B, self.T, dtype, dist.device,
                          t.recompute, pad_multiple=dist.world, fp8=cfg.fp8, fp8_gradients=cfg.fp8_gradients,
                          recompute_layers=t.recompute_layers, fp8_weight_gradients=cfg.fp8_weight_gradients,
                          fp8_scaling=cfg.fp8_scaling, fp8_amax_history=cfg.fp8_amax_history,
                          fp8_margin=cfg.fp8_margin, **{key: getattr(cfg, key) for key in FP8_SWITCHES})
        if scratch is not None:  # what the libraries really asked for, beside the estimate
            taken = sum(nbytes for _, nbytes in self.backend.scratch())
            self.log.info(f"backend scratch planned: {taken / 2**20:,.1f} MiB (estimated "
                          f"{sum(nbytes for _, nbytes in scratch_rows) / 2**20:,.1f} MiB)")
        self.log.info(f"model {cfg.model.name}: {self.model.num_parameters:,} parameters | "
                      f"{self.tokens_per_step:,} tokens/step = {dist.world} rank(s) x {self.accum} "
                      f"micro-steps x B={self.B} x T={self.T} | backend {cfg.backend} ({cfg.dtype}"
                      f"{fp8_summary(cfg)})")
        self.step, self.tokens_seen = 0, 0
        resume_from = self._checkpoint_to_resume()
        if resume_from is None and cfg.init_from:
            self._load_pretrained(cfg.init_from)  # every rank reads the same file
        elif resume_from is None:
            self.model.init_weights(cfg.seed)  # same seed on every rank: same weights, no broadcast
        else:
            checkpoint.load_weights(resume_from, self.model)
        self.guard = SpikeGuard(t, self.backend, dist.device)
        self.skips_in_a_row = 0
        self.dp = DataParallel(dist.comm, self.model.layout, cfg.zero_stage, cfg.bucket_mb,
                               self.model.grads.element_size(), dist.device)
        self.overlap = overlap_wanted(cfg.overlap_comm, dist.nodes)
        self.dp.gather_in_forward = gather_in_forward_wanted(cfg.gather_in_forward, dist.nodes)
        self.optimizer = ShardedAdamW(self.model, self.dp, cfg.optim, self.backend, self.guard)
        self.micro_step = MicroStep(self.model, use_graph=t.cuda_graphs and cfg.backend == "cuda")
        if resume_from is not None:
            self._resume(resume_from)
        # [loss summed over micro-steps (then the mean over ranks), ranks asked to stop]: the one
        # all-reduce of a step carries both (preemption.py)
        self.reduced = torch.zeros(2, dtype=torch.float64, device=dist.device)
        self.readout = StepReadout(dist.device)
        # steps queued beyond the one the host reads next: on a GPU the next step runs while the
        # host reads, logs and loads data; on a CPU the work is done when queued, so none
        self.ahead = 1 if dist.device.type == "cuda" else 0
        self.queued_steps = 0  # optimizer steps queued so far (= self.step when none is in flight)
        self.signals = None  # preemption.StopSignals while run() trains

    # ------------------------------------------------------------ start and resume
    def _checkpoint_to_resume(self):
        """Rank 0 picks the checkpoint (and checks it is whole and for this model), every rank
        gets its choice or its refusal: a rank that raised alone would leave the others waiting."""
        choice, refusal = None, None
        if self.dist.is_main:
            try:
                if self.cfg.resume == "auto":
                    choice = checkpoint.find_latest(self.run_dir)
                elif self.cfg.resume != "none":
                    choice = Path(self.cfg.resume)
                elif checkpoint.find_latest(self.run_dir) is not None:
                    raise TrainingError(f"run directory {self.run_dir} already holds checkpoints; use "
                                        f"resume=auto to continue it, or another name= for a new run")
                if choice is not None:
                    checkpoint.verify(choice, self.run_dir)
                    checkpoint.check_model(choice, self.cfg.model)
            except (TrainingError, checkpoint.CheckpointError) as exc:
                refusal = str(exc)
        choice, refusal = self.dist.comm.broadcast_object(
            [None if choice is None else str(choice), refusal])
        if refusal is not None:
            error = checkpoint.CheckpointError(refusal)
            error.same_on_every_rank = True  # rank 0 alone prints it
            raise error
        return None if choice is None else Path(choice)

    def _load_pretrained(self, spec):
        from distgpt import interop
        file_cfg, named = interop.load_pretrained(spec)
        interop.check_matches(self.cfg.model, file_cfg, spec)
        for name, view in self.model.p.items():
            view.copy_(named[name])
        self.log.info(f"initialised from {spec}")

    def _resume(self, path):
        state = checkpoint.load_state(path)
        if state["dtype"] != self.cfg.dtype:
            raise checkpoint.CheckpointError(f"checkpoint {path} holds a {state['dtype']} run, this run is "
                                             f"{self.cfg.dtype}; resume with dtype={state['dtype']}")
        checkpoint.load_optimizer(path, self.optimizer, self.dist.rank, state["world"])
        fp8 = self.model.fp8
        if fp8 is not None and fp8.delayed and fp8.forwards == 0:
            self.log.info("the checkpoint holds no fp8 amax histories (written with fp8_scaling=current or "
                          "fp8=false): delayed scaling starts them afresh, its first step casting by current "
                          "scaling")
        try:
            self.train_loader.load_state_dict(state["train_loader"])
        except ValueError as exc:
            raise checkpoint.CheckpointError(f"checkpoint {path}: {exc}") from None
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        if "spike_guard" in state:  # checkpoints from before the guard start with an empty window
            self.guard.load_state_dict(state["spike_guard"])
            self.skips_in_a_row = state["skips_in_a_row"]
        moved = f" (written by {state['world']} rank(s), re-sharded)" if state["world"] != self.dist.world else ""
        self.log.info(f"resumed from {path} at step {self.step}{moved}")
        self._note_new_length(OmegaConf.create(state["config"]).train.max_steps)

    def _note_new_length(self, saved_max_steps):
        """The schedules are functions of max_steps: a resumed run that changes it changes the lr
        from its next step on, which deserves a line, not a surprise in the lr curve."""
        new, o, step = self.cfg.train.max_steps, self.cfg.optim, self.step
        if saved_max_steps == new or step >= new:
            return  # the same schedule, or a finished run that run() refuses
        # warm-up and constant do not depend on max_steps: name the first step that differs
        differs = next((s for s in range(step, max(new, saved_max_steps))
                        if learning_rate(s, new, o) != learning_rate(s, saved_max_steps, o)), None)
        if differs is None or differs >= new:
            return
        self.log.info(f"train.max_steps changed from {saved_max_steps} to {new} on resume: the {o.schedule} lr "
                      f"schedule follows the new length from the next step ({step + 1}) on; at step "
                      f"{differs + 1} the lr is {learning_rate(differs, new, o):.4g}, not "
                      f"{learning_rate(differs, saved_max_steps, o):.4g}")

    def _val_steps_that_fit(self):
        """Validation reads distinct batches only: cap val_steps at what the val shards hold."""
        want = self.cfg.train.val_steps
        available = sum(len(read_shard(p)) for p in shard_paths(self.cfg.data.val))
        fit = max(1, (available - 1) // self.tokens_per_step)
        if want > fit:
            self.log.info(f"note: the val shards hold {fit} batches; validating on {fit}, not train.val_steps={want}")
        return min(want, fit)

    # ------------------------------------------------------------ the loop
    def run(self):
        """Train to train.max_steps (or stop_after more steps). Returns the exit code: 0, or
        PREEMPTED_EXIT_CODE when a SIGTERM/SIGUSR1 stopped the run with a checkpoint."""
        t = self.cfg.train
        if self.step >= t.max_steps:
            raise TrainingError(f"run {self.run_dir} already finished {self.step} of train.max_steps="
                                f"{t.max_steps} steps; raise train.max_steps to go on, or set name= for a new run")
        with StopSignals() as self.signals:
            try:
                return self._loop()
            finally:
                self.signals = None

    def _loop(self):
        t = self.cfg.train
        if self.step == 0 and t.val_every > 0:
            self.evaluate()
        if self.step == 0 and t.hellaswag_every > 0:
            self.evaluate_hellaswag()
        started, started_step = time.time(), self.step
        end = t.max_steps if t.stop_after == 0 else min(t.max_steps, self.step + t.stop_after)
        done = 0
        self.queued_steps = self.step
        in_flight = deque()  # steps queued on the GPU, not yet read: PendingStep
        stopping, last_read = False, 0.0
        while self.step < end:
            # queue the next step before reading this one, so the GPU has work while the host reads,
            # logs and loads data; not past a step after which the host uses the model (evaluation,
            # sample, checkpoint), nor once the run is stopping
            while (not stopping and self.queued_steps < end and len(in_flight) <= self.ahead
                   and not (in_flight and self._host_work_after(self.queued_steps, end))):
                in_flight.append(self.queue_step())
            pending = in_flight.popleft()
            result = self.finish_step(pending)
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            # from when the GPU could start it: the previous step's end, or its queueing if later
            now = time.time()
            step_s, last_read = now - max(last_read, pending.queued_at), now
            done = self.step - started_step
            eta = (time.time() - started) / done * (t.max_steps - self.step)
            self.log.log_step(self.step, t.max_steps, result.loss, result.lr, result.norm,
                              self.tokens_per_step / step_s, 1000 * step_s, eta, self.tokens_seen,
                              self._gpu_stats(self.tokens_per_step / step_s), skipped=result.skipped)
            self._count_skips(result.skipped)
            if done == 1:  # what the first step's timing chose (CUDA: each shape's dGELU form)
                for line in self.backend.timed_choices():
                    self.log.info(line)
            if self._due(t.val_every, self.step):
                self.evaluate()
            if self._due(t.hellaswag_every, self.step):
                self.evaluate_hellaswag()
            if self._due(t.sample_every, self.step):
                self.sample()
            preempted = (result.stop or stopping) and self.step < end
            if preempted and in_flight:  # the step already queued ends first; the checkpoint follows it
                stopping, preempted = True, False
            if self._checkpoint_due(self.step, end) or preempted:
                path = self.save()
            if preempted:
                # the step's evaluations ran as in an uninterrupted run, so a resume repeats nothing
                signal_name = self.signals.received or "SIGTERM/SIGUSR1 on another rank"
                self.log.info(f"preempted ({signal_name}): stopped after step {self.step} with checkpoint "
                              f"{path}; exit code {PREEMPTED_EXIT_CODE}, resume=auto continues")
                self.log.close()
                return PREEMPTED_EXIT_CODE
        self.log.info(f"{'done' if self.step == t.max_steps else 'stopped'}: at step {self.step}, {done} steps in {format_duration(time.time() - started)}; "
                      f"checkpoints in {checkpoint.checkpoint_root(self.run_dir)}")
        self.log.close()
        return 0

    def _due(self, every, step):
        """Whether an evaluation or sample taken `every` steps (0: never) runs after step `step`
        (1-based): on its multiples and after the last step."""
        return every > 0 and (step % every == 0 or step == self.cfg.train.max_steps)

    def _checkpoint_due(self, step, end):
        every = self.cfg.train.checkpoint_every
        return (every > 0 and step % every == 0) or step == end

    def _host_work_after(self, step, end):
        """Whether the host uses the model after optimizer step `step` (1-based): an evaluation,
        a sample or a checkpoint, which must see that step's weights before the next update."""
        t = self.cfg.train
        return self._checkpoint_due(step, end) or any(
            self._due(every, step) for every in (t.val_every, t.hellaswag_every, t.sample_every))

    def queue_step(self):
        """Queue one optimizer step over the global batch without waiting for the GPU (a step
        the spike guard skips drops its batch and leaves the weights as they were, spikes.py).
        Returns the PendingStep that finish_step reads."""
        queued_at = time.time()
        index = self.queued_steps  # 0-based: the schedule's step
        self.queued_steps += 1
        self.model.zero_grad(matrices=False)  # the first micro-step's backward writes them
        self.reduced.zero_()
        # each token's loss enters the objective with weight 1 / (tokens in the global batch);
        # the gradient reduction sums over ranks, so this is the mean over all of them
        dloss = 1.0 / self.tokens_per_step
        for micro in range(self.accum):
            x, y = self.train_loader.next_batch()
            # forward + backward (a CUDA graph on GPUs); the last one's backward may also sum
            # the gradient buckets over ranks, the first one's forward gather the weights; the
            # weights change only between optimizer steps, so fp8 casts them in the first alone
            self.reduced[:1] += self.micro_step(x, y, dloss, *self.dp.micro_step_hooks(micro, self.accum,
                                                                                      self.overlap),
                                                fresh_weights=micro == 0, write_matrices=micro == 0)
        if self.signals is not None and self.signals.received:
            self.reduced[1:].fill_(1.0)  # the sum tells every rank that some rank was signalled
        # the mean loss over ranks before the update: the spike guard decides from it on every
        # rank alike. (Dividing on the device rounds exactly as dividing the host's double did.)
        self.dist.comm.all_reduce(self.reduced)
        self.reduced[:1].div_(self.accum * self.dist.world)
        lr = learning_rate(index, self.cfg.train.max_steps, self.cfg.optim)
        self.dp.reduce_gradients(self.model.grads)
        norm = self.optimizer.step(lr, self.reduced[:1])
        self.dp.gather_weights(self.model.params)
        # the numbers the host reads, copied out behind the step (readout.py)
        return PendingStep(self.readout.queue(self.reduced, norm, self.guard.verdict), lr, queued_at)

    def finish_step(self, pending):
        """The host's one wait for a step: its numbers, once the GPU has them (the step's
        collectives too, none waited on before). The communicator's wait: the watchdog sees it,
        so a hung rank cannot stall it."""
        loss, stop_votes, norm, verdict = self.readout.read(pending.ticket, self.dist.comm.synchronize)
        return StepResult(loss, pending.lr, norm, SpikeGuard.reason(verdict), stop_votes > 0)

    def _count_skips(self, skipped):
        """Many skipped steps in a row mean the run diverged: stop, saying what to change."""
        self.skips_in_a_row = self.skips_in_a_row + 1 if skipped else 0
        limit = self.cfg.train.skip_max_in_a_row
        if self.skips_in_a_row < limit:
            return
        # skipped steps still move the weights by AdamW's momentum: go back to before the streak
        first = self.step - limit + 1
        before = checkpoint.find_before(self.run_dir, first)
        restart = (f"resume from checkpoint {before} (resume={before})" if before is not None
                   else f"start again (no checkpoint from before step {first} is kept)")
        raise TooManySkips(f"steps {first}-{self.step} were all skipped (train.skip_max_in_a_row="
                           f"{limit}; the last for {skipped.replace('_', ' ')}): the run diverged; lower "
                           f"optim.lr or raise optim.warmup_steps, then {restart}")

    def evaluate(self):
        self.dp.complete_gather(self.model.params)  # weights a deferred gather left on their owners
        loss = validation_loss(self.model, self.val_loader, self.val_steps * self.accum, self.dist.comm,
                               self.dist.device)
        self.log.log_eval(self.step, loss, self.tokens_seen)
        return loss

    def _gpu_stats(self, tokens_per_s):
        """MFU (llm.c's count, per GPU) and this rank's peak allocated memory; none on the CPU."""
        if self.dist.device.type != "cuda":
            return {}
        from distgpt.bench import model_flops_per_token, peak_flops
        m = self.cfg.model
        flops = model_flops_per_token(self.model.num_parameters, m.n_layer, m.n_embd, self.T)
        return {"mfu": tokens_per_s / self.dist.world * flops / peak_flops(),
                "memory_gb": torch.cuda.max_memory_allocated(self.dist.device) / 1e9}

    def evaluate_hellaswag(self):
        self.dp.complete_gather(self.model.params)
        result = hellaswag.evaluate(self.model, self.hellaswag_items, self.dist.comm)
        self.log.log_hellaswag(self.step, result, self.tokens_seen)
        return result

    def sample(self):
        self.dp.complete_gather(self.model.params)  # a collective: every rank, before rank 0 samples
        if not self.dist.is_main:
            return
        t = self.cfg.train
        prompt = [EOT_TOKEN] + encode(t.sample_prompt)
        tokens = generate(self.model, prompt, t.sample_tokens, temperature=1.0, top_k=40,
                          seed=self.cfg.seed + self.step)  # seeded by step: resumable
        self.log.log_sample(self.step, decode(tokens[1:]))

    def save(self):
        self.dp.complete_gather(self.model.params)
        state = {"train_loader": self.train_loader.state_dict(), "tokens_seen": self.tokens_seen,
                 "config": to_yaml(self.cfg), "dtype": self.cfg.dtype, "model": self.cfg.model.name,
                 "spike_guard": self.guard.state_dict(), "skips_in_a_row": self.skips_in_a_row}
        path = checkpoint.save(self.run_dir, self.step, self.model, self.optimizer, state, self.dist,
                               keep=self.cfg.train.keep_checkpoints)
        self.log.info(f"checkpoint {path}")
        return path


# ---------------------------------------------------------------- helpers
def ensure_shards(data_cfg, dist, log):
    """Shards that are missing but have a `source` are made from it (rank 0; the others wait),
    only where the globs are the ones prepare writes for it: a path the user gave that matches
    nothing is an error naming that path, never a place to tokenize a corpus into, and the
    shipped corpus only ever fills the built-in preset's own paths."""
    missing = []
    for pattern in (data_cfg.train, data_cfg.val):
        try:
            shard_paths(pattern)
        except FileNotFoundError as exc:
            missing.append((pattern, exc))
    if not missing:
        return
    if not data_cfg.source or not _source_fills(data_cfg):
        # the error of a path the user gave comes first: that one is theirs to fix
        default = DataConfig()
        missing.sort(key=lambda item: item[0] in (default.train, default.val))
        raise missing[0][1]
    if dist.is_main:
        source = data_cfg.source
        if source.startswith(BUILTIN_PREFIX):
            source = builtin_text(source[len(BUILTIN_PREFIX):])
        out_dir = Path(data_cfg.train).parent
        name = Path(data_cfg.train).name.split("_train")[0]
        log.info(f"preparing shards in {out_dir} from {data_cfg.source}")
        prepare([str(source)], str(out_dir), name=name, progress=False)
    dist.comm.barrier()
    shard_paths(data_cfg.train)  # the pattern must now match, else its error names it
    shard_paths(data_cfg.val)


def _source_fills(data_cfg):
    """True if data.train/data.val are the globs `prepare` writes from data.source: DIR/NAME_train_*.bin
    and DIR/NAME_val_*.bin; for the shipped corpus, exactly the built-in preset's."""
    if data_cfg.source.startswith(BUILTIN_PREFIX):
        default = DataConfig()
        return (data_cfg.train, data_cfg.val) == (default.train, default.val)
    train, val = Path(data_cfg.train), Path(data_cfg.val)
    name = train.name.split("_train_")[0]
    return (train.parent == val.parent and train.name == f"{name}_train_*.bin"
            and val.name == f"{name}_val_*.bin" and "*" not in str(train.parent) + name)


def builtin_text(name):
    from importlib import resources
    path = resources.files("distgpt.assets") / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"data.source: no builtin text '{name}'; the package ships 'tinyshakespeare'")
    return Path(str(path))


def fp8_summary(cfg):
    """What the run's fp8 settings do, for the start-up line ('' without fp8)."""
    if not cfg.fp8:
        return ""
    grads = "fp8" if cfg.fp8_weight_gradients else "bf16"
    settings = {key: getattr(cfg, key) for key in ("fp8_scaling", "fp8_weight_gradients", *FP8_SWITCHES)}
    apart = "".join(f", {note}" for note in fp8_switch_notes(settings))
    return f", fp8 block matmuls: {grads} weight gradients, {cfg.fp8_scaling} scaling{apart}"


def check_fp8_device(device):
    """fp8=true on a GPU needs fp8 tensor cores (compute capability 8.9: Ada, Hopper and later)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise TrainingError(f"fp8=true needs a GPU with fp8 tensor cores (compute capability 8.9+, e.g. "
                            f"H100); {torch.cuda.get_device_name(device)} is sm_{major}{minor}: set fp8=false")


def check_fits(planned_bytes, device):
    """Stop before allocating when the plan cannot fit in the device's free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"GPU {device.index}"
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        where = "this machine"
    if planned_bytes > free:
        raise TrainingError(f"the plan needs {planned_bytes / 2**30:.1f} GiB but {where} has "
                            f"{free / 2**30:.1f} GiB free; lower train.micro_batch, raise "
                            f"train.recompute (or train.recompute_layers under it), or use more "
                            f"ranks with zero_stage=1")
