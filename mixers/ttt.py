"""TTT-Linear and TTT-MLP: the test-time-training layer of Sun et al. 2024 ("Learning to (Learn at
Test Time): RNNs with Expressive Hidden States"), following the official PyTorch code
(github.com/test-time-training/ttt-lm-pytorch, ``ttt.py``: ``TTTBase``/``TTTLinear``/``TTTMLP``).
Our own implementation; the maths is the official layer's.

Per head h (``head_dim`` D = d_model / num_heads) and token t:

* ``Q, K, V`` projections (no bias) of the layer input; RoPE on Q and K with position
  ``t mod mini_batch_size`` (the official interleaved-pair convention, base ``rope_theta``).
* inner model ``f(x; W)``: ``x W1 + b1`` (TTT-Linear) or ``gelu_tanh(x W1 + b1) W2 + b2`` with
  hidden size 4 D (TTT-MLP).
* self-supervised loss ``l_t(W) = 1/2 || LN_h(f(K_t; W)) - (V_t - K_t) ||^2`` where ``LN_h`` is the
  learnable per-head LayerNorm (official ``ttt_norm``, eps 1e-6).
* learning rate ``eta_t = ttt_base_lr * sigmoid(x_t . w_lr[h] + b_lr[h]) / D`` and token factor
  ``tok_i = max(0, 1/i + learnable_token_idx[i-1])`` for the i-th token (1-based) of its mini-batch.
* one gradient step per mini-batch: with ``W0`` the weights at the start of the mini-batch and
  ``g_j = grad l_j(W0)``, token i of the mini-batch is read out with
  ``W_i = W0 - tok_i * sum_{j<=i} eta_j g_j`` (the dual form's causal lower-triangular sum) and the
  next mini-batch starts from ``W_last`` (i = last token of the mini-batch).
* ``z_t = Q_t + LN_h(f(Q_t; W_i))``; then ``post_norm`` (LayerNorm over d_model, eps 1e-6), the
  optional gate ``gelu_tanh(x W_g) * z`` and the output projection ``W_o``.

``mini_batch_size`` may be any integer >= 1 and the length need not be a multiple of it: the last
mini-batch is then shorter (its tokens keep tok_i = 1/i + offset_i, like the official "remainder").

Options (keyword, with defaults; official ``TTTConfig`` default in brackets where it has one):
``num_heads=2`` (official: num_attention_heads), ``mini_batch_size=16`` [16], ``ttt_base_lr=1.0`` [1.0],
``use_gate=False`` [False], ``use_rope=True`` [RoPE always on], ``rope_theta=10000.0`` [10000.0],
``share_qk=False`` [False] (one Q/K projection followed by two causal depthwise convolutions, the
official Mamba-backbone variant), ``pre_conv=False`` [False], ``conv_kernel=4`` [4],
``initializer_range=0.02`` [0.02] (std of the normal init of every projection, of the lr gate and of
the inner weights W1/W2; biases and ``learnable_token_idx`` start at 0, norms at 1/0, convolutions
keep PyTorch's default init as officially), ``scan_chunk=8`` (performance only: tokens per
materialised inner-weight state in the fast path), ``backend="auto"``.

``pre_conv`` lives in the official ``Block`` rather than in the layer; here it is inside the mixer as
``h = RMSNorm_seq(u + conv(RMSNorm_conv(u)))`` (the official residual conv followed by the block's
``seq_norm``), and the TTT layer then runs on ``h``. The official residual stream would carry
``u + conv(...)``; a mixer cannot change its caller's residual, which is the one deviation.
Numerical details that differ below float32 resolution, and must be aligned to compare with the official
layer in float64 (then the two agree to ~1e-15; otherwise only to float32 resolution): (1) RoPE angles
are computed in float64 (the official code builds float32 cos/sin); (2) the token factor base 1/i is
computed in the run's dtype (the official ``token_idx`` is a float32 buffer); (3) the GELU derivative uses
exact sqrt(2/pi) (official: the float32 literal 0.79788456).

Backends (same parameters, same maths):
- ``torch``: the fast path. Everything that does not depend on the inner weights (projections,
  RoPE, lr, Q.K kernels, masks, output norms) is computed for the whole sequence at once; the
  sequential scan materialises W only once per chunk of ~``scan_chunk`` tokens (whole mini-batches)
  and handles the mini-batches inside a chunk in dual form (W-free kernels), so mini_batch_size 1
  costs small matrix-vector products instead of D x D weight updates per token. TTT-Linear's scan
  is plain autograd; TTT-MLP's chunk is a ``torch.autograd.Function`` (``_MLPChunk``) with a
  hand-written backward (fused GELU/LayerNorm derivatives, weight gradients batched per chunk).
- ``reference``: plain loops, mini-batch by mini-batch and token by token, each inner gradient taken
  with ``torch.autograd.grad`` (``ttt_reference``); for tests.
Streaming keeps W at the last mini-batch boundary plus the running sum ``sum_j eta_j g_j`` of the
partial mini-batch (and the convolution tails), so a new click costs O(1) in the history length.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Mixer, rows_by_forward_last

LN_EPS = 1e-6
_GELU_C = math.sqrt(2.0 / math.pi)

# the harness's C kernels (an object with ttt_dual_applies, ttt_dual_forward / _backward for the dual form inside
# one mini-batch, lnl2_forward / lnl2_vjp for the inner loss gradient, ttt_window_applies / _forward / _backward for
# TTT-Linear's whole layer over the scan's chunks, mlp_chunk_applies / _forward / _backward for TTT-MLP's chunk of one
# mini-batch; benchbox.kernels), installed where it builds them; None: torch's ops everywhere
_KERNELS = None


def install_kernels(kernels) -> None:
    global _KERNELS
    _KERNELS = kernels


# --------------------------------------------------------------------------------------------------
# small maths helpers shared by the fast path and streaming
# --------------------------------------------------------------------------------------------------
def gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    return F.gelu(z, approximate="tanh")


def gelu_tanh_grad(z: torch.Tensor) -> torch.Tensor:
    """d/dz of the tanh-approximated GELU (what the official ``gelu_bwd`` computes)."""
    z2 = z * z
    t = torch.tanh(_GELU_C * z * (1.0 + 0.044715 * z2))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * (_GELU_C * (1.0 + 3 * 0.044715 * z2))


def ln_l2_grad(z: torch.Tensor, gamma: torch.Tensor, gt: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """Gradient w.r.t. z of 1/2 ||gamma * LN(z) + beta - target||^2 (the official ``ln_fused_l2_bwd``).

    ``gt`` is the precomputed ``gamma * (target - beta)``, so ``dL/dLN(z) * gamma = gamma^2 LN(z) - gt``.
    """
    mu = z.mean(-1, keepdim=True)
    xc = z - mu
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    xh = xc * rstd
    gx = (gamma * gamma) * xh - gt
    return rstd * (gx - gx.mean(-1, keepdim=True) - xh * (gx * xh).mean(-1, keepdim=True))


def _unit_affine(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight 1 and bias 0 for a layer norm over z's last dim: torch's CPU layer norm forward (2.13) without
    weight and bias takes a slower path, 1.7x the time at rows of 32 (528 against 312 us at 3 x 256 x 16 x
    32), with the same bits (its backward is not slower without them, so ``_ln_bwd`` is called bare)."""
    D = z.shape[-1]
    return z.new_ones(D), z.new_zeros(D)


