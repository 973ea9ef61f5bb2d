import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["BENCHBOX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture
def shared_data():
    root = Path(os.environ.get("BENCHBOX_DATA", SHARED))
    if not (root / "beauty" / "Beauty.txt").exists():
        pytest.skip(f"shared data not found at {root}")
    return root


def write_seqs(path, seqs):
    path.write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in enumerate(seqs, 1)))
    return path
