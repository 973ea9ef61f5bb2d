import ctypes
import json
import math
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchbox import results
from benchbox.efficiency import growth_exponent, run_bench
from benchbox.plots import plot_curves, plot_sweep, sweep_matrix, sweep_spread
from benchbox.report import write_report
from benchbox.tables import build_tables, paired_t_test, write_table
from benchbox.train import environment


def _row(rid, mbs, ir, ndcg, status="ok", sweep="sw-1", seed=0, **kw):
    cfg = {"mixer": "ttt_linear", "mixer_opts": {"mini_batch_size": mbs, "initializer_range": ir}, "seed": seed}
    return {"run_id": rid, "status": status, "sweep_id": sweep, "mixer": "ttt_linear", "dataset": "beauty",
            "seed": seed, "config": json.dumps(cfg), "test_ndcg@5": ndcg if status == "ok" else "",
            "mixer_opts": json.dumps(cfg["mixer_opts"]), **kw}


def test_sweep_heatmap_from_csv_alone(tmp_path):
    rows = [_row("a", 1, 0.01, 0.2), _row("b", 1, 0.01, 0.4, seed=1), _row("c", 16, 0.01, 0.1),
            _row("d", 1, 0.1, None, status="diverged"), _row("e", 16, 0.1, 0.3)]
    results.append_rows(tmp_path / "runs.csv", rows)
    xs, ys, m, _ = sweep_matrix(results.read_rows(tmp_path / "runs.csv"), "sw-1", "mini_batch_size",
                                "initializer_range", "test_ndcg@5")
    assert xs == [1, 16] and ys == [0.01, 0.1]
    assert m[0, 0] == pytest.approx(0.3) and m[0, 1] == pytest.approx(0.1) and np.isnan(m[1, 0])
    sd, n = sweep_spread(_, xs, ys)
    assert sd[0, 0] == pytest.approx(0.1414214, abs=1e-6)  # sample sd of 0.2 and 0.4
    assert n.tolist() == [[2, 1], [0, 1]] and np.isnan(sd[0, 1])
    png = plot_sweep(tmp_path)
    assert png.exists() and png.stat().st_size > 5000
    # the report's table of the same sweep: mean ± sd (n) per cell, "-" where no seed finished ok
    from benchbox.report import sweep_cells_table, swept_settings
    runs = results.load_frame(tmp_path / "runs.csv")
    table = sweep_cells_table(runs, swept_settings(runs))
    assert "| 0.01 | 0.3000 ± 0.1414 (2) | 0.1000 (1) |" in table
    assert "| 0.1 | - | 0.3000 (1) |" in table


def test_curves_plot_and_missing_run(tmp_path):
    results.append_rows(tmp_path / "runs.csv", [{"run_id": "r1", "mixer": "gru", "readout": "last", "dataset": "x"}])
    results.append_rows(tmp_path / "curves.csv", [{"run_id": "r1", "epoch": e, "test_ndcg@10": 0.1 * e} for e in (1, 2, 3)])
    assert plot_curves(tmp_path, ["r1"], reference="r1", reference_epoch=1).exists()
    from benchbox import BenchboxError
    with pytest.raises(BenchboxError, match="no curve for run 'zz'"):
        plot_curves(tmp_path, ["zz"])


def test_paired_t_test_known_value():
    # differences 0.5, 0.2, 0.9: mean 0.5333, sd 0.3512, t = 2.630, df 2 -> p = 0.119
    assert paired_t_test([1, 2, 3], [0.5, 1.8, 2.1]) == pytest.approx(0.119, abs=2e-3)
    assert math.isnan(paired_t_test([1], [2]))


