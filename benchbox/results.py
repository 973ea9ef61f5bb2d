"""Result CSVs: atomic, lock-protected appends that never lose or half-write a row, and their pandas views.

Every write takes an exclusive ``flock`` on ``<file>.lock``, writes the complete new file to a temporary
file in the same folder, fsyncs it and ``os.replace``s it over the old one. A reader, or a process
killed at any instant (even ``kill -9`` mid-write), therefore only ever sees the old file or the new
one, and concurrent appenders from several processes serialise on the lock. The rewritten file keeps
the mode of the file it replaces (a new one gets 0666 less the umask, 0644 as usual), not the private
0600 of the temporary file. ``load_runs``/``load_curves``/``load_efficiency`` read them as DataFrames.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from . import BenchboxError


@contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> tuple[list[str], list[dict]]:
    if not path.exists():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    for i, r in enumerate(rows, 2):
        if None in r or any(v is None for v in r.values()):
            raise BenchboxError(f"{path}:{i}: malformed CSV row (wrong number of fields); fix or move the file")
    return header, rows


def read_rows(path: str | os.PathLike) -> list[dict]:
    return _read(Path(path))[1]


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else _new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.chmod(f.fileno(), mode)  # mkstemp's file is 0600: a shared results file must stay readable
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BenchboxError(f"no space left on the device of {path}: nothing written, the previous file is "
                                "intact") from None
        raise


def append_rows(path: str | os.PathLike, new_rows: list[dict]) -> None:
    """Append rows; new columns are added to the header (older rows get empty cells)."""
    path = Path(path)
    if not new_rows:
        return
    with locked(path):
        header, rows = _read(path)
        for r in new_rows:
            header += [k for k in r if k not in header]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
        w.writeheader()
        for r in rows + list(new_rows):
            w.writerow({k: r.get(k, "") for k in header})
        _write_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# pandas views: every cell is stored as text; these type the numeric columns and parse the configs
TEXT_COLUMNS = {"run_id", "status", "started_at", "sweep_id", "dataset", "data_source", "data_sha256", "mixer",
                "readout", "mixer_opts", "readout_opts", "config", "device", "torch_version", "python_version",
                "numpy_version", "benchbox_version", "git_commit", "hostname", "error", "dtype", "bench_id",
                "time", "backend", "mode", "allocator", "blas", "cpu_kernels"}


def frame(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Rows (as read from a CSV, or built by hand) as a DataFrame: a column whose non-empty cells all
    parse as numbers becomes numeric (empty cells NaN); the text columns above stay text ('' if empty)."""
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    for c in df.columns:
        if c in TEXT_COLUMNS:
            if c == "config" and df[c].map(lambda v: isinstance(v, dict)).any():
                continue  # load_runs parsed it already
            df[c] = df[c].fillna("").astype(str)
            continue
        cells = df[c].replace("", None)
        num = pd.to_numeric(cells, errors="coerce")
        if num.notna().sum() == cells.notna().sum():
            df[c] = num
    return df


def load_frame(path: str | os.PathLike) -> pd.DataFrame:
    """One result CSV as a typed DataFrame (empty if the file does not exist); malformed rows are a
    one-line BenchboxError, as for every reader."""
    header, rows = _read(Path(path))
    return frame(pd.DataFrame(rows, columns=header))


def load_runs(results_dir: str | os.PathLike = "results") -> pd.DataFrame:
    """results/runs.csv: one row per run, metrics and timings typed, ``config`` parsed into a dict."""
    df = load_frame(Path(results_dir) / "runs.csv")
    if "config" in df:
        df["config"] = [json.loads(c) if c else {} for c in df["config"]]
    return df


def load_curves(results_dir: str | os.PathLike = "results", finished_only: bool = True) -> pd.DataFrame:
    """results/curves.csv: one row per (run, epoch). Epochs are appended while a run trains, so a run
    killed mid-way leaves curve rows without a runs.csv row: ``finished_only`` leaves those out."""
    curves = load_frame(Path(results_dir) / "curves.csv")
    if finished_only and len(curves):
        runs = load_frame(Path(results_dir) / "runs.csv")
        curves = curves[curves["run_id"].isin(runs["run_id"] if "run_id" in runs else [])]
    return curves


def load_efficiency(results_dir: str | os.PathLike = "results", name: str = "efficiency.csv") -> pd.DataFrame:
    """results/efficiency.csv (or ``efficiency_cuda.csv``): one row per benchmark point and mode."""
    return load_frame(Path(results_dir) / name)
