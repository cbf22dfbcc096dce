#!/usr/bin/env bash
# What a lent GPU machine runs in one call: the whole suite on CUDA with every failure and
# skip named, then the GPU benchmarks, each part under its own time limit. Every log is kept
# whole in OUT_DIR, with a one-line status per part in OUT_DIR/summary.txt; with BUNDLE=FILE
# the folder is also packed into FILE after every part (a run stopped at its limit keeps
# what it had).
# Usage (repo root): bash benchmarks/gpu_session.sh OUT_DIR [PART...]
#   PARTS (default "suite phases rnn curves cost", about 6 minutes on an H200):
#     suite 100 s, phases 20 s, rnn 15 s, curves 170 s (HF and Adam, 60 s of training each),
#     cost 15 s; also rnncpu 20 s, overhead 50 s, scale 60 s, memory 30 s
#   on the device tool: BUNDLE=$OUT/gpu_logs.tgz bash benchmarks/gpu_session.sh /tmp/gpu suite phases
set -u
OUT=${1:-results/gpu}
shift || true
PARTS=${*:-suite phases rnn curves cost}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"

pack() {
  if [ -n "${BUNDLE:-}" ]; then tar -C "$OUT" -czf "$BUNDLE" . 2>/dev/null; fi
}

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, log kept whole, status noted
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc in $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (time limit)')" | tee -a "$OUT/summary.txt"
  tail -n 6 "$OUT/$name.log"
  pack
}

want() { [[ " $PARTS " == *" $1 "* ]]; }

{ nvidia-smi; python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', sys.version)"
  nproc; } > "$OUT/machine.txt" 2>&1
grep -E "torch|H200|H100" "$OUT/machine.txt" | head -n 3

if want suite; then
  # -rfEs names every failure, error and skip (with its reason) at the end of the log; xdist
  # where it is installed (the CUDA image has it), each worker with two threads.
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6")
  OMP_NUM_THREADS=2 part pytest 200 python3 -m pytest -q -p no:cacheprovider -rfEs $xdist \
    --junitxml="$OUT/pytest.xml" tests
  grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/pytest.log" > "$OUT/pytest_failures_and_skips.txt"
  pack
fi
want phases && part step_phases 80 python3 benchmarks/step_phases.py --device cuda --json "$OUT/step_phases.json" \
  --profile "$OUT/step_phases_profile.txt"
want cost && part curvature_cost 45 python3 benchmarks/curvature_cost.py --device cuda --reps 21 --json "$OUT/curvature_cost_cuda.json"
want rnn && part rnn_product_cuda 45 python3 benchmarks/rnn_product_cost.py --device cuda --T 200 --reps 11
want rnncpu && part rnn_product_cpu 60 python3 benchmarks/rnn_product_cost.py --device cpu --T 200 --reps 5
if want curves; then  # CURVES, 60 s of training each: HF at the 5000 / 1250, Adam at its best of the table
  part curves_hf 95 python3 recipes/autoencoder.py --device cuda --time-budget 60 --batch-size 5000 \
    --curvature-batch-size 1250 --no-progress --out "$OUT/curves" --tag hf_5000
  part curves_adam 95 python3 recipes/autoencoder.py --device cuda --optimizer adam --lr 3e-3 --batch-size 1000 \
    --time-budget 60 --no-progress --out "$OUT/curves" --tag adam_3e-3_1000
fi
want overhead && part step_overhead 50 python3 benchmarks/step_overhead.py --device cuda --json "$OUT/step_overhead_cuda.json"
want scale && part gpu_scale 60 python3 benchmarks/gpu_scale.py --device cuda --no-offload --json "$OUT/gpu_scale.json"
want memory && part rnn_memory 30 python3 benchmarks/rnn_memory.py --device cuda --reps 15
echo "logs: $OUT"
