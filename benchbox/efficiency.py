"""Efficiency (``benchbox bench``, ``benchbox.bench``): speed, memory and scaling of every mixer inside the whole recommender.

For each (mixer, backend, sequence length, batch size) point it measures
- ``train``: one optimiser step (forward + backward + Adam) of the recommender with 4 negatives per
  position; tokens/s = batch * length / median step time;
- ``encode``: inference over a full history (no grad);
- ``stream``: the serving case: the state after a history of ``length`` clicks is carried and one new
  click is processed (O(1) for TTT, GRU, Mamba; a growing key/value cache for attention);
- peak memory: CUDA ``max_memory_allocated`` after a reset; CPU: the peak resident memory of a child
  process that runs only this point (``VmHWM`` after resetting it, minus the resident size at start).
Warm-up first, then the median and spread (IQR) of ``repeats`` timings; CUDA is timed with events
after synchronisation. A point that runs out of memory is recorded as ``oom``, not a crash.
"""
from __future__ import annotations

import math
import queue
import multiprocessing as mp
import os
import statistics
import time
import traceback
from pathlib import Path

import numpy as np

from . import BenchboxError

MODES = ("train", "encode", "stream")

# The clocks of the timing scripts under benchmarks/: wall time, or this process's CPU time, which is
# immune to other processes taking turns on the cores (training runs in the background) but sums every
# thread's time, so it only means step time with one thread.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_HELP = ("wall: perf_counter; cpu: this process's CPU time (with --threads 1, immune to other processes "
              "taking turns on the cores, e.g. training runs in the background)")


def pick_clock(name: str, threads: int):
    """The timer called ``name`` (wall | cpu); the cpu clock needs one thread."""
    if name not in CLOCKS:
        raise BenchboxError(f"unknown clock {name!r} (wall, cpu)")
    if name == "cpu" and threads != 1:
        raise BenchboxError("--clock cpu sums the CPU time of all threads: use it with --threads 1")
    return CLOCKS[name]


# glibc malloc hands large freed blocks straight back to the kernel (each is its own mmap, and the heap
# top is trimmed), so every training step re-faults tens of MB of fresh zeroed pages: measured on the
# 2-core CPU, 11,122 page faults and 33 ms of kernel time per ML-1M TTT4Rec step (of ~280 ms), 4,909 and
# 9 ms per TTT-Linear forward+backward at L 200, 25,678 and 75 ms for TTT-MLP. Keeping freed memory in
# the heap for reuse (what jemalloc/tcmalloc do, and what the PyTorch CPU tuning guide preloads them for)
# removes most of that; peak memory is unchanged, only what was freed is not returned until exit.
_MALLOPT = {"M_TRIM_THRESHOLD": (-1, 1 << 30), "M_TOP_PAD": (-2, 64 << 20), "M_MMAP_THRESHOLD": (-3, 32 << 20),
            "M_MMAP_MAX": (-4, 0), "M_ARENA_MAX": (-8, 1)}
_allocator: str | None = None


def cpu_allocator() -> str:
    """Tune this process's glibc malloc to keep freed memory for reuse (once; idempotent) and return what
    is in force: ``glibc-retain``, or ``system`` where it is not glibc, the call fails, or the user opted
    out with ``BENCHBOX_MALLOC=system``. Called where a run or a timing starts (like set_num_threads);
    timings record it. Results never depend on it."""
    global _allocator
    if _allocator is None:
        _allocator = "system"
        if os.environ.get("BENCHBOX_MALLOC", "retain") != "system":
            try:
                import ctypes
                import platform
                if platform.libc_ver()[0] == "glibc":
                    libc = ctypes.CDLL(None)
                    if all([libc.mallopt(k, v) == 1 for k, v in _MALLOPT.values()]):
                        _allocator = "glibc-retain"
            except (OSError, AttributeError):
                pass
    return _allocator


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _timeit(fn, repeats: int, warmup: int, cuda: bool, budget_s: float):
    import torch
    for _ in range(warmup):
        fn()
    times = []
    t_start = time.perf_counter()
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s and len(times) >= 3:
            break  # slow point: fewer repeats rather than an hour-long benchmark
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(round(p * (len(times) - 1))))]
    return statistics.median(times), q(0.75) - q(0.25), len(times)


