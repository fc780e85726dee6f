"""StoreComm: CPU collectives through the rendezvous store, for runs started without MPI on CPUs
(tests, debugging a multi-rank run on a laptop). Every tensor goes through the store whole, so
this is for small models only; GPU runs without MPI use NcclComm with the store carrying only
the NCCL id.

Sums run in rank order 0, 1, ..., world-1 on the same dtype, so a rank's result does not depend
on which rank computes it; with two ranks a + b equals MPI's b + a bit for bit (addition is
commutative), which is what lets a run started without mpirun match the mpirun run exactly."""
import base64

import numpy as np
import torch

from distgpt.parallel.comm import Communicator


def _encode(tensor):
    array = _numpy(tensor)
    return [str(array.dtype), base64.b64encode(array.tobytes()).decode()]


def _decode(message):
    dtype, data = message
    return np.frombuffer(base64.b64decode(data), dtype=dtype)


def _numpy(tensor):
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("StoreComm moves contiguous CPU tensors only")
    if tensor.dtype == torch.bfloat16:
        raise ValueError("StoreComm cannot sum bfloat16 tensors; run the CPU path in float32")
    return tensor.numpy()


class StoreComm(Communicator):
    def __init__(self, control):
        self.control, self.rank, self.world = control, control.rank, control.world

    def _sum(self, tensor):
        parts = [_decode(m) for m in self.control.allgather(_encode(tensor))]
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        return total

    def all_reduce(self, tensor):
        _numpy(tensor)[:] = self._sum(tensor)

    def reduce(self, tensor, root):
        total = self._sum(tensor)
        if self.rank == root:
            _numpy(tensor)[:] = total

    def reduce_scatter(self, out, tensor):
        n = out.numel()
        total = self._sum(tensor)  # before writing out: out may be this rank's slice of tensor
        _numpy(out)[:] = total[self.rank * n:(self.rank + 1) * n]

    def all_gather(self, out, tensor):
        parts = [_decode(m) for m in self.control.allgather(_encode(tensor))]
        _numpy(out)[:] = np.concatenate(parts)

    def broadcast(self, tensor, root=0):
        message = self.control.bcast(_encode(tensor) if self.rank == root else None, root)
        if self.rank != root:
            _numpy(tensor)[:] = _decode(message)

    def broadcast_object(self, obj, root=0):
        return self.control.bcast(obj, root)

    def all_gather_object(self, obj):
        return self.control.allgather(obj)

    def barrier(self):
        self.control.barrier()
