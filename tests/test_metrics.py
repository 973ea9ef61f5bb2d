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
