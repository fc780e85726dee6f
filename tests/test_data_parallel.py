"""The data-parallel layer's bookkeeping (buckets, the pieces each rank owns, the update order)
and the collective watchdog's event tracking, on CPU without any launcher. The collectives
themselves run under mpirun in test_distributed.py."""
import time

import pytest
import torch

from distgpt.config import ModelConfig, OptimConfig
from distgpt.backends import reference
from distgpt.model.gpt2 import GPT2
from distgpt.model.layout import ParameterLayout
from distgpt.optim import ShardedAdamW
from distgpt.parallel.comm import CollectiveWatchdog, LocalComm
from distgpt.parallel.buckets import make_buckets
from distgpt.parallel.data_parallel import DataParallel, gather_in_forward_wanted, overlap_wanted


class FakeComm(LocalComm):
    """A communicator that only says which rank of how many it is, and records what it is asked."""

    def __init__(self, rank, world):
        self.rank, self.world, self.calls = rank, world, []

    def reduce(self, tensor, root):
        self.calls.append(("reduce", tensor.data_ptr(), tensor.numel(), root))

    def broadcast(self, tensor, root=0):
        self.calls.append(("broadcast", tensor.data_ptr(), tensor.numel(), root))

    def all_reduce(self, tensor):
        self.calls.append(("all_reduce", tensor.data_ptr(), tensor.numel(), None))

    def reduce_scatter(self, out, tensor):
        assert out.data_ptr() == tensor.data_ptr() + self.rank * out.numel() * out.element_size()
        self.calls.append(("reduce_scatter", tensor.data_ptr(), tensor.numel(), None))

    def all_gather(self, out, tensor):
        assert tensor.data_ptr() == out.data_ptr() + self.rank * tensor.numel() * tensor.element_size()
        self.calls.append(("all_gather", out.data_ptr(), out.numel(), None))


def layout_of(n_layer=6, n_embd=64, world=1):
    return ParameterLayout(n_layer, n_embd, 1000, 1024, 64, pad_multiple=world)


@pytest.mark.parametrize("bucket_elements", [1, 50_000, 120_000, 10**9])
def test_buckets_cover_the_flat_buffer_once_in_the_backwards_order(bucket_elements):
    layout = layout_of()
    layer = 12 * 64 * 64  # one layer's four matrices: 3C*C + C*C + 4C*C + C*4C
    buckets = make_buckets(layout, bucket_elements)
    ranges = sorted(r for b in buckets for r in b.ranges)
    assert ranges[0][0] == 0 and ranges[-1][1] == layout.total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # no gap, no overlap
    firsts = [b.first_layer for b in buckets[:-1]]
    assert firsts == sorted(firsts, reverse=True) and firsts[-1] == 0 and buckets[-1].first_layer is None
    for bucket in buckets[:-1]:
        assert len(bucket.ranges) == 1
        layers = bucket.numel // layer
        assert bucket.numel == layers * layer  # whole layers
        # at least the bucket size, except the one that ends at layer 0
        assert bucket.numel >= min(bucket_elements, layer) or bucket.first_layer == 0
        assert bucket.numel - layer < bucket_elements  # no more layers than it takes
    # the last bucket: embeddings, biases, layernorms (and padding)
    assert buckets[-1].numel == layout.total - 6 * layer


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_own_one_aligned_part_of_every_range(world):
    """ZeRO-1: each bucket range splits into `world` equal parts, multiples of 8 elements, the
    remainder to the last rank; the ranks' parts tile the flat buffer exactly."""
    layout = layout_of(n_embd=48, world=world)  # 48: ranges that do not split evenly
    covered = []
    for rank in range(world):
        dp = DataParallel(FakeComm(rank, world), layout, 1, bucket_mb=50_000 * 2 / 2**20)
        for bucket in dp.buckets:
            for start, end, part in bucket.splits:
                assert part % 8 == 0 and 0 <= end - start - world * part < 8 * world
        covered += dp.owned
        assert dp.state_size == sum(e - s for s, e in dp.owned)
        assert dp.owned == sorted(dp.owned)
        at = 0
        for s, e in dp.owned:
            assert dp.state_offset(s) == at and dp.state_offset(e - 1) == at + e - s - 1
            at += e - s
    covered.sort()
    assert covered[0][0] == 0 and covered[-1][1] == layout.total
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    stage0 = DataParallel(FakeComm(0, world), layout, 0)
    assert stage0.owned == [(0, layout.total)] and stage0.shard_of(0) == DataParallel(
        FakeComm(0, world), layout, 1).owned


