"""GRU4Rec-style recurrent mixer: a (multi-layer) GRU over the item sequence.

Right padding needs no packing: a GRU is causal, so padded steps come after every real one.
On CUDA ``nn.GRU`` runs cuDNN; streaming carries the hidden state.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Mixer


class GRUMixer(Mixer):
    BACKENDS = ("torch",)

    def __init__(self, d_model: int, max_len: int = 512, *, num_layers: int = 1, dropout: float = 0.0,
                 backend: str = "auto"):
        super().__init__(d_model, max_len)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if backend not in ("auto", "torch"):
            raise ValueError(f"unknown backend {backend!r} for gru (torch)")
        self.backend = "torch"
        self.gru = nn.GRU(d_model, d_model, num_layers=num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, x, lengths=None):
        return self.gru(x)[0]

    def init_state(self, batch_size, device=None, dtype=None):
        return torch.zeros(self.gru.num_layers, batch_size, self.d_model, device=device, dtype=dtype)

    def step(self, x, state):
        y, h = self.gru(x, state)
        return y, h

    @classmethod
    def available_backends(cls, device="cpu"):
        return ["torch"]  # cuDNN is picked by nn.GRU itself on CUDA
