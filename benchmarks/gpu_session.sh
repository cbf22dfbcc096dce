#!/usr/bin/env bash
# What a lent GPU machine runs in one call, about 8 minutes: the whole suite on CUDA with every
# failure and skip named, then the GPU benchmarks. Every log is kept whole in OUT_DIR, with a
# one-line status per part in OUT_DIR/summary.txt.
# Usage (repo root): bash benchmarks/gpu_session.sh OUT_DIR      (on the device tool: OUT_DIR=$OUT)
set -u
OUT=${1:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
: > "$OUT/summary.txt"

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, log kept whole, status noted
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc in $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (time limit)')" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
}

{ nvidia-smi; python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', sys.version)"
} > "$OUT/machine.txt" 2>&1
head -n 20 "$OUT/machine.txt"

# The suite: -rfEs names every failure, error and skip (with its reason) at the end of the log.
part pytest 270 python -m pytest -q -p no:cacheprovider -rfEs --junitxml="$OUT/pytest.xml" tests
grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/pytest.log" > "$OUT/pytest_failures_and_skips.txt"
part curvature_cost 50 python benchmarks/curvature_cost.py --device cuda --reps 21 --json "$OUT/curvature_cost_cuda.json"
part curvature_cost_b10000 40 python benchmarks/curvature_cost.py --device cuda --reps 11 --batch 10000 --json "$OUT/curvature_cost_cuda_b10000.json"
part step_overhead 50 python benchmarks/step_overhead.py --device cuda --json "$OUT/step_overhead_cuda.json"
part gpu_scale 50 python benchmarks/gpu_scale.py --device cuda --json "$OUT/gpu_scale.json"
part rnn_memory 30 python benchmarks/rnn_memory.py --device cuda --reps 15
echo "logs: $OUT"
