"""The data-parallel layer: which parts of the flat buffers this rank owns, the gradient buckets,
and every collective over gradients and weights. The trainer's step reads as the design's diagram:

    forward + backward (each micro-step; the last one hands this layer to the backward)
      -> dp.reduce_gradients()  -> optimizer.step()  -> dp.gather_weights()

Buckets (parallel/buckets.py) group consecutive layers' gradients, at least `bucket_mb` each,
the embeddings and small tensors last. On the last micro-step the backward calls
`layer_done(layer)` after each layer, and a bucket whose
layers are all done has its gradients summed at once, on a communication stream ordered after
the backward's kernels by a CUDA event, while the backward goes on with the layers below.

zero_stage=1 (ZeRO-1) shards every bucket: each of its ranges is cut into `world` equal,
aligned parts (what does not divide evenly, under 8 x world elements, goes to the last rank),
and rank r owns part r of every range. A bucket's gradients are then one reduce-scatter per range
(NCCL, in place), so every link carries data in both directions at once; the rank keeps AdamW
state for its parts alone (`owned`), updates them bucket by bucket, and after each bucket
`weights_updated` all-gathers that bucket's new weights while the next one is updated. Buckets
go back in the forward's order (embeddings first, then layer 0, 1, ...). zero_stage=0
all-reduces each bucket and every rank owns and updates everything.

With `gather_in_forward` (zero_stage 1, several ranks) the weights do not travel after the
update at all: `gather_weights` only marks them pending, and the next step's first micro-step
all-gathers every bucket on the communication stream before its forward, which waits for each
bucket just before the first layer that uses it (`layer_needed`): the embeddings' bucket before
the encoder, layer l's bucket before layer l. Whatever reads the weights between steps
(evaluation, sampling, checkpoints) calls `complete_gather` first.

Each element is summed over the same ranks whichever bucket or collective carries it, and every
rank issues every collective in the same order. Without a GPU (MpiComm, StoreComm in tests) the
collectives run inline, in the same order, so the CPU tests exercise the same bookkeeping.
"""
import os
from bisect import bisect_right
from contextlib import nullcontext

import torch

from distgpt.model.layout import ALIGN_ELEMENTS
from distgpt.parallel.buckets import make_buckets

DEFAULT_BUCKET_MB = 25
OVERLAP_SETTINGS = ("auto", "true", "false")


def overlap_wanted(setting, nodes, environ=os.environ, name="overlap_comm"):
    """Whether the backward hands its finished buckets over (overlap_comm): "true", "false", or
    "auto", which overlaps only where the gradients cross a network: ranks on more than one node,
    or NCCL kept off NVLink and shared memory (NCCL_P2P_DISABLE=1 with NCCL_SHM_DISABLE=1, its
    socket transport). Measured on two H200s (2026-11-22): over the socket transport the overlap
    made 124M B=64 10% faster; over NVLink the collectives are short and NCCL's kernels slow the
    matmuls they run beside, so the overlapped step was 0.3-1.5 ms slower.
    gather_in_forward's setting reads the same way (name names it in the error): see
    gather_in_forward_wanted."""
    setting = str(setting).lower()
    if setting not in OVERLAP_SETTINGS:
        raise ValueError(f"{name}={setting}: choose one of {', '.join(OVERLAP_SETTINGS)}")
    if setting != "auto":
        return setting == "true"
    network_only = environ.get("NCCL_P2P_DISABLE") == "1" and environ.get("NCCL_SHM_DISABLE") == "1"
    return nodes > 1 or network_only


def gather_in_forward_wanted(setting, nodes, environ=os.environ):
    """Whether the updated weights' all-gather moves into the next forward (gather_in_forward):
    "auto" does it where overlap_comm=auto overlaps, across a network. Measured on two H200s over
    the socket transport (124M B=64, 2026-11-23): 141.7 ms a step with it against 157.1 without
    (exposed communication 34.3 against 49.4 ms); over NVLink the all-gather takes ~1 ms and
    the step is bitwise the same either way."""
    return overlap_wanted(setting, nodes, environ, name="gather_in_forward")


