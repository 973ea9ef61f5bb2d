"""Three levers on the instance regime's small steps, measured per model: what stacking seeds could save,
what torch.compile saves, and what ``--dropout-masks fast`` saves.

- **Stacking bound.** Several seeds in one process (stacked parameters, ``torch.func``) would turn k steps
  of R rows into one step of k R rows. Its best case is therefore the step of k R rows against k steps
  of R rows: if a step of 3 R rows costs 3x one of R rows, stacking 3 seeds saves nothing. Measured with
  ``--batch-size`` times ``--stack`` (same model, same data, real batches).
- **torch.compile**, as ``benchbox run --compile`` does it (inductor, ``fallback_random`` so that dropout
  draws the eager random stream; the training forward, and so its backward through AOTAutograd). Reported
  with the largest difference of the training losses over the timed steps (the same batches both ways):
  float noise, or a changed result.
- **Fast dropout masks** (``--dropout-masks fast``): every mask from ``benchbox.model.dropout_mask`` instead of
  torch's ``bernoulli_``; another random stream, so other numbers (a sensitivity setting). Timed against the
  default step in ``--pairs`` interleaved pairs (default then fast), the medians and the ratio of medians;
  with ``--compile`` also fast masks and compile together.

Every step is ``benchbox.train.train_step`` on batches of ``build_training``'s loader, as ``benchbox run``
takes them; 1 thread and the cpu clock by default, so that runs in the background do not skew it.

    python benchmarks/step_levers.py --dataset beauty --out results/step_levers.csv
    python benchmarks/step_levers.py --dataset ml-1m --no-stack --fast-masks --out results/step_levers.csv
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchbox import BenchboxError  # noqa: E402
from benchbox.config import make_config  # noqa: E402
from benchbox.efficiency import CLOCK_HELP, CLOCKS, pick_clock  # noqa: E402
from benchbox.results import append_rows  # noqa: E402
from benchbox.tables import MODELS, _spec  # noqa: E402
from benchbox.train import build_training, train_step  # noqa: E402

STUDY_MODELS = "DIN,GRU4Rec,SASRec,ComiSA,ComiDR,TTT4Rec"


def timed_steps(cfg, steps: int, warmup: int, clock):
    """(median seconds per step, rows per step, losses) of ``steps`` steps after ``warmup``; batches of
    one shape only (a smaller last batch would time a recompile). ``cfg.compile``: as ``benchbox run
    --compile`` compiles (benchbox.train.compile_training); the first step compiles, untimed."""
    tr = build_training(cfg)
    model, opt = tr.model, tr.opt
    model.train()
    batches = iter(tr.loader)
    first = next(batches)
    train_step(model, opt, first, tr.dev, tr.amp)
    times, losses = [], []
    for i in range(warmup + steps):
        batch = next(batches)
        t0 = clock()
        loss = train_step(model, opt, batch, tr.dev, tr.amp)
        if i >= warmup:
            times.append(clock() - t0)
            losses.append(loss)
    return statistics.median(times), first.inputs.shape[0], losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="beauty")
    p.add_argument("--models", default=STUDY_MODELS, help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--protocol", default="study")
    p.add_argument("--stack", type=int, default=3, help="seeds a stacked step would hold")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="no compiled steps")
    p.add_argument("--no-stack", action="store_true", help="no stacking bound")
    p.add_argument("--fast-masks", action="store_true", help="also time --dropout-masks fast (interleaved pairs)")
    p.add_argument("--pairs", type=int, default=3, help="default / fast-mask pairs (with --fast-masks)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=list(CLOCKS), default="cpu", help=CLOCK_HELP)
    p.add_argument("--out", help="append the rows to this CSV")
    a = p.parse_args(argv)
    try:
        clock = pick_clock(a.clock, a.threads)
        names = [m.strip() for m in a.models.split(",") if m.strip()]
        unknown = [m for m in names if m not in MODELS]
        if unknown:
            raise BenchboxError(f"unknown model(s) {', '.join(unknown)} ({', '.join(MODELS)})")
    except BenchboxError as e:
        sys.exit(str(e))
    torch.set_num_threads(a.threads)
    print(f"{a.dataset}, --protocol {a.protocol}, {a.threads} thread(s), {a.clock} clock, median of {a.steps} steps\n")
    print("| model | rows | step ms | rows x{0} | step ms | x{0} rows cost | stacking saves at most | compiled ms "
          "| compile speed-up | max loss diff | fast masks ms | speed-up | fast masks + compile ms | speed-up |"
          .format(a.stack))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in names:
        mixer, readout, readout_opts = _spec(name)
        base = dict(mixer=mixer, readout=readout, readout_opts=readout_opts, dataset=a.dataset,
                    protocol=a.protocol or None, threads=a.threads)
        cfg = make_config(**base)
        t1, r1, loss1 = timed_steps(cfg, a.steps, a.warmup, clock)
        # the instance regime's batch_size counts study rows (1 + train_neg per target): stack the targets
        per_row = 1 + cfg.train_neg if cfg.regime == "instances" else 1
        row = dict(model=name, dataset=a.dataset, protocol=a.protocol, rows=r1, step_ms=round(t1 * 1e3, 2))
        if not a.no_stack:
            tk, rk, _ = timed_steps(make_config(**base, batch_size=r1 * a.stack * per_row), a.steps, a.warmup, clock)
            row.update(stacked_rows=rk, stacked_step_ms=round(tk * 1e3, 2), cost_ratio=round(tk / t1, 2),
                       stacking_saves_at_most=round(1 - tk / (a.stack * t1), 3))
        if a.fast_masks:
            plain, fast = [t1], []
            for i in range(a.pairs):
                if i:
                    plain.append(timed_steps(cfg, a.steps, a.warmup, clock)[0])
                fast.append(timed_steps(make_config(**base, dropout_masks="fast"), a.steps, a.warmup, clock)[0])
            tp, tf = statistics.median(plain), statistics.median(fast)
            row.update(step_ms=round(tp * 1e3, 2), fast_masks_step_ms=round(tf * 1e3, 2),
                       fast_masks_speedup=round(tp / tf, 2), pairs=a.pairs)
            if not a.no_compile:
                tfc = timed_steps(make_config(**base, dropout_masks="fast", compile=True), a.steps, a.warmup, clock)[0]
                row.update(fast_masks_compiled_step_ms=round(tfc * 1e3, 2), fast_masks_compiled_speedup=round(tp / tfc, 2))
        if not a.no_compile:
            tc, _, lossc = timed_steps(make_config(**base, compile=True), a.steps, a.warmup, clock)
            row.update(compiled_step_ms=round(tc * 1e3, 2), compile_speedup=round(t1 / tc, 2),
                       max_loss_diff=max(abs(x - y) for x, y in zip(loss1, lossc)))
        row.update(threads=a.threads, clock=a.clock, torch=torch.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        rows.append(row)
        comp = ("{compiled_step_ms} | {compile_speedup}x | {max_loss_diff:.1e}".format(**row) if not a.no_compile
                else "- | - | -")
        stack = ("{stacked_rows} | {stacked_step_ms} | {cost_ratio}x | {stacking_saves_at_most:.0%}".format(**row)
                 if not a.no_stack else "- | - | - | -")
        fast = ("{fast_masks_step_ms} | {fast_masks_speedup}x | ".format(**row) if a.fast_masks else "- | - | ")
        fast += ("{fast_masks_compiled_step_ms} | {fast_masks_compiled_speedup}x".format(**row)
                 if a.fast_masks and not a.no_compile else "- | -")
        print(f"| {name} | {r1} | {row['step_ms']} | {stack} | {comp} | {fast} |", flush=True)
    if a.out and rows:
        append_rows(a.out, rows)  # locked, atomic, a new column extends the header


if __name__ == "__main__":
    from benchbox.blas import reexec_with_shim
    reexec_with_shim(sys.argv)  # MKL's fast kernels on AMD CPUs, as the benchbox command runs (benchbox/blas.py)
    main()
