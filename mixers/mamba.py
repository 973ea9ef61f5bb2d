"""Mamba (selective state-space) mixer, after Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling
with Selective State Spaces".

Block: in_proj (d_model -> 2 * d_inner, split into x and the gate z), causal depthwise conv1d over x
(width d_conv) + SiLU, input-dependent delta (rank dt_rank, softplus with a bias), B and C (d_state
each), the selective scan with A = -exp(A_log) and the D skip, the SiLU(z) gate, out_proj.

Scans (all in (batch, length, channels) layout, computed in fp32 or fp64, never in half precision):
- ``selective_scan_reference``: the plain sequential recurrence, one step per position.
- ``selective_scan_chunked``: the fast path in pure PyTorch. The sequence is cut into chunks; inside a
  chunk the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t is solved in closed form with a
  cumulative sum of the log-decays (see ``_ChunkedScan``), and the state is carried from chunk to
  chunk. Chunk ends are chosen so that the log-decay range inside a chunk stays below a bound
  (``MAX_LOG_RANGE``) that keeps every exponential finite and normal, so long steps only make chunks
  shorter (down to one step), never produce inf/NaN. A custom autograd function recomputes the states
  in the backward pass from the per-chunk start states, so memory stays O(batch * d_inner * d_state
  * chunk_size) instead of O(... * length).
- Where the harness installs its C kernels (``install_kernels``; benchbox.kernels), ``selective_scan_chunked`` on CPU
  runs ``_FusedScan`` instead: the step recurrence itself with its D skip and gate, one pass per direction, the state
  in L1 (n-major), checkpointed every 16 steps; and the block's conv with its SiLU runs as ``_FusedConvSiLU``. The
  torch paths above are what the tests hold them to.
- On CUDA with the optional ``mamba-ssm`` package, backend ``mamba_ssm`` runs its fused
  ``selective_scan_fn`` (and ``causal_conv1d_fn`` when ``causal-conv1d`` is importable).

Streaming carries the last d_conv - 1 conv inputs and the SSM state (batch, d_inner, d_state): O(1)
work and memory per new click. Right padding needs nothing: everything is causal.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Mixer

# ---------------------------------------------------------------------------------------------
# optional CUDA kernels

_MAMBA_SSM_OPS: object = None  # None: not probed yet; False: unusable here; else (scan_fn, conv_fn)


def mamba_ssm_ops():
    """``(selective_scan_fn, causal_conv1d_fn or None)`` when mamba-ssm is usable here, else None.

    mamba-ssm imports its CUDA extension unconditionally, so it can fail in many ways (no GPU, no
    build, ABI mismatch): any exception means "not available". Only probed when CUDA is available.
    """
    global _MAMBA_SSM_OPS
    if _MAMBA_SSM_OPS is None:
        _MAMBA_SSM_OPS = False
        if torch.cuda.is_available():
            try:
                from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore
            except Exception:
                selective_scan_fn = None
            if selective_scan_fn is not None:
                try:
                    from causal_conv1d import causal_conv1d_fn  # type: ignore
                except Exception:
                    causal_conv1d_fn = None
                _MAMBA_SSM_OPS = (selective_scan_fn, causal_conv1d_fn)
    return _MAMBA_SSM_OPS or None


# ---------------------------------------------------------------------------------------------
# scans

#: largest |A| * (sum of dt) allowed inside one chunk of the chunked scan, per compute dtype.
#: exp(-40) ~ 4e-18 is far from fp32 underflow and exp(40) * |grad| far from overflow; the relative
#: rounding error of the closed form grows like MAX_LOG_RANGE * eps (~2e-6 in fp32 at worst).
MAX_LOG_RANGE = {torch.float32: 40.0, torch.float64: 200.0}
# The chunked scan's backward needs every chunk's states h_t and decays exp(A rest_t), (b, T, d_inner, d_state)
# each. Below this many bytes (both, per scan call) the forward keeps them for the backward; above it the
# backward recomputes them chunk by chunk (six passes over each chunk's (b, T, d, n) numbers) to save memory.
# Batch 128, length 200, d_inner 128, d_state 16 in float32: 420 MB, kept.
SAVED_STATES_MAX_BYTES = 512 * 2**20

# On CPU a chunk's (b, T, d, n) tensors are swept a dozen times (forward and backward, elementwise, memory
# bound): chunks of about this many bytes per tensor stay in the last-level cache. chunk_size is then an
# upper bound. Measured on a 2-core EPYC, 1 thread, forward + backward of the mixer (d_model 64, d_inner
# 128, d_state 16), chunk 32 -> 4 (batch 128): L 50 163 -> 114 ms, L 200 685 -> 475 ms; batch 204 L 10
# (the study protocol's step) chunk 10 -> 4: 70 -> 47 ms. Below CPU_MIN_CHUNK steps the Python loop costs
# more than the cache saves (batch 1024, L 10: chunk 1 303 ms, 2 286, 4 318, 10 364). On CUDA chunks stay
# as asked: there every chunk is a few more kernel launches.
CPU_CHUNK_BYTES = 4 * 2**20
CPU_MIN_CHUNK = 4


def _cache_chunk(chunk_size: int, u: torch.Tensor, d_state: int) -> int:
    if u.device.type != "cpu":
        return chunk_size
    per_step = u.shape[0] * u.shape[2] * d_state * u.element_size()
    return min(chunk_size, max(CPU_MIN_CHUNK, CPU_CHUNK_BYTES // max(per_step, 1)))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare_delta(delta, delta_bias, delta_softplus, dtype):
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    return F.softplus(delta) if delta_softplus else delta


def _finish(y, u, D, z, dtype_out):
    if D is not None:
        y = y + u * D.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_out)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             initial_state=None, return_last_state=False):
    """Plain sequential selective scan (the reference).

    u, delta, z: (batch, L, d_inner); A: (d_inner, d_state); B, C: (batch, L, d_state); D,
    delta_bias: (d_inner,); initial_state: (batch, d_inner, d_state) or None (zeros).
    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t,  y_t = C_t . h_t + D u_t,  y_t *= silu(z_t),
    with dt = softplus(delta + delta_bias) when delta_softplus. Returns y (dtype of u)
    [, last state (batch, d_inner, d_state) in the compute dtype].
    """
    dtype_in = u.dtype
    ct = _compute_dtype(u, delta, A, B, C, initial_state)
    uc, Ac, Bc, Cc = u.to(ct), A.to(ct), B.to(ct), C.to(ct)
    dt = _prepare_delta(delta, delta_bias, delta_softplus, ct)
    bsz, length, d_inner = u.shape
    h = (torch.zeros(bsz, d_inner, A.shape[1], dtype=ct, device=u.device) if initial_state is None
         else initial_state.to(ct))
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t, :, None] * Ac)                             # (b, d, n)
        h = decay * h + (dt[:, t] * uc[:, t])[:, :, None] * Bc[:, t, None, :]
        ys.append((h @ Cc[:, t, :, None]).squeeze(-1))                       # (b, d)
    y = torch.stack(ys, 1) if ys else uc.new_zeros(bsz, 0, d_inner)
    y = _finish(y, uc, D, z, dtype_in)
    return (y, h) if return_last_state else y


def _chunk_bounds(dt: torch.Tensor, A: torch.Tensor, chunk_size: int, max_range: float) -> list[int]:
    """Chunk ends [0, e1, ..., L]: at most chunk_size steps, and sum over the chunk of
    max_{b,d}(|dt| * max_n |A|) <= max_range unless the chunk is a single step."""
    length = dt.shape[1]
    if length <= 1:
        return [0, length]
    cost = (dt.detach().abs() * A.detach().abs().amax(1)).amax(dim=(0, 2)).tolist()  # one host sync
    bounds, start, acc = [0], 0, 0.0
    for t, c in enumerate(cost):
        if t > start and (t - start >= chunk_size or acc + c > max_range):
            bounds.append(t)
            start, acc = t, 0.0
        acc += c
    bounds.append(length)
    return bounds


def _cumsum_(x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """In-place (reverse) cumulative sum over dim 1 of (b, T, d, n).

    On CPU, ``torch.cumsum`` over a non-last dim runs a scalar loop (about 10x slower than an
    elementwise op); T in-place adds of (b, d, n) slices, vectorised and cache-resident, are faster.
    """
    if x.device.type != "cpu":
        return x.copy_(x.flip(1).cumsum(1).flip(1) if reverse else x.cumsum(1))
    xs = x.unbind(1)
    if reverse:
        for t in range(len(xs) - 2, -1, -1):
            xs[t].add_(xs[t + 1])
    else:
        for t in range(1, len(xs)):
            xs[t].add_(xs[t - 1])
    return x


def _decay_sums(dt: torch.Tensor):
    """For one chunk dt (b, T, d): the decay time from each step to the chunk end,
    rest_t = sum_{k>t} dt_k (b, T, d), and the whole chunk's R = sum_k dt_k (b, d)."""
    T = dt.shape[1]
    upper = torch.ones(T, T, dtype=dt.dtype, device=dt.device).triu_(1)
    rest = upper @ dt                                   # a tiny matmul beats cumsum over dim 1 on CPU
    return rest, rest[:, 0] + dt[:, 0]


