#!/usr/bin/env bash
# What a lent GPU machine runs: the whole suite on CUDA with every failure and skip named,
# then the GPU benchmarks, each part under its own time limit. Every log is kept whole in
# OUT_DIR, with a one-line status per part in OUT_DIR/summary.txt; with BUNDLE=FILE the
# folder is also packed into FILE after every part (a run stopped at its limit keeps what it
# had).
# Usage (repo root): bash benchmarks/gpu_session.sh OUT_DIR [PART...]
#   PARTS: suite 100-200 s; phases 20 s; cost 15 s; rnn 30 s (the T = 200 product at 250
#     and 1,000 sequences); rnn200 60 s (the RNN recipe at T = 200 for 30 s: updates, time
#     per update); curves 170 s (HF and one Adam, 60 s of training each); solo4 300 s
#     (benchmarks/gpu_curves.py --stage solo: Adam's rates alone, HF for 4 minutes); shared
#     300 s (the suite and the Adam grid of gpu_curves.py sharing the GPU: the grid's error
#     at a given number of updates does not depend on sharing, the suite only passes or
#     fails); also rnncpu, overhead, scale, memory.
#   Profiles: one-call = suite phases cost rnn rnn200 curves (about 7 minutes, one call);
#     call1 = phases cost rnn rnn200 solo4 (about 7 minutes) and call2 = shared (about 5),
#     two calls back to back on one warm machine (it goes back 30 s after a call) with the
#     same OUT_DIR inside the repository (results/ is ignored, so it stays between calls):
#     everything issue 26 asks for in one lent session of 15 minutes. If the machine went
#     back in between, unpack call1's bundle into results/gpu here and carry that path.
#     Default: one-call.
#   on the device tool: BUNDLE=$OUT/gpu1.tgz bash benchmarks/gpu_session.sh results/gpu call1
#                       BUNDLE=$OUT/gpu2.tgz bash benchmarks/gpu_session.sh results/gpu call2
set -u
OUT=${1:-results/gpu}
shift || true
PARTS=${*:-one-call}
PARTS=${PARTS//one-call/suite phases cost rnn rnn200 curves}
PARTS=${PARTS//call1/phases cost rnn rnn200 solo4}
PARTS=${PARTS//call2/shared}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
echo "== $(date -u +%FT%TZ) parts: $PARTS" >> "$OUT/summary.txt"

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

suite() {  # suite WORKERS LIMIT: -rfEs names every failure, error and skip (with its reason) at the
  # end of the log; xdist where it is installed (the CUDA image has it), two threads a worker
  local xdist
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n $1")
  OMP_NUM_THREADS=2 part pytest "$2" python3 -m pytest -q -p no:cacheprovider -rfEs $xdist \
    --junitxml="$OUT/pytest.xml" tests
  grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/pytest.log" > "$OUT/pytest_failures_and_skips.txt"
  pack
}
CURVES4=(python3 benchmarks/gpu_curves.py --device cuda --budgets 60 240 --probe-seconds 8 --out "$OUT/curves4")

want suite && suite 6 200
want phases && part step_phases 80 python3 benchmarks/step_phases.py --device cuda --json "$OUT/step_phases.json" \
  --profile "$OUT/step_phases_profile.txt"
want cost && part curvature_cost 45 python3 benchmarks/curvature_cost.py --device cuda --reps 21 --json "$OUT/curvature_cost_cuda.json"
if want rnn; then  # at the CPU's curvature batch and at the recipe's CUDA one
  part rnn_product_cuda 45 python3 benchmarks/rnn_product_cost.py --device cuda --T 200 --reps 11
  part rnn_product_cuda_b1000 45 python3 benchmarks/rnn_product_cost.py --device cuda --T 200 --batch 1000 --reps 11
fi
want rnncpu && part rnn_product_cpu 60 python3 benchmarks/rnn_product_cost.py --device cpu --T 200 --reps 5
if want curves; then  # CURVES, 60 s of training each: HF at the 5000 / 1250, Adam at its best of the table
  part curves_hf 95 python3 recipes/autoencoder.py --device cuda --time-budget 60 --batch-size 5000 \
    --curvature-batch-size 1250 --no-progress --out "$OUT/curves" --tag hf_5000
  part curves_adam 95 python3 recipes/autoencoder.py --device cuda --optimizer adam --lr 3e-3 --batch-size 1000 \
    --time-budget 60 --no-progress --out "$OUT/curves" --tag adam_3e-3_1000
fi
want rnn200 && part rnn200_cuda 75 python3 recipes/rnn_pathological.py --task addition --T 200 --device cuda \
  --time-budget 30 --eval-every 10 --no-progress --overwrite --out "$OUT/rnn200"
want solo4 && part curves4_solo 360 "${CURVES4[@]}" --stage solo
if want shared; then  # the suite (fewer workers: the grid's six processes take a core each) beside the grid
  suite 4 300 &
  part curves4_grid 300 "${CURVES4[@]}" --stage grid --guard 270 --parallel 6
  wait
  pack
fi
want overhead && part step_overhead 50 python3 benchmarks/step_overhead.py --device cuda --json "$OUT/step_overhead_cuda.json"
want scale && part gpu_scale 60 python3 benchmarks/gpu_scale.py --device cuda --no-offload --json "$OUT/gpu_scale.json"
want memory && part rnn_memory 30 python3 benchmarks/rnn_memory.py --device cuda --reps 15
echo "logs: $OUT"
