#!/usr/bin/env bash
# Several machines from a hostfile (lines like "node01 slots=8"); passwordless ssh between them,
# the same distgpt install and data paths on every node.
#   HOSTFILE=hosts NPROC=16 launch/mpirun_hosts.sh model=gpt2_1558m +run=repro_gpt2_1558m
set -euo pipefail
HOSTFILE=${HOSTFILE:?set HOSTFILE to a file of "host slots=GPUS" lines}
NPROC=${NPROC:?set NPROC to the total number of ranks}
source "$(dirname "$0")/nccl.env"
exec mpirun -np "$NPROC" --hostfile "$HOSTFILE" --bind-to none --map-by ppr:8:node \
    -x NCCL_SOCKET_IFNAME -x NCCL_IB_HCA -x NCCL_DEBUG -x NCCL_NVLS_ENABLE -x PATH -x LD_LIBRARY_PATH \
    distgpt train "$@"
