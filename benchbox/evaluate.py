"""Ranking metrics with one positive per user (HR@k, NDCG@k), sampled and full-ranking evaluation.

A tie between the positive and another candidate counts against the positive (the pessimistic rank),
so a constant scorer gets HR@k = 0, never a flattering 1.
"""
from __future__ import annotations

import numpy as np
import torch

from .pipeline import eval_batches
from .readouts import LastReadout, candidate_dot, gather_rows

KS = (5, 10)


def ranks_from_scores(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """scores: (B, C) with the positive in column 0. Rank = number of other (valid) candidates that
    score >= the positive (0 = top). NaN scores count against the positive."""
    pos = scores[:, :1]
    beats = (scores[:, 1:] >= pos) | torch.isnan(scores[:, 1:]) | torch.isnan(pos)
    if valid is not None:
        beats &= valid[:, 1:]
    return beats.sum(dim=1)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Scores are ranked in float32 at least (bf16 ties count against the positive); float64 stays."""
    return t.float() if t.element_size() < 4 else t


def _encode(model, batch, dev_type: str, autocast_dtype) -> torch.Tensor:
    """H of a batch, under autocast when asked, widened for ranking."""
    with torch.autocast(dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        h = model.encode(batch.inputs, batch.lengths)
    return _wide(h)


def _scores_at_ends(model, batch, cands, table, dev_type: str, autocast_dtype) -> list[torch.Tensor]:
    """Scores of the candidates ``cands[j]`` (B, C) at position lengths - 1 - j, from one encode of the
    batch: the "last" readout reads only those rows (``Recommender.encode_ends``); any other readout
    scores the full H at lengths - j."""
    if isinstance(model.readout, LastReadout):
        with torch.autocast(dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            h = _wide(model.encode_ends(batch.inputs, batch.lengths, len(cands)))
        return [candidate_dot(gather_rows(table, c), h[:, j]) for j, c in enumerate(cands)]
    h = _encode(model, batch, dev_type, autocast_dtype)
    return [model.readout.scores(h, batch.lengths - j, gather_rows(table, c)) for j, c in enumerate(cands)]


def metrics_from_ranks(ranks: np.ndarray | torch.Tensor, ks=KS) -> dict[str, float]:
    r = torch.as_tensor(ranks, dtype=torch.float64)
    out = {}
    for k in ks:
        hit = r < k
        out[f"ndcg@{k}"] = float((hit / torch.log2(r + 2)).mean())
        out[f"hr@{k}"] = float(hit.double().mean())
    return out


@torch.no_grad()
def evaluate(model, batches, n_items: int, full: bool = False, device="cpu", autocast_dtype=None) -> dict:
    """Sampled metrics over each batch's candidates; with ``full`` also the rank of the positive among
    all items, every item of the user's whole history masked (reported as full_ndcg@k, full_hr@k).

    The sequence is encoded once per batch (under autocast when asked) and both rankings score that one
    encoding in float32: bf16 scores tie often, and a tie counts against the positive."""
    model.eval()
    table = _wide(model.item_table())  # F_t for every item, computed once
    dev_type = torch.device(device).type
    sampled, full_ranks = [], []
    for batch in batches:
        batch = batch.to(device)
        h = _encode(model, batch, dev_type, autocast_dtype)
        with torch.autocast(dev_type, enabled=False):
            scores = model.readout.scores(h, batch.lengths, gather_rows(table, batch.candidates))
            sampled.append(ranks_from_scores(scores).cpu())
            if full:
                full_ranks.append(full_ranks_masked(model.readout.scores_all(h, batch.lengths, table), batch))
    out = metrics_from_ranks(torch.cat(sampled))
    if full:
        out.update({f"full_{k}": v for k, v in metrics_from_ranks(torch.cat(full_ranks)).items()})
    return out


@torch.no_grad()
def evaluate_splits(model, data, max_len: int, valid_cand, test_cand, device="cpu", autocast_dtype=None,
                    batch_size: int = 256) -> tuple[dict, dict]:
    """Sampled validation and test metrics with one encode per user where that is exact.

    The validation input s[:n-2] is a prefix of the test input s[:n-1] whenever the test input fits in
    ``max_len`` (nothing cut): a causal model's H over the test input then holds the validation H too,
    so both are scored from one encode (validation at length - 1). Users whose test input is cut have a
    validation window that starts one item earlier; they are encoded once per split. ``evaluate`` on
    each split is the reference that this equals (tests hold them together)."""
    model.eval()
    table = _wide(model.item_table())
    dev_type = torch.device(device).type
    ends = data.lengths - 1
    fits, cut = np.flatnonzero(ends <= max_len), np.flatnonzero(ends > max_len)
    ranks = {"valid": [], "test": []}
    with torch.autocast(dev_type, enabled=False):
        for batch in eval_batches(data, "test", max_len, batch_size, test_cand, users=fits):
            valid = torch.from_numpy(valid_cand[batch.users.numpy()]).to(device)
            batch = batch.to(device)
            test_s, valid_s = _scores_at_ends(model, batch, [batch.candidates, valid], table, dev_type, autocast_dtype)
            ranks["test"].append(ranks_from_scores(test_s).cpu())
            ranks["valid"].append(ranks_from_scores(valid_s).cpu())
        for split, cand in (("valid", valid_cand), ("test", test_cand)):
            for batch in eval_batches(data, split, max_len, batch_size, cand, users=cut):
                batch = batch.to(device)
                (scores,) = _scores_at_ends(model, batch, [batch.candidates], table, dev_type, autocast_dtype)
                ranks[split].append(ranks_from_scores(scores).cpu())
    return metrics_from_ranks(torch.cat(ranks["valid"])), metrics_from_ranks(torch.cat(ranks["test"]))


def full_ranks_masked(all_scores: torch.Tensor, batch) -> torch.Tensor:
    """Rank of each row's positive (batch.candidates[:, 0]) among all items (B, n_items + 1), leaving out
    column 0 (padding) and every item of the user's whole history (``batch.history``, not only the
    model's input window, which is cut to max_len). NaN counts against the positive, on either side."""
    if batch.history is None:
        raise ValueError("full ranking needs each user's whole history: eval_batches(..., history=True)")
    pos = batch.candidates[:, 0]
    pos_score = all_scores.gather(1, pos[:, None])
    mask = torch.zeros_like(all_scores, dtype=torch.bool)
    mask.scatter_(1, batch.history, True)  # history (and column 0: history is padded with 0)
    mask[:, 0] = True
    mask.scatter_(1, pos[:, None], True)
    beats = ((all_scores >= pos_score) | torch.isnan(all_scores) | torch.isnan(pos_score)) & ~mask
    return beats.sum(1).cpu()
