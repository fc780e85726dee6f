"""Drills for the distributed path under `mpirun -np 2`, on CPUs (MpiComm) or GPUs (NCCL).

    python benchmarks/failure_drill.py --out /tmp/drill [--gpu] [--transport]

failure drill (always):
  full     an uninterrupted run of --steps steps, checkpoint every --checkpoint-every
  killed   the same run; rank 1 gets SIGKILL once step --fault-at is logged. Every rank must end,
           non-zero, within comm_timeout_s.
  resumed  `resume=auto` on the killed run: its losses must equal the full run's bit for bit
  hung     the same run; rank 1 gets SIGSTOP instead (a hang, not a death): rank 0's watchdog
           must end the job within comm_timeout_s, naming the rank and the operation.
transport drill (--transport, GPUs): the same training on NCCL's default transports (NVLink)
  and forced onto its socket transport over loopback, as two nodes talk; both must train alike.

Prints one JSON line per run and a table last; exits 1 if a check fails."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

CPU_RUN = ["+run=debug_cpu", "model.n_layer=2", "model.n_embd=64", "model.n_head=2",
           "train.micro_batch=2", "train.seq_len=32", "train.sample_every=0", "train.val_every=0"]
# deterministic=true: the run must resume bit for bit (cuDNN's attention backward would not)
GPU_RUN = ["+run=single_gpu", "deterministic=true", "train.micro_batch=8", "train.seq_len=1024", "train.recompute=1",
           "train.sample_every=0", "train.val_every=0"]
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# two ranks talking as two nodes would: no NVLink/PCIe peer access, no shared memory, TCP over lo
SOCKET_ENV = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1",
              "NCCL_NET": "Socket", "NCCL_SOCKET_IFNAME": "lo", "NCCL_DEBUG": "INFO",
              "NCCL_DEBUG_SUBSYS": "INIT,NET"}


class Drill:
    def __init__(self, a):
        self.a, self.out = a, Path(a.out)
        self.base = (GPU_RUN if a.gpu else CPU_RUN) + [
            f"out_dir={self.out}", f"train.max_steps={a.steps}", f"train.checkpoint_every={a.checkpoint_every}",
            f"train.keep_checkpoints=100", "train.log_every=10", f"comm_timeout_s={a.timeout}"]

    def command(self, name, extra_env, *overrides):
        mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
        env_names = ["DISTGPT_DRILL_TAG", "PYTHONPATH", "WANDB_MODE", *NCCL_ENV, *extra_env]
        exports = [x for n in env_names for x in ("-x", n)]
        return [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "--bind-to", "none", *exports,
                sys.executable, "-m", "distgpt", "train", *self.base, f"name={name}", *overrides]

    def start(self, name, extra_env=None, *overrides):
        extra_env = extra_env or {}
        tag = uuid.uuid4().hex
        env = dict(os.environ, DISTGPT_DRILL_TAG=tag, WANDB_MODE="offline", PYTHONPATH=os.environ.get("PYTHONPATH", ""),
                   OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **NCCL_ENV, **extra_env)
        log = open(self.out / f"{name}.log", "a")
        proc = subprocess.Popen(self.command(name, extra_env, *overrides), env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        return proc, tag, log

    def run(self, name, extra_env=None, *overrides):
        proc, tag, log = self.start(name, extra_env, *overrides)
        rc = proc.wait(timeout=self.a.limit)
        log.close()
        return rc

    def steps_logged(self, name):
        path = self.out / name / "metrics.jsonl"
        if not path.exists():
            return 0
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        return max([r["step"] for r in rows if "loss" in r], default=0)

    def losses(self, name):
        """step -> loss, the last logged value of each step (a resumed run re-logs the steps
        after its checkpoint)."""
        rows = [json.loads(x) for x in (self.out / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    def fault(self, name, sig):
        """Start the run, wait for step --fault-at, send `sig` to rank 1, and time the end."""
        proc, tag, log = self.start(name)
        deadline = time.time() + self.a.limit
        while self.steps_logged(name) < self.a.fault_at:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{name}: the run ended (rc {proc.returncode}) before step {self.a.fault_at}")
            time.sleep(0.02)
        victim = rank_pid(tag, 1)
        os.kill(victim, sig)
        hit, step = time.time(), self.steps_logged(name)
        try:
            rc = proc.wait(timeout=self.a.timeout + 60)
        except subprocess.TimeoutExpired:
            rc = None
        ended_s = time.time() - hit
        time.sleep(1.0)
        leftover = rank_pids(tag)
        for pid in leftover:  # whatever mpirun left behind must not outlive the drill
            os.kill(pid, signal.SIGKILL)
        log.close()
        text = (self.out / f"{name}.log").read_text(errors="replace")
        message = next((line for line in text.splitlines() if "did not complete within" in line), "")
        launcher = next((line for line in text.splitlines() if "exited on signal" in line), "")
        return {"run": name, "signal": signal.Signals(sig).name, "at_step": step, "rc": rc,
                "ended_after_s": round(ended_s, 1), "watchdog_message": message.strip()[:300],
                "launcher_message": launcher.strip()[:300], "leftover_ranks": len(leftover)}


def rank_pids(tag):
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"DISTGPT_DRILL_TAG={tag}".encode() in env and any(e.startswith(b"OMPI_COMM_WORLD_RANK=") for e in env):
                pids.append(int(entry.name))
    return pids


def rank_pid(tag, rank):
    for pid in rank_pids(tag):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return pid
    raise SystemExit(f"no process of rank {rank} found")


def failure_drill(d, results):
    a = d.a
    rc = d.run("full")
    if rc != 0:
        raise SystemExit(f"the uninterrupted run failed (rc {rc}); see {d.out / 'full.log'}")
    results.append({"run": "full", "rc": rc, "steps": d.steps_logged("full")})
    killed = d.fault("killed", signal.SIGKILL)
    results.append(killed)
    rc = d.run("killed")  # resume=auto is the default
    full, resumed = d.losses("full"), d.losses("killed")
    same = [s for s in full if resumed.get(s) == full[s]]
    results.append({"run": "resumed", "rc": rc, "steps": len(resumed), "steps_equal_to_full": len(same),
                    "bitwise_equal": rc == 0 and len(same) == len(full) == a.steps})
    hung = d.fault("hung", signal.SIGSTOP)
    results.append(hung)
    checks = {
        "kill: every rank ended non-zero within the timeout":
            killed["rc"] not in (0, None) and killed["ended_after_s"] <= a.timeout + 5
            and killed["leftover_ranks"] == 0,
        "hang: watchdog ended the job within the timeout, naming rank and operation":
            hung["rc"] not in (0, None) and hung["ended_after_s"] <= a.timeout + 15
            and "rank 0:" in hung["watchdog_message"] and hung["leftover_ranks"] == 0,
        "resume after the kill: losses bitwise equal to the uninterrupted run": results[-2]["bitwise_equal"],
    }
    return checks


def transport_drill(d, results):
    d.run("nvlink")
    rc = d.run("socket", SOCKET_ENV)
    text = (d.out / "socket.log").read_text(errors="replace")
    socket_lines = sum("via NET/Socket" in line for line in text.splitlines())
    p2p_lines = sum("via P2P" in line or "via SHM" in line for line in text.splitlines())
    nvlink, socket = d.losses("nvlink"), d.losses("socket")
    worst = max(abs(socket[s] - nvlink[s]) / abs(nvlink[s]) for s in nvlink)
    results.append({"run": "socket", "rc": rc, "channels_via_socket": socket_lines, "channels_via_p2p_or_shm": p2p_lines,
                    "first_loss": socket[1], "last_loss": socket[max(socket)], "nvlink_last_loss": nvlink[max(nvlink)],
                    "max_rel_loss_diff": worst})
    return {"socket transport: NCCL used NET/Socket only and trained like NVLink (loss within 1%)":
            rc == 0 and socket_lines > 0 and p2p_lines == 0 and worst < 0.01
            and socket[max(socket)] < socket[1] - 1.0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--gpu", action="store_true", help="GPT-2 124M on two GPUs (NCCL); default: CPUs (MPI)")
    p.add_argument("--transport", action="store_true", help="also the socket-transport drill (GPUs)")
    p.add_argument("--no-failure", action="store_true", help="skip the kill/hang/resume drill")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fault-at", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--timeout", type=float, default=15.0, help="comm_timeout_s of the runs")
    p.add_argument("--limit", type=float, default=300.0, help="seconds any one run may take")
    a = p.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    d, results, checks = Drill(a), [], {}
    if not a.no_failure:
        checks.update(failure_drill(d, results))
    if a.transport:
        checks.update(transport_drill(d, results))
    for r in results:
        print(json.dumps(r), flush=True)
    print("\n| check | result |\n|---|---|")
    for name, ok in checks.items():
        print(f"| {name} | {'PASS' if ok else 'FAIL'} |")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