def _chunk_states(u, dt, A, B, h0, winv, hs):
    """Fill ``hs`` (b, T, d, n) with the chunk's states and ``winv`` with exp(A rest_t).

    With rest_t = sum_{k>t} dt_k the time from step t to the chunk end and R the chunk's total,
        h_t = exp(A (R - rest_t)) h0 + sum_{k<=t} exp(A (rest_k - rest_t)) b_k      (b_k = dt_k u_k B_k)
            = (exp(A R) h0 + sum_{k<=t} b_k winv_k) / winv_t,            winv_t = exp(A rest_t) in (0, 1].
    The chunk bounds keep |A| rest_t <= MAX_LOG_RANGE, so winv stays a normal number, and the
    cumulative sum only adds terms no larger than |b_k|: no overflow, no cancellation.
    """
    rest, R = _decay_sums(dt)
    torch.mul(rest.unsqueeze(-1), A, out=winv).exp_()
    torch.mul((dt * u).unsqueeze(-1), B.unsqueeze(2), out=hs).mul_(winv)
    hs[:, 0].addcmul_(torch.exp(R.unsqueeze(-1) * A), h0)
    return _cumsum_(hs).div_(winv)


class _ChunkedScan(torch.autograd.Function):
    """y_t = C_t . h_t (no D skip, no gate) and the last state, for dt already positive.

    Saves the inputs and the state entering each chunk, plus each chunk's states and decays where they
    fit in SAVED_STATES_MAX_BYTES (otherwise the backward recomputes them chunk by chunk), and runs the
    adjoint recurrence G_t = C_t dy_t + exp(dt_{t+1} A) G_{t+1} with the
    same closed form (a reverse cumulative sum, so again no cancellation).
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, chunk_size: int, max_range: float):
        with torch.autocast(u.device.type, enabled=False):
            bsz, length, d_inner = u.shape
            h = h0 if h0 is not None else u.new_zeros(bsz, d_inner, A.shape[1])
            y = u.new_empty(bsz, length, d_inner)
            bounds = _chunk_bounds(dt, A, _cache_chunk(chunk_size, u, A.shape[1]), max_range)
            tmax = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
            keep = 2 * bsz * length * d_inner * A.shape[1] * u.element_size() <= SAVED_STATES_MAX_BYTES
            h_buf = u.new_empty(bsz, tmax, d_inner, A.shape[1])
            winv_buf = None if keep else torch.empty_like(h_buf)
            starts, kept = [], []
            for s, e in zip(bounds[:-1], bounds[1:]):
                starts.append(h)
                if keep:  # each chunk's own tensors, kept for the backward
                    winv_c, h_c = (u.new_empty(bsz, e - s, d_inner, A.shape[1]) for _ in range(2))
                else:
                    winv_c, h_c = winv_buf[:, :e - s], h_buf[:, :e - s]
                hs = _chunk_states(u[:, s:e], dt[:, s:e], A, B[:, s:e], h, winv_c, h_c)
                h = hs[:, -1].clone()
                if keep:
                    kept.append((winv_c, h_c))
                    y[:, s:e] = torch.mul(hs, C[:, s:e].unsqueeze(2), out=h_buf[:, :e - s]).sum(-1)
                else:
                    y[:, s:e] = hs.mul_(C[:, s:e].unsqueeze(2)).sum(-1)
            ctx.kept = kept if keep else None
            ctx.bounds = bounds
            ctx.has_h0 = h0 is not None
            ctx.save_for_backward(u, dt, A, B, C, torch.stack(starts, 1))
            return y, h

    @staticmethod
    def backward(ctx, dy, dh_last):
        u, dt, A, B, C, starts = ctx.saved_tensors
        bounds = ctx.bounds
        with torch.autocast(u.device.type, enabled=False):
            du, ddt = torch.empty_like(u), torch.empty_like(dt)
            dB, dC, dA = torch.empty_like(B), torch.empty_like(C), torch.zeros_like(A)
            # carry = dL/dh_{s-1} through h_s = a_s h_{s-1} + b_s, i.e. the gradient leaving a chunk
            carry = dh_last if dh_last is not None else u.new_zeros(starts.shape[0], *A.shape)
            dy = dy.to(u.dtype)
            tmax = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
            h_buf, g_buf, tmp_buf = (u.new_empty(u.shape[0], tmax, *A.shape) for _ in range(3))
            winv_buf = torch.empty_like(h_buf) if ctx.kept is None else None
            for i in reversed(range(len(bounds) - 1)):
                s, e = bounds[i], bounds[i + 1]
                T = e - s
                uc, dtc, Bc, Cc, dyc = u[:, s:e], dt[:, s:e], B[:, s:e], C[:, s:e], dy[:, s:e]
                tmp = tmp_buf[:, :T]
                if ctx.kept is not None:  # states kept by the forward: copy (the code below works in place)
                    winv = ctx.kept[i][0]
                    hs = h_buf[:, :T].copy_(ctx.kept[i][1])
                else:
                    winv = winv_buf[:, :T]
                    hs = _chunk_states(uc, dtc, A, Bc, starts[:, i], winv, h_buf[:, :T])
                # G_t = dL/dh_t = sum_{k>=t} exp(A (r_k - r_t)) c_k, c_k = C_k dy_k (+ carry at the end)
                #     = winv_t * sum_{k>=t} c_k / winv_k
                G = torch.mul(dyc.unsqueeze(-1), Cc.unsqueeze(2), out=g_buf[:, :T])
                G[:, -1] += carry
                G = _cumsum_(G.div_(winv), reverse=True).mul_(winv)
                carry = torch.exp(dtc[:, 0].unsqueeze(-1) * A) * G[:, 0]
                dC[:, s:e] = (dyc.unsqueeze(2) @ hs).squeeze(2)                    # sums over d: matmul
                dtu = dtc * uc
                dB[:, s:e] = (dtu.unsqueeze(2) @ G).squeeze(2)
                q = torch.mul(G, Bc.unsqueeze(2), out=tmp).sum(-1)                 # (b, T, d)
                du[:, s:e] = dtc * q
                ddt_c = uc * q
                # dL/d(log a_t) = G_t * a_t h_{t-1} = G_t * (h_t - b_t), with b_t = dt_t u_t B_t
                p = hs.sub_(torch.mul(dtu.unsqueeze(-1), Bc.unsqueeze(2), out=tmp)).mul_(G)
                dA += torch.mul(p, dtc.unsqueeze(-1), out=tmp).sum((0, 1))
                ddt[:, s:e] = ddt_c.add_(p.mul_(A).sum(-1))
        return du, ddt, dA, dB, dC, (carry if ctx.has_h0 else None), None, None


# the fused scan kernels (an object with selective_scan_applies, selective_scan_forward and _backward), installed
# by the harness where it builds them (benchbox.kernels); None: the chunked torch path everywhere
_KERNELS = None


def install_kernels(kernels) -> None:
    global _KERNELS
    _KERNELS = kernels


def _fused_scan_applies(u, A) -> bool:
    return (_KERNELS is not None and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and _KERNELS.selective_scan_applies(u, A.shape[1]))


class _FusedScan(torch.autograd.Function):
    """``_ChunkedScan`` and ``_finish`` in one C pass per direction (dt already positive): y_t = (C_t . h_t +
    D u_t) silu(z_t) and the last state, the step recurrence itself with the state (N, D) per row in L1, nothing
    (B, L, D, N) in memory. Keeps the state entering every 16th step; the backward recomputes each 16 steps
    from there. D and z may be None."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, z, h0):
        at = A.t().contiguous()
        h0n = None if h0 is None else h0.transpose(1, 2).contiguous()
        y, ys, hlast, ck = _KERNELS.selective_scan_forward(u, dt, at, B, C, z, D, h0n)
        ctx.save_for_backward(u, dt, at, B, C, D, z, ys, ck)
        ctx.has_h0 = h0 is not None
        return y, hlast.transpose(1, 2).contiguous()  # the torch path's layout (a like-shaped draw sees the same)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh_last):
        u, dt, at, B, C, D, z, ys, ck = ctx.saved_tensors
        dhn = None if dh_last is None else dh_last.transpose(1, 2)
        du, ddt, dat, dB, dC, dz, dD, dh0 = _KERNELS.selective_scan_backward(u, dt, at, B, C, z, D, ys, ck,
                                                                             dy.to(u.dtype), dhn)
        return du, ddt, dat.t(), dB, dC, dD, dz, (dh0.transpose(1, 2) if ctx.has_h0 else None)