def test_table_means_study_values_and_best(tmp_path):
    rows = []
    for seed, (t, g) in enumerate([(0.30, 0.25), (0.32, 0.26), (0.31, 0.24)]):
        for mixer, v in (("ttt_linear", t), ("gru", g)):
            rows.append({"run_id": f"{mixer}{seed}", "status": "ok", "sweep_id": "table1", "dataset": "beauty",
                         "mixer": mixer, "readout": "last", "seed": seed, "train_seconds": 10, "eval_seconds": 1,
                         **{f"test_{m}": v for m in ("ndcg@5", "ndcg@10", "hr@5", "hr@10")}})
    results.append_rows(tmp_path / "runs.csv", rows)
    csv_rows, md = build_tables(results.read_rows(tmp_path / "runs.csv"), ["beauty"], ["GRU4Rec", "TTT4Rec"])
    by = {r["model"]: r for r in csv_rows}
    assert by["TTT4Rec"]["ndcg@5_mean"] == pytest.approx(0.31) and by["GRU4Rec"]["study_ndcg@5"] == 0.2390
    assert by["GRU4Rec"]["diff_ndcg@5"] == pytest.approx(0.25 - 0.2390)
    assert by["GRU4Rec"]["p_ndcg@10_vs_ttt4rec"] < 0.05
    text = "\n".join(md)
    assert "**0.3100 ± 0.0100** (0.2571, +0.0529)" in text
    md_path, csv_path = write_table(tmp_path, ["beauty"], ["GRU4Rec", "TTT4Rec", "DIN"])
    text = md_path.read_text()
    assert "Table 1" in text and len(results.read_rows(csv_path)) == 2
    # a model without results is listed as missing beside the study's value, and never in the CSV
    assert "| DIN | 0 | not run yet (study 0.2466) |" in text
    assert text.count("| DIN |") == 1  # not in the full-ranking section, where DIN has no metric


def test_growth_exponent():
    L = [50, 200, 1000]
    assert growth_exponent(L, [l ** 2 * 3 for l in L]) == pytest.approx(2.0)
    assert growth_exponent(L, [l * 0.1 for l in L]) == pytest.approx(1.0)


@pytest.mark.parametrize("isolate", [False, True])
def test_bench_rows(tmp_path, isolate):
    rows = run_bench(["gru", "attention"], [8, 16], [2], d_model=8, n_layers=1, repeats=2, warmup=1, n_items=50,
                     out=tmp_path / "eff.csv", isolate=isolate)
    assert len(rows) == 2 * 2 * 3
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in rows)
    assert {r["mode"] for r in rows} == {"train", "encode", "stream"}
    if isolate:
        assert all(r["peak_mem_mb"] > 0 for r in rows)
    assert len(results.read_rows(tmp_path / "eff.csv")) == 12


def test_report_from_csvs(tmp_path):
    results.append_rows(tmp_path / "runs.csv", [_row("a", 1, 0.01, 0.2, sweep=""), _row("b", 1, 0.01, 0.3)])
    for r in results.read_rows(tmp_path / "runs.csv"):
        pass
    path = write_report(tmp_path)
    text = path.read_text()
    assert "## Sweeps" in text and "sw-1" in text and "## Efficiency" in text


def test_table_command_keeps_every_dataset(tmp_path, capsys):
    """`benchbox table --datasets X` rewrites table1.md with every Table 1 result so far, not only X's."""
    from benchbox.cli import main
    rows = [{"run_id": f"{ds}{seed}", "status": "ok", "sweep_id": "table1", "dataset": ds, "mixer": "gru",
             "readout": "last", "seed": seed, "train_seconds": 10, "eval_seconds": 1,
             **{f"test_{m}": 0.2 for m in ("ndcg@5", "ndcg@10", "hr@5", "hr@10")}}
            for ds in ("ml-1m", "beauty") for seed in (0, 1)]
    results.append_rows(tmp_path / "runs.csv", rows)
    assert main(["table", "--no-run", "--datasets", "ml-1m", "--results-dir", str(tmp_path)]) == 0
    text = (tmp_path / "table1.md").read_text()
    assert text.index("### beauty") < text.index("### ml-1m")  # the study's order
    assert "| SASRec | 0 | not run yet (study 0.2512) |" in text


def test_table_seed_selection(capsys):
    from benchbox.cli import main
    from benchbox.tables import table_seeds
    assert table_seeds(3) == [0, 1, 2]
    assert table_seeds(3, "2,1,2") == [1, 2]  # --seed-list wins over --seeds; duplicates dropped
    assert main(["table", "--seed-list", "1,x", "--no-run"]) != 0
    assert "--seed-list must be comma-separated integers" in capsys.readouterr().err


