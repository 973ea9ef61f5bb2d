"""Table 1 (``benchbox table``, ``benchbox.table``): the study's Table 1, run with N seeds, resumable, with the study's values beside ours.

A row of Table 1 is a (mixer, readout) pair. The runs are ordinary rows of results/runs.csv tagged with
sweep id ``table1``; rerunning resumes (finished points are skipped), so partial results can be
committed as they come.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import pandas as pd

from . import BenchboxError
from .config import RunConfig, make_config
from .results import _write_atomic, frame, load_runs
from .sweeps import pending, run_sweep

METRICS = ("ndcg@5", "ndcg@10", "hr@5", "hr@10")
TABLE_ID = "table1"

# model -> (mixer, readout[, readout options]); TTT4Rec is the study's model, the rows after it are
# benchbox extras: two more mixers, and ComiDR+, ComiRec-DR with two changes that let it fit here:
# routing on unit-length features, and training with evaluation's interest rule (select=max: each
# candidate scored by its best interest, where ComiRec scores all of them with the target's)
MODELS = {
    "DIN": ("none", "din"),
    "GRU4Rec": ("gru", "last"),
    "SASRec": ("attention", "last"),
    "ComiSA": ("none", "comirec_sa"),
    "ComiDR": ("none", "comirec_dr"),
    "TTT4Rec": ("ttt_linear", "last"),
    "TTT-MLP": ("ttt_mlp", "last"),
    "Mamba": ("mamba", "last"),
    "ComiDR+": ("none", "comirec_dr", {"inputs": "unit", "select": "max"}),
}


def _spec(name: str) -> tuple[str, str, dict]:
    mixer, readout, *opts = MODELS[name]
    return mixer, readout, (opts[0] if opts else {})


def _row_key(mixer: str, readout: str, readout_opts: dict) -> str:
    return json.dumps([mixer, readout, readout_opts], sort_keys=True)


def model_name(mixer: str, readout: str, readout_opts: dict) -> str | None:
    """The Table 1 model a (mixer, readout, options) triple is, or None."""
    return {_row_key(*_spec(k)): k for k in MODELS}.get(_row_key(mixer, readout or "last", readout_opts))

# the study's Table 1 (its data): NDCG@5, NDCG@10, HR@5, HR@10
STUDY = {
    "beauty": {"DIN": (.2466, .2684, .3546, .4223), "GRU4Rec": (.2390, .2692, .3645, .4571),
               "SASRec": (.2512, .2849, .3854, .4893), "ComiSA": (.2594, .2783, .3842, .4813),
               "ComiDR": (.2582, .2925, .3833, .4902), "TTT4Rec": (.2571, .2890, .3866, .4848)},
    "electronics": {"DIN": (.3286, .3664, .4434, .5603), "GRU4Rec": (.3450, .3844, .4666, .5882),
                    "SASRec": (.3420, .3821, .4641, .5881), "ComiSA": (.3065, .3301, .4221, .5418),
                    "ComiDR": (.3228, .3623, .4414, .5637), "TTT4Rec": (.3486, .3892, .4712, .5968)},
    "ml-1m": {"DIN": (.4703, .5081, .6318, .7485), "GRU4Rec": (.5209, .5566, .6762, .7863),
              "SASRec": (.5217, .5574, .6790, .7919), "ComiSA": (.4040, .4450, .5417, .6982),
              "ComiDR": (.4072, .4549, .5550, .7022), "TTT4Rec": (.5239, .5577, .6834, .7877)},
}


def table_points(base: RunConfig, datasets, models, seeds) -> list[RunConfig]:
    pts = []
    for ds in datasets:
        for name in models:
            if name not in MODELS:
                raise BenchboxError(f"unknown Table 1 model {name!r}; known: {', '.join(MODELS)}")
            mixer, readout, ropts = _spec(name)
            for seed in seeds:
                pts.append(replace(base, dataset=ds, mixer=mixer, readout=readout, readout_opts=dict(ropts),
                                   seed=seed, sweep_id=TABLE_ID,
                                   eval_full=base.eval_full and readout != "din").validate())
    return pts


# a Table 1 row's training protocol: rows of different settings are never averaged together
OLD_SETTING = "sequence, cover last, budget study"
# derived from the study-protocol rows' curves, not a run of its own (``picked_on_test``)
TEST_SELECTED = "study, epoch picked on test"
SETTING_TITLES = {
    "study": "Study protocol (`--protocol study`): one row per target with a 10-item history, 1:4 in training, "
             "1:99 at test, batch 1024 study rows, the study's epochs",
    "sequence, cover windows, budget converged": "Converged sequence regime (`--budget converged`): one causal pass "
             "per user window, early stopping on validation NDCG@10 (patience 10, at most 300 epochs)",
    "sequence, cover windows, budget study": "Sequence regime, every training target (`--cover windows`), the "
             "study's epochs",
    "study, train_order user, train_negatives fixed": "Sensitivity (an extra row, not the main result): the study "
             "protocol with the training rows as the lineage's loader reads them, by user then time every epoch, "
             "negatives drawn once (`--train-order user --train-negatives fixed`)",
    TEST_SELECTED: "Sensitivity (an extra row, derived from the study-protocol rows' curves, not a run of its "
                   "own): each run read at the epoch of its best test NDCG@10, as the lineage's script keeps the "
                   "epoch of its best test AUC; an optimistic selection (the test set picks the model), sampled "
                   "metrics only",
    OLD_SETTING: "Sequence regime, last max_len targets only, the study's epochs (benchbox's protocol before "
                 "2026-12-02: every model still improving at its last epoch)",
}


# settings that change what is trained but are not part of a regime's name: a row that moves one away from
# its preset (or from the default) is a setting of its own (a sensitivity row), never averaged into the main one
SENSITIVITY_KNOBS = ("train_order", "train_negatives", "train_neg", "eval_neg", "batch_size", "lr", "weight_decay",
                     "dropout", "d_model", "n_layers", "ffn_mult", "max_len", "dtype", "epochs", "patience", "eval_seed",
                     "dropout_masks")


# sensitivity knobs that leave an epoch's work as it is (the order and negatives of the rows, step sizes,
# dropout's rate, the evaluation's seed, the epoch count): a row with them set costs, per epoch, what
# the row without them costs
COST_NEUTRAL_KNOBS = ("train_order", "train_negatives", "lr", "weight_decay", "dropout", "eval_seed", "epochs",
                      "patience")


def _without_cost_neutral_knobs(setting: str) -> str:
    parts = setting.split(", ")
    return ", ".join(p for p in parts if p.split(" ", 1)[0] not in COST_NEUTRAL_KNOBS)


def setting_of(cfg: dict) -> str:
    """The protocol part of a stored config, as one key (the ``SETTING_TITLES`` keys, or a spelled-out one,
    with ", knob value" for every sensitivity knob away from its preset or default)."""
    from .config import LATER_OPTIONS, PROTOCOLS, RunConfig
    c = {**LATER_OPTIONS, **cfg}
    preset = PROTOCOLS.get(c["protocol"], {})
    defaults = {**RunConfig().__dict__, **LATER_OPTIONS, **preset}
    extra = "".join(f", {k} {c[k]}" for k in SENSITIVITY_KNOBS if k in c and c[k] != defaults[k])
    if c["protocol"]:
        extra = "".join(f", {k} {c[k]}" for k in ("regime", "window", "budget") if c[k] != preset.get(k, c[k])) + extra
        return c["protocol"] + extra
    if c["regime"] == "instances":
        return f"instances, window {c['window'] or 'max_len'}, budget {c['budget']}" + extra
    return f"sequence, cover {c['cover']}, budget {c['budget']}" + extra


def _setting_order(key: str) -> tuple:
    keys = list(SETTING_TITLES)
    return (keys.index(key) if key in keys else len(keys), key)


def table_seeds(count: int, seed_list: str | None = None) -> list[int]:
    """Seeds 0..count-1, or only those of a comma list such as "1,2" (to split seeds over processes)."""
    if not seed_list:
        if count < 1:
            raise BenchboxError(f"--seeds must be >= 1, got {count}")
        return list(range(count))
    try:
        seeds = sorted({int(x) for x in seed_list.split(",") if x.strip()})
    except ValueError:
        raise BenchboxError(f"--seed-list must be comma-separated integers, got {seed_list!r}") from None
    if not seeds or seeds[0] < 0:
        raise BenchboxError(f"--seed-list must name seeds >= 0, got {seed_list!r}")
    return seeds


def paired_t_test(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of the paired t-test (same seeds). NaN with fewer than 2 pairs."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return float("nan")
    sd = statistics.stdev(d)
    if sd == 0:
        return 0.0 if statistics.mean(d) != 0 else 1.0
    t = statistics.mean(d) / (sd / math.sqrt(n))
    from scipy import stats
    return float(2 * stats.t.sf(abs(t), n - 1))


def collect(runs, datasets, models) -> pd.DataFrame:
    """The finished Table 1 rows of ``datasets`` with a ``model`` column: the latest row per
    (dataset, model, seed)."""
    df = frame(runs)
    if df.empty or "sweep_id" not in df:
        return pd.DataFrame(columns=["dataset", "model", "seed", "setting"])
    for col in ("readout", "readout_opts"):
        df[col] = df[col] if col in df else ""
    df = df[(df["sweep_id"] == TABLE_ID) & (df["status"] == "ok") & df["dataset"].isin(datasets)]
    df = df.assign(model=[model_name(m, r, json.loads(o or "{}"))
                          for m, r, o in zip(df["mixer"], df["readout"], df["readout_opts"])],
                   setting=[setting_of(c if isinstance(c, dict) else json.loads(c or "{}"))
                            for c in (df["config"] if "config" in df else [{}] * len(df))])
    return df[df["model"].isin(models)].drop_duplicates(["setting", "dataset", "model", "seed"], keep="last")


def picked_on_test(rows: pd.DataFrame, curves: pd.DataFrame, setting: str = "study") -> pd.DataFrame:
    """The ``setting`` rows of ``collect`` read at the epoch of their best test NDCG@10 in curves.csv (the
    earliest such epoch), as setting ``TEST_SELECTED``: the lineage's selection on test, as a sensitivity
    row. Sampled test metrics only (curves.csv has no full ranking); a run without a curve is left out."""
    base = rows[rows["setting"] == setting] if len(rows) else rows
    if base.empty or curves.empty or "run_id" not in curves:
        return base.iloc[0:0]
    c = curves[curves["run_id"].isin(base["run_id"])].copy()
    if c.empty:
        return base.iloc[0:0]
    for col in ("epoch",) + tuple(f"test_{m}" for m in METRICS):
        c[col] = pd.to_numeric(c[col], errors="coerce")
    best = c.sort_values(["run_id", "epoch"]).loc[lambda d: d.groupby("run_id")["test_ndcg@10"].idxmax()]
    best = best.set_index("run_id")
    out = base[base["run_id"].isin(best.index)].copy()
    for m in METRICS:
        out[f"test_{m}"] = out["run_id"].map(best[f"test_{m}"])
        out[f"test_full_{m}"] = float("nan")
    out["best_epoch"] = out["run_id"].map(best["epoch"])
    out["setting"] = TEST_SELECTED
    return out


def build_tables(runs, datasets, models, prefix="test_", setting: str = OLD_SETTING,
                 collected: pd.DataFrame | None = None) -> tuple[list[dict], list[str]]:
    """``collected``: ``collect(runs, datasets, models)`` when the caller has it already."""
    data = collect(runs, datasets, models) if collected is None else collected
    data = data[data["setting"] == setting]
    cols = [prefix + m for m in METRICS]
    full = "full" in prefix
    csv_rows, md = [], []
    for ds in datasets:
        got = data[data["dataset"] == ds]
        # a model counts once every one of its seeds has this kind of metric (older rows may lack full ranking)
        done = [n for n, g in got.groupby("model") if cols[1] in g and g[cols[1]].notna().all()]
        if not done:
            continue
        got = got[got["model"].isin(done)]
        stats = got.groupby("model")[cols].agg(["mean", "std", "size"])
        best = {c: stats[(c, "mean")].max() for c in cols}
        note = " (a small 2018 sample, NOT the study's 2014 Electronics: the study's values are not comparable)" \
            if ds == "electronics" else ""
        kind = "full ranking (all items, history masked)" if full else "1 positive + 99 sampled negatives"
        if full and (got.get("full_mask", pd.Series("", index=got.index)).fillna("") != "history").any():
            kind = ("full ranking (all items) with only the model's input window masked, not the whole history: "
                    "rows from before 2026-12-02. Items seen before the last max_len compete with the positive, "
                    "so these numbers are biased down where histories are longer than max_len")
        md += [f"#### {ds}{note}", "", f"Test metrics, {kind}; mean ± sd over seeds; study value and difference in "
               "brackets; **bold** = best mean in the column; p = paired t-test of TTT4Rec against the row across seeds.", ""]
        md += ["| model | seeds | " + " | ".join(m.upper() for m in METRICS)
               + " | p (NDCG@10 vs TTT4Rec) | steps/epoch | epochs | s/epoch | wall s/run |",
               "|---|---|" + "---|" * len(METRICS) + "---|---|---|---|---|"]
        ttt = got[got["model"] == "TTT4Rec"].set_index("seed")[cols[1]]
        for name in models:
            study = STUDY.get(ds, {}).get(name) if not full else None
            if name not in done:
                # a model asked for but not finished yet stays visible, with the study's values
                if full and _spec(name)[1] == "din":
                    continue
                missing = "not run yet" if name not in set(data.loc[data["dataset"] == ds, "model"]) else "no result"
                cells = [f"{missing} (study {v:.4f})" for v in study] if study else [missing] * len(METRICS)
                md.append(f"| {name} | 0 | " + " | ".join(cells) + " | - | - | - | - | - |")
                continue
            rs = got[got["model"] == name]
            mixer, readout, ropts = _spec(name)
            rec = {"setting": setting, "dataset": ds, "model": name, "mixer": mixer, "readout": readout,
                   "readout_opts": json.dumps(ropts, sort_keys=True), "metric_kind": "full" if full else "sampled",
                   "seeds": len(rs), "wall_seconds_mean": (rs["train_seconds"] + rs["eval_seconds"]).mean()}
            # the cost of this regime: steps and wall seconds per epoch (train + eval), epochs run
            num = lambda c: pd.to_numeric(rs[c], errors="coerce") if c in rs else pd.Series(float("nan"), index=rs.index)  # noqa: E731
            epochs = num("epochs_run")
            rec["steps_per_epoch"] = num("steps_per_epoch").median()
            rec["epochs_run_mean"] = epochs.mean()
            rec["seconds_per_epoch_mean"] = ((num("train_seconds") + num("eval_seconds")) / epochs).mean()
            span = "-" if epochs.isna().all() else (f"{epochs.min():.0f}" if epochs.min() == epochs.max()
                                                     else f"{epochs.min():.0f}-{epochs.max():.0f}")
            fmt = lambda v, spec: "-" if v != v else format(v, spec)  # noqa: E731  (NaN: not in older rows)
            cost = f"{fmt(rec['steps_per_epoch'], ',.0f')} | {span} | {fmt(rec['seconds_per_epoch_mean'], '.1f')}"
            cells = []
            for i, (m, c) in enumerate(zip(METRICS, cols)):
                mu, sd = stats.loc[name, (c, "mean")], stats.loc[name, (c, "std")]
                sd = 0.0 if stats.loc[name, (c, "size")] < 2 else sd
                cell = f"{mu:.4f} ± {sd:.4f}"
                if mu == best[c]:
                    cell = f"**{cell}**"
                if study:
                    cell += f" ({study[i]:.4f}, {mu - study[i]:+.4f})"
                    rec[f"study_{m}"], rec[f"diff_{m}"] = study[i], mu - study[i]
                cells.append(cell)
                rec[f"{m}_mean"], rec[f"{m}_sd"] = float(mu), float(sd)
            mine = rs.set_index("seed")[cols[1]]
            common = ttt.index.intersection(mine.index)
            p = paired_t_test(list(ttt[common]), list(mine[common])) if name != "TTT4Rec" else float("nan")
            rec["p_ndcg@10_vs_ttt4rec"] = p
            md.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {'-' if p != p else f'{p:.3g}'} | "
                      f"{cost} | {rec['wall_seconds_mean']:.0f} |")
            csv_rows.append(rec)
        md.append("")
    return csv_rows, md


def side_by_side(rows: pd.DataFrame, datasets, models, settings) -> list[str]:
    """Per dataset: test NDCG@10 and HR@10 (sampled) of every model under every setting, beside the study."""
    out = ["## Side by side: test NDCG@10 / HR@10 (1:99 sampled), mean over seeds (n seeds); [difference to the study]",
           ""]
    short = {k: chr(ord("A") + i) for i, k in enumerate(settings)}
    out += [f"- {short[k]}: {SETTING_TITLES.get(k, k)}" for k in settings] + [""]
    for ds in datasets:
        got = rows[rows["dataset"] == ds]
        if got.empty:
            continue
        out += [f"#### {ds}" + (" (2018 sample: the study's values are not comparable)" if ds == "electronics" else ""),
                "", "| model | study | " + " | ".join(short[k] for k in settings) + " |",
                "|---|---|" + "---|" * len(settings)]
        for name in models:
            study = STUDY.get(ds, {}).get(name)
            cells = [f"{study[1]:.4f} / {study[3]:.4f}" if study else "-"]
            for k in settings:
                g = got[(got["model"] == name) & (got["setting"] == k)]
                if g.empty:
                    cells.append("-")
                    continue
                n, h = g["test_ndcg@10"].mean(), g["test_hr@10"].mean()
                cell = f"{n:.4f} / {h:.4f} ({len(g)})"
                if study and ds != "electronics":
                    cell += f" [{n - study[1]:+.4f} / {h - study[3]:+.4f}]"
                cells.append(cell)
            if any(c != "-" for c in cells[1:]):
                out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def write_table(results_dir, datasets, models=tuple(MODELS)) -> tuple[Path, Path]:
    """table1.md/csv for ``datasets`` plus every other dataset with Table 1 results (a run of one
    dataset must not drop the others), in the study's order, then any other dataset by name."""
    runs = load_runs(results_dir)
    done = set(runs.loc[runs["sweep_id"] == TABLE_ID, "dataset"]) - {""} if "sweep_id" in runs else set()
    order = list(STUDY)
    datasets = sorted(set(datasets) | done, key=lambda d: (order.index(d) if d in order else len(order), d))
    rows = collect(runs, datasets, models)
    if len(rows):
        from .results import load_curves
        picked = picked_on_test(rows, load_curves(results_dir))
        rows = pd.concat([rows, picked], ignore_index=True) if len(picked) else rows
    settings = sorted(set(rows["setting"]) if len(rows) else {OLD_SETTING}, key=_setting_order)
    text = ["# Table 1 (benchbox)", "", "Models of the TTT4Rec study's Table 1 (plus benchbox's extra rows: TTT-MLP, Mamba, and "
            "ComiDR+, ComiRec-DR with `inputs=unit select=max`), trained with benchbox's "
            "one protocol; generated from results/runs.csv by `benchbox table`.", ""]
    if len(settings) > 1:
        text += side_by_side(rows, datasets, models, settings)
    notes = Path(results_dir) / "table1_notes.md"  # hand-written: what the study says, causes of gaps
    if notes.exists():
        text += [notes.read_text().rstrip(), ""]
    csv = []
    for setting in settings:
        sampled, md = build_tables(runs, datasets, models, "test_", setting, rows)
        full, md_full = build_tables(runs, datasets, models, "test_full_", setting, rows)
        csv += sampled + full
        if len(settings) > 1:
            text += [f"## {SETTING_TITLES.get(setting, setting)}", ""]
        text += ["### Sampled metrics", ""] + md
        if md_full:
            text += ["### Full-ranking metrics (secondary; sampled metrics can rank models differently: Krichene & "
                     "Rendle, KDD 2020). DIN is absent: scoring every item with target attention is O(items x history).",
                     ""] + md_full
    if len(settings) > 1:
        from .plots import plot_table1
        for ds in datasets:
            if (rows["dataset"] == ds).any():
                plot_table1(rows, ds, settings, Path(results_dir) / "figures" / f"table1_{ds}.png")
    out_md, out_csv = Path(results_dir) / "table1.md", Path(results_dir) / "table1.csv"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_md, "\n".join(text) + "\n")
    table = pd.DataFrame(csv)
    _write_atomic(out_csv, table.to_csv(index=False, lineterminator="\n") if len(table) else "dataset\n")
    return out_md, out_csv


