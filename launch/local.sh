#!/usr/bin/env bash
# One process: the CPU (reference backend) or one GPU (cuda backend). Extra args are Hydra overrides.
#   launch/local.sh +run=debug_cpu
#   launch/local.sh model=gpt2_124m +run=single_gpu
set -euo pipefail
exec distgpt train "$@"
