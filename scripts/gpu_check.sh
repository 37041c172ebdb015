#!/usr/bin/env bash
# The GPU runbook (../shared/GPU.md) as one command for the device machine: measured figures only, each step with
# its own time limit so that a slow one cannot take the others' results. Predictions are made on the development
# machine with the same flags (they need no GPU). Usage there: bash scripts/gpu_check.sh  (writes $OUT/results.tgz)
# GPU_CHECK_STEPS="name ..." runs only those steps (default: all); GPU_CHECK_SECONDS is the whole script's budget.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
OUT=${OUT:-/tmp/out}; RES=/tmp/gpu-check; mkdir -p "$OUT" "$RES"
trap 'tar -czf "$OUT/results.tgz" -C "$RES" .' EXIT  # the device tool brings back 8 files at most: one archive
budget=${GPU_CHECK_SECONDS:-420}  # later steps run only while time is left
only=" ${GPU_CHECK_STEPS:-} "
left() { echo $((budget - SECONDS)); }
step() {  # step SECONDS NAME COMMAND...: run while time is left, log under $RES
  local limit=$1 name=$2; shift 2
  if [ "$only" != "  " ] && [[ "$only" != *" $name "* ]]; then return; fi
  if [ "$(left)" -lt 15 ]; then echo "SKIPPED $name (no time left)"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local t=$SECONDS
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - t))s"; tail -n 12 "$RES/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RES/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'transformers', transformers.__version__)" | tee -a "$RES/gpu.txt"
TINY=("${GPU_CHECK_MODEL:-tinyllama-1.1b}" -o adamw --no-preflight --no-predict --no-breakdown --steps 3 -f json)

step 30 alloc-parse python3 scripts/gpu_alloc_conf.py "$RES/alloc-parse.json"
# torch's optimizer paths (issue 34): pure bf16 at one short sequence, where the update is the peak
for impl in foreach=False fused=True default; do
  args=(); [ "$impl" != default ] && args=(--opt-arg "$impl")
  step 45 "update-${impl%%=*}" python3 -m optprof compare "${TINY[@]}" "${args[@]}" --dtype bfloat16 --seq-len 768 \
    --micro-batch 1 --output "$RES/update-${impl%%=*}.json"
done
# the allocator's options (issue 34): bf16 autocast, 2 x 2048, each setting in PYTORCH_CUDA_ALLOC_CONF
declare -A CONF=([default]="" [expandable]="expandable_segments:True"
  [rounding]="roundup_power2_divisions:[256:1,512:2,>:4],max_split_size_mb:512,max_non_split_rounding_mb:256"
  [gc]="garbage_collection_threshold:0.6,per_process_memory_fraction:0.25")
for name in default expandable rounding gc; do
  step 45 "alloc-$name" env PYTORCH_CUDA_ALLOC_CONF="${CONF[$name]}" python3 -m optprof compare "${TINY[@]}" \
    --amp bf16 --seq-len 2048 --micro-batch 2 --output "$RES/alloc-$name.json"
done
step 90 gpu-tests python3 -m pytest -m gpu -q -p no:cacheprovider tests/integration/test_gpu.py
step 40 gpu-tests-expandable env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m pytest -m gpu -q \
  -p no:cacheprovider tests/integration/test_gpu.py -k allocator_trace
for recipe in hf-trainer torchtune; do
  step 50 "recipe-$recipe" python3 -m optprof compare "${TINY[@]}" --recipe "$recipe" --seq-len 2048 \
    --micro-batch 2 --output "$RES/recipe-$recipe.json"
done
# nothing lost (issue 35): SIGINT midway through CUDA trials keeps the finished rows, exit 130
step 60 interrupt timeout -s INT 35 python3 -m optprof compare demo -o sgd,adamw,adafactor,momentum,adam-mini \
  --device cuda --seq-len 512 --micro-batch 4 --no-preflight --no-predict -f json --output "$RES/interrupt.json"
# the previous round's steps (issue 33), when asked for by name
step 70 op-times python3 scripts/gpu_op_times.py "$RES/op_times.json"
step 120 time python3 -m optprof compare tinyllama-1.1b -o adamw,adam-mini,muon --amp bf16 --seq-len 2048 \
  --micro-batch 4 --no-preflight -f json --output "$RES/time.json"
echo "total $SECONDS s"
