"""NcclComm: the communicator for GPUs, over NCCL through CuPy's binding.

Rank 0 makes the NCCL unique id, the control plane (MPI, or a rendezvous store when the ranks
were started without MPI) broadcasts it, every rank builds its communicator. Each
collective is queued on torch's current stream (the step's stream, or the data-parallel layer's
communication stream) and returns at once: it orders with our kernels through the stream, and
the host never waits for it.

A rank that dies or hangs must not leave the others waiting forever: a CUDA event follows each
collective (or each group of them) and the CollectiveWatchdog's thread polls those events and
NCCL's asynchronous error state; once one is overdue by comm_timeout_s it aborts the
communicator and exits naming the rank and the operation. Collectives captured in a CUDA graph
cannot carry their own event; the caller watches the graph's replay instead (`watch`).
"""
from contextlib import contextmanager

import torch

from distgpt.parallel.comm import CollectiveWatchdog, Communicator, WatchedControl

_NCCL_DTYPES = {torch.float32: "NCCL_FLOAT32", torch.bfloat16: "NCCL_BFLOAT16",
                torch.float16: "NCCL_FLOAT16", torch.float64: "NCCL_FLOAT64", torch.int64: "NCCL_INT64"}
_NCCL_ENUM = {"NCCL_FLOAT16": 6, "NCCL_FLOAT32": 7, "NCCL_FLOAT64": 8, "NCCL_BFLOAT16": 9, "NCCL_INT64": 4}


class NcclError(RuntimeError):
    pass


class NcclComm(WatchedControl, Communicator):
    def __init__(self, control, device, timeout_s=600.0):
        """control: MpiControl or rendezvous.StoreControl (bcast of small objects, barrier)."""
        from cupy.cuda import nccl
        self._nccl, self.control = nccl, control
        self.rank, self.world = control.rank, control.world
        self.device, self.timeout_s = device, timeout_s
        # the id travels as its 128 values (JSON-safe for a rendezvous store); CuPy gives it as
        # bytes (a tuple of ints in older releases) and takes it back in the same form
        uid = nccl.get_unique_id() if self.rank == 0 else None
        form, values = control.bcast(None if uid is None else [type(uid).__name__, list(uid)], root=0)
        uid = bytes(values) if form == "bytes" else tuple(values)
        with torch.cuda.device(device):
            self.comm = nccl.NcclCommunicator(self.world, uid, self.rank)
        self._grouped = None  # the group's name while collectives are being grouped
        self.watchdog = CollectiveWatchdog(self.rank, timeout_s, "NCCL", abort=self.comm.abort,
                                           check_error=self._async_error)

    def _async_error(self):
        """NCCL's asynchronous error state (None when fine): polled by the watchdog's thread."""
        check = getattr(self.comm, "check_async_error", None)
        try:
            code = check() if check is not None else None
        except self._nccl.NcclError as exc:
            return f"NCCL failed asynchronously: {exc}"
        return f"NCCL failed asynchronously (code {code})" if code else None

    def _run(self, name, fn):
        """Queue a collective on the current stream; the watchdog follows it from there."""
        stream = torch.cuda.current_stream(self.device)
        try:
            fn(stream.cuda_stream)
        except self._nccl.NcclError as exc:
            raise NcclError(f"rank {self.rank}: NCCL {name} failed: {exc}") from None
        if self._grouped is None:
            self.watch(name)

    def watch(self, name):
        """Hand everything queued so far on the current stream to the watchdog as `name` (not
        while a CUDA graph is being captured: an event recorded then would never complete)."""
        if torch.cuda.is_current_stream_capturing():
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.watchdog.track(name, event)

    @contextmanager
    def group(self, name):
        """The collectives inside are one NCCL group: they progress together (several reduces
        to different roots, or broadcasts from them, as one exchange) and are watched as one."""
        if self._grouped is not None:  # nested: the outer group covers it
            yield
            return
        self._grouped = name
        self._nccl.groupStart()
        try:
            yield
        finally:
            self._grouped = None
            self._nccl.groupEnd()
        self.watch(name)

    def synchronize(self, event=None):
        """The host waits for everything queued on the current stream, or for `event` alone (a
        CUDA event recorded on it); the watchdog sees a hang."""
        with self.watchdog.waiting_on("synchronize"):
            (event or torch.cuda.current_stream(self.device)).synchronize()

    def _dtype(self, tensor):
        name = _NCCL_DTYPES.get(tensor.dtype)
        if name is None:
            raise NcclError(f"NCCL: unsupported dtype {tensor.dtype}")
        return getattr(self._nccl, name, _NCCL_ENUM[name])

    # ------------------------------------------------------------ collectives
    def all_reduce(self, tensor):
        self._run("all_reduce", lambda s: self.comm.allReduce(
            tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), self._dtype(tensor), self._nccl.NCCL_SUM, s))

    def reduce(self, tensor, root):
        # in place: NCCL allows sendbuff == recvbuff, and non-root ranks' buffers are left alone
        self._run("reduce", lambda s: self.comm.reduce(
            tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), self._dtype(tensor), self._nccl.NCCL_SUM,
            root, s))

    def reduce_scatter(self, out, tensor):
        # in place when out is this rank's slice of tensor (NCCL allows exactly that layout)
        self._run("reduce_scatter", lambda s: self.comm.reduceScatter(
            tensor.data_ptr(), out.data_ptr(), out.numel(), self._dtype(tensor), self._nccl.NCCL_SUM, s))

    def all_gather(self, out, tensor):
        self._run("all_gather", lambda s: self.comm.allGather(
            tensor.data_ptr(), out.data_ptr(), tensor.numel(), self._dtype(tensor), s))

    def broadcast(self, tensor, root=0):
        self._run("broadcast", lambda s: self.comm.bcast(
            tensor.data_ptr(), tensor.numel(), self._dtype(tensor), root, s))

    def barrier(self):
        self.synchronize()  # the GPU's queued work first, then the ranks meet
        super().barrier()
