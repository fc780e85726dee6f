"""Rank 0 speaks: console progress, the metrics JSONL file, and W&B.

Every other rank gets a RunLogger that does nothing, so callers never test the rank."""
import json
import os
import secrets
import sys
import time
from pathlib import Path


def _wandb_mode():
    """W&B logs online only with credentials; otherwise offline into the run directory."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class RunLogger:
    def __init__(self, run_dir, cfg, enabled, config_dict=None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.log_every = cfg.train.log_every
        self.wandb = None
        self.samples = {}  # step -> text, for the W&B table
        if not enabled:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = open(self.run_dir / "metrics.jsonl", "a")
        except OSError as exc:
            from distgpt.config import ConfigError
            raise ConfigError(f"out_dir: cannot write the run directory {self.run_dir} ({exc.strerror}); "
                              f"choose a writable out_dir=") from None
        if cfg.wandb:
            self.wandb = self._start_wandb(cfg, config_dict)
            self.samples = self._earlier_samples()

    def _start_wandb(self, cfg, config_dict):
        import wandb
        id_file = self.run_dir / "wandb_id.txt"
        # one W&B run per distgpt run: a resumed run appends to the same id
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        return wandb.init(project=cfg.wandb_project, name=cfg.name, id=run_id, resume="allow",
                          dir=str(self.run_dir), config=config_dict, mode=_wandb_mode())

    def _earlier_samples(self):
        """A resumed run's table starts from the samples already in metrics.jsonl."""
        samples = {}
        for line in (self.run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "sample" in record:
                samples[record["step"]] = record["sample"]
        return samples

    def info(self, message):
        if self.enabled:
            print(message, flush=True)

    def _record(self, record):
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def log_step(self, step, max_steps, loss, lr, grad_norm, tokens_per_s, step_ms, eta_s,
                 tokens_seen, extra=None, skipped=None):
        """extra: more per-step numbers (on GPUs: mfu, memory_gb), logged alike. skipped: why the
        spike guard skipped this step's update ("loss_spike", ...), or None; a skipped step is
        always printed, its record carries "skipped": reason, and W&B charts skipped = 1."""
        if not self.enabled:
            return
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "step_ms": step_ms, "tokens": tokens_seen,
                  **(extra or {}), **({"skipped": skipped} if skipped else {}), "time": time.time()}
        self._record(record)
        if self.wandb is not None:
            charted = {k: v for k, v in record.items() if k not in ("step", "time")}
            charted["skipped"] = 1 if skipped else 0
            self.wandb.log(charted, step=step)
        if skipped:
            print(f"step {step:>6}/{max_steps} | SKIPPED ({skipped.replace('_', ' ')}): batch dropped, "
                  f"weights unchanged | loss {loss:.4f} | norm {grad_norm:.3f}", flush=True)
        elif step % self.log_every == 0 or step == max_steps or step == 1:
            mfu = f" | MFU {100 * record['mfu']:.1f}%" if "mfu" in record else ""
            print(f"step {step:>6}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.3f} | "
                  f"{step_ms:.0f} ms | {tokens_per_s:,.0f} tok/s{mfu} | ETA {format_duration(eta_s)}",
                  flush=True)

    def log_eval(self, step, val_loss, tokens_seen):
        if not self.enabled:
            return
        self._record({"step": step, "val_loss": val_loss, "tokens": tokens_seen, "time": time.time()})
        if self.wandb is not None:
            self.wandb.log({"val_loss": val_loss}, step=step)
        print(f"step {step:>6} | val loss {val_loss:.4f}", flush=True)

    def log_hellaswag(self, step, result, tokens_seen):
        if not self.enabled:
            return
        record = {"step": step, "hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"],
                  "hellaswag_count": result["count"], "tokens": tokens_seen}
        self._record({**record, "time": time.time()})
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        print(f"step {step:>6} | hellaswag acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} "
              f"({result['count']} items)", flush=True)

    def log_sample(self, step, text):
        if not self.enabled:
            return
        self._record({"step": step, "sample": text, "time": time.time()})
        if self.wandb is not None:
            import wandb
            self.samples[step] = text  # the table grows: each logged version holds every sample so far
            rows = [[s, t] for s, t in sorted(self.samples.items())]
            self.wandb.log({"samples": wandb.Table(columns=["step", "text"], data=rows)}, step=step)
        print(f"---- sample at step {step} ----\n{text}\n----", flush=True)

    def close(self):
        if not self.enabled:
            return
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_duration(seconds):
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def error(message):
    print(f"distgpt: error: {message}", file=sys.stderr, flush=True)
