"""The data-parallel layer: which slice of the flat buffers this rank owns, and every collective
over gradients and weights. With it the trainer's step reads as the design's diagram:

    forward + backward (each micro-step)  ->  dp.reduce_gradients()  ->  optimizer.step()  ->
    dp.gather_weights()

zero_stage=1 (ZeRO-1): the flat gradient is reduce-scattered, so each rank holds the summed
gradient of its 1/world slice [lo, hi), updates that slice's weights (and keeps AdamW state for
it alone), and the updated working weights are all-gathered. zero_stage=0: the gradient is
all-reduced and every rank updates everything ([lo, hi) is the whole buffer).

The collectives run as they always have (after the whole backward); issuing each layer's
reduction during the backward, on a communication stream, is the next step for this module
(issue #12), and the trainer will not change when it comes.
"""


class DataParallel:
    def __init__(self, comm, total, zero_stage):
        """comm: the communicator; total: elements in the flat buffers (a multiple of the world
        size: the parameter layout pads it)."""
        if zero_stage not in (0, 1):
            raise ValueError(f"zero_stage={zero_stage}: choose 0 (all-reduce) or 1 (sharded AdamW)")
        if total % comm.world:
            raise ValueError(f"the flat buffer's {total} elements do not split into {comm.world} equal shards")
        self.comm, self.zero_stage = comm, zero_stage
        self.shard_size = total // comm.world
        if zero_stage == 1:
            self.lo, self.hi = comm.rank * self.shard_size, (comm.rank + 1) * self.shard_size
        else:
            self.lo, self.hi = 0, total

    @property
    def world(self):
        return self.comm.world

    @property
    def rank(self):
        return self.comm.rank

    def reduce_gradients(self, grads):
        """Sum the flat gradient over ranks: this rank's slice (zero_stage 1) or all of it (0)."""
        if self.zero_stage == 1:
            self.comm.reduce_scatter(grads[self.lo:self.hi], grads)
        else:
            self.comm.all_reduce(grads)

    def gather_weights(self, params):
        """After the update: every rank's slice of the working weights to every rank."""
        if self.zero_stage == 1:
            self.comm.all_gather(params, params[self.lo:self.hi])

    def sum_over_ranks(self, tensor):
        """A small per-rank statistic (the shards' squared gradient norms) summed in place."""
        self.comm.all_reduce(tensor)
