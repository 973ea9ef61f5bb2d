"""The data pipeline between sequences and the model: leave-one-out splits, negative sampling, and
length-bucketed batches padded only to their own longest sequence (right padding, 0 = pad).

Split (leave-one-out in time order): for a user's sequence s of length n, s[n-1] is the test item,
s[n-2] the validation item, s[:n-2] the training part. Training predicts every next item of the
training part; validation reads s[:n-2] and test reads s[:n-1] (so it includes the validation item).
Every input is truncated to its last ``max_len`` items.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import TRAIN_NEGATIVES, TRAIN_ORDERS
from .data import Sequences, load_checked, save_checked
from .paths import cache_dir
from . import BenchboxError


# --------------------------------------------------------------------------------------------
# "has user u interacted with item i?" for whole arrays at once
# --------------------------------------------------------------------------------------------
class InteractionIndex:
    """Sorted keys u * (n_items + 1) + i; membership is one vectorised searchsorted, or one lookup in a
    dense (users x items) table where that is small (ML-1M: 21 MB), ~20x faster for the instance regime's
    millions of negatives per epoch."""

    DENSE_MAX = 64 * 2**20  # cells

    def __init__(self, data: Sequences):
        self.stride = data.n_items + 1
        users = np.repeat(np.arange(data.n_users, dtype=np.int64), data.lengths)
        self.keys = np.unique(users * self.stride + data.items)
        self.n_items = data.n_items
        self.distinct_per_user = np.bincount(self.keys // self.stride, minlength=data.n_users)
        self.dense = None
        if data.n_users * self.stride <= self.DENSE_MAX:
            self.dense = np.zeros(data.n_users * self.stride, dtype=bool)
            self.dense[self.keys] = True

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        q = users * self.stride + items
        if self.dense is not None:
            return self.dense[q]
        pos = np.searchsorted(self.keys, q)
        pos = np.minimum(pos, len(self.keys) - 1)
        return self.keys[pos] == q


def sample_negatives(index: InteractionIndex, users: np.ndarray, shape: tuple, rng: np.random.Generator,
                     distinct: bool = False) -> np.ndarray:
    """Items drawn uniformly from 1..n_items that ``users`` (broadcast over ``shape``) never interacted
    with, by vectorised rejection sampling. ``distinct`` also forbids repeats along the last axis."""
    users = np.broadcast_to(users.reshape(users.shape + (1,) * (len(shape) - users.ndim)), shape)
    out = rng.integers(1, index.n_items + 1, size=shape)
    if not distinct:  # redraw and recheck only the rejected entries (the same draws as checking all)
        flat, users = out.reshape(-1), users.reshape(-1)
        bad = np.flatnonzero(index.contains(users, flat))
        for _ in range(1000):
            if len(bad) == 0:
                return out
            flat[bad] = rng.integers(1, index.n_items + 1, size=len(bad))
            bad = bad[index.contains(users[bad], flat[bad])]
        raise BenchboxError("negative sampling did not converge: some users interacted with almost every item")
    bad = index.contains(users, out) | _repeats_in_rows(out)
    for _ in range(1000):
        n_bad = int(bad.sum())
        if n_bad == 0:
            return out
        out[bad] = rng.integers(1, index.n_items + 1, size=n_bad)
        bad = index.contains(users, out) | _repeats_in_rows(out)
    raise BenchboxError("negative sampling did not converge: some users interacted with almost every item")


def _repeats_in_rows(a: np.ndarray) -> np.ndarray:
    """True where a value already occurred earlier in its row (last axis)."""
    order = np.argsort(a, axis=-1, kind="stable")
    srt = np.take_along_axis(a, order, -1)
    dup_sorted = np.zeros_like(srt, dtype=bool)
    dup_sorted[..., 1:] = srt[..., 1:] == srt[..., :-1]
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, -1)
    return dup


def eval_candidates(data: Sequences, split: str, n_neg: int, seed: int) -> np.ndarray:
    """(n_users, 1 + n_neg): the positive first, then ``n_neg`` distinct negatives that the user never
    interacted with. Drawn once from ``seed`` and stored in the cache keyed by the data checksum, so
    every mixer and every run is ranked on exactly the same candidates."""
    path = cache_dir() / "eval" / f"{data.cache_key}-{split}-n{n_neg}-s{seed}.npz"
    stored = load_checked(path, "evaluation candidates")
    if stored is not None and stored["candidates"].shape == (data.n_users, 1 + n_neg):
        return stored["candidates"]
    index = InteractionIndex(data)
    if (data.n_items - index.distinct_per_user).min() < n_neg:
        raise BenchboxError(f"{n_neg} negatives impossible: a user of {data.name} interacted with all but "
                            f"{int((data.n_items - index.distinct_per_user).min())} of {data.n_items} items")
    rng = np.random.default_rng([seed, 0 if split == "valid" else 1])
    users = np.arange(data.n_users)
    neg = sample_negatives(index, users, (data.n_users, n_neg), rng, distinct=True)
    pos_at = data.offsets[1:] - (2 if split == "valid" else 1)
    cand = np.concatenate([data.items[pos_at][:, None], neg], axis=1)
    save_checked(path, candidates=cand)
    return cand


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
@dataclass
class Batch:
    users: torch.Tensor  # (B,)
    inputs: torch.Tensor  # (B, L) item ids, right-padded with 0
    lengths: torch.Tensor  # (B,)
    targets: torch.Tensor | None = None  # (B, L) next items (training) or None
    negatives: torch.Tensor | None = None  # (B, L, n_neg) training negatives
    candidates: torch.Tensor | None = None  # (B, 1 + n_neg) evaluation candidates, positive first
    history: torch.Tensor | None = None  # (B, H) every item before the target, 0-padded (full ranking masks it)

    def to(self, device):
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in
                       (self.users, self.inputs, self.lengths, self.targets, self.negatives, self.candidates,
                        self.history)))

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def n_targets(self) -> int:
        """Trained targets (the sequence regime: every real position; instances: one per row)."""
        return len(self.users) if self.targets is None else self.n_tokens  # a real position is a target


def _gather_windows(data: Sequences, users: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(B, max(lengths)) items data[u][end-len:end], right-padded with 0, in one fancy index."""
    width = int(lengths.max())
    starts = data.offsets[users] + ends - lengths
    idx = starts[:, None] + np.arange(width)[None, :]
    valid = np.arange(width)[None, :] < lengths[:, None]
    return np.where(valid, data.items[np.minimum(idx, len(data.items) - 1)], 0)


