"""Forward+backward throughput of the TTT mixers alone (tokens/s), as a table.

    python benchmarks/ttt_throughput.py --mixers ttt_linear,ttt_mlp --seq-lens 50,200 \
        --mini-batch-sizes 1,16 --batch-size 128 --d-model 64 --heads 2 --repeats 5 --threads 2

Each cell builds the mixer (float32 by default), runs ``--warmup`` untimed iterations, then times
``--repeats`` iterations of forward + backward (gradient w.r.t. the input and every parameter) and
reports the median. tokens/s = batch_size * seq_len / median seconds. ``--backends torch,reference``
also times the plain reference (slow: keep its sizes small, or rely on ``--max-seconds``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import mixers  # noqa: E402
import benchbox.model  # noqa: E402,F401  (installs the harness's C paths into the mixers, as a run has them)


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _strs(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def time_cell(name: str, backend: str, seq_len: int, mbs: int, args) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    extra = dict(kv.split("=", 1) for kv in args.option)
    m = mixers.build(name, args.d_model, max_len=max(seq_len, 1), num_heads=args.heads, mini_batch_size=mbs,
                     backend=backend, **extra).to(dtype)
    m.train()
    x = torch.randn(args.batch_size, seq_len, args.d_model, dtype=dtype, requires_grad=not args.forward_only)
    gy = torch.randn_like(x)

    def once() -> float:
        t0 = time.perf_counter()
        if args.forward_only:
            with torch.no_grad():
                m(x)
        else:
            y = m(x)
            y.backward(gy)
            x.grad = None
            m.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    spent = 0.0
    for _ in range(args.warmup):
        spent += once()
    times = []
    while len(times) < args.repeats and (not times or spent < args.max_seconds):
        t = once()
        times.append(t)
        spent += t
    med = statistics.median(times)
    return {"mixer": name, "backend": backend, "L": seq_len, "mbs": mbs, "n": len(times), "median_s": med,
            "min_s": min(times), "tok_s": args.batch_size * seq_len / med}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mixers", type=_strs, default=["ttt_linear", "ttt_mlp"])
    ap.add_argument("--backends", type=_strs, default=["torch"], help="comma list of: torch, reference")
    ap.add_argument("--seq-lens", type=_ints, default=[50, 200])
    ap.add_argument("--mini-batch-sizes", type=_ints, default=[1, 16])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--forward-only", action="store_true", help="time forward under no_grad instead")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="stop repeating a cell once this much time was spent on it (at least one timed run)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra mixer option, e.g. --option use_gate=true (repeatable)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    what = "forward" if args.forward_only else "forward+backward"
    print(f"# {what}, batch {args.batch_size}, d_model {args.d_model}, heads {args.heads}, {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    head = f"{'mixer':<11} {'backend':<9} {'L':>5} {'mbs':>4} {'runs':>4} {'median ms':>10} {'min ms':>9} {'tokens/s':>10}"
    print(head)
    print("-" * len(head), flush=True)
    for name in args.mixers:
        for backend in args.backends:
            for L in args.seq_lens:
                for mbs in args.mini_batch_sizes:
                    r = time_cell(name, backend, L, mbs, args)
                    print(f"{r['mixer']:<11} {r['backend']:<9} {r['L']:>5} {r['mbs']:>4} {r['n']:>4} "
                          f"{r['median_s'] * 1e3:>10.1f} {r['min_s'] * 1e3:>9.1f} {r['tok_s']:>10,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    from benchbox.blas import reexec_with_shim
    reexec_with_shim(sys.argv)  # MKL's fast kernels on AMD CPUs, as the benchbox command runs (benchbox/blas.py)
    raise SystemExit(main())
