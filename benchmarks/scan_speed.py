"""Speed of the chunked selective scan against the sequential reference (pure PyTorch).

Times ``selective_scan_chunked`` and ``selective_scan_reference`` from ``mixers.mamba`` on the same
inputs, forward only (no autograd) and forward + backward, at several lengths; prints the median of
``--repeats`` runs after ``--warmup`` runs, and the speedup (reference time / chunked time).

    python benchmarks/scan_speed.py                          # batch 64, d_model 64 (d_inner 128), d_state 16
    python benchmarks/scan_speed.py --lengths 50 200 --repeats 3 --device cuda
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixers.mamba import selective_scan_chunked, selective_scan_reference  # noqa: E402


def make_inputs(batch, length, d_inner, d_state, device, dtype, seed=0):
    """Inputs shaped like a freshly initialised Mamba block's scan inputs."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    dt = torch.exp(torch.rand(d_inner, generator=g, dtype=dtype) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    ins = dict(u=r(batch, length, d_inner), delta=r(batch, length, d_inner) * 0.5,
               A=-torch.arange(1, d_state + 1, dtype=dtype).repeat(d_inner, 1),
               B=r(batch, length, d_state), C=r(batch, length, d_state), D=torch.ones(d_inner, dtype=dtype),
               z=r(batch, length, d_inner), delta_bias=dt + torch.log(-torch.expm1(-dt)))
    return {k: v.to(device).requires_grad_() for k, v in ins.items()}


def timed(fn, warmup, repeats, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 1000])
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    d_inner = a.expand * a.d_model
    print(f"selective scan: batch {a.batch}, d_inner {d_inner} (d_model {a.d_model} x {a.expand}), "
          f"d_state {a.d_state}, {a.dtype}, {device}, {torch.get_num_threads()} threads, chunk_size {a.chunk_size}; "
          f"median of {a.repeats} after {a.warmup} warm-up")
    scans = {"reference": selective_scan_reference,
             "chunked": lambda *x, **k: selective_scan_chunked(*x, chunk_size=a.chunk_size, **k)}
    head = f"{'length':>6}  {'pass':<8} {'reference ms':>13} {'chunked ms':>11} {'speedup':>8}"
    print(head)
    print("-" * len(head))
    for length in a.lengths:
        ins = make_inputs(a.batch, length, d_inner, a.d_state, device, dtype)
        grad = torch.randn(a.batch, length, d_inner, dtype=dtype, device=device)

        def fwd(scan):
            with torch.no_grad():
                scan(**ins, delta_softplus=True)

        def fwd_bwd(scan):
            scan(**ins, delta_softplus=True).backward(grad)

        for label, run in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            t = {name: timed(lambda: run(scan), a.warmup, a.repeats, device) for name, scan in scans.items()}
            print(f"{length:>6}  {label:<8} {t['reference'] * 1e3:>13.1f} {t['chunked'] * 1e3:>11.1f} "
                  f"{t['reference'] / t['chunked']:>7.1f}x", flush=True)


if __name__ == "__main__":
    from benchbox.blas import reexec_with_shim
    reexec_with_shim(sys.argv)  # MKL's fast kernels on AMD CPUs, as the benchbox command runs (benchbox/blas.py)
    main()
