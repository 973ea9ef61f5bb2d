"""The Python API (``import benchbox``) and the typer CLI on top of it."""
import ast
import json
import os
import stat
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

import benchbox
from benchbox import BenchboxError, cli, results
from conftest import ROOT

TINY = dict(epochs=1, d_model=16, n_layers=1, batch_size=256)
CLI_TINY = ["--epochs", "1", "--d-model", "16", "--n-layers", "1", "--batch-size", "256"]


def test_api_run_writes_nothing_without_results_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = benchbox.run(mixer="gru", dataset="synthetic", results_dir=None, log=None, **TINY)
    assert list(tmp_path.iterdir()) == []
    assert res.row["status"] == "ok" and 0 < res.metrics["test_hr@10"] <= 1
    assert json.loads(res.row["config"])["d_model"] == 16 and len(res.curves) == 1


def test_api_and_cli_give_the_same_row(tmp_path, capsys):
    """The same options through the API and the CLI build the same config and the same numbers."""
    api = benchbox.run(mixer="gru", opt=["num_layers=2"], seed=1, results_dir=tmp_path / "api", log=None, **TINY)
    assert cli.main(["run", "--mixer", "gru", "--opt", "num_layers=2", "--seed", "1", "--results-dir",
                     str(tmp_path / "cli")] + CLI_TINY) == 0
    row = results.read_rows(tmp_path / "cli" / "runs.csv")[0]
    assert row["config"] == api.row["config"]
    assert float(row["test_ndcg@10"]) == api.metrics["test_ndcg@10"]


@pytest.mark.parametrize("options,msg", [
    (dict(mixer="lstm"), "unknown mixer 'lstm'"),
    (dict(mixer="gru", lr=0), "lr must be > 0"),
    (dict(mixer="gru", epoch=3), "unknown run option(s): epoch"),
    (dict(mixer="gru", eval="most"), "eval must be 'sampled' or 'full'"),
    (dict(mixer="attention", opt=["heads=2"]), "unknown option 'heads' for mixer 'attention'"),
])
def test_api_validates_like_the_cli(tmp_path, options, msg):
    with pytest.raises(BenchboxError) as e:
        benchbox.run(results_dir=tmp_path, log=None, **options)
    assert msg in str(e.value) and not (tmp_path / "runs.csv").exists()


def test_load_runs_types_columns_and_parses_config(tmp_path):
    benchbox.run(mixer="gru", results_dir=tmp_path, log=None, **TINY)
    runs = benchbox.load_runs(tmp_path)
    assert len(runs) == 1 and runs["config"][0]["mixer"] == "gru"
    for col in ("test_ndcg@10", "seed", "train_seconds", "best_epoch", "params"):
        assert pd.api.types.is_numeric_dtype(runs[col]), col
    assert pd.api.types.is_string_dtype(runs["git_commit"]) and runs["run_id"][0].startswith("20")
    curves = benchbox.load_curves(tmp_path)
    assert curves["epoch"].tolist() == [1] and pd.api.types.is_float_dtype(curves["train_loss"])
    assert benchbox.load_runs(tmp_path / "nothing").empty


