#!/usr/bin/env bash
# Table 1's converged sequence regime on ML-1M, on one CUDA GPU (issue 15): the points a 2-core CPU
# machine cannot afford (about 265,000 CPU-s estimated by `benchbox table --dry-run`). Finished points
# of results/runs.csv are skipped (it is copied into $OUT first); rows land in $OUT/res/runs.csv and
# curves.csv as each run finishes, so a run cut by BUDGET_S loses only the points still running.
#   OUT=/tmp/x BENCHBOX_DATA=../shared/data bash benchmarks/gpu_converged.sh
# Then append the new rows to results/ (rows whose run_id results/runs.csv lacks).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_converged}
DATA=${BENCHBOX_DATA:-.gpudata}
BUDGET_S=${BUDGET_S:-480}
WORKERS=${WORKERS:-10}
MODELS=${MODELS:-SASRec,GRU4Rec,ComiSA,ComiDR,DIN}  # in this order: the goal's SASRec seeds first
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT/res"
cp results/runs.csv "$OUT/res/runs.csv"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# GPU load while the runs share the card (one context per worker, time-sliced)
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 30 > "$OUT/gpu_util.log" &
timeout "$BUDGET_S" "$PY" -m benchbox.cli table --datasets ml-1m --models "$MODELS" --budget converged \
  --device cuda --threads 1 --workers "$WORKERS" --data-dir "$DATA" --results-dir "$OUT/res" \
  2>&1 | tee "$OUT/gpu_converged.log"
echo "table exit: ${PIPESTATUS[0]}"
kill %1 2>/dev/null
