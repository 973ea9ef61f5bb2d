"""Readouts: how the sequence features H become a score for a candidate item.

A row of the study's Table 1 is a (mixer, readout) pair. Every readout takes
- ``h``: (B, L, D) the mixer sequence features (right-padded), ``lengths``: (B,),
- candidate features F_t: (B, L, C, D) at every position for training, (B, C, D) for evaluation,
and returns logits of the same leading shape. A new readout is a class here and one ``READOUTS`` line.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import BenchboxError, kernels


def last_position(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return h[torch.arange(h.shape[0], device=h.device), lengths - 1]


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` (ids of any shape) as one index_select: on CPU 6x faster than advanced indexing for
    evaluation's (256, 101) candidates, and its backward is an index_add rather than an index_put (on CPU
    the C kernel's, ``kernels.rows_add``: the same sums in the same order, 4-7x faster)."""
    if _rows_kernel_applies(table):
        return _TableRows.apply(table, ids.reshape(-1), -1).view(*ids.shape, table.shape[-1])
    return table.index_select(0, ids.reshape(-1)).view(*ids.shape, table.shape[-1])


def _rows_kernel_applies(table: torch.Tensor) -> bool:
    return (table.requires_grad and torch.is_grad_enabled() and table.device.type == "cpu"
            and not torch.compiler.is_compiling())


class _TableRows(torch.autograd.Function):
    """Rows of a (N, D) table at flat ids: forward index_select (``skip`` -1) or F.embedding (``skip`` the
    padding id, whose row gets no gradient). Backward: torch's own gradient (index_add_ into zeros, or
    embedding_dense_backward), from ``kernels.rows_add`` where it applies: torch sums one row's
    contributions in id order through a TensorIterator call per id (~50-80 ns each: 7.8 ms for an ML-1M
    sequence step's 154,000 ids), the kernel in the same order with a plain loop (1.9 ms): bit for bit."""

    @staticmethod
    def forward(ctx, table, flat_ids, skip):
        ctx.save_for_backward(flat_ids)
        ctx.n, ctx.skip = table.shape[0], skip
        return table.index_select(0, flat_ids) if skip < 0 else F.embedding(flat_ids, table, padding_idx=skip)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        out = kernels.rows_add(ctx.n, ids, grad, ctx.skip)
        if out is None:
            if ctx.skip < 0:
                out = grad.new_zeros(ctx.n, grad.shape[-1]).index_add_(0, ids, grad)
            else:
                out = torch.ops.aten.embedding_dense_backward(grad, ids, ctx.n, ctx.skip, False)
        return out, None, None


class Embedding(nn.Embedding):
    """nn.Embedding (the same parameters, state and forward); on CPU with a dense gradient its backward runs
    through ``_TableRows`` (the C kernel: the same gradient, bit for bit)."""

    def forward(self, ids):
        if self.max_norm is not None or self.sparse or self.scale_grad_by_freq or not _rows_kernel_applies(self.weight):
            return super().forward(ids)
        skip = -1 if self.padding_idx is None else self.padding_idx
        return _TableRows.apply(self.weight, ids.reshape(-1), skip).view(*ids.shape, self.weight.shape[-1])


class _CandidateDot(torch.autograd.Function):
    """candidate_dot for few candidates a row in C (kernels.cand_dot), one pass each way without the multiply-and-sum's
    (..., C, D) temporaries (three a step, 33 MB each in the sequence regime on ML-1M). ``candidate_dot_reference``
    is the reference; tests hold them together."""

    @staticmethod
    def forward(ctx, cand, f):
        ctx.save_for_backward(cand, f)
        return kernels.cand_dot(cand, f)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        cand, f = ctx.saved_tensors
        return kernels.cand_dot_backward(g, cand, f, *ctx.needs_input_grad[:2])


