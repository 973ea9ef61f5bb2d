"""Datasets: cards, offline files, official downloads, the synthetic default, and a parse cache.

Every dataset ends up as the same thing: one chronological item sequence per user, item ids from 1
(0 is padding), held as a flat int64 array plus offsets (``Sequences``). The on-disk format shared by
all offline copies is one line per user, ``user item item ...``.
"""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
import tomllib
import urllib.request
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import BenchboxError
from .paths import CARDS_DIR, cache_dir, data_dir as resolve_data_dir

PARSE_VERSION = 1  # bump when parsing changes, so cached arrays are rebuilt


class DataError(BenchboxError):
    pass


# --------------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------------
@dataclass
class Sequences:
    name: str
    items: np.ndarray  # flat int64, all users' items concatenated in user order
    offsets: np.ndarray  # int64, n_users + 1
    n_items: int
    sha256: str
    source: str  # where it came from (a path or "generated")
    max_len: int = 50
    dropped_users: int = 0

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u]:self.offsets[u + 1]]

    def stats(self) -> dict:
        n = self.lengths
        return {
            "users": self.n_users, "items": self.n_items, "interactions": int(n.sum()),
            "len_min": int(n.min()), "len_median": float(np.median(n)), "len_mean": round(float(n.mean()), 2),
            "len_max": int(n.max()), "density": round(float(n.sum()) / (self.n_users * self.n_items), 5),
        }


