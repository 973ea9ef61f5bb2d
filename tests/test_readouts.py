import pytest
import torch

from benchbox.model import Recommender
from benchbox.readouts import READOUTS, build_readout

D = 8


def _counting(function, thunk):
    """thunk()'s result and how many times it called ``function.apply`` (a torch.autograd.Function): whether a fast
    path ran."""
    calls, real = [], function.apply
    function.apply = lambda *a: calls.append(1) or real(*a)
    try:
        return thunk(), len(calls)
    finally:
        function.apply = real


CASES = list(READOUTS) + ["comirec_dr:bilinear=position", "comirec_dr:inputs=unit", "comirec_sa:select=max",
                          "comirec_dr:select=max"]


@pytest.mark.parametrize("case", CASES)
def test_per_position_training_matches_evaluation_and_is_causal(case):
    torch.manual_seed(0)
    name, _, opt = case.partition(":")
    r = build_readout(name, D, max_len=16, **dict([opt.split("=")] if opt else [])).double()
    b, L, C = 2, 7, 5
    h = torch.randn(b, L, D, dtype=torch.float64)
    lengths = torch.tensor([L, L])
    cand = torch.randn(b, L, C, D, dtype=torch.float64)
    train = r.train_scores(h, lengths, cand)
    assert train.shape == (b, L, C)
    # position t only sees history 0..t
    h2 = h.clone()
    h2[:, 4:] += 1.0
    torch.testing.assert_close(r.train_scores(h2, lengths, cand)[:, :4], train[:, :4])
    # the last position of training = evaluation over the whole history (same candidates)
    if name.startswith("comirec") and "select=max" not in case:
        v_all = r.interests(h, lengths, causal=True)[:, -1]
        torch.testing.assert_close(v_all, r.interests(h, lengths, causal=False))
    else:
        torch.testing.assert_close(train[:, -1], r.scores(h, lengths, cand[:, -1]))


@pytest.mark.parametrize("name", list(READOUTS))
def test_readout_padding_and_full_ranking(name):
    torch.manual_seed(0)
    m = Recommender(30, "none" if name != "last" else "gru", d_model=D, n_layers=1, max_len=16, dropout=0.0,
                    readout=name).double().eval()
    x = torch.randint(1, 31, (2, 9))
    lengths = torch.tensor([9, 4])
    x[1, 4:] = 0
    cand = torch.randint(1, 31, (2, 6))
    s = m.score_candidates(x, lengths, cand)
    torch.testing.assert_close(s[1:], m.score_candidates(x[1:, :4], lengths[1:], cand[1:]))
    torch.testing.assert_close(m.score_all(x, lengths).gather(1, cand), s)


def test_comirec_defaults_to_50_epochs():
    from benchbox.train import default_epochs
    assert default_epochs("comirec_sa") == default_epochs("comirec_dr") == 50
    assert default_epochs("last") == default_epochs("din") == 10


def test_comirec_dr_maps():
    pos = build_readout("comirec_dr", D, max_len=16, bilinear="position")
    shared = build_readout("comirec_dr", D, max_len=16)
    assert pos.w.shape == (16, 4, D, D) and shared.w.shape == (1, 4, D, D)
    with pytest.raises(Exception, match="bilinear"):
        build_readout("comirec_dr", D, bilinear="nope")


@pytest.mark.parametrize("name", ["comirec_sa", "comirec_dr"])
def test_comirec_interest_selection(name):
    """select=target (ComiRec): the target's best interest scores every candidate of that position;
    select=max: each candidate is scored by its own best interest, as in evaluation."""
    torch.manual_seed(0)
    target_rule = build_readout(name, D, max_len=16).double()
    max_rule = build_readout(name, D, max_len=16, select="max").double()
    max_rule.load_state_dict(target_rule.state_dict())
    h = torch.randn(3, 6, D, dtype=torch.float64)
    lengths = torch.tensor([6, 6, 6])
    cand = torch.randn(3, 6, 5, D, dtype=torch.float64)
    per_interest = torch.einsum("btcd,btkd->btck", cand, target_rule.interests(h, lengths, causal=True))
    best_for_target = per_interest[:, :, 0].argmax(-1)  # (B,T)
    expected = per_interest.gather(3, best_for_target[:, :, None, None].expand(-1, -1, 5, 1)).squeeze(-1)
    torch.testing.assert_close(target_rule.train_scores(h, lengths, cand), expected)
    torch.testing.assert_close(max_rule.train_scores(h, lengths, cand), per_interest.amax(-1))
    # the two rules differ only on negatives that another interest likes better
    assert (per_interest.amax(-1) >= expected).all() and (per_interest.amax(-1) > expected).any()
    with pytest.raises(ValueError, match="select"):
        build_readout(name, D, select="mean")


def test_comirec_dr_unit_inputs_route_the_scaled_features():
    """inputs=unit routes H / sqrt(d): the same capsules as the default readout given H / sqrt(d)."""
    torch.manual_seed(0)
    unit = build_readout("comirec_dr", D, max_len=16, inputs="unit").double()
    rms = build_readout("comirec_dr", D, max_len=16).double()
    rms.load_state_dict(unit.state_dict())
    h = torch.randn(2, 5, D, dtype=torch.float64)
    lengths = torch.tensor([5, 3])
    torch.testing.assert_close(unit.interests(h, lengths, causal=True), rms.interests(h / D ** 0.5, lengths, causal=True))
    assert not torch.allclose(unit.interests(h, lengths, causal=False), rms.interests(h, lengths, causal=False))
    with pytest.raises(ValueError, match="inputs"):
        build_readout("comirec_dr", D, inputs="raw")


def _din_batch(L: int, C: int, lengths: list[int]):
    """A float64 DIN readout and a training batch of len(lengths) users: h (B, L, D), lengths, cand (B, L, C, D)."""
    torch.manual_seed(0)
    r = build_readout("din", D).double()
    h = torch.randn(len(lengths), L, D, dtype=torch.float64, requires_grad=True)
    cand = torch.randn(len(lengths), L, C, D, dtype=torch.float64, requires_grad=True)
    return r, h, torch.tensor(lengths), cand


