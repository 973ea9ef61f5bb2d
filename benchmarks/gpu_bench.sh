#!/usr/bin/env bash
# GPU efficiency run of issue 7: benchbox bench on CUDA, fp32 and bf16, every mixer and backend.
# Needs PyTorch with CUDA (Triton comes with it); fetches nothing. Designed for < 8 minutes on one H100.
#   bash benchmarks/gpu_bench.sh            # writes results/efficiency_cuda.csv and results/gpu_check.csv
# The CSV rows carry the device name (torch.cuda.get_device_name) in the `device` column.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to do')"
pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-results}
mkdir -p "$OUT"
BB="python -m benchbox.cli"
start=$(date +%s)
# 1. agreement of every backend with the CPU fp32 result, and raw mixer speed (about 1 minute)
timeout 150 python benchmarks/gpu_check.py --out "$OUT/gpu_check.csv" || echo "gpu_check: exit $?"
# 2. the whole recommender: train step, encode, stream; lengths 200 and 4000, both dtypes
for dtype in bfloat16 float32; do
  timeout 150 $BB bench --device cuda --dtype "$dtype" --mixers all --backends all \
      --seq-lens 200,4000 --batch-sizes 64 --modes train,encode --repeats 10 --warmup 3 --budget 8 \
      --timeout 60 --out "$OUT/efficiency_cuda.csv" --figures "$OUT/figures/cuda_$dtype" \
    || echo "bench $dtype: exit $?"
done
# 3. serving: one new click at batch 1 after 50 and 4000 items of history
timeout 90 $BB bench --device cuda --dtype float32 --mixers all --seq-lens 50,4000 --batch-sizes 1,256 \
    --modes stream --repeats 20 --warmup 5 --budget 5 --timeout 30 --out "$OUT/efficiency_cuda.csv" \
    --figures "$OUT/figures/cuda_stream" || echo "bench stream: exit $?"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
echo "gpu_bench done in $(( $(date +%s) - start )) s"
