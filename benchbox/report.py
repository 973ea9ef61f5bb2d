"""``benchbox report``: results/report.md from the CSVs alone (runs, sweeps, efficiency, figures)."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .sweep import identity
from .results import read_rows

METRICS = ("ndcg@5", "ndcg@10", "hr@5", "hr@10")


def _f(v, fmt=".4f"):
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return "-"


def _numbers(vals) -> list[float]:
    """The values that parse as numbers (rows of older CSVs may lack a column)."""
    got = []
    for v in vals:
        try:
            got.append(float(v))
        except (TypeError, ValueError):
            pass
    return got


def _mean(vals):
    got = _numbers(vals)
    return statistics.mean(got) if got else None


def _mean_sd(vals):
    vals = _numbers(vals)
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def runs_section(rows) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok" and not r.get("sweep_id")]
    out = ["## Runs (latest configuration per dataset, mixer and readout; mean ± sd over seeds)", ""]
    if not ok:
        return out + ["No finished runs.", ""]
    for ds in sorted({r["dataset"] for r in ok}):
        out += [f"### {ds}", "", "| mixer | readout | seeds | " + " | ".join(f"test {m}" for m in METRICS)
                + " | s/epoch | device | torch | commit |", "|" + "---|" * (9 + len(METRICS) - 4)]
        groups: dict = {}
        for r in ok:
            if r["dataset"] == ds:
                groups.setdefault((r["mixer"], r.get("readout", "last")), []).append(r)
        for (mixer, readout), rs in sorted(groups.items()):
            latest_cfg = rs[-1].get("config")
            same = [r for r in rs if _cfg_wo_seed(r.get("config")) == _cfg_wo_seed(latest_cfg)]
            seeds = {}
            for r in same:
                seeds[r["seed"]] = r  # the latest row per seed
            rs2 = list(seeds.values())
            out.append(f"| {mixer} | {readout} | {len(rs2)} | "
                       + " | ".join(_mean_sd([r.get(f'test_{m}') for r in rs2]) for m in METRICS)
                       + f" | {_f(_mean([r.get('sec_per_epoch') for r in rs2]), '.1f')} | {rs2[-1].get('device', '')}"
                       f" | {rs2[-1].get('torch_version', '')} | {rs2[-1].get('git_commit', '')} |")
        out.append("")
    return out


def _cfg_wo_seed(cfg):
    return identity(cfg, ignore=("seed",))


def sweeps_section(rows, figures_dir: Path) -> list[str]:
    sweeps: dict = {}
    for r in rows:
        if r.get("sweep_id"):
            sweeps.setdefault(r["sweep_id"], []).append(r)
    out = ["## Sweeps", ""]
    if not sweeps:
        return out + ["No sweeps.", ""]
    for sid, rs in sweeps.items():
        counts = {s: sum(r.get("status") == s for r in rs) for s in ("ok", "diverged", "failed")}
        ok = [r for r in rs if r.get("status") == "ok" and r.get("test_ndcg@5")]
        out.append(f"### {sid}: {rs[0].get('mixer')} on {rs[0].get('dataset')}: {counts['ok']} ok, "
                   f"{counts['diverged']} diverged, {counts['failed']} failed")
        if ok:
            best = max(ok, key=lambda r: float(r["test_ndcg@5"]))
            worst = min(ok, key=lambda r: float(r["test_ndcg@5"]))
            varying = _swept_settings(rs)
            for label, r in (("best", best), ("worst", worst)):
                where = ", ".join(f"{k}={v}" for k, v in varying(r).items()) or r.get("mixer_opts")
                out.append(f"- {label} test NDCG@5 {float(r['test_ndcg@5']):.4f} at {where} seed {r['seed']}")
        for fig in sorted(figures_dir.glob(f"sweep_{sid}_*.png")):
            out.append(f"\n![{fig.stem}](figures/{fig.name})")
        out.append("")
    return out


def _swept_settings(rows):
    """A function giving, for a row, the settings that vary across the sweep's rows (run options and
    mixer options alike, from the stored config), seed excluded."""
    def flat(r):
        try:
            c = json.loads(r.get("config") or "{}")
        except json.JSONDecodeError:
            c = {}
        opts = {**c.pop("mixer_opts", {}), **c.pop("readout_opts", {})}
        return {**{k: v for k, v in c.items() if not isinstance(v, (dict, list))}, **opts}
    flats = [flat(r) for r in rows]
    keys = sorted({k for f in flats for k in f if k not in ("seed", "run_id")
                   and len({json.dumps(g.get(k)) for g in flats}) > 1})
    return lambda r: {k: flat(r).get(k) for k in keys}


def efficiency_section(results_dir: Path) -> list[str]:
    out = ["## Efficiency", ""]
    found = False
    for name in ("efficiency.csv", "efficiency_cuda.csv"):
        p = results_dir / name
        if not p.exists():
            continue
        found = True
        latest: dict = {}  # the newest measurement of each point, whichever bench call made it
        for r in read_rows(p):
            key = tuple(r.get(k) for k in ("device", "dtype", "mixer", "backend", "d_model", "n_layers",
                                           "mixer_opts", "seq_len", "batch_size", "mode"))
            latest.pop(key, None)
            latest[key] = r
        rows = sorted(latest.values(), key=lambda r: (r.get("device", ""), r.get("dtype", ""), r["mixer"],
                                                      r["backend"], r["mode"], int(r["batch_size"] or 0),
                                                      int(r["seq_len"] or 0)))
        ids = sorted({r.get("bench_id", "") for r in rows})
        out += [f"### {name} ({', '.join(sorted({r.get('device', '') + ' ' + r.get('dtype', '') for r in rows}))};"
                f" newest row per point, from bench {', '.join(ids)})", "",
                "| mixer | backend | L | B | mode | status | median ms | tokens (clicks)/s | peak MB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['mixer']} | {r['backend']} | {r['seq_len']} | {r['batch_size']} | {r['mode']} | "
                       f"{r['status']} | {_f(float(r['median_s']) * 1000 if r.get('median_s') else None, '.2f')} | "
                       f"{_f(r.get('tokens_per_s'), ',.0f')} | {_f(r.get('peak_mem_mb'), '.0f')} |")
        out.append("")
    return out if found else out + ["No efficiency results.", ""]


def write_report(results_dir="results", out=None) -> Path:
    results_dir = Path(results_dir)
    figures = results_dir / "figures"
    rows = read_rows(results_dir / "runs.csv") if (results_dir / "runs.csv").exists() else []
    lines = [f"# benchbox report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from the CSVs in "
             f"`{results_dir}` alone ({len(rows)} run rows).", ""]
    for name in ("table1.md",):
        p = results_dir / name
        if p.exists():
            lines += ["## Table 1", "", p.read_text(), ""]
    lines += runs_section(rows) + sweeps_section(rows, figures) + efficiency_section(results_dir)
    others = [f for f in sorted(figures.glob("*.png")) if not f.name.startswith("sweep_")] if figures.exists() else []
    if others:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in others] + [""]
    envs = {(r.get("device"), r.get("torch_version"), r.get("python_version"), r.get("git_commit")) for r in rows}
    if envs:
        lines += ["## Environments", "", "| device | torch | python | commit |", "|---|---|---|---|"]
        lines += [f"| {d} | {t} | {p} | {c} |" for d, t, p, c in sorted(envs, key=str)] + [""]
    out = Path(out or results_dir / "report.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out


def register(sub):
    p = sub.add_parser("report", help="write results/report.md from the CSVs")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--out", default=None)
    p.add_argument("--print", action="store_true", help="also print the report (CI logs)")
    p.set_defaults(func=cmd_report)


def cmd_report(a) -> int:
    from .cli import console
    path = write_report(a.results_dir, a.out)
    if a.print:
        print(path.read_text())
    console.print(f"report: {path}")
    return 0