def test_din_chunked_training_equals_one_pass():
    """Long sequences go over target positions in checkpointed chunks, each over its visible history
    only: the scores and every gradient must equal the one-pass computation."""
    L, C = 11, 4
    r, h, lengths, cand = _din_batch(L, C, [11, 7, 2])

    def run(limit, chunk=0):
        r.MAX_PAIR_ELEMENTS, r.CHUNK_ELEMENTS = limit, chunk
        out = r.train_scores(h, lengths, cand)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    [h, cand, *r.parameters()])
        return out, grads

    one_pass, g1 = run(10 ** 9)
    pair = C * 36  # activation elements of one (target position, history position) pair
    # blocks of 3 target positions (the last one short), 1 user a chunk, then 2 users (the last chunk short)
    r.TARGET_BLOCK = 3
    for chunk, checkpointed in ((pair * 3 * L, True), (pair * 3 * L * 2, True), (pair * 3 * L * 2, False)):
        r.CHECKPOINT = checkpointed
        chunked, g2 = run(0, chunk)
        torch.testing.assert_close(chunked, one_pass, rtol=0, atol=1e-12)
        for a, c in zip(g1, g2):
            torch.testing.assert_close(a, c, rtol=0, atol=1e-12)


def test_din_chunked_evaluation_equals_one_pass():
    """Evaluation over long histories goes a few users at a time: same scores as the one-pass form."""
    torch.manual_seed(0)
    r = build_readout("din", D).double()
    h = torch.randn(5, 13, D, dtype=torch.float64)
    lengths = torch.tensor([13, 9, 1, 13, 4])
    cand = torch.randn(5, 7, D, dtype=torch.float64)
    one_pass = r.scores(h, lengths, cand)
    with torch.no_grad():
        assert torch.equal(r.scores(h, lengths, cand), one_pass)  # 5 x 7 x 13 x 36 pairs: one chunk either way
    r.MAX_PAIR_ELEMENTS, r.CHUNK_ELEMENTS = 0, 7 * 13 * 36 * 2  # 2 users a chunk, the last one alone
    torch.testing.assert_close(r.scores(h, lengths, cand), one_pass, rtol=0, atol=1e-12)
    r.EVAL_CHUNK_ELEMENTS = 7 * 13 * 36 * 2  # without autograd (evaluation) its own chunks: 2 users again
    with torch.no_grad():
        torch.testing.assert_close(r.scores(h, lengths, cand), one_pass, rtol=0, atol=1e-12)


@pytest.mark.parametrize("in_c", [False, True])
@pytest.mark.parametrize("dtype,spread,block", [(torch.float32, 40.0, 8), (torch.float64, 40.0, 8),
                                                 (torch.float64, 1000.0, 4), (torch.float64, 1.0, 32),
                                                 (torch.float32, 1000.0, 8)])
def test_comirec_sa_prefix_softmax_equals_masked_softmax(dtype, spread, block, in_c, monkeypatch):
    """ComiRec-SA's causal interests (_causal_softmax_pool) against the plain masked softmax, values and gradients,
    in torch's blocked prefix-softmax form (several blocks, a block past the end (length 1), one block longer than the
    sequence) and as the C kernel's online softmax (``kernels.causal_pool``), with logits spread over ~100-2,000
    (exp() of the early ones under one global shift would underflow float32, of the later ones overflow): finite
    everywhere, exact in float64."""
    from benchbox import kernels
    if in_c and not kernels._causal_pool_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    if not in_c:
        monkeypatch.setattr(kernels, "causal_pool_applies", lambda *a: False)
    torch.manual_seed(0)
    r = build_readout("comirec_sa", D, max_len=32).to(dtype)
    r.CAUSAL_BLOCK = block
    with torch.no_grad():
        r.w2.weight.mul_(spread)
    h = torch.randn(4, 20, D, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([20, 9, 1, 17])
    fast, ref = r.interests(h, lengths, causal=True), r.interests_naive(h, lengths)
    valid = (torch.arange(20)[None, :] < lengths[:, None])[..., None, None]
    assert torch.isfinite(fast).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fast * valid, ref * valid, rtol=tol, atol=tol)
    w = torch.randn(fast.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    g1, = torch.autograd.grad((fast * valid * w).sum(), h)
    g2, = torch.autograd.grad((ref * valid * w).sum(), h)
    assert torch.isfinite(g1).all()
    scale = g2.abs().max().item()
    torch.testing.assert_close(g1, g2, rtol=0, atol=(1e-11 if dtype == torch.float64 else 1e-5) * max(scale, 1.0))


def test_causal_pool_kernel_is_the_blocked_pool():
    """ComiRec-SA's causal softmax pool in C (``kernels.causal_pool``, ``_CausalPool``) against torch's blocked form
    (``_causal_softmax_pool_blocked``): values and both gradients to float64's 1e-12 (relative) and float32's rounding,
    sequences longer than any block, 3 and 4 interests, lengths 1 to full; two threads as one, bit for bit; where
    position 0 is padding (torch's NaN), bf16, other devices or more than 64 interests: torch's blocked form."""
    from benchbox import kernels
    from benchbox.readouts import _CausalPool, _causal_softmax_pool, _causal_softmax_pool_blocked
    if not kernels._causal_pool_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        for b, s, k, d in ((5, 45, 4, 16), (3, 9, 3, 24)):
            lengths = torch.randint(1, s + 1, (b,))
            lengths[:2] = torch.tensor([s, 1])
            valid = torch.arange(s)[None] < lengths[:, None]
            a = (torch.randn(b, s, k, dtype=dtype) * 3).masked_fill(~valid[..., None], float("-inf"))
            a.requires_grad_()
            h = torch.randn(b, s, d, dtype=dtype, requires_grad=True)
            g = torch.randn(b, s, k, d, dtype=dtype)
            got, calls = _counting(_CausalPool, lambda: _causal_softmax_pool(a, h))
            want = _causal_softmax_pool_blocked(a, h)
            assert calls
            torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())
            (ga, gh), (wa, wh) = (torch.autograd.grad(o, (a, h), g) for o in (got, want))
            seen = torch.isfinite(a.detach())
            torch.testing.assert_close(ga[seen], wa[seen], rtol=0, atol=tol * wa[seen].abs().max().item())
            assert torch.equal(ga[~seen], torch.zeros_like(ga[~seen]))
            torch.testing.assert_close(gh, wh, rtol=0, atol=tol * wh.abs().max().item())
            torch.set_num_threads(2)
            try:
                two = _CausalPool.apply(a, h), *torch.autograd.grad(_CausalPool.apply(a, h), (a, h), g)
            finally:
                torch.set_num_threads(threads)
            for x, y in zip(two, (got, ga, gh)):
                assert torch.equal(x, y)
    a, h = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 6, 8, dtype=torch.float64)
    a[1, 0] = float("-inf")  # position 0 padding: torch's blocked form, as before
    got, calls = _counting(_CausalPool, lambda: _causal_softmax_pool(a, h))
    assert not calls and torch.equal(got.isnan(), _causal_softmax_pool_blocked(a, h).isnan())
    assert not kernels.causal_pool_applies(a.bfloat16(), h.bfloat16())
    assert not kernels.causal_pool_applies(a, h.float())
    assert not kernels.causal_pool_applies(torch.randn(2, 6, 65), torch.randn(2, 6, 8))
    assert not kernels.causal_pool_applies(a.to("meta"), h.to("meta"))


