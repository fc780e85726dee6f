"""One communicator interface for the trainer, whatever carries the bytes.

All collectives are sums over ranks and work in place on flat tensors:
    all_reduce(t)            t = sum over ranks of t
    reduce(t, root)          root's t = sum over ranks of t (the others' t unchanged)
    reduce_scatter(out, t)   out = rank's 1/world slice of sum over ranks of t
    all_gather(out, t)       out = concatenation over ranks of t (t is out's rank slice or a copy)
    broadcast(t, root)       t = root's t
    broadcast_object(o, root), all_gather_object(o)   small JSON-able objects (control messages)
    barrier()
    with group(name): ...    the collectives inside progress together (NCCL's group calls)
    watch(name)              the watchdog follows everything queued so far under `name`
    synchronize(event=None)  the host waits for the queued collectives, or up to one CUDA event
                             (the watchdog sees a hang)
On GPUs the collectives are queued on the current stream and return at once; on CPUs they
complete before returning. LocalComm is world size 1 (everything is a copy or nothing); MpiComm moves CPU tensors through
mpi4py, so the whole trainer runs under `mpirun` on a laptop and in CI. The trainer never
knows which one it holds.
"""
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch


class Communicator:
    rank = 0
    world = 1

    def all_reduce(self, tensor):
        raise NotImplementedError

    def reduce(self, tensor, root):
        raise NotImplementedError

    def reduce_scatter(self, out, tensor):
        raise NotImplementedError

    def all_gather(self, out, tensor):
        raise NotImplementedError

    def group(self, name):
        return nullcontext()

    def watch(self, name):
        pass

    def synchronize(self, event=None):
        """With an event (a CUDA event on this rank's stream): the host waits until it completes."""
        if event is not None:
            event.synchronize()

    def broadcast(self, tensor, root=0):
        raise NotImplementedError

    def broadcast_object(self, obj, root=0):
        raise NotImplementedError

    def all_gather_object(self, obj):
        """[every rank's obj] in rank order."""
        raise NotImplementedError

    def barrier(self):
        raise NotImplementedError


