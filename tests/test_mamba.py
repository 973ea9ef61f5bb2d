"""Mamba mixer: fast scans (the chunked torch path, the C kernels) vs the sequential reference, initialisation,
options, streaming, backends."""
import math

import pytest
import torch
import torch.nn.functional as F

import mixers
from mixers.mamba import MambaMixer, mamba_ssm_ops, selective_scan_chunked, selective_scan_reference

F64 = torch.float64


@pytest.fixture(autouse=True)
def torch_scan(monkeypatch):
    """The torch paths unless a test installs the C kernels itself (the harness installs them when
    benchbox.model is imported, which other test modules do)."""
    monkeypatch.setattr(mixers.mamba, "_KERNELS", None)


@pytest.fixture
def fused(monkeypatch):
    """The C scan and conv kernels installed, as the harness does."""
    from benchbox import kernels
    if not kernels._scan_kernels():
        pytest.skip("no C compiler here: the torch paths run")
    monkeypatch.setattr(mixers.mamba, "_KERNELS", kernels)
    return kernels


def _scan_inputs(b, length, d, n, dt_scale=1.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    ins = dict(u=r(b, length, d), delta=r(b, length, d) * dt_scale,
               A=-(torch.rand(d, n, generator=g, dtype=dtype) * n + 0.1),
               B=r(b, length, n), C=r(b, length, n), D=r(d), z=r(b, length, d), delta_bias=r(d),
               initial_state=r(b, d, n))
    return {k: v.requires_grad_() for k, v in ins.items()}


def _run(scan, ins, seed=1, **kw):
    y, h = scan(**ins, delta_softplus=True, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() \
        + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
    grads = torch.autograd.grad(loss, list(ins.values()))
    return y, h, dict(zip(ins, grads))


@pytest.mark.parametrize("length,chunk,dt_scale", [
    (1, 8, 1.0),      # one step
    (7, 8, 1.0),      # shorter than a chunk
    (16, 8, 1.0),     # a multiple of the chunk
    (37, 8, 1.0),     # not a multiple
    (37, 8, 40.0),    # huge steps: range-limited chunks, many of length 1
    (50, 64, 3.0),
])
@pytest.mark.parametrize("kept", [True, False], ids=["states-kept", "states-recomputed"])
def test_chunked_matches_reference_float64(length, chunk, dt_scale, kept, monkeypatch):
    if not kept:  # the backward recomputes each chunk's states (what large batches do)
        monkeypatch.setattr(mixers.mamba, "SAVED_STATES_MAX_BYTES", 0)
    ins = _scan_inputs(2, length, 5, 6, dt_scale)
    y_ref, h_ref, g_ref = _run(selective_scan_reference, ins)
    y, h, g = _run(selective_scan_chunked, ins, chunk_size=chunk)
    assert torch.isfinite(y).all() and all(torch.isfinite(v).all() for v in g.values())
    scale = max(1.0, y_ref.abs().max().item())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-12 * scale)
    for k in g_ref:
        gs = max(1.0, g_ref[k].abs().max().item())
        torch.testing.assert_close(g[k], g_ref[k], rtol=0, atol=1e-11 * gs, msg=f"grad of {k}")


def test_cpu_chunks_are_capped_to_the_cache_and_match_the_reference(monkeypatch):
    """On CPU a large batch scans in chunks of about CPU_CHUNK_BYTES per (b, T, d, n) tensor, never fewer
    than CPU_MIN_CHUNK steps, never more than chunk_size; the results are the reference's."""
    from mixers.mamba import _cache_chunk
    u = torch.empty(128, 50, 128)  # the Table 1 shapes: batch 128, d_inner 128, d_state 16, float32
    assert _cache_chunk(32, u, 16) == 4 and _cache_chunk(2, u, 16) == 2
    assert _cache_chunk(32, torch.empty(16, 50, 128), 16) == 32  # small batches keep chunk_size
    assert _cache_chunk(32, torch.empty(1024, 10, 128), 16) == 4  # CPU_MIN_CHUNK
    seen = []
    real = mixers.mamba._chunk_bounds
    monkeypatch.setattr(mixers.mamba, "_chunk_bounds", lambda *a: seen.append(a[2]) or real(*a))
    monkeypatch.setattr(mixers.mamba, "CPU_CHUNK_BYTES", 2 * 5 * 6 * 8 * 3)  # 3 steps of this batch
    ins = _scan_inputs(2, 37, 5, 6, 1.0)
    y_ref, h_ref, g_ref = _run(selective_scan_reference, ins)
    monkeypatch.setattr(mixers.mamba, "CPU_MIN_CHUNK", 3)
    y, h, g = _run(selective_scan_chunked, ins, chunk_size=8)
    assert seen == [3]
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12 * max(1.0, y_ref.abs().max().item()))
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=0, atol=1e-11 * max(1.0, g_ref[k].abs().max().item()))


