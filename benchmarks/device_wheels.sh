#!/usr/bin/env bash
# The wheels a device call needs beside the GPU image's own packages, into ./.whl (run from the
# repo root, before the first call; the call then takes carry [".whl"] and device_run.sh installs
# them): hydra-core and wandb with their missing dependencies (shared/tools/device-wheels.sh), and
# the cuda13 extra's three libraries the image lacks, without dependencies, so that the image's own
# cuda-bindings stay the ones they load beside (a call without them stops at the first matmul:
# "backend=cuda needs nvmath-python"; without nvidia-ml-py, bench reports no SM clock).
set -euo pipefail
bash ../shared/tools/device-wheels.sh hydra-core wandb
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  "nvmath-python==1.0.0" "nvidia-cudnn-frontend==1.32.0" "nvidia-ml-py>=12"
ls .whl | grep -E "nvmath|cudnn_frontend|nvidia_ml_py|hydra|wandb"
