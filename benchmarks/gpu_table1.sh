#!/usr/bin/env bash
# Table 1 points that a 2-core CPU machine cannot afford, on one CUDA GPU (issue 15). Arguments are those
# of `benchbox table`; without any, the ML-1M converged sequence regime (about 265,000 CPU-s estimated
# by `benchbox table --dry-run`). Finished points of results/runs.csv are skipped (it is copied into
# $OUT/res first); rows land in $OUT/res/runs.csv and curves.csv as each run finishes, so a run cut by
# BUDGET_S loses only the points still running. Then append the rows whose run_id results/runs.csv lacks.
#   OUT=/tmp/x BENCHBOX_DATA=../shared/data bash benchmarks/gpu_table1.sh --datasets electronics --models DIN --budget converged
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_table1}
DATA=${BENCHBOX_DATA:-.gpudata}
BUDGET_S=${BUDGET_S:-480}
WORKERS=${WORKERS:-10}
PY=${PYTHON:-$(command -v python3 || command -v python)}
[ $# -gt 0 ] || set -- --datasets ml-1m --models SASRec,GRU4Rec,ComiSA,ComiDR,DIN --budget converged
mkdir -p "$OUT/res"
cp results/runs.csv "$OUT/res/runs.csv"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# GPU load while the runs share the card (one context per worker, time-sliced)
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 30 > "$OUT/gpu_util.log" &
timeout "$BUDGET_S" "$PY" -m benchbox.cli table "$@" --device cuda --threads 1 --workers "$WORKERS" \
  --data-dir "$DATA" --results-dir "$OUT/res" 2>&1 | tee "$OUT/table.log"
echo "table exit: ${PIPESTATUS[0]}"
kill %1 2>/dev/null