def ttt_layer_norm(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    return torch.addcmul(beta, F.layer_norm(z, z.shape[-1:], *_unit_affine(z), eps=eps), gamma)


def rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """The official RoPE, literally: permute_qk, rotate_half with cat(freqs, freqs), undo_permute_qk.

    q, k: (B, L, H, D); positions: (L,) already taken modulo mini_batch_size.
    """
    d = q.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=q.device) / d))
    freqs = positions.to(torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(q.dtype)[:, None, :], emb.sin().to(q.dtype)[:, None, :]

    def one(x):
        shp = x.shape
        x = x.reshape(*shp[:-1], d // 2, 2).transpose(-1, -2).reshape(shp)  # permute_qk
        rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)  # rotate_half
        x = x * cos + rot * sin
        return x.reshape(*shp[:-1], 2, d // 2).transpose(-1, -2).reshape(shp)  # undo_permute_qk

    return one(q), one(k)


def _rope_factors(positions: torch.Tensor, d: int, theta: float, device) -> torch.Tensor:
    """exp(i * pos * theta^(-2j/d)) as a complex (L, 1, d/2) tensor (computed in float64)."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    ang = positions.to(device=device, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.polar(torch.ones_like(ang), ang)[:, None, :]


def rope_real(q: torch.Tensor, k: torch.Tensor, rot: torch.Tensor):
    """``rope_fast`` in real arithmetic: (x0 c - x1 s, x0 s + x1 c) per pair. What a compiled forward uses:
    inductor has no complex kernels, so the complex product would run eagerly between two compiled
    graphs, while these few products fuse with the ops around them (TTT-Linear L 10 mbs 10 compiled,
    forward + backward, 4 runs each: 3.01-3.52x the official layer against 3.00-3.12x complex)."""
    c, s = (t.to(q.dtype) for t in (rot.real, rot.imag))

    def one(x):
        shp = x.shape
        xp = x.reshape(*shp[:-1], shp[-1] // 2, 2)
        x0, x1 = xp[..., 0], xp[..., 1]
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).reshape(shp)

    return one(q), one(k)


def rope_fast(q: torch.Tensor, k: torch.Tensor, rot: torch.Tensor):
    """RoPE on interleaved pairs (x_2j, x_2j+1) -- identical to ``rope_reference`` -- as one complex product."""
    ctype = torch.complex128 if q.dtype == torch.float64 else torch.complex64
    # rot (L, 1, D/2) made whole over the heads (small): broadcast over B only, the product runs over (L, H, D/2)
    # as one contiguous run instead of runs of D/2 (B 128, L 50, H 2, D 32, CPU: 47 against 194 us, equal bits)
    rot = rot.to(ctype).expand(*q.shape[-3:-1], q.shape[-1] // 2).contiguous()

    def one(x):
        # there is no bfloat16 complex type: a bf16 q/k (CUDA autocast) rotates in float32 and comes back bf16
        shp, dt = x.shape, x.dtype
        xf = x if dt in (torch.float32, torch.float64) else x.float()
        xc = torch.view_as_complex(xf.reshape(*shp[:-1], shp[-1] // 2, 2).contiguous())
        return torch.view_as_real(xc * rot).reshape(shp).to(dt)

    return one(q), one(k)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _causal_depthwise(conv: nn.Conv1d, x: torch.Tensor, tail: torch.Tensor | None):
    """Causal depthwise conv of x (B, L, C) continuing after ``tail`` (B, k-1, C) (zeros if None).

    Returns (y (B, L, C), new tail)."""
    k = conv.kernel_size[0]
    b, L, c = x.shape
    if tail is None:
        tail = x.new_zeros(b, k - 1, c)
    full = torch.cat([tail.to(x.dtype), x], 1)
    y = F.conv1d(full.transpose(1, 2), conv.weight, conv.bias, groups=c).transpose(1, 2)
    return y, full[:, full.shape[1] - (k - 1):]


# --------------------------------------------------------------------------------------------------
# the plain reference
# --------------------------------------------------------------------------------------------------
def _inner_apply(kind: str, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """f(x; W) for one token per (batch, head): x (B, H, D) -> (B, H, D)."""
    z = torch.einsum("bhi,bhij->bhj", x, p["W1"]) + p["b1"][:, :, 0]
    if kind == "linear":
        return z
    return torch.einsum("bhi,bhij->bhj", gelu_tanh(z), p["W2"]) + p["b2"][:, :, 0]


def _plain_ln(z, gamma, beta, eps=LN_EPS):
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return gamma * (z - mu) / torch.sqrt(var + eps) + beta


def ttt_reference(kind: str, q, k, v, lr, tok, params: dict[str, torch.Tensor], gamma, beta,
                  mini_batch_size: int):
    """Plain TTT scan. q, k, v: (B, L, H, D) (RoPE applied); lr: (B, L, H); tok: (mini_batch_size,)
    token factors (clamped); params: inner weights with a leading (B, H) (W1 (B,H,D,F), b1 (B,H,1,F)...);
    gamma/beta: (H, D). Returns (z (B, L, H, D), params after the last mini-batch)."""
    outer_grad = torch.is_grad_enabled()
    names = list(params)
    B, L, H, D = q.shape
    outs = []
    with torch.enable_grad():
        # under no_grad (evaluation) a view of a parameter still says requires_grad but is in no graph:
        # start from fresh leaves there, and only keep the outer graph when there is one
        p = {n: (t if outer_grad and t.requires_grad else t.detach().requires_grad_(True)) for n, t in params.items()}
        for start in range(0, L, mini_batch_size):
            stop = min(start + mini_batch_size, L)
            grads = []  # eta_j * grad l_j(W0), token by token
            for t in range(start, stop):
                target = v[:, t] - k[:, t]
                loss = 0.5 * ((_plain_ln(_inner_apply(kind, k[:, t], p), gamma, beta) - target) ** 2).sum()
                g = torch.autograd.grad(loss, [p[n] for n in names], create_graph=True)
                e = lr[:, t].reshape(B, H, *([1] * (p[names[0]].dim() - 2)))
                grads.append({n: e * gi for n, gi in zip(names, g)})
            run = {n: torch.zeros_like(p[n]) for n in names}
            for i, t in enumerate(range(start, stop)):
                run = {n: run[n] + grads[i][n] for n in names}
                w_i = {n: p[n] - tok[i] * run[n] for n in names}
                outs.append(q[:, t] + _plain_ln(_inner_apply(kind, q[:, t], w_i), gamma, beta))
            p = w_i  # the last token's weights start the next mini-batch
        z = torch.stack(outs, 1)
    if not outer_grad:
        z, p = z.detach(), {n: t.detach() for n, t in p.items()}
    return z, p


# --------------------------------------------------------------------------------------------------
# the fast path
# --------------------------------------------------------------------------------------------------
def _to_chunks(t: torch.Tensor, n_chunks: int, S: int) -> torch.Tensor:
    """(B, L, H, D) -> (n_chunks, H*B, S, D), zero-padded at the end. Rows are head-major (row h B + b), so
    that one head's rows of a chunk are one (B S, D) matrix: weights shared by every row (the layer's own,
    at the sequence start) then multiply them in one GEMM per head."""
    B, L, H, D = t.shape
    if n_chunks * S != L:
        t = F.pad(t, (0, 0, 0, 0, 0, n_chunks * S - L))
    return t.reshape(B, n_chunks, S, H, D).permute(1, 3, 0, 2, 4).reshape(n_chunks, H * B, S, D)


def _from_chunks(t: torch.Tensor, B: int, H: int, L: int) -> torch.Tensor:
    n, _, S, D = t.shape
    return t.reshape(n, H, B, S, D).permute(2, 0, 3, 1, 4).reshape(B, n * S, H, D)[:, :L]


class _ToChunksAndTail(torch.autograd.Function):
    """(B, L, H, D) -> the whole chunks (nc, H B, S, D) of its first nc S positions and the rest as one
    short chunk (1, H B, L - nc S, D), rows head-major as ``_to_chunks``. One permuting copy each way: a
    split's backward would be a cat of the two gradients, and a slice's a zero-filled (B, L, H, D) each."""

    @staticmethod
    def forward(ctx, t, nc, S):
        B, L, H, D = t.shape
        ctx.nc, ctx.S, ctx.shape = nc, S, t.shape
        cut = nc * S
        main = t[:, :cut].reshape(B, nc, S, H, D).permute(1, 3, 0, 2, 4).reshape(nc, H * B, S, D)
        tail = t[:, cut:].reshape(B, 1, L - cut, H, D).permute(1, 3, 0, 2, 4).reshape(1, H * B, L - cut, D)
        return main, tail

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dmain, dtail):
        nc, S, (B, L, H, D) = ctx.nc, ctx.S, ctx.shape
        cut = nc * S
        dt = dmain.new_zeros(ctx.shape) if dmain is None or dtail is None else dmain.new_empty(ctx.shape)
        if dmain is not None:
            dt[:, :cut].view(B, nc, S, H, D).copy_(dmain.view(nc, H, B, S, D).permute(2, 0, 3, 1, 4))
        if dtail is not None:
            dt[:, cut:].view(B, 1, L - cut, H, D).copy_(dtail.view(1, H, B, L - cut, D).permute(2, 0, 3, 1, 4))
        return dt, None, None


class _FromChunksAndTail(torch.autograd.Function):
    """The inverse of ``_ToChunksAndTail``: whole chunks (nc, H B, S, D) and a short one (1, H B, r, D) ->
    (B, nc S + r, H, D), contiguous, with no cat forward nor split backward."""

    @staticmethod
    def forward(ctx, main, tail, B, H):
        nc, _, S, D = main.shape
        r = tail.shape[2]
        out = main.new_empty(B, nc * S + r, H, D)
        out[:, :nc * S].view(B, nc, S, H, D).copy_(main.view(nc, H, B, S, D).permute(2, 0, 3, 1, 4))
        out[:, nc * S:].view(B, 1, r, H, D).copy_(tail.view(1, H, B, r, D).permute(2, 0, 3, 1, 4))
        ctx.dims = nc, S, r, H
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d):
        nc, S, r, H = ctx.dims
        B, _, _, D = d.shape
        cut = nc * S
        dmain = d[:, :cut].reshape(B, nc, S, H, D).permute(1, 3, 0, 2, 4).reshape(nc, H * B, S, D)
        dtail = d[:, cut:].reshape(B, 1, r, H, D).permute(1, 3, 0, 2, 4).reshape(1, H * B, r, D)
        return dmain, dtail, None, None


def _dual_coefs(qc, kc, lrc, tokd, K: int, g: int):
    """The W-independent coefficients of chunks (n, BH, S, D) of g mini-batches of K tokens (a chunk shorter
    than g K has a short last mini-batch): P = (Q K^T + 1) coef, M (None when g == 1), coef, e. Tm[t, s]: tok
    of t for s <= t in t's mini-batch, tok_last for s in an earlier mini-batch of the chunk, 0 otherwise;
    the update of W at the chunk end uses e = tok_last * lr."""
    n, BH, S, _ = kc.shape
    dev, dt = kc.device, kc.dtype
    pos = torch.arange(S, device=dev)
    mb, inmb = pos // K, pos % K
    same = (mb[:, None] == mb[None, :]) & (pos[None, :] <= pos[:, None])
    cross = mb[None, :] < mb[:, None]
    tok_last = tokd[K - 1]
    Tm = torch.where(same, _tok_at_positions(tokd, inmb, S)[:, None], torch.zeros((), dtype=dt, device=dev))
    if g > 1:
        Tm = Tm + cross.to(dt) * tok_last
    coef = Tm * lrc.transpose(-1, -2)  # (n, BH, S, S)
    e = tok_last * lrc  # (n, BH, S, 1)
    flat = lambda t: t.reshape(n * BH, *t.shape[2:])  # noqa: E731
    P = (torch.bmm(flat(qc), flat(kc).transpose(1, 2)).view(n, BH, S, S) + 1.0) * coef
    M = None
    if g > 1:
        KK = torch.bmm(flat(kc), flat(kc).transpose(1, 2)).view(n, BH, S, S)
        M = (KK + 1.0) * (cross.to(dt) * e.transpose(-1, -2))
    return P, M, coef, e


# --------------------------------------------------------------------------------------------------
# hand-written forward/backward of one chunk of the TTT-MLP scan (no autograd inside)
# --------------------------------------------------------------------------------------------------
_GELU_A = 0.044715


def _gelu_t(z):
    """tanh(c (z + a z^3)), the shared part of the tanh-GELU and its derivatives, as 2 sigmoid(2 u) - 1:
    torch's CPU tanh is ~9x slower than its sigmoid (256 x 16 x 128 floats, 1 thread: 1,061 against 121
    us; the whole form 262 us). Absolute error ~1e-7 in float32 (~1e-16 in float64), where t enters
    GELU and its derivatives only as 1 + t and 1 - t^2."""
    u = (z * z * (2 * _GELU_A * _GELU_C) + 2 * _GELU_C).mul_(z)
    return torch.sigmoid_(u).mul_(2.0).sub_(1.0)


def _gelu_from_t(z, t):
    return (t + 1.0).mul_(z).mul_(0.5)


def _gelu_p(z, t):
    """gelu'(z) = 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 a z^2)."""
    up = (z * z).mul_(3 * _GELU_A * _GELU_C).add_(_GELU_C)
    return (1.0 - t * t).mul_(up).mul_(z).add_(t).add_(1.0).mul_(0.5)


def _gelu_pp(z, t):
    """gelu''(z) = (1 - t^2) (u' + 3 a c z^2 - z t u'^2), u' = c (1 + 3 a z^2)."""
    zz = z * z
    up = zz * (3 * _GELU_A * _GELU_C) + _GELU_C
    inner = (up * up).mul_(t).mul_(z).neg_().add_(up).add_(zz.mul_(3 * _GELU_A * _GELU_C))
    return (1.0 - t * t).mul_(inner)


def _lnl2_fwd(z, gam2, gt, eps=LN_EPS):
    """``ln_l2_grad`` that also returns what its backward needs (xh, rstd, gxl)."""
    xh, _, rstd, gxl = _lnl2_stats(z, gam2, gt, eps)
    return _lnl2_from_stats(xh, rstd, gxl), xh, rstd, gxl


def _lnl2_bwd(a, G, xh, rstd, gxl, gam2):
    """VJP of G = ln_l2_grad(z) (with gam2 = gamma^2, gt = gamma (target - beta)): returns dz, dgt, dgam2 rows."""
    ap = a * rstd
    A2 = (ap * xh).mean(-1, keepdim=True)
    m2 = (gxl * xh).mean(-1, keepdim=True)
    dgxl = ap - ap.mean(-1, keepdim=True) - xh * A2
    dxh = gam2 * dgxl - ap * m2 - gxl * A2
    aG = (a * G).mean(-1, keepdim=True)
    dz = dxh - dxh.mean(-1, keepdim=True) - xh * ((dxh * xh).mean(-1, keepdim=True) + aG)
    return dz.mul_(rstd), dgxl.neg(), xh * dgxl


