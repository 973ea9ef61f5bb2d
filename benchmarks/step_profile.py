"""Time and profile the training steps of one configuration, exactly as ``benchbox run`` takes them.

Builds the run's model, optimiser and loader (benchbox.train.build_training), takes ``--warmup`` steps,
then times ``--steps`` steps (median ms per step, and the share spent producing batches) and profiles
``--profile-steps`` of them with torch.profiler (top operators by self CPU time).

    python benchmarks/step_profile.py --mixer attention --dataset ml-1m --protocol study --threads 1
    python benchmarks/step_profile.py --mixer ttt_linear --dataset beauty --protocol study --steps 100
    python benchmarks/step_profile.py --dataset beauty --protocol "" --set regime=instances --set window=50 \
        --set batch_size=10240 --steps 30 --profile-steps 10     # RecBole's rows (recbole_ratio.py)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchbox.config import make_config, parse_opts  # noqa: E402
from benchbox.train import build_training, train_step  # noqa: E402
from benchbox import BenchboxError  # noqa: E402
from benchbox.efficiency import CLOCK_HELP, CLOCKS, pick_clock  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mixer", default="attention")
    p.add_argument("--readout", default="last")
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--protocol", default="study")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--profile-steps", type=int, default=50)
    p.add_argument("--rows", type=int, default=25, help="operators shown")
    p.add_argument("--shapes", action="store_true", help="group the operators by input shapes")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall", help=CLOCK_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another configuration field (a number where it parses as one), e.g. window=50")
    a = p.parse_args(argv)
    try:
        extra = parse_opts(a.set, numbers=True)
    except BenchboxError as e:
        p.error(str(e))
    try:
        clock = pick_clock(a.clock, a.threads)
    except BenchboxError as e:
        sys.exit(str(e))
    cfg = make_config(mixer="none" if a.readout != "last" else a.mixer, readout=a.readout, dataset=a.dataset,
                      protocol=a.protocol or None, threads=a.threads, **extra)
    torch.set_num_threads(a.threads)
    tr = build_training(cfg)
    model, opt, loader, dev, amp = tr.model, tr.opt, tr.loader, tr.dev, tr.amp
    model.train()

    def forever():  # epochs one after another: a large batch makes few steps an epoch
        while True:
            yield from loader
    batches = forever()
    for _ in range(a.warmup):
        train_step(model, opt, next(batches), dev, amp)
    step_ms, load_ms = [], []
    for _ in range(a.steps):
        t0 = clock()
        batch = next(batches)
        t1 = clock()
        train_step(model, opt, batch, dev, amp)
        t2 = clock()
        load_ms.append((t1 - t0) * 1e3)
        step_ms.append((t2 - t0) * 1e3)
    med = statistics.median(step_ms)
    print(f"{cfg.mixer}/{cfg.readout} {cfg.dataset} {cfg.regime} (window {cfg.window}): {loader.batch_size} rows "
          f"per step, {len(loader):,} steps per epoch; median step {med:.1f} ms (batch production "
          f"{statistics.median(load_ms):.1f} ms), {a.threads} thread(s), {a.clock} clock -> {med * len(loader) / 1e3:.0f} s "
          f"per epoch")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=a.shapes) as prof:
        for _ in range(a.profile_steps):
            train_step(model, opt, next(batches), dev, amp)
    print(prof.key_averages(group_by_input_shape=a.shapes).table(sort_by="self_cpu_time_total", row_limit=a.rows,
                                                                  max_shapes_column_width=70))


if __name__ == "__main__":
    from benchbox.blas import reexec_with_shim
    reexec_with_shim(sys.argv)  # MKL's fast kernels on AMD CPUs, as the benchbox command runs (benchbox/blas.py)
    main()
