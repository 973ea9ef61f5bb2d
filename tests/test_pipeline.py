import numpy as np
import torch

from benchbox import data
from benchbox.pipeline import (InteractionIndex, TrainLoader, eval_batches, eval_candidates, length_buckets,
                               sample_negatives)
from conftest import write_seqs


def _data(tmp_path, seqs):
    return data.parse_sequence_file(write_seqs(tmp_path / "d.txt", seqs))


SEQS = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14], list(range(15, 40))]


def test_leave_one_out_split_and_truncation(tmp_path):
    d = _data(tmp_path, SEQS)
    loader = TrainLoader(d, max_len=10, batch_size=8, n_neg=4, seed=0, cover="last")
    (batch,) = list(loader)
    rows = {int(u): i for i, u in enumerate(batch.users)}
    assert set(rows) == {0, 1, 3}  # user 2 has a 1-item training part: nothing to predict
    r = rows[0]  # train part 1..5: inputs 1..4 -> targets 2..5
    assert batch.inputs[r, :4].tolist() == [1, 2, 3, 4] and batch.targets[r, :4].tolist() == [2, 3, 4, 5]
    r = rows[3]  # 25 items, train part 15..37, truncated to the last 10 predictions
    assert batch.targets[r].tolist() == list(range(28, 38)) and batch.inputs[r].tolist() == list(range(27, 37))
    assert batch.inputs.shape[1] == 10  # padded to the longest in the batch only
    r = rows[1]
    assert batch.inputs[r].tolist() == [8] + [0] * 9 and batch.targets[r, 0] == 9 and batch.lengths[r] == 1
    # negatives: 4 per real position, none the user interacted with, zero at padding
    index = InteractionIndex(d)
    real = batch.targets > 0
    users = batch.users[:, None, None].expand_as(batch.negatives).numpy()
    assert not index.contains(users[real.numpy()], batch.negatives[real].numpy()).any()
    assert (batch.negatives[~real] == 0).all() and (batch.negatives[real] > 0).all()
    # redrawn every epoch
    (batch2,) = list(loader)
    assert not torch.equal(batch.negatives, batch2.negatives)

    val = next(eval_batches(d, "valid", 50, 8, None))
    test = next(eval_batches(d, "test", 50, 8, None))
    by_user = {int(u): (val.inputs[i, :val.lengths[i]].tolist()) for i, u in enumerate(val.users)}
    assert by_user[0] == [1, 2, 3, 4, 5]
    by_user = {int(u): (test.inputs[i, :test.lengths[i]].tolist()) for i, u in enumerate(test.users)}
    assert by_user[0] == [1, 2, 3, 4, 5, 6]  # test history includes the validation item


def test_eval_candidates_fixed_stored_and_valid():
    d = data.synthetic(seed=1)
    c1 = eval_candidates(d, "test", 99, seed=7)
    c2 = eval_candidates(d, "test", 99, seed=7)
    assert c1.shape == (d.n_users, 100) and np.array_equal(c1, c2)
    assert np.array_equal(c1[:, 0], d.items[d.offsets[1:] - 1])
    v = eval_candidates(d, "valid", 99, seed=7)
    assert np.array_equal(v[:, 0], d.items[d.offsets[1:] - 2])
    index = InteractionIndex(d)
    users = np.repeat(np.arange(d.n_users), 99)
    assert not index.contains(users, c1[:, 1:].ravel()).any()
    assert all(len(set(row)) == 100 for row in c1[:200].tolist())
    assert not np.array_equal(eval_candidates(d, "test", 99, seed=8), c1)


