import math

import numpy as np
import torch

from benchbox.evaluate import metrics_from_ranks, ranks_from_scores


def test_hand_computed_ranks_and_metrics():
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],  # positive first: rank 0
        [0.5, 0.9, 0.8, 0.1],  # two above: rank 2
        [0.5, 0.5, 0.1, 0.1],  # a tie counts against the positive: rank 1
        [0.0, 0.0, 0.0, 0.0],  # constant scorer: rank 3 (worst), never a free hit
    ])
    assert ranks_from_scores(scores).tolist() == [0, 2, 1, 3]
    m = metrics_from_ranks(torch.tensor([0, 3, 7, 12]))
    assert math.isclose(m["hr@5"], 2 / 4)
    assert math.isclose(m["hr@10"], 3 / 4)
    assert math.isclose(m["ndcg@5"], (1 + 1 / math.log2(5)) / 4)
    assert math.isclose(m["ndcg@10"], (1 + 1 / math.log2(5) + 1 / math.log2(9)) / 4)


def test_nan_scores_count_against_positive():
    assert ranks_from_scores(torch.tensor([[float("nan"), 0.0, 1.0]])).tolist() == [2]
    assert ranks_from_scores(torch.tensor([[1.0, float("nan"), 0.0]])).tolist() == [1]


def test_random_scorer_matches_theory():
    g = torch.Generator().manual_seed(0)
    ranks = ranks_from_scores(torch.rand(200_000, 100, generator=g))
    m = metrics_from_ranks(ranks)
    expected_ndcg10 = sum(1 / math.log2(r + 2) for r in range(10)) / 100  # 0.04544
    assert abs(expected_ndcg10 - 0.0454) < 1e-4
    assert abs(m["hr@10"] - 0.10) < 0.003
    assert abs(m["ndcg@10"] - expected_ndcg10) < 0.0015
    assert abs(m["hr@5"] - 0.05) < 0.002


# ---- evaluate(): full-ranking masks, NaN positives, bf16 ties ----------------------------------------
class _TableScorer(torch.nn.Module):
    """score(user, item) = value[item] for every user: the 1-dim item table is the score itself."""

    def __init__(self, values):
        super().__init__()
        from benchbox.readouts import LastReadout
        self.values = torch.as_tensor(values, dtype=torch.float32)
        self.readout = LastReadout(1)

    def item_table(self):
        return self.values[:, None]

    def encode(self, inputs, lengths):
        return torch.ones(inputs.shape + (1,))

    # the interface evaluate() used before it encoded once (kept so the tests ran against the old code)
    def score_candidates(self, inputs, lengths, candidates, table=None):
        return self.readout.scores(self.encode(inputs, lengths), lengths, self.item_table()[candidates])

    def score_all(self, inputs, lengths, table=None):
        return self.readout.scores_all(self.encode(inputs, lengths), lengths, self.item_table())


def _one_long_user(tmp_path):
    from benchbox import data
    from conftest import write_seqs
    # user 0 clicked 1..30 (test item 30); users 1, 2 hold items 31..40 so that they exist
    return data.parse_sequence_file(write_seqs(tmp_path / "d.txt", [list(range(1, 31)), list(range(31, 36)),
                                                                     list(range(36, 41))]))


def test_full_ranking_masks_the_whole_history_not_only_the_window(tmp_path):
    from benchbox.evaluate import evaluate
    from benchbox.pipeline import eval_batches
    d = _one_long_user(tmp_path)
    model = _TableScorer(-torch.arange(d.n_items + 1.0))  # every earlier item outscores item 30
    cand = np.array([[30, 31, 32], [35, 1, 2], [40, 1, 2]])
    # the model reads 25..29 only: items 1..24 are history outside its window
    res = evaluate(model, eval_batches(d, "test", 5, 8, cand, history=True), d.n_items, full=True)
    # user 0: every higher-scoring item (1..29) is history -> rank 0; user 1 (31..35): 1..30 beat 35 -> 30;
    # user 2 (36..40): 1..35 beat 40 -> 35. Masking only the window would give user 0 rank 24.
    assert res["full_hr@10"] == 1 / 3 and res["full_ndcg@10"] == 1 / 3
    assert res["hr@5"] == 1.0  # sampled, 3 candidates: every positive is within the top 5


def test_nan_positive_ranks_last_in_full_ranking(tmp_path):
    from benchbox.evaluate import evaluate
    from benchbox.pipeline import eval_batches
    d = _one_long_user(tmp_path)
    values = torch.zeros(d.n_items + 1)
    values[[30, 35, 40]] = float("nan")  # every test positive scores NaN
    cand = np.array([[30, 31, 32], [35, 1, 2], [40, 1, 2]])
    res = evaluate(_TableScorer(values), eval_batches(d, "test", 5, 8, cand, history=True), d.n_items, full=True)
    assert res["full_hr@10"] == 0.0 and res["full_ndcg@10"] == 0.0  # (sampled: test_nan_scores_count_against_positive)


def test_bfloat16_runs_rank_on_float32_scores(tmp_path):
    from benchbox.evaluate import evaluate
    from benchbox.pipeline import eval_batches
    d = _one_long_user(tmp_path)
    values = torch.ones(d.n_items + 1)
    values[[30, 35, 40]] = 1.001  # a win in float32, a tie once rounded to bf16 (spacing 2**-7 at 1)
    assert torch.tensor(1.001).bfloat16() == torch.tensor(1.0).bfloat16()
    cand = np.array([[30, 31, 32], [35, 1, 2], [40, 1, 2]])
    res = evaluate(_TableScorer(values), eval_batches(d, "test", 5, 8, cand, history=True), d.n_items, full=True,
                   autocast_dtype=torch.bfloat16)
    assert res["hr@5"] == 1.0 and res["ndcg@10"] == 1.0 and res["full_hr@5"] == 1.0
