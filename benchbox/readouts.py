"""Readouts: how the sequence features H become a score for a candidate item.

A row of the study's Table 1 is a (mixer, readout) pair. Every readout takes
- ``h``: (B, L, D) the mixer sequence features (right-padded), ``lengths``: (B,),
- candidate features F_t: (B, L, C, D) at every position for training, (B, C, D) for evaluation,
- ``hist``: (B, L, D) the raw item embeddings of the history (some readouts attend over them),
and returns logits of the same leading shape. A new readout is a class here and one ``READOUTS`` line.
"""
from __future__ import annotations

import torch
from torch import nn

from . import BenchboxError


def last_position(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return h[torch.arange(h.shape[0], device=h.device), lengths - 1]


class LastReadout(nn.Module):
    """TTT4Rec / SASRec / GRU4Rec: F_s = H at the last real position; score = F_s . F_t."""

    def __init__(self, d_model: int):
        super().__init__()

    def train_scores(self, h, lengths, cand, hist):
        return (cand @ h.unsqueeze(-1)).squeeze(-1)  # (B,L,C,D) @ (B,L,D,1): one batched matmul

    def scores(self, h, lengths, cand, hist):
        return (cand @ last_position(h, lengths).unsqueeze(-1)).squeeze(-1)

    def scores_all(self, h, lengths, table, hist):
        return last_position(h, lengths) @ table.T


READOUTS: dict[str, type[nn.Module]] = {
    "last": LastReadout,
}


def build_readout(name: str, d_model: int, **opts) -> nn.Module:
    if name not in READOUTS:
        raise BenchboxError(f"unknown readout {name!r}; registered: {', '.join(READOUTS)}")
    try:
        return READOUTS[name](d_model, **opts)
    except TypeError as e:
        raise BenchboxError(f"readout {name!r}: {e}") from None