_ln_bwd = torch.ops.aten.native_layer_norm_backward  # LN's input-gradient: rstd (g - mean(g) - xh mean(g xh))


def _lnl2_stats(z, gam2, gt, eps=LN_EPS):
    """What ``ln_l2_grad`` and its VJP read, for many rows at once: xh, mean, rstd, gxl = gam2 xh - gt."""
    mean = z.mean(-1, keepdim=True)
    xc = z - mean
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True).add_(eps))
    xh = xc.mul_(rstd)
    return xh, mean, rstd, (gam2 * xh).sub_(gt)


def _lnl2_from_stats(xh, rstd, gxl):
    """G = ln_l2_grad(z) from its statistics: LN's backward applied to gxl."""
    return (gxl - gxl.mean(-1, keepdim=True) - xh * (gxl * xh).mean(-1, keepdim=True)).mul_(rstd)


def _lnl2_grad_rows(z, gam2, ngt, eps=LN_EPS):
    """G = ln_l2_grad(z) for the few rows of one mini-batch inside the sequential loop (ngt = -gt). G is
    LN's own backward applied to gxl, so for 1-2 rows two native LN calls replace ~15 small ops (32 -> 19
    us at 256 x 1 x 32); from ~5 rows on, the plain formula is faster on CPU."""
    if z.shape[1] > 2:
        return _lnl2_fwd(z, gam2, ngt.neg(), eps)[0]
    D = z.shape[-1]
    xh, mean, rstd = torch.native_layer_norm(z, [D], *_unit_affine(z), eps)
    return _ln_bwd(torch.addcmul(ngt, gam2, xh), z, [D], mean, rstd, None, None, [True, False, False])[0]


def _lnl2_vjp(a, z, G, xh, mean, rstd, gxl, m2, gam2):
    """dz and dgxl of the VJP of G = ln_l2_grad(z) with upstream ``a`` (m2 = mean(gxl xh); mean and rstd
    contiguous, see below); the rows' dgt (-dgxl) and dgam2 (xh dgxl) are left to the caller, vectorised.
    dgxl and the bulk of dz are LN's backward (native, one call each): 1.7x faster than ``_lnl2_bwd`` at
    1-16 rows of 256 x 32."""
    D = a.shape[-1]
    dgxl = _ln_bwd(a, z, [D], mean, rstd, None, None, [True, False, False])[0]
    ap = a * rstd
    A2 = (ap * xh).mean(-1, keepdim=True)
    dxh = torch.addcmul(torch.addcmul(gam2 * dgxl, ap, m2, value=-1.0), gxl, A2, value=-1.0)
    aG = (a * G).mean(-1, keepdim=True).mul_(rstd)
    dz = _ln_bwd(dxh, z, [D], mean, rstd, None, None, [True, False, False])[0].addcmul_(xh, aG, value=-1.0)
    return dz, dgxl


def _lnl2_in_c(z, gam2, gt) -> bool:
    """Whether _LNL2Grad runs in C: the kernels installed and applying (CPU, dtype, D), no compiler, gt of z's shape
    and gam2 one row per leading index of z (H, 1, ..., D) or one row for all."""
    if _KERNELS is None or torch.compiler.is_compiling() or not _KERNELS.ttt_dual_applies(z):
        return False
    d = z.shape[-1]
    return (gt.shape == z.shape and gam2.dtype == z.dtype and gam2.shape[-1] == d and gam2.dim() == z.dim()
            and all(n == 1 for n in gam2.shape[1:-1]) and gam2.shape[0] in (1, z.shape[0]))


class _LNL2Grad(torch.autograd.Function):
    """G = ln_l2_grad(z) over contiguous rows (gam2 = gamma^2 and gt = gamma (target - beta) broadcast to
    z), with the VJP of ``_lnl2_vjp`` (native LN backward for the bulk): autograd of ``ln_l2_grad`` records
    ~12 elementwise passes forward and ~25 backward. ``ln_l2_grad`` is the reference."""

    @staticmethod
    def forward(ctx, z, gam2, gt):
        z = z.contiguous()
        ctx.gt_shape = gt.shape
        ctx.c = _lnl2_in_c(z, gam2, gt)
        if ctx.c:  # G and its VJP in C, one pass over the rows each (the harness's kernels)
            gam2 = gam2.contiguous()
            G, xh, rstd, gxl = _KERNELS.lnl2_forward(z, gam2, gt.contiguous(), LN_EPS)
            ctx.save_for_backward(G, xh, rstd, gxl, gam2)
            return G
        xh, mean, rstd, gxl = _lnl2_stats(z, gam2, gt)
        G = _lnl2_from_stats(xh, rstd, gxl)
        ctx.save_for_backward(z, G, xh, mean, rstd, gxl, gam2)
        return G

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, a):
        if ctx.c:
            G, xh, rstd, gxl, gam2 = ctx.saved_tensors
            dz, dgt, dgam2 = _KERNELS.lnl2_vjp(a.contiguous(), G, xh, rstd, gxl, gam2)
            return dz, dgam2, dgt.sum_to_size(ctx.gt_shape)
        z, G, xh, mean, rstd, gxl, gam2 = ctx.saved_tensors
        m2 = (gxl * xh).mean(-1, keepdim=True)
        dz, dgxl = _lnl2_vjp(a.contiguous(), z, G, xh, mean, rstd, gxl, m2, gam2)
        dgam2 = (xh * dgxl).sum_to_size(gam2.shape)
        return dz, dgam2, dgxl.neg().sum_to_size(ctx.gt_shape)


def _acc_bmm_(out, a, b, alpha=1.0):
    """out += alpha * a @ b in place; strided outputs (row slices) go through a temporary, since an in-place
    baddbmm_ into a non-contiguous tensor falls back to one small matmul per batch entry."""
    if out.is_contiguous():
        return out.baddbmm_(a, b, alpha=alpha)
    return out.add_(torch.bmm(a, b), alpha=alpha)


def _rows_times(a, b):
    """a @ b for a (BH, K, E), b (BH, E, D). With one row (mini-batches of one token) a broadcast product
    and a sum: bmm runs one tiny gemm per batch entry, 1.6-2.2x slower at BH 256, E 4-7, D 32 on CPU."""
    if a.shape[1] == 1:
        return (a.transpose(1, 2) * b).sum(1, keepdim=True)
    return torch.bmm(a, b)


def _acc_rows_t_(out, a, b, alpha=1.0):
    """out += alpha * a^T @ b in place, a (BH, K, E), b (BH, K, D). With K = 1 an outer product: one
    in-place addcmul_ instead of a per-entry bmm into a temporary (6-9x faster at the sizes above)."""
    if a.shape[1] == 1:
        return out.addcmul_(a.transpose(1, 2), b, value=alpha)
    return _acc_bmm_(out, a.transpose(1, 2), b, alpha=alpha)