def test_table_model_with_readout_options():
    """ComiDR and ComiDR+ share (mixer, readout) and differ only in readout options: each row goes to
    its own model, and the points of ComiDR+ carry the options."""
    from benchbox.config import RunConfig
    from benchbox.tables import table_points
    rows = [{"run_id": f"{name}{seed}", "status": "ok", "sweep_id": "table1", "dataset": "beauty", "mixer": "none",
             "readout": "comirec_dr", "readout_opts": opts, "seed": seed, "train_seconds": 10, "eval_seconds": 1,
             **{f"test_{m}": v + 0.01 * seed for m in ("ndcg@5", "ndcg@10", "hr@5", "hr@10")}}
            for name, opts, v in (("dr", "{}", 0.17), ("plus", '{"inputs": "unit", "select": "max"}', 0.25)) for seed in (0, 1)]
    csv_rows, _ = build_tables(rows, ["beauty"], ["ComiDR", "ComiDR+"])
    by = {r["model"]: r for r in csv_rows}
    assert by["ComiDR"]["ndcg@10_mean"] == pytest.approx(0.175) and by["ComiDR"]["seeds"] == 2
    assert by["ComiDR+"]["ndcg@10_mean"] == pytest.approx(0.255) and "study_ndcg@10" not in by["ComiDR+"]
    pts = table_points(RunConfig(), ["beauty"], ["ComiDR", "ComiDR+"], [0])
    assert [p.readout_opts for p in pts] == [{}, {"inputs": "unit", "select": "max"}]


def test_committed_table1_is_what_the_committed_runs_give(tmp_path):
    """results/table1.md is generated from results/runs.csv (and, for the epoch-picked-on-test rows, the
    curves.csv of those runs) alone: regenerating it gives the same text (this held the
    argparse/statistics version and the pandas version of the table to one another)."""
    import shutil
    from conftest import ROOT
    shutil.copy(ROOT / "results" / "runs.csv", tmp_path / "runs.csv")
    shutil.copy(ROOT / "results" / "curves.csv", tmp_path / "curves.csv")
    if (ROOT / "results" / "table1_notes.md").exists():  # the hand-written part it includes
        shutil.copy(ROOT / "results" / "table1_notes.md", tmp_path / "table1_notes.md")
    md, _ = write_table(tmp_path, [])
    assert md.read_text() == (ROOT / "results" / "table1.md").read_text()


