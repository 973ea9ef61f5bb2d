"""``benchbox report``: results/report.md from the CSVs alone (runs, sweeps, efficiency, figures)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from .results import _write_atomic, load_frame
from .sweeps import identity

METRICS = ("ndcg@5", "ndcg@10", "hr@5", "hr@10")


def _f(v, fmt=".4f"):
    return "-" if v is None or pd.isna(v) else format(float(v), fmt)


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, NaN where a row (of an older CSV) lacks it."""
    return pd.to_numeric(df[name], errors="coerce") if name in df else pd.Series(float("nan"), index=df.index)


def _mean_sd(vals: pd.Series) -> str:
    vals = vals.dropna()
    if vals.empty:
        return "-"
    return f"{vals.iloc[0]:.4f}" if len(vals) == 1 else f"{vals.mean():.4f} ± {vals.std():.4f}"


def runs_section(runs: pd.DataFrame) -> list[str]:
    out = ["## Runs (latest configuration per dataset, mixer and readout; mean ± sd over seeds)", ""]
    ok = runs[(runs["status"] == "ok") & (runs.get("sweep_id", "") == "")] if len(runs) else runs
    if ok.empty:
        return out + ["No finished runs.", ""]
    ok = ok.assign(readout=ok["readout"] if "readout" in ok else "last", config_wo_seed=[identity(c, ignore=("seed",)) for c in ok.get("config", "")])
    for ds, rows in ok.groupby("dataset", sort=True):
        out += [f"### {ds}", "", "| mixer | readout | seeds | " + " | ".join(f"test {m}" for m in METRICS)
                + " | s/epoch | device | torch | commit |", "|" + "---|" * (9 + len(METRICS) - 4)]
        for (mixer, readout), rs in rows.groupby(["mixer", "readout"], sort=True):
            same = rs[rs["config_wo_seed"] == rs["config_wo_seed"].iloc[-1]]  # the latest configuration
            same = same.drop_duplicates("seed", keep="last")  # the latest row per seed
            last = same.iloc[-1]
            out.append(f"| {mixer} | {readout} | {len(same)} | "
                       + " | ".join(_mean_sd(_col(same, f"test_{m}")) for m in METRICS)
                       + f" | {_f(_col(same, 'sec_per_epoch').mean(), '.1f')} | {last.get('device', '')}"
                       f" | {last.get('torch_version', '')} | {last.get('git_commit', '')} |")
        out.append("")
    return out


def _flat_settings(cfg_json: str) -> dict:
    """A stored config as one flat dict of run and mixer/readout options."""
    try:
        c = json.loads(cfg_json or "{}")
    except json.JSONDecodeError:
        c = {}
    opts = {**c.pop("mixer_opts", {}), **c.pop("readout_opts", {})}
    return {**{k: v for k, v in c.items() if not isinstance(v, (dict, list))}, **opts}


def swept_settings(rows: pd.DataFrame) -> pd.DataFrame:
    """The settings that vary across a sweep's rows (run, mixer and readout options alike, from the
    stored configs), one column each; the seed and execution-only settings (threads) excluded."""
    flat = pd.DataFrame([_flat_settings(c) for c in rows.get("config", [""] * len(rows))], index=rows.index, dtype=object)
    flat = flat.where(flat.notna(), None)  # a setting that only some rows have is None in the others
    keys = [k for k in sorted(flat.columns) if k not in ("seed", "run_id", "sweep_id", "threads", "data_dir")
            and flat[k].map(json.dumps).nunique() > 1]
    return flat[keys]


def sweep_title(sid: str, rows: pd.DataFrame, varying: pd.DataFrame) -> str:
    """A sweep named by what varies in it (``swept_settings``), and by what it holds fixed among mixer
    and dataset."""
    fixed = [f"{rows['mixer'].iloc[0]}" if "mixer" not in varying and rows["mixer"].nunique() == 1 else "",
             f"on {rows['dataset'].iloc[0]}" if "dataset" not in varying and rows["dataset"].nunique() == 1 else ""]
    over = " × ".join(f"{k} ({varying[k].map(json.dumps).nunique()})" for k in varying) or "one point"
    seeds = rows["seed"].nunique() if "seed" in rows else 1
    head = " ".join(f for f in fixed if f)
    return f"{sid}: {head + ' ' if head else ''}over {over}, {seeds} seed{'s' if seeds != 1 else ''}"


def sweep_cells_table(rows: pd.DataFrame, varying: pd.DataFrame, metric: str = "test_ndcg@5") -> list[str]:
    """A sweep over one or two settings as a table of ``metric``, mean ± sd over the seeds that
    finished ok (n seeds): columns the mini-batch size where it is swept (Figure 3's x), rows the other
    setting. Nothing for sweeps over more settings (their heatmaps are per pair)."""
    keys = list(varying.columns)
    ok = rows.index[(rows["status"] == "ok") & _col(rows, metric).notna()]
    if len(keys) not in (1, 2) or ok.empty:
        return []
    x = "mini_batch_size" if "mini_batch_size" in keys else keys[-1]
    y = next((k for k in keys if k != x), None)
    cells = pd.DataFrame({"x": varying.loc[ok, x], "y": varying.loc[ok, y] if y else "", "v": _col(rows.loc[ok], metric)})
    xs, ys = sorted(cells["x"].unique(), key=str if cells["x"].map(type).nunique() > 1 else None), sorted(cells["y"].unique())
    out = [f"\n{metric}, mean ± sd over seeds (n):\n", f"| {y or ''} \\ {x} | " + " | ".join(map(str, xs)) + " |",
           "|---" * (len(xs) + 1) + "|"]
    for yv in ys:
        row = []
        for xv in xs:
            v = cells.loc[(cells["x"] == xv) & (cells["y"] == yv), "v"]
            row.append(f"{_mean_sd(v)} ({len(v)})" if len(v) else "-")
        out.append(f"| {yv} | " + " | ".join(row) + " |")
    return out


