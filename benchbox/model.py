"""The one recommender every mixer plugs into (the TTT4Rec design).

item embedding (0 = padding) -> n_layers x [x + mixer(RMSNorm x); x + FFN(RMSNorm x)] -> RMSNorm = H.
A readout turns H into the user feature F_s; the default ("last") takes H at the last real position
(right padding). The target item goes through the same embedding and a two-layer MLP = F_t.
score = F_s . F_t, click probability = sigmoid(score).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

import mixers
from mixers import attention as attention_mixer, gru as gru_mixer, mamba as mamba_mixer, ttt as ttt_mixer
from mixers.base import end_rows
from . import kernels
from .readouts import LastReadout, build_readout, candidate_dot, Embedding, gather_rows, last_position

# the mixers' CPU kernels (C), where the library builds: the GRU's fused gates, short causal attention,
# TTT-Linear's dual form inside one mini-batch, Mamba's selective scan
gru_mixer.install_cell_kernels(kernels)
attention_mixer.install_kernels(kernels)
mamba_mixer.install_kernels(kernels)
ttt_mixer.install_kernels(kernels)

# Length groups (a batch's rows run through the encoder in groups of similar length, see length_groups)
GROUP_MIN_ROWS = 8  # a smaller group joins its neighbour: each group is one more call of every layer
GROUP_MAX_WORK = 0.8  # group only if the groups' padded positions are at most this share of the batch's
# from this many rows a batch, its groups' row counts seldom repeat, so oneDNN (torch's CPU GELU) would build a
# primitive for nearly every group: the grouped path runs GELU by torch's own kernel instead (see GELU).
# Measured, 1 CPU thread, a step with / without: 1.06x on RecBole's rows (2,048 rows, Beauty window 50);
# 0.99x for Mamba under the study protocol (204 rows: its few group shapes stay in oneDNN's cache)
NATIVE_GELU_MIN_ROWS = 1024


def length_groups(lengths: torch.Tensor, width: int, min_positions: int = 0,
                  per_octave: int = 1) -> list[tuple[torch.Tensor, int]] | None:
    """Rows of a right-padded (B, width) batch in groups of similar length: [(row indices, the group's
    longest length), ...] by powers of two (lengths 1-2, 3-4, 5-8, ...; with ``per_octave`` 2 also at
    their midpoints: 1-2, 3, 4, 5-6, 7-8, 9-12, ..., for large batches of some mixers, see the mixer's
    ``group_midpoints_min_rows``), groups of fewer than GROUP_MIN_ROWS rows merged into a neighbour.
    None where one pass over the whole batch is as good:
    one group, too little padding to save, fewer than ``min_positions`` padded positions in the batch
    (each group is one more call of every layer: a small batch pays more in calls than it saves; the
    mixer's ``group_min_positions``), lengths on an accelerator (reading them would wait for the device)
    or inside a compiled graph (data-dependent shapes; ``--compile`` forms the groups eagerly and compiles
    each group's encoder, see train.compile_training).

    Why: the instance regime's shuffled rows are padded to the batch's longest window. On Amazon Beauty
    a window of 50 is 16% real items and a window of 10 is 51%; every layer computes the padding, and
    dropout draws a random number for each of its positions (the largest cost of such a step on CPU).

    What it changes: nothing in eval mode or without dropout (float rounding of differently sized
    products only). In training with dropout, each group draws its own masks over its own positions (and
    the last block of ``encode_last`` over its last rows only), so a grouped run's random stream differs
    from an ungrouped one's: the same distribution, since padding's masks never touched a real position.
    Being its own stream anyway, it draws them with ``dropout_mask`` (four masks per 64-bit draw)."""
    if (width < 4 or lengths.numel() < 2 * GROUP_MIN_ROWS or lengths.numel() * width < min_positions
            or lengths.device.type != "cpu" or torch.compiler.is_compiling()):
        return None
    powers = [1 << k for k in range(1, max(1, (width - 1).bit_length()))]  # 2, 4, ..., below width
    if per_octave == 2:
        powers += [3 * (p // 2) for p in powers if 3 * (p // 2) < width]  # the midpoints 3, 6, 12, ...
    edges = sorted(powers) + [width]
    bucket = torch.bucketize(lengths, torch.tensor(edges, dtype=lengths.dtype))  # edges[i-1] < l <= edges[i]
    counts = torch.bincount(bucket, minlength=len(edges)).tolist()
    groups, pending, rows = [], [], 0  # bucket ids per group, small buckets carried into the next
    for i, c in enumerate(counts):
        if c:
            pending.append(i)
            rows += c
        if pending and rows >= GROUP_MIN_ROWS:
            groups.append((pending, rows))
            pending, rows = [], 0
    if pending:  # the longest rows left short of a group: they join the group below
        if not groups:
            return None
        groups[-1] = (groups[-1][0] + pending, groups[-1][1] + rows)
    if len(groups) < 2:
        return None
    out = []
    for ids, _ in groups:
        idx = torch.isin(bucket, torch.tensor(ids)).nonzero().squeeze(1)
        out.append((idx, int(lengths[idx].max())))
    if sum(len(idx) * n for idx, n in out) > GROUP_MAX_WORK * lengths.numel() * width:
        return None
    return out


class _MergeGroups(torch.autograd.Function):
    """Each group's output put back at its rows of a zero (B, L, ...) (positions past a group's length are
    padding) or, for one row per sequence, (B, ...). By hand: an in-place write per group would copy the
    whole gradient once per group in the backward; here each group reads its own rows of it once."""

    @staticmethod
    def forward(ctx, groups, shape, per_position, *outs):
        ctx.groups, ctx.per_position = groups, per_position
        buf = outs[-1].new_zeros(shape)
        for (idx, n), y in zip(groups, outs):
            if per_position:
                buf[idx, :n] = y
            else:
                buf[idx] = y
        return buf

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return (None, None, None, *(g[idx, :n] if ctx.per_position else g[idx] for idx, n in ctx.groups))


def per_group(fn, parts: list[torch.Tensor], lengths: torch.Tensor, groups, width: int) -> torch.Tensor:
    """``fn(part, lengths[rows])`` of every group's part (its rows' inputs ``x[rows, :n]``, as
    Recommender._lookup_groups gathers them), put back at its rows: a (B, width, ...) output (zeros past a
    group's length, i.e. in padding) or, where fn returns one row per sequence, (B, ...). Exact for a
    causal fn (the encoder): a real position never reads the padding."""
    outs = [fn(part, lengths[idx]) for part, (idx, _) in zip(parts, groups)]
    ref = outs[-1]
    per_position = ref.dim() > 2
    shape = (len(lengths), width, *ref.shape[2:]) if per_position else (len(lengths), *ref.shape[1:])
    return _MergeGroups.apply(groups, shape, per_position, *outs)


def dropout_mask(shape, p: float, dtype=torch.float32, device=None, scale: float = 1.0) -> torch.Tensor:
    """A dropout mask of ``shape``: 0 or scale / P(keep), from 16-bit random lanes, four per 64-bit draw,
    instead of torch CPU dropout's one float draw per element (``bernoulli_``: 10-18 ns an element, the
    largest cost of a long-window instance step). p is rounded to a multiple of 2^-16 (0.2 -> 0.199997)
    and the kept value is scale / (1 - that p), so ``x * mask`` keeps the expectation of ``x * scale``
    (``scale``: a factor the caller would otherwise apply in a pass of its own)."""
    n = math.prod(shape)
    drop = round(p * 65536)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1)
    lanes = bits.view(torch.int16)[:n].view(shape)
    # keep where lane >= drop - 32768: P(keep) = (65536 - drop) / 65536. As float arithmetic on the integer
    # lanes, clamp(lane - (drop - 32769), 0, 1) is exactly that 0/1 (integers: the difference is >= 1 or
    # <= 0): three fast passes where the int16 comparison and the bool -> float conversion took 3.6x as
    # long (1.34 M lanes, 1 CPU thread: 1,045 -> 293 us). In float32 at least (every int16 is exact there).
    # A float mask, scaled once: x * mask is one pass forward and one backward (a bool mask costs a
    # conversion in each).
    exact = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    keep = lanes.to(exact).sub_(drop - 32769).clamp_(0, 1)
    return keep.to(dtype).mul_(scale * 65536 / (65536 - drop))


@functools.cache
def _uniform_is_bernoulli() -> bool:
    """Whether this torch's CPU ``bernoulli_(q)`` is float64 ``uniform_`` compared with q: the same generator
    calls in the same order (its plain kernel; a vendor library's kernel draws otherwise). Checked on
    private generators, with a q that tells a float64 comparison from a float32 one, and on the generators'
    states after the draws (what is drawn next must be the same too)."""
    n = 257
    u = torch.empty(n, dtype=torch.float64).uniform_(generator=torch.Generator().manual_seed(7))
    i = next((i for i in range(n) if float(u[i].float()) < u[i].item()), None)
    if i is None:
        return False
    q = math.nextafter(u[i].item(), 1.0)  # u[i] < q, but float32(q) <= u[i]
    g_uniform, g_bernoulli = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    b = torch.empty(n).bernoulli_(q, generator=g_bernoulli)
    return (torch.equal(b, (u < q).float())
            and torch.equal(torch.empty(n, dtype=torch.float64).uniform_(generator=g_uniform), u)
            and torch.equal(g_uniform.get_state(), g_bernoulli.get_state()))


def torch_dropout_noise(like: torch.Tensor, p: float, rows=None) -> torch.Tensor:
    """The noise torch's CPU dropout multiplies ``like`` by: ``empty_like(like).bernoulli_(1 - p) / (1 - p)``
    (``like``'s memory layout: a transposed input draws in its memory order), read at ``rows`` if given
    (divided after the read: the same values, only those rows of work). Bit for bit the same noise, the
    generator left where ``bernoulli_`` leaves it, drawn on CPU by the first that applies: the C kernel
    (``kernels.dropout_noise``: 204 x 10 x 64 floats in 49 us on an AVX-512 Zen 5, 116 us on an AVX2 Zen 3, 1
    thread), float64 ``uniform_`` and a comparison where ``_uniform_is_bernoulli()`` holds (~550 us),
    ``bernoulli_`` itself (~800 us)."""
    keep = 1.0 - p
    if like.device.type == "cpu" and not torch.compiler.is_compiling():
        noise = kernels.dropout_noise(like, keep)
        if noise is not None:
            return noise if rows is None else noise[rows]
        if _uniform_is_bernoulli():
            u = torch.empty_like(like, dtype=torch.float64).uniform_()
            return ((u if rows is None else u[rows]) < keep).to(like.dtype).div_(keep)
    noise = torch.empty_like(like).bernoulli_(keep)
    return (noise if rows is None else noise[rows]).div_(keep)


class Dropout(nn.Dropout):
    """nn.Dropout; with ``fast_masks`` on, its masks come from ``dropout_mask`` (the same distribution to
    2^-16 in p, another random stream). The Recommender turns it on for its length-grouped path, whose
    draws differ from an ungrouped step's anyway, and everywhere with ``fast_dropout`` (the run option
    ``dropout_masks="fast"``); otherwise torch's dropout, whose draws the stored rows were made with."""
    fast_masks = False

    def _fast(self):
        return self.fast_masks and self.training and self.p > 0

    def forward(self, x):
        if self._fast():
            return x * dropout_mask(x.shape, self.p, x.dtype, x.device)
        if self.training and 0 < self.p < 1 and x.device.type == "cpu" and not self.inplace \
                and not torch.compiler.is_compiling():
            # F.dropout's CPU computation (input times that noise), its draws made faster
            return x * torch_dropout_noise(x, self.p)
        return super().forward(x)

    def add(self, x, y):
        """x + dropout(y); with fast masks one fused pass (addcmul), forward and backward."""
        if not self._fast():
            return x + self(y)
        return torch.addcmul(x, y, dropout_mask(y.shape, self.p, y.dtype, y.device))

    def scaled(self, x, scale: float):
        """dropout(x * scale); with fast masks the scale rides in the mask (one pass instead of two)."""
        if not self._fast():
            return self(x * scale)
        return x * dropout_mask(x.shape, self.p, x.dtype, x.device, scale)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its backward in five passes over the input's size, or one in the C kernel
    (kernels.rmsnorm_backward, on CPU: 200 -> 113 us forward + backward at 204 x 10 x 64). torch's CPU
    ``rms_norm`` is composite: autograd differentiates pow, mean, rsqrt and three products one by one (about
    ten passes backward). Forward: one pass in C (kernels.rmsnorm_forward; its row sums in vector lanes, so
    values equal to torch's up to float rounding), else the same operations in the same order as torch's."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        fused = kernels.rmsnorm_forward(x, weight, eps)  # one pass (C): the row sums in another order
        if fused is not None:
            y, xhat, rstd = fused
            ctx.save_for_backward(xhat, rstd, weight)
            return y
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        xhat, rstd, weight = ctx.saved_tensors
        fused = kernels.rmsnorm_backward(g, xhat, rstd, weight)  # the same arithmetic in one pass (C)
        if fused is not None:
            return fused[0] if ctx.needs_input_grad[0] else None, fused[1] if ctx.needs_input_grad[1] else None, None
        gw = g * weight  # the gradient at xhat
        # d/dx of x rstd: rstd (gw - xhat mean(gw xhat))
        dot = torch.linalg.vecdot(gw, xhat, dim=-1).unsqueeze(-1).mul_(-1.0 / xhat.shape[-1])
        gx = torch.addcmul(gw, xhat, dot).mul_(rstd) if ctx.needs_input_grad[0] else None
        g_weight = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return gx, g_weight, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters, same forward values) with a hand-written backward
    (``_RMSNormFunction``): 1.4-1.5x faster forward + backward on CPU. torch's own path where a compiler
    or autocast takes over (inductor fuses it; autocast picks the dtype) and where nothing needs a
    gradient. Tests hold the two together in float64."""

    def forward(self, x):
        if (self.weight is None or not torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.is_autocast_enabled(x.device.type) or x.dtype not in (torch.float32, torch.float64)):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _RMSNormFunction.apply(x, self.weight, eps)


@contextlib.contextmanager
def _without_onednn():
    """torch's own CPU kernels where it would call oneDNN (``torch.backends.mkldnn.flags(enabled=False)``
    without its Python cost and its TF32 warning)."""
    get, set_ = getattr(torch._C, "_get_mkldnn_enabled", None), getattr(torch._C, "_set_mkldnn_enabled", None)
    if get is None or set_ is None:  # a torch without these private switches: the public context manager
        with torch.backends.mkldnn.flags(enabled=False):
            yield
        return
    was = get()
    set_(False)
    try:
        yield
    finally:
        set_(was)


class _NativeGELUFunction(torch.autograd.Function):
    """erf-GELU forward and backward by torch's vectorised CPU kernel, not oneDNN's (see GELU)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        with _without_onednn():
            return F.gelu(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with _without_onednn():
            return torch.ops.aten.gelu_backward(g, x)


class _GELUFunction(torch.autograd.Function):
    """erf-GELU by the C kernel (kernels.gelu): one pass gives y = x Phi(x) and, where a gradient is wanted, the
    derivative Phi(x) + x phi(x), kept in x's place for the backward, which is then one product."""

    @staticmethod
    def forward(ctx, x):
        y, d = kernels.gelu(x, derivative=ctx.needs_input_grad[0])
        ctx.save_for_backward(d)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        return g * d


class GELU(nn.GELU):
    """nn.GELU (exact, erf), on CPU in float32/64 by the C kernel (``_GELUFunction``): torch's took 1.2-1.6 ns an
    element forward and 1.9-2.8 backward on a Zen 3, 1.3 ms of a 16 ms study-protocol SASRec step; the kernel's
    forward with the derivative and its one-product backward take about half. It differs from torch's by float
    rounding (its own erf, see kernels.py). Where no kernel applies and ``native`` is on (the length-grouped path,
    whose shapes change every call), torch's own kernel: on CPU, float32 GELU and its backward go to oneDNN, which
    builds (JIT-compiles) a primitive for every new shape: a grouped step's shapes are new each step, and on
    RecBole's rows (Beauty, window 50, 2,048 rows) oneDNN's primitive building took 5.8% of the step. torch's kernel
    differs from oneDNN's by float rounding (<= 1.5e-6 on values up to 9)."""
    native = False

    def forward(self, x):
        if self.approximate == "none" and not torch.compiler.is_compiling():
            if kernels.gelu_applies(x):
                return _GELUFunction.apply(x)
            if self.native and x.device.type == "cpu" and x.dtype == torch.float32:
                return _NativeGELUFunction.apply(x)
        return super().forward(x)


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, d_model: int, dropout: float, ffn_mult: int):
        super().__init__()
        self.mixer = mixer
        self.norm1 = RMSNorm(d_model, eps=1e-6)
        self.drop = Dropout(dropout)
        self.ffn = None
        if ffn_mult > 0:
            self.norm2 = RMSNorm(d_model, eps=1e-6)
            self.ffn = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), GELU(),
                                     nn.Linear(ffn_mult * d_model, d_model))

    def _ffn(self, x):
        return x if self.ffn is None else self.drop.add(x, self.ffn(self.norm2(x)))

    def forward(self, x, lengths=None):
        return self._ffn(self.drop.add(x, self.mixer(self.norm1(x), lengths)))

    def forward_last(self, x, lengths):
        """(B, L, D) -> (B, D): ``forward`` at each row's last real position, computing only that row of
        the mixer output, the residuals and the FFN. Dropout draws its masks over the whole (B, L, D), as
        ``forward`` does, and keeps their last rows: the same draws, so the same training run. With fast
        masks (the length-grouped path, ``Recommender.fast_dropout``: their own random stream anyway) it
        draws (B, D) masks for those rows only (the same distribution)."""
        rows = (torch.arange(x.shape[0], device=x.device), lengths - 1)
        row_masks = self.drop.fast_masks
        mask_shape = (x.shape[0], x.shape[2]) if row_masks else x.shape
        h = self.norm1(x)
        if type(self.mixer).forward_last is mixers.Mixer.forward_last:
            if row_masks:
                y = self.drop.add(x[rows], self.mixer(h, lengths)[rows])
            else:
                # no cheaper last output: the full one, dropped as in forward (its mask follows the output's
                # memory layout, e.g. nn.GRU's transposed batch_first output)
                y = x[rows] + self.drop(self.mixer(h, lengths))[rows]
        else:
            y = self._add_dropped_rows(x[rows], self.mixer.forward_last(h, lengths), mask_shape, rows)
        return y if self.ffn is None else self._add_dropped_rows(y, self.ffn(self.norm2(y)), mask_shape, rows)

    def forward_rows(self, x, lengths, n: int):
        """(B, L, D) -> (B, n, D): ``forward`` at lengths - 1, ..., lengths - n (clamped at 0), the mixer
        giving those rows (its ``forward_rows``) and the residuals and FFN computed there only. Evaluation
        only (no dropout here): training reads ``forward_last``, whose dropout draws match ``forward``."""
        if self.training and self.drop.p > 0:
            raise RuntimeError("Block.forward_rows is for evaluation (no dropout)")
        y = end_rows(x, lengths, n) + self.mixer.forward_rows(self.norm1(x), lengths, n)
        return y if self.ffn is None else y + self.ffn(self.norm2(y))

    def _add_dropped_rows(self, base, y, mask_shape, rows):
        """base + dropout of the rows ``rows`` of a (B, L, D) output, y (B, D): a mask of ``mask_shape``
        (B, L, D) read at those rows, as torch's CPU dropout draws it for the whole output; or a (B, D)
        mask (with fast masks), added in one fused pass."""
        p = self.drop.p
        if not self.training or p == 0:
            return base + y
        if len(mask_shape) == 2:
            return self.drop.add(base, y)
        # as torch's CPU dropout: a Bernoulli(1 - p) mask of the input's shape (contiguous, as the Linear
        # outputs it stands for), divided by 1 - p, times input
        full = torch.empty(mask_shape, dtype=y.dtype, device=y.device)  # the output's stand-in (never filled)
        return base + y * torch_dropout_noise(full, p, rows)

    def step(self, x, state):
        y, state = self.mixer.step(self.norm1(x), state)
        return self._ffn(self.drop.add(x, y)), state


