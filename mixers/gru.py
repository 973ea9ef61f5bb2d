"""GRU4Rec-style recurrent mixer: a (multi-layer) GRU over the item sequence.

Right padding needs no packing: a GRU is causal, so padded steps come after every real one.
On CUDA ``nn.GRU`` runs cuDNN; streaming carries the hidden state. On CPU, where the harness installs its C
gate kernels (``install_cell_kernels``; benchbox.kernels), a layer runs as ``_GRUSequence``: per time step
one GEMM and one fused gate pass forward, one gate pass and one GEMM backward, where torch's CPU GRU cell
makes about thirty small operations each way. ``nn.GRU`` is the reference: the same function, float rounding
apart (the kernels' own exp); tests hold the two together.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Mixer

# the fused gate kernels (an object with gru_applies and gru_functions), installed by the harness
# where it builds them; None: nn.GRU everywhere
_CELL_KERNELS = None


def install_cell_kernels(kernels) -> None:
    global _CELL_KERNELS
    _CELL_KERNELS = kernels


class _GRUSequence(torch.autograd.Function):
    """One GRU layer over x (B, L, C) from a zero state, torch's gate order (r, z, n) and parameters.
    The output is (B, L, H) laid out time-major, as nn.GRU's (strides (H, B H, 1)): what follows it sees the
    same memory order (the dropout after the mixer draws its mask in memory order, so another layout would
    drop other elements). Saves the gates r, z, n and W_hn h + b_hn per step (4 (L, B, H) tensors) and the
    outputs. The kernels take data pointers: a time step's rows are base + t * (its step's bytes), no tensor
    view per step."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh):
        cell = _CELL_KERNELS.gru_functions(x.dtype)[0]
        b, steps, c = x.shape
        hid = w_hh.shape[1]
        gi = torch.addmm(b_ih, x.reshape(b * steps, c), w_ih.t())  # (B L, 3H): step t's rows are t, t + L, ...
        y = x.new_empty(steps, b, hid)
        saved = x.new_empty(4, steps, b, hid)  # r, z, n, W_hn h + b_hn
        size = x.element_size()
        gi0, y0, s0 = gi.data_ptr(), y.data_ptr(), saved.data_ptr()
        at = b * hid * size  # one step of y or of one of the four
        plane = steps * at
        w_hh_t = w_hh.t()
        for t in range(steps):
            gh = b_hh.expand(b, -1).contiguous() if t == 0 else torch.addmm(b_hh, y[t - 1], w_hh_t)
            st = s0 + t * at
            cell(gi0 + t * 3 * hid * size, steps * 3 * hid, gh.data_ptr(), 0 if t == 0 else y0 + (t - 1) * at, hid,
                 y0 + t * at, hid, st, st + plane, st + 2 * plane, st + 3 * plane, b, hid)
        ctx.save_for_backward(x, w_ih, w_hh, y, saved)
        return y.transpose(0, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        backward = _CELL_KERNELS.gru_functions(gy.dtype)[1]
        x, w_ih, w_hh, y, saved = ctx.saved_tensors
        steps, b, hid = y.shape
        gy = gy.transpose(0, 1).contiguous()  # (L, B, H)
        dgi = y.new_empty(b, steps, 3 * hid)
        dgh = y.new_empty(steps, b, 3 * hid)  # time-major: W_hh's gradient is one product over the steps
        dh, dh_prev = gy[steps - 1], y.new_empty(b, hid)
        size = y.element_size()
        y0, gy0, s0, dgi0, dgh0 = y.data_ptr(), gy.data_ptr(), saved.data_ptr(), dgi.data_ptr(), dgh.data_ptr()
        at = b * hid * size
        plane = steps * at
        for t in reversed(range(steps)):
            st = s0 + t * at
            backward(dh.data_ptr(), 0 if t == 0 else y0 + (t - 1) * at, hid, st, st + plane, st + 2 * plane,
                     st + 3 * plane, 0 if t == 0 else gy0 + (t - 1) * at, hid, dgi0 + t * 3 * hid * size,
                     steps * 3 * hid, dgh0 + t * 3 * at, dh_prev.data_ptr(), b, hid)
            if t:  # dh_{t-1} = z dh_t + gy_{t-1} (the kernel's) + d_gh W_hh
                dh = torch.addmm(dh_prev, dgh[t], w_hh)
        flat = dgi.view(b * steps, 3 * hid)
        dx = (flat @ w_ih).view_as(x) if ctx.needs_input_grad[0] else None
        dw_ih = flat.t() @ x.reshape(b * steps, -1) if ctx.needs_input_grad[1] else None
        # sum over t >= 1 of d_gh_t^T h_{t-1}
        dw_hh = dgh[1:].view(-1, 3 * hid).t() @ y[:steps - 1].view(-1, hid) if ctx.needs_input_grad[2] else None
        db_ih = flat.sum(0) if ctx.needs_input_grad[3] else None
        db_hh = dgh.view(-1, 3 * hid).sum(0) if ctx.needs_input_grad[4] else None
        return dx, dw_ih, dw_hh, db_ih, db_hh


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

    def _fused(self, x) -> bool:
        """Whether ``_GRUSequence`` runs: the kernels are installed and apply (CPU, dtype, hidden size), the
        GRU has biases and no dropout between layers in force, and neither autocast nor a compiler runs."""
        if torch.compiler.is_compiling() or _CELL_KERNELS is None:
            return False
        g = self.gru
        return (x.dim() == 3 and x.shape[1] > 0 and g.bias and not (g.dropout and g.training and g.num_layers > 1)
                and not torch.is_autocast_enabled(x.device.type) and x.dtype == g.weight_hh_l0.dtype
                and _CELL_KERNELS.gru_applies(x, g.hidden_size))

    def forward(self, x, lengths=None):
        if not self._fused(x):
            return self.gru(x)[0]
        for i in range(self.gru.num_layers):
            x = _GRUSequence.apply(x, *(getattr(self.gru, f"{w}_l{i}") for w in ("weight_ih", "weight_hh",
                                                                                   "bias_ih", "bias_hh")))
        return x

    def forward_reference(self, x):
        """nn.GRU's own output: what ``forward`` computes."""
        return self.gru(x)[0]

    def init_state(self, batch_size, device=None, dtype=None):
        return torch.zeros(self.gru.num_layers, batch_size, self.d_model, device=device, dtype=dtype)

    def step(self, x, state):
        y, h = self.gru(x, state)
        return y, h

    @classmethod
    def available_backends(cls, device="cpu"):
        return ["torch"]  # cuDNN is picked by nn.GRU itself on CUDA
