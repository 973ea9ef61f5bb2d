import json
from dataclasses import replace
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchbox import cli, results
from benchbox.config import RunConfig
from benchbox.sweeps import expand, parse_grid, pending
from conftest import ROOT

TINY = ["--epochs", "1", "--d-model", "8", "--n-layers", "1", "--batch-size", "512"]


def test_grid_expansion_splits_run_and_mixer_options():
    base = RunConfig(mixer="attention")
    pts = expand(base, parse_grid(["num_heads=1,2", "lr=0.001,0.01"]), [0, 1], "sw-x")
    assert len(pts) == 8
    assert {p.mixer_opts["num_heads"] for p in pts} == {1, 2} and {p.lr for p in pts} == {0.001, 0.01}
    assert all(p.sweep_id == "sw-x" for p in pts)
    with pytest.raises(Exception, match="unknown option 'heads'"):
        expand(base, parse_grid(["heads=1"]), [0], "sw-x")


def test_points_run_with_worker_threads_count_as_done(tmp_path):
    """Workers run points with threads=1 (stored in the row's config); resuming must still see them."""
    base = RunConfig(mixer="gru", dataset="synthetic")
    pts = expand(base, parse_grid(["lr=0.001,0.003"]), [0], "sw-t")
    ran = RunConfig.from_dict(json.loads(pts[0].to_json()))
    ran.threads = 1
    results.append_rows(tmp_path / "runs.csv", [{"run_id": "a", "status": "ok", "config": ran.to_json()}])
    assert [p.lr for p in pending(pts, tmp_path)] == [0.003]


def test_a_compiled_point_is_the_same_point(tmp_path):
    """--compile is an execution setting (same sums in another order): a compiled run of a point finishes
    the eager point for resuming, and the other way round."""
    base = RunConfig(mixer="gru", dataset="synthetic", regime="instances", window=5)
    pts = expand(base, parse_grid(["lr=0.001,0.003"]), [0], "sw-c")
    ran = RunConfig.from_dict(json.loads(pts[0].to_json()))
    ran.compile = True
    assert '"compile": true' in ran.to_json() and "compile" not in pts[0].to_json()
    results.append_rows(tmp_path / "runs.csv", [{"run_id": "a", "status": "ok", "config": ran.to_json()}])
    assert [p.lr for p in pending(pts, tmp_path)] == [0.003]
    eager_dir = tmp_path / "eager"  # and an eager row finishes the compiled point
    results.append_rows(eager_dir / "runs.csv", [{"run_id": "b", "status": "ok", "config": pts[1].to_json()}])
    compiled_pts = expand(replace(base, compile=True), parse_grid(["lr=0.001,0.003"]), [0], "sw-c")
    assert [p.lr for p in pending(compiled_pts, eager_dir)] == [0.001]


def test_sweep_of_a_readout_without_mixer():
    base = RunConfig(mixer="none", readout="comirec_dr", readout_opts={"bilinear": "shared"})
    pts = expand(base, parse_grid(["lr=0.001,0.003"]), [0], "sw-r")
    assert [p.lr for p in pts] == [0.001, 0.003] and all(p.readout_opts == {"bilinear": "shared"} for p in pts)
    with pytest.raises(Exception, match="takes no options"):
        expand(base, parse_grid(["num_heads=1"]), [0], "sw-r")


