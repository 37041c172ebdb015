#!/usr/bin/env bash
# The GPU runbook (../shared/GPU.md) as one command for the device machine: measured figures only, each step with
# its own time limit so that a slow one cannot take the others' results. Predictions are made on the development
# machine with the same flags (they need no GPU). Usage there: bash scripts/gpu_check.sh  (writes under $OUT)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
budget=${GPU_CHECK_SECONDS:-330}  # the whole script's seconds; later steps run only while time is left
left() { echo $((budget - SECONDS)); }
step() {  # step SECONDS NAME COMMAND...: run while time is left, log under $OUT
  local limit=$1 name=$2; shift 2
  if [ "$(left)" -lt 20 ]; then echo "SKIPPED $name (no time left)"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local t=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - t))s"; tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
step 70 op-times python3 scripts/gpu_op_times.py "$OUT/op_times.json"
step 120 time python3 -m optprof compare tinyllama-1.1b -o adamw,adam-mini,muon --amp bf16 --seq-len 2048 \
  --micro-batch 4 --no-preflight -f json --output "$OUT/time.json"
step 90 gpu-tests python3 -m pytest -m gpu -q -p no:cacheprovider tests/integration/test_gpu.py
step 40 gpu-tests-expandable env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m pytest -m gpu -q \
  -p no:cacheprovider tests/integration/test_gpu.py -k allocator_trace
step 150 max python3 -m optprof compare tinyllama-1.1b -o adamw,adam-mini --amp bf16 --seq-len 2048 \
  --memory-limit 40GiB --no-preflight --no-predict -f json --output "$OUT/max.json"
step 80 fp16 python3 -m optprof compare gpt2-xl -o adamw --micro-batch 4 --seq-len 1024 --dtype float16 --amp fp16 \
  --no-preflight --no-predict -f json --output "$OUT/fp16.json"
echo "total $SECONDS s"
