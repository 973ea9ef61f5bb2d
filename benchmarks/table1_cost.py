"""What the study's Table 1 costs with today's code: one epoch of every (model, dataset) point, priced at the
budget's epochs and N seeds.

Each point is one ``benchbox.run(..., epochs=E)`` (the run as ``benchbox table`` makes it, nothing written
to results/), timed by the process CPU clock (training and evaluation apart; loading the data and building
the model not counted, as the rows' seconds do not count them), in a fresh subprocess per point. The whole table is then priced as

    (train CPU-s per epoch + eval CPU-s per epoch) x budget epochs (10; 50 for ComiRec) x seeds

which is what ``sum(train_seconds + eval_seconds)`` over the table's rows in results/runs.csv measures,
for runs of one thread each. ``--workers 2`` runs two points at a time (the machine's two cores).

    python benchmarks/table1_cost.py --protocol study --workers 2 --out results/table1_cost.csv
    python benchmarks/table1_cost.py --regime sequence --workers 2 --out results/table1_cost.csv
    python benchmarks/table1_cost.py --protocol study --workers 2 --set dropout_masks=fast   # a run option for all
    python benchmarks/table1_cost.py --protocol study --workers 2 --models TTT4Rec,DIN,ComiSA --set compile=true \
        --epochs 2 --first-epoch-once   # compiled: the first epoch (compiling) priced once a run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchbox.results import append_rows  # noqa: E402
STUDY_MODELS = ("DIN", "GRU4Rec", "SASRec", "ComiSA", "ComiDR", "TTT4Rec")

CHILD = r"""
import json, sys, time, resource
sys.path.insert(0, sys.argv[1])
import benchbox
a = json.loads(sys.argv[2])
clock = {"build": 0.0, "eval": 0.0}
import benchbox.train as T

def timed(name, fn):  # fn, adding its CPU time to clock[name]
    def wrapper(*args, **kwargs):
        c = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[name] += time.process_time() - c
    return wrapper

epoch_cpu = []  # each epoch's training CPU-s (the first one compiles, under --compile)


def timed_epochs(fn):
    def wrapper(*args, **kwargs):
        c = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            epoch_cpu.append(time.process_time() - c)
    return wrapper

T.build_training = timed("build", T.build_training)
T.evaluate_splits = timed("eval", T.evaluate_splits)
T._train_epoch = timed_epochs(T._train_epoch)
c0 = time.process_time()
res = benchbox.run(results_dir=None, log=None, **a)
total = time.process_time() - c0 - clock["build"]  # data loading and model building are not per epoch
print("RESULT " + json.dumps({"cpu_s": total, "eval_cpu_s": clock["eval"], "build_cpu_s": clock["build"],
      "epoch_train_cpu_s": epoch_cpu,
      "epochs": res.row["epochs_run"], "steps_per_epoch": res.row["steps_per_epoch"], "train_seconds": res.row["train_seconds"],
      "eval_seconds": res.row["eval_seconds"], "device": res.row["device"], "blas": res.row["blas"]}))
"""


def measure(point: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), json.dumps(point["run"])], capture_output=True,
                         text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{point['model']} {point['dataset']} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1][7:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protocol", default="", help="'study' for the study protocol; empty: --regime's defaults")
    p.add_argument("--regime", default="sequence")
    p.add_argument("--datasets", default="beauty,electronics,ml-1m")
    p.add_argument("--models", default=",".join(STUDY_MODELS))
    p.add_argument("--epochs", type=int, default=1, help="epochs measured per point")
    p.add_argument("--first-epoch-once", action="store_true",
                   help="price the first epoch's training once per run and the later epochs' per epoch (for "
                        "--set compile=true, whose first epoch compiles; needs --epochs 2 or more)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--data-dir", default=os.environ.get("BENCHBOX_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another run option for every point, e.g. dropout_masks=fast (stored in the rows' settings)")
    p.add_argument("--out", help="append one row per point to this CSV")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchbox import BenchboxError
    from benchbox.config import parse_opts
    from benchbox.tables import MODELS
    try:
        extra = parse_opts(a.set, numbers=True)
    except BenchboxError as e:
        p.error(str(e))
    if a.first_epoch_once and a.epochs < 2:
        p.error("--first-epoch-once needs --epochs 2 or more")
    points = []
    for ds in a.datasets.split(","):
        for name in a.models.split(","):
            mixer, readout, *ro = MODELS[name]
            run = dict(mixer=mixer, readout=readout, readout_opts=ro[0] if ro else {}, dataset=ds,
                       data_dir=a.data_dir, epochs=a.epochs, threads=1, seed=0, **extra)
            if a.protocol:
                run["protocol"] = a.protocol
            else:
                run["regime"] = a.regime
            budget_epochs = 50 if readout.startswith("comirec") else 10
            points.append(dict(model=name, dataset=ds, run=run, budget_epochs=budget_epochs))
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.workers) as pool:
        got = list(pool.map(measure, points))
    wall = time.perf_counter() - t0
    total = 0.0
    rows = []
    print(f"{'dataset':12} {'model':8} {'steps/ep':>8} {'train CPU-s/ep':>14} {'eval CPU-s/ep':>13} {'epochs':>6} "
          f"{'CPU-s, {0} seeds'.format(a.seeds):>16}")
    for pt, r in zip(points, got):
        train_ep = (r["cpu_s"] - r["eval_cpu_s"]) / r["epochs"]
        eval_ep = r["eval_cpu_s"] / r["epochs"]
        cost = (train_ep + eval_ep) * pt["budget_epochs"] * a.seeds
        if a.first_epoch_once:  # the first epoch's extra (compiling) once a run, the later epochs' mean for each
            later = r["epoch_train_cpu_s"][1:]
            train_ep = sum(later) / len(later)
            extra_first = r["epoch_train_cpu_s"][0] - train_ep
            cost = ((train_ep + eval_ep) * pt["budget_epochs"] + extra_first) * a.seeds
        total += cost
        print(f"{pt['dataset']:12} {pt['model']:8} {r['steps_per_epoch']:>8,} {train_ep:>14.1f} {eval_ep:>13.1f} "
              f"{pt['budget_epochs']:>6} {cost:>16,.0f}")
        rows.append(dict(date=time.strftime("%Y-%m-%d"), protocol=a.protocol or "-", regime=a.regime if not a.protocol
                         else "instances", dataset=pt["dataset"], model=pt["model"], steps_per_epoch=r["steps_per_epoch"],
                         train_cpu_s_per_epoch=round(train_ep, 2), eval_cpu_s_per_epoch=round(eval_ep, 2),
                         budget_epochs=pt["budget_epochs"], seeds=a.seeds, table_cpu_s=round(cost, 1),
                         device=r["device"], blas=r["blas"], workers=a.workers, git_commit=commit,
                         settings=" ".join([f"{k}={v}" for k, v in extra.items()]
                                           + (["first_epoch_once"] if a.first_epoch_once else []))))
    print(f"Table 1 ({len(points)} points x {a.seeds} seeds): {total:,.0f} CPU-s; on two 1-thread workers about "
          f"{total / 2 / 3600:.2f} h wall. Measured in {wall:.0f} s wall, {a.workers} worker(s).")
    if a.out:
        append_rows(a.out, rows)  # locked, atomic, a new column extends the header


if __name__ == "__main__":
    from benchbox.blas import reexec_with_shim
    reexec_with_shim(sys.argv)  # MKL's fast kernels on AMD CPUs, as the benchbox command runs (benchbox/blas.py)
    main()
