#!/usr/bin/env bash
# What a lent GPU machine runs in one call: CUDA tests, then the GPU benchmarks.
# Usage (repo root): bash benchmarks/gpu_session.sh OUT_DIR
set -u
OUT=${1:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi -L
python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), sys.version)"
python -m pytest --version >/dev/null 2>&1 && python -m pytest -q -p no:cacheprovider tests 2>&1 | tail -5
python benchmarks/curvature_cost.py --device cuda --reps 21 --json "$OUT/curvature_cost_cuda.json" 2>&1 | tail -12
python benchmarks/gpu_scale.py --device cuda --json "$OUT/gpu_scale.json" 2>&1 | grep -v '^{'
python benchmarks/gpu_scale.py --device cuda --tf32 --no-offload --batches 10000 60000 --json "$OUT/gpu_scale_tf32.json" 2>&1 | grep -v '^{'
python benchmarks/curvature_cost.py --device cuda --reps 21 --batch 10000 2>&1 | tail -3
python benchmarks/rnn_memory.py --device cuda --reps 15 2>&1 | grep -v "^{"