class _MLPChunk(torch.autograd.Function):
    """One chunk (g mini-batches of K tokens, S = g K) of the TTT-MLP scan, per (batch, head) row.

    Inputs: kq (BH, 2S, D) keys then queries; W1 (BH, D, F), b1 (BH, 1, F), W2 (BH, F, D), b2 (BH, 1, D)
    at the chunk start; gt = gamma (target - beta) (BH, S, D); gam2 = gamma^2 (BH, 1, D); P, coef
    (BH, S, S): Q-side dual coefficients (P already times Q.K + 1); M (BH, S, S): K-side coefficients
    for earlier mini-batches of the chunk (None when g == 1); eT (BH, 1, S): tok_last * lr.
    Returns the pre-norm Q-side output (BH, S, D) and, when ``upd``, the weights after the chunk."""

    @staticmethod
    def forward(ctx, kq, W1, b1, W2, b2, gt, gam2, P, coef, M, eT, K, g, upd):
        S = kq.shape[1] // 2
        # one mini-batch per chunk (the default scan): the whole chunk per (row, head) block in C, its intermediates
        # in cache (the harness's kernels; the code below is the reference)
        ctx.c = (g == 1 and M is None and _KERNELS is not None and not torch.compiler.is_compiling()
                 and _KERNELS.mlp_chunk_applies(kq, kq.shape[-1], W1.shape[-1]))
        if ctx.c:
            ins = [t.contiguous() for t in (kq, W1, b1, W2, b2, gt, gam2, P, coef, eT)]
            ctx.upd = upd  # the C backward reads no K or g
            ctx.save_for_backward(*ins)
            return _KERNELS.mlp_chunk_forward(*ins, upd, LN_EPS)
        Z1 = torch.baddbmm(b1, kq, W1)
        z1, Z1q = Z1[:, :S], Z1[:, S:]
        W2t = W2.transpose(1, 2)
        if g == 1:
            t1 = _gelu_t(z1)
            X2 = _gelu_from_t(z1, t1)
            G2, xh, rstd, gxl = _lnl2_fwd(torch.baddbmm(b2, X2, W2), gam2, gt)
            gx = torch.bmm(G2, W2t)
            G1 = gx * _gelu_p(z1, t1)
        else:
            BH, F, D = W1.shape[0], W1.shape[2], W2.shape[2]
            t1, X2, gx, G1 = (torch.empty_like(z1) for _ in range(4))
            G2, xh, gxl = (torch.empty_like(gt) for _ in range(3))
            rstd = gt.new_empty(BH, S, 1)
            for m in range(g):
                R, E = slice(m * K, (m + 1) * K), m * K
                z1R = z1[:, R]
                if m:
                    z1R.sub_(_rows_times(M[:, R, :E], G1[:, :E]))
                t = _gelu_t(z1R)
                t1[:, R] = t
                x2 = _gelu_from_t(z1R, t)
                X2[:, R] = x2
                z2 = torch.baddbmm(b2, x2, W2)
                ee = eT[:, :, :E]
                if m:
                    Y = torch.bmm(x2, X2[:, :E].transpose(1, 2)).add_(1.0).mul_(ee)
                    _acc_bmm_(z2, Y, G2[:, :E], alpha=-1.0)
                g2, xh[:, R], rstd[:, R], gxl[:, R] = _lnl2_fwd(z2, gam2, gt[:, R])
                G2[:, R] = g2
                gxR = torch.bmm(g2, W2t)
                if m:
                    U = torch.bmm(g2, G2[:, :E].transpose(1, 2)).mul_(ee)
                    _acc_bmm_(gxR, U, X2[:, :E], alpha=-1.0)
                gx[:, R] = gxR
                G1[:, R] = gxR * _gelu_p(z1R, t)
        _acc_bmm_(Z1q, P, G1, alpha=-1.0)
        tq = _gelu_t(Z1q)
        X2q = _gelu_from_t(Z1q, tq)
        Y2 = torch.bmm(X2q, X2.transpose(1, 2)).add_(1.0)
        Zq = torch.baddbmm(b2, X2q, W2).baddbmm_(Y2 * coef, G2, alpha=-1.0)
        ctx.K, ctx.g, ctx.upd = K, g, upd
        ctx.save_for_backward(kq, W1, W2, gam2, P, coef, M, eT, z1, t1, X2, G1, G2, gx, xh, rstd, gxl,
                              Z1q, tq, X2q, Y2)
        if not upd:
            return Zq
        e = eT.transpose(1, 2)
        eG1, eG2 = e * G1, e * G2
        W1n = torch.baddbmm(W1, kq[:, :S].transpose(1, 2), eG1, alpha=-1.0)
        W2n = torch.baddbmm(W2, X2.transpose(1, 2), eG2, alpha=-1.0)
        return Zq, W1n, b1 - eG1.sum(1, keepdim=True), W2n, b2 - eG2.sum(1, keepdim=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dZq, dW1n=None, db1n=None, dW2n=None, db2n=None):
        if ctx.c:
            ins = ctx.saved_tensors
            dnew = None
            if ctx.upd and any(t is not None for t in (dW1n, db1n, dW2n, db2n)):
                dnew = [torch.zeros_like(w) if t is None else t for t, w in zip((dW1n, db1n, dW2n, db2n), ins[1:5])]
            if dZq is None:
                dZq = torch.zeros_like(ins[5])
            dkq, dW1, db1, dW2, db2, dgt, dgam2, dP, dcoef, deT = _KERNELS.mlp_chunk_backward(*ins, dZq, dnew, LN_EPS)
            return dkq, dW1, db1, dW2, db2, dgt, dgam2, dP, dcoef, None, deT, None, None, None
        (kq, W1, W2, gam2, P, coef, M, eT, z1, t1, X2, G1, G2, gx, xh, rstd, gxl,
         Z1q, tq, X2q, Y2) = ctx.saved_tensors
        K, g = ctx.K, ctx.g
        S = kq.shape[1] // 2
        kc = kq[:, :S]
        e = eT.transpose(1, 2)
        W2t = W2.transpose(1, 2)
        if dZq is None:
            dZq = torch.zeros_like(G2)
        # ---- weight updates at the chunk end
        if ctx.upd and any(t is not None for t in (dW1n, db1n, dW2n, db2n)):
            dW1n = torch.zeros_like(W1) if dW1n is None else dW1n
            dW2n = torch.zeros_like(W2) if dW2n is None else dW2n
            db1n = W1.new_zeros(W1.shape[0], 1, W1.shape[2]) if db1n is None else db1n
            db2n = W2.new_zeros(W2.shape[0], 1, W2.shape[2]) if db2n is None else db2n
            dEG1 = torch.bmm(kc, dW1n).add_(db1n).neg_()  # d(e G1)
            dEG2 = torch.bmm(X2, dW2n).add_(db2n).neg_()
            dG1 = dEG1 * e
            dG2 = dEG2 * e
            de = (G1 * dEG1).sum(-1, keepdim=True) + (G2 * dEG2).sum(-1, keepdim=True)
            dK = torch.bmm(e * G1, dW1n.transpose(1, 2)).neg_()
            dX2 = torch.bmm(e * G2, dW2n.transpose(1, 2)).neg_()
            dW1, db1, dW2, db2 = dW1n.clone(), db1n.clone(), dW2n.clone(), db2n.clone()
        else:
            dG1, dX2 = torch.zeros_like(G1), torch.zeros_like(X2)
            dG2 = torch.zeros_like(G2)
            de = G2.new_zeros(G2.shape[0], S, 1)
            dK = None
            dW1 = dW2 = db1 = db2 = None
        # ---- Zq = X2q W2 + b2 - (Y2 * coef) G2
        dX2q = torch.bmm(dZq, W2t)
        dW2q = torch.bmm(X2q.transpose(1, 2), dZq)
        dW2 = dW2q if dW2 is None else dW2.add_(dW2q)
        db2q = dZq.sum(1, keepdim=True)
        db2 = db2q if db2 is None else db2.add_(db2q)
        dA2 = torch.bmm(dZq, G2.transpose(1, 2)).neg_()
        _acc_bmm_(dG2, (Y2 * coef).transpose(1, 2), dZq, alpha=-1.0)
        dcoef = dA2 * Y2
        dT = dA2.mul_(coef)
        _acc_bmm_(dX2q, dT, X2)
        _acc_bmm_(dX2, dT.transpose(1, 2), X2q)
        # ---- X2q = gelu(Z1q), Z1q = Q W1 + b1 - P G1
        # (no out= into slices of one [K; Q] buffer: torch.compile cannot trace that, and it then runs
        # the whole chunk eagerly instead of fusing its elementwise passes; the two halves meet in a cat)
        dZ1q = dX2q * _gelu_p(Z1q, tq)
        dP = torch.bmm(dZ1q, G1.transpose(1, 2)).neg_()
        _acc_bmm_(dG1, P.transpose(1, 2), dZ1q, alpha=-1.0)
        # ---- the K side, mini-batch by mini-batch in reverse
        dgt = torch.empty_like(G2)
        dgam2 = torch.zeros_like(gam2)
        if g == 1:
            gp = _gelu_p(z1, t1)
            dgx = dG1 * gp
            dz1 = (dG1 * gx).mul_(_gelu_pp(z1, t1))
            _acc_bmm_(dG2, dgx, W2)
            dz2, dgt, dgam2r = _lnl2_bwd(dG2, G2, xh, rstd, gxl, gam2)
            dgam2 = dgam2r.sum(1, keepdim=True)
            _acc_bmm_(dX2, dz2, W2t)
            dz1.addcmul_(dX2, gp)
            dGX, dZ2 = dgx, dz2
            dM = None
        else:
            dGX, dZ2, dz1 = torch.empty_like(G1), torch.empty_like(G2), torch.empty_like(z1)
            dM = torch.zeros_like(M)
            for m in reversed(range(g)):
                R, E = slice(m * K, (m + 1) * K), m * K
                z1R, tR = z1[:, R], t1[:, R]
                gp = _gelu_p(z1R, tR)
                dG1R = dG1[:, R]
                dgx = dG1R * gp
                dGX[:, R] = dgx
                dz1[:, R] = (dG1R * gx[:, R]).mul_(_gelu_pp(z1R, tR))
                dG2R = dG2[:, R]
                _acc_bmm_(dG2R, dgx, W2)
                g2, x2 = G2[:, R], X2[:, R]
                if m:
                    ee = eT[:, :, :E]
                    G2E, X2E, G1E = G2[:, :E], X2[:, :E], G1[:, :E]
                    U = torch.bmm(g2, G2E.transpose(1, 2))
                    dUe = torch.bmm(dgx, X2E.transpose(1, 2)).neg_()
                    _acc_bmm_(dX2[:, :E], (U * ee).transpose(1, 2), dgx, alpha=-1.0)
                    deE = (dUe * U).sum(1, keepdim=True)
                    dU = dUe.mul_(ee)
                    _acc_bmm_(dG2R, dU, G2E)
                    _acc_bmm_(dG2[:, :E], dU.transpose(1, 2), g2)
                dz2, dgt[:, R], dgam2r = _lnl2_bwd(dG2R, g2, xh[:, R], rstd[:, R], gxl[:, R], gam2)
                dgam2.add_(dgam2r.sum(1, keepdim=True))
                dZ2[:, R] = dz2
                dX2R = dX2[:, R]
                _acc_bmm_(dX2R, dz2, W2t)
                if m:
                    Y = torch.bmm(x2, X2E.transpose(1, 2)).add_(1.0)
                    dYe = torch.bmm(dz2, G2E.transpose(1, 2)).neg_()
                    _acc_bmm_(dG2[:, :E], (Y * ee).transpose(1, 2), dz2, alpha=-1.0)
                    deE.add_((dYe * Y).sum(1, keepdim=True))
                    dY = dYe.mul_(ee)
                    _acc_bmm_(dX2R, dY, X2E)
                    _acc_bmm_(dX2[:, :E], dY.transpose(1, 2), x2)
                    de[:, :E].add_(deE.transpose(1, 2))
                dz1R = dz1[:, R]
                dz1R.addcmul_(dX2R, gp)
                if m:
                    dM[:, R, :E] = torch.bmm(dz1R, G1E.transpose(1, 2)).neg_()
                    _acc_rows_t_(dG1[:, :E], M[:, R, :E], dz1R, alpha=-1.0)
        # ---- W2 through the K side (batched over the chunk), then Z1 = [K; Q] W1 + b1
        dW2k = torch.bmm(dGX.transpose(1, 2), G2).baddbmm_(X2.transpose(1, 2), dZ2)
        dW2 = dW2.add_(dW2k)
        db2 = db2.add_(dZ2.sum(1, keepdim=True))
        dZ1 = torch.cat([dz1, dZ1q], 1)
        dW1z = torch.bmm(kq.transpose(1, 2), dZ1)
        dW1 = dW1z if dW1 is None else dW1.add_(dW1z)
        db1z = dZ1.sum(1, keepdim=True)
        db1 = db1z if db1 is None else db1.add_(db1z)
        dkq = torch.bmm(dZ1, W1.transpose(1, 2))
        if dK is not None:
            dkq[:, :S].add_(dK)
        return (dkq, dW1, db1, dW2, db2, dgt, dgam2, dP, dcoef, dM, de.transpose(1, 2), None, None, None)