def test_table_keeps_protocols_apart_side_by_side_with_a_figure(tmp_path):
    """Rows of different protocols are never averaged together: each setting gets its own section, a
    side-by-side table holds them beside the study, and a figure per dataset is drawn."""
    rows = []
    settings = {"old": {}, "study": {"protocol": "study", "regime": "instances", "window": 10, "batch_size": 1024}}
    for name, extra in settings.items():
        for seed in range(2):
            v = (0.20 if name == "old" else 0.28) + 0.01 * seed
            cfg = {"mixer": "attention", "readout": "last", "seed": seed, **extra}
            rows.append({"run_id": f"{name}{seed}", "status": "ok", "sweep_id": "table1", "dataset": "beauty",
                         "mixer": "attention", "readout": "last", "seed": seed, "config": json.dumps(cfg),
                         "train_seconds": 10, "eval_seconds": 1, **{f"test_{m}": v for m in ("ndcg@5", "ndcg@10", "hr@5", "hr@10")}})
    results.append_rows(tmp_path / "runs.csv", rows)
    md_path, csv_path = write_table(tmp_path, ["beauty"], ["SASRec"])
    text = md_path.read_text()
    assert "## Side by side" in text and "## Study protocol" in text and "## Sequence regime, last max_len" in text
    # the side-by-side row: study 0.2849, A = study protocol mean 0.285, B = the old rows' 0.205
    assert "| SASRec | 0.2849 / 0.4893 | 0.2850 / 0.2850 (2) [+0.0001 / -0.2043] | 0.2050 / 0.2050 (2) [-0.0799 / -0.2843] |" in text
    table = {(r["setting"], r["model"]): r for r in results.read_rows(csv_path)}
    assert float(table[("study", "SASRec")]["ndcg@10_mean"]) == pytest.approx(0.285)
    assert float(table[("sequence, cover last, budget study", "SASRec")]["ndcg@10_mean"]) == pytest.approx(0.205)
    png = tmp_path / "figures" / "table1_beauty.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_dry_run_estimates_from_measured_rows_of_the_same_kind(tmp_path):
    from benchbox.config import make_config
    from benchbox.tables import estimate_cost, table_points
    cfg = {"mixer": "attention", "readout": "last", "dataset": "beauty", "seed": 0}
    rows = [{"run_id": f"r{i}", "status": "ok", "sweep_id": "table1", "dataset": "beauty", "mixer": "attention",
             "readout": "last", "seed": i, "config": json.dumps({**cfg, "seed": i}), "train_seconds": t,
             "eval_seconds": 10, "epochs_run": 10} for i, t in enumerate((90, 190, 290))]  # 10, 20, 30 s/epoch
    pts = table_points(make_config(cover="last"), ["beauty"], ["SASRec", "GRU4Rec", "ComiDR", "ComiDR+"], [5, 6])
    est = {g["model"]: g for g in estimate_cost(pts, rows)}
    assert est["ComiDR"]["points"] == est["ComiDR+"]["points"] == 2  # same readout, other options: two kinds
    assert est["SASRec"]["sec_per_epoch"] == 20 and est["SASRec"]["cpu_seconds"] == 20 * 10 * 2
    assert est["GRU4Rec"]["cpu_seconds"] is None  # nothing measured for it
    from benchbox.tables import cost_summary
    tot = cost_summary(list(est.values()))  # the unpriced points are counted, never priced as 0 s
    assert tot["points"] == 8 and tot["unpriced_points"] == 6  # only SASRec is measured
    assert tot["cpu_seconds"] == 20 * 10 * 2
    # another protocol is another kind: the sequence rows say nothing about the study protocol's cost
    study = table_points(make_config(protocol="study"), ["beauty"], ["SASRec"], [0])
    assert estimate_cost(study, rows)[0]["cpu_seconds"] is None
    # a GPU row never prices a CPU point (nor the other way), even when it is the latest row of its seed
    gpu = [{**r, "run_id": f"g{i}", "device": "NVIDIA H200", "train_seconds": 5, "eval_seconds": 5}
           for i, r in enumerate(rows)]
    (g,) = estimate_cost(table_points(make_config(cover="last", device="cpu"), ["beauty"], ["SASRec"], [5]), rows + gpu)
    assert g["sec_per_epoch"] == 20 and g["device"] == "cpu"
    (g,) = estimate_cost(table_points(make_config(cover="last", device="cuda"), ["beauty"], ["SASRec"], [5]), rows + gpu)
    assert g["sec_per_epoch"] == 1 and g["device"] == "cuda" and cost_summary([g])["unit"] == "GPU-s"
    (g,) = estimate_cost(table_points(make_config(cover="last"), ["beauty"], ["SASRec"], [5]), gpu, device="cpu")
    assert g["cpu_seconds"] is None
    # rows that ran with the BLAS path in force now price the point; the others only where there are none
    now = environment(torch.device("cpu"))["blas"]
    tagged = [{**r, "blas": now if i == 2 else "some-other-blas"} for i, r in enumerate(rows)]  # 30 s/epoch
    (g,) = estimate_cost(table_points(make_config(cover="last", device="cpu"), ["beauty"], ["SASRec"], [5]), tagged)
    assert g["sec_per_epoch"] == 30 and g["measured_rows"] == 1
    older = [{**r, "blas": ""} for r in rows]  # rows from before the column: all of them count
    (g,) = estimate_cost(table_points(make_config(cover="last", device="cpu"), ["beauty"], ["SASRec"], [5]), older)
    assert g["sec_per_epoch"] == 20 and g["measured_rows"] == 3


