"""The one interface every sequence mixer implements.

A mixer maps (batch, length, d_model) to the same shape and must be causal: output t depends only
on inputs 0..t. Batches are right-padded, so causality alone guarantees that padding never changes a
real position; ``lengths`` is passed for mixers that want it (e.g. to skip work) but may be ignored.

Streaming (the recommender-serving case): ``init_state`` + ``step`` carry whatever the mixer needs
(a hidden state, a key/value cache, TTT weights plus the partial mini-batch) so that feeding a
sequence chunk by chunk gives exactly the outputs of one full ``forward``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Mixer(nn.Module):
    """Base class. Subclasses take ``d_model`` and ``max_len`` plus their own keyword options."""

    #: backends this mixer can run with; "auto" picks the best available one at construction.
    BACKENDS: tuple[str, ...] = ("torch",)

    #: the recommender runs a batch's rows through its encoder in groups of similar length (benchbox.
    #: model.length_groups) only from this many padded positions (rows x width) up: each group is one
    #: more call of every layer. Measured on 1 CPU thread, Beauty, window 10, grouped / whole step time:
    #: 1,020 positions 0.65-0.70x, 2,040 0.83-1.00x, 4,090 1.09-1.36x (TTT-Linear, GRU, attention).
    group_min_positions: int = 3072

    #: from this many rows a batch up, its length groups also split at the midpoints of the powers of two
    #: (lengths 1-2, 3, 4, 5-6, 7-8, 9-12, ... instead of 1-2, 3-4, 5-8, ...): less padding for about twice
    #: the groups, which pays only where a group's positions cost more than its extra call. None: never.
    #: Measured (1 CPU thread, Beauty, instance regime, window 50, grouped step time, midpoints / without):
    #: attention 0.90x at 512 rows, 1.00-1.02x at 1,024, 1.06x at 2,048 (RecBole's rows), 0.84-0.88x at 204
    #: (window 20 or 50); Mamba 1.07x at 2,048, 0.92x at 204 (window 10); at 2,048 rows GRU 0.92x (each
    #: group runs its own time step loop) and TTT-Linear 0.98x, so they never split there.
    group_midpoints_min_rows: int | None = None

    def __init__(self, d_model: int, max_len: int = 512):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        self.d_model = d_model
        self.max_len = max_len

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward_last(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, D): the output at each row's last real position (lengths - 1) only. A mixer whose last
        output is cheaper than all of them overrides it; ``forward`` stays the reference."""
        return self.forward(x, lengths)[torch.arange(x.shape[0], device=x.device), lengths - 1]

    def forward_rows(self, x: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
        """(B, n, D): the outputs at lengths - 1, lengths - 2, ..., lengths - n (clamped at 0), e.g. the
        test and validation positions of evaluation. Here the full forward, read at those rows; a mixer
        with a cheap ``forward_last`` overrides it (causal: the output at lengths - 1 - j is the last
        output of the sequence cut to lengths - j)."""
        return end_rows(self.forward(x, lengths), lengths, n)

    # ---- streaming -------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not support streaming")

    def step(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Process new tokens ``x`` (batch, t, d_model), t >= 1, continuing from ``state``."""
        raise NotImplementedError(f"{type(self).__name__} does not support streaming")

    @property
    def supports_streaming(self) -> bool:
        return type(self).step is not Mixer.step

    # ---- backends ---------------------------------------------------------------------------
    @classmethod
    def available_backends(cls, device: str | torch.device = "cpu") -> list[str]:
        """Backends usable on ``device`` on this machine (optional packages checked here)."""
        return ["torch"]

    @classmethod
    def auto_backend(cls, device: str | torch.device = "cpu") -> str:
        return cls.available_backends(device)[0]


def end_rows(y: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, ...): y (B, L, ...) at lengths - 1, ..., lengths - n, clamped at 0."""
    pos = (lengths[:, None] - 1 - torch.arange(n, device=lengths.device)).clamp_min(0)
    return y[torch.arange(y.shape[0], device=y.device)[:, None], pos]


def rows_by_forward_last(mixer, x, lengths, n: int) -> torch.Tensor:
    """``forward_rows`` from n calls of a cheap ``forward_last`` on the lengths cut by 0..n-1."""
    return torch.stack([mixer.forward_last(x, (lengths - j).clamp_min(1)) for j in range(n)], 1)
