"""Figures from the result CSVs alone (a figure can be remade without training).

- ``benchbox plot sweep``: heatmap of a metric over two swept options (the study's Figure 3).
- ``benchbox plot curves``: a metric per epoch for chosen runs, with a dashed horizontal line for a
  reference run at a chosen epoch (the study's Figure 2).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import BenchboxError
from .results import read_rows


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _option(row: dict, key: str):
    cfg = json.loads(row.get("config") or "{}")
    if key in cfg.get("mixer_opts", {}):
        return cfg["mixer_opts"][key]
    if key in cfg:
        return cfg[key]
    raise BenchboxError(f"run {row.get('run_id')} has no option {key!r}")


def sweep_matrix(rows, sweep_id, x, y, metric):
    """Mean of ``metric`` over seeds per (y, x) cell of a sweep's finished rows; diverged cells are NaN."""
    sel = [r for r in rows if r.get("sweep_id") == sweep_id and r.get("status") in ("ok", "diverged")]
    if not sel:
        raise BenchboxError(f"no finished rows for sweep {sweep_id!r}")
    xs = sorted({_option(r, x) for r in sel})
    ys = sorted({_option(r, y) for r in sel})
    cells: dict = {}
    for r in sel:
        v = float(r[metric]) if r.get("status") == "ok" and r.get(metric) not in (None, "") else float("nan")
        cells.setdefault((_option(r, y), _option(r, x)), []).append(v)
    m = np.full((len(ys), len(xs)), np.nan)
    for (yv, xv), vals in cells.items():
        m[ys.index(yv), xs.index(xv)] = np.nanmean(vals) if not all(np.isnan(vals)) else np.nan
    return xs, ys, m, sel


def latest_sweep(rows) -> str:
    sweeps = [r["sweep_id"] for r in rows if r.get("sweep_id")]
    if not sweeps:
        raise BenchboxError("no sweep rows in the results")
    return sweeps[-1]


def plot_sweep(results_dir="results", sweep_id=None, x="mini_batch_size", y="initializer_range",
               metric="test_ndcg@5", out=None) -> Path:
    rows = read_rows(Path(results_dir) / "runs.csv")
    sweep_id = sweep_id or latest_sweep(rows)
    xs, ys, m, sel = sweep_matrix(rows, sweep_id, x, y, metric)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.8 * len(ys) + 2))
    im = ax.imshow(m, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set_yticks(range(len(ys)), [str(v) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    diverged = {(_option(r, y), _option(r, x)) for r in sel if r.get("status") == "diverged"}
    finite = m[np.isfinite(m)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(ys)):
        for j in range(len(xs)):
            if np.isnan(m[i, j]):  # a diverged point, or a cell the sweep has not run yet
                txt = "div." if (ys[i], xs[j]) in diverged else "-"
            else:
                txt = f"{m[i, j]:.4f}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="gray" if np.isnan(m[i, j]) else "black" if m[i, j] > mid else "white")
    r0 = sel[0]
    ax.set_title(f"{metric} of {r0['mixer']} on {r0['dataset']} (sweep {sweep_id})", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out = Path(out or Path(results_dir) / "figures" / f"sweep_{sweep_id}_{metric.replace('@', '')}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_curves(results_dir="results", run_ids=(), reference=None, reference_epoch=1, metric="test_ndcg@10",
                out=None, labels=None) -> Path:
    curves = read_rows(Path(results_dir) / "curves.csv")
    runs = {r["run_id"]: r for r in read_rows(Path(results_dir) / "runs.csv")}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, rid in enumerate(run_ids):
        pts = sorted((int(c["epoch"]), float(c[metric])) for c in curves if c["run_id"] == rid)
        if not pts:
            raise BenchboxError(f"no curve for run {rid!r} in {results_dir}/curves.csv")
        r = runs.get(rid, {})
        label = labels[i] if labels else f"{r.get('mixer', '?')}/{r.get('readout', '?')} ({rid[-6:]})"
        ax.plot(*zip(*pts), marker=".", label=label)
    if reference:
        ref = [float(c[metric]) for c in curves if c["run_id"] == reference and int(c["epoch"]) == reference_epoch]
        if not ref:
            raise BenchboxError(f"run {reference!r} has no epoch {reference_epoch} in curves.csv")
        r = runs.get(reference, {})
        ax.axhline(ref[0], ls="--", color="k",
                   label=f"{r.get('mixer', reference)} at epoch {reference_epoch}: {ref[0]:.4f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ds = {runs.get(rid, {}).get("dataset", "?") for rid in run_ids}
    ax.set_title(f"{metric} per epoch on {', '.join(sorted(ds))}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out or Path(results_dir) / "figures" / f"curves_{metric.replace('@', '')}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def register(sub):
    p = sub.add_parser("plot", help="figures from the result CSVs (sweep heatmap, learning curves)")
    ps = p.add_subparsers(dest="plot", required=True)
    s = ps.add_parser("sweep", help="heatmap of a metric over two swept options (Figure 3)")
    s.add_argument("--sweep-id", default=None, help="default: the latest sweep in runs.csv")
    s.add_argument("--x", default="mini_batch_size")
    s.add_argument("--y", default="initializer_range")
    s.add_argument("--metric", default="test_ndcg@5")
    s.add_argument("--results-dir", default="results")
    s.add_argument("--out", default=None)
    s.set_defaults(func=lambda a: _done(plot_sweep(a.results_dir, a.sweep_id, a.x, a.y, a.metric, a.out)))
    c = ps.add_parser("curves", help="a metric per epoch for runs, with a reference line (Figure 2)")
    c.add_argument("--runs", required=True, help="comma-separated run ids")
    c.add_argument("--reference", default=None, help="run id drawn as a dashed line")
    c.add_argument("--reference-epoch", type=int, default=1)
    c.add_argument("--metric", default="test_ndcg@10")
    c.add_argument("--labels", default=None, help="comma-separated legend labels")
    c.add_argument("--results-dir", default="results")
    c.add_argument("--out", default=None)
    c.set_defaults(func=lambda a: _done(plot_curves(a.results_dir, a.runs.split(","), a.reference,
                                                    a.reference_epoch, a.metric, a.out,
                                                    a.labels.split(",") if a.labels else None)))


def _done(path) -> int:
    from .cli import console
    console.print(f"figure: {path}")
    return 0
