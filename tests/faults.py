"""Test-only fault injection into the trainer, by patching (nothing in distgpt knows of it).

A fault is KIND@STEP or KIND@STEP:RANK (RANK omitted: every rank), STEP the 1-based optimizer
step; it acts after each micro-step's forward and backward of that step on that rank (gradient
faults before any of that backward's gradients are summed over ranks):
    nan         one gradient element becomes NaN (the reduction spreads it to every rank)
    grad_spike  the gradients are multiplied by 1000 (a norm spike)
    loss_spike  the micro-step's loss is raised by 100
    sigterm     this process sends itself SIGTERM (as Slurm would, mid-step)
    sigusr1     the same with SIGUSR1

In-process:  install("nan@5", monkeypatch.setattr)
As a program (for mpirun):  python tests/faults.py "nan@5:1,sigterm@7:1" train OVERRIDES...
"""
import os
import signal
import sys
from pathlib import Path

KINDS = ("nan", "grad_spike", "loss_spike", "sigterm", "sigusr1")


def parse(spec):
    faults = []
    for item in filter(None, spec.split(",")):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        assert kind in KINDS, f"fault kind {kind!r}: choose one of {KINDS}"
        faults.append((kind, int(step), None if rank == "" else int(rank)))
    return faults


def install(spec, setattr_=setattr):
    from distgpt.model.gpt2 import GPT2
    from distgpt.model.micro_step import MicroStep
    from distgpt.train import Trainer
    faults = parse(spec)
    now = {"step": 0, "rank": 0}
    queue_step, micro_step, backward = Trainer.queue_step, MicroStep.__call__, GPT2.backward

    def active():
        return [kind for kind, step, rank in faults if step == now["step"] and rank in (None, now["rank"])]

    def traced_queue_step(self):
        now["step"], now["rank"] = self.queued_steps + 1, self.dist.rank
        return queue_step(self)

    def faulty_backward(self, layer_done=None, write_matrices=False):
        # the whole backward first, then the data-parallel layer's hooks: the fault lands in
        # this rank's gradients before any of them is summed over ranks
        backward(self, write_matrices=write_matrices)
        grads = self.grads
        for kind in active():
            if kind == "nan":
                grads[0] = float("nan")
            elif kind == "grad_spike":
                grads.mul_(1000.0)
        if layer_done is not None:
            for layer in reversed(range(self.n_layer)):
                layer_done(layer)

    def faulty_micro_step(self, x, y, dloss, dp=None, gather=None, **options):
        loss = micro_step(self, x, y, dloss, dp, gather, **options)
        for kind in active():
            if kind == "loss_spike":
                loss = loss + 100.0
            elif kind in ("sigterm", "sigusr1"):
                os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGUSR1)
        return loss

    setattr_(Trainer, "queue_step", traced_queue_step)
    setattr_(MicroStep, "__call__", faulty_micro_step)
    setattr_(GPT2, "backward", faulty_backward)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    install(sys.argv[1])
    from distgpt.cli import main
    sys.exit(main(sys.argv[2:]))
