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
    loader = TrainLoader(d, max_len=10, batch_size=8, n_neg=4, seed=0)
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