def test_results_files_keep_a_readable_mode(tmp_path):
    """The atomic rewrite goes through a 0600 temporary file; the result must keep the file's mode."""
    path = tmp_path / "runs.csv"
    old = os.umask(0o022)
    try:
        results.append_rows(path, [{"run_id": "a"}])
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o664)
        results.append_rows(path, [{"run_id": "b"}])
        assert stat.S_IMODE(path.stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_rerun_reproduces_a_row_and_check_catches_a_difference(tmp_path, capsys):
    res = benchbox.run(mixer="gru", seed=2, results_dir=tmp_path, log=None, **TINY)
    again = benchbox.rerun(res.run_id, tmp_path, log=None)
    assert again.matches()
    got = {k: (a, b) for k, a, b in again.comparison}
    assert {"test_ndcg@10", "val_hr@5", "best_epoch", "final_train_loss"} <= set(got)
    # metrics come back to every digit; the float32 loss sum may move in its last bits under load
    assert all(a == b for k, (a, b) in got.items() if k != "final_train_loss")
    assert cli.main(["rerun", res.run_id[:-2], "--check", "--results-dir", str(tmp_path)]) == 0  # unique prefix
    assert "reproduced: largest difference" in capsys.readouterr().out
    # a stored number that the code no longer gives is caught
    text = (tmp_path / "runs.csv").read_text().replace(str(res.row["test_ndcg@10"]), "0.5")
    (tmp_path / "runs.csv").write_text(text)
    assert cli.main(["rerun", res.run_id, "--check", "--results-dir", str(tmp_path)]) == 1
    assert "NOT reproduced" in capsys.readouterr().out
    assert cli.main(["rerun", "no-such-run", "--results-dir", str(tmp_path)]) == 2
    assert "no run matching 'no-such-run'" in capsys.readouterr().err
    # the BLAS path is a setting that changes last digits: a rerun names it when it differs, and rows made
    # before it was recorded (empty) are unknown, not different
    assert not [c for c in again.environment_changes if c[0] == "blas"]
    for stored, listed in (("", False), ("openblas", True)):
        rows = results.read_rows(tmp_path / "runs.csv")
        rows[0]["blas"] = stored
        (tmp_path / "runs.csv").unlink()
        results.append_rows(tmp_path / "runs.csv", rows)
        changes = benchbox.rerun(res.run_id, tmp_path, log=None).environment_changes
        assert [c for c in changes if c[0] == "blas"] == ([("blas", stored, res.row["blas"])] if listed else [])
    # so are the C kernels (benchbox/kernels.py: DIN's and RMSNorm's sum in another order than torch's ops)
    from benchbox import kernels
    assert res.row["cpu_kernels"] == kernels.kernels_in_force() in ("c", "torch")
    for stored, listed in (("", False), ("torch" if res.row["cpu_kernels"] == "c" else "c", True)):
        rows = results.read_rows(tmp_path / "runs.csv")
        rows[0]["cpu_kernels"] = stored
        (tmp_path / "runs.csv").unlink()
        results.append_rows(tmp_path / "runs.csv", rows)
        changes = benchbox.rerun(res.run_id, tmp_path, log=None).environment_changes
        assert [c for c in changes if c[0] == "cpu_kernels"] == (
            [("cpu_kernels", stored, res.row["cpu_kernels"])] if listed else [])


def test_api_sweep_table_and_report(tmp_path):
    logs = []
    res = benchbox.sweep({"num_layers": [1, 2]}, mixer="gru", results_dir=str(tmp_path), log=logs.append, **TINY)
    assert res.counts == {"ok": 2, "diverged": 0, "failed": 0} and len(res.points) == 2
    assert benchbox.sweep(["num_layers=1,2"], mixer="gru", results_dir=str(tmp_path), log=logs.append, dry_run=True,
                          **TINY).todo == []
    assert logs[-1] == "nothing left to run"
    more = benchbox.sweep(["num_layers=1,2,3"], mixer="gru", results_dir=str(tmp_path), log=logs.append, dry_run=True,
                          name=res.sweep_id, **TINY)
    assert len(more.todo) == 1 and logs[-1].startswith("1 point(s) to run; estimated 0 CPU-s")
    assert logs[-1].endswith("1 point(s) without a measured row of their kind")  # sweep rows are not Table 1 rows
    report = benchbox.write_report(tmp_path).read_text()
    assert f"### {res.sweep_id}: gru on synthetic over num_layers (2), 1 seed: 2 ok" in report
    env = benchbox.load_runs(tmp_path).iloc[0]  # the environments table names the BLAS path the rows ran with
    assert "| device | BLAS | torch | python | commit |" in report
    assert f"| {env['device']} | {env['blas']} | {env['torch_version']} |" in report
    md, csv_path = benchbox.table(datasets="beauty", models=["GRU4Rec"], no_run=True, results_dir=tmp_path)
    assert "## Sampled metrics" in md.read_text() and "### beauty" not in md.read_text()  # no Table 1 rows yet


def test_api_bench(tmp_path):
    rows, figures = benchbox.bench(["gru"], [8, 16], [2], d_model=8, n_layers=1, repeats=1, warmup=0, n_items=50,
                                   modes="train", out=tmp_path / "eff.csv", figures=tmp_path / "fig")
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(p.exists() for p in figures)
    assert len(benchbox.load_efficiency(tmp_path, "eff.csv")) == 2
    with pytest.raises(BenchboxError, match="--seq-lens takes comma-separated integers"):
        benchbox.bench(["gru"], "8,x", out=None)


def test_no_engine_module_imports_the_cli():
    """The CLI sits on top: no module of the library imports it (module- or function-level). Only the
    program's entry (``__main__.py``: the preload re-exec, then the CLI) sits above it."""
    for f in sorted((ROOT / "benchbox").glob("*.py")):
        if f.name in ("cli.py", "__main__.py"):
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.ImportFrom):
                assert not (n.module or "").endswith("cli") and "cli" not in [a.name for a in n.names], f.name
            if isinstance(n, ast.Import):
                assert all(not a.name.endswith(".cli") for a in n.names), f.name


