"""TTT-Linear / TTT-MLP: fast dual form vs the plain reference, streaming, padding, options, init."""
import math

import pytest
import torch

import mixers
from mixers.ttt import (TTTLinear, TTTMLP, _FromChunksAndTail, _LinearChunks, _LNL2Grad, _ToChunksAndTail, _gelu_p,
                        _gelu_pp, _gelu_t, _lnl2_bwd, _lnl2_fwd, _rope_factors, _to_chunks, gelu_tanh, ln_l2_grad,
                        rope_fast, rope_real, rope_reference)

D = 8  # d_model; 2 heads of 4
KINDS = {"ttt_linear": TTTLinear, "ttt_mlp": TTTMLP}
CONFIGS = {
    "plain": dict(use_rope=False),
    "defaults": dict(),
    "all_on": dict(use_gate=True, pre_conv=True, share_qk=True, ttt_base_lr=0.7),
}


def _perturb(m, scale=0.3):
    """Move every parameter off its init (norm weights off 1, token offsets off 0...) deterministically."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return m


def _pair(cls, **kw):
    torch.manual_seed(0)
    fast = _perturb(cls(D, backend="torch", **kw).double())
    ref = cls(D, backend="reference", **kw).double()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _grads(m, x, gy):
    x = x.clone().requires_grad_(True)
    y = m(x)
    gs = torch.autograd.grad((y * gy).sum(), [x] + list(m.parameters()))
    return y.detach(), gs


# ------------------------------------------------------------------------------------------------
# fast dual form == plain reference (outputs and gradients), float64
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mbs", [1, 2, 5, 10, 16])
@pytest.mark.parametrize("name", list(KINDS))
def test_fast_matches_reference(name, mbs, config):
    fast, ref = _pair(KINDS[name], mini_batch_size=mbs, **CONFIGS[config])
    # a multiple and a non-multiple (its ragged tail a chunk of its own), the study's window (10: one chunk,
    # shorter than mbs 16), and a last chunk padded (8 mbs + 1: too little padding to split the tail off)
    lengths = sorted(({2 * mbs, 2 * mbs + 3, 8 * mbs + 1} if mbs > 1 else {6, 9}) | {10})
    for L in lengths:
        torch.manual_seed(L)
        x = torch.randn(2, L, D, dtype=torch.float64)
        gy = torch.randn(2, L, D, dtype=torch.float64)
        yf, gf = _grads(fast, x, gy)
        yr, gr = _grads(ref, x, gy)
        torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
        names = ["input"] + [n for n, _ in fast.named_parameters()]
        for n, a, b in zip(names, gf, gr):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda s, n=n: f"grad of {n}: {s}")


@pytest.mark.parametrize("name", list(KINDS))
def test_scan_chunk_changes_nothing(name):
    x = torch.randn(2, 23, D, dtype=torch.float64)
    ys = []
    for chunk in (1, 3, 8, 64):
        torch.manual_seed(0)
        m = _perturb(KINDS[name](D, mini_batch_size=2, scan_chunk=chunk).double())
        ys.append(m(x))
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=1e-10, atol=1e-10)


# Outputs of the official ttt-lm-pytorch layer (TTTLinear / TTTMLP, plus its Block's pre_conv and
# seq_norm where pre_conv is on) for the deterministic parameters of ``_det_fill`` and the input below,
# float64. The official code computes RoPE in float32, hence the 1e-6 tolerance.
OFFICIAL = [
    ("ttt_linear", dict(mini_batch_size=3), 7,
     [0.2690579243, -0.2293080653, 0.1820173249, -0.1287408767, 0.0712307366, -0.0113781471, -0.048848617,
      0.1074689761], 3.7495554048, 30.9301218403),
    ("ttt_mlp", dict(mini_batch_size=3, use_gate=True, share_qk=True), 7,
     [0.1769352568, -0.2284238216, 0.2724005836, -0.3074193505, 0.3323285171, -0.3463089362, 0.3489008564,
      -0.3400190415], 1.1503069291, 38.8161503728),
    ("ttt_linear", dict(mini_batch_size=4, pre_conv=True, use_gate=True), 10,
     [0.000133481, -0.0437842199, 0.0859950983, -0.1253779958, 0.1606377909, -0.1906149523, 0.2143236697,
      -0.2309842731], -2.2782084595, 5.2219276444),
    ("ttt_mlp", dict(mini_batch_size=4), 10,
     [0.1796654046, -0.1591531985, 0.1334071799, -0.1032740163, 0.069744648, -0.0339217009, -0.003016774,
      0.0398560411], 4.9673870257, 9.4502555175),
]


def _det_fill(module):
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(module.named_parameters())):
            v = torch.sin(0.37 * (torch.arange(p.numel(), dtype=torch.float64) + 1) + i)
            is_scale = name.endswith("norm.weight") or name in ("ttt_norm_weight", "pre_conv_norm.weight",
                                                                 "seq_norm.weight")
            p.copy_(((1 + 0.2 * v) if is_scale else 0.3 * v).view_as(p))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("case", range(len(OFFICIAL)))
def test_matches_official_numbers(case, backend):
    name, kw, L, last, total, sq = OFFICIAL[case]
    m = KINDS[name](D, num_heads=2, backend=backend, **kw).double()
    _det_fill(m)
    x = torch.sin(0.11 * torch.arange(2 * L * D, dtype=torch.float64) + 0.5).view(2, L, D) * 1.5
    y = m(x)
    torch.testing.assert_close(y[1, -1], torch.tensor(last, dtype=torch.float64), rtol=0, atol=1e-6)
    assert abs(y.sum().item() - total) < 1e-5 and abs((y ** 2).sum().item() - sq) < 1e-5


# ------------------------------------------------------------------------------------------------
# streaming, padding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("config", ["defaults", "all_on"])
@pytest.mark.parametrize("mbs", [1, 3, 16])
@pytest.mark.parametrize("name", list(KINDS))
def test_streaming_equals_forward(name, mbs, config, backend):
    torch.manual_seed(0)
    m = _perturb(KINDS[name](D, mini_batch_size=mbs, backend=backend, **CONFIGS[config]).double()).eval()
    L = 37
    x = torch.randn(2, L, D, dtype=torch.float64)
    y = m(x)
    for cuts in ([1] * L, [4, 1, 7, 2, 9, 14], [L], [20, 17]):
        state, outs, pos = m.init_state(2, dtype=torch.float64), [], 0
        for c in cuts:
            o, state = m.step(x[:, pos:pos + c], state)
            outs.append(o)
            pos += c
        torch.testing.assert_close(torch.cat(outs, 1), y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(KINDS))
def test_streaming_state_does_not_grow(name):
    m = KINDS[name](D, mini_batch_size=4, pre_conv=True, share_qk=True).double()
    state = m.init_state(3, dtype=torch.float64)

    def sizes(s):
        out = [t.numel() for t in list(s["params"].values()) + list(s["acc"].values())]
        return out + [t.numel() for t in s["tails"].values()]

    x = torch.randn(3, 30, D, dtype=torch.float64)
    seen = []
    with torch.no_grad():
        for t in range(30):
            _, state = m.step(x[:, t:t + 1], state)
            seen.append(sizes(state))
    assert all(s == seen[0] for s in seen) and state["pos"] == 30


@pytest.mark.parametrize("name", list(KINDS))
def test_right_padding_keeps_real_positions(name):
    torch.manual_seed(0)
    m = _perturb(KINDS[name](D, mini_batch_size=5, use_gate=True, pre_conv=True).double())
    lengths = torch.tensor([17, 9, 1])
    x = torch.randn(3, 17, D, dtype=torch.float64)
    x[1, 9:] = 100.0  # junk padding
    x[2, 1:] = -50.0
    y = m(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(y[i, :n], m(x[i:i + 1, :n])[0], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------
def test_rope_fast_equals_official_form():
    q, k = torch.randn(2, 2, 11, 3, 8, dtype=torch.float64).unbind(0)
    pos = torch.arange(11) % 5
    qr, kr = rope_reference(q, k, pos, 10000.0)
    qf, kf = rope_fast(q, k, _rope_factors(pos, 8, 10000.0, "cpu"))
    torch.testing.assert_close(qf, qr)
    torch.testing.assert_close(kf, kr)
    # position 0 is the identity, norms are kept
    torch.testing.assert_close(qr[:, 0], q[:, 0])
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    # the real-arithmetic form (what a compiled forward uses) is the same rotation
    for dt, tol in ((torch.float64, 1e-15), (torch.float32, 1e-6)):
        qx, kx = rope_real(q.to(dt), k.to(dt), _rope_factors(pos, 8, 10000.0, "cpu"))
        qy, ky = rope_fast(q.to(dt), k.to(dt), _rope_factors(pos, 8, 10000.0, "cpu"))
        assert qx.dtype == dt
        torch.testing.assert_close(qx, qy, rtol=tol, atol=tol)
        torch.testing.assert_close(kx, ky, rtol=tol, atol=tol)


def test_ln_l2_grad_is_the_gradient():
    z = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    gamma, beta, target = torch.randn(3, 6, dtype=torch.float64).unbind(0)
    loss = 0.5 * ((torch.nn.functional.layer_norm(z, (6,), eps=1e-6) * gamma + beta - target) ** 2).sum()
    (g,) = torch.autograd.grad(loss, z)
    gt = gamma * (target - beta)
    torch.testing.assert_close(ln_l2_grad(z.detach(), gamma, gt), g)
    # hand-written forward/backward pair used by the TTT-MLP chunk
    G, xh, rstd, gxl = _lnl2_fwd(z.detach(), gamma * gamma, gt)
    torch.testing.assert_close(G, g)
    zz, gt2, g2 = z.detach().requires_grad_(True), gt.clone().requires_grad_(True), (gamma * gamma).requires_grad_(True)
    a = torch.randn_like(G)
    auto = torch.autograd.grad((ln_l2_grad_sq(zz, g2, gt2) * a).sum(), [zz, gt2, g2])
    dz, dgt, dg2 = _lnl2_bwd(a, G, xh, rstd, gxl, gamma * gamma)
    torch.testing.assert_close(dz, auto[0])
    torch.testing.assert_close(dgt.sum((0, 1)), auto[1])
    torch.testing.assert_close(dg2.sum((0, 1)), auto[2])


def test_lnl2_grad_function_is_the_gradient():
    """The hand-written VJP of G = ln_l2_grad(z) that TTT-Linear's forward_last uses, with gamma^2 and gt
    broadcast over rows as there ((H, 1, 1, D) and (H, B, L, D))."""
    torch.manual_seed(0)
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    gam2 = (torch.rand(2, 1, 1, 5, dtype=torch.float64) + 0.5).requires_grad_(True)
    gt = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_LNL2Grad.apply(z, gam2, gt), ln_l2_grad_sq(z, gam2, gt), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(_LNL2Grad.apply, (z, gam2, gt))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_last_equals_forward_read_at_the_last_row(config):
    """TTT-Linear's one-mini-batch forward_last (the instance regime's last block) against the full forward
    read at lengths - 1: outputs and every gradient, float64, lengths 1..L, both inside one mini-batch."""
    torch.manual_seed(1)
    m = _perturb(TTTLinear(D, mini_batch_size=16, **CONFIGS[config]).double())
    x = torch.randn(6, 10, D, dtype=torch.float64)
    lengths = torch.tensor([10, 1, 4, 7, 9, 2])
    gy = torch.randn(6, D, dtype=torch.float64)
    got = []
    for last_only in (True, False):
        xx = x.clone().requires_grad_(True)
        y = m.forward_last(xx, lengths) if last_only else m(xx)[torch.arange(6), lengths - 1]
        got.append((y.detach(),) + torch.autograd.grad((y * gy).sum(), [xx] + list(m.parameters()),
                                                        allow_unused=True, materialize_grads=True))
    names = ["output", "input"] + [n for n, _ in m.named_parameters()]
    for n, a, b in zip(names, *got):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("need_state,tail", [(False, 0), (True, 0), (False, 1), (False, 3)])
@pytest.mark.parametrize("K,g,S", [(4, 1, 4), (2, 3, 6), (2, 3, 5), (1, 4, 4)])
def test_linear_chunks_backward_is_the_gradient(K, g, S, need_state, tail, shared):
    """The hand-written backward of the TTT-Linear scan, every input, with and without the final state
    (the state's gradient is what streaming training would use); S = 5 is a shorter last mini-batch.
    ``shared``: start weights (H, D, D) for all B rows of a head (rows head-major), as ``forward`` passes.
    ``tail``: a short last chunk of that many rows after the whole ones (K 2 and 1: more than one mini-batch)."""
    torch.manual_seed(S + 10 * g + 100 * tail)
    nc, BH, Dh = 2, 4, 3
    W_rows = 2 if shared else BH  # 2 heads of 2 rows each
    r = lambda *shape, s=1.0: (torch.randn(*shape, dtype=torch.float64) * s).requires_grad_(True)  # noqa: E731

    def chunk_args(n, S, g):
        return (r(n, BH, S, Dh), r(n, BH, S, Dh), r(n, BH, S, Dh), r(n, BH, S, S),
                r(n, BH, S, S, s=0.3) if g > 1 else None,
                (torch.rand(n, BH, S, 1, dtype=torch.float64) * 0.3).requires_grad_(True))

    kc, qc, gt, P, M, e = chunk_args(nc, S, g)
    args = (kc, qc, r(W_rows, Dh, Dh, s=0.3), r(W_rows, 1, Dh), gt,
            (torch.rand(BH, 1, Dh, dtype=torch.float64) + 0.5).requires_grad_(True), P, M, e)
    if tail:
        kt, qt, gtt, Pt, Mt, et = chunk_args(1, tail, -(-tail // K))
        assert (Mt is not None) == (tail > K)
        fn = lambda *a: _LinearChunks.apply(*a[:9], K, g, need_state, *a[9:])  # noqa: E731
        args = args + (kt, qt, gtt, Pt, Mt, et)
    else:
        fn = lambda *a: _LinearChunks.apply(*a, K, g, need_state)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    if shared:  # the same as those weights copied to every row of their head
        per_row = (args[:2] + (args[2].repeat_interleave(2, 0), args[3].repeat_interleave(2, 0)) + args[4:])
        for a, b in zip(_as_tuple(fn(*args)), _as_tuple(fn(*per_row))):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_linear_chunks_refuse_a_state_after_a_short_tail():
    """The final weights are only defined after whole chunks (``ttt_fast`` never asks for both)."""
    t = torch.randn(2, 4, 4, 3)
    tail = (torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 2),
            None, torch.rand(1, 4, 2, 1))
    with pytest.raises(ValueError, match="need_state"):
        _LinearChunks.apply(t, t, torch.randn(4, 3, 3), torch.randn(4, 1, 3), t, torch.rand(4, 1, 3),
                            torch.randn(2, 4, 4, 4), None, torch.rand(2, 4, 4, 1), 4, 1, True, *tail)


def test_chunks_and_tail_layout_round_trips_with_its_gradients():
    """(B, L, H, D) <-> whole chunks (nc, H B, S, D) + a short last chunk (1, H B, r, D), rows head-major as
    ``_to_chunks``: the same numbers as the padded layout's, and each way's backward by gradcheck."""
    torch.manual_seed(0)
    B, L, H, Dh, S, nc = 3, 11, 2, 4, 4, 2
    x = torch.randn(B, L, H, Dh, dtype=torch.float64, requires_grad=True)
    main, tail = _ToChunksAndTail.apply(x, nc, S)
    padded = _to_chunks(x.detach(), nc + 1, S)
    assert torch.equal(main, padded[:nc]) and torch.equal(tail, padded[nc:, :, :L - nc * S])
    assert torch.equal(_FromChunksAndTail.apply(main, tail, B, H), x)
    assert torch.autograd.gradcheck(lambda t: _ToChunksAndTail.apply(t, nc, S), (x,))
    assert torch.autograd.gradcheck(lambda m, t: _FromChunksAndTail.apply(m, t, B, H),
                                    (main.detach().requires_grad_(True), tail.detach().requires_grad_(True)))


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("name", list(KINDS))
def test_autocast_bfloat16_trains(name):
    """``--dtype bfloat16`` runs the model under autocast: the scan (hand-written chunks) stays float32
    and forward + backward work, close to float32."""
    torch.manual_seed(0)
    m = KINDS[name](D, mini_batch_size=4)
    x = torch.randn(2, 19, D, requires_grad=True)
    y32 = m(x)
    (g32,) = torch.autograd.grad(y32.sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(x)
    (g16,) = torch.autograd.grad(y16.float().sum(), x)
    assert torch.isfinite(g16).all()
    torch.testing.assert_close(y16.float(), y32, rtol=0.1, atol=0.1)
    torch.testing.assert_close(g16, g32, rtol=0.1, atol=0.1)


def ln_l2_grad_sq(z, gam2, gt, eps=1e-6):
    """ln_l2_grad written with gamma^2 as the input, for checking _lnl2_bwd's gamma^2 gradient."""
    mu = z.mean(-1, keepdim=True)
    xc = z - mu
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    xh = xc * rstd
    gx = gam2 * xh - gt
    return rstd * (gx - gx.mean(-1, keepdim=True) - xh * (gx * xh).mean(-1, keepdim=True))


def test_gelu_derivatives():
    z = torch.linspace(-6, 6, 241, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(gelu_tanh(z).sum(), z, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), z)
    t = _gelu_t(z.detach())
    c = math.sqrt(2 / math.pi)  # _gelu_t goes through a sigmoid: it must still be this tanh
    torch.testing.assert_close(t, torch.tanh(c * (z.detach() + 0.044715 * z.detach() ** 3)), rtol=0, atol=1e-15)
    z32 = torch.linspace(-30, 30, 100001)
    torch.testing.assert_close(_gelu_t(z32), torch.tanh(c * (z32 + 0.044715 * z32 ** 3)), rtol=0, atol=3e-7)
    torch.testing.assert_close(_gelu_p(z.detach(), t), d1.detach())
    torch.testing.assert_close(_gelu_pp(z.detach(), t), d2)


# ------------------------------------------------------------------------------------------------
# options, init, robustness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(KINDS))
def test_initializer_range_sets_init_std(name):
    for std in (0.02, 0.2):
        torch.manual_seed(0)
        m = mixers.build(name, 64, num_heads=2, initializer_range=std, use_gate=True)
        for p in (m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.o_proj.weight, m.g_proj.weight, m.W1,
                  m.learnable_ttt_lr_weight) + ((m.W2,) if name == "ttt_mlp" else ()):
            assert abs(p.std().item() / std - 1) < 0.15, (p.shape, p.std().item(), std)
        assert m.b1.abs().max() == 0 and m.learnable_token_idx.abs().max() == 0
    m = mixers.build(name, 16, initializer_range=0.0)
    assert m.W1.abs().max() == 0 and m.q_proj.weight.abs().max() == 0


def test_options_and_defaults():
    opts = mixers.options("ttt_linear")
    assert opts["num_heads"] == 2 and opts["mini_batch_size"] == 16 and opts["ttt_base_lr"] == 1.0
    assert opts["use_gate"] is False and opts["pre_conv"] is False and opts["share_qk"] is False
    assert opts["use_rope"] is True and opts["rope_theta"] == 10000.0 and opts["initializer_range"] == 0.02
    assert opts["conv_kernel"] == 4 and opts["backend"] == "auto"
    assert mixers.options("ttt_mlp") == opts
    m = mixers.build("ttt_mlp", 16, mini_batch_size="7", use_gate="true", backend="reference")
    assert m.mini_batch_size == 7 and m.use_gate and m.backend == "reference"
    assert TTTLinear.available_backends() == ["torch", "reference"] and TTTLinear.auto_backend() == "torch"
    assert mixers.build("ttt_linear", 16).backend == "torch"


@pytest.mark.parametrize("bad", [dict(mini_batch_size=0), dict(mini_batch_size=-3), dict(num_heads=3),
                                 dict(num_heads=0), dict(backend="cuda"), dict(ttt_base_lr=-1.0),
                                 dict(conv_kernel=0), dict(initializer_range=-0.1), dict(scan_chunk=0),
                                 dict(rope_theta=0.0), dict(num_heads=16)])
def test_bad_options_raise(bad):
    with pytest.raises(ValueError):
        mixers.build("ttt_linear", 16, **bad)  # num_heads=16: head_dim 1, odd, with RoPE on


@pytest.mark.parametrize("mbs", [1, 16])
@pytest.mark.parametrize("name", list(KINDS))
def test_no_nan_at_defaults(name, mbs):
    torch.manual_seed(0)
    m = mixers.build(name, 64, mini_batch_size=mbs)
    x = (torch.randn(4, 50, 64) * 3).requires_grad_(True)
    y = m(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    x0 = torch.zeros(2, 20, 64)  # a constant input: the inner LayerNorm sees (almost) zero variance
    assert torch.isfinite(m(x0)).all()


def test_rope_fast_takes_bfloat16():
    """Under CUDA autocast q and k arrive in bf16, which has no complex type: rope_fast rotates them in
    float32 and returns bf16 (found by the GPU check: ``view_as_complex`` refused bf16)."""
    from mixers.ttt import _rope_factors, rope_fast, rope_reference
    torch.manual_seed(0)
    q, k = torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    pos = torch.arange(7) % 4
    rq, rk = rope_reference(q, k, pos, 10000.0)
    fq, fk = rope_fast(q.bfloat16(), k.bfloat16(), _rope_factors(pos, 8, 10000.0, "cpu"))
    assert fq.dtype == fk.dtype == torch.bfloat16
    torch.testing.assert_close(fq.float(), rq, rtol=0.02, atol=0.02)
    torch.testing.assert_close(fk.float(), rk, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("name", list(KINDS))
def test_fast_path_traces_without_graph_breaks(name):
    """torch.compile fuses the hand-written chunks' elementwise passes only if dynamo traces their forward
    and backward whole; one untraceable op (e.g. ``out=`` into a strided slice) sends the chunk back to
    eager (TTT-MLP, L 200 mbs 16 on CPU: 2.12x the official layer compiled with a break, 2.95x without)."""
    torch.manual_seed(0)
    m = KINDS[name](D, mini_batch_size=4, scan_chunk=8)  # chunks of 2 mini-batches, and a shorter last one
    ex = torch._dynamo.explain(m)(torch.randn(2, 19, D))
    assert ex.graph_break_count == 0, [b.reason[:200] for b in ex.break_reasons]


def test_compiled_ttt_mlp_equals_eager():
    """The compiled TTT-MLP (its chunks traced and fused by inductor) gives eager's outputs and gradients."""
    torch.manual_seed(0)
    m = _perturb(TTTMLP(D, mini_batch_size=4), scale=0.1)
    x, gy = torch.randn(2, 11, D), torch.randn(2, 11, D)
    ye, ge = _grads(m, x, gy)
    torch._dynamo.reset()
    yc, gc = _grads(torch.compile(m, dynamic=False), x, gy)
    torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,L,mbs", [("ttt_linear", 7, 1), ("ttt_linear", 9, 4), ("ttt_mlp", 6, 1),
                                        ("ttt_linear", 1, 1), ("ttt_linear", 5, 8)])
def test_compiled_form_gathers_the_token_factors_without_an_index(monkeypatch, kind, L, mbs):
    """What a compiled graph traces (torch.compiler.is_compiling() True): the token factors are taken by repeats
    (ttt_fast) and a one-hot product (forward_last), never by an index, whose backward scatter inductor
    failed to generate for mini-batches of one token (torch 2.13, CPU). The same values and gradients as the
    eager form, in float64; and the eager form (the numbers of every run so far) keeps its index."""
    def nodes_to(out, leaf):
        """The autograd nodes on the paths from ``out`` back to the parameter ``leaf``: their names, and an
        index node as "IndexBackward0 of (sizes)" (the indexed tensor's)."""
        memo = {}

        def reaches(f):
            if f is None:
                return False
            if f not in memo:
                memo[f] = False  # a graph is acyclic; this only guards the recursion
                memo[f] = getattr(f, "variable", None) is leaf or any([reaches(g) for g, _ in f.next_functions])
            return memo[f]
        reaches(out.grad_fn)
        return {type(f).__name__ + (f" of {tuple(f._saved_self_sym_sizes)}" if hasattr(f, "_saved_self_sym_sizes")
                                    else "") for f, ok in memo.items() if ok}

    monkeypatch.setattr(mixers.ttt, "_KERNELS", None)  # torch's forms (the harness's C kernels never trace)
    torch.manual_seed(0)
    m = _perturb(mixers.build(kind, D, 16, num_heads=2, mini_batch_size=mbs).double())
    x = torch.randn(3, L, D, dtype=torch.float64)
    lengths = torch.tensor([L, max(1, L - 1), 1])
    results = {}
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        y, last = m(x), m.forward_last(x, lengths)
        grads = torch.autograd.grad((y * torch.cos(y)).sum() + last.sum(), list(m.parameters()))
        tok = m.learnable_token_idx
        results[compiling] = (y, last, grads, nodes_to(y, tok) | nodes_to(last, tok))
    (y0, l0, g0, nodes0), (y1, l1, g1, nodes1) = results[False], results[True]
    tok_index = f"IndexBackward0 of ({mbs},)"  # an index into the token factors themselves
    assert tok_index not in nodes1
    assert tok_index in nodes0
    assert torch.allclose(y1, y0, atol=1e-12, rtol=0) and torch.allclose(l1, l0, atol=1e-12, rtol=0)
    for a, b in zip(g1, g0):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
