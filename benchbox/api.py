"""The Python API's own functions: one run from keyword options, and the rerun of a stored row.

Everything else of the API lives in the engine module that does the work (``benchbox.sweep`` is
``sweeps.sweep``, ``benchbox.load_runs`` is ``results.load_runs``, ...); ``benchbox/__init__.py`` lists them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import BenchboxError
from .config import RunConfig, make_config
from .results import read_rows


def run(mixer: str = "ttt_linear", dataset: str = "synthetic", *, results_dir="results", progress=None, log=print,
        **options):
    """Train and evaluate one configuration, as ``benchbox run`` does, and return its ``RunResult``.

    ``options`` are the run options under their CLI names (``epochs=1``, ``d_model=32``, ``eval="full"``,
    ``opt=["num_heads=2"]`` or ``mixer_opts={"num_heads": 2}``, ...), validated as on the command line.
    ``results_dir=None`` writes nothing; ``log=None`` prints nothing."""
    from .train import run as train_run
    cfg = make_config(mixer=mixer, dataset=dataset, **options)
    return train_run(cfg, results_dir, progress=progress, log=log or (lambda *a, **k: None))


# the numbers a rerun compares: the selected epoch's metrics, where it was selected, the last loss
COMPARED_EXTRA = ("best_epoch", "epochs_run", "final_train_loss")
# settings of the environment that can change a number; a rerun says which of them differ
ENVIRONMENT = ("git_commit", "torch_version", "numpy_version", "python_version", "device", "threads", "data_sha256",
               "blas", "cpu_kernels")


@dataclass
class Rerun:
    stored: dict  # the runs.csv row, as text
    new: dict  # the new run's row
    comparison: list[tuple[str, float, float]] = field(default_factory=list)  # (name, stored, new)
    environment_changes: list[tuple[str, str, str]] = field(default_factory=list)  # (setting, stored, now)

    def max_difference(self) -> float:
        return max((abs(a - b) if not (math.isnan(a) and math.isnan(b)) else 0.0 for _, a, b in self.comparison),
                   default=0.0)

    def matches(self, tol: float = 1e-6) -> bool:
        """Every compared number within ``tol`` (NaN equal to NaN)."""
        return all((math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol for _, a, b in self.comparison)


def _number(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def find_run(run_id: str, results_dir="results") -> dict:
    """The runs.csv row of ``run_id`` (or of the one run whose id starts with it)."""
    path = Path(results_dir) / "runs.csv"
    if not path.exists():
        raise BenchboxError(f"no {path}: nothing to rerun")
    rows = read_rows(path)
    exact = [r for r in rows if r.get("run_id") == run_id]
    found = exact or [r for r in rows if r.get("run_id", "").startswith(run_id)]
    if len(found) != 1:
        raise BenchboxError(f"{'no run' if not found else f'{len(found)} runs'} matching {run_id!r} in {path}")
    return found[0]


def rerun(run_id: str, results_dir="results", *, data_dir: str | None = None, threads: int | None = None,
          progress=None, log=print) -> Rerun:
    """Rebuild the exact configuration of a runs.csv row, run it again (writing nothing), and compare
    the new numbers with the stored ones. ``threads`` defaults to the thread count the row ran with:
    a different count can change float sums and so the last digits."""
    from .train import environment, resolve_device, run as train_run
    row = find_run(run_id, results_dir)
    try:
        cfg = RunConfig.from_dict(json.loads(row.get("config") or ""))
    except json.JSONDecodeError:
        raise BenchboxError(f"run {row['run_id']} has no readable config in runs.csv") from None
    cfg.data_dir = data_dir
    stored_threads = int(_number(row.get("threads"))) if row.get("threads") else 0
    cfg.threads = threads if threads is not None else (stored_threads or cfg.threads)
    new = train_run(cfg.validate(), None, progress=progress, log=log or (lambda *a, **k: None)).row
    names = [k for k in row if k.startswith(("val_", "test_")) and row[k] != ""] + list(COMPARED_EXTRA)
    comparison = [(k, _number(row.get(k)), _number(new.get(k))) for k in names]
    now = {**environment(resolve_device(cfg.device)), "data_sha256": new.get("data_sha256", "")}
    # rows made before a setting was recorded have it empty: unknown, not a change
    changes = [(k, str(row.get(k, "")), str(now[k])) for k in ENVIRONMENT
               if str(row.get(k, "")) != str(now[k]) and not (k in ("blas", "cpu_kernels") and not row.get(k))]
    return Rerun(row, new, comparison, changes)