def test_the_backwards_hooks_reduce_each_bucket_once():
    """Every rank issues the same collectives in the same order: one reduce-scatter per bucket
    range as the backward passes each bucket's first layer, then the last bucket's; zero_stage 0
    all-reduces each range instead."""
    layout = layout_of(world=2)
    grads = torch.zeros(layout.total)
    seen = []
    for rank in (0, 1):
        comm = FakeComm(rank, 2)
        dp = DataParallel(comm, layout, 1, bucket_mb=50_000 * 2 / 2**20)
        assert len(dp.buckets) > 3
        dp.attach(grads)
        for layer in reversed(range(layout.n_layer)):
            dp.layer_done(layer)
        dp.backward_done()
        dp.reduced_in_backward()
        dp.reduce_gradients(grads)  # already done in the backward: nothing more
        expected = [("reduce_scatter", grads[s:].data_ptr(), 2 * part, None)
                    for b in dp.buckets for s, e, part in b.splits]
        assert comm.calls == expected
        seen.append(comm.calls)
    assert seen[0] == seen[1]
    comm = FakeComm(0, 2)
    dp = DataParallel(comm, layout, 0, bucket_mb=50_000 * 2 / 2**20)
    dp.reduce_gradients(grads)  # no backward hooks ran: every bucket now
    assert [c[0] for c in comm.calls] == ["all_reduce"] * sum(len(b.ranges) for b in dp.buckets)
    assert sum(c[2] for c in comm.calls) == layout.total


def test_the_optimizer_sends_each_bucket_after_updating_it():
    """After updating its parts of a bucket the rank all-gathers that bucket, in the forward's
    order (embeddings first); gather_weights then has nothing left to send."""
    cfg = ModelConfig(n_layer=4, n_head=2, n_embd=32, vocab_size=100, padded_vocab_size=128, block_size=16)
    for rank in (0, 1):
        model = GPT2(cfg, reference, 1, 8, pad_multiple=2)
        model.init_weights(0)
        model.grads.normal_()
        comm = FakeComm(rank, 2)
        dp = DataParallel(comm, model.layout, 1, bucket_mb=3000 * 4 / 2**20, element_bytes=4)
        opt = ShardedAdamW(model, dp, OptimConfig(lr=1e-3), reference)
        assert len(dp.buckets) == 5 and dp.update_order[0] is dp.buckets[-1]
        update = reference.adamw_update
        reference.adamw_update = lambda param, *a, **k: (comm.calls.append(("update", param.data_ptr())),
                                                         update(param, *a, **k))
        try:
            before = model.params.clone()
            comm.calls.clear()
            opt.step(1e-3)
        finally:
            reference.adamw_update = update
        dp.gather_weights(model.params)
        gathers = [c for c in comm.calls if c[0] == "all_gather"]
        assert gathers == [("all_gather", model.params[s:].data_ptr(), 2 * part, None)
                           for b in dp.update_order for s, e, part in b.splits]
        # each bucket's updates come right before its all-gather, and touch this rank's part of it
        base, size = model.params.data_ptr(), model.params.element_size()
        kinds = [c[0] for c in comm.calls if c[0] in ("update", "all_gather")]
        assert kinds[-1] == "all_gather" and kinds[0] == "update"
        at = 0
        for bucket in dp.update_order:
            updates = []
            while comm.calls[at][0] != "all_gather":
                if comm.calls[at][0] == "update":
                    updates.append(comm.calls[at][1])
                at += 1
            at += len(bucket.splits)
            mine = dp.owned_in(bucket)
            assert updates and all(any(base + s * size <= u < base + e * size for s, e, _ in mine) for u in updates)
        changed = (model.params != before).nonzero().flatten().tolist()
        assert changed and all(any(s <= i < e for s, e in dp.owned) for i in changed)


class FakeEvent:
    def __init__(self, done=False):
        self.done = done

    def query(self):
        return self.done


