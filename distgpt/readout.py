"""A step's few numbers (loss, stop votes, gradient norm, the spike guard's verdict) read by the
host without stalling the GPU.

Reading a device tensor (`.item()`, `.tolist()`) waits for everything queued on the stream. The
trainer queues the next step before it reads the last one's numbers, so such a read would wait
for the next step too, and the GPU would idle while the host logs and loads data. Instead, each
step's numbers are gathered into one small device buffer and copied to a pinned host slot
behind the step's work, with an event after the copy: reading them waits for that event alone.
Two slots, because at most two steps are in flight (the one being read and the one queued).
"""
import torch

SLOTS = 2


class StepReadout:
    def __init__(self, device):
        self.staged = torch.zeros(4, dtype=torch.float64, device=device)
        if device.type == "cuda":
            self.host = [torch.zeros(4, dtype=torch.float64).pin_memory() for _ in range(SLOTS)]
            self.events = [torch.cuda.Event() for _ in range(SLOTS)]
        else:  # the CPU computes in program order: the values are there when queued
            self.host, self.events = [torch.zeros(4, dtype=torch.float64) for _ in range(SLOTS)], [None] * SLOTS
        self.next_slot = 0

    def queue(self, reduced, norm, verdict):
        """Queue the copy of reduced (2 fp64: loss, stop votes), norm (one element) and verdict
        (one int32 element) behind the work queued so far. Returns the ticket `read`
        takes; a slot is reused two tickets later, so read each ticket before queueing again twice."""
        slot = self.next_slot
        self.next_slot = (slot + 1) % SLOTS
        self.staged[:2].copy_(reduced)
        self.staged[2:3].copy_(norm.reshape(1))
        self.staged[3:].copy_(verdict.reshape(1))
        self.host[slot].copy_(self.staged, non_blocking=True)
        if self.events[slot] is not None:
            self.events[slot].record()
        return slot

    def read(self, ticket, wait):
        """(loss, stop votes, norm, verdict code) of a queued ticket. wait(event) blocks until the
        event completes (the communicator's, so the collective watchdog sees a hang)."""
        if self.events[ticket] is not None:
            wait(self.events[ticket])
        loss, votes, norm, verdict = self.host[ticket].tolist()
        return loss, votes, norm, int(verdict)