def test_negative_sampling_is_uniform_over_allowed_items():
    d = data.synthetic(seed=0, n_users=5, n_items=30, min_len=8, max_seq=10)
    index = InteractionIndex(d)
    rng = np.random.default_rng(0)
    neg = sample_negatives(index, np.zeros(1, dtype=np.int64), (1, 60000), rng)
    allowed = sorted(set(range(1, 31)) - set(d.user(0).tolist()))
    counts = np.bincount(neg.ravel(), minlength=31)[allowed]
    assert set(np.unique(neg)) == set(allowed)
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_length_buckets_cut_padding():
    lengths = np.random.default_rng(0).integers(1, 200, 5000)
    batches = length_buckets(lengths, 128, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(5000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.1 * lengths.sum()  # random batching would pad to ~2x


def _sample_negatives_reference(index, users, shape, rng):
    """The plain algorithm: redraw every rejected entry, recheck the whole array, until none is rejected."""
    users = np.broadcast_to(users.reshape(users.shape + (1,) * (len(shape) - users.ndim)), shape)
    out = rng.integers(1, index.n_items + 1, size=shape)
    bad = index.contains(users, out)
    while bad.any():
        out[bad] = rng.integers(1, index.n_items + 1, size=int(bad.sum()))
        bad = index.contains(users, out)
    return out


def test_negative_sampler_draws_what_the_plain_reference_draws():
    d = data.synthetic(seed=3)
    index = InteractionIndex(d)
    users = np.random.default_rng(1).integers(0, d.n_users, size=5000)
    ref = _sample_negatives_reference(index, users, (5000, 7), np.random.default_rng(9))
    for dense in (True, False):  # the dense table and the sorted keys answer alike
        if not dense:
            index.dense = None
        fast = sample_negatives(index, users, (5000, 7), np.random.default_rng(9))
        assert np.array_equal(fast, ref)


def _trained_targets(batches):
    """(user, target item, input items before it) of every trained position."""
    got = []
    for b in batches:
        for r in range(len(b.users)):
            for p in range(int(b.lengths[r])):
                got.append((int(b.users[r]), int(b.targets[r, p])))
    return sorted(got)


def test_windows_cover_every_training_target_once(tmp_path):
    d = _data(tmp_path, SEQS)
    every = sorted((u, s[t]) for u, s in enumerate(SEQS) for t in range(1, len(s) - 2) if len(s) - 2 >= 2)
    loader = TrainLoader(d, max_len=10, batch_size=2, n_neg=3, seed=0, cover="windows")
    assert loader.n_targets == len(every) == 4 + 1 + 22
    assert _trained_targets(loader) == every  # user 3's 22 targets: windows of 2, 10 and 10
    last = TrainLoader(d, max_len=10, batch_size=2, n_neg=3, seed=0, cover="last")
    assert last.n_targets == 4 + 1 + 10
    for b in loader:  # a window's inputs are the items right before its targets
        for r in range(len(b.users)):
            n = int(b.lengths[r])
            assert b.inputs[r, 1:n].tolist() == b.targets[r, :n - 1].tolist()
            seq = SEQS[int(b.users[r])]
            assert seq.index(int(b.targets[r, 0])) == seq.index(int(b.inputs[r, 0])) + 1


def test_instance_rows_one_per_target_with_the_last_window_items(tmp_path):
    from benchbox.pipeline import InstanceLoader
    d = _data(tmp_path, SEQS)
    loader = InstanceLoader(d, window=3, batch_size=4, n_neg=2, seed=0)
    rows = []
    for b in loader:
        assert b.targets is None and b.candidates.shape == (len(b.users), 3)
        for r in range(len(b.users)):
            n = int(b.lengths[r])
            rows.append((int(b.users[r]), tuple(b.inputs[r, :n].tolist()), int(b.candidates[r, 0])))
            assert (b.inputs[r, n:] == 0).all()
    want = sorted((u, tuple(s[max(0, t - 3):t]), s[t]) for u, s in enumerate(SEQS) for t in range(1, len(s) - 2))
    assert sorted(rows) == want and loader.n_targets == len(want) == len(loader.users)
    assert len(loader) == (len(want) + 3) // 4
    index = InteractionIndex(d)
    b = next(iter(loader))
    users = b.users[:, None].expand(-1, 2).numpy()
    assert not index.contains(users, b.candidates[:, 1:].numpy()).any()
    # a new order every epoch
    assert [tuple(x.users.tolist()) for x in loader] != [tuple(x.users.tolist()) for x in loader]


def test_instance_rows_in_the_lineage_order_with_fixed_negatives(tmp_path):
    """--train-order user / --train-negatives fixed (the study lineage's file): the same rows as the default
    loader, by user then time, the same every epoch; negatives drawn once, still never in the history."""
    from benchbox.pipeline import InstanceLoader
    d = _data(tmp_path, SEQS)

    def epoch(loader):
        return [(int(b.users[r]), tuple(b.inputs[r, :int(b.lengths[r])].tolist()), tuple(b.candidates[r].tolist()))
                for b in loader for r in range(len(b.users))]

    lineage = InstanceLoader(d, window=3, batch_size=4, n_neg=2, seed=0, order="user", negatives="fixed")
    first, second = epoch(lineage), epoch(lineage)
    assert first == second
    want = [(u, tuple(s[max(0, t - 3):t]), s[t]) for u, s in enumerate(SEQS) for t in range(1, len(s) - 2)]
    assert [(u, h, c[0]) for u, h, c in first] == want  # user-major, time order within a user
    index = InteractionIndex(d)
    users = np.array([u for u, _, _ in first])[:, None].repeat(2, 1)
    assert not index.contains(users, np.array([c[1:] for _, _, c in first])).any()
    # redrawn negatives in user order: same rows and positives every epoch, new negatives
    redrawn = InstanceLoader(d, window=3, batch_size=4, n_neg=2, seed=0, order="user")
    a, b = epoch(redrawn), epoch(redrawn)
    assert [r[:2] + r[2][:1] for r in a] == [r[:2] + r[2][:1] for r in b] and a != b
    # fixed negatives in a shuffled order: each row keeps its negatives across epochs
    shuffled = InstanceLoader(d, window=3, batch_size=4, n_neg=2, seed=0, negatives="fixed")
    a, b = epoch(shuffled), epoch(shuffled)
    assert a != b and sorted(a) == sorted(b)
    # the defaults draw what they drew before the options existed: permutation, then negatives, one stream
    from benchbox.pipeline import sample_negatives
    default = InstanceLoader(d, 3, 4, 2, 0)
    rng = np.random.default_rng([0, 0])
    order = rng.permutation(len(default.users))
    neg = sample_negatives(index, default.users[order], (len(order), 2), rng)
    got = epoch(default)
    assert [u for u, _, _ in got] == default.users[order].tolist()
    assert [list(c[1:]) for _, _, c in got] == neg.tolist()
