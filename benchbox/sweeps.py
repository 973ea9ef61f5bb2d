"""Sweeps (``benchbox sweep``, ``benchbox.sweep``): a grid of runs, resumable, in parallel local processes or on a Ray cluster.

Each point is an ordinary run (one row of results/runs.csv) tagged with the sweep id. A point is done
when a row with its exact config and status ``ok`` or ``diverged`` exists; rerunning the sweep runs only
the other points. Rows are written atomically at the end of a run, so killing the sweep at any moment
(even ``kill -9``) loses at most the runs in flight and never leaves a broken or duplicate row.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from . import BenchboxError, Diverged
from .config import ConfigError, RunConfig
from .results import append_rows, read_rows

FINISHED = ("ok", "diverged")
RUN_FIELDS = {f.name for f in fields(RunConfig)}


def parse_grid_value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def parse_grid(pairs: list[str]) -> dict[str, list]:
    grid = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"--grid {p!r} must look like key=v1,v2,...")
        k, vs = p.split("=", 1)
        grid[k.strip()] = [parse_grid_value(v.strip()) for v in vs.split(",") if v.strip()]
        if not grid[k.strip()]:
            raise ConfigError(f"--grid {k} has no values")
    return grid


def load_sweep_file(path: str) -> tuple[dict, dict, list[int]]:
    """TOML: run options at top level (mixer, dataset, epochs, ...), ``seeds = [..]``, ``[grid]`` of lists,
    optional ``[mixer_opts]`` fixed for every point."""
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"sweep file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    grid = d.pop("grid", {})
    seeds = d.pop("seeds", [0])
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{path}: grid.{k} must be a non-empty list")
    return d, grid, list(seeds)


def expand(base: RunConfig, grid: dict[str, list], seeds: list[int], sweep_id: str) -> list[RunConfig]:
    """Every combination; a key that is a run option (lr, d_model, ...) sets it, any other key is a mixer
    option (validated against the mixer, so a typo fails before anything runs)."""
    import mixers
    points = []
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        for seed in seeds:
            run_kw, mopts = {}, dict(base.mixer_opts)
            for k, v in zip(keys, combo):
                if k in RUN_FIELDS and k not in ("mixer_opts", "readout_opts"):
                    run_kw[k] = v
                else:
                    mopts[k] = v
            cfg = replace(base, mixer_opts=mopts, seed=seed, sweep_id=sweep_id, **run_kw)
            if cfg.mixer == "none":  # a readout straight on the item embeddings (DIN, ComiRec rows)
                if cfg.mixer_opts:
                    raise ConfigError(f"mixer 'none' takes no options, got {', '.join(cfg.mixer_opts)}")
            else:
                mixers.get_class(cfg.mixer)
                cfg.mixer_opts = {k: mixers.coerce_option(cfg.mixer, k, v) for k, v in cfg.mixer_opts.items()}
            points.append(cfg.validate())
    return points


def sweep_id_for(base: RunConfig, grid: dict, seeds: list[int]) -> str:
    spec = json.dumps({"base": json.loads(replace(base, sweep_id="").to_json()), "grid": grid, "seeds": seeds},
                      sort_keys=True)
    return "sw-" + hashlib.sha256(spec.encode()).hexdigest()[:10]


def pending(points: list[RunConfig], results_dir: str) -> list[RunConfig]:
    done = {identity(r.get("config")) for r in read_rows(Path(results_dir) / "runs.csv") if r.get("status") in FINISHED}
    return [p for p in points if identity(p.to_json()) not in done]


# execution settings that do not change a run's result beyond float noise: a point run by a worker with 1
# thread is the same point as the one asked for with the torch default (checked: identical metrics, see
# README); a compiled training step computes the same sums in another order (speed_notes.md)
NOT_IDENTITY = ("threads", "compile")


def identity(cfg_json: str | None, ignore: tuple[str, ...] = ()) -> str:
    """The part of a stored config that identifies a point for resuming (``ignore``: more keys to drop,
    e.g. the seed to group a configuration's seeds)."""
    try:
        d = json.loads(cfg_json or "{}")
    except json.JSONDecodeError:
        return cfg_json or ""
    drop = set(NOT_IDENTITY) | set(ignore)
    return json.dumps({k: v for k, v in d.items() if k not in drop}, sort_keys=True)


def run_point(cfg_json: str, results_dir: str, threads: int = 0, data_dir: str | None = None) -> tuple[str, str]:
    """Run one point; never raises: returns (status, message). Crashes are stored as ``failed`` rows."""
    from .train import environment, resolve_device, run
    cfg = RunConfig.from_dict(json.loads(cfg_json))
    cfg.data_dir = data_dir  # not part of the config's identity (the data checksum is)
    if threads:
        cfg.threads = threads
    try:
        res = run(cfg, results_dir, progress=None, log=lambda *a, **k: None)
        return "ok", f"test ndcg@10 {res.row.get('test_ndcg@10', float('nan')):.4f}"
    except Diverged as e:
        return "diverged", str(e)
    except Exception as e:  # noqa: BLE001 - a crashing point must not stop the sweep
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        row = {"run_id": time.strftime("%Y%m%d-%H%M%S") + "-failed", "status": "failed", "error": msg,
               "sweep_id": cfg.sweep_id, "dataset": cfg.dataset, "mixer": cfg.mixer, "readout": cfg.readout,
               "mixer_opts": json.dumps(cfg.mixer_opts, sort_keys=True), "seed": cfg.seed, "config": cfg.to_json()}
        try:
            row.update(environment(resolve_device(cfg.device)))
        except Exception:
            pass
        append_rows(Path(results_dir) / "runs.csv", [row])
        return "failed", msg


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer. A killed sweep (even kill -9) must not leave its workers training on and
    appending rows by themselves, so each worker exits as soon as its parent is gone: the runs in
    flight are lost and rerun on resume."""
    import threading

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def run_sweep(points: list[RunConfig], results_dir: str, workers: int = 1, executor: str = "local",
              address: str | None = None, log=print) -> dict[str, int]:
    todo = pending(points, results_dir)
    log(f"sweep {points[0].sweep_id if points else '-'}: {len(points)} points, {len(points) - len(todo)} already "
        f"finished, {len(todo)} to run ({executor}, {workers} worker(s))")
    counts = {"ok": 0, "diverged": 0, "failed": 0}
    if not todo:
        return counts
    if executor not in ("local", "ray"):
        raise ConfigError(f"unknown executor {executor!r} (local, ray)")
    jobs = [p.to_json() for p in todo]
    data_dir = points[0].data_dir and os.path.abspath(points[0].data_dir)
    threads = _threads_per_worker(workers)

    def finished():  # (job, (status, message)) as each point ends, whichever executor runs it
        if executor == "ray":
            try:
                import ray  # optional extra
            except ImportError:
                raise BenchboxError("--executor ray needs Ray: pip install 'benchbox[ray]'") from None
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            remote = ray.remote(num_cpus=threads)(run_point)
            refs = {remote.remote(j, os.path.abspath(results_dir), threads, data_dir): j for j in jobs}
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                yield refs.pop(ready[0]), ray.get(ready[0])
        elif workers <= 1:
            yield from ((j, run_point(j, results_dir, 0, data_dir)) for j in jobs)
        else:
            import concurrent.futures as cf
            import multiprocessing as mp
            with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_exit_with_parent,
                                        initargs=(os.getpid(),)) as ex:
                futs = {ex.submit(run_point, j, results_dir, threads, data_dir): j for j in jobs}
                yield from ((futs[f], f.result()) for f in cf.as_completed(futs))

    for job, (status, msg) in finished():
        counts[status] += 1
        log(f"[{sum(counts.values())}/{len(jobs)}] {status}: {_describe(job)} {msg}")
    return counts


def _describe(cfg_json: str) -> str:
    d = json.loads(cfg_json)
    readout = "" if d.get("readout", "last") == "last" else f" readout={d['readout']} {d.get('readout_opts') or ''}".rstrip()
    return f"{d['mixer']}{readout} {d['dataset']} seed={d['seed']} {d['mixer_opts']}"


def _cost_line(todo: list[RunConfig], results_dir) -> str:
    """What the points left would cost, priced like ``table --dry-run`` from the measured Table 1 rows of
    the same dataset, model and protocol (their mixer options may differ from the swept ones)."""
    from .results import load_runs
    from .tables import cost_summary, estimate_cost
    if not todo:
        return "nothing left to run"
    tot = cost_summary(estimate_cost(todo, load_runs(results_dir)))
    return (f"{len(todo)} point(s) to run; estimated {tot['cpu_seconds']:,.0f} {tot['unit']} from the Table 1 rows of the same "
            f"model and protocol (other mixer options can cost more or less)"
            + (f"; {tot['unpriced_points']} point(s) without a measured row of their kind" if tot["unpriced_points"]
               else ""))


@dataclass
class SweepResult:
    sweep_id: str
    points: list[RunConfig]
    todo: list[RunConfig]  # the points that were not finished before this call
    counts: dict[str, int]  # ok / diverged / failed of the points run by this call (all 0 on a dry run)


def sweep(grid: dict | list[str] | None = None, *, file: str | None = None, seeds=(0,), name: str | None = None,
          workers: int = 1, executor: str = "local", address: str | None = None, dry_run: bool = False,
          results_dir: str = "results", log=print, **options) -> SweepResult:
    """Run a grid of runs (``benchbox sweep``). ``grid``: {key: [values]} or ["key=v1,v2", ...]; a key
    that is a run option sets it, any other key is a mixer option. ``file``: a TOML sweep file whose run
    options, ``seeds`` and ``[grid]`` come under the explicit ones. ``options``: run options as in
    ``benchbox.run``."""
    from .config import make_config
    grid = parse_grid(grid) if not isinstance(grid, dict) else dict(grid)
    seeds = [int(s) for s in (seeds.split(",") if isinstance(seeds, str) else seeds)]
    base = make_config(**{**options, "seed": 0})
    if file:  # the file's run options win (as they always have); mixer options are merged
        fbase, fgrid, fseeds = load_sweep_file(file)
        mopts = {**base.mixer_opts, **fbase.pop("mixer_opts", {})}
        base = make_config(**{**asdict(base), **fbase, "mixer_opts": mopts})
        grid = {**fgrid, **grid}
        seeds = fseeds if seeds == [0] else seeds
    if not grid:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2 (or a [grid] in --file)")
    if workers < 1:
        raise ConfigError("--workers must be >= 1")
    sid = name or sweep_id_for(base, grid, seeds)
    points = expand(base, grid, seeds, sid)
    todo = pending(points, results_dir)
    if dry_run:
        waiting = {id(p) for p in todo}
        for p in points:
            log(f"{'todo' if id(p) in waiting else 'done'}  {_describe(p.to_json())}")
        log(_cost_line(todo, results_dir))
        return SweepResult(sid, points, todo, {"ok": 0, "diverged": 0, "failed": 0})
    return SweepResult(sid, points, todo, run_sweep(points, results_dir, workers, executor, address, log=log))