def test_dry_run_prices_a_converged_point_from_its_study_budget_epochs(tmp_path):
    """An epoch costs the same under either budget: a converged point without converged rows of its own
    takes its per-epoch cost from the study-budget rows, and its epochs from other models' converged rows."""
    from benchbox.config import make_config
    from benchbox.tables import estimate_cost, table_points
    base = {"dataset": "beauty", "readout": "last", "cover": "windows"}
    rows = [{"run_id": "s0", "status": "ok", "sweep_id": "table1", "dataset": "beauty", "mixer": "attention",
             "readout": "last", "seed": 0, "config": json.dumps({**base, "mixer": "attention", "seed": 0}),
             "train_seconds": 90, "eval_seconds": 10, "epochs_run": 10},  # SASRec: 10 s/epoch, study budget
            {"run_id": "g0", "status": "ok", "sweep_id": "table1", "dataset": "beauty", "mixer": "gru",
             "readout": "last", "seed": 0, "config": json.dumps({**base, "mixer": "gru", "seed": 0, "budget": "converged"}),
             "train_seconds": 100, "eval_seconds": 0, "epochs_run": 40}]  # GRU4Rec converged after 40 epochs
    pts = table_points(make_config(budget="converged"), ["beauty"], ["SASRec", "GRU4Rec", "TTT4Rec"], [1])
    est = {g["model"]: g for g in estimate_cost(pts, rows)}
    assert est["SASRec"]["sec_per_epoch"] == 10 and est["SASRec"]["epochs"] == 40
    assert est["SASRec"]["cpu_seconds"] == 400 and "study-budget" in est["SASRec"]["basis"]
    assert est["GRU4Rec"]["sec_per_epoch"] == 2.5 and est["GRU4Rec"]["basis"] == "same kind"
    assert est["TTT4Rec"]["cpu_seconds"] is None and est["TTT4Rec"]["basis"] == "nothing measured"
    # and the other way: a study-budget point without rows of its own takes the converged rows' epoch cost
    pts = table_points(make_config(cover="windows"), ["beauty"], ["GRU4Rec"], [0, 1])
    (g,) = estimate_cost(pts, rows)
    assert g["sec_per_epoch"] == 2.5 and g["epochs"] == 10 and g["cpu_seconds"] == 2.5 * 10 * 2
    assert g["basis"] == "per epoch: converged rows"
    # a dataset without converged rows takes the epochs of the same model's converged rows elsewhere
    elec = {**rows[0], "run_id": "e0", "dataset": "electronics", "mixer": "gru",
            "config": json.dumps({**base, "dataset": "electronics", "mixer": "gru", "seed": 0})}
    (g,) = estimate_cost(table_points(make_config(budget="converged"), ["electronics"], ["GRU4Rec"], [0]), rows + [elec])
    assert g["sec_per_epoch"] == 10 and g["epochs"] == 40 and "1 other datasets' converged row(s)" in g["basis"]
    # a sensitivity knob that leaves an epoch's work as it is (dropout's rate) prices from the rows without it
    pts = table_points(make_config(cover="windows", budget="converged", dropout=0.0), ["beauty"], ["GRU4Rec"], [0])
    (g,) = estimate_cost(pts, rows)
    assert g["sec_per_epoch"] == 2.5 and g["basis"].startswith("per epoch: sequence, cover windows, budget converged rows")


def test_timing_scripts_share_one_clock_choice():
    """benchmarks/kernel_ratios.py and step_profile.py take their --clock from benchbox.efficiency: the
    CPU clock sums every thread's time, so it is refused with more than one thread."""
    import time
    from benchbox import BenchboxError
    from benchbox.efficiency import pick_clock
    assert pick_clock("wall", 2) is time.perf_counter and pick_clock("cpu", 1) is time.process_time
    with pytest.raises(BenchboxError, match="--threads 1"):
        pick_clock("cpu", 2)
    with pytest.raises(BenchboxError, match="unknown clock"):
        pick_clock("gpu", 1)