def test_the_watchdog_names_the_oldest_unfinished_collective():
    dog = CollectiveWatchdog(rank=1, timeout_s=0, transport="NCCL")  # timeout 0: no thread, polled here
    dog.timeout_s = 5.0
    first, second = FakeEvent(), FakeEvent()
    dog.track("gradient reduction, bucket 0", first)
    dog.track("weight broadcast, bucket 3", second)
    now = time.monotonic()
    assert dog.overdue(now + 1) is None
    assert dog.overdue(now + 6) == "gradient reduction, bucket 0"
    first.done = True
    assert dog.overdue(now + 6) == "weight broadcast, bucket 3"
    second.done = True
    assert dog.overdue(now + 60) is None and dog._queued == []
    with dog.waiting_on("barrier"):
        assert dog.overdue(time.monotonic() + 6) == "barrier"
    assert dog.overdue(time.monotonic() + 6) is None


def test_a_blocking_abort_does_not_keep_the_process_alive(tmp_path):
    """NCCL's abort can block; the watchdog still ends the process (exit 3) a grace period
    later, after its one line naming the rank and the operation."""
    import subprocess
    import sys
    program = (
        "import time\n"
        "from distgpt.parallel.comm import CollectiveWatchdog\n"
        "CollectiveWatchdog.ABORT_GRACE_S = 0.5\n"
        "class Never:\n"
        "    def query(self): return False\n"
        "dog = CollectiveWatchdog(rank=1, timeout_s=0.4, transport='NCCL', abort=lambda: time.sleep(60))\n"
        "dog.track('gradient reduction, bucket 2', Never())\n"
        "time.sleep(30)\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert proc.returncode == CollectiveWatchdog.EXIT_CODE
    assert time.monotonic() - started < 20
    assert ("rank 1: NCCL gradient reduction, bucket 2 did not complete within comm_timeout_s=0.4 s"
            in proc.stderr)


def test_optimizer_shards_of_one_slice_still_load():
    """Shards written when ZeRO-1 owned one contiguous slice record lo and hi; they read as one
    range, so the loader re-shards them like any other."""
    from distgpt.optim import saved_ranges
    assert saved_ranges({"lo": 10, "hi": 50, "step": 3}) == [(10, 50)]
    assert saved_ranges({"ranges": [[0, 8], [16, 40]]}) == [(0, 8), (16, 40)]


@pytest.mark.parametrize("world,zero_stage", [(1, 1), (2, 0)])
def test_with_nothing_to_send_adamw_runs_once_per_decay_kind(world, zero_stage):
    """One rank (or zero_stage 0) sends no weights, so the update is not cut into buckets: two
    segments, the tensors with weight decay and those without."""
    cfg = ModelConfig(n_layer=4, n_head=2, n_embd=32, vocab_size=100, padded_vocab_size=128, block_size=16)
    model = GPT2(cfg, reference, 1, 8, pad_multiple=world)
    dp = DataParallel(FakeComm(0, world), model.layout, zero_stage, bucket_mb=0.01, element_bytes=4)
    opt = ShardedAdamW(model, dp, OptimConfig(lr=1e-3), reference)
    assert len(dp.buckets) == 5
    (bucket, segments), = opt.pieces
    assert bucket is None and [d for _, _, _, d in segments] == [True, False]


def test_overlap_auto_means_across_a_network():
    socket_only = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}
    assert overlap_wanted("auto", nodes=2, environ={}) is True
    assert overlap_wanted("auto", nodes=1, environ={}) is False
    assert overlap_wanted("auto", nodes=1, environ=socket_only) is True
    assert overlap_wanted("auto", nodes=1, environ={"NCCL_P2P_DISABLE": "1"}) is False  # shared memory left
    assert overlap_wanted("true", nodes=1, environ={}) is True and overlap_wanted(True, 1, {}) is True
    assert overlap_wanted("False", nodes=4, environ=socket_only) is False
    with pytest.raises(ValueError, match="overlap_comm=sometimes"):
        overlap_wanted("sometimes", 1, {})
    # gather_in_forward=auto: the same test (it measured faster over the socket transport only)
    assert gather_in_forward_wanted("auto", 1, socket_only) is True and gather_in_forward_wanted("auto", 1, {}) is False
    assert gather_in_forward_wanted(True, 1, {}) is True and gather_in_forward_wanted("false", 2, {}) is False
    with pytest.raises(ValueError, match="gather_in_forward=maybe"):
        gather_in_forward_wanted("maybe", 1, {})