@pytest.mark.parametrize("c_kernel", [True, False])
def test_comirec_sa_logits_without_tanh_equal_the_plain_form(c_kernel, monkeypatch):
    """ComiRec-SA's CPU logits, (2 W2) sigmoid((2 W1) x) - W2 1, are W2 tanh(W1 x): values and every
    gradient in float64, and to float32 noise in float32 (its training dtype); the sigmoid and its product
    in the C kernel (kernels.sigmoid_project) or in torch's ops."""
    from benchbox import kernels
    if not c_kernel:
        monkeypatch.setattr(kernels, "sigmoid_project_applies", lambda *a: False)
    elif not kernels._sigmoid_project_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        r = build_readout("comirec_sa", D, max_len=32).to(dtype)
        with torch.no_grad():
            r.w1.weight.mul_(8.0)  # pre-activations over +-5: both tails of tanh, not only its linear part
        h = torch.randn(3, 20, D, dtype=dtype, requires_grad=True)
        fast, ref = r._logits(h), r.logits_reference(h)
        assert fast.shape == ref.shape == (3, 20, 4)
        torch.testing.assert_close(fast, ref, rtol=0, atol=tol * ref.abs().max().item())
        w = torch.randn_like(ref)
        params = [h, r.w1.weight, r.w2.weight, r.pos]
        for a, b in zip(torch.autograd.grad((fast * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
            torch.testing.assert_close(a, b, rtol=0, atol=tol * b.abs().max().item())


@pytest.mark.parametrize("k", [4, 3])
def test_sigmoid_project_kernel_is_sigmoid_then_the_product(k):
    """kernels.sigmoid_project and its backward (ComiRec-SA's logits) against sigmoid(u) @ w.T and its
    autograd: float32 to its rounding over pre-activations of +-100 (the exp's clamped tails included: no
    NaN, s in [0, 1]), more than one block of 64 rows, k = 4 (the unrolled path) and another k; float64 to
    1e-13 and gradcheck; it declines what it does not compute."""
    from benchbox import kernels
    from benchbox.readouts import _SigmoidProject
    if not kernels._sigmoid_project_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    g = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float32, 3e-6), (torch.float64, 1e-13)):
        u = (torch.randn(3, 70, 48, generator=g, dtype=dtype) * 6)
        u[0, 0, :16] = torch.tensor([-100, -88, -87.5, -87, -20, -1e-3, 0, 1e-3, 20, 87, 88, 88.5, 89, 100,
                                     -1e4, 1e4], dtype=dtype)
        u.requires_grad_()
        w = (torch.randn(k, 48, generator=g, dtype=dtype) * 0.5).requires_grad_()
        assert kernels.sigmoid_project_applies(u, w)
        s, a = kernels.sigmoid_project(u.detach(), w.detach())
        assert torch.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
        torch.testing.assert_close(s, torch.sigmoid(u.detach()), rtol=tol, atol=tol * 1e-3)
        got = _SigmoidProject.apply(u, w)
        want = torch.nn.functional.linear(torch.sigmoid(u), w)
        torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())
        ga = torch.randn(got.shape, generator=g, dtype=dtype)
        for x, y in zip(torch.autograd.grad(got, (u, w), ga), torch.autograd.grad(want, (u, w), ga)):
            torch.testing.assert_close(x, y, rtol=0, atol=tol * y.abs().max().item())
    u = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(k, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SigmoidProject.apply, (u, w))
    assert not kernels.sigmoid_project_applies(torch.randn(4, 40), torch.randn(k, 40))  # float32: 16 lanes
    assert kernels.sigmoid_project_applies(torch.randn(4, 40, dtype=torch.float64), torch.randn(k, 40, dtype=torch.float64))
    assert not kernels.sigmoid_project_applies(torch.randn(4, 32).bfloat16(), torch.randn(k, 32).bfloat16())
    assert not kernels.sigmoid_project_applies(torch.randn(4, 32), torch.randn(k, 32, dtype=torch.float64))
    assert not kernels.sigmoid_project_applies(torch.randn(4, 32, device="meta"), torch.randn(k, 32, device="meta"))


