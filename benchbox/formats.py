"""Readers of the files people have, into one chronological item sequence per user with dense ids.

Formats (sniffed from the first line):
- sequence file: ``user item item ...`` per line, integer ids (the offline copies' format);
- ``ratings.dat`` style: ``user::item::rating::timestamp`` (MovieLens);
- CSV/TSV with a header naming the user, item and (optional) timestamp columns; RecBole ``.inter``
  files are TSV whose header names carry a type (``user_id:token``), which is dropped.

Ids: users become 0..m-1 and items 1..n (0 is padding), each in the order of their first appearance in
the file. Item ids that already are exactly 1..n (integers) are kept as they are, so the dense offline
copies give the arrays they always gave. Interaction logs are sorted by timestamp per user; ties keep
file order. Optional: an iterated k-core on users and items, and keeping only the first interaction of
each (user, item). Files are read in blocks (bounded memory) and parsed with numpy/pandas, never with a
Python loop per token; nothing is ever unpickled.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import BenchboxError

BLOCK_BYTES = 16 << 20  # sequence files are parsed this many bytes at a time
CHUNK_ROWS = 250_000  # interaction logs are parsed this many rows at a time
NAMES = {  # header names recognised for each column (lower case, RecBole's ":type" suffix dropped)
    "user": ("user_id", "user", "userid", "uid", "reviewerid", "user_name", "customer_id", "visitorid", "session_id"),
    "item": ("item_id", "item", "itemid", "iid", "movie_id", "movieid", "asin", "product_id", "productid",
             "business_id", "track_id", "song_id", "artist_id"),
    "time": ("timestamp", "time", "ts", "unixreviewtime", "unix_time", "datetime", "date", "event_time"),
}


class DataError(BenchboxError):
    pass


@dataclass
class Interactions:
    """One row per interaction, in file order: codes of users and items in first-seen order."""
    users: np.ndarray  # int64
    items: np.ndarray  # int64
    time: np.ndarray | None  # float64, or None (file order is time order)
    user_ids: list  # raw id of each user code
    item_ids: list  # raw id of each item code
    kind: str  # "sequence", "ratings.dat", "csv", "tsv", "inter"
    integer_items: bool = False  # raw item ids are integers (the "already dense" rule may apply)


class _Codes:
    """Raw ids -> codes in first-seen order, fed chunk by chunk (a dict lookup per distinct id of a
    chunk, not per interaction)."""

    def __init__(self):
        self.index: dict = {}

    def encode(self, values) -> np.ndarray:
        codes, uniques = pd.factorize(values)  # uniques in order of appearance
        ids = np.fromiter((self.index.setdefault(u, len(self.index)) for u in uniques), np.int64, len(uniques))
        return ids[codes]

    @property
    def raw(self) -> list:
        return list(self.index)


def _text_head(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise DataError(f"{path}: empty data file")
    if b"\0" in head:
        raise DataError(f"{path}: looks like a binary file (NUL bytes), not a text data file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut by the 64 KiB boundary
            line = head[:e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{head[e.start]:02x}); re-encode the file as "
                            "UTF-8") from None
    return head.decode("utf-8", errors="ignore")


def read_file(path: Path, columns: dict | None = None) -> Interactions:
    """Sniff the format from the first line and read the whole file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    first = _text_head(path).lstrip("\ufeff").splitlines()[0]
    if "::" in first:
        return read_log(path, "ratings.dat", columns)
    kind = "inter" if path.suffix == ".inter" else ("tsv" if "\t" in first else "csv")
    if columns or path.suffix in (".inter", ".csv", ".tsv") or not first.replace("\t", " ").split()[0].lstrip("-").isdigit():
        return read_log(path, kind, columns)
    return read_sequences(path)


# --------------------------------------------------------------------------------------------
# sequence files: user item item ...
# --------------------------------------------------------------------------------------------
def _blocks(path: Path):
    """(number of the block's first line, bytes of whole lines) of at most about BLOCK_BYTES."""
    lineno, carry = 1, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(BLOCK_BYTES)
            data = carry + chunk
            if not chunk:
                if data:
                    yield lineno, data
                return
            cut = data.rfind(b"\n") + 1
            if cut:
                yield lineno, data[:cut]
                lineno += data.count(b"\n", 0, cut)
            carry = data[cut:]


def _bad_token(path, lineno, lines) -> DataError:
    """The first token that is not an integer id that fits in 64 bits, named by file and line."""
    for i, line in enumerate(lines):
        for tok in line.split():
            try:
                if not -2**63 <= int(tok) < 2**63:
                    return DataError(f"{path}:{lineno + i}: id {tok.decode()} is out of the 64-bit range")
            except ValueError:
                return DataError(f"{path}:{lineno + i}: malformed line: {tok.decode(errors='replace')!r} is not "
                                 "an integer id (expected 'user item item ...')")
    return DataError(f"{path}: malformed file")