def _names(v) -> list[str]:
    return [x.strip() for x in (v.split(",") if isinstance(v, str) else v) if x.strip()]


def _device_kind(device: str) -> str:
    """"cuda" or "cpu": where a run with this ``device`` setting would run on this machine."""
    if device.startswith("cuda"):
        return "cuda"
    if device == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def estimate_cost(points: list[RunConfig], runs, device: str | None = None) -> list[dict]:
    """The measured cost of ``points`` (not yet run) from the finished Table 1 rows of runs.csv: per
    (dataset, model, setting), the median seconds per epoch (train + eval) of rows of that same kind
    times the epochs the budget gives. An epoch costs the same under either budget, so a point with no
    row of its own kind takes the per-epoch cost of the other budget's rows of its regime (of the
    cover-last kind when none of its own cover exists: fewer targets where histories pass max_len); a
    converged point's epochs are the median epochs run by its own converged rows, else by the other
    models' converged rows on that dataset, else the cap. ``basis`` says which; a kind with nothing
    measured has no estimate (None). Only rows of the device kind the points will run on count (``device``: "cpu" or "cuda"; default: where
    ``device=auto`` resolves here): an H200 epoch of ML-1M SASRec takes 1.5 s, a 1-thread CPU epoch 35 s,
    and the latest row of a seed may be either. On CPU, where some of a kind's rows ran with the BLAS path in
    force now (``blas``: MKL's own kernels on AMD make GEMMs 2.3x faster, blas.py), only those count."""
    from .blas import blas_in_force
    from .train import budget_epochs
    runs = frame(runs)  # every dataset's rows: a converged point may take its epochs from another dataset
    if device is None:
        device = _device_kind(points[0].device if points else "auto")
    if len(runs):
        kinds = (runs["device"].fillna("").astype(str).str.lower() if "device" in runs
                 else pd.Series("", index=runs.index))
        on_cpu = kinds.str.startswith("cpu") | (kinds == "") | (kinds == "nan")  # rows without one: CPU
        runs = runs[on_cpu == (device == "cpu")]
    done = collect(runs, sorted(set(runs["dataset"]) if "dataset" in runs else set()), list(MODELS))
    if len(done):
        done = done.assign(per_epoch=(done["train_seconds"] + done["eval_seconds"]) / done["epochs_run"])

    blas_now = blas_in_force() if device == "cpu" and "blas" in done else None

    def rows_of(dataset, model, setting):
        if not len(done):
            return done
        sel = (done["dataset"] == dataset) & (done["setting"] == setting)
        out = done[sel & (done["model"] == model)] if model else done[sel]
        same_blas = out["blas"] == blas_now if blas_now else None
        return out[same_blas] if same_blas is not None and same_blas.any() else out

    groups: dict[tuple, dict] = {}
    for p in points:
        key = (p.dataset, model_name(p.mixer, p.readout, p.readout_opts) or p.mixer, setting_of(json.loads(p.to_json())))
        g = groups.setdefault(key, {"dataset": key[0], "model": key[1], "setting": key[2], "points": 0,
                                    "sec_per_epoch": None, "epochs": None, "cpu_seconds": None, "measured_rows": 0,
                                    "basis": "nothing measured", "device": device, "measured": ""})
        g["points"] += 1
        if g["points"] > 1:
            continue
        epochs, patience = budget_epochs(p)
        g["epochs"] = epochs
        same = rows_of(*key)
        per_epoch, basis = same, "same kind"
        if not len(same):  # an epoch of the same regime costs the same under the other budget
            if patience:
                study = key[2].replace(", budget converged", ", budget study")
                siblings = ((study, "per epoch: study-budget rows"),
                            (key[2].replace(", budget converged", ""), "per epoch: study-budget rows"))
            else:
                study = key[2]
                siblings = ((key[2].replace(", budget study", ", budget converged"), "per epoch: converged rows"),)
            siblings += ((study.replace("cover windows", "cover last"),
                          "per epoch: cover-last study rows (fewer targets per epoch where histories pass max_len)"),)
            plain = _without_cost_neutral_knobs(key[2])
            if plain != key[2]:
                siblings += ((plain, f"per epoch: {plain} rows (the knobs set here do not change an epoch's work)"),)
            for sibling, basis in siblings:
                per_epoch = rows_of(key[0], key[1], sibling)
                if len(per_epoch):
                    break
        if len(per_epoch):
            g["measured_rows"] = len(per_epoch)
            g["sec_per_epoch"] = float(per_epoch["per_epoch"].median())
            g["basis"] = basis
            if "started_at" in per_epoch:  # older rows ran older, often slower, code: say when they ran
                days = sorted({str(t)[:10] for t in per_epoch["started_at"].dropna() if str(t)[:4].isdigit()})
                g["measured"] = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}" if days else ""
            if patience:
                conv, where = (same, "") if len(same) else (rows_of(key[0], None, key[2]), "other models' ")
                if not len(conv) and len(done):  # the same model's converged rows on the other datasets
                    conv = done[(done["setting"] == key[2]) & (done["model"] == key[1])]
                    where = "other datasets' "
                if len(conv):
                    g["epochs"] = float(conv["epochs_run"].median())
                    g["basis"] += "" if len(same) else f"; epochs: {len(conv)} {where}converged row(s)"
                else:
                    g["basis"] += "; epochs: the cap"
    for g in groups.values():
        if g["sec_per_epoch"] is not None:
            g["cpu_seconds"] = g["sec_per_epoch"] * g["epochs"] * g["points"]
    return list(groups.values())


