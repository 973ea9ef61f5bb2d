"""Does "mini-batch size 1 or 10 is best" (the TTT4Rec study on its Figure 3) hold in a Figure 3 sweep?

Reads results/runs.csv alone. Per initializer range: the mean over seeds of every mini-batch size and the
best one; then over every (initializer range, seed) that has all four sizes: the mean of the ends
(mbs 1 and 10) minus the mean of the middle (2 and 5), with a paired t-test, and how often each size is
the best of its row. Sampled test metric (default NDCG@10).
    python benchmarks/fig3_verdict.py --sweep-id fig3_study
"""
import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchbox import results  # noqa: E402


def verdict(runs: pd.DataFrame, sweep_id: str, metric: str = "test_ndcg@10") -> dict:
    df = runs[(runs["sweep_id"] == sweep_id) & (runs["status"] == "ok")].copy()
    if df.empty:
        raise SystemExit(f"no finished rows of sweep {sweep_id!r}")
    opts = [json.loads(o or "{}") for o in df["mixer_opts"]]
    df["init"] = [o.get("initializer_range") for o in opts]
    df["mbs"] = [o.get("mini_batch_size") for o in opts]
    df = df.drop_duplicates(["init", "mbs", "seed"], keep="last")
    cells = df.pivot_table(index=["init", "seed"], columns="mbs", values=metric)
    sizes = sorted(cells.columns)
    means = df.pivot_table(index="init", columns="mbs", values=metric, aggfunc="mean")
    counts = df.pivot_table(index="init", columns="mbs", values=metric, aggfunc="count")
    full = cells.dropna()
    ends, middle = [s for s in sizes if s in (1, 10)], [s for s in sizes if s not in (1, 10)]
    diff = full[ends].mean(axis=1) - full[middle].mean(axis=1)
    t = stats.ttest_1samp(diff, 0.0) if len(diff) > 1 else None
    return {"means": means, "counts": counts, "best_per_row": means.idxmax(axis=1),
            "best_per_row_seed": full.idxmax(axis=1).value_counts().to_dict(), "pairs": len(diff),
            "ends_minus_middle": float(diff.mean()) if len(diff) else float("nan"),
            "sd": float(diff.std()) if len(diff) > 1 else float("nan"),
            "p": float(t.pvalue) if t is not None else float("nan"),
            "column_means": full.mean(axis=0).to_dict(), "seed_sd": float(cells.groupby("init").std().mean().mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep-id", default="fig3_study")
    ap.add_argument("--metric", default="test_ndcg@10")
    ap.add_argument("--results-dir", default="results")
    a = ap.parse_args(argv)
    runs = results.frame(results.read_rows(Path(a.results_dir) / "runs.csv"))
    v = verdict(runs, a.sweep_id, a.metric)
    print(f"{a.metric}, mean over seeds (rows: initializer_range, columns: mini_batch_size); seeds per cell:")
    print(v["means"].round(4).astype(str) + " (" + v["counts"].astype("Int64").astype(str) + ")")
    print("best mini-batch size per row (mean):", v["best_per_row"].to_dict())
    print(f"over {v['pairs']} (initializer_range, seed) rows with every size: best size counts "
          f"{v['best_per_row_seed']}; column means " + ", ".join(f"{k}: {x:.4f}" for k, x in v["column_means"].items()))
    print(f"mean(mbs 1, 10) - mean(mbs 2, 5) = {v['ends_minus_middle']:+.4f} (sd {v['sd']:.4f}, paired t-test "
          f"p = {v['p']:.3g}); one cell's seed sd about {v['seed_sd']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
