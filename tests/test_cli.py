import csv
import subprocess
import sys

import pytest

from benchbox import cli, results
from conftest import ROOT, write_seqs

TINY = ["--epochs", "1", "--d-model", "16", "--n-layers", "1", "--batch-size", "256"]


def _run(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args,msg", [
    (["run", "--mixer", "lstm"], "unknown mixer 'lstm'"),
    (["run", "--mixer", "attention", "--opt", "heads=2"], "unknown option 'heads' for mixer 'attention'"),
    (["run", "--mixer", "attention", "--opt", "num_heads=3"], "num_heads=3 must divide d_model=16"),
    (["run", "--mixer", "gru", "--lr", "0"], "lr must be > 0"),
    (["run", "--mixer", "gru", "--max-len", "1"], "max_len must be >= 2"),
    (["run", "--mixer", "gru", "--eval-neg", "600"], "600 negatives impossible"),
    (["run", "--mixer", "gru", "--dataset", "ml-1m", "--data-dir", "/nonexistent"], "no data for 'ml-1m': looked in"),
    (["run", "--mixer", "gru", "--dataset", "/nonexistent/x.txt"], "data file not found"),
    (["run", "--mixer", "gru", "--opt", "noequals"], "must look like key=value"),
    (["run", "--mixer", "gru", "--regime", "instances", "--window", "0"], "window must be >= 1"),
    (["run", "--mixer", "gru", "--window", "10"], "--window applies to --regime instances only"),
    (["run", "--mixer", "gru", "--regime", "batch"], "'batch' is not one of"),
    (["run", "--mixer", "gru", "--budget", "forever"], "'forever' is not one of"),
    (["run", "--mixer", "gru", "--protocol", "duet"], "'duet' is not one of"),
    (["run", "--mixer", "gru", "--cover", "all"], "'all' is not one of"),
    (["run", "--mixer", "gru", "--compile"], "--compile applies to --regime instances"),
    (["run", "--mixer", "gru", "--dropout-masks", "numpy"], "'numpy' is not one of"),
])
def test_bad_input_is_one_line_exit_2_and_keeps_results(tmp_path, capsys, args, msg):
    rdir = tmp_path / "res"
    results.append_rows(rdir / "runs.csv", [{"run_id": "keep-me", "status": "ok"}])
    before = (rdir / "runs.csv").read_bytes()
    code, out, err = _run(args + TINY + ["--results-dir", str(rdir)], capsys)
    assert code == 2
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err
    assert (rdir / "runs.csv").read_bytes() == before


def test_malformed_file_names_line(tmp_path, capsys):
    p = tmp_path / "seq.txt"
    p.write_text("1 2 3 4\n2 3 4 5\n3 4 five 6\n")
    code, _, err = _run(["run", "--mixer", "gru", "--dataset", str(p), "--results-dir", ""] + TINY, capsys)
    assert code == 2 and f"{p}:3: malformed line" in err


def test_subprocess_error_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "benchbox.cli", "run", "--mixer", "nope"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("benchbox: error: unknown mixer") and "Traceback" not in r.stderr


