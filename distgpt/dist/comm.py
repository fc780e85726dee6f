"""One communicator interface for the trainer, whatever carries the bytes.

All collectives are sums over ranks and work in place on flat tensors:
    all_reduce(t)            t = sum over ranks of t
    reduce_scatter(out, t)   out = rank's 1/world slice of sum over ranks of t
    all_gather(out, t)       out = concatenation over ranks of t (t is out's rank slice or a copy)
    broadcast(t, root)       t = root's t
    barrier()
LocalComm is world size 1 (everything is a copy or nothing); MpiComm moves CPU tensors through
mpi4py, so the whole trainer runs under `mpirun` on a laptop and in CI. The trainer never
knows which one it holds.
"""
import numpy as np
import torch


class Communicator:
    rank = 0
    world = 1

    def all_reduce(self, tensor):
        raise NotImplementedError

    def reduce_scatter(self, out, tensor):
        raise NotImplementedError

    def all_gather(self, out, tensor):
        raise NotImplementedError

    def broadcast(self, tensor, root=0):
        raise NotImplementedError

    def broadcast_object(self, obj, root=0):
        raise NotImplementedError

    def barrier(self):
        raise NotImplementedError


class LocalComm(Communicator):
    """A single process: sums over one rank are the identity."""

    def all_reduce(self, tensor):
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

    def barrier(self):
        pass


class MpiComm(Communicator):
    """CPU tensors over MPI. Each collective names itself in any error it raises."""

    def __init__(self, mpi_comm):
        from mpi4py import MPI
        self._MPI = MPI
        self.comm = mpi_comm
        self.rank, self.world = mpi_comm.Get_rank(), mpi_comm.Get_size()

    def _np(self, tensor):
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("MpiComm moves contiguous CPU tensors only")
        if tensor.dtype == torch.bfloat16:  # numpy has no bf16: move the raw 16-bit words
            raise ValueError("MpiComm cannot sum bfloat16 tensors; run the CPU path in float32")
        return tensor.numpy()

    def all_reduce(self, tensor):
        self.comm.Allreduce(self._MPI.IN_PLACE, self._np(tensor), op=self._MPI.SUM)

    def reduce_scatter(self, out, tensor):
        recv = np.empty(out.numel(), dtype=self._np(out).dtype)
        self.comm.Reduce_scatter_block(self._np(tensor), recv, op=self._MPI.SUM)
        out.copy_(torch.from_numpy(recv))

    def all_gather(self, out, tensor):
        send = self._np(tensor).copy()  # tensor may alias out
        self.comm.Allgather(send, self._np(out))

    def broadcast(self, tensor, root=0):
        self.comm.Bcast(self._np(tensor), root=root)

    def broadcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def barrier(self):
        self.comm.Barrier()
