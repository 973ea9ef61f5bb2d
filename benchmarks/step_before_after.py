"""Training-step time of two checkouts of benchbox side by side (A B A B ...), one configuration.

Each measurement is a fresh subprocess that imports benchbox from its checkout, builds the run exactly as
``benchbox run`` does (benchbox.train.build_training), takes ``--warmup`` steps and times ``--steps`` more.
It reports process CPU time per step (robust to other processes sharing the cores) and wall time; the
medians over ``--pairs`` pairs and the per-pair ratios. Make the "before" checkout with
``git worktree add /tmp/before <commit>``.

    python benchmarks/step_before_after.py /tmp/before . --mixer ttt_linear --dataset ml-1m --protocol study
    python benchmarks/step_before_after.py /tmp/before . --mixer attention --dataset beauty --protocol "" \
        --set regime=instances --set window=50 --set batch_size=10240   # RecBole's rows (recbole_ratio.py)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from benchbox.config import make_config
from benchbox.train import build_training, train_step
a = json.loads(sys.argv[2])
cfg = make_config(mixer=a["mixer"], readout=a["readout"], dataset=a["dataset"], protocol=a["protocol"] or None,
                  threads=1, **a.get("set", {}))
torch.set_num_threads(1)
tr = build_training(cfg)
tr.model.train()
it = iter(tr.loader)
for _ in range(a["warmup"]):
    train_step(tr.model, tr.opt, next(it), tr.dev, tr.amp)
c0, w0 = time.process_time(), time.perf_counter()
for _ in range(a["steps"]):
    train_step(tr.model, tr.opt, next(it), tr.dev, tr.amp)
print(json.dumps({"cpu_ms": (time.process_time() - c0) / a["steps"] * 1e3,
                  "wall_ms": (time.perf_counter() - w0) / a["steps"] * 1e3, "steps_per_epoch": len(tr.loader)}))
"""


def measure(checkout: str, args: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, checkout, json.dumps(args)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--mixer", default="attention")
    p.add_argument("--readout", default="last")
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--protocol", default="study")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another configuration field (a number where it parses as one), e.g. window=50")
    a = p.parse_args(argv)
    args = {k: getattr(a, k) for k in ("mixer", "readout", "dataset", "protocol", "warmup", "steps")}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchbox import BenchboxError
    from benchbox.config import parse_opts
    try:
        args["set"] = parse_opts(a.set, numbers=True)
    except BenchboxError as e:
        p.error(str(e))
    got = {"before": [], "after": []}
    for _ in range(a.pairs):
        for side in ("before", "after"):
            got[side].append(measure(getattr(a, side), args))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("cpu_ms", "wall_ms")} for s, rs in got.items()}
    ratios = [round(b["cpu_ms"] / f["cpu_ms"], 2) for b, f in zip(got["before"], got["after"])]
    n = got["after"][0]["steps_per_epoch"]
    extra = "".join(f", {k}={v}" for k, v in args["set"].items())
    print(f"{a.mixer}/{a.readout} {a.dataset} protocol {a.protocol or '-'}{extra}: CPU ms/step before "
          f"{med['before']['cpu_ms']:.1f}, after {med['after']['cpu_ms']:.1f} (x{med['before']['cpu_ms'] / med['after']['cpu_ms']:.2f}; "
          f"pairs {ratios}); wall ms/step {med['before']['wall_ms']:.1f} -> {med['after']['wall_ms']:.1f}; "
          f"{n:,} steps per epoch -> {med['before']['cpu_ms'] * n / 1e3:.0f} -> {med['after']['cpu_ms'] * n / 1e3:.0f} CPU-s per epoch")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchbox.blas import reexec_with_shim
    reexec_with_shim(sys.argv)  # MKL's fast kernels on AMD CPUs, as the benchbox command runs (benchbox/blas.py)
    main()
