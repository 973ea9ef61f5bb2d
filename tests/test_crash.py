"""Results survive kill -9 at random moments and full disks."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import benchbox
from benchbox import BenchboxError, cli, results
from conftest import ROOT

TINY = ["--epochs", "2", "--d-model", "8", "--n-layers", "1", "--batch-size", "256"]


def _csv_state(rdir):
    """Every CSV must parse (read_rows raises on a partial row); returns {file: rows}."""
    return {p.name: results.read_rows(p) for p in sorted(rdir.glob("*.csv"))}


def _lines(path):
    """Lines of a CSV that is only ever replaced whole (atomic rename): never a partial one."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill_9_at_random_moments_loses_no_finished_run(tmp_path):
    """12 kill -9s of `run`, `sweep`, `table` and `bench` at random moments into one results folder:
    after each, every CSV parses, no row is duplicated, every row seen before is still there, a killed
    run has no runs.csv row and its curve rows are not counted; then the sweep and table finish."""
    rdir = tmp_path / "res"
    out = ["--results-dir", str(rdir)]
    # Kill moments are drawn in units of progress (after the k-th new curve row, k random, plus a random
    # fraction of a second), not of wall time: a fast machine finishes a short command before any fixed
    # delay (CI once killed 5 of 12), a slow one never gets past the imports. The killed `run` and `bench`
    # are never resumed, so they are made long; sweep and table are resumed at the end, so they stay short.
    work = TINY[2:] + ["--epochs", "5"]
    commands = {
        "run": ["run", "--mixer", "gru"] + TINY[2:] + ["--epochs", "200"] + out,
        "sweep": ["sweep", "--mixer", "gru", "--grid", "num_layers=1,2", "--grid", "lr=0.001,0.002", "--name", "sw-k"]
                 + work + out,
        "table": ["table", "--datasets", "synthetic", "--models", "GRU4Rec,SASRec", "--seeds", "2", "--eval", "sampled"]
                 + work + out,
        "bench": ["bench", "--mixers", "gru,attention", "--seq-lens", "8,16,32", "--batch-sizes", "2", "--repeats", "200",
                  "--n-items", "50", "--d-model", "8", "--out", str(rdir / "efficiency.csv"), "--figures",
                  str(rdir / "figures")],
    }
    rng = random.Random(18)
    # one run and one bench finish first, so that "no finished row is lost" is checked whatever the speed
    first_bench = ["bench", "--mixers", "gru", "--seq-lens", "8", "--batch-sizes", "2", "--repeats", "1", "--n-items",
                   "50", "--d-model", "8", "--out", str(rdir / "efficiency.csv"), "--figures", ""]
    first_run = ["run", "--mixer", "gru"] + work + out
    for args in (first_run, first_bench):
        done = subprocess.run([sys.executable, "-m", "benchbox.cli"] + args, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
    seen = {"runs.csv": {r["run_id"] for r in results.read_rows(rdir / "runs.csv")}}
    assert len(seen["runs.csv"]) == 1 and results.read_rows(rdir / "efficiency.csv")
    kills = 0
    for name in ["run", "sweep", "table", "bench"] * 3:
        p = subprocess.Popen([sys.executable, "-m", "benchbox.cli"] + commands[name], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if name == "bench":  # bench writes its rows at the end: a wall-clock moment, imports (~2 s) included
            time.sleep(rng.uniform(1.0, 8.0))
        else:  # k = 0 kills during the imports; otherwise in training, writing or plotting. A sweep or table
            # of 4 points x 5 epochs may finish points first (so that resuming over finished rows is killed too)
            k, n0 = rng.randint(0, 2 if name == "run" else 12), _lines(rdir / "curves.csv")
            deadline = time.monotonic() + 300
            while p.poll() is None and _lines(rdir / "curves.csv") < n0 + k and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)  # the command alone, as `kill -9 PID` does
            kills += 1
        p.wait()
        time.sleep(0.6)  # sweep workers and bench children notice their parent's death and exit
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever is left of its process group
        except ProcessLookupError:
            pass
        state = _csv_state(rdir)
        runs = state.get("runs.csv", [])
        ids = [r["run_id"] for r in runs]
        assert len(ids) == len(set(ids)), "duplicated runs.csv row"
        curves = state.get("curves.csv", [])
        assert len({(c["run_id"], c["epoch"]) for c in curves}) == len(curves), "duplicated curve row"
        eff = state.get("efficiency.csv", [])
        for file, rows in (("runs.csv", ids), ("curves.csv", [(c["run_id"], c["epoch"]) for c in curves]),
                           ("efficiency.csv", [(r["bench_id"], r["mixer"], r["seq_len"], r["mode"]) for r in eff])):
            assert seen.get(file, set()) <= set(rows), f"a row of {file} was lost"
            seen[file] = set(rows)
        # curve rows of killed runs exist on disk, but no reader counts them
        counted = benchbox.load_curves(rdir)
        assert set(counted["run_id"]) <= set(ids) if len(counted) else True
        for png in (rdir / "figures").glob("*.png") if (rdir / "figures").exists() else []:
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert kills >= 8, f"only {kills} of 12 commands were still running when killed"
    before = len(_csv_state(rdir).get("runs.csv", []))
    for name in ("sweep", "table"):  # resuming finishes every point, each with exactly one row
        r = subprocess.run([sys.executable, "-m", "benchbox.cli"] + commands[name], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    runs = results.read_rows(rdir / "runs.csv")
    for sweep_id, n in (("sw-k", 4), ("table1", 4)):
        configs = [r["config"] for r in runs if r["sweep_id"] == sweep_id and r["status"] == "ok"]
        assert len(configs) == n == len(set(configs)), sweep_id
    print(f"kills: {kills}, runs.csv rows before the final resume: {before}, after: {len(runs)}, broken rows: 0")


def test_full_disk_is_a_clean_error_and_keeps_the_previous_csv(tmp_path, capsys, monkeypatch):
    rdir = tmp_path / "res"
    assert cli.main(["run", "--mixer", "gru", "--results-dir", str(rdir)] + TINY[:2] + ["--epochs", "1"]) == 0
    before = {p.name: p.read_bytes() for p in rdir.glob("*.csv")}

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    code = cli.main(["run", "--mixer", "gru", "--results-dir", str(rdir), "--epochs", "1", "--d-model", "8"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no space left on the device" in err and "previous file is intact" in err
    assert {p.name: p.read_bytes() for p in rdir.glob("*.csv")} == before
    assert not list(rdir.glob(".tmp*"))
    with pytest.raises(BenchboxError, match="no space left"):
        results.append_rows(rdir / "runs.csv", [{"run_id": "x"}])


@pytest.mark.skipif(not os.path.exists("/proc/self/mountinfo"), reason="needs Linux mounts")
def test_full_tmpfs_results_dir(tmp_path, capsys):
    """A real full disk where the machine lets us mount a 1 MiB tmpfs (root in a sandbox may not)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        results.append_rows(mnt / "runs.csv", [{"run_id": "keep", "pad": "x" * 100}])
        before = (mnt / "runs.csv").read_bytes()
        with pytest.raises(BenchboxError, match="no space left"):
            for i in range(100):
                results.append_rows(mnt / "runs.csv", [{"run_id": f"r{i}", "pad": "x" * 100_000}])
        rows = results.read_rows(mnt / "runs.csv")
        assert rows[0]["run_id"] == "keep" and (mnt / "runs.csv").read_bytes().startswith(before[:20])
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