def test_epoch_picked_on_test_is_derived_from_the_curves():
    """The lineage's selection (the epoch of the best test score) as a sensitivity row: each study row is
    read at the epoch of its curve's best test NDCG@10 (the earliest of ties); the main rows stay as they are."""
    import pandas as pd
    from benchbox.tables import TEST_SELECTED, picked_on_test
    rows = pd.DataFrame([{"run_id": "a", "setting": "study", "dataset": "beauty", "model": "SASRec", "seed": 0,
                          "test_ndcg@10": 0.30, "best_epoch": 4},
                         {"run_id": "b", "setting": "sequence, cover windows, budget study", "dataset": "beauty",
                          "model": "SASRec", "seed": 0, "test_ndcg@10": 0.20, "best_epoch": 9}])
    curves = pd.DataFrame([{"run_id": "a", "epoch": e, "test_ndcg@5": v - 0.02, "test_ndcg@10": v,
                            "test_hr@5": v + 0.1, "test_hr@10": v + 0.2}
                           for e, v in ((1, 0.25), (4, 0.30), (7, 0.32), (9, 0.32), (10, 0.31))]
                          + [{"run_id": "b", "epoch": 1, "test_ndcg@5": 0.1, "test_ndcg@10": 0.9,
                              "test_hr@5": 0.1, "test_hr@10": 0.1}])
    got = picked_on_test(rows, curves)
    assert list(got["run_id"]) == ["a"] and (got["setting"] == TEST_SELECTED).all()
    assert got["best_epoch"].iloc[0] == 7 and got["test_ndcg@10"].iloc[0] == pytest.approx(0.32)
    assert got["test_hr@10"].iloc[0] == pytest.approx(0.52) and got["test_full_ndcg@10"].isna().all()
    assert rows.loc[0, "test_ndcg@10"] == 0.30  # the main row is not touched


def test_flop_floor_counts_real_steps(tmp_path):
    """benchmarks/flop_floor.py counts the matrix FLOPs of real training steps: positive, larger for a
    wider model, and each row's floor is its FLOPs over the measured GEMM rate."""
    import csv
    import importlib.util
    from conftest import ROOT
    from benchbox.config import make_config
    spec = importlib.util.spec_from_file_location("flop_floor", ROOT / "benchmarks" / "flop_floor.py")
    ff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ff)
    narrow, steps, epochs = ff.step_flops(make_config(mixer="attention", dataset="synthetic", d_model=16), 1)
    wide, _, _ = ff.step_flops(make_config(mixer="attention", dataset="synthetic", d_model=32), 1)
    assert 0 < narrow < wide and steps > 0 and epochs == 10
    out = tmp_path / "floor.csv"
    ff.main(["--datasets", "synthetic", "--models", "SASRec,GRU4Rec", "--protocol", "", "--steps", "1",
             "--seeds", "1", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["model"] for r in rows] == ["SASRec", "GRU4Rec"]
    for r in rows:
        assert float(r["floor_s_per_run"]) == pytest.approx(
            float(r["tflop_per_run"]) * 1e3 / float(r["gemm_gflops"]), rel=0.02, abs=0.2)


def test_step_levers_times_stacked_steps_of_real_batches(tmp_path):
    """benchmarks/step_levers.py: the stacked step holds --stack times the rows of a real batch, and the
    bound it reports is 1 - stacked time / (stack x one step) of the times it stores."""
    import csv
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("step_levers", ROOT / "benchmarks" / "step_levers.py")
    sl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sl)
    out = tmp_path / "levers.csv"
    sl.main(["--dataset", "synthetic", "--models", "SASRec,DIN", "--steps", "2", "--warmup", "0",
             "--no-compile", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["model"] for r in rows] == ["SASRec", "DIN"]
    for r in rows:
        assert int(r["stacked_rows"]) == 3 * int(r["rows"]) and float(r["step_ms"]) > 0
        assert float(r["stacking_saves_at_most"]) == pytest.approx(
            1 - float(r["stacked_step_ms"]) / (3 * float(r["step_ms"])), abs=2e-3)
    with pytest.raises(SystemExit, match="unknown model"):
        sl.main(["--models", "Transformer"])


def test_fig3_verdict_reads_the_best_size_and_the_ends_against_the_middle():
    """benchmarks/fig3_verdict.py on made-up rows where mbs 10 wins every row by 0.01 and the middle sizes
    lose 0.004 (seed noise added): it names 10 best in each row and finds ends - middle = +0.009."""
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("fig3_verdict", ROOT / "benchmarks" / "fig3_verdict.py")
    fv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fv)
    rng = np.random.default_rng(0)
    effect = {1: 0.0, 2: -0.004, 5: -0.004, 10: 0.01}
    rows = [{"sweep_id": "f3", "status": "ok", "seed": seed, "test_ndcg@10": 0.3 + init + effect[mbs] + 1e-4 * rng.standard_normal(),
             "mixer_opts": json.dumps({"initializer_range": init, "mini_batch_size": mbs})}
            for init in (0.01, 0.02) for mbs in (1, 2, 5, 10) for seed in (0, 1, 2)]
    rows.append({**rows[0], "sweep_id": "other", "test_ndcg@10": 0.9})  # another sweep is not read
    v = fv.verdict(results.frame(rows), "f3")
    assert v["best_per_row"].to_dict() == {0.01: 10, 0.02: 10} and v["pairs"] == 6
    assert v["best_per_row_seed"] == {10: 6}
    assert v["ends_minus_middle"] == pytest.approx(0.009, abs=2e-4) and v["p"] < 1e-6
    with pytest.raises(SystemExit, match="no finished rows"):
        fv.verdict(results.frame(rows), "nope")


