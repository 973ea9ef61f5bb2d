"""Where benchbox looks for data, keeps its cache and finds its dataset cards."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CARDS_DIR = PROJECT_ROOT / "datasets"


def cache_dir() -> Path:
    d = Path(os.environ.get("BENCHBOX_CACHE", Path.home() / ".cache" / "benchbox"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """--data-dir wins, then $BENCHBOX_DATA; None when neither is set."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("BENCHBOX_DATA")
    return Path(env).expanduser() if env else None
