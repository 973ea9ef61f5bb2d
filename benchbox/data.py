"""Datasets: cards, offline files, official downloads, the synthetic default, and a parse cache.

Every dataset ends up as the same thing: one chronological item sequence per user, dense item ids from
1 (0 is padding), held as a flat int64 array plus offsets (``Sequences``). The on-disk format shared by
all offline copies is one line per user, ``user item item ...``; users' own files may also be
interaction logs (see ``formats.py``). Parsed arrays and the raw-id mapping are cached, keyed by the
file's sha256 and the parse settings, and checked against a stored checksum when read back.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import shutil
import sys
import tempfile
import tomllib
import urllib.request
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import BenchboxError
from .formats import DataError, densify, read_file
from .paths import CARDS_DIR, cache_dir, data_dir as resolve_data_dir

PARSE_VERSION = 2  # bump when parsing changes, so cached arrays are rebuilt (2: dense ids, logs, checksums)


def warn(msg: str) -> None:
    sys.stderr.write("benchbox: warning: " + " ".join(msg.split()) + "\n")


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
    raw_users: int = 0  # distinct user ids in the file (before filtering)
    raw_items: int = 0  # distinct item ids in the file (before filtering)
    remapped: bool = False  # item ids were renumbered 1..n (False: dense already, kept)
    settings: str = ""  # parse settings that change the arrays (k-core, deduplication, columns)

    @property
    def cache_key(self) -> str:
        """What the cached arrays and evaluation candidates are keyed by: the file and the settings."""
        return self.sha256[:24] if not self.settings else hashlib.sha256(f"{self.sha256}|{self.settings}".encode()).hexdigest()[:24]

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


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks (``algorithm``: any hashlib name; cards may give md5)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_settings(kcore: int = 0, dedup: bool = False, columns: dict | None = None) -> str:
    parts = [f"kcore={kcore}" if kcore > 1 else "", "dedup" if dedup else "",
             "columns=" + ",".join(f"{k}={v}" for k, v in sorted(columns.items())) if columns else ""]
    return ";".join(p for p in parts if p)


def checksum(*arrays: np.ndarray) -> str:
    """sha256 over the arrays' bytes (cache files, and the evaluation candidates a run ranked)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def load_checked(path: Path, what: str) -> dict | None:
    """The arrays of a cache file whose stored checksum matches, else None with a warning (a truncated
    or corrupted file is rebuilt, never trusted). Never unpickles."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        arrays = [d[k] for k in sorted(d) if k != "checksum"]
        if str(d["checksum"]) == checksum(*arrays):
            return d
        problem = "checksum mismatch"
    except Exception as e:  # noqa: BLE001 - any unreadable cache file is rebuilt
        problem = f"{type(e).__name__}: {e}"
    warn(f"cached {what} {path} is corrupted ({problem}); rebuilding it")
    return None


def save_checked(path: Path, **arrays) -> None:
    """np.savez with a checksum of the arrays, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = [np.asarray(arrays[k]) for k in sorted(arrays)]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp{path.stem}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, checksum=np.array(checksum(*ordered)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_file(path: Path, name: str | None = None, max_len: int = 50, kcore: int = 0, dedup: bool = False,
               columns: dict | None = None) -> Sequences:
    """Read a sequence file or an interaction log into dense Sequences (cached; see formats.py)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    sha, settings = file_digest(path), parse_settings(kcore, dedup, columns)
    probe = Sequences(name or path.stem, np.zeros(0, np.int64), np.zeros(1, np.int64), 0, sha, str(path), max_len,
                      settings=settings)
    cached = cache_dir() / "processed" / f"{probe.cache_key}-v{PARSE_VERSION}.npz"
    z = load_checked(cached, "dataset")
    if z is None or not mapping_path(probe).exists():
        dense = densify(read_file(path, columns), kcore, dedup, source=str(path))
        _write_mapping(mapping_path(probe), dense.user_ids, dense.item_ids)
        z = dict(items=dense.items, offsets=dense.offsets, dropped=dense.dropped_users, raw_users=dense.raw_users,
                 raw_items=dense.raw_items, remapped=dense.remapped)
        save_checked(cached, **z)
    return dataclasses.replace(probe, items=z["items"], offsets=z["offsets"], n_items=int(z["items"].max()),
                               dropped_users=int(z["dropped"]), raw_users=int(z["raw_users"]),
                               raw_items=int(z["raw_items"]), remapped=bool(z["remapped"]))


parse_sequence_file = parse_file  # the name it had when it read only sequence files


def mapping_path(data: Sequences) -> Path:
    """The raw-id mapping of a parsed file: TSV ``kind  dense_id  raw_id`` (users 0.., items 1..)."""
    return cache_dir() / "processed" / f"{data.cache_key}-v{PARSE_VERSION}.ids.tsv"


def _write_mapping(path: Path, user_ids: list, item_ids: list) -> None:
    from .results import _write_atomic
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, "".join(["kind\tdense_id\traw_id\n", *(f"user\t{u}\t{r}\n" for u, r in enumerate(user_ids)),
                                 *(f"item\t{i}\t{r}\n" for i, r in enumerate(item_ids, 1))]))


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
    offline_file: str  # relative to the data dir; any format formats.py reads
    max_len: int
    filtering: str
    offline_sha256: str = ""
    notes: str = ""
    # how the study trained and evaluated on this dataset: its own words, and what is reconstructed, from what
    protocol: str = ""
    download: dict = field(default_factory=dict)
    kcore: int = 0  # parse settings for an interaction log (run options override them)
    dedup: bool = False
    columns: dict = field(default_factory=dict)
    path: Path | None = None  # the card's own file


def _read_card(p: Path) -> Card:
    try:
        with open(p, "rb") as f:
            d = tomllib.load(f)
        return Card(**d, path=p)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"dataset card {p}: malformed TOML: {e}") from None
    except TypeError as e:  # a missing or unknown field
        need = ", ".join(f.name for f in dataclasses.fields(Card)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        raise DataError(f"dataset card {p}: {str(e).replace('Card.__init__() ', '')} (needs {need})") from None


def load_cards(data_dir: str | os.PathLike | None = None) -> dict[str, Card]:
    """The built-in cards (datasets/*.toml), then a user's cards (NAME.toml in the data dir), which
    register their own datasets by name."""
    cards = {c.name: c for c in map(_read_card, sorted(CARDS_DIR.glob("*.toml")))}
    root = resolve_data_dir(data_dir)
    for p in sorted(root.glob("*.toml")) if root is not None and root.is_dir() else []:
        card = _read_card(p)
        if card.name in cards:
            raise DataError(f"dataset card {p}: name {card.name!r} is taken by {cards[card.name].path}; rename it")
        cards[card.name] = card
    return cards


def _download(url: str, dest: Path, sha256: str | None, md5: str | None = None) -> Path:
    """Fetch ``url`` once into ``dest``, checked against the card's sha256 and/or md5. Without a
    published checksum the first download's sha256 is stored beside it and checked on reuse."""
    pin = dest.with_name(dest.name + ".sha256")
    if dest.exists():
        want = sha256 or (pin.read_text().strip() if pin.exists() else None)
        if want and file_digest(dest) == want:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(r, f)
    except Exception as e:
        os.unlink(tmp)
        raise DataError(f"download of {url} failed: {e}") from None
    got = file_digest(Path(tmp))
    if (sha256 and got != sha256) or (md5 and file_digest(Path(tmp), "md5") != md5):
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
         synthetic_seed: int = 0, kcore: int = 0, dedup: bool = False, columns: dict | None = None) -> Sequences:
    """Resolve a dataset name (a card, built-in or in the data dir), ``synthetic``, or a path to a file
    (a sequence file or an interaction log). ``kcore``/``dedup``/``columns`` override a card's."""
    if dataset == "synthetic":
        return synthetic(seed=synthetic_seed, max_len=max_len or 50)
    cards = load_cards(data_dir)
    if dataset in cards:
        card = cards[dataset]
        opts = dict(kcore=kcore or card.kcore, dedup=dedup or card.dedup, columns=columns or card.columns or None)
        root = resolve_data_dir(data_dir)
        looked = []
        if root is not None:
            p = root / card.offline_file
            looked.append(str(p))
            if p.is_file():
                return parse_file(p, card.name, max_len or card.max_len, **opts)
        cached = cache_dir() / "downloads" / card.name / f"{card.name}.txt"
        looked.append(str(cached))
        if cached.is_file():
            return parse_file(cached, card.name, max_len or card.max_len, **opts)
        if download and card.download:
            return parse_file(fetch_official(card), card.name, max_len or card.max_len, **opts)
        where = " and ".join(looked)
        how = (f"pass --data-dir/BENCHBOX_DATA pointing at a folder holding {card.offline_file}"
               + (", or --download to fetch the official files" if card.download else ""))
        raise DataError(f"no data for {dataset!r}: looked in {where}; {how}")
    p = Path(dataset)
    if p.suffix or os.sep in dataset or p.exists():
        return parse_file(p, p.stem, max_len or 50, kcore, dedup, columns)
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
    for card in load_cards(data_dir).values():
        try:
            d = load(card.name, data_dir)
        except BenchboxError:
            how = f"missing: put {card.offline_file} under the data dir" + (", or --download" if card.download else "")
            out.append(entry(card.name, card.title, card.max_len, f"[yellow]{how}[/]"))
            continue
        ok = "" if not card.offline_sha256 or d.sha256 == card.offline_sha256 else " [red](checksum differs)[/]"
        out.append(entry(card.name, card.title, card.max_len, d.source + ok, d))
    return out