# ------------------------------------------------------------------------------------------------
# CPU allocator: freed memory is kept for reuse (glibc), with an opt-out; rows record which one ran
# ------------------------------------------------------------------------------------------------
_HEAP = """
import ctypes, torch
from benchbox.efficiency import cpu_allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
which = cpu_allocator()
t = torch.empty(16 << 20)  # 64 MB, far above glibc's default mmap threshold
t.fill_(1.0)
del t
print(which, libc.mallinfo2().fordblks >> 20)  # MB free in the heap, ready for the next step
"""


def _heap_after_free(mode):
    env = {**os.environ, "BENCHBOX_MALLOC": mode}
    out = subprocess.run([sys.executable, "-c", _HEAP], capture_output=True, text=True, env=env, check=True)
    which, free_mb = out.stdout.split()
    return which, int(free_mb)


def test_cpu_allocator_keeps_freed_memory_for_reuse():
    if platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("the tuning is glibc's mallopt (mallinfo2 from glibc 2.33)")
    retain, system = _heap_after_free("retain"), _heap_after_free("system")
    assert retain[0] == "glibc-retain" and system[0] == "system"
    # retained: the freed 64 MB stays in the heap for reuse; glibc's defaults unmap it (a fresh,
    # page-faulting mapping at the next step)
    assert retain[1] >= 64 and system[1] < 64, (retain, system)


def test_run_rows_record_the_allocator():
    assert environment(torch.device("cpu"))["allocator"] in ("glibc-retain", "system")
    rows = run_bench(["gru"], [8], [2], d_model=8, n_layers=1, modes=("train",), repeats=1, warmup=0, n_items=50,
                     out=None, isolate=False)
    assert [r["allocator"] for r in rows] == [environment(torch.device("cpu"))["allocator"]]
    assert [r["blas"] for r in rows] == [environment(torch.device("cpu"))["blas"]]


# ------------------------------------------------------------------------------------------------
# MKL's fast kernels on AMD: the vendor-check shim (benchbox/blas.py), wanted where it should be, correct
# where loaded, and taken by the benchbox command (never by main() called in-process)
# ------------------------------------------------------------------------------------------------
from benchbox import blas  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512dq avx512vl\n"


def test_shim_is_wanted_on_amd_linux_only_and_can_be_turned_off():
    assert blas.shim_wanted(_AMD, {}, "Linux", "x86_64") == (True, "AMD CPU with AVX-512")
    assert blas.shim_wanted(_AMD.replace(" avx512f", ""), {}, "Linux", "x86_64") == (True, "AMD CPU with AVX2")
    assert not blas.shim_wanted(_AMD.replace(" avx2", ""), {}, "Linux", "x86_64")[0]
    assert not blas.shim_wanted(_AMD.replace("AuthenticAMD", "GenuineIntel"), {}, "Linux", "x86_64")[0]
    assert not blas.shim_wanted(_AMD, {}, "Darwin", "x86_64")[0]
    assert not blas.shim_wanted(_AMD, {}, "Linux", "aarch64")[0]
    assert blas.shim_wanted(_AMD, {blas.SHIM_ENV: "off"}, "Linux", "x86_64") == (False, f"{blas.SHIM_ENV}=off")


