"""GPU check of every registered mixer: CUDA vs CPU fp32 agreement, and speed, per backend and dtype.

For each mixer in ``mixers.names()``, each backend in ``cls.available_backends(device)`` (passed as
``backend=...`` when the mixer has that option), each dtype (fp32; bf16 = ``torch.autocast`` with
fp32 weights) and each length:

- accuracy: forward + backward on the first ``--ref-batch`` sequences, compared with the CPU fp32
  result of the same weights and inputs: max abs error and max rel error (max |diff| / max |ref|) of
  the output, and the worst of the same over the input gradient and every parameter gradient;
- speed: forward (no grad) and forward + backward on the full batch, timed with CUDA events after
  synchronisation, median of ``--repeats`` after ``--warmup`` (fewer repeats for very slow cases),
  tokens/s = batch * length / time, and peak CUDA memory of forward + backward.

Modules run in eval mode (no dropout) so that the comparison is deterministic. A failing case is
reported in the status column and the check goes on; cases past ``--time-budget`` seconds are skipped.

    python benchmarks/gpu_check.py --out results/gpu_check.csv          # CUDA, batch 64, lengths 200 1000
    python benchmarks/gpu_check.py --device cpu                          # dry run of the same code, tiny sizes

Needs only PyTorch (optional kernels such as mamba-ssm or flash-attn are used when importable).
Without a CUDA device it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mixers  # noqa: E402

COLUMNS = ["device", "mixer", "backend", "dtype", "batch", "length", "d_model", "fwd_ms", "fwd_tok_s",
           "fwdbwd_ms", "fwdbwd_tok_s", "peak_mem_mb", "out_max_abs", "out_max_rel", "grad_max_abs",
           "grad_max_rel", "compile_s", "status"]
SIZES = {  # device -> defaults (the cpu dry run exercises the same code path with tiny sizes)
    "cuda": dict(batch=64, lengths=[200, 1000], d_model=64, repeats=10, warmup=3, ref_batch=8),
    "cpu": dict(batch=2, lengths=[16, 40], d_model=16, repeats=2, warmup=1, ref_batch=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default) or cpu: a dry run of the same code path with tiny sizes")
    p.add_argument("--out", type=Path, default=None, help="write the results as CSV to this path")
    p.add_argument("--mixers", nargs="+", default=None, help="subset of registered mixers (default: all)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int)
    p.add_argument("--lengths", type=int, nargs="+")
    p.add_argument("--d-model", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--ref-batch", type=int, help="sequences compared with the CPU fp32 reference")
    p.add_argument("--time-budget", type=float, default=270.0, help="seconds; later cases are skipped")
    p.add_argument("--reference-max-len", type=int, default=200,
                   help="plain reference backends (token by token) only up to this length")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile each mixer's default backend (lengths up to --compile-max-len)")
    p.add_argument("--compile-max-len", type=int, default=200)
    p.add_argument("--compile-dtypes", nargs="+", default=["bf16"], choices=["fp32", "bf16"])
    p.add_argument("--compile-budget", type=float, default=90.0, help="seconds for all compiled cases")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for k, v in SIZES[a.device].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.ref_batch = min(a.ref_batch, a.batch)
    return a


class Timer:
    """Median wall time of a callable: CUDA events after synchronisation, or perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def once(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def median(self, fn, warmup: int, repeats: int, soft_limit_s: float = 5.0) -> float:
        first = self.once(fn)  # also the first warm-up run
        for _ in range(max(0, warmup - 1)):
            self.once(fn)
        n = max(1, min(repeats, int(soft_limit_s / max(first, 1e-9))))
        return statistics.median(self.once(fn) for _ in range(n))


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(module, x, dy, device, dtype, grads: bool):
    """One forward (under autocast for bf16) and backward; returns (output, [dx, *param grads])."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(grads)
    with autocast(device, dtype):
        y = module(x)
    y.backward(dy.to(y.dtype))
    if not grads:
        return y, None
    return y, [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def max_errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (got.detach().float().cpu() - ref.float()).abs().max().item()
    return diff, diff / max(ref.abs().max().item(), 1e-30)


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"error: {type(e).__name__}: {msg[0][:140] if msg else ''}"


def check(a) -> list[dict]:
    device = torch.device(a.device)
    timer = Timer(device)
    names = a.mixers or mixers.names()
    t_start = time.perf_counter()
    max_len = max(a.lengths)
    rows: list[dict] = []
    t_compile = [0.0]  # seconds spent in compiled cases (their own budget)
    base = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                batch=a.batch, d_model=a.d_model)
    for name in names:
        try:
            cls = mixers.get_class(name)
            has_backend = "backend" in mixers.options(name)
            backends = cls.available_backends(device) if has_backend else ["default"]
            torch.manual_seed(a.seed)
            ref = mixers.build(name, a.d_model, max_len=max_len).eval()      # CPU fp32, default options
            state = ref.state_dict()
        except Exception as e:  # noqa: BLE001 - report and go on
            rows.append(dict(base, mixer=name, backend="-", dtype="-", length="-", status=one_line(e)))
            print(format_row(rows[-1]), flush=True)
            continue
        for length in a.lengths:
            g = torch.Generator().manual_seed(a.seed + length)
            x = torch.randn(a.batch, length, a.d_model, generator=g)
            dy = torch.randn(a.batch, length, a.d_model, generator=g)
            try:
                ref_y, ref_grads = forward_backward(ref, x[:a.ref_batch], dy[:a.ref_batch], torch.device("cpu"),
                                                    "fp32", grads=True)
                ref_y, ref_grads = ref_y.detach(), [t.detach().clone() for t in ref_grads]
            except Exception as e:  # noqa: BLE001
                rows.append(dict(base, mixer=name, backend="-", dtype="-", length=length,
                                 status="cpu reference " + one_line(e)))
                print(format_row(rows[-1]), flush=True)
                continue
            cases = [(b, False) for b in backends]
            if a.compile and length <= a.compile_max_len:
                cases.append((backends[0], True))
            for backend, compiled in cases:
                for dtype in (a.compile_dtypes if compiled else a.dtypes):
                    label = f"compile:{backend}" if compiled else backend
                    row = dict(base, mixer=name, backend=label, dtype=dtype, length=length)
                    rows.append(row)
                    if compiled and t_compile[0] > a.compile_budget:
                        row["status"] = "skipped: compile budget"
                        continue
                    if not compiled and time.perf_counter() - t_start - t_compile[0] > a.time_budget:
                        row["status"] = "skipped: time budget"
                        continue
                    if backend == "reference" and length > a.reference_max_len:
                        row["status"] = f"skipped: reference above L {a.reference_max_len}"
                        continue
                    stage = ["build"]
                    t_case = time.perf_counter()
                    try:
                        run_case(row, stage, name, backend, dtype, length, state, x, dy, ref_y, ref_grads,
                                 max_len, device, timer, a, compiled)
                        row["status"] = "ok"
                    except Exception as e:  # noqa: BLE001 - keep what was measured, say where it failed
                        row["status"] = f"{stage[0]}: {one_line(e)}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    if compiled:
                        t_compile[0] += time.perf_counter() - t_case
                        torch._dynamo.reset()  # each compiled case starts from a clean cache
                    print(format_row(row), flush=True)
    return rows


def run_case(out, stage, name, backend, dtype, length, state, x, dy, ref_y, ref_grads, max_len, device, timer, a,
             compiled=False):
    """Fill ``out`` with errors and timings; ``stage[0]`` names the step in progress (for errors).
    ``compiled``: the module under ``torch.compile`` (dynamic=False: one graph per shape); compile_s is the
    first forward + backward on the full batch, compilation included."""
    opts = {} if backend == "default" else {"backend": backend}
    module = mixers.build(name, a.d_model, max_len=max_len, **opts).eval()
    module.load_state_dict(state)
    module.to(device)
    if device.type == "cuda" and any(isinstance(m, torch.nn.RNNBase) for m in module.modules()):
        module.train()  # cuDNN's RNN backward refuses eval mode; the mixers have no dropout at these settings
    if compiled:
        stage[0] = "compile"
        module = torch.compile(module, dynamic=False)
        t0 = time.perf_counter()
        forward_backward(module, x.to(device), dy.to(device), device, dtype, grads=False)
        with torch.no_grad(), autocast(device, dtype):
            module(x.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        out["compile_s"] = time.perf_counter() - t0
    # accuracy on the first ref_batch sequences
    stage[0] = "accuracy"
    y, grads = forward_backward(module, x[:a.ref_batch].to(device), dy[:a.ref_batch].to(device), device, dtype,
                                grads=True)
    out["out_max_abs"], out["out_max_rel"] = max_errors(y, ref_y)
    errs = [max_errors(gd, gr) for gd, gr in zip(grads, ref_grads)]
    out["grad_max_abs"] = max(e[0] for e in errs)
    out["grad_max_rel"] = max(e[1] for e in errs)
    del y, grads
    # speed on the full batch
    xd, dyd = x.to(device), dy.to(device)
    tokens = a.batch * length

    def fwd():
        with torch.no_grad(), autocast(device, dtype):
            module(xd)

    def fwd_bwd():
        forward_backward(module, xd, dyd, device, dtype, grads=False)

    stage[0] = "fwd+bwd timing"
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = timer.median(fwd_bwd, a.warmup, a.repeats)
    out["fwdbwd_ms"], out["fwdbwd_tok_s"] = t * 1e3, tokens / t
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    stage[0] = "fwd (no_grad) timing"
    t = timer.median(fwd, a.warmup, a.repeats)
    out["fwd_ms"], out["fwd_tok_s"] = t * 1e3, tokens / t


HEADER = (f"{'mixer':<11} {'backend':<16} {'dtype':<5} {'length':>6} {'fwd ms':>9} {'fwd tok/s':>11} "
          f"{'f+b ms':>9} {'f+b tok/s':>11} {'peak MB':>8} {'out abs':>8} {'out rel':>8} {'grad abs':>8} "
          f"{'grad rel':>8} {'comp s':>7}  status")


def format_row(r: dict) -> str:
    def num(key, fmt):
        v = r.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "-"
    return (f"{r['mixer']:<11} {r['backend']:<16} {r['dtype']:<5} {str(r['length']):>6} {num('fwd_ms', '9.2f')} "
            f"{num('fwd_tok_s', '11.3g')} {num('fwdbwd_ms', '9.2f')} {num('fwdbwd_tok_s', '11.3g')} "
            f"{num('peak_mem_mb', '8.0f')} {num('out_max_abs', '8.1e')} {num('out_max_rel', '8.1e')} "
            f"{num('grad_max_abs', '8.1e')} {num('grad_max_rel', '8.1e')} {num('compile_s', '7.1f')}  {r.get('status', '')}")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (dry run)"
    print(f"gpu_check on {dev_name}, torch {torch.__version__}: batch {a.batch}, lengths {a.lengths}, "
          f"d_model {a.d_model}, dtypes {a.dtypes}; errors vs CPU fp32 on {a.ref_batch} sequences "
          f"(rel = max|diff| / max|ref|; grad = worst of input and parameter gradients)")
    print(HEADER)
    print("-" * len(HEADER))
    t0 = time.perf_counter()
    rows = check(a)
    print(f"\n{sum(r.get('status') == 'ok' for r in rows)}/{len(rows)} cases ok in {time.perf_counter() - t0:.0f} s")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in COLUMNS})
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