def test_import_benchbox_is_light():
    out = subprocess.run([sys.executable, "-c", "import sys, benchbox; benchbox.__all__; print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


runner = CliRunner()


def test_typer_help_and_completion(monkeypatch):
    # the shell named explicitly (typer's own test switch): by default --show-completion detects the
    # parent shell, which a detached process (nohup, some CI runners) does not have
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    r = runner.invoke(cli.app, ["--help"])
    assert r.exit_code == 0
    for command in ("run", "rerun", "datasets", "mixers", "bench", "sweep", "table", "report", "plot"):
        assert command in r.output
    r = runner.invoke(cli.app, ["run", "--help"])
    assert r.exit_code == 0 and "--readout-opt" in r.output and "--results-dir" in r.output and "Evaluation" in r.output
    r = runner.invoke(cli.app, ["table", "--help"])
    assert r.exit_code == 0 and "--seed-list" in r.output and "--mixer" not in r.output
    r = runner.invoke(cli.app, ["--show-completion", "bash"], prog_name="benchbox")
    assert r.exit_code == 0 and "_BENCHBOX_COMPLETE" in r.output


def test_typer_runner_runs_and_repeats_options(tmp_path):
    r = runner.invoke(cli.app, ["run", "--mixer", "attention", "--opt", "num_heads=2", "--opt", "positions=false",
                                "--results-dir", str(tmp_path)] + CLI_TINY)
    assert r.exit_code == 0, r.output
    row = results.read_rows(tmp_path / "runs.csv")[0]
    assert json.loads(row["mixer_opts"]) == {"num_heads": "2", "positions": "false"}  # both repeats kept


@pytest.mark.parametrize("args,msg", [
    (["run", "--no-such-flag"], "benchbox run: No such option: --no-such-flag"),
    (["run", "--epochs", "ten"], "Invalid value for '--epochs'"),
    (["run", "--eval", "most"], "Invalid value for '--eval'"),
    (["rerun"], "Missing argument 'RUN_ID'"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_usage_errors_are_one_line_exit_2(capsys, args, msg):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_example_script_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "compare_mixers.py"), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "gru" in out.stdout and "attention" in out.stdout and (tmp_path / "compare_mixers.png").stat().st_size > 5000


def test_compiled_training_is_the_eager_run_to_float_noise(tmp_path):
    """--compile (instances): the compiled step sees the same batches and dropout masks as the eager one
    (fallback_random), so losses and metrics agree to float noise; evaluation runs eager either way."""
    from conftest import write_seqs
    seqs = write_seqs(tmp_path / "s.txt", [[(u * 7 + i * 3) % 150 + 1 for i in range(15)] for u in range(40)])
    # 40 users x 12 training targets = 480 rows, 240 a step (batch 1200 study rows): one batch shape
    opts = dict(mixer="ttt_linear", dataset=str(seqs), protocol="study", epochs=2, d_model=8, n_layers=1,
                batch_size=1200, results_dir=None, log=None, threads=1)
    from torch._dynamo.utils import counters
    eager = benchbox.run(**opts)
    graphs = counters["stats"]["unique_graphs"]
    compiled = benchbox.run(**opts, compile=True)
    assert counters["stats"]["unique_graphs"] > graphs  # the step did run compiled
    assert json.loads(compiled.row["config"])["compile"] is True and "compile" not in json.loads(eager.row["config"])
    for e, c in zip(eager.curves, compiled.curves):
        assert c["train_loss"] == pytest.approx(e["train_loss"], abs=1e-5) and c["test_ndcg@10"] == pytest.approx(
            e["test_ndcg@10"], abs=1e-4)
    for k, v in eager.metrics.items():
        if isinstance(v, float):
            assert compiled.metrics[k] == pytest.approx(v, abs=1e-4), k


def test_fast_dropout_masks_are_their_own_reproducible_setting(tmp_path):
    """dropout_masks="fast": stored in the row's config (absent at "torch", as in rows made before it), the run
    reproduced by rerun, other numbers than torch's masks from the same seed, and a setting of its own in
    Table 1 (a sensitivity row, never averaged into the default one)."""
    from benchbox.tables import setting_of
    base = benchbox.run(mixer="attention", seed=1, results_dir=tmp_path, log=None, **TINY)
    fast = benchbox.run(mixer="attention", seed=1, dropout_masks="fast", results_dir=tmp_path, log=None, **TINY)
    assert "dropout_masks" not in base.row["config"] and '"dropout_masks": "fast"' in fast.row["config"]
    assert fast.row["final_train_loss"] != base.row["final_train_loss"]
    assert benchbox.rerun(fast.run_id, tmp_path, log=None).matches()
    assert setting_of(json.loads(fast.row["config"])) == setting_of(json.loads(base.row["config"])) + ", dropout_masks fast"


def test_compiled_grouped_training_is_the_eager_grouped_run_to_float_noise(tmp_path, monkeypatch):
    """--compile where the eager step runs in length groups (long windows): the groups are formed eagerly and
    each group's encoder runs compiled with dynamic shapes, so the run keeps the eager run's groups and
    dropout masks and agrees with it to float noise."""
    from conftest import write_seqs
    import benchbox.model as M
    # lengths 3..42: at window 40 a batch spreads over several length groups
    seqs = write_seqs(tmp_path / "s.txt", [[(u * 7 + i * 3) % 150 + 1 for i in range(5 + u % 38)] for u in range(48)])
    opts = dict(mixer="attention", dataset=str(seqs), regime="instances", window=40, epochs=2, d_model=8,
                n_layers=2, batch_size=5 * 256, results_dir=None, log=None, threads=1)
    calls = []
    real = M.per_group
    monkeypatch.setattr(M, "per_group", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    from torch._dynamo.utils import counters
    eager = benchbox.run(**opts)
    n_eager, graphs = len(calls), counters["stats"]["unique_graphs"]
    compiled = benchbox.run(**opts, compile=True)
    assert n_eager and len(calls) == 2 * n_eager and min(calls) >= 2  # grouped steps both ways
    assert counters["stats"]["unique_graphs"] > graphs  # the groups did run compiled
    for e, c in zip(eager.curves, compiled.curves):
        assert c["train_loss"] == pytest.approx(e["train_loss"], abs=1e-5) and c["test_ndcg@10"] == pytest.approx(
            e["test_ndcg@10"], abs=1e-4)