class Recommender(nn.Module):
    def __init__(self, n_items: int, mixer: str, mixer_opts: dict | None = None, d_model: int = 64,
                 n_layers: int = 2, max_len: int = 50, dropout: float = 0.2, ffn_mult: int = 2,
                 readout: str = "last", readout_opts: dict | None = None):
        super().__init__()
        self.n_items, self.d_model = n_items, d_model
        self.item_emb = Embedding(n_items + 1, d_model, padding_idx=0)
        # small init times sqrt(d) in the forward (SASRec): Adam's steps are absolute, so small stored
        # embeddings move fast; with std-1 storage ML-1M stayed at the popularity baseline for 18 epochs
        nn.init.normal_(self.item_emb.weight, std=0.02)
        self.emb_scale = d_model ** 0.5
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.emb_drop = Dropout(dropout)
        # mixer "none": no sequence mixing at all (the DIN / ComiRec rows read raw item embeddings)
        self.blocks = nn.ModuleList(
            Block(mixers.build(mixer, d_model, max_len, **(mixer_opts or {})), d_model, dropout, ffn_mult)
            for _ in range(0 if mixer == "none" else n_layers))
        self.norm = RMSNorm(d_model, eps=1e-6)
        self.target_mlp = nn.Sequential(nn.Linear(d_model, d_model), GELU(), nn.Linear(d_model, d_model))
        self.readout = build_readout(readout, d_model, max_len=max_len, **(readout_opts or {}))
        # run a batch's rows through the encoder in groups of similar length where that saves padding
        # (length_groups); False: always the whole batch at once (the reference the tests hold it to)
        self.group_lengths = True
        self.group_min_positions = getattr(self.blocks[0].mixer, "group_min_positions", 0) if self.blocks else 0
        self.group_midpoints_min_rows = (getattr(self.blocks[0].mixer, "group_midpoints_min_rows", None)
                                         if self.blocks else None)
        self.fast_dropout = False

    # ---- features -------------------------------------------------------------------------
    def _groups(self, lengths, width):
        if not self.group_lengths:
            return None
        fine = self.group_midpoints_min_rows is not None and lengths.numel() >= self.group_midpoints_min_rows
        return length_groups(lengths, width, self.group_min_positions, 2 if fine else 1)

    def encode(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids -> (B, L, D) sequence features H (causal: H[t] sees items 0..t)."""
        return self._encoded(self._encode, inputs, lengths)[0]

    @property
    def fast_dropout(self) -> bool:
        """Every dropout mask from ``dropout_mask`` (the run option ``dropout_masks="fast"``), not only the
        length-grouped path's: another random stream than torch's dropout, the same distribution."""
        return self._fast_dropout

    @fast_dropout.setter
    def fast_dropout(self, on: bool):
        self._fast_dropout = bool(on)
        for m in self.modules():
            if isinstance(m, Dropout):
                m.fast_masks = self._fast_dropout

    @contextlib.contextmanager
    def _grouped_kernels(self, rows: int = 0):
        """While the length-grouped path runs: dropout masks from ``dropout_mask`` (see ``Dropout``) and, for a
        batch of at least NATIVE_GELU_MIN_ROWS ``rows``, the blocks' GELU by torch's kernel (see ``GELU``)."""
        drops = [m for m in self.modules() if isinstance(m, Dropout)]
        gelus = [m for m in self.modules() if isinstance(m, GELU)] if rows >= NATIVE_GELU_MIN_ROWS else []
        for m in drops:
            m.fast_masks = True
        for m in gelus:
            m.native = True
        try:
            yield
        finally:
            for m in drops:
                m.fast_masks = self._fast_dropout
            for m in gelus:
                m.native = False

    def _encode(self, emb, lengths):
        x = self.emb_drop.scaled(emb, self.emb_scale)
        for block in self.blocks:
            x = block(x, lengths)
        return self.norm(x)

    def encode_ends(self, inputs: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
        """(B, n, D) = ``encode`` at lengths - 1, ..., lengths - n (clamped at 0): evaluation's test and
        validation rows from one encode, the last block computing those rows only. Reference: ``encode``
        read at those rows; tests hold them together."""
        if not self.blocks:
            return end_rows(self.encode(inputs, lengths), lengths, n)
        x = self.emb_drop.scaled(self.item_emb(inputs), self.emb_scale)
        for block in self.blocks[:-1]:
            x = block(x, lengths)
        return self.norm(self.blocks[-1].forward_rows(x, lengths, n))

    def encode_last(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, D) = ``encode`` at each row's last real position (lengths - 1), the last block computing
        that position only. The reference is last_position(encode(...)); tests hold them together."""
        if not self.blocks:
            return last_position(self.encode(inputs, lengths), lengths)
        return self._encoded(self._encode_last, inputs, lengths)[0]

    def _encode_last(self, emb, lengths):
        x = self.emb_drop.scaled(emb, self.emb_scale)
        for block in self.blocks[:-1]:
            x = block(x, lengths)
        return self.norm(self.blocks[-1].forward_last(x, lengths))

    def item_features(self, ids: torch.Tensor) -> torch.Tensor:
        return self.target_mlp(self.item_emb(ids) * self.emb_scale)

    def item_table(self) -> torch.Tensor:
        """F_t of every item id (row 0 is padding)."""
        return self.target_mlp(self.item_emb.weight * self.emb_scale)

    def _candidate_features(self, ids: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        if table is not None:
            return gather_rows(table, ids)
        # many lookups: run the MLP once per item instead of once per lookup
        if ids.numel() > self.n_items + 1:
            return gather_rows(self.item_table(), ids)
        return self.item_features(ids)

    def _lookup(self, inputs, ids=None, table=None):
        """The inputs' embeddings (B, L, D) and the candidates' features F (ids' shape + (D,); None without
        ids). Where the candidates go through the embedding (few of them, no table), both are one gather:
        each gather's backward is a zero-filled dense (n_items + 1, D) gradient, and the two were summed,
        every step (Beauty, study protocol: ~30% of a ComiRec-DR step). Features and gradients are the
        same, up to the order in which one item's gradient rows are summed."""
        if ids is None:
            return self.item_emb(inputs), None
        if table is not None or ids.numel() > self.n_items + 1:
            return self.item_emb(inputs), self._candidate_features(ids, table)
        b, n = inputs.shape[0], inputs.shape[1]
        emb = self.item_emb(torch.cat([inputs, ids.reshape(b, -1)], 1))
        x, c = emb.split([n, emb.shape[1] - n], 1)
        return x, self.target_mlp(c.reshape(*ids.shape, -1) * self.emb_scale)

    def _lookup_groups(self, inputs, groups, ids=None, table=None):
        """``_lookup`` for the length-grouped path: each group's inputs ``inputs[rows, :n]`` (B_g, n, D) and
        the candidates' features, gathering the groups' positions only. A gather of the padded batch reads
        every padding position and its backward writes each one, and splitting its output into groups is a
        copy each way (RecBole's rows, Beauty at window 50: 112,640 ids a step where the groups hold 21,074
        positions and the candidates 10,240; the step 148.7 -> 141.4 ms). The same embeddings; the
        embedding's gradient rows are summed in another order (float noise)."""
        parts = [inputs[idx, :n] for idx, n in groups]
        sizes = [p.numel() for p in parts]
        # as _lookup: one gather for both where the candidates go through the embedding
        with_candidates = ids is not None and table is None and ids.numel() <= self.n_items + 1
        flat = torch.cat([p.reshape(-1) for p in parts] + ([ids.reshape(-1)] if with_candidates else []))
        emb = self.item_emb(flat).split(sizes + ([ids.numel()] if with_candidates else []))
        xs = [e.view(*p.shape, -1) for e, p in zip(emb, parts)]
        if with_candidates:
            return xs, self.target_mlp(emb[-1].view(*ids.shape, -1) * self.emb_scale)
        return xs, None if ids is None else self._candidate_features(ids, table)

    def _encoded(self, encode, inputs, lengths, ids=None, table=None):
        """``encode`` (``_encode`` or ``_encode_last``) of the inputs' embeddings, and the candidates'
        features (None without ids): in length groups where they pay (``_groups``), each group looked up on
        its own positions (``_lookup_groups``), else the whole padded batch."""
        groups = self._groups(lengths, inputs.shape[1]) if self.blocks else None
        if groups is None:
            emb, cand = self._lookup(inputs, ids, table)
            return encode(emb, lengths), cand
        parts, cand = self._lookup_groups(inputs, groups, ids, table)
        with self._grouped_kernels(len(lengths)):
            return per_group(encode, parts, lengths, groups, inputs.shape[1]), cand

    # ---- scores ---------------------------------------------------------------------------
    def train_logits(self, inputs, lengths, targets, negatives) -> torch.Tensor:
        """(B, L, 1 + n_neg) logits at every position, positive first."""
        h, cand = self._encoded(self._encode, inputs, lengths, torch.cat([targets[..., None], negatives], dim=-1))
        return self.readout.train_scores(h, lengths, cand)

    def score_candidates(self, inputs, lengths, candidates, table=None) -> torch.Tensor:
        """(B, C) logits of candidates (B, C) at each row's last position (evaluation, and the instance
        regime's training rows). The "last" readout needs H there only: ``encode_last``."""
        if isinstance(self.readout, LastReadout):
            h, cand = self._encoded(self._encode_last if self.blocks else self._encode, inputs, lengths,
                                    candidates, table)
            return candidate_dot(cand, h if self.blocks else last_position(h, lengths))
        h, cand = self._encoded(self._encode, inputs, lengths, candidates, table)
        return self.readout.scores(h, lengths, cand)

    def score_all(self, inputs, lengths, table=None) -> torch.Tensor:
        """(B, n_items + 1) scores of every item (column 0 is padding)."""
        table = self.item_table() if table is None else table
        h = self.encode(inputs, lengths)
        return self.readout.scores_all(h, lengths, table)

    # ---- streaming (serving): one new click updates the carried state ----------------------
    def init_stream(self, batch_size: int, device=None, dtype=None):
        return [b.mixer.init_state(batch_size, device=device, dtype=dtype) for b in self.blocks]

    def stream(self, items: torch.Tensor, state):
        """items (B, t) new clicks -> (B, t, D) features H for them, and the new state."""
        x = self.item_emb(items) * self.emb_scale
        new = []
        for block, s in zip(self.blocks, state):
            x, s = block.step(x, s)
            new.append(s)
        return self.norm(x), new


def bce_loss(logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """BCE on click probabilities: label 1 for the positive (column 0), 0 for the negatives, averaged
    over real positions only (targets == 0 marks padding; None: every row is real, as in instances)."""
    labels = torch.zeros_like(logits)
    labels[..., 0] = 1
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(-1)
    if targets is None:
        return loss.mean()
    mask = (targets > 0).to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1)