def read_sequences(path: Path) -> Interactions:
    users, lengths, items = [], [], []
    for lineno, block in _blocks(path):
        lines = block.split(b"\n")
        counts = np.fromiter((len(line.split()) for line in lines), np.int64, len(lines))
        try:
            tokens = np.array(block.split()).astype(np.int64) if counts.sum() else np.zeros(0, np.int64)
        except (ValueError, OverflowError):
            raise _bad_token(path, lineno, lines) from None
        nonempty = np.flatnonzero(counts)
        if (counts[nonempty] < 2).any():
            raise DataError(f"{path}:{lineno + nonempty[counts[nonempty] < 2][0]}: malformed line: a user id with no items")
        starts = np.concatenate([[0], np.cumsum(counts[nonempty])[:-1]]).astype(np.int64)
        is_user = np.zeros(len(tokens), bool)
        is_user[starts] = True
        if (tokens[~is_user] < 1).any():
            bad = np.searchsorted(starts, np.flatnonzero(~is_user & (tokens < 1))[0], side="right") - 1
            raise DataError(f"{path}:{lineno + nonempty[bad]}: malformed line: ids start at 1 (0 is reserved for padding)")
        users.append(tokens[starts])
        lengths.append(counts[nonempty] - 1)
        items.append(tokens[~is_user])
    users, lengths, items = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (users, lengths, items))
    if not len(users):
        raise DataError(f"{path}: empty data file")
    uniq, first, count = np.unique(users, return_index=True, return_counts=True)
    if (count > 1).any():
        raise DataError(f"{path}: user {uniq[count > 1][0]} has more than one line (one line per user)")
    codes = _first_seen_codes(items)
    return Interactions(np.repeat(np.arange(len(users), dtype=np.int64), lengths), codes[0], None,
                        users.tolist(), codes[1].tolist(), "sequence", integer_items=True)


def _first_seen_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(code of each value, the value of each code), codes in order of first appearance."""
    uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(uniq), np.int64)
    rank[order] = np.arange(len(uniq))
    return rank[inverse], uniq[order]


# --------------------------------------------------------------------------------------------
# interaction logs: ratings.dat, CSV/TSV with a header, RecBole .inter
# --------------------------------------------------------------------------------------------
class _ColonsToTabs(io.RawIOBase):
    """A ``::``-separated file read as tab-separated, so that pandas' fast C parser can read it."""

    def __init__(self, f):
        self.f, self.carry = f, b""

    def readable(self):
        return True

    def readinto(self, buf):
        chunk = self.f.read(max(1, len(buf) - 1))
        out = (self.carry + chunk).replace(b"::", b"\t")
        self.carry = b""
        if chunk and out.endswith(b":"):  # half of a '::' cut by the read boundary
            out, self.carry = out[:-1], b":"
        buf[:len(out)] = out
        return len(out)


def _header_columns(path: Path, kind: str, columns: dict | None) -> tuple[str, list[str], dict]:
    """(separator, header names, {user/item/time: column name or position})."""
    if kind == "ratings.dat":
        names = None
        picked = {"user": 0, "item": 1, "time": 3}
        for k, v in (columns or {}).items():
            picked[k] = int(v) if str(v).isdigit() else v
        return "\t", names, picked
    sep = "\t" if kind in ("tsv", "inter") else ","
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter=sep))
    header[0] = header[0].lstrip("\ufeff")
    plain = [h.split(":")[0].strip().lower() for h in header]
    picked = {}
    for role, candidates in NAMES.items():
        given = (columns or {}).get(role)
        if given is not None:
            if given not in header and given.lower() not in plain:
                raise DataError(f"{path}: no column {given!r} (--columns {role}=...); the header has: {', '.join(header)}")
            picked[role] = header[header.index(given)] if given in header else header[plain.index(given.lower())]
        else:
            hit = next((header[plain.index(c)] for c in candidates if c in plain), None)
            if hit is not None:
                picked[role] = hit
    unknown = set(columns or {}) - set(NAMES)
    if unknown:
        raise DataError(f"--columns takes user=, item= and time=, got {', '.join(sorted(unknown))}")
    missing = [r for r in ("user", "item") if r not in picked]
    if missing:
        raise DataError(f"{path}: no {' and no '.join(missing)} column in the header ({', '.join(header)}); name it "
                        f"with --columns {missing[0]}=COLUMN")
    return sep, header, picked


def _times(values: pd.Series, path, first_line: int) -> np.ndarray:
    num = pd.to_numeric(values, errors="coerce")
    if num.notna().all():
        return num.to_numpy(np.float64)
    try:
        return pd.to_datetime(values, utc=True, format="mixed").astype("int64").to_numpy(np.float64) / 1e9
    except (ValueError, TypeError):
        bad = int(np.flatnonzero(num.isna().to_numpy())[0])
        raise DataError(f"{path}:{first_line + bad}: timestamp {values.iloc[bad]!r} is neither a number nor a "
                        "date") from None