def test_pool_score_kernel_is_comirec_sa_plain_scores():
    """ComiRec-SA's scores at a row's end in C (kernels.pool_score, ``_PoolScore``) against the plain path
    (``_MultiInterestReadout.scores``: masked softmax, pooling, products, amax): values and every gradient (features,
    candidates, the readout's weights) in float64 to 1e-12 and in float32 to its rounding, over lengths from 1 (every
    interest the same: the max ties, its gradient shared as amax's) to the whole window, rows past the first; gradcheck;
    the plain path where a row has no visible item (torch's NaN), for many candidates a row (evaluation's), or where the
    kernel does not apply."""
    from benchbox import kernels
    from benchbox.readouts import ComiRecSAReadout, _MultiInterestReadout, _PoolScore
    if not kernels._pool_score_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 3e-6)):
        r = ComiRecSAReadout(D, max_len=12).to(dtype)
        h = torch.randn(37, 12, D, dtype=dtype, requires_grad=True)
        cand = torch.randn(37, 5, D, dtype=dtype, requires_grad=True)
        lengths = torch.randint(1, 13, (37,))
        lengths[:4] = torch.tensor([1, 1, 12, 2])
        got, calls = _counting(_PoolScore, lambda: r.scores(h, lengths, cand))
        want = _MultiInterestReadout.scores(r, h, lengths, cand)
        assert calls and got.shape == want.shape == (37, 5)
        torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())
        g = torch.randn(37, 5, dtype=dtype)
        params = [h, cand, *r.parameters()]
        for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
            torch.testing.assert_close(a, b, rtol=0, atol=tol * b.abs().max().item())
    a = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 6, 16, dtype=torch.float64, requires_grad=True)
    cand = torch.randn(3, 2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, h, c: _PoolScore.apply(a, h, c, torch.tensor([6, 3, 2])), (a, h, cand))
    r = ComiRecSAReadout(D, max_len=12).double()
    h, cand = torch.randn(2, 12, D, dtype=torch.float64), torch.randn(2, 5, D, dtype=torch.float64)
    lengths = torch.tensor([0, 3])  # no visible item: the plain path, as before
    assert torch.equal(r.scores(h, lengths, cand).isnan(), _MultiInterestReadout.scores(r, h, lengths, cand).isnan())
    many = torch.randn(2, r.POOL_SCORE_MAX_CANDIDATES + 1, D, dtype=torch.float64)  # evaluation's 100: the plain path
    got, calls = _counting(_PoolScore, lambda: r.scores(h, torch.tensor([4, 3]), many))
    assert not calls and torch.equal(got, _MultiInterestReadout.scores(r, h, torch.tensor([4, 3]), many))
    assert kernels.pool_score_applies(h, cand) and kernels.pool_score_applies(h.float(), cand.float())
    assert not kernels.pool_score_applies(h.bfloat16(), cand.bfloat16())
    assert not kernels.pool_score_applies(h, cand.float())
    assert not kernels.pool_score_applies(h.to("meta"), cand.to("meta"))


@pytest.mark.parametrize("iterations, block", [(3, 16), (2, 5), (1, 16), (3, 1), (3, 7)])
def test_dr_route_causal_kernel_is_the_torch_couplings(iterations, block):
    """ComiRec-DR's causal routing rounds in C (``kernels.dr_route_causal``) against torch's blocked rounds
    (``_couplings_causal_shared``): the last round's couplings over every entry the pooling reads (each target block
    against the history up to its end), float64 to 1e-12 and float32 to its rounding, over lengths 0, 1 and full,
    blocks of 1 to 16 with a short last one, 1 to 3 rounds, 3 or 4 interests, a sequence longer than 16; two threads
    as one, bit for bit. Where it applies: CPU, float32 (width a multiple of 16) or float64."""
    from benchbox import kernels
    from benchbox.readouts import ComiRecDRReadout
    if not kernels._dr_route_causal_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    for dtype, tol, d, k in ((torch.float64, 1e-12, 16, 4), (torch.float32, 2e-6, 32, 3)):
        b, s = 6, 37
        r = ComiRecDRReadout(d, k, iterations=iterations, max_len=s).to(dtype)
        r.TARGET_BLOCK = block
        x, w = torch.randn(b, s, d, dtype=dtype), r.w[0].detach()
        lengths = torch.tensor([s, 0, 1, 20, s - 1, 16])
        valid = torch.arange(s)[None] < lengths[:, None]
        want = r._couplings_causal_shared(x, w, valid)
        got = kernels.dr_route_causal(x, w, lengths, iterations, block)
        read = torch.zeros(s, s, dtype=torch.bool)
        for t0 in range(0, s, block):
            read[t0:t0 + block, :min(s, t0 + block)] = True
        read = read[None, :, None, :].expand(b, s, k, s)
        torch.testing.assert_close(got[read], want[read], rtol=0, atol=tol)
        assert torch.equal(got[1][read[1]], torch.zeros_like(got[1][read[1]]))  # nothing visible
        torch.set_num_threads(2)
        try:
            two = kernels.dr_route_causal(x, w, lengths, iterations, block)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(two[read], got[read])
    x, w = torch.randn(2, 5, 32), torch.randn(4, 32, 32)
    assert kernels.dr_route_causal_applies(x, w) and kernels.dr_route_causal_applies(x.double(), w.double())
    assert not kernels.dr_route_causal_applies(x[..., :8], w[:, :8, :8])  # float32: 16 lanes
    assert not kernels.dr_route_causal_applies(x.bfloat16(), w.bfloat16())
    assert not kernels.dr_route_causal_applies(x, w.double())
    assert not kernels.dr_route_causal_applies(x.to("meta"), w.to("meta"))


