"""Result CSVs: atomic, lock-protected appends that never lose or half-write a row.

Every write takes an exclusive ``flock`` on ``<file>.lock``, writes the complete new file to a temporary
file in the same folder, fsyncs it and ``os.replace``s it over the old one. A reader, or a process
killed at any instant (even ``kill -9`` mid-write), therefore only ever sees the old file or the new
one, and concurrent appenders from several processes serialise on the lock.
"""
from __future__ import annotations

import csv
import fcntl
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

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


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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