def sweeps_section(runs: pd.DataFrame, figures_dir: Path) -> list[str]:
    out = ["## Sweeps", ""]
    swept = runs[runs["sweep_id"] != ""] if "sweep_id" in runs else runs.iloc[0:0]
    if swept.empty:
        return out + ["No sweeps.", ""]
    for sid, rs in swept.groupby("sweep_id", sort=False):
        counts = rs["status"].value_counts()
        varying = swept_settings(rs)
        out.append(f"### {sweep_title(sid, rs, varying)}: {counts.get('ok', 0)} ok, {counts.get('diverged', 0)} diverged, "
                   f"{counts.get('failed', 0)} failed")
        ok = rs[(rs["status"] == "ok") & _col(rs, "test_ndcg@5").notna()]
        if not ok.empty:
            score = _col(ok, "test_ndcg@5")
            for label, i in (("best", score.idxmax()), ("worst", score.idxmin())):
                where = ", ".join(f"{k}={v}" for k, v in varying.loc[i].items()) or ok.at[i, "mixer_opts"]
                out.append(f"- {label} test NDCG@5 {score[i]:.4f} at {where} seed {ok.at[i, 'seed']}")
        out += sweep_cells_table(rs, varying)
        for fig in sorted(figures_dir.glob(f"sweep_{sid}_*.png")):
            out.append(f"\n![{fig.stem}](figures/{fig.name})")
        out.append("")
    return out


POINT = ["device", "dtype", "mixer", "backend", "d_model", "n_layers", "mixer_opts", "seq_len", "batch_size", "mode"]


def efficiency_section(results_dir: Path) -> list[str]:
    out = ["## Efficiency", ""]
    found = False
    for name in ("efficiency.csv", "efficiency_cuda.csv"):
        if not (results_dir / name).exists():
            continue
        found = True
        eff = load_frame(results_dir / name)
        # the newest measurement of each point, whichever bench call made it
        latest = eff.drop_duplicates([c for c in POINT if c in eff], keep="last").copy()
        latest["_b"], latest["_l"] = _col(latest, "batch_size").fillna(0), _col(latest, "seq_len").fillna(0)
        latest = latest.sort_values(["device", "dtype", "mixer", "backend", "mode", "_b", "_l"], kind="stable")
        envs = ", ".join(sorted(set(latest["device"] + " " + latest["dtype"])))
        out += [f"### {name} ({envs}; newest row per point, from bench {', '.join(sorted(set(latest['bench_id'].astype(str))))})",
                "", "| mixer | backend | L | B | mode | status | median ms | tokens (clicks)/s | peak MB |",
                "|---|---|---|---|---|---|---|---|---|"]
        for _, r in latest.iterrows():
            out.append(f"| {r['mixer']} | {r['backend']} | {r['seq_len']} | {r['batch_size']} | {r['mode']} | "
                       f"{r['status']} | {_f(r.get('median_s') * 1000 if pd.notna(r.get('median_s')) else None, '.2f')} | "
                       f"{_f(r.get('tokens_per_s'), ',.0f')} | {_f(r.get('peak_mem_mb'), '.0f')} |")
        out.append("")
    if (results_dir / "gpu_notes.md").exists():  # the GPU check's own write-up (agreement, compile, fla)
        out += ["See `gpu_notes.md` for the GPU check: agreement with CPU fp32, compiled paths, fla's kernels.", ""]
    return out if found else out + ["No efficiency results.", ""]


def write_report(results_dir="results", out=None) -> Path:
    results_dir = Path(results_dir)
    figures = results_dir / "figures"
    runs = load_frame(results_dir / "runs.csv")
    lines = ["# benchbox report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from the CSVs in "
             f"`{results_dir}` alone ({len(runs)} run rows).", ""]
    if (results_dir / "table1.md").exists():
        lines += ["## Table 1", "", (results_dir / "table1.md").read_text(), ""]
    lines += runs_section(runs) + sweeps_section(runs, figures) + efficiency_section(results_dir)
    others = [f for f in sorted(figures.glob("*.png")) if not f.name.startswith("sweep_")] if figures.exists() else []
    if others:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in others] + [""]
    env_cols = ["device", "blas", "torch_version", "python_version", "git_commit"]  # blas: '' in rows before it
    if len(runs):
        envs = runs.reindex(columns=env_cols).astype(object)
        envs = envs.where(envs.notna(), "").drop_duplicates()
        lines += ["## Environments", "", "| device | BLAS | torch | python | commit |", "|---|---|---|---|---|"]
        lines += [f"| {' | '.join(map(str, e))} |" for e in sorted(envs.itertuples(index=False, name=None), key=str)] + [""]
    out = Path(out or results_dir / "report.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, "\n".join(lines))
    return out
