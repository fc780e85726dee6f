#!/usr/bin/env bash
# One machine, N ranks (one per GPU, or CPU ranks for the reference backend).
#   NPROC=8 launch/mpirun_node.sh model=gpt2_124m +run=repro_gpt2_124m
#   NPROC=2 launch/mpirun_node.sh +run=debug_cpu            # CPU ranks over MPI
set -euo pipefail
NPROC=${NPROC:-8}
source "$(dirname "$0")/nccl.env"
exec mpirun -np "$NPROC" --bind-to none -x NCCL_NVLS_ENABLE -x PATH -x LD_LIBRARY_PATH \
    distgpt train "$@"
