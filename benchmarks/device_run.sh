#!/usr/bin/env bash
# One call on a GPU machine (the device tool): install what its image lacks, run the gpu tests,
# then the throughput table against the PyTorch baseline. Logs go to $OUT; the table prints last.
# First, on this machine: benchmarks/device_wheels.sh (the wheels the image lacks; carry [".whl"]).
#   STAGE=tests|bench|parity|all  benchmarks/device_run.sh gpt2_124m:64 gpt2_350m:32 gpt2_1558m:16
#   STAGE=scaling GPUS="1 2 4"    benchmarks/device_run.sh gpt2_124m:64:2 gpt2_1558m:16:2   (mpirun, NCCL)
#   STAGE=drill                   benchmarks/device_run.sh        (kill/hang/resume + socket transport, 2 GPUs)
#   STAGE=profile [TRACE=1]       benchmarks/device_run.sh gpt2_124m:64:2 gpt2_1558m:16:2   (kernel time per step)
#   STAGE=llmc LLMC=PATH          benchmarks/device_run.sh gpt2_124m:8 gpt2_124m:64 gpt2_1558m:16:2:20   (llm.c's
#                                 train_gpt2cu, built on this machine and carried in an ignored folder, beside
#                                 distgpt: benchmarks/vs_llmc.py)
#   STAGE=shuffle [TEXT=...]      benchmarks/device_run.sh        (val loss, shuffled vs file order;
#                                 first: cp ../shared/data/shakespeare.txt benchmarks/)
#   STAGE=launch                  benchmarks/device_run.sh        (2 GPUs: rendezvous launch = mpirun, bitwise)
#   STAGE=fp8 [PROFILE=0]         benchmarks/device_run.sh gpt2_124m:64 gpt2_1558m:16:1   (the fp8 and GELU GPU
#                                 tests, then bf16 and the fp8 recipe side by side, then the fp8 profile of each
#                                 config; another fp8 setting's profile: STAGE=profile BENCH_ARGS="--fp8 ...")
#   STAGE=fp8wgrad                benchmarks/device_run.sh        (fp8 GPU tests, then 1558M B=16: bf16, fp8
#                                 with bf16 weight gradients and current scaling, fp8 with current scaling,
#                                 the recipe with fc's gradient cast apart from the GELU derivative, the
#                                 recipe (fp8 weight gradients, delayed scaling, the fused GELU cast), --accum 4)
#   STAGE=gelu8                   benchmarks/device_run.sh        (fp8 GPU tests, then 1558M B=16 fp8 with fc's
#                                 GELU output cast apart and written in fp8 by its matmul, alternated, and a profile)
#   STAGE=fp8switches             benchmarks/device_run.sh        (fp8 GPU tests, then 1558M B=16 fp8 with neither
#                                 of the layernorms writing their fp8 casts and delayed weight scales, either, both
#                                 (the default), alternated twice, and a profile of both; the loss without them:
#                                 STAGE=fp8parity PARITY_ARGS="--set deterministic=true --variant
#                                 neither=fp8=true,fp8_layernorm_cast=false,fp8_delayed_weights=false")
#   STAGE=dgelu                   benchmarks/device_run.sh gpt2_350m:32:1::2 gpt2_1558m:16:2:20   (the transposed
#                                 dGELU form: matmul/model GPU tests, the layout probe, bench without/with it,
#                                 model:batch:recompute:layers:rounds)
#   STAGE=biascolumn              benchmarks/device_run.sh gpt2_774m:32:1::2 gpt2_1558m:16:2:20:2   (the bias
#                                 gradients from the weight-gradient products: GPU tests, bias_column_probe.py,
#                                 bench --bias-column false / true alternated, model:batch:recompute:layers:rounds)
#   STAGE=fp8parity               benchmarks/device_run.sh        (val loss, fp8 against bf16, 124M and 350M;
#                                 first: cp ../shared/data/shakespeare.txt benchmarks/; more runs beside:
#                                 PARITY_ARGS="--set deterministic=true --variant current=fp8=true,fp8_scaling=current")
#   STAGE=overlap [BENCH_ARGS=--fp8] benchmarks/device_run.sh     (2 GPUs: buckets reduced during the backward
#                                 = after it, bitwise, deterministic bench losses; zero stages alike;
#                                 another bucket size adds the norm up in another order: last bits)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
OUT=${OUT:-/tmp/distgpt-out}; mkdir -p "$OUT"
STAGE=${STAGE:-all}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$STAGE" = tests ] || [ "$STAGE" = all ]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider tests ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -60
fi
if [ "$STAGE" = parity ] || [ "$STAGE" = all ]; then
  python3 benchmarks/parity_124m.py 2>&1 | tee "$OUT/parity.log" | tail -30