def test_gather_in_forward_waits_for_each_bucket_before_its_layer():
    """With gather_in_forward the update sends nothing; the next forward queues every bucket's
    all-gather first (embeddings' bucket, then layer 0 upwards) and asks for each layer's bucket
    just before the layer; complete_gather does the same at once, and only when pending."""
    cfg = ModelConfig(n_layer=4, n_head=2, n_embd=32, vocab_size=100, padded_vocab_size=128, block_size=16)
    model = GPT2(cfg, reference, 1, 8, pad_multiple=2)
    model.init_weights(0)
    comm = FakeComm(0, 2)
    dp = DataParallel(comm, model.layout, 1, bucket_mb=2 * 12288 * 4 / 2**20, element_bytes=4)
    dp.gather_in_forward = True
    assert [b.layers for b in dp.buckets] == [[2, 3], [0, 1], []]
    opt = ShardedAdamW(model, dp, OptimConfig(lr=1e-3), reference)
    model.grads.normal_()
    comm.calls.clear()
    opt.step(1e-3)
    dp.gather_weights(model.params)
    assert [c[0] for c in comm.calls] == ["all_reduce"] and dp.gather_pending()  # the norm's parts only
    comm.calls.clear()
    needed = []
    dp.gather_before_forward(model.params)
    model.forward(torch.zeros(1, 8, dtype=torch.long), layer_needed=needed.append)
    dp.gathered_in_forward()
    assert needed == [None, 0, 1, 2, 3] and not dp.gather_pending()
    gathers = [c for c in comm.calls if c[0] == "all_gather"]
    assert gathers == [("all_gather", model.params[s:].data_ptr(), 2 * part, None)
                       for b in dp.update_order for s, e, part in b.splits]
    assert dp.update_order[0] is dp.buckets[-1] and dp.update_order[1].layers == [0, 1]
    comm.calls.clear()
    dp.complete_gather(model.params)
    assert comm.calls == []  # nothing pending
    dp.gather_weights(model.params)
    dp.complete_gather(model.params)
    assert len(comm.calls) == len(gathers) and not dp.gather_pending()


def test_master_weights_convert_piece_by_piece_at_the_owned_offsets(monkeypatch):
    """bf16 parameters have masters (fp32 on the reference backend; split in 16 bits on the CUDA
    one, tested on the GPU): they start as the parameters, and write_master / master_values move
    them in pieces (a tiny MASTER_CHUNK here) to and from exactly the owned parts, end to end,
    the parameters following them and nothing outside those parts changing."""
    import distgpt.optim as optim
    monkeypatch.setattr(optim, "MASTER_CHUNK", 1000)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, padded_vocab_size=128, block_size=16)
    model = GPT2(cfg, reference, 1, 8, dtype=torch.bfloat16, pad_multiple=2)
    model.init_weights(0)
    dp = DataParallel(FakeComm(1, 2), model.layout, 1, bucket_mb=0.01, element_bytes=2)
    opt = ShardedAdamW(model, dp, OptimConfig(lr=1e-3), reference)
    owned = torch.cat([model.params[lo:hi] for lo, hi in opt.owned])
    assert len(opt.owned) > 1 and opt.master.dtype == torch.float32
    assert torch.equal(opt.master_values(), owned.float())
    values = torch.randn(len(opt.master)) * 0.02
    before = model.params.clone()
    state, meta = opt.state_dict()
    opt.load_state_dict(dict(state, master=values), dict(meta, step=5))
    assert opt.step_count == 5 and torch.equal(opt.master_values(), values)
    assert torch.equal(torch.cat([model.params[lo:hi] for lo, hi in opt.owned]), values.to(torch.bfloat16))
    outside = torch.ones(len(before), dtype=torch.bool)
    for lo, hi in opt.owned:
        outside[lo:hi] = False
    assert torch.equal(model.params[outside], before[outside]), "a parameter outside the owned parts changed"
