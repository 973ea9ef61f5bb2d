"""A compute floor under the cost of Table 1: the matrix FLOPs its training steps must do, against the
matrix throughput of one core of this machine.

For every (dataset, model) of the study's Table 1, it builds the run exactly as ``benchbox run`` does
(benchbox.train.build_training), counts the FLOPs of ``--steps`` training steps (forward, backward)
with torch.utils.flop_counter (matmuls, batched matmuls, attention and convolutions only: elementwise
work, the optimiser and evaluation are not counted, so this is a lower bound), and multiplies the mean
by the steps per epoch, the budget's epochs and the seeds. Dividing by the best fp32 GEMM rate of one
thread (a square matmul, best of several) gives the CPU-seconds that Table 1 needs even if every
counted FLOP ran at GEMM speed and nothing else cost anything.

    python benchmarks/flop_floor.py --protocol study            # the study protocol (instances, window 10)
    python benchmarks/flop_floor.py --protocol ""               # the sequence regime
    python benchmarks/flop_floor.py --datasets beauty --models SASRec,TTT4Rec --csv /tmp/floor.csv
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchbox.config import make_config  # noqa: E402
from benchbox.tables import MODELS, _spec  # noqa: E402
from benchbox.train import budget_epochs, build_training, train_step  # noqa: E402

STUDY_MODELS = "DIN,GRU4Rec,SASRec,ComiSA,ComiDR,TTT4Rec"


def gemm_rate(n: int = 1024, reps: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n x n matmul on the current thread count (process CPU time)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        a @ b
        best = min(best, time.process_time() - t)
    return 2 * n ** 3 / best


# torch's counter has formulas for baddbmm and addmm but not for their in-place forms, which DIN's pairs use
# (readouts._DINPairs: the forward accumulates its product onto the biases): counted as the out-of-place ones.
# (the mapping's formulas get shapes: 2 b m k n multiply-adds counted as FLOPs, as torch's own formulas do).
def _baddbmm_flops(self_shape, b1_shape, b2_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * b1_shape[0] * b1_shape[1] * b1_shape[2] * b2_shape[2]


def _addmm_flops(self_shape, m1_shape, m2_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * m1_shape[0] * m1_shape[1] * m2_shape[1]


IN_PLACE_PRODUCTS = {torch.ops.aten.baddbmm_: _baddbmm_flops, torch.ops.aten.addmm_: _addmm_flops}


def step_flops(cfg, steps: int) -> tuple[float, int, int]:
    """Mean counted FLOPs of one training step, steps per epoch, epochs of the budget."""
    tr = build_training(cfg)
    tr.model.train()
    batches = iter(tr.loader)
    train_step(tr.model, tr.opt, next(batches), tr.dev, tr.amp)  # first step outside the count (lazy init)
    counter = FlopCounterMode(display=False, custom_mapping=IN_PLACE_PRODUCTS)
    with counter:
        for _ in range(steps):
            train_step(tr.model, tr.opt, next(batches), tr.dev, tr.amp)
    epochs, _ = budget_epochs(cfg)
    return counter.get_total_flops() / steps, len(tr.loader), epochs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="beauty,electronics,ml-1m")
    p.add_argument("--models", default=STUDY_MODELS)
    p.add_argument("--protocol", default="study", help='"study", or "" for the sequence regime')
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="training steps counted per (dataset, model)")
    p.add_argument("--csv", help="also write the rows here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rate = gemm_rate()
    print(f"one thread's fp32 GEMM rate (1024^3, best of 5): {rate / 1e9:.1f} GFLOP/s")
    rows, total = [], 0.0
    for ds in a.datasets.split(","):
        for name in a.models.split(","):
            if name not in MODELS:
                sys.exit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
            mixer, readout, ropts = _spec(name)
            cfg = make_config(mixer=mixer, readout=readout, readout_opts=ropts, dataset=ds,
                              protocol=a.protocol or None, threads=1)
            flops, steps, epochs = step_flops(cfg, a.steps)
            run_flops = flops * steps * epochs
            floor = run_flops / rate
            total += floor * a.seeds
            rows.append({"dataset": ds, "model": name, "regime": cfg.regime, "window": cfg.window or "",
                         "gflop_per_step": round(flops / 1e9, 3), "steps_per_epoch": steps, "epochs": epochs,
                         "tflop_per_run": round(run_flops / 1e12, 2), "floor_s_per_run": round(floor, 1),
                         "gemm_gflops": round(rate / 1e9, 1)})
            print(f"{ds:12} {name:8} {cfg.regime:9} {flops / 1e9:9.3f} GFLOP/step x {steps:5} steps x {epochs:2} "
                  f"epochs = {run_flops / 1e12:7.2f} TFLOP -> >= {floor:8.1f} s a run", flush=True)
    print(f"Table 1 ({a.seeds} seeds): counted matrix work alone needs >= {total:,.0f} CPU-s at one thread's GEMM "
          f"rate")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    from benchbox.blas import reexec_with_shim
    reexec_with_shim(sys.argv)  # MKL's fast kernels on AMD CPUs, as the benchbox command runs (benchbox/blas.py)
    main()