class CollectiveWatchdog:
    """Ends this process when a collective has not completed `timeout_s` after it was issued.

    A rank that died or hangs leaves its peers inside a collective for ever. Two kinds of
    collective are watched from a daemon thread, so no Python code needs to run on the main one:
    those the host waits on (`waiting_on`: MPI calls, control messages, host synchronisation) and
    those queued on the GPU without any host wait (`track(operation, event)`: NCCL collectives,
    each followed by a CUDA event the thread polls). When one is overdue, or `check_error` (NCCL's
    asynchronous error state, polled alike) reports a failure, the thread prints one line naming
    the rank and the operation, calls `abort` (NCCL: abort the communicator so the GPU stops
    waiting) and exits with code 3; mpirun / srun then end the remaining ranks."""

    EXIT_CODE = 3

    def __init__(self, rank, timeout_s, transport, abort=None, check_error=None):
        self.rank, self.timeout_s, self.transport, self.abort = rank, timeout_s, transport, abort
        self.check_error = check_error
        self._pending = None  # (operation, start time) while the host waits on a collective
        self._queued = []  # [(operation, issue time, event)] queued on the GPU, oldest first
        self._lock = threading.Lock()
        if timeout_s > 0:
            threading.Thread(target=self._watch, daemon=True, name="collective-watchdog").start()

    @contextmanager
    def waiting_on(self, operation):
        with self._lock:
            self._pending = (operation, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._pending = None

    def track(self, operation, event):
        """Watch a queued collective: `event` (anything with query() -> bool) completes with it."""
        if self.timeout_s > 0:
            with self._lock:
                self._queued.append((operation, time.monotonic(), event))

    def overdue(self, now=None):
        """The operation waited on longer than timeout_s, or None. Completed queued collectives
        are forgotten here (queued work completes in order, so polling stops at the first
        incomplete one)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._queued and self._queued[0][2].query():
                self._queued.pop(0)
            waits = [w for w in (self._pending, self._queued[0][:2] if self._queued else None) if w]
        late = [op for op, since in waits if now - since > self.timeout_s]
        return late[0] if late else None

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            error = self.check_error() if self.check_error is not None else None
            if error:
                self._fail(error)
            operation = self.overdue()
            if operation is not None:
                self._fail(f"{self.transport} {operation} did not complete within comm_timeout_s="
                           f"{self.timeout_s:g} s (another rank died or hangs)")

    # how long the abort may take before the process exits anyway
    ABORT_GRACE_S = 10.0

    def _fail(self, reason):
        print(f"distgpt: error: rank {self.rank}: {reason}; stopping every rank. Resume with "
              f"resume=auto once all ranks are healthy", file=sys.stderr, flush=True)
        if self.abort is not None:
            # NCCL's abort can itself block (seen with collectives queued in a replayed CUDA
            # graph while the peer was stopped): give it a few seconds on its own thread, then
            # exit regardless; the driver frees the GPU when the process ends
            helper = threading.Thread(target=self._try_abort, daemon=True, name="collective-abort")
            helper.start()
            helper.join(self.ABORT_GRACE_S)
        os._exit(self.EXIT_CODE)

    def _try_abort(self):
        try:
            self.abort()
        except Exception:  # the process exits next whatever happened here
            pass


class LocalComm(Communicator):
    """A single process: sums over one rank are the identity."""

    def all_reduce(self, tensor):
        pass

    def reduce(self, tensor, root):
        pass

    def reduce_scatter(self, out, tensor):
        if out.data_ptr() != tensor.data_ptr():
            out.copy_(tensor[:out.numel()])

    def all_gather(self, out, tensor):
        if out.data_ptr() != tensor.data_ptr():
            out[:tensor.numel()].copy_(tensor)

    def broadcast(self, tensor, root=0):
        pass

    def broadcast_object(self, obj, root=0):
        return obj

    def all_gather_object(self, obj):
        return [obj]

    def barrier(self):
        pass


class WatchedControl:
    """Control messages (small objects, barriers) through `self.control` (MpiControl or a
    rendezvous StoreControl), each waited on under `self.watchdog`: what MpiComm and NcclComm
    share."""

    def broadcast_object(self, obj, root=0):
        with self.watchdog.waiting_on("broadcast_object"):
            return self.control.bcast(obj, root=root)

    def all_gather_object(self, obj):
        with self.watchdog.waiting_on("all_gather_object"):
            return self.control.allgather(obj)

    def barrier(self):
        with self.watchdog.waiting_on("barrier"):
            self.control.barrier()


class MpiControl:
    """Control messages (small objects, barriers) over MPI, as NcclComm needs them: the same two
    calls StoreControl offers over a rendezvous store."""

    def __init__(self, mpi_comm):
        self.comm = mpi_comm
        self.rank, self.world = mpi_comm.Get_rank(), mpi_comm.Get_size()

    def bcast(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def barrier(self):
        self.comm.Barrier()


class MpiComm(WatchedControl, Communicator):
    """CPU tensors over MPI. Each collective names itself in any error it raises."""

    def __init__(self, mpi_comm, timeout_s=0.0):
        from mpi4py import MPI
        self._MPI = MPI
        self.comm, self.control = mpi_comm, MpiControl(mpi_comm)
        self.rank, self.world = mpi_comm.Get_rank(), mpi_comm.Get_size()
        # mpi4py releases the GIL inside blocking MPI calls, so the watchdog thread runs
        self.watchdog = CollectiveWatchdog(self.rank, timeout_s, "MPI")

    def _np(self, tensor):
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("MpiComm moves contiguous CPU tensors only")
        if tensor.dtype == torch.bfloat16:  # numpy has no bf16: move the raw 16-bit words
            raise ValueError("MpiComm cannot sum bfloat16 tensors; run the CPU path in float32")
        return tensor.numpy()

    def all_reduce(self, tensor):
        with self.watchdog.waiting_on("all_reduce"):
            self.comm.Allreduce(self._MPI.IN_PLACE, self._np(tensor), op=self._MPI.SUM)

    def reduce(self, tensor, root):
        array = self._np(tensor)
        with self.watchdog.waiting_on("reduce"):
            if self.rank == root:
                self.comm.Reduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM, root=root)
            else:
                self.comm.Reduce(array, None, op=self._MPI.SUM, root=root)

    def reduce_scatter(self, out, tensor):
        recv = np.empty(out.numel(), dtype=self._np(out).dtype)
        with self.watchdog.waiting_on("reduce_scatter"):
            self.comm.Reduce_scatter_block(self._np(tensor), recv, op=self._MPI.SUM)
        out.copy_(torch.from_numpy(recv))

    def all_gather(self, out, tensor):
        send = self._np(tensor).copy()  # tensor may alias out
        with self.watchdog.waiting_on("all_gather"):
            self.comm.Allgather(send, self._np(out))

    def broadcast(self, tensor, root=0):
        with self.watchdog.waiting_on("broadcast"):
            self.comm.Bcast(self._np(tensor), root=root)