def test_cand_dot_kernel_is_candidate_dot_reference():
    """candidate_dot for few candidates a row in C (kernels.cand_dot, ``_CandidateDot``) against torch's
    multiply-and-sum (``candidate_dot_reference``): the logits and df to float64's 1e-12 and float32's rounding, dcand
    bit for bit (the same products), over 1 to 16 candidates, widths that are not a multiple of the vector width,
    leading shapes of one to three dimensions, non-contiguous inputs, one gradient wanted or both, two threads as one;
    gradcheck; torch's ops for 17 candidates, other dtypes, a broadcast f, and meta tensors."""
    from benchbox import kernels
    from benchbox.readouts import _CandidateDot, candidate_dot, candidate_dot_reference
    if not kernels._cand_dot_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        for lead, c, d in (((37,), 5, 64), ((6, 9), 1, 24), ((3, 4, 5), 16, 33), ((700, 11), 5, 16)):
            cand = torch.randn(*lead, c, d, dtype=dtype, requires_grad=True)
            f = torch.randn(*lead, d, dtype=dtype, requires_grad=True)
            g = torch.randn(*lead, c, dtype=dtype)
            got, calls = _counting(_CandidateDot, lambda: candidate_dot(cand, f))
            want = candidate_dot_reference(cand, f)
            assert calls and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())
            (gc, gf), (wc, wf) = (torch.autograd.grad(o, (cand, f), g) for o in (got, want))
            assert torch.equal(gc, wc)
            torch.testing.assert_close(gf, wf, rtol=0, atol=tol * wf.abs().max().item())
            (only_f,) = torch.autograd.grad(candidate_dot(cand.detach(), f), (f,), g)
            assert torch.equal(only_f, gf)
            torch.set_num_threads(2)
            try:
                kernels.CAND_DOT_GRAIN, grain = 1, kernels.CAND_DOT_GRAIN
                two = candidate_dot(cand, f), *torch.autograd.grad(candidate_dot(cand, f), (cand, f), g)
            finally:
                torch.set_num_threads(threads)
                kernels.CAND_DOT_GRAIN = grain
            for a, b in zip(two, (got, gc, gf)):
                assert torch.equal(a, b)
    base = torch.randn(4, 7, 5, 16, dtype=torch.float64)
    cand, f = base.transpose(0, 1), torch.randn(4, 7, 16, dtype=torch.float64).transpose(0, 1)  # not contiguous
    torch.testing.assert_close(candidate_dot(cand, f), candidate_dot_reference(cand, f), rtol=0, atol=1e-12)
    cand = torch.randn(3, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_CandidateDot.apply, (cand, f))
    assert not kernels.cand_dot_applies(cand.bfloat16(), f.bfloat16())
    assert not kernels.cand_dot_applies(cand, f.float())
    assert not kernels.cand_dot_applies(cand, f[:, :1])  # broadcast f: torch's ops
    assert not kernels.cand_dot_applies(cand.to("meta"), f.to("meta"))
    many, fb = torch.randn(2, 17, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    assert torch.equal(candidate_dot(many, fb), candidate_dot_reference(many, fb))


@pytest.mark.parametrize("opts", [{}, {"inputs": "unit"}, {"iterations": 1}, {"iterations": 2}, {"num_interests": 3}])
def test_dr_score_kernel_is_comirec_dr_plain_scores(opts):
    """ComiRec-DR's routing and scores at a row's end in C (kernels.dr_score, ``_DRScore``) against the plain path
    (``_MultiInterestReadout.scores`` over ``_interests_last_shared``, itself held to ComiRec's layout): values and
    every
    gradient (features, candidates, the maps) in float64 to 1e-12 and in float32 to its rounding, over lengths from 0
    (no visible item: zero interests, every score 0, the max tied K ways) and 1 to the whole window, more rows than one
    block of the kernel, 1 to 3 routing rounds, the unit-scaled inputs; gradcheck; the plain path for many candidates a
    row (evaluation's), the position maps, or where the kernel does not apply."""
    from benchbox import kernels
    from benchbox.readouts import _DRScore, _MultiInterestReadout
    if not kernels._dr_score_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    d, rows = 32, kernels.DR_ROW_BLOCK + 5
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        r = build_readout("comirec_dr", d, max_len=12, **opts).to(dtype)
        h = torch.randn(rows, 12, d, dtype=dtype, requires_grad=True)
        cand = torch.randn(rows, 5, d, dtype=dtype, requires_grad=True)
        lengths = torch.randint(1, 13, (rows,))
        lengths[:4] = torch.tensor([0, 1, 12, 2])
        got, calls = _counting(_DRScore, lambda: r.scores(h, lengths, cand))
        want = _MultiInterestReadout.scores(r, h, lengths, cand)
        assert calls and got.shape == want.shape == (rows, 5)
        assert torch.equal(got[0], torch.zeros_like(got[0]))
        torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())
        g = torch.randn(rows, 5, dtype=dtype)
        params = [h, cand, *r.parameters()]
        for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
            torch.testing.assert_close(a, b, rtol=0, atol=tol * b.abs().max().item())
    if opts:  # the rest once
        return
    # every interest the same (one map K times): the kernel's K scores tie exactly, and each max's gradient is shared
    # K ways, as amax's; torch's batched products round the K copies apart, so it gives the whole gradient to one of
    # them: the features' and candidates' gradients and the maps' summed over k agree, and the kernel's are K equal
    # parts
    r = build_readout("comirec_dr", d, max_len=12).double()
    with torch.no_grad():
        r.w[0, 1:] = r.w[0, :1]
    h = torch.randn(6, 12, d, dtype=torch.float64, requires_grad=True)
    cand = torch.randn(6, 5, d, dtype=torch.float64, requires_grad=True)
    lengths, g = torch.tensor([1, 2, 5, 12, 7, 3]), torch.randn(6, 5, dtype=torch.float64)
    got, want = r.scores(h, lengths, cand), _MultiInterestReadout.scores(r, h, lengths, cand)
    (gh, gc, gw), (wh, wc, ww) = (torch.autograd.grad(o, [h, cand, r.w], g) for o in (got, want))
    for a, b in ((gh, wh), (gc, wc), (gw.sum(1), ww.sum(1)), (gw[0], ww.sum(1).expand_as(gw[0]) / gw.shape[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * b.abs().max().item())
    x = torch.randn(3, 6, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, D, D, dtype=torch.float64, requires_grad=True)
    cand = torch.randn(3, 2, D, dtype=torch.float64, requires_grad=True)
    # one round: no couplings that depend on x or w (later rounds' carry no gradient, as in torch's, which gradcheck's
    # finite differences would see); the squash, the maps and the max checked against finite differences
    assert torch.autograd.gradcheck(lambda x, w, c: _DRScore.apply(x, w, c, torch.tensor([6, 3, 1]), 1), (x, w, cand))
    r = build_readout("comirec_dr", D, max_len=12).double()
    h = torch.randn(2, 12, D, dtype=torch.float64)
    for readout, c in ((r, torch.randn(2, r.DR_SCORE_MAX_CANDIDATES + 1, D, dtype=torch.float64)),  # evaluation's 100
                       (build_readout("comirec_dr", D, max_len=12, bilinear="position").double(),
                        torch.randn(2, 5, D, dtype=torch.float64))):
        got, calls = _counting(_DRScore, lambda: readout.scores(h, torch.tensor([4, 3]), c))
        assert not calls and torch.equal(got, _MultiInterestReadout.scores(readout, h, torch.tensor([4, 3]), c))
    x, w, c = torch.randn(2, 6, 32), torch.randn(4, 32, 32), torch.randn(2, 5, 32)
    assert kernels.dr_score_applies(x, w, c) and kernels.dr_score_applies(x.double(), w.double(), c.double())
    assert not kernels.dr_score_applies(x[..., :8], w[:, :8, :8], c[..., :8])  # float32: 16 lanes
    assert not kernels.dr_score_applies(x.bfloat16(), w.bfloat16(), c.bfloat16())
    assert not kernels.dr_score_applies(x, w, c.double())
    assert not kernels.dr_score_applies(x.to("meta"), w.to("meta"), c.to("meta"))


@pytest.mark.parametrize("pairs_min_ratio", [1.0, 0.0])
def test_din_batched_matmul_form_equals_the_einsum_reference(pairs_min_ratio):
    """DIN's scores run as batched matmuls (_pool_chunk's three forms); _pool's plain einsum is the reference:
    the same scores and gradients, for training (causal, every position) and evaluation (the last position).
    With PAIRS_MIN_RATIO 0 the many-candidates chunks run as _DINPairs, else (9 items < 45 rows) h_s * r_h first."""
    torch.manual_seed(0)
    r = build_readout("din", D).double()
    r.PAIRS_MIN_RATIO = pairs_min_ratio
    h = torch.randn(4, 9, D, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([9, 5, 1, 3])
    train = (lambda c: r.train_scores(h, lengths, c), lambda c: (r._pool(h, lengths, c, causal=True) * c).sum(-1))
    # 9 x 3 candidates < 36 hidden units: h_s * cand first; 9 x 5 > 36: h_s * r_h first (both forms)
    for cand, fast, ref in (
            (torch.randn(4, 9, 3, D, dtype=torch.float64, requires_grad=True), *train),
            (torch.randn(4, 9, 5, D, dtype=torch.float64, requires_grad=True), *train),
            (torch.randn(4, 6, D, dtype=torch.float64, requires_grad=True),
             lambda c: r.scores(h, lengths, c),
             lambda c: (r._pool(h, lengths, c.unsqueeze(1), causal=False).squeeze(1) * c).sum(-1))):
        outs = []
        for f in (fast, ref):
            out = f(cand)
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                        [h, cand, *r.parameters()])
            outs.append((out, grads))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-12)
        for a, b in zip(outs[0][1], outs[1][1]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_cand", [5, 101])
def test_candidate_dot_and_gather_rows_match_their_references(n_cand):
    """The fast forms of the shared head (multiply-and-sum / row-times-matrix, index_select) against
    the plain batched matmul and advanced indexing, values and gradients, float64."""
    from benchbox.readouts import candidate_dot, gather_rows
    torch.manual_seed(0)
    table = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 30, (3, 4, n_cand))
    f = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    fast = candidate_dot(gather_rows(table, ids), f)
    ref = (table[ids] @ f.unsqueeze(-1)).squeeze(-1)
    assert fast.shape == ref.shape == (3, 4, n_cand)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    gf = torch.autograd.grad(fast, [table, f], g)
    gr = torch.autograd.grad(ref, [table, f], g)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


_CAUSAL_OPTS = [{}, {"bilinear": "position"}, {"inputs": "unit", "num_interests": 3}, {"iterations": 1}]


# the C rounds (in_c) run the shared map's target blocks only
@pytest.mark.parametrize("opts, block, in_c", [(o, b, c) for o in _CAUSAL_OPTS for b in (None, 16, 5, 1)
                                               for c in (False, True)
                                               if not (c and (b is None or o.get("bilinear") == "position"))])
def test_comirec_dr_causal_routing_equals_the_reference_layout(opts, block, in_c):
    """The causal routing against ComiRec-DR's own dense (B, T, S, K) layout, float64, interests and the
    gradients through them: the dense (B, K, T, S) layout (block None, the C rounds off), and, with the shared
    map, the routing by target blocks (one block of 16, blocks of 5 with a short last one, single targets), its
    rounds in torch's ops or in C (``kernels.dr_route_causal``, also taken for short sequences where it applies)."""
    from benchbox import kernels
    if in_c and not kernels._dr_route_causal_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    r = build_readout("comirec_dr", D, max_len=12, **opts).double()
    if not in_c:
        r._route_in_c = lambda h: False
    if block is not None:
        r.BLOCKED_MIN_LEN, r.TARGET_BLOCK = 0, block
    h = torch.randn(5, 12, D, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([12, 7, 1, 3, 12])
    weights = torch.randn(5, 12, r.k, D, dtype=torch.float64)
    got = r.interests(h, lengths, causal=True)
    (g_fast,) = torch.autograd.grad((got * weights).sum(), h)
    ref = r.interests_reference(h, lengths, causal=True)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), h)
    valid = torch.arange(12)[None] < lengths[:, None]
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opts", [{}, {"inputs": "unit", "num_interests": 3}, {"iterations": 1}])
def test_comirec_dr_last_position_routing_equals_the_reference(opts):
    """One set of interests with the shared map (evaluation, the instance regime): routing on pooled
    features against ComiRec-DR's own routing on the (B, S, K, D) capsule inputs, float64: interests
    and the gradients to the features and to the map."""
    torch.manual_seed(1)
    r = build_readout("comirec_dr", D, max_len=12, **opts).double()
    h = torch.randn(5, 12, D, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([12, 7, 1, 3, 12])
    weights = torch.randn(5, r.k, D, dtype=torch.float64)
    got = r.interests(h, lengths, causal=False)
    ref = r.interests_reference(h, lengths, causal=False)
    assert got.shape == ref.shape == (5, r.k, D)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad((got * weights).sum(), [h, r.w])
    g_ref = torch.autograd.grad((ref * weights).sum(), [h, r.w])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_din_prelu_backward_is_torchs():
    """DIN's PReLU with a hand-written backward: torch's values and gradients (float64, with exact zeros,
    where torch takes the slope a), and gradcheck."""
    from benchbox.readouts import _PReLURows
    torch.manual_seed(0)
    x = torch.randn(40, 6, dtype=torch.float64)
    x[::7, 2] = 0.0
    a = torch.rand(6, dtype=torch.float64)
    g = torch.randn(40, 6, dtype=torch.float64)
    got, ref = [], []
    for fn, out in ((_PReLURows.apply, got), (torch.nn.functional.prelu, ref)):
        xx, aa = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
        y = fn(xx, aa)
        out += [y.detach(), *torch.autograd.grad((y * g).sum(), [xx, aa])]
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(_PReLURows.apply, (torch.randn(9, 4, dtype=torch.float64, requires_grad=True),
                                                       torch.rand(4, dtype=torch.float64, requires_grad=True)))


@pytest.mark.parametrize("c_kernels", [True, False])
@pytest.mark.parametrize("save", [True, False])
def test_din_pairs_function_matches_autograd_of_the_plain_form(save, c_kernels, monkeypatch):
    """DIN's activation unit by hand (_DINPairs: z in an (n, h, s) layout, PReLU and its slope-weighted sum, a
    backward without autograd, z kept or recomputed; its passes over the pairs in the C kernels or in torch)
    against autograd of the plain arithmetic, float64: values and all seven gradients, with exact zeros in z
    (where torch's PReLU takes the slope a), and gradcheck."""
    from benchbox import kernels
    from benchbox.readouts import _DINPairs
    if not c_kernels:
        monkeypatch.setattr(kernels, "din_relu_matvec", lambda z, w, y: False)
        monkeypatch.setattr(kernels, "din_threshold_sums", lambda z, gy: None)
        monkeypatch.setattr(kernels, "din_tcr_sums", lambda tcr, r1, cand: None)
    elif not kernels._din_kernels():
        pytest.skip("no C compiler here: torch's passes run")
    torch.manual_seed(0)
    b, n, s, hid = 3, 7, 5, 6
    f64 = dict(dtype=torch.float64)
    h, cand = torch.randn(b, s, D, **f64), torch.randn(b, n, D, **f64)
    ps, qc = torch.randn(b, s, hid, **f64), torch.randn(b, n, hid, **f64)
    r, a, w = torch.randn(hid, D, **f64), torch.rand(hid, **f64), torch.randn(hid, **f64)
    cand[1, 2] = 0.0  # candidate (1, 2): z = ps + qc; made exactly 0 at every history item for unit 3
    qc[1, 2, 3] = 1.5
    ps[1, :, 3] = -1.5
    inputs = [t.clone().requires_grad_(True) for t in (h, cand, ps, qc, r, a, w)]

    def pre(h, cand, ps, qc, r):  # z (B, N, H, S)
        return ps.transpose(1, 2)[:, None] + qc[..., None] + torch.einsum("bnd,hd,bsd->bnhs", cand, r, h)

    def plain(h, cand, ps, qc, r, a, w):
        z = pre(h, cand, ps, qc, r)
        return (torch.nn.functional.prelu(z.transpose(1, 2), a).transpose(1, 2) * w[:, None]).sum(2)

    z = pre(h, cand, ps, qc, r)
    assert (z[1, 2, 3] == 0).all() and (z != 0).sum() == z.numel() - s
    gy = torch.randn(b, n, s, **f64)
    fast = _DINPairs.apply(*inputs, save)
    ref = plain(*inputs)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    for u, v in zip(torch.autograd.grad((fast * gy).sum(), inputs), torch.autograd.grad((ref * gy).sum(), inputs)):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    # gradcheck away from the kink (finite differences straddle z = 0): fresh inputs, smaller
    g = torch.Generator().manual_seed(1)
    shapes = ((2, 3, D), (2, 4, D), (2, 3, hid), (2, 4, hid), (hid, D))
    small = [torch.randn(*sh, generator=g, **f64) for sh in shapes] + [torch.rand(hid, generator=g, **f64),
                                                                       torch.randn(hid, generator=g, **f64)]
    assert torch.autograd.gradcheck(lambda *x: _DINPairs.apply(*x, save), [t.requires_grad_(True) for t in small])


def test_din_training_keeps_or_recomputes_the_pairs_by_its_byte_budget(monkeypatch):
    """Long sequences: _DINPairs keeps every chunk's z while the step's pairs fit SAVE_PAIRS_BYTES, else
    recomputes them in the backward: the same scores and gradients to the bit either way."""
    from benchbox import readouts
    L, C = 16, 5
    r, h, lengths, cand = _din_batch(L, C, [16, 7, 2])
    r.MAX_PAIR_ELEMENTS, r.CHUNK_ELEMENTS, r.TARGET_BLOCK = 0, C * 36 * 8 * L * 2, 8
    r.PAIRS_MIN_RATIO = 0.0  # every chunk (8 positions x 5 candidates >= 36 units) as _DINPairs
    saved = []
    real = readouts._DINPairs.apply
    monkeypatch.setattr(readouts._DINPairs, "apply", lambda *x: saved.append(x[-1]) or real(*x))
    outs = []
    for budget in (10 ** 12, 0):
        r.SAVE_PAIRS_BYTES = budget
        out = r.train_scores(h, lengths, cand)
        outs.append((out, torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                              [h, cand, *r.parameters()])))
    n = len(saved) // 2
    assert n >= 4 and saved == [True] * n + [False] * n  # 2 user chunks x 2 target blocks, each way
    assert torch.equal(outs[0][0], outs[1][0])
    for u, v in zip(outs[0][1], outs[1][1]):
        assert torch.equal(u, v)


