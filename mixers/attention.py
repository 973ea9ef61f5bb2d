"""SASRec-style causal multi-head self-attention with learnable positions.

Backends (same weights, same maths):
- ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` with no mask. Right padding makes a
  mask unnecessary (a real query never sees a later padded key), and mask-free causal calls are what
  let CUDA pick its flash kernel in bf16/fp16.
- ``flash_attn``: the flash-attn package, when importable on CUDA.
- ``math``: explicit softmax(QK^T/sqrt(d) + causal mask) V, the plain reference.
``auto`` (the default) is ``sdpa``, except on CPU for sequences of at most 64 positions where the harness's C
kernel runs (``_SmallAttention``): torch's CPU SDPA is built for long sequences.
Streaming keeps a key/value cache (it grows with the history: attention has no O(1) state).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Mixer, rows_by_forward_last


# the harness's small-attention CPU kernels (an object with attention_functions(dtype)), installed where it
# builds them (benchbox.kernels); None: torch's SDPA everywhere
_KERNELS = None
SMALL_MAX_LEN = 64  # the kernels' longest sequence (ATT_MAXT); longer ones go to SDPA


def install_kernels(kernels) -> None:
    global _KERNELS
    _KERNELS = kernels


class _SmallAttention(torch.autograd.Function):
    """Causal attention of short sequences in C (benchbox.kernels: SMALL_ATTENTION), read from and written
    to the projections' own layouts. Either ``kv`` None and ``q`` the (B, T, 3D) q/k/v projection: every
    position a query over keys 0..t, output (B, T, D); or ``q`` (B, D) one query per row (the last position)
    over ``kv`` (B, T, 2D)'s first ``lengths`` keys, output (B, D). Saves the probabilities (B, H, Tq, T).
    The same function as SDPA (``backend=sdpa``) and ``attention_math``, float rounding apart."""

    @staticmethod
    def forward(ctx, q, kv, lengths, heads: int):
        fwd = _KERNELS.attention_functions(q.dtype)[0]
        causal = kv is None
        b, d = q.shape[0], q.shape[-1] // (3 if causal else 1)
        t = q.shape[1] if causal else kv.shape[1]
        tq, e = (t if causal else 1), d // heads
        q = q.contiguous()
        kv = q if causal else kv.contiguous()
        lengths = None if causal else lengths.to(torch.int64).contiguous()
        size = q.element_size()
        k_ptr = kv.data_ptr() + (d * size if causal else 0)
        kv_st = kv.shape[-1]
        out = q.new_empty(b, tq, heads, e)
        p = q.new_empty(b, heads, tq, t)
        fwd(q.data_ptr(), tq * q.shape[-1], q.shape[-1] if causal else 0, k_ptr, k_ptr + d * size, t * kv_st, kv_st,
            0 if lengths is None else lengths.data_ptr(), out.data_ptr(), p.data_ptr(), b, tq, t, heads, e,
            1.0 / math.sqrt(e))
        ctx.heads, ctx.causal = heads, causal
        ctx.save_for_backward(q, kv, lengths, out, p)
        return out.view(b, t, d) if causal else out.view(b, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        bwd = _KERNELS.attention_functions(g.dtype)[1]
        q, kv, lengths, out, p = ctx.saved_tensors
        heads, causal = ctx.heads, ctx.causal
        b, tq, _, e = out.shape
        d, t = heads * e, p.shape[-1]
        g = g.contiguous()
        dq = torch.empty_like(q)
        dkv = dq if causal else torch.empty_like(kv)
        size = q.element_size()
        off = d * size if causal else 0
        kv_st = kv.shape[-1]
        bwd(q.data_ptr(), tq * q.shape[-1], q.shape[-1] if causal else 0, kv.data_ptr() + off,
            kv.data_ptr() + off + d * size, t * kv_st, kv_st, 0 if lengths is None else lengths.data_ptr(),
            out.data_ptr(), p.data_ptr(), g.data_ptr(), dq.data_ptr(), dkv.data_ptr() + off,
            dkv.data_ptr() + off + d * size, b, tq, t, heads, e, 1.0 / math.sqrt(e))
        return dq, (None if causal else dkv), None, None


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

    def _small(self, x) -> bool:
        """Whether ``_SmallAttention`` runs: the default backend on CPU, the kernels installed for the dtype,
        at most SMALL_MAX_LEN positions, heads of at most 128 (float32: a multiple of 16, the kernel's vector
        width), no attention dropout in force, neither autocast nor a compiler. ML-1M study step (SASRec,
        204 rows of 10, 2 heads of 32, 1 thread): 10.3 -> 9.2 ms against SDPA."""
        if torch.compiler.is_compiling() or _KERNELS is None:
            return False
        return (self.requested_backend == "auto" and x.device.type == "cpu"
                and 0 < x.shape[1] <= SMALL_MAX_LEN and not (self.dropout > 0 and self.training)
                and self.head_dim <= 128 and (x.dtype != torch.float32 or self.head_dim % 16 == 0)
                and not torch.is_autocast_enabled("cpu") and x.dtype == self.qkv.weight.dtype
                and _KERNELS.attention_functions(x.dtype) is not None)

    def forward(self, x, lengths=None):
        b, t, d = x.shape
        if self._small(x):
            return self.out(_SmallAttention.apply(self.qkv(self._positioned(x, 0)), None, None, self.num_heads))
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
        if self._small(x):
            q, kv = F.linear(last, w[:d], bias[:d]), F.linear(x, w[d:], bias[d:])
            return self.out(_SmallAttention.apply(q, kv, lengths, self.num_heads))
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