class DataParallel:
    def __init__(self, comm, layout, zero_stage, bucket_mb=DEFAULT_BUCKET_MB, element_bytes=2,
                 device=None):
        """comm: the communicator; layout: the model's ParameterLayout; element_bytes: of the
        gradient dtype, to size buckets in bytes; device: a CUDA device gives the collectives
        their own stream."""
        if zero_stage not in (0, 1):
            raise ValueError(f"zero_stage={zero_stage}: choose 0 (all-reduce) or 1 (sharded AdamW)")
        self.comm, self.zero_stage, self.total = comm, zero_stage, layout.total
        world = comm.world
        self.buckets = make_buckets(layout, max(1, int(bucket_mb * 2**20 / element_bytes)))
        for bucket in self.buckets:
            for start, end in bucket.ranges:
                part = (end - start) // (world * ALIGN_ELEMENTS) * ALIGN_ELEMENTS
                bucket.splits.append((start, end, part))
        # the bucket holding each layer's matrices: the backward completes it at its first layer,
        # the forward waits for it before that layer
        self._bucket_of_layer = {layer: b for b in self.buckets for layer in b.layers}
        # the weights' way back: the last bucket (embeddings) first, then layer 0, 1, ...
        self.update_order = [self.buckets[-1]] + self.buckets[-2::-1]
        self.owned = self.owned_by(comm.rank)
        # where each owned range starts in this rank's optimizer state (its ranges end to end)
        self.state_starts, at = [], 0
        for start, end in self.owned:
            self.state_starts.append(at)
            at += end - start
        self.state_size = at
        device = torch.device(device) if device is not None else None
        # high priority: a collective's blocks are scheduled as soon as its inputs are ready,
        # ahead of queued compute, so the peers meet early and no NCCL block sits spinning
        self.stream = (torch.cuda.Stream(device, priority=-1) if device is not None
                       and device.type == "cuda" and world > 1 else None)
        self.grads = None  # the flat gradient buffer, for the backward's hooks
        self._reduced_in_backward = False
        self._sent = set()  # buckets whose weights went out during this optimizer step
        self.gather_in_forward = False  # set by the trainer (config gather_in_forward)
        self._gather_pending = False  # updated weights not yet gathered (gather_in_forward)
        self._bucket_ready = {}  # bucket index -> CUDA event after its all-gather (GPU)
        # False: every collective is skipped (bench's "same step without communication", which
        # measures how much of the step the collectives expose; training never turns it off)
        self.communicate = True

    @property
    def world(self):
        return self.comm.world

    @property
    def rank(self):
        return self.comm.rank

    def owned_by(self, rank):
        """[(start, end)] of the flat buffers `rank` updates, ascending, neighbours merged."""
        return [(0, self.total)] if self.zero_stage == 0 else self.shard_of(rank)

    def shard_of(self, rank):
        """[(start, end)] that `rank` owns under ZeRO-1 (whatever this run's zero_stage: the
        global norm is summed over these pieces in both stages, so both clip alike)."""
        pieces = []
        for bucket in self.buckets:
            for start, end, part in bucket.splits:
                lo = start + rank * part
                hi = end if rank == self.world - 1 else lo + part
                if lo < hi:
                    pieces.append((lo, hi))
        merged = []
        for lo, hi in sorted(pieces):
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return merged

    def owned_in(self, bucket):
        """[(start, end, state offset)]: this rank's parts of `bucket` and where their AdamW
        state lives."""
        out = []
        for start, end in bucket.ranges:
            for i, (lo, hi) in enumerate(self.owned):
                s, e = max(start, lo), min(end, hi)
                if s < e:
                    out.append((s, e, self.state_starts[i] + s - lo))
        return out

    def state_offset(self, flat):
        """Where flat element `flat` (owned by this rank) lives in its optimizer state."""
        i = bisect_right([lo for lo, _ in self.owned], flat) - 1
        lo, hi = self.owned[i]
        if not lo <= flat < hi:
            raise ValueError(f"flat element {flat} is not owned by rank {self.rank}")
        return self.state_starts[i] + flat - lo

    # ------------------------------------------------------------ the backward's hooks
    def attach(self, grads):
        """The flat gradient buffer the backward's hooks reduce (the model's)."""
        self.grads = grads

    def layer_done(self, layer):
        """The backward has finished `layer`: reduce the bucket that it completes, if any."""
        bucket = self._bucket_of_layer.get(layer)
        if bucket is not None and bucket.first_layer == layer:
            self._reduce(bucket, self.grads)

    def backward_done(self):
        """The backward has ended: reduce the last bucket, and make the step's stream wait for
        every reduction (inside the micro-step, so a captured CUDA graph holds the whole fork
        and join). The caller marks the step with `reduced_in_backward()` each time it runs."""
        self._reduce(self.buckets[-1], self.grads)
        self._join()

    def reduced_in_backward(self):
        """Called by the micro-step after a backward with these hooks ran or was replayed."""
        self._reduced_in_backward = True

    def micro_step_hooks(self, micro, accum, overlap):
        """(reduce, gather) for micro-step `micro` of `accum`, as MicroStep takes them: this
        layer on the last micro-step when its backward sums the buckets (overlap), and on the
        first when weights are still to be gathered; None otherwise (and while collectives are
        off: a captured graph would hold them)."""
        if not self.communicate:
            return None, None
        reduce = self if overlap and micro == accum - 1 else None
        gather = self if micro == 0 and self._gather_pending else None
        return reduce, gather

    # ------------------------------------------------------------ the step
    def reduce_gradients(self, grads):
        """Sum the gradients over ranks: this rank's parts (zero_stage 1) or everything (0).
        After a backward that already did (the hooks above), this only hands the reduction to the
        watchdog; otherwise every bucket is reduced now."""
        if self._reduced_in_backward:
            self._reduced_in_backward = False
            if self.communicate:
                self.comm.watch("gradient reduction (during the backward)")
            return
        for bucket in self.buckets:
            self._reduce(bucket, grads)
        self._join()

    def weights_updated(self, bucket, params):
        """The optimizer has updated this rank's parts of `bucket`: all-gather the bucket's new
        weights while the next bucket is updated (zero_stage 1; every rank calls this for every
        bucket, in update_order)."""
        if self.zero_stage != 1 or not self.communicate or self._deferring():
            return
        self._sent.add(bucket.index)
        self._all_gather(bucket, params)

    def gather_weights(self, params):
        """After the update: every rank's parts of the working weights on every rank. Sends what
        weights_updated has not yet sent, then makes the step's stream wait for all of it; with
        gather_in_forward, only marks the weights pending for the next forward."""
        if self._deferring() and self.communicate:
            self._gather_pending = True
            return
        if self.zero_stage == 1 and self.communicate:
            for bucket in self.update_order:
                if bucket.index not in self._sent:
                    self.weights_updated(bucket, params)
            self._join()
        self._sent.clear()

    # ------------------------------------------------------------ the weights in the next forward
    def gather_pending(self):
        return self._gather_pending

    def gather_before_forward(self, params):
        """Queue every bucket's all-gather on the communication stream, each followed by an event
        the forward waits on (inside the micro-step, so a captured CUDA graph holds it all)."""
        self._bucket_ready = {}
        for bucket in self.update_order:
            self._all_gather(bucket, params)
            if self.stream is not None:
                self._bucket_ready[bucket.index] = event = torch.cuda.Event()
                event.record(self.stream)

    def layer_needed(self, layer):
        """The forward is about to use layer `layer`'s weights (None: the embeddings and the
        small tensors, before the encoder): wait for the bucket that holds them."""
        bucket = self.buckets[-1] if layer is None else self._bucket_of_layer[layer]
        event = self._bucket_ready.get(bucket.index)
        if event is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(event)

    def forward_done(self):
        """Join the communication stream (every bucket has been waited on by now)."""
        self._join()

    def gathered_in_forward(self):
        """Called by the micro-step after a forward with these hooks ran or was replayed."""
        self._gather_pending = False

    def complete_gather(self, params):
        """Pending weights gathered now, before anything outside a training step reads them."""
        if self._gather_pending:
            for bucket in self.update_order:
                self._all_gather(bucket, params)
            self._join()
            self._gather_pending = False

    def sum_over_ranks(self, tensor):
        """A small per-rank statistic (the shards' squared gradient norms) summed in place."""
        if self.communicate:
            self.comm.all_reduce(tensor)

    # ------------------------------------------------------------ helpers
    def _deferring(self):
        return self.gather_in_forward and self.zero_stage == 1 and self.world > 1

    def _all_gather(self, bucket, params):
        if self.world == 1:
            return
        W, r = self.world, self.rank
        with self._on_comm_stream():
            with self.comm.group(f"weight all-gather, bucket {bucket.index}"):
                for start, end, part in bucket.splits:
                    if part:
                        whole = params[start:start + W * part]
                        self.comm.all_gather(whole, whole[r * part:(r + 1) * part])
                    if start + W * part < end:  # the uneven remainder, the last rank's
                        self.comm.broadcast(params[start + W * part:end], root=W - 1)

    def _reduce(self, bucket, grads):
        if not self.communicate or self.world == 1:  # a sum over one rank
            return
        W, r = self.world, self.rank
        with self._on_comm_stream():
            with self.comm.group(f"gradient reduction, bucket {bucket.index}"):
                for start, end, part in bucket.splits:
                    if self.zero_stage == 0:
                        self.comm.all_reduce(grads[start:end])
                        continue
                    if part:
                        whole = grads[start:start + W * part]
                        self.comm.reduce_scatter(whole[r * part:(r + 1) * part], whole)
                    if start + W * part < end:
                        self.comm.all_reduce(grads[start + W * part:end])

    def _on_comm_stream(self):
        """Collectives after everything queued so far on the step's stream, on the
        communication stream (GPU), or inline (CPU, or one GPU)."""
        if self.stream is None:
            return nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        return torch.cuda.stream(self.stream)

    def _join(self):
        if self.stream is not None and self.communicate:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