def test_din_pairs_run_in_float32_under_bfloat16_autocast():
    """Under autocast (``--dtype bfloat16``) the hand-written _DINPairs gets one dtype, float32: training's
    scores and gradients stay finite and close to the float32 run's (they crashed on mixed dtypes before)."""
    torch.manual_seed(0)
    r = build_readout("din", D)
    r.PAIRS_MIN_RATIO = 0.0
    h = torch.randn(2, 9, D, requires_grad=True)
    cand = torch.randn(2, 9, 5, D, requires_grad=True)
    lengths = torch.tensor([9, 4])
    ref = r.train_scores(h, lengths, cand)
    g_ref, = torch.autograd.grad(ref.sum(), h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r.train_scores(h, lengths, cand)
    g, = torch.autograd.grad(out.float().sum(), h)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    torch.testing.assert_close(g, g_ref, rtol=0.05, atol=0.05 * g_ref.abs().max().item())


def test_pick_interest_equals_gather_forward_and_backward():
    """The target-chosen interest (index_select forward, zeros + index_copy_ backward) is gather's, bit for bit."""
    from benchbox.readouts import _PickInterest
    g = torch.Generator().manual_seed(3)
    v = torch.randn(3, 7, 4, 5, generator=g)
    k = torch.randint(0, 4, (3, 7), generator=g)
    k[0, 0], k[-1, -1] = 0, 3  # both ends of the interest axis
    up = torch.randn(3, 7, 5, generator=g)
    a, b = v.clone().requires_grad_(), v.clone().requires_grad_()
    fast = _PickInterest.apply(a, k)
    ref = b.gather(2, k[..., None, None].expand(-1, -1, 1, 5)).squeeze(2)
    assert torch.equal(fast, ref)
    (fast * up).sum().backward()
    (ref * up).sum().backward()
    assert torch.equal(a.grad, b.grad) and (a.grad != 0).sum() == 3 * 7 * 5  # one interest per position
    vd = v.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: _PickInterest.apply(x, k), (vd,))