def test_run_writes_reproducible_rows(tmp_path, capsys):
    rdir = tmp_path / "res"
    args = ["run", "--mixer", "gru", "--seed", "3", "--results-dir", str(rdir)] + TINY
    for _ in range(2):  # two fresh processes, as two users would run it
        r = subprocess.run([sys.executable, "-m", "benchbox.cli"] + args, capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and "NDCG@10" in r.stdout, r.stderr
    rows = results.read_rows(rdir / "runs.csv")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    a, b = rows
    for k in ("test_ndcg@10", "test_hr@10", "test_ndcg@5", "val_ndcg@10", "best_epoch"):
        assert a[k] == b[k], k  # same seed, same machine: identical metrics
    # the float32 loss may differ in its last bits when the BLAS splits work differently under load
    assert abs(float(a["final_train_loss"]) - float(b["final_train_loss"])) < 1e-5
    for k in ("data_sha256", "git_commit", "torch_version", "device", "config", "seed", "mixer_opts", "peak_mem_mb"):
        assert a[k], k
    curves = results.read_rows(rdir / "curves.csv")
    assert [c["run_id"] for c in curves] == [a["run_id"], b["run_id"]]


def test_training_beats_chance_on_synthetic(tmp_path, capsys):
    code, out, _ = _run(["run", "--mixer", "gru", "--epochs", "4", "--d-model", "32", "--n-layers", "1",
                         "--batch-size", "64", "--results-dir", str(tmp_path)], capsys)
    assert code == 0
    row = results.read_rows(tmp_path / "runs.csv")[0]
    assert float(row["test_hr@10"]) > 0.2  # chance: 0.10 (sd 0.007 over 2,000 users)


def test_diverged_run_is_stored_and_exits_3(tmp_path, capsys, monkeypatch):
    import benchbox.train as train
    monkeypatch.setattr(train, "bce_loss", lambda logits, targets: logits.sum() * float("nan"))
    code, _, err = _run(["run", "--mixer", "gru", "--results-dir", str(tmp_path)] + TINY, capsys)
    assert code == 3 and "diverged" in err and err.count("\n") == 1
    row = results.read_rows(tmp_path / "runs.csv")[0]
    assert row["status"] == "diverged" and "non-finite loss" in row["error"]


def test_full_ranking_eval(tmp_path, capsys):
    code, out, _ = _run(["run", "--mixer", "attention", "--eval", "full", "--results-dir", str(tmp_path)] + TINY, capsys)
    assert code == 0 and "test (full)" in out
    row = results.read_rows(tmp_path / "runs.csv")[0]
    assert float(row["test_full_hr@10"]) <= float(row["test_hr@10"])  # ranking 500 items is harder than 100


def test_datasets_and_mixers_listing(capsys, shared_data):
    code, out, _ = _run(["datasets", "--data-dir", str(shared_data)], capsys)
    assert code == 0 and "ml-1m" in out and "6,040" in out and "22,363" in out
    code, out, _ = _run(["mixers"], capsys)
    assert code == 0 and "attention" in out and "sdpa" in out


def test_study_protocol_preset_yields_to_explicit_flags(tmp_path, capsys):
    import json
    import numpy as np
    rdir = tmp_path / "r"
    rng = np.random.default_rng(0)  # 300 users x 12..40 clicks of 200 items: a few thousand rows
    seqs = write_seqs(tmp_path / "s.txt", [list(rng.choice(np.arange(1, 201), rng.integers(12, 40), replace=False))
                                           for _ in range(300)])
    small = ["--dataset", str(seqs), "--epochs", "1", "--d-model", "8", "--threads", "1"]
    code, out, err = _run(["run", "--mixer", "gru", "--protocol", "study", "--results-dir", str(rdir)] + small, capsys)
    assert code == 0, err
    code, out2, err = _run(["run", "--mixer", "gru", "--protocol", "study", "--window", "5", "--batch-size", "500",
                            "--results-dir", str(rdir)] + small, capsys)
    assert code == 0, err
    first, second = results.read_rows(rdir / "runs.csv")
    c1, c2 = json.loads(first["config"]), json.loads(second["config"])
    assert (c1["regime"], c1["window"], c1["batch_size"], c1["train_neg"], c1["protocol"]) == ("instances", 10, 1024, 4, "study")
    assert (c2["window"], c2["batch_size"], c2["regime"]) == (5, 500, "instances")  # explicit flags win
    # the row says how many steps and targets an epoch has, and the run printed it first
    assert int(first["steps_per_epoch"]) == -(-int(first["train_targets_per_epoch"]) // (1024 // 5))
    assert int(second["steps_per_epoch"]) == -(-int(second["train_targets_per_epoch"]) // (500 // 5))
    assert f"{int(first['steps_per_epoch']):,} steps per epoch" in out
    assert first["regime"] == "instances" and first["stop_reason"] == "budget done (1 epochs)"


def test_converged_budget_stops_on_patience_or_cap_and_says_why(tmp_path, capsys):
    rdir = tmp_path / "r"
    code, out, err = _run(["run", "--mixer", "gru", "--budget", "converged", "--patience", "1", "--epochs", "3",
                           "--lr", "0.05", "--d-model", "8", "--results-dir", str(rdir)], capsys)
    assert code == 0, err
    (row,) = results.read_rows(rdir / "runs.csv")
    n = int(row["epochs_run"])
    assert row["budget"] == "converged" and row["status"] == "ok"
    if n < 3:
        assert row["stop_reason"] == "no better validation NDCG@10 for 1 epochs" and n == int(row["best_epoch"]) + 1
    else:
        assert row["stop_reason"] == "epoch cap (3)"
    from benchbox.config import make_config
    from benchbox.train import budget_epochs
    assert budget_epochs(make_config(budget="converged")) == (300, 10)
    assert budget_epochs(make_config(budget="converged", epochs=7, patience=2)) == (7, 2)
    assert budget_epochs(make_config(readout="comirec_sa")) == (50, 0)


def test_a_torch_compile_failure_is_one_line_exit_2_and_keeps_results(tmp_path, capsys, monkeypatch):
    """torch.compile can fail inside torch on some model and machine (inductor's CPU codegen did, for TTT's
    mini-batches of one token, before mixers.ttt._tok_at_positions): the run stops with one line naming the
    failure and the way out, exit 2, and results/ untouched."""
    import benchbox.train as train

    class InductorError(RuntimeError):  # stands for torch's own: a class of torch's compile machinery
        pass
    InductorError.__module__ = "torch._inductor.exc"

    def failing_step(*args, **kwargs):
        raise InductorError("AssertionError: \n  (codegen of a scatter)")
    monkeypatch.setattr(train, "train_step", failing_step)
    rdir = tmp_path / "res"
    results.append_rows(rdir / "runs.csv", [{"run_id": "keep-me", "status": "ok"}])
    before = (rdir / "runs.csv").read_bytes()
    code, _, err = _run(["run", "--mixer", "ttt_linear", "--dataset", "synthetic", "--protocol", "study", "--compile",
                         "--results-dir", str(rdir)] + TINY, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "torch.compile failed on this model and machine (InductorError" in err and "run without --compile" in err
    assert "at epoch 1, step 1" in err
    assert (rdir / "runs.csv").read_bytes() == before
    assert not train.is_compile_failure(ValueError("a model's own error"))