def test_sweep_file_and_resume(tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text('mixer = "gru"\nepochs = 1\nd_model = 8\nn_layers = 1\nseeds = [0]\n[grid]\nnum_layers = [1, 2]\n')
    args = ["sweep", "--file", str(f), "--results-dir", str(tmp_path), "--name", "sw-file"]
    assert cli.main(args) == 0
    rows = results.read_rows(tmp_path / "runs.csv")
    assert len(rows) == 2 and {r["sweep_id"] for r in rows} == {"sw-file"}
    assert cli.main(args) == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().out
    assert len(results.read_rows(tmp_path / "runs.csv")) == 2


def test_failed_and_diverged_points_do_not_stop_the_sweep(tmp_path, monkeypatch):
    import benchbox.train as train
    from benchbox import Diverged
    from benchbox.sweeps import run_sweep
    calls = []

    def fake_run(cfg, results_dir, progress=None, log=None):
        calls.append(cfg.mixer_opts["num_layers"])
        if cfg.mixer_opts["num_layers"] == 1:
            results.append_rows(os.path.join(results_dir, "runs.csv"),
                                [{"run_id": "d", "status": "diverged", "config": cfg.to_json()}])
            raise Diverged("non-finite loss")
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(train, "run", fake_run)
    pts = expand(RunConfig(mixer="gru"), {"num_layers": [1, 2]}, [0], "sw-f")
    counts = run_sweep(pts, str(tmp_path), log=lambda *a: None)
    assert counts == {"ok": 0, "diverged": 1, "failed": 1}
    rows = {r["status"]: r for r in results.read_rows(tmp_path / "runs.csv")}
    assert rows["failed"]["error"] == "RuntimeError: boom second line"
    # diverged is a finished point; failed is tried again
    assert [json.loads(p.to_json())["mixer_opts"] for p in pending(pts, str(tmp_path))] == [{"num_layers": 2}]


def test_kill_9_loses_only_runs_in_flight(tmp_path):
    """Kill the sweep at random moments; rerun; every point ends with exactly one finished row."""
    cmd = [sys.executable, "-m", "benchbox.cli", "sweep", "--mixer", "gru", "--grid", "num_layers=1,2,3",
           "--grid", "lr=0.001,0.002", "--results-dir", str(tmp_path), "--name", "sw-kill"] + TINY
    runs = tmp_path / "runs.csv"
    for kill_after in (1, 3):
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and (not runs.exists() or len(results.read_rows(runs)) < kill_after):
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
    finished_before = {r["config"] for r in results.read_rows(runs) if r["status"] == "ok"}
    assert len(finished_before) >= 3
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{len(finished_before)} already finished, {6 - len(finished_before)} to run" in out.stdout
    rows = results.read_rows(runs)
    configs = [r["config"] for r in rows if r["status"] == "ok"]
    assert len(configs) == 6 and len(set(configs)) == 6  # no duplicate, no broken row, nothing redone


def _session_members(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # session id; zombies have exited already
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_kill_9_takes_the_workers_down(tmp_path):
    """With --workers, killing the sweep must also stop its workers (they would go on training and
    appending rows on their own)."""
    cmd = [sys.executable, "-m", "benchbox.cli", "sweep", "--mixer", "gru", "--grid", "num_layers=1,2",
           "--results-dir", str(tmp_path), "--name", "sw-kill-workers", "--workers", "2"] + TINY
    cmd[cmd.index("--epochs") + 1] = "50"  # long enough to be in flight when killed
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(_session_members(p.pid)) < 3:  # the sweep and its 2 workers
        time.sleep(0.1)
    assert len(_session_members(p.pid)) >= 3, "the workers never started"
    time.sleep(2)  # let them import and start training
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 30
    while time.time() < deadline and _session_members(p.pid):
        time.sleep(0.2)
    left = _session_members(p.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} worker process(es) outlived the killed sweep"
    assert not (tmp_path / "runs.csv").exists() or all(
        r["status"] == "ok" for r in results.read_rows(tmp_path / "runs.csv"))


def test_interrupted_write_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "runs.csv"
    results.append_rows(path, [{"run_id": "a"}])
    before = path.read_bytes()

    def boom(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        results.append_rows(path, [{"run_id": "b"}])
    assert path.read_bytes() == before and not list(tmp_path.glob(".tmp*"))


@pytest.mark.timeout(300)  # Ray starts a local cluster: bounded, so a hung start fails instead of stalling CI
def test_ray_executor(tmp_path):
    """The Ray executor through the public API, as `benchbox sweep --executor ray` calls it."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'benchbox[ray]')")
    import benchbox
    try:
        res = benchbox.sweep({"num_layers": [1, 2]}, mixer="gru", epochs=1, d_model=8, n_layers=1, workers=2,
                             executor="ray", name="sw-ray", results_dir=str(tmp_path), log=lambda *a: None)
    finally:
        ray.shutdown()
    assert res.counts["ok"] == 2
    rows = results.read_rows(tmp_path / "runs.csv")
    assert len(rows) == 2 and {r["sweep_id"] for r in rows} == {"sw-ray"} and all(r["status"] == "ok" for r in rows)


def test_local_workers(tmp_path):
    from benchbox.sweeps import run_sweep
    pts = expand(RunConfig(mixer="gru", epochs=1, d_model=8, n_layers=1, batch_size=512), {"num_layers": [1, 2]},
                 [0], "sw-par")
    assert run_sweep(pts, str(tmp_path), workers=2, log=lambda *a: None)["ok"] == 2
    assert len(results.read_rows(tmp_path / "runs.csv")) == 2


def test_committed_table1_points_are_all_finished():
    """The points `benchbox table --cover last` builds today are the committed rows' points: a new run
    option at the value older rows ran with must not change a point's identity (else resuming would rerun
    the whole table). (`--cover windows`, today's default, is a new protocol: new points.)"""
    from benchbox.config import make_config
    from benchbox.tables import MODELS, table_points
    base = make_config(eval_full=True, mixer="gru", dataset="synthetic", seed=0, cover="last")
    new = table_points(make_config(eval_full=True, mixer="gru", dataset="synthetic", seed=0), ["beauty"], ["SASRec"], [0])
    assert len(pending(new, ROOT / "results")) == 1
    points = table_points(base, ["ml-1m", "beauty", "electronics"], list(MODELS), [0, 1, 2])
    assert len(points) == 81 and pending(points, ROOT / "results") == []
