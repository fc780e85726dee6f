#!/usr/bin/env bash
# One machine, N ranks started without MPI: each gets RANK / WORLD_SIZE / LOCAL_RANK and they
# meet through a rendezvous store (here TCP on this machine). Rank 0's output goes to the
# terminal, the others' to rank_R.log.
#   NPROC=2 launch/env_node.sh model=gpt2_124m +run=single_gpu
#   NPROC=2 launch/env_node.sh +run=debug_cpu
set -euo pipefail
NPROC=${NPROC:-8}
PORT=${PORT:-29511}
source "$(dirname "$0")/nccl.env"
pids=()
for ((r = NPROC - 1; r >= 0; r--)); do
  if [ "$r" -eq 0 ]; then
    RANK=0 WORLD_SIZE=$NPROC LOCAL_RANK=0 distgpt train rendezvous=tcp:127.0.0.1:$PORT "$@" &
  else
    RANK=$r WORLD_SIZE=$NPROC LOCAL_RANK=$r distgpt train rendezvous=tcp:127.0.0.1:$PORT "$@" \
        >"rank_$r.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done  # the first failure's code, if any
exit $status