def read_log(path: Path, kind: str, columns: dict | None = None) -> Interactions:
    sep, header, picked = _header_columns(path, kind, columns)
    roles = list(picked)
    users, items, times = _Codes(), _Codes(), []
    u_codes, i_codes = [], []
    line = 2 if header else 1  # file line of the chunk's first row
    opts = dict(sep=sep, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS, engine="c", encoding="utf-8")
    if header is None:
        source = io.BufferedReader(_ColonsToTabs(open(path, "rb")))
        opts.update(header=None, quoting=csv.QUOTE_NONE)
    else:  # every column is read, so that a line with too many fields is an error, not silently cut
        source = path
    try:
        with pd.read_csv(source, **opts) as reader:
            for chunk in reader:
                if header is None:
                    width = chunk.shape[1]
                    if max(picked.values()) >= width:
                        raise DataError(f"{path}:{line}: {width} fields; expected user::item::rating::timestamp")
                    chunk = chunk.iloc[:, [picked[r] for r in roles]]
                    chunk.columns = [picked[r] for r in roles]
                cols = {r: chunk[picked[r]].str.strip() for r in roles}
                for r in ("user", "item"):
                    empty = (cols[r] == "").to_numpy()
                    if empty.any():
                        raise DataError(f"{path}:{line + int(np.flatnonzero(empty)[0])}: empty {r} id")
                u_codes.append(users.encode(cols["user"].to_numpy()))
                i_codes.append(items.encode(cols["item"].to_numpy()))
                if "time" in cols:
                    times.append(_times(cols["time"], path, line))
                line += len(chunk)
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: malformed line: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a block); re-encode the file "
                        "as UTF-8") from None
    except ValueError as e:  # pandas: usecols not in the file, and the like
        raise DataError(f"{path}: {' '.join(str(e).split())}") from None
    if not u_codes or not sum(map(len, u_codes)):
        raise DataError(f"{path}: no interactions in the file")
    return Interactions(np.concatenate(u_codes), np.concatenate(i_codes), np.concatenate(times) if times else None,
                        users.raw, items.raw, kind)


# --------------------------------------------------------------------------------------------
# interactions -> sequences
# --------------------------------------------------------------------------------------------
@dataclass
class Dense:
    items: np.ndarray  # flat int64, users' items concatenated, dense 1..n
    offsets: np.ndarray  # n_users + 1
    user_ids: list  # raw id of dense user u
    item_ids: list  # raw id of dense item i + 1
    raw_users: int  # distinct raw ids in the file
    raw_items: int
    remapped: bool  # False: the item ids were dense already and kept
    dropped_users: int  # users with fewer than min_len interactions (after filtering)
    dropped_interactions: int  # removed by the k-core, deduplication and short users


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Mask of the interactions kept by the iterated k-core: every user and item keeps >= k."""
    keep = np.ones(len(users), bool)
    while True:
        uc = np.bincount(users[keep], minlength=users.max() + 1 if len(users) else 0)
        ic = np.bincount(items[keep], minlength=items.max() + 1 if len(items) else 0)
        new = keep & (uc[users] >= k) & (ic[items] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def densify(inter: Interactions, kcore: int = 0, dedup: bool = False, min_len: int = 3, source: str = "") -> Dense:
    n = len(inter.users)
    keep = k_core(inter.users, inter.items, kcore) if kcore > 1 else np.ones(n, bool)
    if not keep.any():
        raise DataError(f"{source}: the {kcore}-core removes every interaction")
    idx = np.flatnonzero(keep)
    u = inter.users[idx]
    # per user, in time order; ties (and files without times) keep file order: lexsort is stable
    order = np.lexsort((inter.time[idx], u)) if inter.time is not None else np.argsort(u, kind="stable")
    idx = idx[order]
    if dedup:
        key = inter.users[idx] * (int(inter.items.max()) + 1) + inter.items[idx]
        idx = idx[np.sort(np.unique(key, return_index=True)[1])]
    users, items = inter.users[idx], inter.items[idx]
    per_user = np.bincount(users, minlength=len(inter.user_ids))
    short = per_user[users] < min_len
    users, items = users[~short], items[~short]
    if not len(users):
        raise DataError(f"{source}: no user has the {min_len} items needed for train/validation/test")
    kept_users = np.flatnonzero(per_user >= min_len)  # codes, in first-seen order
    user_dense = np.full(len(inter.user_ids), -1, np.int64)
    user_dense[kept_users] = np.arange(len(kept_users))
    kept_items = np.unique(items)  # codes, in first-seen order
    raw_items = np.asarray(inter.item_ids, dtype=object)[kept_items]
    already = inter.integer_items and set(raw_items.tolist()) == set(range(1, len(kept_items) + 1))
    item_dense = np.zeros(len(inter.item_ids), np.int64)
    item_dense[kept_items] = raw_items.astype(np.int64) if already else np.arange(1, len(kept_items) + 1)
    item_ids = sorted(raw_items.tolist()) if already else raw_items.tolist()
    lengths = np.bincount(user_dense[users], minlength=len(kept_users))
    return Dense(item_dense[items], np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                 [inter.user_ids[c] for c in kept_users], item_ids, len(inter.user_ids), len(inter.item_ids),
                 not already, int((per_user[per_user > 0] < min_len).sum()), n - len(users))