class _FusedConvSiLU(torch.autograd.Function):
    """silu(causal depthwise conv1d(x)) in the (B, L, D) layout, one C pass per direction."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        wt = weight.squeeze(1).t().contiguous()                                   # (D, 1, K) -> (K, D)
        ctx.save_for_backward(x, wt, bias)
        return _KERNELS.conv_silu_forward(x, wt, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, wt, bias = ctx.saved_tensors
        dx, dwt, dbias = _KERNELS.conv_silu_backward(x, wt, bias, dout)
        return dx, dwt.t().unsqueeze(1), dbias


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           initial_state=None, return_last_state=False, chunk_size: int = 32):
    """Fast selective scan; same arguments and results as ``selective_scan_reference``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype_in = u.dtype
    ct = _compute_dtype(u, delta, A, B, C, initial_state)
    uc = u.to(ct)
    dt = _prepare_delta(delta, delta_bias, delta_softplus, ct)
    h0 = None if initial_state is None else initial_state.to(ct)
    if u.shape[1] == 0:
        y = uc.new_zeros(u.shape)
        h = h0 if h0 is not None else uc.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    elif _fused_scan_applies(uc, A):
        y, h = _FusedScan.apply(uc.contiguous(), dt.contiguous(), A.to(ct), B.to(ct), C.to(ct),
                                None if D is None else D.to(ct), None if z is None else z.to(ct), h0)
        return (y.to(dtype_in), h) if return_last_state else y.to(dtype_in)
    else:
        y, h = _ChunkedScan.apply(uc.contiguous(), dt.contiguous(), A.to(ct), B.to(ct).contiguous(),
                                  C.to(ct).contiguous(), h0, chunk_size, MAX_LOG_RANGE[ct])
    y = _finish(y, uc, D, z, dtype_in)
    return (y, h) if return_last_state else y


