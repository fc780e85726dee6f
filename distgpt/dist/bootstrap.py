"""Who am I, how many are we, and how do we talk: built once at start, passed explicitly.

A plain `python`/`distgpt` start is world size 1 and never touches MPI. Under a launcher
(mpirun, mpiexec, srun --mpi=pmix) the ranks find each other through mpi4py.
"""
import os
from dataclasses import dataclass

import torch

from distgpt.dist.comm import Communicator, LocalComm, MpiComm

# variables that MPI launchers set in every rank's environment
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS",
                      "HYDRA_CONTROL_FD", "PMI_RANK")


@dataclass
class DistState:
    rank: int
    world: int
    local_rank: int
    comm: Communicator
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in LAUNCHER_VARIABLES)


def launcher_rank() -> int:
    """This process's rank as the launcher set it, readable before MPI starts (so a config
    error, found before bootstrap, is printed by rank 0 alone)."""
    for name in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def bootstrap(device: str, comm_timeout_s: float = 600.0) -> DistState:
    """device: 'cpu' or 'cuda' (already resolved from 'auto' by the caller). One rank per GPU:
    each takes GPU `local_rank` of its node."""
    if not launched_by_mpi():
        dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        if device == "cuda":
            torch.cuda.set_device(dev)
        return DistState(0, 1, 0, LocalComm(), dev)
    from mpi4py import MPI
    world_comm = MPI.COMM_WORLD
    local_rank = world_comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    rank, world = world_comm.Get_rank(), world_comm.Get_size()
    if world == 1:
        comm = LocalComm()
    elif device == "cuda":
        comm = None  # built below, once this rank has its GPU
    else:
        comm = MpiComm(world_comm, timeout_s=comm_timeout_s)
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} has local rank {local_rank} but this node shows "
                               f"{torch.cuda.device_count()} GPU(s); start at most one rank per GPU")
        torch.cuda.set_device(dev)
        if world > 1:
            from distgpt.dist.nccl import NcclComm
            comm = NcclComm(world_comm, dev, timeout_s=comm_timeout_s)
    return DistState(rank, world, local_rank, comm, dev)
