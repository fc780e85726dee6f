#!/usr/bin/env bash
# GPT-2 124M on one GPU, tracked as a user would watch it: W&B offline, val loss and HellaSwag
# every 50 steps, samples; then `distgpt eval hellaswag` on the final checkpoint. The run
# directory (minus checkpoints) is copied to $OUT for plotting.
#   benchmarks/run_124m_tracked.sh       (needs data/hellaswag_val.jsonl: ../shared/data/ has it)
set -uo pipefail
OUT=${OUT:-/tmp/distgpt-out}; mkdir -p "$OUT"
export WANDB_MODE=offline PYTHONUNBUFFERED=1
python3 -m distgpt train +run=single_gpu name=gpt2_124m_tracked out_dir=/tmp/runs wandb=true \
    train.max_steps=${STEPS:-200} train.val_every=50 train.hellaswag_every=50 train.sample_every=100 \
    hellaswag_path=data/hellaswag_val.jsonl 2>&1 | grep -v -i "warn" | tee "$OUT/train.log" | grep -v "^wandb" | tail -40
python3 -m distgpt eval hellaswag /tmp/runs/gpt2_124m_tracked --file data/hellaswag_val.jsonl --limit 2000 2>&1 | tail -2
(cd /tmp/runs && find gpt2_124m_tracked -maxdepth 4 | sort | head -60) > "$OUT/layout.txt"
cp /tmp/runs/gpt2_124m_tracked/metrics.jsonl /tmp/runs/gpt2_124m_tracked/wandb_id.txt "$OUT/"
tar czf "$OUT/wandb.tgz" -C /tmp/runs/gpt2_124m_tracked wandb