def test_kept_states_survive_a_second_backward():
    """retain_graph: the kept states are read, never modified, by a backward."""
    ins = _scan_inputs(2, 20, 3, 4, seed=4)
    y = selective_scan_chunked(**ins, delta_softplus=True, chunk_size=8)
    g1 = torch.autograd.grad(y.sum(), [ins["u"], ins["A"]], retain_graph=True)
    g2 = torch.autograd.grad(y.sum(), [ins["u"], ins["A"]])
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_chunked_gradcheck():
    ins = _scan_inputs(1, 6, 2, 3, seed=3)

    def f(u, delta, A, B, C, h0):
        return selective_scan_chunked(u, delta, A, B, C, delta_softplus=True, initial_state=h0,
                                      return_last_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(f, tuple(ins[k] for k in ("u", "delta", "A", "B", "C", "initial_state")))


def test_chunked_float32_as_accurate_as_reference_float32():
    ins = _scan_inputs(2, 120, 16, 16, dt_scale=3.0, seed=5)
    exact = selective_scan_reference(**ins, delta_softplus=True)
    f32 = {k: v.detach().float() for k, v in ins.items()}
    err_ref = (selective_scan_reference(**f32, delta_softplus=True).double() - exact).abs().max()
    err_fast = (selective_scan_chunked(**f32, delta_softplus=True).double() - exact).abs().max()
    assert err_fast <= 3 * err_ref + 1e-6, (err_fast, err_ref)


def test_init():
    torch.manual_seed(0)
    m = MambaMixer(40, d_state=8, expand=2, dt_min=0.002, dt_max=0.05)
    assert m.d_inner == 80 and m.dt_rank == math.ceil(40 / 16) == 3
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= 0.002 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    assert dt.max() / dt.min() > 5  # log-uniform spread, not a constant
    A = -torch.exp(m.A_log.detach())
    torch.testing.assert_close(A, -torch.arange(1, 9, dtype=torch.float32).repeat(80, 1))
    assert torch.equal(m.D.detach(), torch.ones(80))
    assert m.in_proj.weight.shape == (160, 40) and m.x_proj.weight.shape == (3 + 16, 80)
    assert m.conv1d.weight.shape == (80, 1, 4)
    floor = MambaMixer(16, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4)
    torch.testing.assert_close(F.softplus(floor.dt_proj.bias.detach()), torch.full((32,), 1e-4))
    assert MambaMixer(16, dt_rank=5).dt_rank == 5


@pytest.mark.parametrize("kw,match", [
    (dict(d_state=0), "d_state"), (dict(d_conv=0), "d_conv"), (dict(expand=0), "expand"),
    (dict(dt_rank=0), "dt_rank"), (dict(dt_rank="big"), "dt_rank"), (dict(dt_min=0.0), "dt_min"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min"), (dict(dt_init_floor=-1.0), "dt_init_floor"),
    (dict(scan="parallel"), "scan"), (dict(chunk_size=0), "chunk_size"), (dict(backend="triton"), "backend"),
])
def test_option_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MambaMixer(16, **kw)


def test_options_through_registry():
    assert mixers.options("mamba") == dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                                           dt_max=0.1, dt_init_floor=1e-4, scan="chunked", chunk_size=32,
                                           backend="auto")
    m = mixers.build("mamba", 16, d_state="4", dt_rank="3", scan="sequential")  # CLI strings
    assert (m.d_state, m.dt_rank, m.scan) == (4, 3, "sequential")
    with pytest.raises(ValueError, match="dt_rank"):
        mixers.build("mamba", 16, dt_rank="three")


def test_mamba_ssm_backend_refused_without_it():
    if mamba_ssm_ops() is not None:
        pytest.skip("mamba-ssm is available here")
    assert MambaMixer.available_backends("cuda") == ["torch"]
    with pytest.raises(ValueError, match="mamba-ssm"):
        MambaMixer(16, backend="mamba_ssm")


def test_scans_agree_inside_the_block():
    torch.manual_seed(0)
    a = MambaMixer(12, d_state=4, chunk_size=5).double()
    b = MambaMixer(12, d_state=4, scan="sequential").double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 23, 12, dtype=F64)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    ga = torch.autograd.grad(ya.square().sum(), list(a.parameters()))
    gb = torch.autograd.grad(yb.square().sum(), list(b.parameters()))
    for (name, _), u, v in zip(a.named_parameters(), ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("d_conv", [1, 2, 4])
def test_streaming_carries_conv_window_and_state(d_conv):
    torch.manual_seed(0)
    m = MambaMixer(8, d_state=3, d_conv=d_conv, chunk_size=4).double().eval()
    x = torch.randn(2, 17, 8, dtype=F64)
    y = m(x)
    for cuts in ([1] * 17, [2, 1, 1, 5, 8], [17]):
        state, outs, pos = m.init_state(2, dtype=F64), [], 0
        for c in cuts:
            o, state = m.step(x[:, pos:pos + c], state)
            outs.append(o)
            pos += c
        assert state["conv"].shape == (2, d_conv - 1, m.d_inner) and state["ssm"].shape == (2, m.d_inner, 3)
        torch.testing.assert_close(torch.cat(outs, 1), y, rtol=1e-10, atol=1e-10)


def test_bf16_and_float32_run():
    torch.manual_seed(0)
    m = MambaMixer(16)
    x = torch.randn(2, 40, 16)
    y32 = m(x)
    y16 = m.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16.float()).all()
    assert (y16.float() - y32).abs().max() < 0.1 * y32.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(mamba_ssm_ops() is None, reason="needs the optional mamba-ssm package (CUDA build)")
