"""Figures from the result CSVs alone (a figure can be remade without training).

- ``benchbox plot sweep``: heatmap of a metric over two swept options (the study's Figure 3).
- ``benchbox plot curves``: a metric per epoch for chosen runs, with a dashed horizontal line for a
  reference run at a chosen epoch (the study's Figure 2).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import BenchboxError
from .results import _new_file_mode, frame, load_curves, load_runs


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out: Path) -> Path:
    """Write a PNG atomically (a killed process leaves the old figure or the new one, never half of
    one) and close the figure."""
    import tempfile
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".tmp{out.stem}.", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=120, format="png")
        os.chmod(tmp, _new_file_mode())  # mkstemp makes it 0600
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _plt().close(fig)
    return out


def _option(run_id: str, cfg: dict, key: str):
    if key in cfg.get("mixer_opts", {}):
        return cfg["mixer_opts"][key]
    if key in cfg:
        return cfg[key]
    raise BenchboxError(f"run {run_id} has no option {key!r}")


def sweep_matrix(runs, sweep_id, x, y, metric):
    """Mean of ``metric`` over seeds per (y, x) cell of a sweep's finished rows; diverged cells are NaN.
    Returns (xs, ys, matrix, the sweep's finished rows with columns ``x`` and ``y`` added)."""
    df = frame(runs) if not isinstance(runs, pd.DataFrame) else runs
    if "sweep_id" not in df or df.empty:
        raise BenchboxError(f"no finished rows for sweep {sweep_id!r}")
    sel = df[(df["sweep_id"] == sweep_id) & df["status"].isin(["ok", "diverged"])].copy()
    if sel.empty:
        raise BenchboxError(f"no finished rows for sweep {sweep_id!r}")
    cfgs = [c if isinstance(c, dict) else json.loads(c or "{}") for c in sel["config"]]
    sel["_x"] = [_option(r, c, x) for r, c in zip(sel["run_id"], cfgs)]
    sel["_y"] = [_option(r, c, y) for r, c in zip(sel["run_id"], cfgs)]
    value = pd.to_numeric(sel[metric], errors="coerce") if metric in sel else pd.Series(np.nan, index=sel.index)
    sel["_v"] = value.where(sel["status"] == "ok")
    cells = sel.groupby(["_y", "_x"])["_v"].mean()  # NaN only where every seed diverged
    xs, ys = sorted(sel["_x"].unique()), sorted(sel["_y"].unique())
    m = cells.unstack("_x").reindex(index=ys, columns=xs).to_numpy(dtype=float)
    return xs, ys, m, sel


def sweep_spread(sel, xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """Per cell of ``sweep_matrix``: the sample sd over the seeds that finished ok (NaN below 2 seeds)
    and their count, so a heatmap or table can show how much of a difference between cells is seed
    noise."""
    g = sel.groupby(["_y", "_x"])["_v"]
    sd = g.std(ddof=1).unstack("_x").reindex(index=ys, columns=xs).to_numpy(dtype=float)
    n = g.count().unstack("_x").reindex(index=ys, columns=xs).fillna(0).to_numpy(dtype=int)
    return sd, n


def latest_sweep(runs: pd.DataFrame) -> str:
    sweeps = [s for s in runs.get("sweep_id", []) if s]
    if not sweeps:
        raise BenchboxError("no sweep rows in the results")
    return sweeps[-1]


def plot_sweep(results_dir="results", sweep_id=None, x="mini_batch_size", y="initializer_range",
               metric="test_ndcg@5", out=None) -> Path:
    runs = load_runs(results_dir)
    sweep_id = sweep_id or latest_sweep(runs)
    xs, ys, m, sel = sweep_matrix(runs, sweep_id, x, y, metric)
    sd, n = sweep_spread(sel, xs, ys)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, (1.0 if (n > 1).any() else 0.8) * len(ys) + 2))
    im = ax.imshow(m, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set_yticks(range(len(ys)), [str(v) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    diverged = set(zip(sel.loc[sel["status"] == "diverged", "_y"], sel.loc[sel["status"] == "diverged", "_x"]))
    finite = m[np.isfinite(m)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(ys)):
        for j in range(len(xs)):
            if np.isnan(m[i, j]):  # a diverged point, or a cell the sweep has not run yet
                txt = "div." if (ys[i], xs[j]) in diverged else "-"
            else:  # mean, and the seed sd with the seed count where there are several seeds
                txt = f"{m[i, j]:.4f}" + (f"\n±{sd[i, j]:.4f} ({n[i, j]})" if n[i, j] > 1 else "")
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="gray" if np.isnan(m[i, j]) else "black" if m[i, j] > mid else "white")
    r0 = sel.iloc[0]
    spread = ", mean ± sd over seeds (n)" if (n > 1).any() else ""
    ax.set_title(f"{metric} of {r0['mixer']} on {r0['dataset']} (sweep {sweep_id}){spread}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_figure(fig, out or Path(results_dir) / "figures" / f"sweep_{sweep_id}_{metric.replace('@', '')}.png")


def plot_curves(results_dir="results", run_ids=(), reference=None, reference_epoch=1, metric="test_ndcg@10",
                out=None, labels=None) -> Path:
    curves = load_curves(results_dir)
    runs = {r["run_id"]: r for r in load_runs(results_dir).to_dict("records")}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, rid in enumerate(run_ids):
        pts = curves[curves["run_id"] == rid].sort_values("epoch") if "run_id" in curves else curves
        if pts.empty:
            raise BenchboxError(f"no curve for run {rid!r} in {results_dir}/curves.csv")
        r = runs.get(rid, {})
        label = labels[i] if labels else f"{r.get('mixer', '?')}/{r.get('readout', '?')} ({rid[-6:]})"
        ax.plot(pts["epoch"], pts[metric], marker=".", label=label)
    if reference:
        ref = list(curves.loc[(curves["run_id"] == reference) & (curves["epoch"] == reference_epoch), metric])
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
    return save_figure(fig, out or Path(results_dir) / "figures" / f"curves_{metric.replace('@', '')}.png")


def plot_table1(rows: pd.DataFrame, dataset: str, settings: list[str], out: Path) -> Path:
    """Test NDCG@10 and HR@10 (sampled) per model of one dataset: a bar per setting (mean, error bar = sd
    over seeds, n seeds on the bar), the study's value as a black tick. ``rows``: tables.collect()."""
    from .tables import MODELS, SETTING_TITLES, STUDY
    plt = _plt()
    got = rows[rows["dataset"] == dataset]
    models = [m for m in MODELS if (got["model"] == m).any()]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(models) + 3), 4.2), sharey=False)
    width = 0.8 / max(len(settings), 1)
    study = STUDY.get(dataset, {}) if dataset != "electronics" else {}
    for ax, metric, col in ((axes[0], "NDCG@10", "test_ndcg@10"), (axes[1], "HR@10", "test_hr@10")):
        for i, k in enumerate(settings):
            g = got[got["setting"] == k].groupby("model")[col]
            mean, sd, n = g.mean(), g.std().fillna(0), g.size()
            xs = [j + (i - (len(settings) - 1) / 2) * width for j, m in enumerate(models) if m in mean]
            ms = [m for m in models if m in mean]
            ax.bar(xs, [mean[m] for m in ms], width, yerr=[sd[m] for m in ms], capsize=2,
                   label=SETTING_TITLES.get(k, k).split(":")[0].split("(")[0].strip())
            for x, m in zip(xs, ms):
                ax.text(x, 0.01, str(n[m]), ha="center", va="bottom", fontsize=7, color="white")
        for j, m in enumerate(models):
            if m in study:
                v = study[m][1 if metric == "NDCG@10" else 3]
                ax.plot([j - 0.45, j + 0.45], [v, v], color="black", lw=1.5, label="study" if j == 0 or
                        m == next(x for x in models if x in study) else None)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_title(f"{dataset}: test {metric} (1:99 sampled)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=min(len(seen), 3), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return save_figure(fig, out)