def _at(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if t is None else t[i]


def _linear_chunks_backward_fast(ctx, dZq, kc, qc, gam2, P, e):
    """``_LinearChunks``' backward for one chunk of one mini-batch (ctx.fast): the dual form's products with P
    and G and the inner layer norm's VJP in C (kernels.ttt_dual_backward), the weights' products in BLAS."""
    nc, BH, S, D = kc.shape
    W, G = ctx.Ws[0], ctx.Gs[0]
    H = W.shape[0]
    shared = H != BH
    xh, rstd, gxl = ctx.lnl2[0]
    dZq = kc.new_zeros(nc, BH, S, D) if dZq is None else dZq.contiguous()
    dk, dq, dgt, dP = torch.empty_like(kc), torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(P)
    dZc = dZq[0]
    dZk, dgam2 = _KERNELS.ttt_dual_backward(dZc, P[0], G, xh, rstd, gxl, gam2, dP[0], dgt[0])
    hv = (lambda t: t.view(H, -1, t.shape[-1])) if shared else (lambda t: t)  # noqa: E731
    # Zq = Q W + b - P G and Zk = K W + b: the weights' gradients and the rows' through W
    torch.bmm(hv(dZc), W.transpose(1, 2), out=hv(dq[0]))
    dW = torch.bmm(hv(qc[0]).transpose(1, 2), hv(dZc)).baddbmm_(hv(kc[0]).transpose(1, 2), hv(dZk))
    db = hv(dZc).sum(1, keepdim=True).add_(hv(dZk).sum(1, keepdim=True))
    torch.bmm(hv(dZk), W.transpose(1, 2), out=hv(dk[0]))
    return (dk, dq, dW, db, dgt, dgam2, dP, None, torch.zeros_like(e), None, None, None) + (None,) * 6


class _LinearChunks(torch.autograd.Function):
    """The whole TTT-Linear scan over ``nc`` chunks (g mini-batches of K tokens, S = g K), per (batch, head)
    row, with a hand-written backward: autograd would record ~15 small ops per chunk and materialise
    zero-filled gradients for every chunk view; here the backward is one reverse sweep.

    Inputs: kc, qc (nc, BH, S, D) keys and queries; W0 (BH, D, D), b0 (BH, 1, D) at the sequence start,
    or W0 (H, D, D), b0 (H, 1, D) shared by every row (rows head-major, BH = H B): then the first chunk's
    products with W0 are one (B S, D) x (D, D) GEMM per head instead of BH tiny ones, and W0 is never
    copied per row (L 10 mbs 10, B 128, H 2, D 32, CPU: 1.75x -> 1.99x the official layer, eager);
    gt = gamma (target - beta) (nc, BH, S, D); gam2 = gamma^2 (BH, 1, D); P (nc, BH, S, S) the Q-side dual
    coefficients (already times Q.K + 1); M (nc, BH, S, S) the K-side coefficients of earlier mini-batches
    of the chunk (None when g == 1); e (nc, BH, S, 1) = tok_last * lr. Optionally a ragged tail after the
    whole chunks: kt, qt, gtt, Pt, Mt, et, the same with one chunk of r < S rows (Mt None when r <= K), so
    that no padded row is ever computed. Returns the pre-norm Q-side output (nc, BH, S, D), then the tail's
    (1, BH, r, D) when there is one, then with ``need_state`` (no tail) the weights after the last chunk."""

    @staticmethod
    def forward(ctx, kc, qc, W0, b0, gt, gam2, P, M, e, K, g, need_state, kt=None, qt=None, gtt=None, Pt=None,
                Mt=None, et=None):
        nc, BH, S, D = kc.shape
        tail = kt is not None
        if need_state and tail:
            raise ValueError("need_state requires whole chunks")
        H = W0.shape[0]
        shared = H != BH
        Zq = kc.new_empty(nc, BH, S, D)
        Zt = kt.new_empty(kt.shape) if tail else None
        Ws, Gs, saved = [], [], []  # per chunk: weights at its start, G, what lnl2's backward needs
        W, b = W0, b0
        n = nc + tail
        # one chunk of one mini-batch (the study's window): the inner layer norm, G, P G and their backward in C
        # around the GEMMs (ML-1M study step, TTT4Rec: see _KERNELS); the loop below is the reference
        ctx.fast = (_KERNELS is not None and nc == 1 and not tail and g == 1 and not need_state and M is None
                    and not torch.compiler.is_compiling() and _KERNELS.ttt_dual_applies(kc))
        if ctx.fast:
            k_c, q_c = kc[0], qc[0]
            Zk = (torch.baddbmm(b, k_c.view(H, -1, D), W).view(BH, S, D) if shared
                  else torch.baddbmm(b, k_c, W))
            if shared:
                torch.baddbmm(b, q_c.view(H, -1, D), W, out=Zq[0].view(H, -1, D))
            else:
                torch.baddbmm(b, q_c, W, out=Zq[0])
            xh, rstd, gxl, G = _KERNELS.ttt_dual_forward(Zk, gam2, gt[0], P[0], Zq[0], LN_EPS)
            ctx.K, ctx.g, ctx.need_state, ctx.tail = K, g, need_state, tail
            # what the C backward reads (not Zk or the rows' means, which the loop's backward reads)
            ctx.Ws, ctx.Gs, ctx.lnl2 = [W], [G], [(xh, rstd, gxl)]
            ctx.save_for_backward(kc, qc, gam2, P, M, e, kt, qt, Pt, Mt, et)
            return Zq
        for c in range(n):
            if c < nc:
                k_c, q_c, gt_c, P_c, M_c, e_c, Z_c = (_at(t, c) for t in (kc, qc, gt, P, M, e, Zq))
                g_c = g
            else:
                k_c, q_c, gt_c, P_c, M_c, e_c, Z_c = (_at(t, 0) for t in (kt, qt, gtt, Pt, Mt, et, Zt))
                g_c = -(-kt.shape[2] // K)
            S_c = k_c.shape[1]
            Ws.append(W)
            heads = shared and c == 0  # W, b: (H, D, D), (H, 1, D); rows h B + b are head h's
            if heads:
                Zk = torch.baddbmm(b, k_c.view(H, -1, D), W).view(BH, S_c, D)
            else:
                Zk = torch.baddbmm(b, k_c, W)
            if g_c == 1:
                xh, mean, rstd, gxl = _lnl2_stats(Zk, gam2, gt_c)
                G = _lnl2_from_stats(xh, rstd, gxl)
            else:  # the mini-batches of the chunk one after the other, in dual form: only G is sequential
                G, ngt = torch.empty_like(Zk), gt_c.neg()
                for m in range(g_c):
                    R, E = slice(m * K, (m + 1) * K), m * K
                    z = Zk[:, R]
                    if m:  # Zk becomes the z of every row, in place (it is this loop's own tensor)
                        z.sub_(_rows_times(M_c[:, R, :E], G[:, :E]))
                    G[:, R] = _lnl2_grad_rows(z, gam2, ngt[:, R])
                xh, mean, rstd, gxl = _lnl2_stats(Zk, gam2, gt_c)  # what the backward reads, all rows at once
            saved.append((Zk, xh, mean, rstd, gxl))
            Gs.append(G)
            if heads:
                torch.baddbmm(b, q_c.view(H, -1, D), W, out=Z_c.view(H, -1, D))
                Z_c.baddbmm_(P_c, G, alpha=-1.0)
            else:
                torch.baddbmm(b, q_c, W, out=Z_c).baddbmm_(P_c, G, alpha=-1.0)
            if c < n - 1 or need_state:
                eG = e_c * G
                if heads:  # from here on every row has its own weights
                    W = torch.sub(W.unsqueeze(1), torch.bmm(k_c.transpose(1, 2), eG).view(H, -1, D, D)).view(BH, D, D)
                    b = torch.sub(b.unsqueeze(1), eG.sum(1, keepdim=True).view(H, -1, 1, D)).view(BH, 1, D)
                else:
                    W = torch.baddbmm(W, k_c.transpose(1, 2), eG, alpha=-1.0)
                    b = b - eG.sum(1, keepdim=True)
        ctx.K, ctx.g, ctx.need_state, ctx.tail = K, g, need_state, tail
        ctx.Ws, ctx.Gs, ctx.lnl2 = Ws, Gs, saved  # intermediates (not inputs/outputs): plain attributes
        ctx.save_for_backward(kc, qc, gam2, P, M, e, kt, qt, Pt, Mt, et)
        if need_state:
            return Zq, W, b
        return (Zq, Zt) if tail else Zq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dZq, *more):
        kc, qc, gam2, P, M, e, kt, qt, Pt, Mt, et = ctx.saved_tensors
        K, g, tail = ctx.K, ctx.g, ctx.tail
        if ctx.fast:
            return _linear_chunks_backward_fast(ctx, dZq, kc, qc, gam2, P, e)
        dZt = more[0] if tail else None
        dWn, dbn = (more[0], more[1]) if ctx.need_state else (None, None)
        nc, BH, S, D = kc.shape
        H = ctx.Ws[0].shape[0]
        shared = H != BH
        # an expanded incoming gradient (e.g. of a sum) would send every bmm below to a per-matrix loop
        dZq = kc.new_zeros(nc, BH, S, D) if dZq is None else dZq.contiguous()
        dk, dq, dgt = torch.empty_like(kc), torch.empty_like(qc), torch.empty_like(kc)
        dP = torch.empty_like(P)
        dM = torch.empty_like(M) if M is not None else None
        if tail:
            dZt = kt.new_zeros(kt.shape) if dZt is None else dZt.contiguous()
            dkt, dqt, dgtt, dPt = torch.empty_like(kt), torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(Pt)
            dMt = torch.empty_like(Mt) if Mt is not None else None
            det = torch.zeros_like(et)
        if M is not None or (tail and Mt is not None):
            mb = torch.arange(S, device=kc.device) // K
            neg_cross = -(mb[None, :] < mb[:, None]).to(kc.dtype)
        de = torch.zeros_like(e)
        dgam2 = torch.zeros_like(gam2)
        upd_last = ctx.need_state and (dWn is not None or dbn is not None)
        if upd_last:
            dWn = kc.new_zeros(BH, D, D) if dWn is None else dWn
            dbn = kc.new_zeros(BH, 1, D) if dbn is None else dbn
        dW = db = None  # gradient w.r.t. the weights at the start of chunk c + 1
        n = nc + tail
        for c in reversed(range(n)):
            if c < nc:
                k_c, q_c, P_c, M_c, e_c, dZc, dq_c, dk_c, dgt_c, dP_c, dM_c = (
                    _at(t, c) for t in (kc, qc, P, M, e, dZq, dq, dk, dgt, dP, dM))
                g_c = g
            else:
                k_c, q_c, P_c, M_c, e_c, dZc, dq_c, dk_c, dgt_c, dP_c, dM_c = (
                    _at(t, 0) for t in (kt, qt, Pt, Mt, et, dZt, dqt, dkt, dgtt, dPt, dMt))
                g_c = -(-kt.shape[2] // K)
            S_c = k_c.shape[1]
            W, G = ctx.Ws[c], ctx.Gs[c]
            heads = shared and c == 0
            # by head: (H, B S, D) views of a chunk's rows, and the per-row (BH, ...) gradients summed over B
            hv = (lambda t: t.view(H, -1, t.shape[-1])) if heads else (lambda t: t)  # noqa: E731
            rows_sum = (lambda t: t.view(H, -1, *t.shape[1:]).sum(1)) if heads else (lambda t: t)  # noqa: E731
            # Zq = Q W + b - P G
            torch.bmm(dZc, G.transpose(1, 2), out=dP_c).neg_()
            dG = torch.bmm(P_c.transpose(1, 2), dZc).neg_()
            torch.bmm(hv(dZc), W.transpose(1, 2), out=hv(dq_c))
            dWc = torch.bmm(hv(q_c).transpose(1, 2), hv(dZc))
            dbc = hv(dZc).sum(1, keepdim=True)
            dWu = None
            if c < n - 1 or upd_last:  # W_next = W - K^T (e G), b_next = b - sum(e G)
                dWu, dbu = (dW, db) if c < n - 1 else (dWn, dbn)
                dEG = torch.baddbmm(dbu, k_c, dWu).neg_()
                dG.addcmul_(e_c, dEG)
                de[c] = (G * dEG).sum(-1, keepdim=True)
                eG = e_c * G
                dWc.add_(rows_sum(dWu))
                dbc.add_(rows_sum(dbu))
            # G = lnl2(Zk) (mini-batch by mini-batch in reverse when g > 1); dgt_c holds dgxl until negated
            Zk, xh, mean, rstd, gxl = ctx.lnl2[c]
            m2 = (gxl * xh).mean(-1, keepdim=True)
            if g_c == 1:
                dZk, dgt_c[:] = _lnl2_vjp(dG, Zk, G, xh, mean, rstd, gxl, m2, gam2)
            else:
                dZk = torch.empty_like(dG)
                # the native LN backward reads mean and rstd as if contiguous (it ignores their strides):
                # one copy per chunk into (g, BH, K, 1), whose [m] is the mini-batch's rows in order
                # (a chunk shorter than g K has a short last mini-batch: padded here, cut below)
                mean_g, rstd_g = (F.pad(t, (0, 0, 0, g_c * K - S_c)).view(BH, g_c, K, 1).transpose(0, 1).contiguous()
                                  for t in (mean, rstd))
                for m in reversed(range(g_c)):
                    R, E = slice(m * K, (m + 1) * K), m * K
                    mg, rg = mean_g[m], rstd_g[m]
                    if (m + 1) * K > S_c:
                        mg, rg = mg[:, :S_c - E].contiguous(), rg[:, :S_c - E].contiguous()
                    dz, dgt_c[:, R] = _lnl2_vjp(dG[:, R], Zk[:, R], G[:, R], xh[:, R], mg, rg,
                                                gxl[:, R], m2[:, R], gam2)
                    dZk[:, R] = dz
                    if m:
                        _acc_rows_t_(dG[:, :E], M_c[:, R, :E], dz, alpha=-1.0)
                # z of a row minus M G of the chunk's earlier mini-batches: dM = -dZk G^T on those entries
                torch.bmm(dZk, G.transpose(1, 2), out=dM_c).mul_(neg_cross[:S_c, :S_c])
            dgam2.add_((xh * dgt_c).sum(1, keepdim=True))
            dgt_c.neg_()
            # Zk = K W + b
            dWc.baddbmm_(hv(k_c).transpose(1, 2), hv(dZk))
            dbc.add_(hv(dZk).sum(1, keepdim=True))
            dkc = torch.bmm(hv(dZk), W.transpose(1, 2), out=hv(dk_c)).view(BH, S_c, D)
            if dWu is not None:
                dkc.baddbmm_(eG, dWu.transpose(1, 2), alpha=-1.0)
            dW, db = dWc, dbc
        grads = (dk, dq, dW, db, dgt, dgam2, dP, dM, de, None, None, None)
        if tail:
            return grads + (dkt, dqt, dgtt, dPt, dMt, det)
        return grads + (None,) * 6


def _tok_at_positions(tok: torch.Tensor, inmb: torch.Tensor, S: int) -> torch.Tensor:
    """tok[inmb] for inmb = arange(S) % K. Inside a compiled graph as repeats of tok instead: the backward
    of an index is a scatter-add, and inductor (torch 2.13, CPU) fails to generate it into a tensor of one
    element (mini-batches of one token), while a repeat's backward is a plain sum. Eager keeps the index
    (the same numbers as ever)."""
    if not torch.compiler.is_compiling():
        return tok[inmb]
    K = tok.shape[0]
    return tok.repeat(-(-S // K))[:S]


# TTT-MLP: a ragged last chunk runs as a second scan when its padding would exceed 1/TAIL_SPLIT_MIN_PAD of the
# sequence (TTT-Linear's scan takes a short last chunk itself: ``_LinearChunks``' tail)
TAIL_SPLIT_MIN_PAD = 8


def ttt_fast(kind: str, q, k, v, lr, tok, params: dict[str, torch.Tensor], gamma, beta,
             mini_batch_size: int, mb_per_chunk: int, need_state: bool = False):
    """Same contract as ``ttt_reference``, and ``params`` may also be the layer's own (H, ...) weights,
    shared by every sequence (what ``forward`` passes: no per-sequence copies, and TTT-Linear's first
    chunk multiplies them one GEMM per head). With ``need_state`` L must be a multiple of mini_batch_size
    (the state after a shorter last mini-batch is never needed by ``forward``). Under autocast the scan
    runs in float32: the hand-written chunks need one dtype throughout, and the inner gradient steps
    are the precision-sensitive part."""
    dev_type = q.device.type
    if torch.is_autocast_enabled(dev_type):
        with torch.autocast(dev_type, enabled=False):
            f = lambda t: t.float()  # noqa: E731
            return ttt_fast(kind, f(q), f(k), f(v), f(lr), f(tok), {n: f(t) for n, t in params.items()}, f(gamma),
                            f(beta), mini_batch_size, mb_per_chunk, need_state)
    B, L, H, D = q.shape
    K = mini_batch_size
    n_mb = -(-L // K)
    if need_state:
        if L % K:
            raise ValueError("need_state requires whole mini-batches")
        g = min(mb_per_chunk, n_mb)
        if n_mb % g:  # whole chunks first, then the rest as one smaller chunk (no padding allowed here)
            cut = (n_mb - n_mb % g) * K
            z1, p1 = ttt_fast(kind, q[:, :cut], k[:, :cut], v[:, :cut], lr[:, :cut], tok, params, gamma, beta,
                              K, g, True)
            z2, p2 = ttt_fast(kind, q[:, cut:], k[:, cut:], v[:, cut:], lr[:, cut:], tok, p1, gamma, beta,
                              K, n_mb % g, True)
            return torch.cat([z1, z2], 1), p2
    else:
        g = min(mb_per_chunk, n_mb)
        if L <= 2 * g * K:
            # a short sequence (the study's window of 10) is one chunk: a second, padded chunk costs more
            # than materialising W once saves (CPU, 1 thread: L 10 mbs 1 21 ms in one chunk, 36 ms in two)
            g = n_mb
        elif kind == "mlp" and L % (g * K) and (g * K - L % (g * K)) * TAIL_SPLIT_MIN_PAD > L:
            # TTT-MLP's ragged tail that would pad much: the whole chunks, then the tail alone from their final
            # weights (measured on TTT-Linear before its scan took the tail itself, kernel ratios, 2 threads,
            # split / padded: L 50 mbs 16 1.87-1.94x / 1.75-1.79x; L 200 (8 padded of 208) 2.10-2.21x /
            # 2.17-2.26x, so padded). Split, not sliced: a slice's backward writes a zero tensor of the input.
            cut = L - L % (g * K)
            (q1, q2), (k1, k2), (v1, v2), (lr1, lr2) = (t.split([cut, L - cut], 1) for t in (q, k, v, lr))
            z1, p1 = ttt_fast(kind, q1, k1, v1, lr1, tok, params, gamma, beta, K, g, True)
            z2, _ = ttt_fast(kind, q2, k2, v2, lr2, tok, p1, gamma, beta, K, g)
            return torch.cat([z1, z2], 1), params
    S = g * K
    nc = -(-L // S)
    if nc == 1 and not need_state:
        # one chunk: no padding to a whole chunk (a window of 10 with mini-batches of 16 would compute 16
        # positions). Causal inside the chunk, so the padded positions never reached a real one; exact.
        S = L
    BH = B * H
    dt = q.dtype
    # TTT-Linear's ragged tail (L 50 with mini-batches of 16) runs as a short last chunk of its own inside the
    # scan: no padded row is computed (L 50 computed 64 positions) and nothing is split, cat or copied per row
    tail = kind == "linear" and (nc - 1) * S < L < nc * S
    if tail:
        nc -= 1
        (kc, kt), (qc, qt), (vc, vt), (lrc, lrt) = (_ToChunksAndTail.apply(t, nc, S)
                                                    for t in (k, q, v, lr.unsqueeze(-1)))
    else:
        kc, qc, vc = (_to_chunks(t, nc, S) for t in (k, q, v))
        lrc = _to_chunks(lr.unsqueeze(-1), nc, S)  # (nc, BH, S, 1)
    gam = gamma.to(dt).repeat_interleave(B, 0).unsqueeze(1)  # (BH, 1, D), rows head-major as _to_chunks'
    bet = beta.to(dt).repeat_interleave(B, 0).unsqueeze(1)
    # gamma and beta expanded over the chunks: autograd then sums their gradients over S (contiguous rows) and
    # the expand over nc, where one sum over the (nc, S) dims of an (nc, BH, S, D) tensor was 7x slower
    gam_c, bet_c = gam.expand(nc, -1, -1, -1), bet.expand(nc, -1, -1, -1)
    gt = gam_c * (vc - kc - bet_c)  # gamma * (target - beta)
    tokd = tok.to(dt)
    P, M, coef, e = _dual_coefs(qc, kc, lrc, tokd, K, g)
    if tail:
        gtt = gam * (vt - kt - bet)
        Pt, Mt, _, et = _dual_coefs(qt, kt, lrt, tokd, K, -(-kt.shape[2] // K))

    shared = params["W1"].dim() == 3  # (H, D, F) for every row, else (B, H, D, F)
    if shared and kind == "linear":
        p = params
    elif shared:
        p = {n: t.unsqueeze(1).expand(H, B, *t.shape[1:]).reshape(BH, *t.shape[1:]) for n, t in params.items()}
    else:
        p = {n: t.transpose(0, 1).reshape(BH, *t.shape[2:]) for n, t in params.items()}
    if kind == "linear":
        res = _LinearChunks.apply(kc, qc, p["W1"], p["b1"], gt, gam * gam, P, M, e, K, g, need_state,
                                  *((kt, qt, gtt, Pt, Mt, et) if tail else ()))
        Zq = res[0] if need_state or tail else res
        new = {"W1": res[1], "b1": res[2]} if need_state else params
    else:
        # per-chunk views via unbind (one backward node) rather than indexing (one full-size zero tensor per index)
        kq = torch.cat([kc, qc], 2)  # (nc, BH, 2S, D): one bmm gives both the K side and the Q side
        kq_, gt_, P_, coef_ = kq.unbind(0), gt.unbind(0), P.unbind(0), coef.unbind(0)
        M_ = M.unbind(0) if g > 1 else None
        W1, b1, W2, b2 = p["W1"], p["b1"], p["W2"], p["b2"]
        gam2 = gam * gam
        eT_ = e.transpose(-1, -2).unbind(0)
        zs = []
        for c in range(nc):
            upd = c < nc - 1 or need_state
            res = _MLPChunk.apply(kq_[c], W1, b1, W2, b2, gt_[c], gam2, P_[c], coef_[c],
                                  M_[c] if g > 1 else None, eT_[c], K, g, upd)
            if upd:
                zq, W1, b1, W2, b2 = res
            else:
                zq = res
            zs.append(zq)
        Zq = torch.stack(zs)  # (nc, BH, S, D)
        new = {"W1": W1, "b1": b1, "W2": W2, "b2": b2} if need_state else params

    out = qc + ttt_layer_norm(Zq, gam_c, bet_c)
    if tail:
        out = _FromChunksAndTail.apply(out, qt + ttt_layer_norm(res[1], gam, bet), B, H)
    else:
        out = _from_chunks(out, B, H, L)
    new = {n: t.reshape(H, B, *t.shape[1:]).transpose(0, 1).contiguous() for n, t in new.items()} if need_state else params
    return out, new


def ttt_partial(kind: str, q, k, v, lr, tok_i, params, acc, gamma, beta):
    """Tokens of ONE mini-batch, continuing a partial mini-batch (primal form, used by streaming).

    q, k, v: (B, n, H, D); lr: (B, n, H); tok_i: (n,) token factors of these positions; params: W0 at
    the mini-batch start; acc: sum_j eta_j grad l_j(W0) over the mini-batch's earlier tokens.
    Returns (z (B, n, H, D), acc including these tokens)."""
    B, n, H, D = q.shape
    BH = B * H
    hd = lambda t: t.transpose(1, 2).reshape(BH, n, -1)  # noqa: E731
    qh, kh, vh, lrh = hd(q), hd(k), hd(v), hd(lr.unsqueeze(-1))  # lrh: (BH, n, 1)
    gam = gamma.to(q.dtype).repeat(B, 1).unsqueeze(1)
    bet = beta.to(q.dtype).repeat(B, 1).unsqueeze(1)
    gt = gam * (vh - kh - bet)
    p = {nm: t.reshape(BH, *t.shape[2:]) for nm, t in params.items()}
    a = {nm: t.reshape(BH, *t.shape[2:]) for nm, t in acc.items()}
    tk = tok_i.to(q.dtype).view(1, n, 1)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    lr_row = lrh.transpose(1, 2)  # (BH, 1, n)
    coef = torch.where(causal, lr_row, torch.zeros((), dtype=q.dtype, device=q.device))

    def read(x, W, b, aW, ab, Xk, Gk):
        # x W_i + b_i with W_i = W0 - tok_i (acc + sum_{j<=i} lr_j Xk_j^T Gk_j)
        corr = torch.baddbmm(ab, x, aW) + torch.bmm((torch.bmm(x, Xk.transpose(1, 2)) + 1.0) * coef, Gk)
        return torch.baddbmm(b, x, W) - tk * corr

    if kind == "linear":
        G = ln_l2_grad(torch.baddbmm(p["b1"], kh, p["W1"]), gam, gt)
        zq = read(qh, p["W1"], p["b1"], a["W1"], a["b1"], kh, G)
        eG = lrh * G
        new = {"W1": torch.baddbmm(a["W1"], kh.transpose(1, 2), eG), "b1": a["b1"] + eG.sum(1, keepdim=True)}
    else:
        Z1 = torch.baddbmm(p["b1"], kh, p["W1"])
        X2 = gelu_tanh(Z1)
        G2 = ln_l2_grad(torch.baddbmm(p["b2"], X2, p["W2"]), gam, gt)
        G1 = torch.bmm(G2, p["W2"].transpose(1, 2)) * gelu_tanh_grad(Z1)
        x2q = gelu_tanh(read(qh, p["W1"], p["b1"], a["W1"], a["b1"], kh, G1))
        zq = read(x2q, p["W2"], p["b2"], a["W2"], a["b2"], X2, G2)
        eG1, eG2 = lrh * G1, lrh * G2
        new = {"W1": torch.baddbmm(a["W1"], kh.transpose(1, 2), eG1), "b1": a["b1"] + eG1.sum(1, keepdim=True),
               "W2": torch.baddbmm(a["W2"], X2.transpose(1, 2), eG2), "b2": a["b2"] + eG2.sum(1, keepdim=True)}
    z = qh + ttt_layer_norm(zq, gam, bet)
    z = z.reshape(B, H, n, D).transpose(1, 2)
    return z, {nm: t.reshape(B, H, *t.shape[1:]) for nm, t in new.items()}


# --------------------------------------------------------------------------------------------------
# the mixers
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _rope_table(L: int, D: int, theta: float, mini_batch_size: int, dtype, device) -> torch.Tensor:
    """RoPE's (cos, sin) pairs (L, D/2, 2) for positions 0..L-1 taken modulo the mini-batch (as ``_prepare``)."""
    positions = torch.arange(L, device=device) % mini_batch_size
    return torch.view_as_real(_rope_factors(positions, D, theta, device)[:, 0]).to(dtype).contiguous()


class _LinearWindow(torch.autograd.Function):
    """TTT-Linear between its projection and its post-norm, in one C pass per direction (benchbox.kernels.
    ttt_window_forward / _backward) over the scan's chunks in turn (``_window_chunk``: the study's window of 10 is
    one chunk; L 200 with mini-batches of 16 is 13), the inner weights carried from chunk to chunk per (row, head)
    block: RoPE, eta, the inner gradients G mini-batch after mini-batch (a row's inner input minus the earlier
    mini-batches' steps), the dual form's P and P G, the inner LN, the residual and the weights' update, with no
    tensor in between (torch's path makes ~60 small operations of these and permuting copies). Reads q, k, v and
    the learning-rate logits from the projection's rows and writes their gradient in the same layout. ``forward``
    with ``_prepare`` and ``ttt_fast`` is the reference the tests hold it to."""

    @staticmethod
    def forward(ctx, proj, lrb, tok, W, b1, gam, bet, cs, eta_scale, heads, chunk):
        out, save = _KERNELS.ttt_window_forward(proj, lrb, tok, W, b1, gam, bet, cs, eta_scale, heads, chunk, LN_EPS)
        ctx.save_for_backward(proj, tok, gam, cs, save)
        ctx.eta_scale, ctx.chunk = eta_scale, chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        proj, tok, gam, cs, save = ctx.saved_tensors
        dproj, dW, db, dgam, dbet, dtok, dlrb = _KERNELS.ttt_window_backward(proj, tok, gam, cs, ctx.eta_scale,
                                                                             ctx.chunk, save, dout)
        return dproj, dlrb, dtok, dW, db.unsqueeze(1), dgam, dbet, None, None, None, None


class _TTTBase(Mixer):
    BACKENDS = ("torch", "reference")
    KIND = "linear"

    def __init__(self, d_model: int, max_len: int = 512, *, num_heads: int = 2, mini_batch_size: int = 16,
                 ttt_base_lr: float = 1.0, use_gate: bool = False, use_rope: bool = True,
                 rope_theta: float = 10000.0, share_qk: bool = False, pre_conv: bool = False,
                 conv_kernel: int = 4, initializer_range: float = 0.02, scan_chunk: int = 8,
                 backend: str = "auto"):
        super().__init__(d_model, max_len)
        name = type(self).__name__

        def check(ok, msg):
            if not ok:
                raise ValueError(f"{name}: {msg}")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        check(is_int(num_heads) and num_heads >= 1, f"num_heads must be an integer >= 1, got {num_heads!r}")
        check(d_model % num_heads == 0, f"num_heads={num_heads} must divide d_model={d_model}")
        check(is_int(mini_batch_size) and mini_batch_size >= 1,
              f"mini_batch_size must be an integer >= 1, got {mini_batch_size!r}")
        check(math.isfinite(ttt_base_lr) and ttt_base_lr >= 0, f"ttt_base_lr must be finite and >= 0, got {ttt_base_lr!r}")
        check(math.isfinite(rope_theta) and rope_theta > 0, f"rope_theta must be > 0, got {rope_theta!r}")
        check(not use_rope or (d_model // num_heads) % 2 == 0,
              f"use_rope needs an even head_dim, got d_model/num_heads = {d_model // num_heads}")
        check(is_int(conv_kernel) and conv_kernel >= 1, f"conv_kernel must be an integer >= 1, got {conv_kernel!r}")
        check(math.isfinite(initializer_range) and initializer_range >= 0,
              f"initializer_range must be finite and >= 0, got {initializer_range!r}")
        check(is_int(scan_chunk) and scan_chunk >= 1, f"scan_chunk must be an integer >= 1, got {scan_chunk!r}")
        check(backend in ("auto",) + self.BACKENDS, f"unknown backend {backend!r} ({', '.join(self.BACKENDS)})")
        for flag, val in (("use_gate", use_gate), ("use_rope", use_rope), ("share_qk", share_qk),
                          ("pre_conv", pre_conv)):
            check(isinstance(val, bool), f"{flag} must be a bool, got {val!r}")

        C, H = d_model, num_heads
        D = C // H
        self.num_heads, self.head_dim, self.mini_batch_size = H, D, mini_batch_size
        self.ttt_base_lr, self.use_gate, self.use_rope, self.rope_theta = float(ttt_base_lr), use_gate, use_rope, float(rope_theta)
        self.share_qk, self.use_pre_conv, self.conv_kernel = share_qk, pre_conv, conv_kernel
        self.initializer_range, self.scan_chunk = float(initializer_range), scan_chunk
        self.backend = self.auto_backend() if backend == "auto" else backend
        std = self.initializer_range

        def linear():
            lin = nn.Linear(C, C, bias=False)
            nn.init.normal_(lin.weight, 0.0, std)
            return lin

        def dwconv():
            return nn.Conv1d(C, C, conv_kernel, groups=C, bias=True)  # PyTorch default init, as officially

        self.q_proj = linear()
        if share_qk:
            self.conv_q, self.conv_k = dwconv(), dwconv()
        else:
            self.k_proj = linear()
        self.v_proj = linear()
        self.o_proj = linear()
        if use_gate:
            self.g_proj = linear()
        if pre_conv:
            self.pre_conv_norm, self.pre_conv, self.seq_norm = RMSNorm(C), dwconv(), RMSNorm(C)
        self.learnable_ttt_lr_weight = nn.Parameter(torch.randn(H, 1, C) * std)
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(H, 1))
        self.learnable_token_idx = nn.Parameter(torch.zeros(mini_batch_size))
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, D))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, D))
        self.post_norm = nn.LayerNorm(C, eps=1e-6)
        self._init_inner(H, D, std)

    def _init_inner(self, H, D, std):
        self.W1 = nn.Parameter(torch.randn(H, D, D) * std)
        self.b1 = nn.Parameter(torch.zeros(H, 1, D))

    def extra_repr(self):
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, mini_batch_size={self.mini_batch_size}, "
                f"use_gate={self.use_gate}, use_rope={self.use_rope}, share_qk={self.share_qk}, "
                f"pre_conv={self.use_pre_conv}, backend={self.backend!r}")

    @classmethod
    def available_backends(cls, device="cpu"):
        return ["torch", "reference"]

    # ---- pieces -------------------------------------------------------------------------------
    def _inner_params(self, B: int | None, dtype) -> dict[str, torch.Tensor]:
        """The inner model's start weights, (B, H, ...) per sequence, or (H, ...) as they are (B None:
        shared by every sequence, which ``ttt_fast`` takes)."""
        names = ("W1", "b1") if self.KIND == "linear" else ("W1", "b1", "W2", "b2")
        ws = {n: getattr(self, n).to(dtype) for n in names}
        return ws if B is None else {n: t.unsqueeze(0).expand(B, *t.shape) for n, t in ws.items()}

    def _token_factors(self) -> torch.Tensor:
        off = self.learnable_token_idx
        base = 1.0 / torch.arange(1, self.mini_batch_size + 1, dtype=off.dtype, device=off.device)
        return torch.clamp_min(base + off, 0.0)

    def _prepare(self, x: torch.Tensor, pos0: int, tails: dict | None, reference: bool):
        """Layer input h, RoPE'd q/k, v (B, L, H, D), eta (B, L, H) and the new conv tails."""
        B, L, C = x.shape
        H, D = self.num_heads, self.head_dim
        tails = dict(tails or {})
        h = x
        if self.use_pre_conv:
            y, tails["pre"] = _causal_depthwise(self.pre_conv, self.pre_conv_norm(x), tails.get("pre"))
            h = self.seq_norm(x + y)
        lr_w = self.learnable_ttt_lr_weight.reshape(H, C)
        if self.share_qk:
            w = torch.cat([self.q_proj.weight, self.v_proj.weight, lr_w])
            xq, v, lr_logit = F.linear(h, w).split([C, C, H], -1)  # split: one backward node, no zero-fill
            q, tails["q"] = _causal_depthwise(self.conv_q, xq, tails.get("q"))
            k, tails["k"] = _causal_depthwise(self.conv_k, xq, tails.get("k"))
        else:
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, lr_w])
            q, k, v, lr_logit = F.linear(h, w).split([C, C, C, H], -1)
        lr_logit = lr_logit + self.learnable_ttt_lr_bias.reshape(H)
        eta = torch.sigmoid(lr_logit) * (self.ttt_base_lr / D)
        q, k, v = (t.reshape(B, L, H, D) for t in (q, k, v))
        if self.use_rope:
            positions = (torch.arange(L, device=x.device) + pos0) % self.mini_batch_size
            if reference:
                q, k = rope_reference(q, k, positions, self.rope_theta)
            else:
                rope = rope_real if torch.compiler.is_compiling() else rope_fast
                q, k = rope(q, k, _rope_factors(positions, D, self.rope_theta, x.device))
        return h, q, k, v, eta, tails

    def _finish(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        B, L = z.shape[:2]
        out = self.post_norm(z.reshape(B, L, self.d_model))
        if self.use_gate:
            out = gelu_tanh(self.g_proj(h)) * out
        return self.o_proj(out)

    def _scan(self, q, k, v, eta, tok, params, need_state=False):
        args = (self.KIND, q, k, v, eta, tok, params, self.ttt_norm_weight.to(q.dtype),
                self.ttt_norm_bias.to(q.dtype), self.mini_batch_size)
        if self.backend == "reference":
            return ttt_reference(*args)
        return ttt_fast(*args, max(1, self.scan_chunk // self.mini_batch_size), need_state=need_state)

    # ---- Mixer API -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, d_model), right-padded; causal, so ``lengths`` is not needed."""
        if x.shape[1] == 0:
            return self.o_proj(x)
        if self._window_in_c(x):
            return self._finish(*self._window(x))
        h, q, k, v, eta, _ = self._prepare(x, 0, None, self.backend == "reference")
        B = x.shape[0] if self.backend == "reference" else None
        z, _ = self._scan(q, k, v, eta, self._token_factors(), self._inner_params(B, x.dtype))
        return self._finish(h, z)

    def _window_chunk(self, L: int) -> int:
        """The positions of each chunk that ``ttt_fast`` scans a sequence of L in (the last may be shorter): the
        whole sequence when it is at most twice mb_per_chunk mini-batches (e.g. the study's window of 10 with
        mini-batches of 1 to 16), else mb_per_chunk mini-batches."""
        K = self.mini_batch_size
        g = min(max(1, self.scan_chunk // K), -(-L // K))
        return L if L <= 2 * g * K else g * K

    def _window_in_c(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` runs as ``_LinearWindow``: TTT-Linear, the torch backend, q and k from the projection,
        the C kernels installed and applicable to the scan's chunks (at most 64 positions each; not traced, no
        autocast)."""
        L = x.shape[1]
        return (self.KIND == "linear" and self.backend == "torch" and not self.share_qk and _KERNELS is not None
                and 0 < L and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)
                and _KERNELS.ttt_window_applies(x, self.head_dim, self._window_chunk(L)))

    def _window(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer input h and the pre-norm output z (B, L, d_model) by ``_LinearWindow``."""
        B, L, C = x.shape
        H, D, dt = self.num_heads, self.head_dim, x.dtype
        h = x
        if self.use_pre_conv:
            y, _ = _causal_depthwise(self.pre_conv, self.pre_conv_norm(x), None)
            h = self.seq_norm(x + y)
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                       self.learnable_ttt_lr_weight.reshape(H, C)])
        proj = F.linear(h, w)
        cs = _rope_table(L, D, self.rope_theta, self.mini_batch_size, dt, x.device) if self.use_rope else None
        z = _LinearWindow.apply(proj, self.learnable_ttt_lr_bias.reshape(H).to(dt), self._token_factors().to(dt),
                                self.W1.to(dt), self.b1.to(dt), self.ttt_norm_weight.to(dt),
                                self.ttt_norm_bias.to(dt), cs, self.ttt_base_lr / D, H, self._window_chunk(L))
        return h, z

    def _cheap_last(self, x: torch.Tensor) -> bool:
        return self.backend == "torch" and self.KIND == "linear" and 0 < x.shape[1] <= self.mini_batch_size

    def forward_rows(self, x: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
        if self._cheap_last(x):
            return rows_by_forward_last(self, x, lengths, n)
        return super().forward_rows(x, lengths, n)

    def forward_last(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, d_model): the output at lengths - 1 only. TTT-Linear with the whole sequence in one
        mini-batch (the study's window of 10 <= mbs 16): every key still takes its inner gradient G, but
        only the last query is read out (one row of the dual form's P, of the inner LN, post-norm and
        o_proj). Otherwise the full forward; ``forward`` is the reference."""
        B, L, C = x.shape
        if not self._cheap_last(x):
            return super().forward_last(x, lengths)
        if self._window_in_c(x):  # every position in one C pass, then the last rows' post-norm and o_proj
            h, z = self._window(x)
            rows, last = torch.arange(B, device=x.device), lengths - 1
            return self._finish(h[rows, last].unsqueeze(1), z[rows, last].unsqueeze(1)).squeeze(1)
        h, q, k, v, eta, _ = self._prepare(x, 0, None, False)
        dt, H = q.dtype, self.num_heads
        # head-major (H, B, L, D), contiguous: the weights shared by every row multiply one (B L, D) block
        # per head (``x @ W`` over (B, H, L, D) would copy W per row, and its gradient would be B H small
        # products summed), and the inner LN's hand-written VJP reads contiguous rows
        q, k, v = (t.permute(2, 0, 1, 3).contiguous() for t in (q, k, v))
        gam, bet = (t.to(dt)[:, None, None, :] for t in (self.ttt_norm_weight, self.ttt_norm_bias))
        W, b = self.W1.to(dt), self.b1.to(dt)[:, None]  # (H, D, D), (H, 1, 1, D)
        D = W.shape[-1]
        Zk = torch.bmm(k.view(H, B * L, D), W).view(H, B, L, D) + b
        G = _LNL2Grad.apply(Zk, gam * gam, gam * (v - k - bet))  # (H, B, L, D)
        rows, last = torch.arange(B, device=x.device), lengths - 1
        ql = q[:, rows, last].unsqueeze(2)  # (H, B, 1, D)
        # coefficient of key s for the query at t = last: tok[t] * eta[s] for s <= t
        visible = torch.arange(L, device=x.device)[None, :] <= last[:, None]  # (B, L)
        tok = self._token_factors().to(dt)
        # tok[last]; compiled as a one-hot product (see _tok_at_positions: no scatter in the backward)
        tok_last = (F.one_hot(last, tok.shape[0]).to(dt) @ tok) if torch.compiler.is_compiling() else tok[last]
        coef = (tok_last[:, None] * visible * eta.permute(2, 0, 1)).unsqueeze(-1)
        # P as a column (H, B, L, 1) and its products as broadcast multiplies: as (1, L) x (L, D) matmuls their
        # gradients are rank-1 outer products, which a batched GEMM does ~20x slower than a multiply
        P = ((k * ql).sum(-1, keepdim=True) + 1.0) * coef
        zq = torch.bmm(ql.view(H, B, D), W).view(H, B, 1, D) + b
        z = ql + ttt_layer_norm(zq - (P * G).sum(-2, keepdim=True), gam, bet)  # (H, B, 1, D)
        return self._finish(h[rows, last].unsqueeze(1), z.permute(1, 2, 0, 3)).squeeze(1)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict[str, Any]:
        dtype = dtype or self.W1.dtype
        params = {n: t.to(device=device).clone() for n, t in self._inner_params(batch_size, dtype).items()}
        return {"pos": 0, "params": params, "acc": {n: torch.zeros_like(t) for n, t in params.items()},
                "tails": {}, "batch_size": batch_size}

    def step(self, x: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        B, n, _ = x.shape
        if B != state["batch_size"]:
            raise ValueError(f"state was made for batch size {state['batch_size']}, got {B}")
        if n == 0:
            return self.o_proj(x), state
        K = self.mini_batch_size
        pos = state["pos"]
        h, q, k, v, eta, tails = self._prepare(x, pos, state["tails"], self.backend == "reference")
        tok = self._token_factors()
        params, acc = state["params"], state["acc"]
        zs, i = [], 0
        while i < n:
            p = (pos + i) % K
            if p == 0 and n - i >= K:  # whole mini-batches: the full scan from the boundary state
                m = (n - i) // K * K
                z, params = self._scan(q[:, i:i + m], k[:, i:i + m], v[:, i:i + m], eta[:, i:i + m], tok,
                                       params, need_state=True)
            else:  # (part of) one mini-batch, continuing from the running gradient sum
                m = min(n - i, K - p)
                sl = slice(i, i + m)
                z, acc = ttt_partial(self.KIND, q[:, sl], k[:, sl], v[:, sl], eta[:, sl], tok[p:p + m], params,
                                     acc, self.ttt_norm_weight, self.ttt_norm_bias)
                if p + m == K:  # the mini-batch is complete: take its step, clear the sum
                    params = {nm: params[nm] - tok[K - 1].to(acc[nm].dtype) * acc[nm] for nm in params}
                    acc = {nm: torch.zeros_like(t) for nm, t in acc.items()}
            zs.append(z)
            i += m
        out = self._finish(h, torch.cat(zs, 1))
        return out, {"pos": pos + n, "params": params, "acc": acc, "tails": tails, "batch_size": B}


class TTTLinear(_TTTBase):
    """TTT-Linear: inner model f(x) = x W1 + b1 per head (see the module docstring for the options)."""
    KIND = "linear"


class TTTMLP(_TTTBase):
    """TTT-MLP: inner model f(x) = gelu_tanh(x W1 + b1) W2 + b2 per head, hidden 4 * head_dim."""
    KIND = "mlp"

    def _init_inner(self, H, D, std):
        self.W1 = nn.Parameter(torch.randn(H, D, 4 * D) * std)
        self.b1 = nn.Parameter(torch.zeros(H, 1, 4 * D))
        self.W2 = nn.Parameter(torch.randn(H, 4 * D, D) * std)
        self.b2 = nn.Parameter(torch.zeros(H, 1, D))