def _from_lists(name, seqs: list[np.ndarray], sha, source, max_len, min_len=3) -> Sequences:
    kept = [s for s in seqs if len(s) >= min_len]
    if not kept:
        raise DataError(f"{source}: no user has the {min_len} items needed for train/validation/test")
    lengths = np.array([len(s) for s in kept], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.concatenate(kept).astype(np.int64)
    return Sequences(name, items, offsets, int(items.max()), sha, source, max_len, len(seqs) - len(kept))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_sequence_file(path: Path, name: str | None = None, max_len: int = 50) -> Sequences:
    """Read ``user item item ...`` lines (cached as arrays keyed by the file's sha256)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    sha = sha256_file(path)
    cached = cache_dir() / "processed" / f"{sha[:24]}-v{PARSE_VERSION}.npz"
    if cached.exists():
        z = np.load(cached)
        return Sequences(name or path.stem, z["items"], z["offsets"], int(z["n_items"]), sha, str(path), max_len,
                         int(z["dropped"]))
    seqs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            parts = raw.split()
            if not parts:
                continue
            try:
                vals = np.array([int(p) for p in parts], dtype=np.int64)
            except ValueError:
                bad = next(p for p in parts if not p.lstrip(b"-").isdigit())
                raise DataError(f"{path}:{lineno}: malformed line: {bad.decode(errors='replace')!r} is not an "
                                "integer id (expected 'user item item ...')") from None
            if len(vals) < 2:
                raise DataError(f"{path}:{lineno}: malformed line: a user id with no items")
            if vals.min() < 1:
                raise DataError(f"{path}:{lineno}: malformed line: ids start at 1 (0 is reserved for padding)")
            seqs.append(vals[1:])
    if not seqs:
        raise DataError(f"{path}: empty data file")
    data = _from_lists(name or path.stem, seqs, sha, str(path), max_len)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, items=data.items, offsets=data.offsets, n_items=data.n_items, dropped=data.dropped_users)
    os.replace(tmp, cached)
    return data


def write_sequence_file(seqs: list[np.ndarray] | Sequences, path: Path) -> None:
    if isinstance(seqs, Sequences):
        seqs = [seqs.user(u) for u in range(seqs.n_users)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for u, s in enumerate(seqs, 1):
            f.write(f"{u} {' '.join(map(str, s))}\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Synthetic default: deterministic, with learnable sequential structure
# --------------------------------------------------------------------------------------------
def synthetic(seed: int = 0, n_users: int = 2000, n_items: int = 500, min_len: int = 8, max_seq: int = 60,
              p_transition: float = 0.7, max_len: int = 50) -> Sequences:
    """Users walk a sparse item-transition graph (each item has 3 fixed successors) with probability
    ``p_transition`` and otherwise jump to a random item of their favourite topic (10 topics).

    A mixer that learns "what follows the last item" (and the user's topic) beats chance by far; a
    random scorer gets HR@10 = 0.10.
    """
    rng = np.random.default_rng(seed)
    n_topics = 10
    topic_of = rng.permutation(np.arange(n_items) % n_topics)  # every topic non-empty
    by_topic = [np.flatnonzero(topic_of == t) for t in range(n_topics)]
    successors = rng.integers(0, n_items, (n_items, 3))
    seqs = []
    for _ in range(n_users):
        length = int(rng.integers(min_len, max_seq + 1))
        topic = int(rng.integers(n_topics))
        seq = [int(rng.choice(by_topic[topic]))]
        seen = set(seq)
        while len(seq) < length:
            if rng.random() < p_transition:
                nxt = int(successors[seq[-1], rng.integers(3)])
            else:
                nxt = int(rng.choice(by_topic[topic]))
            if nxt in seen:  # one interaction per (user, item), as in the real datasets
                nxt = int(rng.integers(n_items))
                if nxt in seen:
                    continue
            seq.append(nxt)
            seen.add(nxt)
        seqs.append(np.array(seq, dtype=np.int64) + 1)
    text = "\n".join(" ".join(map(str, s)) for s in seqs).encode()
    sha = hashlib.sha256(text).hexdigest()
    return _from_lists("synthetic", seqs, sha, f"generated (seed={seed})", max_len)


# --------------------------------------------------------------------------------------------
# Official raw files -> sequences (for users with internet)
# --------------------------------------------------------------------------------------------
def sequences_from_interactions(rows, core: int = 0) -> list[np.ndarray]:
    """rows: iterable of (user, item, timestamp) with raw ids. Iterative ``core``-core filtering on
    users and items, then each user's items in time order; ties keep file order (a stable sort).
    Users are numbered by first appearance, items by first appearance in the filtered data."""
    rows = list(rows)
    if core > 1:
        while True:
            uc, ic = defaultdict(int), defaultdict(int)
            for u, i, _ in rows:
                uc[u] += 1
                ic[i] += 1
            kept = [r for r in rows if uc[r[0]] >= core and ic[r[1]] >= core]
            if len(kept) == len(rows):
                break
            rows = kept
    per_user: dict = defaultdict(list)
    for order, (u, i, t) in enumerate(rows):
        per_user[u].append((t, order, i))
    item_ids: dict = {}
    seqs = []
    for u, events in per_user.items():
        events.sort()
        seqs.append(np.array([item_ids.setdefault(i, len(item_ids) + 1) for _, _, i in events], dtype=np.int64))
    return seqs


def read_movielens_ratings(path: Path) -> list[np.ndarray]:
    """ML-1M ``ratings.dat`` (UserID::MovieID::Rating::Timestamp); every rating is an interaction.
    Items are numbered by the rank of their MovieID, users keep their UserID order."""
    rows = []
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.strip().split("::")
            if len(parts) != 4:
                raise DataError(f"{path}:{lineno}: malformed ratings line (expected UserID::MovieID::Rating::Timestamp)")
            rows.append((int(parts[0]), int(parts[1]), int(parts[3])))
    movie_rank = {m: r for r, m in enumerate(sorted({m for _, m, _ in rows}), 1)}
    per_user: dict = defaultdict(list)
    for order, (u, m, t) in enumerate(rows):
        per_user[u].append((t, order, movie_rank[m]))
    return [np.array([m for _, _, m in sorted(per_user[u])], dtype=np.int64) for u in sorted(per_user)]


def read_amazon_ratings_csv(path: Path, core: int = 5) -> list[np.ndarray]:
    """Amazon 2014 ratings-only CSV (user,item,rating,unixtime; no header), k-core filtered."""
    rows = []
    with open(path, newline="") as f:
        for lineno, rec in enumerate(csv.reader(f), 1):
            if len(rec) != 4:
                raise DataError(f"{path}:{lineno}: malformed ratings line (expected user,item,rating,time)")
            try:
                rows.append((rec[0], rec[1], int(float(rec[3]))))
            except ValueError:
                raise DataError(f"{path}:{lineno}: malformed timestamp {rec[3]!r}") from None
    return sequences_from_interactions(rows, core=core)


# --------------------------------------------------------------------------------------------
# Cards
# --------------------------------------------------------------------------------------------
@dataclass
class Card:
    name: str
    title: str
    description: str
    offline_file: str
    max_len: int
    filtering: str
    offline_sha256: str = ""
    notes: str = ""
    download: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return CARDS_DIR / f"{self.name}.toml"


def load_cards() -> dict[str, Card]:
    cards = {}
    for p in sorted(CARDS_DIR.glob("*.toml")):
        with open(p, "rb") as f:
            d = tomllib.load(f)
        cards[d["name"]] = Card(**d)
    return cards


def _md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: Path, sha256: str | None, md5: str | None = None) -> Path:
    """Fetch ``url`` once into ``dest``, checked against the card's sha256 and/or md5. Without a
    published checksum the first download's sha256 is stored beside it and checked on reuse."""
    pin = dest.with_name(dest.name + ".sha256")
    if dest.exists():
        want = sha256 or (pin.read_text().strip() if pin.exists() else None)
        if want and sha256_file(dest) == want:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(r, f)
    except Exception as e:
        os.unlink(tmp)
        raise DataError(f"download of {url} failed: {e}") from None
    got = sha256_file(Path(tmp))
    if (sha256 and got != sha256) or (md5 and _md5_file(Path(tmp)) != md5):
        os.unlink(tmp)
        raise DataError(f"checksum mismatch for {url}: got sha256 {got}, card says {sha256 or 'md5 ' + md5}")
    os.replace(tmp, dest)
    pin.write_text(got + "\n")
    return dest


def fetch_official(card: Card) -> Path:
    """Download the publisher's raw file into the cache and convert it to the sequence format."""
    dl = card.download
    if not dl:
        raise DataError(f"dataset {card.name!r} has no official download")
    out = cache_dir() / "downloads" / card.name / f"{card.name}.txt"
    if out.exists():
        return out
    raw = _download(dl["url"], cache_dir() / "downloads" / card.name / Path(dl["url"]).name,
                    dl.get("sha256"), dl.get("md5"))
    fmt = dl["format"]
    if fmt == "movielens_zip":
        with zipfile.ZipFile(raw) as z, z.open(dl["member"]) as src:
            member = raw.with_name("ratings.dat")
            member.write_bytes(src.read())
        seqs = read_movielens_ratings(member)
    elif fmt == "amazon_ratings_csv":
        seqs = read_amazon_ratings_csv(raw, core=int(dl.get("core", 5)))
    else:
        raise DataError(f"card {card.name}: unknown download format {fmt!r}")
    write_sequence_file(seqs, out)
    return out


def load(dataset: str, data_dir: str | None = None, download: bool = False, max_len: int | None = None,
         synthetic_seed: int = 0) -> Sequences:
    """Resolve a dataset name (a card), ``synthetic``, or a path to a file in the sequence format."""
    if dataset == "synthetic":
        return synthetic(seed=synthetic_seed, max_len=max_len or 50)
    cards = load_cards()
    if dataset in cards:
        card = cards[dataset]
        root = resolve_data_dir(data_dir)
        looked = []
        if root is not None:
            p = root / card.offline_file
            looked.append(str(p))
            if p.is_file():
                return parse_sequence_file(p, card.name, max_len or card.max_len)
        cached = cache_dir() / "downloads" / card.name / f"{card.name}.txt"
        looked.append(str(cached))
        if cached.is_file():
            return parse_sequence_file(cached, card.name, max_len or card.max_len)
        if download and card.download:
            return parse_sequence_file(fetch_official(card), card.name, max_len or card.max_len)
        where = " and ".join(looked)
        how = (f"pass --data-dir/BENCHBOX_DATA pointing at a folder holding {card.offline_file}"
               + (", or --download to fetch the official files" if card.download else ""))
        raise DataError(f"no data for {dataset!r}: looked in {where}; {how}")
    p = Path(dataset)
    if p.suffix or os.sep in dataset or p.exists():
        return parse_sequence_file(p, p.stem, max_len or 50)
    raise DataError(f"unknown dataset {dataset!r}; known: synthetic, {', '.join(cards)} (or a path to a file)")


def catalog(data_dir: str | None = None) -> list[dict]:
    """Every known dataset: its card, where its data was found (or how to get it) and its statistics."""
    def entry(name, title, max_len, found, d=None):
        s = d.stats() if d is not None else {}
        return {"name": name, "title": title, "max_len": max_len, "found at": found,
                **{k: f"{s[f]:,}" if s else "" for k, f in (("users", "users"), ("items", "items"),
                                                           ("interactions", "interactions"))},
                "median len": f"{s['len_median']:g}" if s else ""}
    out = [entry("synthetic", "generated, learnable sequential structure", 50, "embedded (no file)", synthetic())]
    for card in load_cards().values():
        try:
            d = load(card.name, data_dir)
        except BenchboxError:
            how = f"missing: put {card.offline_file} under the data dir" + (", or --download" if card.download else "")
            out.append(entry(card.name, card.title, card.max_len, f"[yellow]{how}[/]"))
            continue
        ok = "" if not card.offline_sha256 or d.sha256 == card.offline_sha256 else " [red](checksum differs)[/]"
        out.append(entry(card.name, card.title, card.max_len, d.source + ok, d))
    return out
