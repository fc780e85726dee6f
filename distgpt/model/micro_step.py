"""One training micro-step (forward with targets, then backward), run eagerly or replayed as a
CUDA graph.

Why a graph: a GPT-2 step is about 25 launches per layer (300 at 124M, 1200 at 1558M), each
costing the host 5-20 us in Python. At small batches the GPU finishes a kernel before the host
has launched the next, and waits (7.8 ms a step at 124M B=64 before graphs, most of the gap to
llm.c at B=8 and 16). A captured graph replays every launch from one call.

What makes the step capturable: every buffer is planned (parameters, gradients, activations,
kernel and library scratch), so the addresses a graph bakes in stay valid; the tokens of each
micro-step are copied into planned device buffers (`tokens`, `targets`) before the replay; no
op syncs with the host. What a replay cannot change is baked in at capture: the batch shape
and dloss (both fixed for a run), so a change of either captures a new graph.

The last micro-step of an optimizer step carries the data-parallel layer (`dp`): its backward
hands each finished layer to it, so the gradient buckets are summed over ranks on a
communication stream while the backward runs, and the step's stream waits for them before the
micro-step ends. Likewise the first micro-step of a step can carry it as `gather` (weights
still to be all-gathered, gather_in_forward): the all-gathers are queued before the forward,
which waits for each bucket before the layer that reads it. Captured, the graph holds those
collectives too (NCCL supports capture); each combination is its own cached graph.

Sequence: the first call runs eagerly (kernels compile, cuBLASLt and cuDNN plans are made),
the second captures and then replays (a capture only records), later calls replay. Replays are
the same kernels on the same addresses, so results are bitwise those of the eager step.
"""
import torch


class MicroStep:
    def __init__(self, model, use_graph):
        self.model = model
        self.use_graph = bool(use_graph) and model.device.type == "cuda"
        B, T = model.acts.B, model.acts.T
        self.tokens = torch.zeros((B, T), dtype=torch.int64, device=model.device)
        self.targets = torch.zeros((B, T), dtype=torch.int64, device=model.device)
        # (b, t, dloss, reduces?, gathers?, fresh weights?, writes matrices?) -> [captured graph or None, its
        # loss, calls]
        self.graphs = {}
        self.device = model.device
        if self.device.type == "cuda":
            # two pinned host slots, so a batch's host-to-device copy is asynchronous (a copy from
            # pageable memory would hold the host until the GPU reached it, every micro-step)
            self.pinned = [torch.empty((2, B * T), dtype=torch.int64).pin_memory() for _ in range(2)]
            self.copied = [torch.cuda.Event(), torch.cuda.Event()]
            self.slot = 0

    def __call__(self, x, y, dloss, dp=None, gather=None, fresh_weights=True, write_matrices=False):
        """Forward + backward of one micro-batch (x, y: (b, t) int64, on the device or pinned
        host memory); gradients accumulate into model.grads (write_matrices: the blocks' matrices'
        gradients are written instead, the first micro-step after GPT2.zero_grad(matrices=False)).
        Returns the mean loss as a 0-d device tensor (the graph's static output when replaying:
        read it before the next call).
        dp: the data-parallel layer on the last micro-step (its gradients are then summed over
        ranks during the backward), None on the others. gather: the data-parallel layer when the
        weights are still to be gathered (the first micro-step after a deferred update).
        fresh_weights False: the weights have not changed since the last micro-step (all but the
        first of an optimizer step), so an fp8 model reuses their fp8 copies (GPT2.forward)."""
        # a bf16 model ignores it: one graph serves every micro-step but the first (write_matrices)
        fresh_weights = bool(fresh_weights) or self.model.fp8 is None
        b, t = x.shape
        # the planned buffers' first b*t tokens, contiguous as the kernels read them
        tokens = self.tokens.view(-1)[:b * t].view(b, t)
        targets = self.targets.view(-1)[:b * t].view(b, t)
        if x.device.type == "cpu" and self.device.type == "cuda":
            self._stage(x, y, tokens, targets)
        else:
            tokens.copy_(x)
            targets.copy_(y)
        loss = self._run(tokens, targets, dloss, dp, gather, fresh_weights, bool(write_matrices))
        if dp is not None:
            dp.reduced_in_backward()
        if gather is not None:
            gather.gathered_in_forward()
        return loss

    def _run(self, tokens, targets, dloss, dp, gather, fresh_weights, write_matrices):
        args = (tokens, targets, dloss, dp, gather, fresh_weights, write_matrices)
        if not self.use_graph:
            return self._eager(*args)
        b, t = tokens.shape
        key = (b, t, float(dloss), dp is not None, gather is not None, fresh_weights, write_matrices)
        entry = self.graphs.setdefault(key, [None, None, 0])
        entry[2] += 1
        if entry[2] == 1:
            return self._eager(*args)
        if entry[0] is None:
            graph = torch.cuda.CUDAGraph()
            # thread_local: the collective watchdog's thread may query CUDA during the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                entry[1] = self._eager(*args)
            entry[0] = graph
        entry[0].replay()
        return entry[1]

    def _eager(self, tokens, targets, dloss, dp, gather, fresh_weights, write_matrices):
        if gather is None:
            loss = self.model.forward(tokens, targets, dloss, fresh_weights=fresh_weights)
        else:
            gather.gather_before_forward(self.model.params)
            loss = self.model.forward(tokens, targets, dloss, layer_needed=gather.layer_needed,
                                      fresh_weights=fresh_weights)
            gather.forward_done()
        if dp is None:
            self.model.backward(write_matrices=write_matrices)
        else:
            dp.attach(self.model.grads)
            self.model.backward(layer_done=dp.layer_done, write_matrices=write_matrices)
            dp.backward_done()
        return loss

    def _stage(self, x, y, tokens, targets):
        """CPU batch -> pinned slot -> device buffers, without waiting for the GPU (a slot is
        reused two micro-steps later, once its previous copy has completed)."""
        slot, n = self.slot, x.numel()
        self.slot ^= 1
        self.copied[slot].synchronize()
        host = self.pinned[slot]
        host[0, :n].copy_(x.reshape(-1))
        host[1, :n].copy_(y.reshape(-1))
        tokens.view(-1).copy_(host[0, :n], non_blocking=True)
        targets.view(-1).copy_(host[1, :n], non_blocking=True)
        self.copied[slot].record()