def cost_summary(est: list[dict]) -> dict:
    """Totals of an ``estimate_cost`` answer: the points, the CPU-seconds of those with an estimate, and
    how many points have none (never priced as 0)."""
    return {"points": sum(g["points"] for g in est),
            "unit": "GPU-s" if est and est[0]["device"] == "cuda" else "CPU-s",  # seconds of the device priced
            "cpu_seconds": sum(g["cpu_seconds"] for g in est if g["cpu_seconds"] is not None),
            "unpriced_points": sum(g["points"] for g in est if g["cpu_seconds"] is None)}


def table(datasets="ml-1m,beauty,electronics", models=tuple(MODELS), seeds: int = 3, seed_list=None, workers: int = 1,
          no_run: bool = False, results_dir: str = "results", log=print, dry_run: bool = False,
          **options) -> tuple[Path, Path] | list[dict]:
    """Run the study's Table 1 (every model x dataset x seed, resumable) and write table1.md/csv.
    ``options``: run options as in ``benchbox.run`` (full ranking is on unless ``eval="sampled"``)."""
    base = make_config(**{"eval_full": True, **options, "mixer": "gru", "dataset": "synthetic", "seed": 0})
    datasets, models = _names(datasets), _names(models)
    points = table_points(base, datasets, models, table_seeds(seeds, seed_list))
    if dry_run:  # what would run, and what it would cost by the rows measured so far
        return estimate_cost(pending(points, results_dir), load_runs(results_dir))
    if not no_run:
        run_sweep(points, results_dir, workers, log=log)
    return write_table(results_dir, datasets)