def candidate_dot_reference(cand: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``candidate_dot`` in torch's ops. A batched matrix-vector product is slow on CPU (one tiny gemv per row): with
    few candidates (training's 1 + 4) a multiply-and-sum is 2-3x faster forward + backward, with many (evaluation's
    101) a row-times-matrix product is 5x faster than the gemv."""
    if cand.shape[-2] <= 16:
        return (cand * f.unsqueeze(-2)).sum(-1)
    return (f.unsqueeze(-2) @ cand.transpose(-1, -2)).squeeze(-2)


def candidate_dot(cand: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """(..., C, D) candidates . (..., D) features -> (..., C) logits; reference: ``(cand @ f[..., None])[..., 0]``.
    Few candidates a row, on CPU: one C pass each way (``_CandidateDot``) where it applies; else torch's ops
    (``candidate_dot_reference``)."""
    if (cand.shape[-2] <= 16 and kernels.cand_dot_applies(cand, f) and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu")):
        return _CandidateDot.apply(cand, f)
    return candidate_dot_reference(cand, f)


class LastReadout(nn.Module):
    """TTT4Rec / SASRec / GRU4Rec: F_s = H at the last real position; score = F_s . F_t."""

    def __init__(self, d_model: int):
        super().__init__()

    def train_scores(self, h, lengths, cand):
        return candidate_dot(cand, h)  # (B,L,C,D) . (B,L,D)

    def scores(self, h, lengths, cand):
        return candidate_dot(cand, last_position(h, lengths))

    def scores_all(self, h, lengths, table):
        return last_position(h, lengths) @ table.T


def _scores_all_chunked(readout, h, lengths, table, chunk=1024):
    """Full ranking for target-dependent readouts: score every item in chunks of the catalogue."""
    out = []
    for i in range(0, table.shape[0], chunk):
        cand = table[i:i + chunk].unsqueeze(0).expand(h.shape[0], -1, -1)
        out.append(readout.scores(h, lengths, cand))
    return torch.cat(out, 1)


def _causal_mask(t: int, s: int, device, t0: int = 0) -> torch.Tensor:
    """(T, S): True where history position s is visible from target position t0 + t (s <= t0 + t)."""
    return torch.arange(s, device=device)[None, :] <= torch.arange(t0, t0 + t, device=device)[:, None]


class _PReLURows(torch.autograd.Function):
    """nn.PReLU on rows (N, C) with its per-channel slopes a (C,): torch's forward, and a backward in plain
    passes. torch's CPU ``_prelu_kernel_backward`` took 1.5 ms of a 10 ms DIN step (ML-1M, study protocol:
    (10200, 36)); this one 1.9x less alone. The same values: slope 1 where x > 0, else a (x = 0 included)."""

    @staticmethod
    def forward(ctx, x, a):
        ctx.save_for_backward(x, a)
        return F.prelu(x, a)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        slope = x.sign().clamp_(min=0).mul_(1 - a).add_(a)  # sign: 1 for x > 0, 0 at x = 0, -1 below
        return g * slope, (g * x.clamp(max=0)).sum(0)


class _DINPairs(torch.autograd.Function):
    """DIN's activation unit over every (candidate, history item) pair, y[b, n, s] = sum_h w_h PReLU(z)[b, n, h, s]
    with z[b, n, h, s] = ps[b, s, h] + qc[b, n, h] + sum_d cand[b, n, d] r[h, d] h[b, s, d], forward and backward
    by hand. The pairs are laid out (n, h, s): one batched matmul of (cand_n * r_h) rows (N H x D) by the
    history (D x S) gives z, and its backward is two more. Autograd of the same arithmetic in the (n, s, h)
    layout (checkpointed) recorded ~25 elementwise passes over z, the forward twice, and the (S, H, D) product
    h_s * r_h per target block; this one makes five (two forward, three backward) besides its matmuls and the
    forward's one matrix-vector product. With ``save`` max(z, 0) is kept for the backward (memory: every
    chunk's at once); without it z is recomputed there (one more matmul, z one chunk at a time). ML-1M,
    sequence regime, 1 thread: 4.8 -> 2.75 s a step (2026-12-07, MKL's generic kernels). On CPU, three C kernels
    (kernels.py) fuse passes that torch makes separately: relu_ with the weighted sum over H, threshold_backward
    with tb's two sums, and tcr's two reductions (float rounding: another summation order; ML-1M DIN step
    1.15x). ``DINReadout._pool`` (an einsum) is the reference."""

    @staticmethod
    def _z(h, cand, ps, qc, r):
        b, n, d = cand.shape
        hid, s = r.shape[0], h.shape[1]
        # the biases first, one pass writing z (ps transposed once, small: added as a strided view it ran 7x
        # slower), then the product accumulated onto them (two in-place adds after the matmul were two passes)
        z = torch.add(ps.transpose(1, 2).contiguous().unsqueeze(1), qc.unsqueeze(-1))  # (B, N, H, S)
        cr = (cand.unsqueeze(2) * r).view(b, n * hid, d)
        z.view(b, n * hid, s).baddbmm_(cr, h.transpose(1, 2))
        return z

    @staticmethod
    def forward(ctx, h, cand, ps, qc, r, a, w, save: bool):
        z = _DINPairs._z(h, cand, ps, qc, r)
        b, n, hid, s = z.shape
        # PReLU(z) = a z + (1 - a) max(z, 0), so y = sum_h a_h w_h z + sum_h (1 - a_h) w_h max(z, 0): the linear
        # part from z's factors (a (N, D) x (D, S) product), then z made max(z, 0) in place (one pass; kept, it is
        # all the backward reads of the pairs: [z > 0]) and one batched matvec (torch's PReLU over these
        # shapes, channels in the middle, ran 2-3x slower than on rows). The weights as a real (B N, 1, H)
        # tensor: an expanded one sends bmm to a copying per-matrix loop.
        aw = a * w
        y = torch.bmm(cand * (aw @ r), h.transpose(1, 2)).add_((ps @ aw).unsqueeze(1)).add_((qc @ aw).unsqueeze(-1))
        if kernels.din_relu_matvec(z.view(b * n, hid, s), ((1 - a) * w).contiguous(), y.view(b * n, s)):
            zpos = z  # both in one pass over the pairs (the C kernel), where it applies
        else:
            zpos = z.relu_()
            wpos = ((1 - a) * w).view(1, 1, hid).expand(b * n, 1, hid).contiguous()
            y.view(b * n, 1, s).baddbmm_(wpos, zpos.view(b * n, hid, s))
        ctx.save = save
        ctx.save_for_backward(h, cand, ps, qc, r, a, w, *((zpos,) if save else ()))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        h, cand, ps, qc, r, a, w = ctx.saved_tensors[:7]
        b, n, d = cand.shape
        s, hid = h.shape[1], r.shape[0]
        zpos = ctx.saved_tensors[7] if ctx.save else _DINPairs._z(h, cand, ps, qc, r).relu_()  # max(z, 0)
        zf = zpos.view(b * n, hid, s)
        gyf = gy.reshape(b * n, 1, s)
        g2 = gy.reshape(b, n, s)
        # dz = gy PReLU'(z) w = c2 gy + c1 tb with tb = gy [z > 0] (z = 0 takes the slope a, as torch's PReLU):
        # dz itself is never formed. Its four uses (sums over s and over n, products with h and with the
        # (cand_n * r_h) rows) take c2 gy through small (B, N, S) factors and c1 tb with c1 folded into r, so
        # the pairs are read three times here (tb and its two sums) besides the two matmuls
        c1, c2 = (1 - a) * w, a * w
        fused = kernels.din_threshold_sums(zpos.view(b, n, hid, s), g2.contiguous())  # tb and its sums, one pass
        if fused is not None:
            tb, tb_s, tb_n = fused[0].view(b * n, hid, s), fused[1], fused[2].transpose(1, 2)
        else:
            tb = torch.ops.aten.threshold_backward(gyf.expand_as(zf), zf, 0.0)  # torch.where ran 6x slower
            tb_s = tb.sum(-1).view(b, n, hid)  # (B, N, H)
            tb_n = tb.view(b, n, hid, s).sum(1).transpose(1, 2)  # (B, S, H)
        gh = torch.bmm(g2, h)  # (B, N, D)
        gs_n, gs_s = g2.sum(1), g2.sum(2)  # (B, S), (B, N)
        dqc = torch.addcmul(tb_s * c1, gs_s[..., None], c2)
        dps = torch.addcmul(tb_n * c1, gs_n[..., None], c2)
        tbb = tb.view(b, n * hid, s)
        r1, r2 = c1[:, None] * r, c2 @ r  # (H, D), (D,)
        dh = torch.bmm(tbb.transpose(1, 2), (cand.unsqueeze(2) * r1).view(b, n * hid, d))
        dh.baddbmm_(g2.transpose(1, 2), cand * r2)
        tcr = torch.bmm(tbb, h).view(b, n, hid, d)  # (einsum's plans for the two below ran bmm one matrix at a time)
        fused = kernels.din_tcr_sums(tcr, r1.contiguous(), cand.contiguous())  # both sums in one read of tcr
        if fused is not None:
            dcand, m_tb = fused[0].addcmul_(gh, r2), fused[1]
        else:
            dcand = (tcr * r1).sum(2).addcmul_(gh, r2)
            m_tb = (tcr * cand.unsqueeze(2)).sum((0, 1))  # (H, D): sum tb (cand . h) per (h, d)
        m_gy = (cand * gh).sum((0, 1))  # (D,): sum gy (cand . h) per d
        dr = (m_tb * c1[:, None]).addcmul_(c2[:, None], m_gy)
        # dw = sum gy PReLU(z) = a sum gy z + (1 - a) sum gy max(z, 0), da = w sum gy min(z, 0) = w (sum gy z -
        # sum gy max(z, 0)). Both sums from the factors of z = ps + qc + (cand_n * r_h) . h_s, never from the
        # pairs: sum gy z = ps . (sum_n gy) + qc . (sum_s gy) + r . m_gy, and sum gy max(z, 0) = sum tb z (tb is
        # gy where z > 0) = ps . (sum_n tb) + qc . (sum_s tb) + r . m_tb, all three already at hand. (It was a
        # batched matrix-vector product over max(z, 0): one more read of the pairs at ~4 GFLOP/s, 137 ms of a
        # 1.54 s ML-1M step.)
        s_all = (ps * gs_n[..., None]).sum((0, 1)) + (qc * gs_s[..., None]).sum((0, 1)) + r @ m_gy
        s_pos = (ps * tb_n).sum((0, 1)) + (qc * tb_s).sum((0, 1)) + (r * m_tb).sum(-1)
        dw = a * s_all + (1 - a) * s_pos
        da = w * (s_all - s_pos)
        return dh, dcand, dps, dqc, dr, da, dw, None


class DINReadout(nn.Module):
    """DIN (Zhou et al. 2018): target attention. For a candidate c and each history item s, an
    activation unit MLP on [e_s, e_c, e_s - e_c, e_s * e_c] gives an UNNORMALISED weight (no softmax),
    padding and future positions masked; the interest is the weighted sum of the history features.
    Choice: the click score stays the shared dot product (W_o interest) . F_t of every benchbox model
    (the original feeds [profile, interest, target] to an MLP); the first activation layer is applied in
    its algebraically equal split form (P e_s + Q e_c + R (e_s * e_c)) so that the concatenation is
    never materialised."""

    def __init__(self, d_model: int, hidden: int = 36):
        super().__init__()
        self.p = nn.Linear(d_model, hidden)
        self.q = nn.Linear(d_model, hidden, bias=False)
        self.r = nn.Parameter(torch.randn(hidden, d_model) * d_model ** -0.5)
        self.act = nn.PReLU(hidden)  # holds the slopes (state dict key act.weight); applied by _PReLURows
        self.w = nn.Linear(hidden, 1)
        self.out = nn.Linear(d_model, d_model)

    def _pool(self, h, lengths, cand, causal: bool, t0: int = 0):
        # h: (B,S,D) history features; cand: (B,T,C,D) candidates at target positions t0..t0+T-1
        ps = self.p(h)  # (B,S,H)
        qc = self.q(cand)  # (B,T,C,H)
        z = ps[:, None, None] + qc[:, :, :, None] + torch.einsum("bsd,hd,btcd->btcsh", h, self.r, cand)
        return self._pool_from_activations(z, h, lengths, causal, t0)

    def _pool_from_activations(self, z, h, lengths, causal: bool, t0: int):
        """z: (B,T,C,S,H) first-layer activations -> pooled interests (B,T,C,D); padding (and, if
        causal, history after target position t0 + t) weighs 0."""
        w = self.w(_PReLURows.apply(z.flatten(0, -2), self.act.weight).view_as(z)).squeeze(-1)  # (B,T,C,S)
        return self._pool_from_weights(w, h, lengths, causal, t0)

    def _pool_from_weights(self, w, h, lengths, causal: bool, t0: int):
        """w: (B,T,C,S) attention weights -> pooled interests (B,T,C,D), masked as _pool_from_activations."""
        t, s = w.shape[1], w.shape[3]
        valid = torch.arange(s, device=h.device)[None, :] < lengths[:, None]  # (B,S)
        mask = valid[:, None, None, :]
        if causal:
            mask = mask & _causal_mask(t, s, h.device, t0)[None, :, None, :]
        w = w.masked_fill(~mask, 0.0)
        return self.out(torch.einsum("btcs,bsd->btcd", w, h))

    # elements of the (B,T,C,S,H) activation tensor above which training goes chunk by chunk (blocks of target
    # positions over their visible history only). Was 64 Mi: one chunk then computed every (t, s) pair of a
    # Beauty or Electronics batch (L 50), the masked half too. At 8 Mi, 1 thread: their long batches 1.2-1.4x
    # faster, a whole epoch within noise (Beauty 5.8-6.4 s against 6.3-7.2), peak memory 0.9 GB against 2.3
    MAX_PAIR_ELEMENTS = 8 * 2 ** 20
    # elements of one chunk: small enough to stay in the CPU's last-level cache between the matmul and
    # the elementwise passes (PReLU and its backward) that dominate; on 1 thread 2-8 Mi were alike
    # within noise and 64 Mi took twice as long
    CHUNK_ELEMENTS = 8 * 2 ** 20
    # elements of one chunk of ``scores`` without autograd (evaluation): small enough for this CPU's L2
    # (2 MiB a core) between the matmul and the elementwise passes. One ML-1M evaluation, sequence regime
    # (6,040 users x 2 splits x 100 candidates x 200 items), 1 thread: 14.7 s in 8 Mi chunks, 9.7 s in 512 Ki
    # (Beauty, study protocol: 3.8-4.3 -> 3.1-3.2 s). Training keeps the sizes above: its checkpointed chunks
    # were slower at 512 Ki-1 Mi (ML-1M, sequence regime: 7.2-7.5 s a step against 6.3-6.7 at 8 Mi)
    EVAL_CHUNK_ELEMENTS = 2 ** 19
    # target positions per chunk (see train_scores)
    TARGET_BLOCK = 16
    # ``_DINPairs`` keeps every chunk's max(z, 0) for its backward while all of a step's fit in this many
    # bytes, else recomputes each chunk's z there. ML-1M, sequence regime (batch 128, L 200: 2 GB of pairs),
    # 1 thread, when it came (e81f3b8): 3.3 s a step keeping z (3.4 GB peak), 3.6 s recomputing (1.1 GB)
    SAVE_PAIRS_BYTES = 3 * 2 ** 30
    # the few-candidates form (autograd) recomputes each chunk in the backward pass (checkpoint), or with
    # False keeps every chunk's activations: one 128 x 200 batch then took 6.7 GB against 1.5 GB
    CHECKPOINT = True

    def _form(self, t: int, c: int, s: int) -> str:
        """How a chunk of t target positions x c candidates over s history items is computed: "candidates"
        (few a position, the instance regime's 5 at one: h_s * cand first, then a matmul with r), "pairs"
        (training, s >= PAIRS_MIN_RATIO t c: ``_DINPairs``, whose (cand * r_h) rows cost t c H D) or "history"
        (h_s * r_h first, S H D; evaluation's 100 candidates, short histories)."""
        if t * c < self.r.shape[0]:
            return "candidates"
        return "pairs" if torch.is_grad_enabled() and s >= self.PAIRS_MIN_RATIO * t * c else "history"

    # history items per candidate row from which training uses _DINPairs (see _form). 1 thread, sequence regime:
    # Beauty 40.6 ms a step at 0.5, 44.1 at 1, 49.0 at 0 (every chunk); ML-1M 3.3-3.5 s at any of them
    PAIRS_MIN_RATIO = 0.5

    def train_scores(self, h, lengths, cand):
        b, t, c, _ = cand.shape
        s, hid = h.shape[1], self.r.shape[0]
        if b * t * c * s * hid <= self.MAX_PAIR_ELEMENTS:  # _pool's arithmetic (its reference) in one chunk
            return self._pool_chunk(h, lengths, cand, 0)
        # Long sequences (ML-1M, L 200): the activation tensor is O(L^2) per sequence and would need
        # ~20 GB at batch 128. Go over (users, target positions) in chunks; a chunk ending at t1 only
        # sees history s < t1 (the causal mask zeroes the rest, so slicing it off is exact and halves
        # the work). Blocks of TARGET_BLOCK target positions waste only their own upper triangle (about
        # TARGET_BLOCK / 2L of the work); several users a chunk fill a cache-sized budget. Candidates are
        # split() (not sliced: the backward of a slice writes a zero tensor of the whole input).
        tstep = min(t, self.TARGET_BLOCK)
        bstep = max(1, min(b, self.CHUNK_ELEMENTS // (c * hid * tstep * s)))
        pairs = b * c * hid * sum(min(tstep, t - t0) * min(s, t0 + tstep) for t0 in range(0, t, tstep))
        save = pairs * h.element_size() <= self.SAVE_PAIRS_BYTES
        rows = []
        for hb, lb, cb in zip(h.split(bstep), lengths.split(bstep), cand.split(bstep)):
            cols = []
            for t0, cbt in zip(range(0, t, tstep), cb.split(tstep, 1)):
                args = (hb[:, :t0 + cbt.shape[1]], lb, cbt, t0)
                recompute = self.CHECKPOINT and self._form(cbt.shape[1], c, args[0].shape[1]) != "pairs"
                cols.append(checkpoint(self._pool_chunk, *args, use_reentrant=False) if recompute
                            else self._pool_chunk(*args, save=save))
            rows.append(torch.cat(cols, 1))
        return torch.cat(rows, 0)

    def _pool_chunk(self, h, lengths, cand, t0: int, save: bool = True):
        """Scores of one chunk: the arithmetic of _pool in the form ``_form`` picks (``save``: _DINPairs keeps
        its z for the backward)."""
        b, t, c, d = cand.shape
        s, hid = h.shape[1], self.r.shape[0]
        form = self._form(t, c, s)
        if form == "pairs":
            args = (h, cand.reshape(b, t * c, d), self.p(h), self.q(cand).view(b, t * c, hid), self.r,
                    self.act.weight, self.w.weight.view(hid))
            if torch.is_autocast_enabled(h.device.type):  # one dtype throughout the hand-written passes: float32
                with torch.autocast(h.device.type, enabled=False):
                    y = _DINPairs.apply(*(x.float() for x in args), save)
            else:
                y = _DINPairs.apply(*args, save)
            return (self._pool_from_weights(y.view(b, t, c, s) + self.w.bias, h, lengths, True, t0) * cand).sum(-1)
        if form == "history":  # h_s * r_h first (B, S H, D): its (D x S H) product with the candidates is z in an
            # (s, h) layout. ML-1M's evaluation: 9.5 s against 10.3 as _DINPairs (100 candidates x H x D a user)
            hr = (h[:, :, None, :] * self.r).reshape(b, s * hid, d)
            z = torch.baddbmm(self.p(h).reshape(b, 1, s * hid), cand.reshape(b, t * c, d), hr.transpose(1, 2))
            z = z.view(b, t, c, s, hid)
        else:  # few candidates (the instance regime's 5 at one position): h_s * cand first, then one matmul with r
            hc = h[:, None, :, :] * cand.reshape(b, t * c, 1, d)  # (B, TC, S, D)
            z = (hc @ self.r.T).view(b, t, c, s, hid) + self.p(h)[:, None, None]
        z = z + self.q(cand)[:, :, :, None, :]
        return (self._pool_from_activations(z, h, lengths, True, t0) * cand).sum(-1)

    def scores(self, h, lengths, cand):
        b, c, _ = cand.shape
        s, hid = h.shape[1], self.r.shape[0]
        # the candidates stand at the last position (t0 = s - 1), so the causal mask hides nothing. The
        # einsum of _pool (the reference) materialised a (B, C, S, H, D) product: 5x slower per ML-1M step
        limit, chunk = ((self.MAX_PAIR_ELEMENTS, self.CHUNK_ELEMENTS) if torch.is_grad_enabled()
                        else (self.EVAL_CHUNK_ELEMENTS, self.EVAL_CHUNK_ELEMENTS))
        if b * c * s * hid <= limit:
            return self._pool_chunk(h, lengths, cand.unsqueeze(1), s - 1).squeeze(1)
        # many pairs (evaluation's 100 candidates, ML-1M's 200 items): a few users at a time
        bstep = max(1, chunk // (c * s * hid))
        return torch.cat([self._pool_chunk(hb, lb, cb.unsqueeze(1), s - 1).squeeze(1)
                          for hb, lb, cb in zip(h.split(bstep), lengths.split(bstep), cand.split(bstep))])

    def scores_all(self, h, lengths, table):
        return _scores_all_chunked(self, h, lengths, table, chunk=256)


class _MultiInterestReadout(nn.Module):
    """What ComiRec-SA and -DR share: ``interests(h, lengths, causal)`` gives K interest vectors
    ((B,T,K,D) at every target position when causal, (B,K,D) at the end otherwise); training picks
    one interest per target by ``select``, evaluation scores each candidate by its best interest."""
    DEFAULT_EPOCHS = 50

    def train_scores(self, h, lengths, cand):
        return _pick_interest(self.interests(h, lengths, causal=True), cand, self.select)

    def scores(self, h, lengths, cand):
        return (cand @ self.interests(h, lengths, causal=False).transpose(1, 2)).amax(-1)

    def scores_all(self, h, lengths, table):
        return torch.einsum("bkd,nd->bnk", self.interests(h, lengths, causal=False), table).amax(-1)


class _SigmoidProject(torch.autograd.Function):
    """sigmoid(u) @ w.T with its backward, each one pass in C (kernels.sigmoid_project): at ComiRec-SA's
    (2040, 256) x (4, 256) of a study step, torch's sigmoid, product, sigmoid_backward and two products make
    five passes over a 2 MB tensor. The same function as ``F.linear(torch.sigmoid(u), w)`` up to float
    rounding (the kernel's own exp and sums); tests hold the two together."""

    @staticmethod
    def forward(ctx, u, w):
        s, a = kernels.sigmoid_project(u, w)
        ctx.save_for_backward(s, w)
        return a

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ga):
        s, w = ctx.saved_tensors
        gu, gw = kernels.sigmoid_project_backward(ga, s, w)
        return gu if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None


class _PoolScore(torch.autograd.Function):
    """ComiRec-SA's scores at a row's end, max_k cand_c . v_k with v = softmax_s(a)^T h over the valid positions, and
    their backward, each one pass in C (kernels.pool_score): torch's five small batched products a way cost ~1 us a
    matrix, ~0.9 ms of a 9.4 ms ML-1M study step. ``_MultiInterestReadout.scores`` is the reference; tests hold them
    together."""

    @staticmethod
    def forward(ctx, a, h, cand, lengths):
        out, saved = kernels.pool_score(a, h, cand, lengths)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        da, dh, dcand = kernels.pool_score_backward(g, ctx.saved_tensors)
        need = ctx.needs_input_grad
        return da if need[0] else None, dh if need[1] else None, dcand if need[2] else None, None


class ComiRecSAReadout(_MultiInterestReadout):
    """ComiRec-SA (Cen et al. 2020): K interests by self-attentive pooling (positions added),
    A = softmax_s(W2 tanh(W1 h_s)), over the visible history. Training scores every candidate with the
    interest most aligned with the target (``select="target"``, ComiRec's hard readout; ``select="max"``
    scores each candidate by its best interest instead); evaluation scores a candidate with its best
    interest."""

    # positions per block of the causal interests (``_causal_softmax_pool``)
    CAUSAL_BLOCK = 8

    def __init__(self, d_model: int, num_interests: int = 4, hidden: int = 0, select: str = "target",
                 max_len: int = 512):
        super().__init__()
        self.k, self.select = num_interests, _check_select(select)
        self.pos = nn.Parameter(torch.zeros(max_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.w1 = nn.Linear(d_model, hidden or 4 * d_model, bias=False)
        self.w2 = nn.Linear(hidden or 4 * d_model, num_interests, bias=False)

    def _logits(self, h):
        """(B,S,K) W2 tanh(W1 x_s), x = h + positions. On CPU as (2 W2) sigmoid((2 W1) x) - W2 1, the same
        function (tanh u = 2 sigmoid(2u) - 1) with the factors in the small weights: torch's CPU tanh costs
        2.2 ns an element against 0.22 for sigmoid (measured), and its (B,S,4D) tanh was the step's largest
        elementwise pass. ``logits_reference`` is the plain form."""
        if h.device.type != "cpu" or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
            return self.logits_reference(h)  # bf16 would round sigmoid before the 2s - 1 cancellation
        w2 = self.w2.weight
        u = F.linear(h + self.pos[:h.shape[1]], self.w1.weight * 2.0)
        if kernels.sigmoid_project_applies(u, w2):  # the sigmoid and its product in one pass (C)
            return _SigmoidProject.apply(u, w2 * 2.0) - w2.sum(1)
        return F.linear(torch.sigmoid(u), w2 * 2.0) - w2.sum(1)

    def logits_reference(self, h):
        return self.w2(torch.tanh(self.w1(h + self.pos[:h.shape[1]])))

    # candidates a row up to which ``_PoolScore`` runs: the training rows' 1 + 4; evaluation's 100 a row amortise the
    # batched products' per-matrix cost (2,048 rows x 100 candidates: 25-30 ms plain, 30-37 in the kernel)
    POOL_SCORE_MAX_CANDIDATES = 16

    def scores(self, h, lengths, cand):
        """Each candidate scored by its best interest, the interests from the whole visible history; on CPU, for
        few candidates a row, in one C pass each way (``_PoolScore``) where it applies, else the plain path (the
        reference)."""
        if (cand.shape[1] <= self.POOL_SCORE_MAX_CANDIDATES and kernels.pool_score_applies(h, cand)
                and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled("cpu") and bool((lengths >= 1).all())):
            return _PoolScore.apply(self._logits(h), h, cand, lengths)
        return super().scores(h, lengths, cand)

    def interests(self, h, lengths, causal: bool):
        b, s, d = h.shape
        a = self._logits(h)
        valid = torch.arange(s, device=h.device)[None, :] < lengths[:, None]
        if causal:  # one set of interests per target position t, from history 0..t
            return _causal_softmax_pool(a.masked_fill(~valid[..., None], float("-inf")), h, self.CAUSAL_BLOCK)
        att = torch.softmax(a.masked_fill(~valid[..., None], float("-inf")), dim=1)
        return torch.einsum("bsk,bsd->bkd", att, h)  # (B,K,D)

    def interests_naive(self, h, lengths):
        """Reference for the causal path: a masked softmax per target position, O(L^2)."""
        s = h.shape[1]
        a = self._logits(h)
        valid = torch.arange(s, device=h.device)[None, :] < lengths[:, None]
        mask = valid[:, None, :] & _causal_mask(s, s, h.device)[None]  # (B,T,S)
        logits = a[:, None].masked_fill(~mask[..., None], float("-inf"))  # (B,T,S,K)
        att = torch.softmax(logits, dim=2).nan_to_num(0.0)
        return torch.einsum("btsk,bsd->btkd", att, h)  # (B,T,K,D)


def _causal_softmax_pool(a: torch.Tensor, h: torch.Tensor, block: int = 8) -> torch.Tensor:
    """out[b, t, k] = sum_{s <= t} softmax_s(a[b, :t+1, k]) h[b, s]: (B, T, K, D) from logits a (B, S, K), -inf at
    padding (position 0 never padding), and h (B, S, D). ComiRec-SA's causal interests: the logits do not
    depend on t, so this is a prefix softmax. On CPU in float32/64, an online softmax in C (``_CausalPool``);
    else computed in blocks of ``block`` positions in h's dtype (``_causal_softmax_pool_blocked``), as follows.

    Position t of block j is shifted by m_t = max(the max of blocks < j, the running max of block j up to t),
    never below a visible logit, so every exp() is at most 1 and the largest visible term is exactly 1 (no
    overflow, a denominator >= 1). Inside a block: a masked (block x block) weight matrix times the block's h.
    From earlier blocks: each block's sums under its own max, combined under the running max of blocks
    < j by a small (nb x nb) product, and scaled by exp(that max - m_t) <= 1. The shifts carry no gradient:
    a softmax does not depend on them. Half-precision inputs (CUDA autocast) are pooled in float32.
    interests_naive (an O(L^2) masked softmax) is the reference. The form before this one, float64 exp() and
    cumsum over (B, T, K, D) under one global shift, made the ML-1M sequence-regime step 1.57x slower (110.6
    against 70.6 ms, 1 thread), and its float64 still underflowed for logits spread over ~1,000."""
    if h.dtype in (torch.float16, torch.bfloat16) or a.dtype in (torch.float16, torch.bfloat16):
        with torch.autocast(h.device.type, enabled=False):
            return _causal_softmax_pool(a.float(), h.float(), block).to(h.dtype)
    if (kernels.causal_pool_applies(a, h) and not torch.compiler.is_compiling()
            and bool(torch.isfinite(a[:, 0]).all())):  # an online softmax in C, one pass each way
        return _CausalPool.apply(a, h)
    return _causal_softmax_pool_blocked(a, h, block)


class _CausalPool(torch.autograd.Function):
    """``_causal_softmax_pool`` in C (kernels.causal_pool): per (row, interest) an online softmax over the positions,
    O(S D), forward and backward one pass each; ``_causal_softmax_pool_blocked`` is the reference (tests hold them
    together, and both to ``interests_naive``)."""

    @staticmethod
    def forward(ctx, a, h):
        y, saved = kernels.causal_pool(a, h)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        da, dh = kernels.causal_pool_backward(dy, ctx.saved_tensors)
        need = ctx.needs_input_grad
        return da if need[0] else None, dh if need[1] else None


def _causal_softmax_pool_blocked(a: torch.Tensor, h: torch.Tensor, block: int = 8) -> torch.Tensor:
    """``_causal_softmax_pool`` in torch's ops, in blocks of ``block`` positions (see there)."""
    B, S, K = a.shape
    D = h.shape[-1]
    nb = -(-S // block)
    pad = nb * block - S
    if pad:
        a = F.pad(a, (0, 0, 0, pad), value=float("-inf"))
        h = F.pad(h, (0, 0, 0, pad))
    ab = a.view(B, nb, block, K)
    hb = h.reshape(B * nb, block, D)
    with torch.no_grad():
        mb = ab.amax(2)  # (B, nb, K) each block's max
        # the running max of the blocks before j (-inf for j = 0), and each position's shift
        prev = torch.cat([mb.new_full((B, 1, K), float("-inf")), mb[:, :-1].cummax(1).values], 1)
        m = torch.maximum(ab.cummax(2).values, prev[:, :, None])  # (B, nb, c, K)
    # w[b, j, t, k, s]: rows (t, k) of one block are one (c K, c) matrix, so that a single batched product
    # gives the pooled features already as (B, T, K, D). Masked before exp(): a later logit may exceed
    # m_t, and exp() of it could overflow (inf, then NaN gradients).
    tri = torch.ones(block, block, dtype=torch.bool, device=a.device).tril()[:, None]  # (c_t, 1, c_s): s <= t
    w = torch.exp((ab.transpose(2, 3)[:, :, None] - m[..., None]).masked_fill(~tri, float("-inf")))
    num = torch.bmm(w.view(B * nb, block * K, block), hb).view(B, nb, block, K, D)
    den = w.sum(-1, keepdim=True)  # (B, nb, c, K, 1)
    if nb > 1:
        e = torch.exp(ab - torch.where(torch.isfinite(mb), mb, torch.zeros_like(mb))[:, :, None])  # (B, nb, c, K)
        bnum = torch.bmm(e.view(B * nb, block, K).transpose(1, 2), hb).view(B, nb, K, D)  # under each block's max
        bden = e.sum(2)  # (B, nb, K)
        with torch.no_grad():  # carry into block j: sum_{i<j} exp(mb_i - prev_j) (block i's sums), each <= 1
            c = torch.exp(mb.transpose(1, 2)[:, :, None, :] - prev.transpose(1, 2)[..., None])  # (B, K, j, i)
            c = c.masked_fill(~torch.ones(nb, nb, dtype=torch.bool, device=a.device).tril(-1), 0.0)
            scale = torch.exp(prev[:, :, None] - m)[..., None]  # (B, nb, c, K, 1), <= 1 (0 in block 0)
        cnum = (c @ bnum.transpose(1, 2)).transpose(1, 2)  # (B, nb, K, D)
        cden = (c @ bden.transpose(1, 2)[..., None]).transpose(1, 2)  # (B, nb, K, 1)
        num = torch.addcmul(num, scale, cnum[:, :, None])
        den = torch.addcmul(den, scale, cden[:, :, None])
    return (num / den).view(B, nb * block, K, D)[:, :S]


def _pick_interest(v, cand, select: str = "target"):
    """v: (B,T,K,D) interests, cand: (B,T,C,D) with the target first.
    "target" (ComiRec's hard readout): the interest most aligned with the target scores every candidate.
    "max": every candidate is scored by its own best interest, the rule evaluation uses."""
    if select == "max":
        return torch.einsum("btcd,btkd->btck", cand, v).amax(-1)
    with torch.no_grad():  # the choice carries no gradient
        k = (v * cand[:, :, :1]).sum(-1).argmax(-1)  # (B,T)
    return candidate_dot(cand, _PickInterest.apply(v, k))


class _PickInterest(torch.autograd.Function):
    """v[b, t, k[b, t]]: (B,T,K,D), (B,T) -> (B,T,D); reference ``v.gather(2, k expanded).squeeze(2)``.
    Forward: rows of D picked from the flat (B T K, D) view by one index_select. Backward: zeros with those rows
    copied in (index_copy_). gather's forward and its backward (zeros, then scatter_add_ of a broadcast index)
    took 2.2 and 2.8 ms of a 71 ms ML-1M ComiRec-SA step (sequence regime, 1 thread); these two take about 0.3
    and 1.5 (measured alone: 6.1 -> 1.5 ms for the backward), with the same values to the bit."""

    @staticmethod
    def forward(ctx, v, k):
        B, T, K, D = v.shape
        rows = torch.arange(B * T, device=v.device) * K + k.reshape(-1)
        ctx.save_for_backward(rows)
        ctx.k_count = K
        return v.reshape(B * T * K, D).index_select(0, rows).view(B, T, D)

    @staticmethod
    def backward(ctx, g):
        (rows,) = ctx.saved_tensors
        B, T, D = g.shape
        gv = g.new_zeros(B * T * ctx.k_count, D).index_copy_(0, rows, g.reshape(B * T, D))
        return gv.view(B, T, ctx.k_count, D), None


def _check_select(select: str) -> str:
    if select not in ("target", "max"):
        raise ValueError(f"select must be 'target' or 'max', not {select!r}")
    return select


def _squash(z, eps=1e-9):
    n2 = (z * z).sum(-1, keepdim=True)
    return z * (n2 / (1 + n2) / torch.sqrt(n2 + eps))


def _gram(w):
    """M_k = W_k^T W_k, (K, D, D) from the maps w (K, E, D): see ``_routed_back``."""
    return w.transpose(1, 2) @ w


def _routed_back(pooled, mk, eps=1e-9):
    """W_k^T squash(W_k p_k), what a routing round adds to the logits (against each feature), from the pooled p (..., K,
    D) or (..., 1, D) (the same for every capsule) and M_k = W_k^T W_k: with z = W_k p, |z|^2 = p . M_k p and W_k^T z =
    M_k p, so one product by M_k instead of two by W_k (ComiRec-DR's rounds before the last; the last needs v itself).
    The same as ``einsum(W_k^T, _squash(einsum(W_k, p)))`` up to float rounding; tests hold the routing to
    ``interests_reference``."""
    k = mk.shape[0]
    if pooled.shape[-2] == 1:  # one product by the K matrices side by side
        q = (pooled.squeeze(-2) @ mk.transpose(0, 1).reshape(mk.shape[1], -1)).unflatten(-1, (k, -1))
    else:
        q = torch.einsum("...kd,kde->...ke", pooled, mk)
    n2 = (pooled * q).sum(-1, keepdim=True).clamp_min(0)  # |z|^2 >= 0: rounding may not say so
    return q * (n2 / (1 + n2) / torch.sqrt(n2 + eps))


class _BlockCausalPoolShared(torch.autograd.Function):
    """y[b, t, k] = sum_{s <= t} c[b, t, k, s] x[b, s]: (B, T, K, D) from couplings c (B, T, K, T) (no gradient;
    read only at block-lower-triangular entries: target block [t0, t1) against history [0, t1); the upper
    blocks are never written) and one feature row per position, x (B, T, D). A target block's (t, k) rows
    are one (K block, t1) matrix, so the forward is one batched GEMM of K x block rows per target block,
    and the backward one per history block [s0, s1) against every target t >= s0: half the work of the
    dense (T, T) products."""

    @staticmethod
    def forward(ctx, c, x, block: int):
        B, T, K, _ = c.shape
        y = x.new_empty(B, T, K, x.shape[-1])
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            y[:, t0:t1] = (c[:, t0:t1, :, :t1].reshape(B, (t1 - t0) * K, t1) @ x[:, :t1]).view(B, t1 - t0, K, -1)
        ctx.save_for_backward(c)
        ctx.block = block
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (c,) = ctx.saved_tensors
        B, T, K, _ = c.shape
        dy = dy.contiguous()
        dx = dy.new_empty(B, T, dy.shape[-1])
        for s0 in range(0, T, ctx.block):
            s1 = min(T, s0 + ctx.block)
            cs = c[:, s0:, :, s0:s1].reshape(B, (T - s0) * K, s1 - s0)
            dx[:, s0:s1] = cs.transpose(1, 2) @ dy[:, s0:].reshape(B, (T - s0) * K, -1)
        return None, dx, None


class _DRScore(torch.autograd.Function):
    """ComiRec-DR's scores at a row's end with the shared maps, max_k cand_c . v_k with v the routed interests, and
    their backward, in C (kernels.dr_score): torch's ~40 small operators and batched products took 2.7 ms of a 6.2 ms
    ML-1M study step (now about 1.0). ``_MultiInterestReadout.scores`` over ``_interests_last_shared`` is the
    reference; tests hold them together."""

    @staticmethod
    def forward(ctx, x, w, cand, lengths, iters):
        out, saved = kernels.dr_score(x, w, lengths, cand, iters)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        dx, dw, dcand = kernels.dr_score_backward(g, ctx.saved_tensors)
        need = ctx.needs_input_grad
        return dx if need[0] else None, dw if need[1] else None, dcand if need[2] else None, None, None


class ComiRecDRReadout(_MultiInterestReadout):
    """ComiRec-DR: K interest capsules by dynamic routing (shared bilinear map u_hat = W h_s per capsule,
    routing logits start at zero, softmax over capsules, squash, 3 iterations, logits updated with
    u_hat . v without gradient through the intermediate iterations). Interest selection as ComiRec-SA.
    Options beside ComiRec's own: ``bilinear="position"`` (its bilinear type 2), ``select="max"``,
    ``inputs="unit"`` (below)."""

    def __init__(self, d_model: int, num_interests: int = 4, iterations: int = 3, bilinear: str = "shared",
                 select: str = "target", inputs: str = "rms", max_len: int = 512):
        super().__init__()
        if bilinear not in ("position", "shared"):
            raise ValueError(f"bilinear must be 'position' or 'shared', not {bilinear!r}")
        if inputs not in ("rms", "unit"):
            raise ValueError(f"inputs must be 'rms' or 'unit', not {inputs!r}")
        self.k, self.iters, self.bilinear, self.select = num_interests, iterations, bilinear, _check_select(select)
        # "rms" (default): route the features H as they come (RMS 1, so length sqrt(d)); "unit": scale
        # them to about length 1 first. ComiRec routes raw embeddings of length well below 1; at length
        # sqrt(d) the routing logits u_hat . v reach about sqrt(d) and every item's capsule is fixed hard
        # in the first iteration (Beauty, 6 epochs: val NDCG@10 0.188 rms, 0.203 unit).
        self.input_scale = d_model ** -0.5 if inputs == "unit" else 1.0
        # "shared" (default; the committed Table 1 rows use it): one map per interest for every position;
        # "position": ComiRec-DR's own choice (its bilinear_type 2), one map per history position and interest
        n = max_len if bilinear == "position" else 1
        self.w = nn.Parameter(torch.randn(n, num_interests, d_model, d_model) * d_model ** -0.5)

    # the causal routing with the shared map goes by target blocks (_interests_causal_shared) from this many
    # positions on, in blocks of TARGET_BLOCK targets. ML-1M (L 200), sequence regime, 1 thread: step 1.19x
    # (163.6 -> 137.7 ms); Beauty (L 50): 0.92-0.94x in blocks of 16 or one block of 50, so short ones stay dense
    BLOCKED_MIN_LEN = 100
    TARGET_BLOCK = 16

    # candidates a row up to which ``_DRScore`` runs (training's 1 + 4); evaluation takes the plain path
    DR_SCORE_MAX_CANDIDATES = 16

    def scores(self, h, lengths, cand):
        """Each candidate scored by its best interest, routed over the whole visible history; on CPU with the shared
        maps, for few candidates a row, in C each way (``_DRScore``) where it applies, else the plain path (the
        reference)."""
        if (self.bilinear == "shared" and cand.shape[1] <= self.DR_SCORE_MAX_CANDIDATES and self.iters >= 1
                and kernels.dr_score_applies(h, self.w[0], cand) and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled("cpu")):
            x = h * self.input_scale if self.input_scale != 1.0 else h
            return _DRScore.apply(x, self.w[0], cand, lengths, self.iters)
        return super().scores(h, lengths, cand)

    def _u(self, h):
        s = h.shape[1]
        w = self.w[:s] if self.bilinear == "position" else self.w[0].expand(s, -1, -1, -1)
        return torch.einsum("bsd,sked->bske", h * self.input_scale, w)  # (B,S,K,D)

    def interests(self, h, lengths, causal: bool):
        """Causal (training in the sequence regime, one set of interests per target position): routing
        with the logits and couplings laid out (B, K, T, S), so that the softmax over the K capsules runs
        across contiguous (T, S) planes and both products are plain batched GEMMs over (b, k). In
        ComiRec's (B, T, S, K) layout a softmax over rows of 4 took 60% of an ML-1M step. The first
        iteration's couplings are exactly 1/K (the softmax of zero logits) and are not computed. Not
        causal (one target: evaluation, the instance regime): ``_interests_last_shared`` with the shared
        map, else ``interests_reference``. Causal with the shared map and long sequences, or any length
        where its C rounds apply: ``_interests_causal_shared``. Tests hold each to the reference in float64."""
        if not causal:
            if self.bilinear == "shared":
                return self._interests_last_shared(h, lengths)
            return self.interests_reference(h, lengths, causal)
        if self.bilinear == "shared" and (h.shape[1] >= self.BLOCKED_MIN_LEN or self._route_in_c(h)):
            return self._interests_causal_shared(h, lengths)
        s = h.shape[1]
        u = self._u(h)
        u_fixed = u.detach()
        valid = torch.arange(s, device=h.device)[None, :] < lengths[:, None]
        mask = (valid[:, None, :] & _causal_mask(s, s, h.device)[None])[:, None]  # (B,1,T,S)
        logits = None
        for it in range(self.iters):
            c = mask.to(h.dtype) * (1.0 / self.k) if logits is None else torch.softmax(logits, dim=1) * mask
            v = _squash(torch.einsum("bkts,bskd->btkd", c, u if it == self.iters - 1 else u_fixed))  # (B,T,K,D)
            if it < self.iters - 1:
                step = torch.einsum("bskd,btkd->bkts", u_fixed, v.detach())
                logits = step if logits is None else logits + step
        return v

    def _interests_causal_shared(self, h, lengths):
        """``interests(causal=True)`` with the shared map: the routing of ``_interests_last_shared`` (pool the
        (B, S, D) features, map the K pooled vectors; u_hat_sk . v_k = h_s . (W_k^T v_k)) at every target,
        in target blocks as the general path. Couplings and logits are laid out (B, T, K, S): one target
        block's (t, k) rows are one matrix, so each product is a batched GEMM of K x block rows, and the
        (B, S, K, D) capsule inputs are never formed. The rounds without gradients run in C where it applies
        (``kernels.dr_route_causal``), else in torch's ops (``_couplings_causal_shared``, its reference)."""
        s = h.shape[1]
        x = h * self.input_scale if self.input_scale != 1.0 else h
        xf, w = x.detach(), self.w[0]  # (B, S, D), (K, E, D)
        wf = w.detach()
        valid = torch.arange(s, device=h.device)[None, :] < lengths[:, None]
        if self._route_in_c(xf):  # the rounds in C, a target block at a time
            c = kernels.dr_route_causal(xf, wf, lengths, self.iters, self.TARGET_BLOCK)
        else:
            c = self._couplings_causal_shared(xf, wf, valid)
        pooled = _BlockCausalPoolShared.apply(c, x, self.TARGET_BLOCK)  # (B, T, K, D)
        return _squash(torch.einsum("btkd,ked->btke", pooled, w))

    def _route_in_c(self, h) -> bool:
        """Whether the causal routing's rounds run in C (``kernels.dr_route_causal``): CPU, float32 or float64."""
        return (kernels.dr_route_causal_applies(h, self.w[0]) and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled("cpu"))

    def _couplings_causal_shared(self, xf, wf, valid):
        """The last round's couplings (B, T, K, S) of ``_interests_causal_shared`` in torch's ops, a target block at a
        time (block-lower-triangular entries written): the reference of ``kernels.dr_route_causal``."""
        b, s = xf.shape[:2]
        c = xf.new_empty(b, s, self.k, s)  # the last iteration's couplings, written block by block
        with torch.no_grad():
            mk = _gram(wf) if self.iters > 1 else None
            for t0 in range(0, s, self.TARGET_BLOCK):
                t1 = min(s, t0 + self.TARGET_BLOCK)
                tb = t1 - t0
                mask = (valid[:, None, :t1] & _causal_mask(tb, t1, xf.device, t0)[None])[:, :, None].to(xf.dtype)
                hist = xf[:, :t1]  # (B, t1, D)
                logits = None
                for _ in range(self.iters - 1):
                    if logits is None:  # couplings 1/K: one pooled vector per target for every capsule
                        pooled = (mask[:, :, 0] @ hist).unsqueeze(2) * (1.0 / self.k)  # (B, tb, 1, D)
                    else:
                        cb = torch.softmax(logits, dim=2) * mask  # over capsules
                        pooled = (cb.view(b, tb * self.k, t1) @ hist).view(b, tb, self.k, -1)
                    y = _routed_back(pooled, mk)  # W_k^T v_k
                    step = (y.reshape(b, tb * self.k, -1) @ hist.transpose(1, 2)).view(b, tb, self.k, t1)
                    logits = step if logits is None else logits + step
                c[:, t0:t1, :, :t1] = mask * (1.0 / self.k) if logits is None else torch.softmax(logits, dim=2) * mask
        return c

    def _interests_last_shared(self, h, lengths):
        """One set of interests (evaluation, the instance regime) with the shared map, without u_hat.
        With one W_k for every position, sum_s c_sk (W_k h_s) = W_k (sum_s c_sk h_s) and
        u_hat_sk . v_k = h_s . (W_k^T v_k): the routing pools the (B, S, D) features and maps the K
        pooled vectors, instead of mapping every item to K capsule inputs ((B, S, K, D), the step's
        largest product in the study protocol); between rounds W_k^T v_k comes from one product by
        W_k^T W_k (``_routed_back``). The logits are laid out (B, K, S); the first iteration's couplings
        are 1/K exactly. Only the last iteration carries gradients, as in ``interests_reference`` (held
        to it in float64 by the tests). The C kernel (``_DRScore``) computes the same with the scores."""
        s = h.shape[1]
        x = h * self.input_scale if self.input_scale != 1.0 else h
        x_fixed, w_fixed = x.detach(), self.w[0].detach()  # (B, S, D), (K, E, D)
        valid = (torch.arange(s, device=h.device)[None, :] < lengths[:, None]).to(h.dtype)[:, None]  # (B,1,S)
        logits = None
        # x^T made contiguous once for the iterations' (B, K, D) x (B, D, S) products: with the transposed view a
        # CPU bmm took 71 us at a study step's (204, 4, 64) x (204, 64, 10), 20 us contiguous (the same bits)
        x_fixed_t = x_fixed.transpose(1, 2).contiguous() if self.iters > 2 else x_fixed.transpose(1, 2)
        mk = _gram(w_fixed) if self.iters > 1 else None
        for it in range(self.iters):
            last = it == self.iters - 1
            xs, w = (x, self.w[0]) if last else (x_fixed, w_fixed)
            if logits is None:  # couplings 1/K for every capsule: one pooled vector
                pooled = (valid @ xs) * (1.0 / self.k)  # (B, 1, D)
            else:
                c = torch.softmax(logits, dim=1) * valid  # (B, K, S), over capsules
                pooled = c @ xs  # (B, K, D)
            if last:
                return _squash(torch.einsum("bkd,ked->bke", pooled.expand(-1, self.k, -1), w))  # (B, K, E)
            step = _routed_back(pooled, mk) @ x_fixed_t  # W_k^T v_k (B, K, D) against the features: (B, K, S)
            logits = step if logits is None else logits + step

    def interests_reference(self, h, lengths, causal: bool):
        """ComiRec-DR's routing as written, in its (B, T, S, K) layout: the reference of ``interests``."""
        b, s, d = h.shape
        u = self._u(h)
        valid = torch.arange(s, device=h.device)[None, :] < lengths[:, None]
        t = s if causal else 1
        mask = valid[:, None, :] & (_causal_mask(s, s, h.device)[None] if causal else valid[:, None, :])  # (B,T,S)
        logits = torch.zeros(b, t, s, self.k, device=h.device, dtype=h.dtype)
        for it in range(self.iters):
            c = torch.softmax(logits, dim=-1) * mask[..., None]  # over capsules; invisible items weigh 0
            uu = u if it == self.iters - 1 else u.detach()
            v = _squash(torch.einsum("btsk,bskd->btkd", c, uu))  # (B,T,K,D)
            if it < self.iters - 1:
                logits = logits + torch.einsum("bskd,btkd->btsk", u.detach(), v.detach())
        return v if causal else v[:, 0]


READOUTS: dict[str, type[nn.Module]] = {
    "last": LastReadout,
    "din": DINReadout,
    "comirec_sa": ComiRecSAReadout,
    "comirec_dr": ComiRecDRReadout,
}


def build_readout(name: str, d_model: int, max_len: int = 512, **opts) -> nn.Module:
    if name not in READOUTS:
        raise BenchboxError(f"unknown readout {name!r}; registered: {', '.join(READOUTS)}")
    cls = READOUTS[name]
    if "max_len" in inspect.signature(cls.__init__).parameters:
        opts["max_len"] = max_len
    opts = {k: _coerce(v) for k, v in opts.items()}
    try:
        return cls(d_model, **opts)
    except TypeError as e:
        raise BenchboxError(f"readout {name!r}: {e}") from None


def _coerce(v):
    if isinstance(v, str):
        for conv in (int, float):
            try:
                return conv(v)
            except ValueError:
                pass
    return v