# ---------------------------------------------------------------------------------------------
# the mixer


class MambaMixer(Mixer):
    BACKENDS = ("mamba_ssm", "torch")
    SCANS = ("chunked", "sequential")
    # its PyTorch scan costs the most per position of any mixer here, so shorter groups pay off sooner:
    # measured on 1 CPU thread (Beauty, window 10), 0.96-1.12x at 1,020 positions, 1.45-1.83x at 2,040
    group_min_positions = 1536
    group_midpoints_min_rows = 2048  # mixers.base.Mixer

    def __init__(self, d_model: int, max_len: int = 512, *, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, scan: str = "chunked", chunk_size: int = 32,
                 backend: str = "auto"):
        super().__init__(d_model, max_len)
        if not isinstance(d_state, int) or d_state < 1:
            raise ValueError(f"d_state must be an int >= 1, got {d_state!r}")
        if not isinstance(d_conv, int) or d_conv < 1:
            raise ValueError(f"d_conv must be an int >= 1, got {d_conv!r}")
        if not isinstance(expand, (int, float)) or isinstance(expand, bool) or int(expand * d_model) < 1:
            raise ValueError(f"expand must be a number with expand * d_model >= 1, got {expand!r}")
        if isinstance(dt_rank, str) and dt_rank != "auto":
            try:
                dt_rank = int(dt_rank)
            except ValueError:
                raise ValueError(f"dt_rank must be 'auto' or an int >= 1, got {dt_rank!r}") from None
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or isinstance(dt_rank, bool) or dt_rank < 1:
            raise ValueError(f"dt_rank must be 'auto' or an int >= 1, got {dt_rank!r}")
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if dt_init_floor < 0:
            raise ValueError(f"dt_init_floor must be >= 0, got {dt_init_floor}")
        if scan not in self.SCANS:
            raise ValueError(f"unknown scan {scan!r} for mamba ({', '.join(self.SCANS)})")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if backend not in ("auto",) + self.BACKENDS:
            raise ValueError(f"unknown backend {backend!r} for mamba ({', '.join(self.BACKENDS)})")
        if backend == "mamba_ssm" and mamba_ssm_ops() is None:
            raise ValueError("backend 'mamba_ssm' needs CUDA and an importable mamba-ssm package "
                             "(pip install mamba-ssm); use backend='torch' or 'auto'")
        self.d_state, self.d_conv, self.expand, self.dt_rank = d_state, d_conv, expand, dt_rank
        self.d_inner = d_inner = int(expand * d_model)
        self.scan, self.chunk_size, self.requested_backend = scan, chunk_size, backend

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        # dt_proj: weight keeps the variance of dt_rank inputs; bias = softplus^-1(dt) with dt
        # log-uniform in [dt_min, dt_max], floored at dt_init_floor.
        std = dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))     # inverse softplus
        # S4D-real: A = -(1, 2, ..., d_state) for every channel; D skip = 1
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    # ---- backends ---------------------------------------------------------------------------
    @classmethod
    def available_backends(cls, device="cpu"):
        if torch.device(device).type == "cuda" and mamba_ssm_ops() is not None:
            return ["mamba_ssm", "torch"]
        return ["torch"]

    def backend_for(self, x: torch.Tensor) -> str:
        ok = x.is_cuda and x.dtype != torch.float64 and mamba_ssm_ops() is not None
        if self.requested_backend == "auto":
            return "mamba_ssm" if ok else "torch"
        if self.requested_backend == "mamba_ssm" and not ok:
            raise ValueError("backend 'mamba_ssm' runs only on CUDA tensors in fp32/bf16/fp16 "
                             f"(got {x.device.type}, {x.dtype})")
        return self.requested_backend

    # ---- pieces -----------------------------------------------------------------------------
    def _scan_fn(self, streaming_step: bool = False):
        if self.scan == "sequential" or streaming_step:
            return selective_scan_reference
        return lambda *a, **k: selective_scan_chunked(*a, chunk_size=self.chunk_size, **k)

    def _conv(self, x, prefix=None):
        """Causal depthwise conv over (b, L, d_inner), optionally continuing after ``prefix``
        (b, d_conv - 1, d_inner). Returns the conv output and the new prefix."""
        length, k = x.shape[1], self.d_conv
        if prefix is None:
            y = self.conv1d(x.transpose(1, 2))[..., :length]
            new_prefix = None
        else:
            xp = torch.cat([prefix.to(x.dtype), x], 1)
            y = F.conv1d(xp.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
            new_prefix = xp[:, xp.shape[1] - (k - 1):]
        return y.transpose(1, 2), new_prefix

    def _ssm_inputs(self, xc):
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def _forward_torch(self, x, state=None):
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        if state is None and self.conv1d.bias is not None and _fused_scan_applies(xi, self.A_log):
            xc, prefix = _FusedConvSiLU.apply(xi, self.conv1d.weight, self.conv1d.bias), None
        else:
            xc, prefix = self._conv(xi, None if state is None else state["conv"])
            xc = F.silu(xc)
        dt, B, C = self._ssm_inputs(xc)
        A = -torch.exp(self.A_log)
        scan = self._scan_fn(streaming_step=state is not None and x.shape[1] == 1)
        y, h = scan(xc, dt, A, B, C, self.D, z, delta_bias=self.dt_proj.bias, delta_softplus=True,
                    initial_state=None if state is None else state["ssm"], return_last_state=True)
        return self.out_proj(y), ({"conv": prefix, "ssm": h} if state is not None else None)

    def _forward_mamba_ssm(self, x):
        selective_scan_fn, causal_conv1d_fn = mamba_ssm_ops()
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        xi_t = xi.transpose(1, 2).contiguous()                                  # (b, d_inner, L)
        if causal_conv1d_fn is not None:
            xc_t = causal_conv1d_fn(x=xi_t, weight=self.conv1d.weight.squeeze(1), bias=self.conv1d.bias,
                                    activation="silu")
        else:
            xc_t = F.silu(self.conv1d(xi_t)[..., : x.shape[1]])
        dt, B, C = self._ssm_inputs(xc_t.transpose(1, 2))
        dtype = xc_t.dtype
        y = selective_scan_fn(xc_t, dt.transpose(1, 2).to(dtype).contiguous(), -torch.exp(self.A_log.float()),
                              B.transpose(1, 2).to(dtype).contiguous(), C.transpose(1, 2).to(dtype).contiguous(),
                              self.D.float(), z=z.transpose(1, 2).to(dtype).contiguous(),
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))

    # ---- Mixer interface --------------------------------------------------------------------
    def forward(self, x, lengths=None):
        if self.backend_for(x) == "mamba_ssm":
            return self._forward_mamba_ssm(x)
        return self._forward_torch(x)[0]

    def init_state(self, batch_size, device=None, dtype=None):
        dtype = dtype or self.in_proj.weight.dtype
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return {"conv": torch.zeros(batch_size, self.d_conv - 1, self.d_inner, device=device, dtype=dtype),
                "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)}

    def step(self, x, state):
        """Torch path on every device (the fused kernel cannot start from a state)."""
        return self._forward_torch(x, state)

    def extra_repr(self):
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, scan={self.scan}, chunk_size={self.chunk_size}, "
                f"backend={self.requested_backend}")
