"""SASRec-style causal multi-head self-attention with learnable positions.

Backends (same weights, same maths):
- ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` with no mask. Right padding makes a
  mask unnecessary (a real query never sees a later padded key), and mask-free causal calls are what
  let CUDA pick its flash kernel in bf16/fp16.
- ``flash_attn``: the flash-attn package, when importable on CUDA.
- ``math``: explicit softmax(QK^T/sqrt(d) + causal mask) V, the plain reference.
Streaming keeps a key/value cache (it grows with the history: attention has no O(1) state).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Mixer, rows_by_forward_last


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # type: ignore
        return flash_attn_func
    except Exception:  # not installed, or no CUDA build
        return None


def attention_math(q, k, v, causal_offset: int = 0, dropout_p: float = 0.0, training: bool = False):
    """Reference attention. q: (B,H,Tq,E), k/v: (B,H,Tk,E); query i sits at key position offset+i."""
    tq, tk = q.shape[-2], k.shape[-2]
    allowed = torch.arange(tk, device=q.device)[None, :] <= (torch.arange(tq, device=q.device)[:, None] + causal_offset)
    return attention_math_masked(q, k, v, allowed, dropout_p, training)


def attention_math_masked(q, k, v, visible, dropout_p: float = 0.0, training: bool = False):
    """Reference attention with a boolean (broadcastable) mask of the keys each query may see."""
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    if dropout_p > 0 and training:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


class AttentionMixer(Mixer):
    BACKENDS = ("sdpa", "flash_attn", "math")
    group_midpoints_min_rows = 2048  # mixers.base.Mixer

    def __init__(self, d_model: int, max_len: int = 512, *, num_heads: int = 2, dropout: float = 0.0,
                 positions: bool = True, backend: str = "auto"):
        super().__init__(d_model, max_len)
        if num_heads < 1 or d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        if backend not in ("auto",) + self.BACKENDS:
            raise ValueError(f"unknown backend {backend!r} for attention ({', '.join(self.BACKENDS)})")
        self.num_heads, self.head_dim, self.dropout = num_heads, d_model // num_heads, dropout
        self.requested_backend = backend
        self.pos = nn.Embedding(max_len, d_model) if positions else None
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=0.02)

    @classmethod
    def available_backends(cls, device="cpu"):
        out = ["sdpa"]
        if torch.device(device).type == "cuda" and _flash_attn_func() is not None:
            out.insert(0, "flash_attn")
        return out + ["math"]

    def backend_for(self, x: torch.Tensor) -> str:
        if self.requested_backend != "auto":
            return self.requested_backend
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _flash_attn_func() is not None:
            return "flash_attn"
        return "sdpa"

    def _positioned(self, x, start: int):
        t = x.shape[1]
        if self.pos is None:
            return x
        if start + t > self.max_len:
            raise ValueError(f"sequence position {start + t} exceeds attention max_len={self.max_len}")
        return x + self.pos.weight[start:start + t]

    def _heads(self, x, start: int):
        b, t, _ = x.shape
        x = self._positioned(x, start)
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        return q, k, v  # (B, T, H, E)

    def forward(self, x, lengths=None):
        b, t, d = x.shape
        q, k, v = self._heads(x, 0)
        p = self.dropout if self.training else 0.0
        backend = self.backend_for(x)
        if backend == "flash_attn":
            y = _flash_attn_func()(q, k, v, dropout_p=p, causal=True)
        else:
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))
            if backend == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            elif backend == "math":
                y = attention_math(q, k, v, 0, p, self.training)
            else:
                raise ValueError(f"backend {backend!r} unavailable")
            y = y.transpose(1, 2)
        return self.out(y.reshape(b, t, d))

    def forward_rows(self, x, lengths, n):
        """n queries (lengths - 1, ..., lengths - n) rather than all of them (evaluation's two rows)."""
        if self.dropout > 0 and self.training:
            return super().forward_rows(x, lengths, n)
        return rows_by_forward_last(self, x, lengths, n)

    def forward_last(self, x, lengths):
        """The query at lengths - 1 only, over the keys 0..lengths - 1 (what causal attention gives that
        position): the readout of the last block reads nothing else. Attention dropout draws per score,
        so with it on the full forward is taken (the same dropout draws as a training step without this)."""
        if self.dropout > 0 and self.training:
            return super().forward_last(x, lengths)
        b, t, d = x.shape
        x = self._positioned(x, 0)
        last = x[torch.arange(b, device=x.device), lengths - 1]  # (B, D)
        w, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(last, w[:d], bias[:d]).view(b, self.num_heads, 1, self.head_dim)
        k, v = F.linear(x, w[d:], bias[d:]).view(b, t, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        visible = (torch.arange(t, device=x.device)[None, :] < lengths[:, None])[:, None, None, :]  # (B,1,1,T)
        if self.backend_for(x) == "math":
            y = attention_math_masked(q, k, v, visible)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.out(y.reshape(b, d))

    # streaming with a key/value cache
    def init_state(self, batch_size, device=None, dtype=None):
        empty = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def step(self, x, state):
        b, t, d = x.shape
        q, k, v = (z.transpose(1, 2) for z in self._heads(x, state["pos"]))
        k = torch.cat([state["k"], k], dim=2)
        v = torch.cat([state["v"], v], dim=2)
        if t == 1:  # one new click attends to the whole cache: no mask needed
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = attention_math(q, k, v, causal_offset=state["pos"])
        y = self.out(y.transpose(1, 2).reshape(b, t, d))
        return y, {"k": k, "v": v, "pos": state["pos"] + t}
