"""NcclComm: the communicator for GPUs, over NCCL through CuPy's binding.

Rank 0 makes the NCCL unique id, the control plane (MPI, or a rendezvous store when the ranks
were started without MPI) broadcasts it, every rank builds its communicator. Each
collective is enqueued on torch's current stream (the stream the step runs on), so it orders
with our kernels without host synchronisation.

A rank that dies or hangs must not leave the others waiting forever: the host waits for each
collective under a CollectiveWatchdog, which aborts the communicator and exits naming the rank
and the operation once comm_timeout_s has passed. NCCL's asynchronous errors are checked after
each collective.
"""
import torch

from distgpt.parallel.comm import CollectiveWatchdog, Communicator

_NCCL_DTYPES = {torch.float32: "NCCL_FLOAT32", torch.bfloat16: "NCCL_BFLOAT16",
                torch.float16: "NCCL_FLOAT16", torch.float64: "NCCL_FLOAT64", torch.int64: "NCCL_INT64"}
_NCCL_ENUM = {"NCCL_FLOAT16": 6, "NCCL_FLOAT32": 7, "NCCL_FLOAT64": 8, "NCCL_BFLOAT16": 9, "NCCL_INT64": 4}


class NcclError(RuntimeError):
    pass


class NcclComm(Communicator):
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
        self.watchdog = CollectiveWatchdog(self.rank, timeout_s, "NCCL", abort=self.comm.abort)

    def _run(self, name, fn):
        """Enqueue a collective and wait for it, so the watchdog can see a hang. Waiting costs
        little: the trainer synchronises on each step's loss anyway."""
        stream = torch.cuda.current_stream(self.device)
        try:
            with self.watchdog.waiting_on(name):
                fn(stream.cuda_stream)
                stream.synchronize()
            error = self.comm.check_async_error() if hasattr(self.comm, "check_async_error") else None
            if error:
                raise NcclError(f"rank {self.rank}: NCCL {name} failed asynchronously (code {error})")
        except self._nccl.NcclError as exc:
            raise NcclError(f"rank {self.rank}: NCCL {name} failed: {exc}") from None

    def _dtype(self, tensor):
        name = _NCCL_DTYPES.get(tensor.dtype)
        if name is None:
            raise NcclError(f"NCCL: unsupported dtype {tensor.dtype}")
        return getattr(self._nccl, name, _NCCL_ENUM[name])

    # ------------------------------------------------------------ collectives
    def all_reduce(self, tensor):
        self._run("all_reduce", lambda s: self.comm.allReduce(
            tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), self._dtype(tensor), self._nccl.NCCL_SUM, s))

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

    def broadcast_object(self, obj, root=0):
        with self.watchdog.waiting_on("broadcast_object"):
            return self.control.bcast(obj, root=root)

    def all_gather_object(self, obj):
        with self.watchdog.waiting_on("all_gather_object"):
            return self.control.allgather(obj)

    def barrier(self):
        torch.cuda.current_stream(self.device).synchronize()
        with self.watchdog.waiting_on("barrier"):
            self.control.barrier()
