#!/usr/bin/env bash
# The GPT-2 1558M recipe step on one node of NP GPUs (one call on a GPU machine):
#   1. `distgpt bench` under mpirun: micro-batch 16, T=1024, 1,048,576 tokens a step
#      (accumulation 64/NP), ZeRO-1; median of 30 steps, memory per GPU, collective time.
#   2. the trainer itself (+run=repro_gpt2_1558m on Shakespeare): 2 steps and a checkpoint
#      written by NP ranks, then resume=auto on NP ranks for a third step.
#   NP=8 benchmarks/recipe_1558m.sh        (needs data/shakespeare.txt: ../shared/data/ has it)
set -uo pipefail
NP=${NP:-8}; RECOMPUTE=${RECOMPUTE:-2}; STEPS=${STEPS:-30}
ACCUM=$((64 / NP))
OUT=${OUT:-/tmp/distgpt-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 WANDB_MODE=offline
python3 benchmarks/scaling.py gpt2_1558m:16:$RECOMPUTE --gpus "$NP" --accum "$ACCUM" --steps "$STEPS" 2>&1 | tee "$OUT/recipe_bench.log"

[ -f data/shakespeare/shakespeare_train_000000.bin ] || python3 -m distgpt prepare data/shakespeare.txt --out data/shakespeare >/dev/null
MPI=(mpirun --allow-run-as-root -np "$NP" --bind-to none -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST
     -x NVSHMEM_DISABLE_NVLS -x PYTHONPATH -x WANDB_MODE -x PYTHONUNBUFFERED)
# one global batch is 1M tokens: the 150K-token val split cannot hold one, so validate on train
RUN=(model=gpt2_1558m +run=repro_gpt2_1558m data=shakespeare wandb=false out_dir=/tmp/recipe name=np$NP
     data.val=data/shakespeare/shakespeare_train_*.bin train.recompute=$RECOMPUTE train.max_steps=3
     train.val_every=0 train.sample_every=0 train.log_every=1)
"${MPI[@]}" python3 -m distgpt train "${RUN[@]}" train.stop_after=2 2>&1 | grep -v -i warn | tee "$OUT/recipe_train.log" | tail -8
"${MPI[@]}" python3 -m distgpt train "${RUN[@]}" 2>&1 | grep -v -i warn | tee "$OUT/recipe_resume.log" | tail -6
ls -la /tmp/recipe/np$NP/checkpoints/ | tee -a "$OUT/recipe_resume.log"