@pytest.mark.parametrize("s", [1, 16, 37, 200])
def test_din_pair_kernels_against_torchs_passes(s):
    """kernels.din_relu_matvec and din_threshold_sums against the torch passes they replace (relu_ and the
    batched matrix-vector product; threshold_backward and its two sums), float32: max(z, 0) and tb bit for bit
    (zeros, negatives and a NaN in z), the products and sums to float rounding (another summation order)."""
    from benchbox import kernels
    if not kernels._din_kernels():
        pytest.skip("no C compiler here: torch's passes run")
    torch.manual_seed(0)
    b, n, hid = 3, 5, 7
    z = torch.randn(b, n, hid, s)
    z[0, 1, 2] = 0.0
    z[1, 0, 0, 0] = float("nan")
    w, gy, y0 = torch.randn(hid), torch.randn(b, n, s), torch.randn(b, n, s)
    zk, y = z.clone(), y0.clone()
    assert kernels.din_relu_matvec(zk.view(b * n, hid, s), w, y.view(b * n, s))
    zr = z.clone().relu_()
    assert torch.equal(zk.nan_to_num(-1.0), zr.nan_to_num(-1.0))
    y_ref = y0.view(b * n, 1, s).baddbmm(w.view(1, 1, hid).expand(b * n, 1, hid).contiguous(), zr.view(b * n, hid, s))
    finite = ~torch.isnan(y_ref.view(b, n, s))
    torch.testing.assert_close(y[finite], y_ref.view(b, n, s)[finite], rtol=1e-5, atol=1e-5)
    tb, tb_s, tb_n = kernels.din_threshold_sums(zr, gy)
    tb_ref = torch.ops.aten.threshold_backward(gy.view(b * n, 1, s).expand(b * n, hid, s), zr.view(b * n, hid, s), 0.0)
    assert torch.equal(tb.view(b * n, hid, s), tb_ref)
    torch.testing.assert_close(tb_s, tb_ref.sum(-1).view(b, n, hid), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tb_n, tb_ref.view(b, n, hid, s).sum(1), rtol=1e-5, atol=1e-5)
    tcr, r1, cand = torch.randn(b, n, hid, s), torch.randn(hid, s), torch.randn(b, n, s)
    got_bn, got_hd = kernels.din_tcr_sums(tcr, r1, cand)
    torch.testing.assert_close(got_bn, (tcr * r1).sum(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_hd, (tcr * cand.unsqueeze(2)).sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert kernels.din_tcr_sums(tcr.transpose(0, 1), r1, cand) is None
    assert not kernels.din_relu_matvec(z.transpose(1, 2), w, y)  # not contiguous: torch's passes
    assert kernels.din_threshold_sums(zr.to(torch.bfloat16), gy.to(torch.bfloat16)) is None
