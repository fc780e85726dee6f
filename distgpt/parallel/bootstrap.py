"""Who am I, how many are we, and how do we talk: built once at start, passed explicitly.

A plain `python`/`distgpt` start is world size 1 and never touches MPI. Under an MPI launcher
(mpirun, mpiexec, srun --mpi=pmix) the ranks find each other through mpi4py. Without one (a
bare `srun` on a Slurm without PMIx, or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK),
`rendezvous=file:DIR|tcp:HOST:PORT` names where they meet: rank, world and local rank come from
the environment, and rank 0's NCCL id reaches the others through the rendezvous store
(parallel/rendezvous.py). Nothing but that id and a few control messages goes through the store.
"""
import os
import socket
from dataclasses import dataclass

import torch

from distgpt.config import ConfigError
from distgpt.parallel.comm import Communicator, LocalComm, MpiComm, MpiControl

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
    nodes: int = 1  # distinct hosts among the ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# (rank, world, local rank) variables of launchers that do not start MPI: torchrun's and
# similar, then Slurm's own (srun without PMIx). Read only when rendezvous= is set: a batch
# script's shell also carries SLURM_* variables, and must stay one process.
ENVIRONMENT_RANKS = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in LAUNCHER_VARIABLES)


def environment_ranks(environ=os.environ):
    """(rank, world, local rank) from the first launcher convention fully present, else None."""
    for names in ENVIRONMENT_RANKS:
        values = [environ.get(n, "") for n in names]
        if all(v.isdigit() for v in values):
            rank, world, local = (int(v) for v in values)
            if not 0 <= rank < world:
                raise ConfigError(f"{names[0]}={rank} is not a rank of {names[1]}={world}; check the launcher")
            return rank, world, local
    return None


def launcher_rank() -> int:
    """This process's rank as the launcher set it, readable before MPI starts (so a config
    error, found before bootstrap, is printed by rank 0 alone)."""
    for name in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def bootstrap(device: str, comm_timeout_s: float = 600.0, rendezvous: str = "") -> DistState:
    """device: 'cpu' or 'cuda' (already resolved from 'auto' by the caller). One rank per GPU:
    each takes GPU `local_rank` of its node. rendezvous: '' (MPI or one process) or where ranks
    started without MPI meet (file:DIR | tcp:HOST:PORT)."""
    if launched_by_mpi():
        from mpi4py import MPI
        world_comm = MPI.COMM_WORLD
        local_rank = world_comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        rank, world = world_comm.Get_rank(), world_comm.Get_size()
        control = MpiControl(world_comm)
        cpu_comm = (lambda: MpiComm(world_comm, timeout_s=comm_timeout_s))
    else:
        ranks = environment_ranks() if rendezvous else None
        if ranks is None:
            if rendezvous:
                raise ConfigError(f"rendezvous={rendezvous} but no launcher set this process's rank: set "
                                 f"RANK, WORLD_SIZE and LOCAL_RANK (or start it with srun)")
            if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] not in ("", "1"):
                raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but no MPI: name where the ranks "
                                 f"meet with rendezvous=file:DIR or rendezvous=tcp:HOST:PORT")
            dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
            if device == "cuda":
                torch.cuda.set_device(dev)
            return DistState(0, 1, 0, LocalComm(), dev)
        from distgpt.parallel.rendezvous import StoreControl, open_store
        from distgpt.parallel.store_comm import StoreComm
        rank, world, local_rank = ranks
        control = StoreControl(open_store(rendezvous, rank, comm_timeout_s), rank, world)
        cpu_comm = (lambda: StoreComm(control))
    if world == 1:
        comm = LocalComm()
    elif device == "cuda":
        comm = None  # built below, once this rank has its GPU
    else:
        comm = cpu_comm()
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} has local rank {local_rank} but this node shows "
                               f"{torch.cuda.device_count()} GPU(s); start at most one rank per GPU")
        torch.cuda.set_device(dev)
        if world > 1:
            from distgpt.parallel.nccl import NcclComm
            comm = NcclComm(control, dev, timeout_s=comm_timeout_s)
    nodes = len(set(comm.all_gather_object(socket.gethostname()))) if world > 1 else 1
    return DistState(rank, world, local_rank, comm, dev, nodes)