def measure_point(mixer: str, backend: str | None, length: int, batch: int, d_model: int, n_layers: int,
                  device: str, dtype: str, modes: tuple, repeats: int, warmup: int, n_items: int,
                  budget_s: float, opts: dict) -> list[dict]:
    """Run one point in this process; returns one row per mode."""
    import torch
    from .model import Recommender, bce_loss
    import mixers

    cpu = device == "cpu"
    allocator = cpu_allocator() if cpu else "cuda"  # as the runs train (isolated points: a fresh child process)
    from .blas import blas_in_force
    from .kernels import kernels_in_force
    blas = blas_in_force()
    c_kernels = kernels_in_force() if cpu else "-"  # the C paths (model.py installs them into the mixers)
    if cpu:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark of this process
        except OSError:
            pass
        base = _rss_mb("VmRSS")
    dev = torch.device(device)
    amp = torch.bfloat16 if dtype == "bfloat16" else None
    mopts = dict(opts)
    if backend and "backend" in mixers.options(mixer):
        mopts["backend"] = backend
    torch.manual_seed(0)
    model = Recommender(n_items, mixer, mopts, d_model, n_layers, max_len=length + 64, dropout=0.0).to(dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    items = torch.randint(1, n_items + 1, (batch, length), generator=g).to(dev)
    targets = torch.randint(1, n_items + 1, (batch, length), generator=g).to(dev)
    negs = torch.randint(1, n_items + 1, (batch, length, 4), generator=g).to(dev)
    lengths = torch.full((batch,), length, device=dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    ac = lambda: torch.autocast(dev.type, dtype=amp, enabled=amp is not None)
    rows = []

    def record(mode, fn, tokens):
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        status, med, iqr, n = "ok", float("nan"), float("nan"), 0
        try:
            med, iqr, n = _timeit(fn, repeats, warmup, dev.type == "cuda", budget_s)
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:  # noqa: F841
            status = "oom"
        except RuntimeError as e:
            if "out of memory" not in str(e).lower():
                raise
            status = "oom"
        mem = (torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else float("nan")
        rows.append({"mode": mode, "status": status, "median_s": med, "iqr_s": iqr, "repeats": n,
                     "tokens_per_s": tokens / med if status == "ok" else float("nan"), "peak_mem_mb": mem,
                     "allocator": allocator, "blas": blas, "cpu_kernels": c_kernels})

    def train_step():
        with ac():
            logits = model.train_logits(items, lengths, targets, negs)
        loss = bce_loss(logits.float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if "train" in modes:
        model.train()
        record("train", train_step, batch * length)
    model.eval()
    if "encode" in modes:
        def encode():
            with torch.no_grad(), ac():
                model.encode(items, lengths)
        record("encode", encode, batch * length)
    if "stream" in modes:
        streamable = all(b.mixer.supports_streaming for b in model.blocks)
        if streamable:
            with torch.no_grad(), ac():
                state = model.init_stream(batch, device=dev, dtype=torch.float32)
                _, state = model.stream(items, state)  # carry the state of a `length`-click history
            click = items[:, :1]
            holder = {"state": state}

            def one_click():
                with torch.no_grad(), ac():
                    _, holder["state"] = model.stream(click, holder["state"])
            record("stream", one_click, batch)
    if cpu:
        peak = _rss_mb("VmHWM") - base
        for r in rows:
            r["peak_mem_mb"] = peak  # the child ran only this point: its peak covers all modes
    return rows


def _child(q, kwargs):
    try:
        q.put(("ok", measure_point(**kwargs)))
    except MemoryError:
        q.put(("oom", "MemoryError"))
    except Exception as e:  # reported as a failed point, never a crash of the whole benchmark
        q.put(("failed", f"{type(e).__name__}: {e}".splitlines()[0] + " | " + traceback.format_exc(limit=2)[-300:]))


def run_point_isolated(timeout_s: float, **kwargs) -> tuple[str, object]:
    """CPU points run in a child process so that its peak RSS is this point's alone. The child comes
    from a fork server that has imported torch but never ran an op: a plain fork of a process whose
    OpenMP pool has run (a test session, a notebook) can deadlock in the child. A child killed by the
    OOM killer counts as ``oom``."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "benchbox.efficiency"])
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, kwargs), daemon=True)
    p.start()
    result, deadline = None, time.monotonic() + timeout_s
    while result is None and time.monotonic() < deadline:  # read before join: a child blocked on a
        try:                                                # full pipe would never exit
            result = q.get(timeout=1.0)
        except queue.Empty:
            if not p.is_alive() and q.empty():
                break  # died without an answer (OOM killer, segfault)
    if result is None:
        if p.is_alive():
            p.kill()
            p.join()
            return "timeout", f"point took over {timeout_s:.0f}s"
        p.join()
        return ("oom" if p.exitcode in (-9, 137) else "failed"), f"child exit code {p.exitcode}"
    p.join(10)
    return result


def growth_exponent(lengths, values) -> float:
    """Slope of log(value) against log(length): ~1 linear, ~2 quadratic."""
    pts = [(math.log(l), math.log(v)) for l, v in zip(lengths, values) if v and v == v and v > 0]
    if len(pts) < 2:
        return float("nan")
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def run_bench(mixer_names, seq_lens, batch_sizes, d_model=64, n_layers=2, device="cpu", dtype="float32",
              modes=MODES, repeats=5, warmup=2, n_items=10000, budget_s=20.0, timeout_s=600.0, opts=None,
              backends="auto", out="results/efficiency.csv", log=None, isolate=None) -> list[dict]:
    import torch
    import mixers
    from .results import append_rows
    from .train import environment, resolve_device

    dev = resolve_device(device)
    env = environment(dev)
    isolate = (dev.type == "cpu") if isolate is None else isolate
    rows = []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    bench_id = time.strftime("%Y%m%d-%H%M%S")
    for name in mixer_names:
        cls = mixers.get_class(name)
        blist = cls.available_backends(dev.type) if backends == "all" else [cls.auto_backend(dev.type)]
        for backend in blist:
            for L in seq_lens:
                for B in batch_sizes:
                    kw = dict(mixer=name, backend=backend, length=L, batch=B, d_model=d_model, n_layers=n_layers,
                              device=dev.type if dev.type == "cpu" else str(dev), dtype=dtype, modes=tuple(modes),
                              repeats=repeats, warmup=warmup, n_items=n_items, budget_s=budget_s, opts=opts or {})
                    if isolate:
                        status, payload = run_point_isolated(timeout_s, **kw)
                    else:
                        try:
                            status, payload = "ok", measure_point(**kw)
                        except Exception as e:
                            status, payload = "failed", f"{type(e).__name__}: {e}".splitlines()[0]
                    base = {"bench_id": bench_id, "time": stamp, "mixer": name, "backend": backend, "seq_len": L,
                            "batch_size": B, "d_model": d_model, "n_layers": n_layers, "dtype": dtype,
                            "mixer_opts": str(opts or {}), **env}
                    if status == "ok":
                        new = [{**base, **r} for r in payload]
                    else:
                        new = [{**base, "mode": m, "status": status, "error": str(payload)[:300]} for m in modes]
                    rows += new
                    if out:
                        append_rows(out, new)
                    for r in new if log else ():
                        log(_line(r))
    return rows


def _line(r) -> str:
    if r["status"] != "ok":
        return f"{r['mixer']:>10} {r['backend']:>9} L={r['seq_len']:<5} B={r['batch_size']:<4} {r['mode']:>6}: {r['status']}"
    unit = "clicks/s" if r["mode"] == "stream" else "tok/s"
    return (f"{r['mixer']:>10} {r['backend']:>9} L={r['seq_len']:<5} B={r['batch_size']:<4} {r['mode']:>6}: "
            f"{r['median_s'] * 1000:9.2f} ms  {r['tokens_per_s']:>12,.0f} {unit}  mem {r['peak_mem_mb']:8.1f} MB")


# --------------------------------------------------------------------------------------------
def summary_table(rows, title="efficiency"):
    from rich.table import Table
    t = Table(title=title)
    for c in ("mixer", "backend", "L", "B", "train ms", "train tok/s", "encode tok/s", "stream ms/click",
              "peak MB"):
        t.add_column(c, justify="right")
    key = lambda r: (r["mixer"], r["backend"], int(r["seq_len"]), int(r["batch_size"]))
    grouped: dict = {}
    for r in rows:
        grouped.setdefault(key(r), {})[r["mode"]] = r
    fmt = lambda v, f: "-" if v is None or v != v else format(v, f)
    for k in sorted(grouped):
        g = grouped[k]
        get = lambda m, f: float(g[m][f]) if m in g and g[m].get("status") == "ok" else None
        status = "/".join(sorted({g[m]["status"] for m in g} - {"ok"}))
        t.add_row(k[0], k[1], str(k[2]), str(k[3]), fmt(_ms(get("train", "median_s")), ".1f"),
                  fmt(get("train", "tokens_per_s"), ",.0f"), fmt(get("encode", "tokens_per_s"), ",.0f"),
                  fmt(_ms(get("stream", "median_s")), ".3f"),
                  fmt(max([float(g[m].get("peak_mem_mb") or "nan") for m in g] + [float("nan")]), ".0f")
                  + (f" {status}" if status else ""))
    return t


def _ms(v):
    return None if v is None else v * 1000


def exponents(rows, mode="train", field="median_s"):
    """{(mixer, backend, batch): exponent} of time (or memory) against length."""
    out = {}
    by: dict = {}
    for r in rows:
        if r["mode"] == mode and r["status"] == "ok":
            by.setdefault((r["mixer"], r["backend"], int(r["batch_size"])), []).append((int(r["seq_len"]), float(r[field])))
    for k, pts in by.items():
        pts.sort()
        out[k] = growth_exponent([p[0] for p in pts], [p[1] for p in pts])
    return out


def plot_scaling(rows, out_dir="results/figures", tag="cpu"):
    from .plots import _plt, save_figure
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for field, label, fname in (("median_s", "train step time (s)", "time"), ("peak_mem_mb", "peak memory (MB)", "memory")):
        batches = sorted({int(r["batch_size"]) for r in rows if r["mode"] == "train"})
        if not batches:
            continue
        B = batches[-1]
        sub = [r for r in rows if int(r["batch_size"]) == B]
        exps = exponents(sub, "train", field)
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        for (mixer, backend, _), e in sorted(exps.items()):
            pts = sorted((int(r["seq_len"]), float(r[field])) for r in sub
                         if r["mixer"] == mixer and r["backend"] == backend and r["mode"] == "train" and r["status"] == "ok")
            ax.plot(*zip(*pts), marker="o", label=f"{mixer} ({backend}): exponent {e:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs length, batch {B}, {tag}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / f"scaling_{fname}_{tag}.png"))
    return paths


def _ints(v, what: str) -> list[int]:
    try:
        got = [int(x) for x in (v.split(",") if isinstance(v, str) else v)]
    except ValueError:
        raise BenchboxError(f"{what} takes comma-separated integers, got {v!r}") from None
    if not got or min(got) < 1:
        raise BenchboxError(f"{what} must be integers >= 1, got {v!r}")
    return got


def bench(mixers="all", seq_lens=(50, 200, 1000), batch_sizes=(64,), *, d_model=64, n_layers=2, device="cpu",
          dtype="float32", modes=MODES, repeats=5, warmup=2, n_items=10000, budget_s=20.0, timeout_s=900.0,
          opts=None, backends="auto", out="results/efficiency.csv", figures="results/figures", log=None):
    """Measure every (mixer, backend, length, batch) point (``benchbox bench``): rows appended to ``out``,
    scaling figures written to ``figures`` when several lengths are measured. Lists may be given as
    comma strings, as on the command line. Returns (rows, figure paths)."""
    import mixers as mixer_lib
    from .config import parse_opts
    names = mixer_lib.names() if mixers == "all" else [m.strip() for m in (mixers.split(",") if isinstance(mixers, str) else mixers)]
    for n in names:
        mixer_lib.get_class(n)
    modes = tuple(m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes))
    bad = set(modes) - set(MODES)
    if bad:
        raise BenchboxError(f"unknown mode(s) {', '.join(sorted(bad))}; choose from {', '.join(MODES)}")
    lens, batches = _ints(seq_lens, "--seq-lens"), _ints(batch_sizes, "--batch-sizes")
    if repeats < 1:
        raise BenchboxError("--repeats must be >= 1")
    if backends not in ("auto", "all"):
        raise BenchboxError(f"--backends must be auto or all, got {backends!r}")
    opts = parse_opts(opts) if isinstance(opts, list) else (opts or {})
    rows = run_bench(names, lens, batches, d_model, n_layers, device, dtype, modes, repeats, warmup, n_items,
                     budget_s, timeout_s, opts, backends, out, log)
    paths = []
    if figures and len(lens) > 1:
        paths = plot_scaling(rows, figures, f"{'cuda' if device.startswith('cuda') else device}_{dtype}")
    return rows, paths