def _cc_and_mkl(tmp_path):
    if not torch.backends.mkl.is_available() or platform.system() != "Linux":
        pytest.skip("the shim is for torch's MKL on Linux")
    path = blas.build_shim(tmp_path)
    if path is None:
        pytest.skip("no C compiler to build the shim")
    return path


_PRODUCTS = """
import torch
from benchbox.blas import blas_in_force
torch.manual_seed(0)
worst = 0.0
for m, k, n in [(2040, 64, 256), (33, 7, 130), (1, 64, 1), (512, 512, 512)]:
    a, b, c = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
    exact = a.double() @ b.double()
    for got in (a @ b, torch.addmm(c, a, b) - c, torch.nn.functional.linear(a, b.t().contiguous()),
                torch.bmm(a[None].expand(3, m, k), b[None].expand(3, k, n))[2]):
        worst = max(worst, ((got.double() - exact).abs().max() / exact.abs().max()).item())
print(blas_in_force(), worst)
"""


def test_shim_preloaded_keeps_torch_products_exact_to_float32(tmp_path):
    path = _cc_and_mkl(tmp_path)
    assert blas.build_shim(tmp_path) == path  # built once, then found
    env = {**os.environ, "LD_PRELOAD": str(path)}
    shimmed = subprocess.run([sys.executable, "-c", _PRODUCTS], capture_output=True, text=True, env=env, check=True)
    plain = subprocess.run([sys.executable, "-c", _PRODUCTS], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, check=True)
    (which, err), (which0, err0) = shimmed.stdout.split(), plain.stdout.split()
    assert (which, which0) == ("mkl+shim", "mkl")
    assert float(err) < 1e-5 and float(err0) < 1e-5, (err, err0)


def test_benchbox_command_takes_the_shim_where_wanted(tmp_path):
    _cc_and_mkl(tmp_path)
    env = {**{k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.SHIM_ENV)},
           "BENCHBOX_CACHE": str(tmp_path / "cache")}
    def blas_line(*args, **extra):
        out = subprocess.run([sys.executable, *args, "blas"], capture_output=True, text=True, env={**env, **extra},
                             cwd=ROOT, check=True).stdout
        return out.splitlines()[0]
    wanted = blas.shim_wanted()[0]
    assert blas_line("-m", "benchbox") == ("blas in force: mkl+shim" if wanted else "blas in force: mkl")
    assert (tmp_path / "cache" / blas.SHIM_FILE).exists() == wanted
    assert blas_line("-m", "benchbox", **{blas.SHIM_ENV: "off"}) == "blas in force: mkl"
    assert blas_line("-m", "benchbox.cli") == "blas in force: mkl"  # main() itself never re-executes
    # no compiler, or a cache folder that cannot be written: the command runs on, with MKL's own choice
    (tmp_path / "a-file").write_text("")
    assert blas_line("-m", "benchbox", BENCHBOX_CACHE=str(tmp_path / "a-file" / "cache")) == "blas in force: mkl"
    assert blas_line("-m", "benchbox", BENCHBOX_CACHE=str(tmp_path / "c2"), CC="no-such-compiler") == \
        "blas in force: mkl"
    asked = subprocess.run([sys.executable, "-m", "benchbox.cli", "blas", "--path"], capture_output=True, text=True,
                           env={**env, "BENCHBOX_CACHE": str(tmp_path / "c3"), "CC": "no-such-compiler"}, cwd=ROOT)
    assert asked.returncode == 2 and asked.stderr.startswith("benchbox: error: the shim could not be built")
    assert len(asked.stderr.splitlines()) == 1
    built = subprocess.run([sys.executable, "-m", "benchbox.cli", "blas", "--path"], capture_output=True, text=True,
                           env=env, cwd=ROOT, check=True).stdout.strip()
    assert built == str(tmp_path / "cache" / blas.SHIM_FILE)
