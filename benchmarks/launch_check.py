"""A run started without MPI trains bitwise like the mpirun run (issue #12).

The same short GPU run (`+run=single_gpu deterministic=true`, 2 ranks, 20 steps, validation and
checkpoints every 10) three times: under `mpirun -np 2`, and as two plain processes with
RANK / WORLD_SIZE / LOCAL_RANK meeting through rendezvous=tcp: and rendezvous=file:. Every
metrics record (wall-clock fields left out) and every weight of the last checkpoint must be
equal. Prints one line per launch and exits 1 on the first difference.

    python3 benchmarks/launch_check.py [--steps 20] [--cpu]   # --cpu: the reference backend
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from determinism_check import records

GPU = ["+run=single_gpu", "deterministic=true", "train.micro_batch=8"]
CPU = ["+run=debug_cpu"]


def weights(run_dir):
    from safetensors.torch import load_file

    from distgpt import checkpoint
    return load_file(str(checkpoint.find_latest(run_dir) / checkpoint.MODEL_FILE))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cpu", action="store_true")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="launch-"))
    common = [sys.executable, "-m", "distgpt", "train", *(CPU if a.cpu else GPU), f"train.max_steps={a.steps}",
              "train.val_every=10", "train.checkpoint_every=10", "train.sample_every=0", f"out_dir={root}"]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", WANDB_MODE="offline",
               OMP_NUM_THREADS="1")  # CPU ranks: one thread each, as under mpirun's core binding
    mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
    proc = subprocess.run([mpirun, "-np", "2", "--oversubscribe", "-x", "OMP_NUM_THREADS", *common, "name=mpirun"],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"mpirun run failed:\n{proc.stderr[-3000:]}")
    want_records, want_weights = records(root / "mpirun"), weights(root / "mpirun")
    print(f"mpirun: {len(want_records)} metric records", flush=True)
    for name, spec in (("tcp", "tcp:127.0.0.1:29512"), ("file", f"file:{root}/rendezvous")):
        procs = [subprocess.Popen([*common, f"name={name}", f"rendezvous={spec}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=dict(env, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                           DISTGPT_RUN_ID=name)) for r in range(2)]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                sys.exit(f"{name} rendezvous run failed:\n{err[-3000:]}")
        got_records, got_weights = records(root / name), weights(root / name)
        if got_records != want_records:
            first = next(i for i, (x, y) in enumerate(zip(got_records, want_records)) if x != y)
            sys.exit(f"rendezvous={name}: metric record {first} differs from the mpirun run: "
                     f"{got_records[first]} vs {want_records[first]}")
        if got_weights.keys() != want_weights.keys() or any(not got_weights[k].equal(want_weights[k])
                                                            for k in want_weights):
            sys.exit(f"rendezvous={name}: final weights differ from the mpirun run")
        print(f"rendezvous={spec.split(':')[0]}: {len(got_records)} metric records and "
              f"{len(got_weights)} weight tensors bitwise equal to the mpirun run", flush=True)


if __name__ == "__main__":
    main()