def test_mamba_ssm_backend_matches_torch_backend():
    torch.manual_seed(0)
    ref = MambaMixer(32, backend="torch").cuda()
    fused = MambaMixer(32, backend="mamba_ssm").cuda()
    fused.load_state_dict(ref.state_dict())
    assert fused.backend_for(torch.zeros(1, 1, 32, device="cuda")) == "mamba_ssm"
    x = torch.randn(4, 100, 32, device="cuda", requires_grad=True)
    y_ref, y = ref(x), fused(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-4)
    dy = torch.randn_like(y)
    g_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], dy)
    g = torch.autograd.grad(y, [x, *fused.parameters()], dy)
    for (name, _), u, v in zip([("x", None), *ref.named_parameters()], g, g_ref):
        torch.testing.assert_close(u, v, rtol=1e-3, atol=1e-3 * max(1.0, v.abs().max().item()), msg=name)


@pytest.mark.parametrize("length,dt_scale", [(1, 1.0), (7, 1.0), (16, 1.0), (37, 1.0), (37, 40.0), (50, 3.0)])
@pytest.mark.parametrize("extras", [True, False], ids=["D-z-h0", "bare"])
def test_fused_scan_matches_reference_float64(length, dt_scale, extras, fused):
    """The C scan (mixers.mamba._FusedScan: the recurrence with its D skip and silu(z) gate, states checkpointed
    every 16 steps) against the sequential reference: output, last state and every gradient to 1e-12 in float64,
    with B and C as slices of one projection (the mixer's layout), across checkpoint bounds and huge steps."""
    ins = _scan_inputs(2, length, 5, 6, dt_scale, seed=length)
    proj = torch.cat([ins.pop("B"), ins.pop("C")], -1).detach().requires_grad_()
    ins["proj"] = proj
    if not extras:
        for k in ("D", "z", "initial_state"):
            ins.pop(k)

    def run(scan):
        kw = {k: v for k, v in ins.items() if k != "proj"}
        y, h = scan(**kw, B=proj[..., :6], C=proj[..., 6:], delta_softplus=True, return_last_state=True)
        g = torch.Generator().manual_seed(1)
        loss = (y * torch.randn(y.shape, generator=g, dtype=F64)).sum() + (h * torch.randn(h.shape, generator=g,
                                                                                          dtype=F64)).sum()
        return (y, h) + torch.autograd.grad(loss, list(ins.values()))

    got = run(selective_scan_chunked)
    assert mixers.mamba._fused_scan_applies(ins["u"], ins["A"])
    want = run(selective_scan_reference)
    for name, a, b in zip(["y", "h", *ins], got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * max(1.0, b.abs().max().item()), msg=name)


