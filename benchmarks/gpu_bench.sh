#!/usr/bin/env bash
# Every GPU check of benchbox in one run (issue 16): agreement and speed of every mixer and backend,
# torch.compile paths, fla's Triton TTT-Linear beside ours, and `benchbox bench` of the whole model on CUDA.
# Needs PyTorch with CUDA (Triton comes with it); fetches nothing. Each step has its own time cap, so the
# whole script ends within about 8.5 minutes on one H100/H200 even when a step hangs.
#   bash benchmarks/gpu_bench.sh      # writes $OUT (default results/): gpu_check.csv, fla_ttt_cuda.csv,
#                                     # efficiency_cuda.csv, gpu_bench.log
# fla-core is optional: put its wheel under .whl/ (pip download --no-deps fla-core -d .whl) on a machine
# without internet, or have it installed. mamba-ssm / flash-attn are used when importable.
# Every CSV row carries the device name (torch.cuda.get_device_name) in its `device` column.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT"
"$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to do')" || exit 0
exec > >(tee "$OUT/gpu_bench.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/fla_core-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla_site .whl/fla_core-*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/fla_site"
fi
start=$(date +%s)
step() { echo; echo "=== $(( $(date +%s) - start )) s: $*"; }
step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for m in ("triton", "fla.ops.ttt", "mamba_ssm", "causal_conv1d", "flash_attn"):
    try:
        mod = importlib.import_module(m)
        print(f"{m}: importable", getattr(mod, "__version__", ""))
    except Exception as e:  # noqa: BLE001
        print(f"{m}: not importable ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})")
EOF
# 1. every mixer x backend x dtype at L 200 and 1000: agreement with CPU fp32 and raw mixer speed;
#    torch.compile of each mixer's default backend at L 200 in bf16 (its own 70 s budget)
step "gpu_check"
timeout 200 "$PY" benchmarks/gpu_check.py --out "$OUT/gpu_check.csv" --time-budget 90 --compile \
    --compile-budget 70 || echo "gpu_check: exit $?"
# 2. fla's Triton TTT-Linear kernels beside benchbox's scan (same shapes, forward + backward)
step "fla kernels"
timeout 60 "$PY" benchmarks/fla_parameterisation.py --speed --out "$OUT/fla_ttt_cuda.csv" || echo "fla: exit $?"
# 3. the whole recommender: train step and encode at L 200 and 4000, both dtypes (default backends)
for dtype in bfloat16 float32; do
  step "bench $dtype"
  timeout 100 "$PY" -m benchbox.cli bench --device cuda --dtype "$dtype" --mixers all --seq-lens 200,4000 \
      --batch-sizes 64 --modes train,encode --repeats 10 --warmup 3 --budget 5 \
      --out "$OUT/efficiency_cuda.csv" --figures /tmp/gpu_figures || echo "bench $dtype: exit $?"
done
# 4. serving: one new click at batch 1 and 256 after 50 and 4000 items of history
step "bench stream"
timeout 50 "$PY" -m benchbox.cli bench --device cuda --dtype float32 --mixers all --seq-lens 50,4000 \
    --batch-sizes 1,256 --modes stream --repeats 20 --warmup 5 --budget 3 --out "$OUT/efficiency_cuda.csv" \
    --figures /tmp/gpu_figures || echo "bench stream: exit $?"
step "gpu_bench done"