def length_buckets(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Batches of users with similar lengths. With ``rng``: shuffle, sort by length inside windows of
    50 batches, cut, shuffle batch order (random but with little padding). Without: sorted order."""
    order = np.arange(len(lengths))
    if rng is None:
        order = order[np.argsort(lengths, kind="stable")]
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(order)
    window = batch_size * 50
    for i in range(0, len(order), window):
        w = order[i:i + window]
        order[i:i + window] = w[np.argsort(lengths[w], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _index_within_groups(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., counts[0]-1, 0, 1, ..., counts[1]-1, ...: each element's index within its group."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


class TrainLoader:
    """The sequence regime: one causal pass per row, every position a target. A user with >= 2 training
    items yields rows of inputs s[e-l-1:e-1] -> targets s[e-l:e] (l <= max_len), plus ``n_neg`` negatives
    per position, redrawn each epoch. ``cover="windows"`` cuts a training part longer than max_len into
    consecutive windows (aligned to its end), so every training target is trained each epoch;
    ``cover="last"`` keeps only its last max_len targets (benchbox's rows before 2026-12-02)."""

    def __init__(self, data: Sequences, max_len: int, batch_size: int, n_neg: int, seed: int, cover: str = "windows"):
        self.data, self.max_len, self.batch_size, self.n_neg = data, max_len, batch_size, n_neg
        train_len = data.lengths - 2
        users = np.flatnonzero(train_len >= 2)
        n_pred = train_len[users] - 1  # predicted positions: targets s[1..train_len-1]
        if cover == "last":
            self.users, self.lengths, self.ends = users, np.minimum(n_pred, max_len), train_len[users]
        else:  # window j (0 = the last) ends j * max_len targets before the end of the training part
            n_win = (n_pred + max_len - 1) // max_len
            self.users = np.repeat(users, n_win)
            j = _index_within_groups(n_win)
            left = np.repeat(n_pred, n_win) - j * max_len  # targets not yet covered by later windows
            self.lengths, self.ends = np.minimum(left, max_len), train_len[self.users] - j * max_len
        self.index = InteractionIndex(data)
        self.seed = seed
        self.epoch = 0

    @property
    def n_targets(self) -> int:
        """Training targets per epoch."""
        return int(self.lengths.sum())

    def __len__(self):
        return (len(self.users) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        for rows in length_buckets(self.lengths, self.batch_size, rng):
            users, lengths, ends = self.users[rows], self.lengths[rows], self.ends[rows]
            inputs = _gather_windows(self.data, users, ends - 1, lengths)
            targets = _gather_windows(self.data, users, ends, lengths)
            neg = sample_negatives(self.index, users, targets.shape + (self.n_neg,), rng)
            neg[targets == 0] = 0
            yield Batch(torch.from_numpy(users), torch.from_numpy(inputs), torch.from_numpy(lengths),
                        torch.from_numpy(targets), torch.from_numpy(neg))


class InstanceLoader:
    """The instance regime (the study's rows): one row per (user, training target s[t], t >= 1), its
    history the last ``window`` items s[t-w:t], 1 positive and ``n_neg`` negatives, every row once per
    epoch in a new random order. A batch holds the right-padded histories and ``candidates`` (B, 1 + n_neg),
    positive first: the model scores them as it scores evaluation candidates (readout.scores at the last
    position), so every mixer and readout works unchanged. ``batch_size`` counts rows: targets per step.

    ``order="user"`` takes the rows by user id, then time, the same every epoch, and ``negatives="fixed"``
    draws the negatives once for the whole run: both as the study lineage's loader reads its training file
    (HelloZicky/DUET: written once by user, negatives drawn while writing, read line by line, no shuffle).
    They exist for sensitivity rows; the defaults (shuffled, redrawn) are the main protocol."""

    def __init__(self, data: Sequences, window: int, batch_size: int, n_neg: int, seed: int,
                 order: str = "shuffled", negatives: str = "redrawn"):
        if order not in TRAIN_ORDERS or negatives not in TRAIN_NEGATIVES:
            raise BenchboxError(f"order must be one of {TRAIN_ORDERS} and negatives one of {TRAIN_NEGATIVES}")
        self.data, self.window, self.batch_size, self.n_neg = data, window, batch_size, n_neg
        self.order, self.negatives, self._fixed_neg = order, negatives, None
        train_len = data.lengths - 2
        n_pred = np.maximum(train_len - 1, 0)
        self.users = np.repeat(np.arange(data.n_users), n_pred)
        # t = 1..train_len-1 within each user's sequence: the target's position = its history's length
        self.t = _index_within_groups(n_pred) + 1
        self.index = InteractionIndex(data)
        self.seed = seed
        self.epoch = 0

    @property
    def n_targets(self) -> int:
        return len(self.users)

    def __len__(self):
        return (len(self.users) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(len(self.users)) if self.order == "shuffled" else np.arange(len(self.users))
        # the epoch's targets and negatives in one draw each (not one small draw per step)
        users = self.users[order]
        t = self.t[order]
        cand = np.empty((len(order), 1 + self.n_neg), dtype=self.data.items.dtype)
        cand[:, 0] = self.data.items[self.data.offsets[users] + t]
        if self.negatives == "fixed":  # drawn once, in row order, from a stream of their own
            if self._fixed_neg is None:
                fixed_rng = np.random.default_rng([self.seed, 2**32 - 1])
                self._fixed_neg = sample_negatives(self.index, self.users, (len(self.users), self.n_neg), fixed_rng)
            cand[:, 1:] = self._fixed_neg[order]
        else:
            cand[:, 1:] = sample_negatives(self.index, users, (len(order), self.n_neg), rng)
        lengths = np.minimum(t, self.window)
        for start in range(0, len(order), self.batch_size):
            rows = slice(start, start + self.batch_size)
            inputs = _gather_windows(self.data, users[rows], t[rows], lengths[rows])
            yield Batch(torch.from_numpy(users[rows]), torch.from_numpy(inputs), torch.from_numpy(lengths[rows]),
                        candidates=torch.from_numpy(cand[rows]))


def eval_batches(data: Sequences, split: str, max_len: int, batch_size: int, candidates: np.ndarray | None,
                 history: bool = False, users: np.ndarray | None = None):
    """Validation (history s[:n-2]) or test (history s[:n-1]) batches, sorted by length; the model reads
    the last ``max_len`` items. ``history`` also attaches the whole history (for full-ranking masks);
    ``users`` restricts the batches to those users (default: all)."""
    ends = data.lengths - (2 if split == "valid" else 1)
    lengths = np.minimum(ends, max_len)
    pool = np.arange(data.n_users) if users is None else np.asarray(users)
    if len(pool) == 0:
        return
    for rows in length_buckets(lengths[pool], batch_size, None):
        users = pool[rows]
        inputs = _gather_windows(data, users, ends[users], lengths[users])
        cand = None if candidates is None else torch.from_numpy(candidates[users])
        seen = torch.from_numpy(_gather_windows(data, users, ends[users], ends[users])) if history else None
        yield Batch(torch.from_numpy(users), torch.from_numpy(inputs), torch.from_numpy(lengths[users]),
                    candidates=cand, history=seen)
