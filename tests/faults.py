"""Test-only fault injection into the trainer, by patching (nothing in distgpt knows of it).

A fault is KIND@STEP or KIND@STEP:RANK (RANK omitted: every rank), STEP the 1-based optimizer
step; it acts after each micro-step's forward and backward of that step on that rank:
    nan         one gradient element becomes NaN (the reduction spreads it to every rank)
    grad_spike  the gradients are multiplied by 1000 (a norm spike)
    loss_spike  the micro-step's loss is raised by 100
    zero_grad   the gradients become 0 (the run a skipped step must equal)
    sigterm     this process sends itself SIGTERM (as Slurm would, mid-step)
    sigusr1     the same with SIGUSR1

In-process:  install("nan@5", monkeypatch.setattr)
As a program (for mpirun):  python tests/faults.py "nan@5:1,sigterm@7:1" train OVERRIDES...
"""
import os
import signal
import sys
from pathlib import Path

KINDS = ("nan", "grad_spike", "loss_spike", "zero_grad", "sigterm", "sigusr1")


def parse(spec):
    faults = []
    for item in filter(None, spec.split(",")):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        assert kind in KINDS, f"fault kind {kind!r}: choose one of {KINDS}"
        faults.append((kind, int(step), None if rank == "" else int(rank)))
    return faults


def install(spec, setattr_=setattr):
    from distgpt.model.micro_step import MicroStep
    from distgpt.train import Trainer
    faults = parse(spec)
    now = {"step": 0, "rank": 0}
    train_step, micro_step = Trainer.train_step, MicroStep.__call__

    def traced_train_step(self):
        now["step"], now["rank"] = self.step + 1, self.dist.rank
        return train_step(self)

    def faulty_micro_step(self, x, y, dloss):
        loss = micro_step(self, x, y, dloss)
        for kind, step, rank in faults:
            if step != now["step"] or rank not in (None, now["rank"]):
                continue
            grads = self.model.grads
            if kind == "nan":
                grads[0] = float("nan")
            elif kind == "grad_spike":
                grads.mul_(1000.0)
            elif kind == "zero_grad":
                grads.zero_()
            elif kind == "loss_spike":
                loss = loss + 100.0
            else:
                os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGUSR1)
        return loss

    setattr_(Trainer, "train_step", traced_train_step)
    setattr_(MicroStep, "__call__", faulty_micro_step)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    install(sys.argv[1])
    from distgpt.cli import main
    sys.exit(main(sys.argv[2:]))