fi
if { [ "$STAGE" = bench ] || [ "$STAGE" = all ]; } && [ $# -gt 0 ]; then
  python3 benchmarks/throughput.py "$@" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
fi
if [ "$STAGE" = scaling ] && [ $# -gt 0 ]; then
  python3 benchmarks/scaling.py "$@" --gpus ${GPUS:-1 2} ${BENCH_ARGS:-} 2>&1 | tee "$OUT/scaling.log"
fi
if [ "$STAGE" = profile ] && [ $# -gt 0 ]; then
  for item in "$@"; do  # model:batch[:recompute[:layers]], recompute 0 when left out (as throughput.py)
    IFS=: read -r model batch recompute layers <<< "$item"
    trace=()
    [ "${TRACE:-0}" = 1 ] && trace=(--profile-trace "$OUT/trace_${model}_${batch}.json")
    python3 -m distgpt bench --model "$model" --batch "$batch" --recompute "${recompute:-0}" \
        --recompute-layers "${layers:--1}" --profile \
        "${trace[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/profile_${model}_${batch}.log"
  done
fi
if [ "$STAGE" = llmc ] && [ $# -gt 0 ]; then
  python3 benchmarks/vs_llmc.py --llmc "${LLMC:?STAGE=llmc needs LLMC=path/to/train_gpt2cu}" "$@" --logs "$OUT" \
      2>&1 | grep -v -i warn | tee "$OUT/vs_llmc.log"
fi
FP8_TESTS="tests/test_cuda_fp8.py tests/test_cuda_model.py tests/test_cuda_matmul.py tests/test_cuda_layers.py::test_gelu"
if [ "$STAGE" = fp8 ]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider $FP8_TESTS 2>&1 | tee "$OUT/fp8_tests.log" | tail -15
  python3 benchmarks/throughput.py "$@" --fp8-too --no-baseline ${BENCH_ARGS:-} 2>&1 | tee "$OUT/fp8_bench.log" \
    | grep -v '^{'
  [ "${PROFILE:-1}" = 1 ] && for item in "$@"; do
    IFS=: read -r model batch recompute layers <<< "$item"
    python3 -m distgpt bench --model "$model" --batch "$batch" --recompute "${recompute:-0}" \
        --recompute-layers "${layers:--1}" --fp8 --profile \
        2>&1 | tee "$OUT/fp8_profile_${model}_${batch}.log" | grep -v '^\s*$' | grep -v Warning | head -45
  done
fi
if [ "$STAGE" = fp8wgrad ]; then  # fp8 weight gradients: their GPU tests, then 1558M bf16 / fp8 / fp8 + wgrad
  python3 -m pytest -q -m gpu -p no:cacheprovider $FP8_TESTS 2>&1 | tee "$OUT/fp8wgrad_tests.log" | tail -15
  for args in "--recompute 1" "--fp8 --no-fp8-wgrad --fp8-scaling current --recompute 1" \
      "--fp8 --fp8-scaling current" "--fp8 --no-fp8-fuse-gelu" "--fp8" "--fp8 --accum 4"; do
    python3 -m distgpt bench --model gpt2_1558m --batch 16 --steps 20 $args ${BENCH_ARGS:-} 2>&1 \
      | grep -v Warn | tee -a "$OUT/fp8wgrad_bench.log" | grep "ms/step"
  done
fi
if [ "$STAGE" = gelu8 ]; then  # fc's GELU output in fp8 from its matmul: its GPU tests, then 1558M B=16 alternated
  python3 -m pytest -q -m gpu -p no:cacheprovider $FP8_TESTS 2>&1 | tee "$OUT/gelu8_tests.log" | tail -15
  for args in "--fp8 --no-fp8-gelu-in-matmul" "--fp8" "--fp8 --no-fp8-gelu-in-matmul" "--fp8"; do
    python3 -m distgpt bench --model gpt2_1558m --batch 16 --steps 20 $args ${BENCH_ARGS:-} 2>&1 \
      | grep -v Warn | tee -a "$OUT/gelu8_bench.log" | grep "ms/step"
  done
  python3 -m distgpt bench --model gpt2_1558m --batch 16 --steps 10 --fp8 --profile 2>&1 \
    | tee "$OUT/gelu8_profile.log" | grep -v '^\s*$' | grep -v Warning | head -40
fi
if [ "$STAGE" = fp8switches ]; then  # the layernorm casts and delayed weight scales: GPU tests, 1558M B=16 alternated
  python3 -m pytest -q -m gpu -p no:cacheprovider $FP8_TESTS 2>&1 | tee "$OUT/fp8switches_tests.log" | tail -15
  for round in 1 2; do
    for args in "--fp8 --no-fp8-layernorm-cast --no-fp8-delayed-weights" "--fp8 --no-fp8-delayed-weights" \
        "--fp8 --no-fp8-layernorm-cast" "--fp8 --fp8-layernorm-cast --fp8-delayed-weights"; do
      python3 -m distgpt bench --model gpt2_1558m --batch 16 --steps 20 $args ${BENCH_ARGS:-} 2>&1 \
        | grep -v Warn | tee -a "$OUT/fp8switches_bench.log" | grep "ms/step"
    done
  done
  python3 -m distgpt bench --model gpt2_1558m --batch 16 --steps 10 --fp8 --fp8-layernorm-cast --fp8-delayed-weights \
      --profile 2>&1 | tee "$OUT/fp8switches_profile.log" | grep -v '^\s*$' | grep -v Warning | head -40
fi
if [ "$STAGE" = dgelu ]; then  # the transposed dGELU form: its GPU tests, the layout probe, then bench without and
  # with it, alternated (ROUNDS times); "without" plans no transpose scratch, so "auto" has only the other two forms
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_matmul.py tests/test_cuda_model.py 2>&1 \
      | tee "$OUT/dgelu_tests.log" | tail -5
  python3 benchmarks/dgelu_layout_probe.py 2>&1 | grep -v -i warn | tee "$OUT/dgelu_probe.log"
  for item in "$@"; do
    IFS=: read -r model batch recompute layers rounds <<< "$item"
    args=(bench --model "$model" --batch "$batch" --recompute "${recompute:-0}" --recompute-layers "${layers:--1}")
    for _ in $(seq "${rounds:-1}"); do
      python3 -c "import sys, distgpt.backends.cuda.matmul as m; plan = m.Matmuls.plan
m.Matmuls.plan = lambda self, device, transpose_elements=0, **kw: plan(self, device, **kw)
from distgpt.cli import main; sys.exit(main(sys.argv[1:]))" "${args[@]}" 2>&1 | grep "tok/s" | sed 's/^/without: /'
      python3 -m distgpt "${args[@]}" 2>&1 | grep "tok/s" | sed 's/^/with:    /'
    done
  done 2>&1 | tee "$OUT/dgelu_bench.log"
fi
if [ "$STAGE" = biascolumn ]; then  # the fc and qkv bias gradients from the weight-gradient products: their GPU
  # tests, the probe (PROBE_ARGS, e.g. --models gpt2_774m:32), then bench with the column sums and with the ones
  # columns, alternated (ROUNDS times)
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_matmul.py tests/test_cuda_model.py \
      tests/test_cuda_layers.py 2>&1 | tee "$OUT/biascolumn_tests.log" | tail -5
  python3 benchmarks/bias_column_probe.py ${PROBE_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/biascolumn_probe.log"
  for item in "$@"; do
    IFS=: read -r model batch recompute layers rounds <<< "$item"
    args=(bench --model "$model" --batch "$batch" --recompute "${recompute:-0}" --recompute-layers "${layers:--1}")
    for _ in $(seq "${rounds:-1}"); do
      for ones in false true; do
        python3 -m distgpt "${args[@]}" --bias-column "$ones" 2>&1 | grep "tok/s" | sed "s/^/bias-column $ones: /"
      done
    done
  done 2>&1 | tee "$OUT/biascolumn_bench.log"
fi
if [ "$STAGE" = fp8parity ]; then
  python3 benchmarks/fp8_parity.py "${TEXT:-benchmarks/shakespeare.txt}" ${PARITY_ARGS:-} 2>&1 \
    | tee "$OUT/fp8_parity.log" | tail -40
fi
if [ "$STAGE" = launch ]; then  # 2 GPUs: started without mpirun (rendezvous) = the mpirun run, bitwise
  python3 benchmarks/launch_check.py 2>&1 | tee "$OUT/launch.log"
fi
if [ "$STAGE" = overlap ]; then
  for args in "--overlap true" "--overlap false" "--overlap true --gather-in-forward" \
      "--overlap true --bucket-mb 4" "--overlap true --zero-stage 0"; do
    mpirun --allow-run-as-root -np 2 --bind-to none -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST \
        -x NVSHMEM_DISABLE_NVLS -x PYTHONPATH python3 -m distgpt bench --model gpt2_124m --batch 8 --steps 8 \
        --warmup 2 --deterministic --json $args ${BENCH_ARGS:-} 2>&1 | grep '^{' \
      | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print(f\"fp8={r['fp8']} overlap={r['overlap']} gather_in_forward={r['gather_in_forward']} zero={r['zero_stage']} buckets={r['buckets']}: losses {r['first_loss']!r} {r['last_loss']!r}\")" \
      | tee -a "$OUT/overlap.log"
  done
fi
if [ "$STAGE" = drill ]; then
  python3 benchmarks/failure_drill.py --gpu --transport --out /tmp/drill --steps 40 --fault-at 20 \
      --checkpoint-every 10 --timeout 30 2>&1 | tee "$OUT/drill.log"
  cp /tmp/drill/*.log "$OUT/" 2>/dev/null
fi
if [ "$STAGE" = shuffle ]; then
  python3 benchmarks/shuffle_val.py "${TEXT:-benchmarks/shakespeare.txt}" 2>&1 \
      | tee "$OUT/shuffle_val.log" | tail -12
fi