def test_fused_scan_gradcheck_and_float32(fused):
    from mixers.mamba import _FusedScan
    ins = _scan_inputs(2, 19, 3, 4, seed=3)
    dt = F.softplus(ins["delta"].detach()).requires_grad_()
    args = (ins["u"], dt, ins["A"], ins["B"], ins["C"], ins["D"], ins["z"], ins["initial_state"])
    assert torch.autograd.gradcheck(_FusedScan.apply, args)
    ins = _scan_inputs(2, 120, 16, 16, dt_scale=3.0, seed=5)  # float32: 16 lanes over D
    exact = selective_scan_reference(**ins, delta_softplus=True)
    f32 = {k: v.detach().float() for k, v in ins.items()}
    err_ref = (selective_scan_reference(**f32, delta_softplus=True).double() - exact).abs().max()
    err_fast = (selective_scan_chunked(**f32, delta_softplus=True).double() - exact).abs().max()
    assert mixers.mamba._fused_scan_applies(f32["u"], f32["A"])
    assert err_fast <= 3 * err_ref + 1e-6, (err_fast, err_ref)


@pytest.mark.parametrize("d_conv", [1, 4])
def test_fused_conv_silu_is_conv1d_then_silu(d_conv, fused):
    """The C causal depthwise conv with its SiLU, read from the projection's (B, L, D) slice, against torch's
    conv1d + silu: output and gradients to 1e-12 in float64 (and gradcheck), float32 to its rounding."""
    from mixers.mamba import _FusedConvSiLU
    torch.manual_seed(0)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        m = MambaMixer(16, d_conv=d_conv).to(dtype)
        xz = torch.randn(3, 11, 64, dtype=dtype, requires_grad=True)
        x = xz[..., :32]  # the in_proj output's first half, rows of 64
        got = _FusedConvSiLU.apply(x, m.conv1d.weight, m.conv1d.bias)
        want = F.silu(m._conv(x)[0])
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
        g = torch.randn_like(want)
        for a, b in zip(torch.autograd.grad(got, [xz, m.conv1d.weight, m.conv1d.bias], g),
                        torch.autograd.grad(want, [xz, m.conv1d.weight, m.conv1d.bias], g)):
            torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))
    w = torch.randn(5, 1, d_conv, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(_FusedConvSiLU.apply, (torch.randn(2, 6, 5, dtype=F64, requires_grad=True), w,
                                                           torch.randn(5, dtype=F64, requires_grad=True)))


def test_mixer_with_kernels_is_the_torch_mixer(fused, monkeypatch):
    """The whole block with the C conv and scan against its torch paths, float64 to 1e-12; streaming keeps
    the torch paths and still continues the fused full pass."""
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=4).double()
    x = torch.randn(3, 23, 16, dtype=F64, requires_grad=True)
    got = {}
    for name, installed in (("c", fused), ("torch", None)):
        monkeypatch.setattr(mixers.mamba, "_KERNELS", installed)
        y = m(x)
        got[name] = (y,) + torch.autograd.grad((y * torch.cos(y)).sum(), [x, *m.parameters()])
    assert not torch.equal(got["c"][0], got["torch"][0])  # the kernels ran (another summation order)
    for a, b in zip(got["c"], got["torch"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * max(1.0, b.abs().max().item()))
    monkeypatch.setattr(mixers.mamba, "_KERNELS", fused)
    state, outs = m.init_state(3, dtype=F64), []
    for pos in range(0, 23, 5):
        o, state = m.step(x[:, pos:pos + 5].detach(), state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), got["c"][0].detach(), rtol=0, atol=1e-12)


def test_fused_paths_decline_what_they_do_not_compute(fused, monkeypatch):
    """The torch paths where the kernels do not apply: float32 with d_inner off the 16 lanes, bfloat16, d_state
    over 64, autocast, torch.compile tracing, no kernels installed."""
    from mixers.mamba import _fused_scan_applies
    A = -torch.ones(32, 16)
    assert _fused_scan_applies(torch.randn(2, 5, 32), A)
    assert _fused_scan_applies(torch.randn(2, 5, 24, dtype=F64), A)
    assert not _fused_scan_applies(torch.randn(2, 5, 24), A)
    assert not _fused_scan_applies(torch.randn(2, 5, 32).bfloat16(), A)
    assert not _fused_scan_applies(torch.randn(2, 5, 32), -torch.ones(32, 65))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _fused_scan_applies(torch.randn(2, 5, 32), A)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _fused_scan_applies(torch.randn(2, 5, 32), A)
    monkeypatch.undo()
    monkeypatch.setattr(mixers.mamba, "_KERNELS", None)
    assert not _fused_scan_applies(torch.randn(2, 5, 32), A)
