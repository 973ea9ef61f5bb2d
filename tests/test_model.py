import pytest
import torch

import mixers
from benchbox.model import Dropout, Recommender, bce_loss
from benchbox.readouts import READOUTS
from benchbox.evaluate import evaluate, metrics_from_ranks
from benchbox import data
from benchbox.pipeline import eval_batches, eval_candidates


def _model(mixer="gru", readout="last", **kw):
    torch.manual_seed(0)
    return Recommender(50, mixer, d_model=16, n_layers=2, max_len=20, dropout=0.0, readout=readout, **kw).double().eval()


@pytest.mark.parametrize("mixer", ["gru", "attention"])
def test_recommender_is_causal_and_padding_free(mixer):
    m = _model(mixer)
    x = torch.randint(1, 51, (3, 12))
    lengths = torch.tensor([12, 7, 3])
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 0
    h = m.encode(x, lengths)
    x2 = x.clone()
    x2[0, 6:] = torch.randint(1, 51, (6,))
    torch.testing.assert_close(m.encode(x2, lengths)[0, :6], h[0, :6])
    cand = torch.randint(1, 51, (3, 10))
    s = m.score_candidates(x, lengths, cand)
    for i, n in enumerate(lengths.tolist()):
        alone = m.score_candidates(x[i:i + 1, :n], lengths[i:i + 1], cand[i:i + 1])
        torch.testing.assert_close(s[i:i + 1], alone)
    # the score is F_s . F_t with F_s the last real position
    fs = h[torch.arange(3), lengths - 1]
    torch.testing.assert_close(s, (fs[:, None] * m.item_features(cand)).sum(-1))
    # full ranking agrees with candidate scoring
    torch.testing.assert_close(m.score_all(x, lengths).gather(1, cand), s)


@pytest.mark.parametrize("mixer", ["gru", "attention"])
def test_streaming_recommender_matches_encode(mixer):
    m = _model(mixer)
    x = torch.randint(1, 51, (2, 9))
    h = m.encode(x, torch.tensor([9, 9]))
    state, outs = m.init_stream(2, dtype=torch.float64), []
    for t in range(9):
        o, state = m.stream(x[:, t:t + 1], state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), h)


def test_bce_loss_ignores_padding():
    logits = torch.tensor([[[2.0, -1.0], [5.0, 5.0]]])
    targets = torch.tensor([[3, 0]])
    expected = torch.nn.functional.softplus(torch.tensor(-2.0)) + torch.nn.functional.softplus(torch.tensor(-1.0))
    torch.testing.assert_close(bce_loss(logits, targets), expected)


def test_untrained_model_scores_near_chance():
    d = data.synthetic(seed=0)
    cand = eval_candidates(d, "test", 99, 42)
    m = Recommender(d.n_items, "gru", d_model=16, n_layers=1, max_len=50)
    res = evaluate(m, eval_batches(d, "test", 50, 256, cand), d.n_items)
    assert 0.06 < res["hr@10"] < 0.14  # chance is 0.10 (2,000 users)


@pytest.mark.parametrize("mixer,readout", [("gru", "last"), ("attention", "last"), ("ttt_linear", "last"),
                                           ("ttt_mlp", "last"), ("mamba", "last"), ("none", "din"),
                                           ("none", "comirec_sa"), ("none", "comirec_dr"), ("gru", "din")])
def test_one_encode_for_both_splits_equals_each_split_alone(mixer, readout):
    """evaluate_splits scores validation from the test encode where the test input is not cut; the
    per-split evaluate is its reference. max_len 30 cuts about half of the users (those are encoded twice)."""
    from benchbox.evaluate import evaluate_splits
    d = data.synthetic(seed=1, n_users=120, n_items=200, max_seq=45)
    max_len = 30
    assert 0 < ((d.lengths - 1) > max_len).sum() < d.n_users
    vc, tc = eval_candidates(d, "valid", 20, 3), eval_candidates(d, "test", 20, 3)
    torch.manual_seed(0)
    m = Recommender(d.n_items, mixer, d_model=16, n_layers=2 if mixer != "none" else 0, max_len=max_len,
                    dropout=0.0, readout=readout).double()
    val, test = evaluate_splits(m, d, max_len, vc, tc, batch_size=16)
    ref_val = evaluate(m, eval_batches(d, "valid", max_len, 16, vc), d.n_items)
    ref_test = evaluate(m, eval_batches(d, "test", max_len, 16, tc), d.n_items)
    assert val == pytest.approx(ref_val, abs=1e-12) and test == pytest.approx(ref_test, abs=1e-12)
    assert val != test  # two splits really were scored (a mix-up of candidates would show here)


@pytest.mark.parametrize("mixer,opts", [("attention", {}), ("attention", {"dropout": 0.1}), ("gru", {}),
                                        ("ttt_linear", {}), ("ttt_linear", {"use_gate": True, "pre_conv": True}),
                                        ("ttt_linear", {"mini_batch_size": 4}), ("ttt_linear", {"backend": "reference"}),
                                        ("ttt_mlp", {}), ("mamba", {})])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_last_position_encode_is_the_full_encode_at_the_last_position(mixer, opts, dtype):
    """score_candidates runs the last block at each row's last position only (encode_last); the reference
    is the full encode read there. Same logits and gradients, and in training mode the same dropout
    draws (a different mask would move the logits by O(1), not by float noise)."""
    torch.manual_seed(0)
    m = Recommender(50, mixer, opts, d_model=16, n_layers=2, max_len=10, dropout=0.2).to(dtype)
    lengths = torch.tensor([1, 3, 10, 5, 10, 2, 7])
    x = torch.randint(1, 51, (7, 10))
    x[torch.arange(10)[None] >= lengths[:, None]] = 0
    cand = torch.randint(1, 51, (7, 5))
    tol = dict(rtol=1e-13, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for training in (False, True):
        m.train(training)
        got = []
        for path in ("reference", "last"):
            torch.manual_seed(1)
            m.zero_grad()
            if path == "reference":
                s = m.readout.scores(m.encode(x, lengths), lengths, m._candidate_features(cand))
            else:
                s = m.score_candidates(x, lengths, cand)
            bce_loss(s).backward()
            got.append((s.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
        torch.testing.assert_close(got[1][0], got[0][0], **tol)
        assert len(got[1][1]) == len(got[0][1])
        for a, b in zip(got[1][1], got[0][1]):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("mixer,opts", [("attention", {}), ("gru", {}), ("ttt_linear", {}),
                                        ("ttt_linear", {"mini_batch_size": 16}), ("ttt_mlp", {}), ("mamba", {})])
def test_encode_ends_is_the_full_encode_at_the_end_rows(mixer, opts):
    """Evaluation's encode_ends (the last block at the test and validation rows only: attention's and
    one-mini-batch TTT-Linear's cheap forward_last, the FFN at those rows) against encode read there;
    rows of length 1 clamp to position 0. L 12 <= mbs 16 takes TTT-Linear's one-mini-batch path."""
    torch.manual_seed(0)
    m = Recommender(50, mixer, mixer_opts=opts, d_model=16, n_layers=2, max_len=12, dropout=0.0).double().eval()
    x = torch.randint(1, 51, (4, 12))
    lengths = torch.tensor([12, 7, 2, 1])
    x[torch.arange(12)[None, :] >= lengths[:, None]] = 0
    with torch.no_grad():
        h = m.encode(x, lengths)
        ends = m.encode_ends(x, lengths, 2)
    pos = (lengths[:, None] - 1 - torch.arange(2)).clamp_min(0)
    torch.testing.assert_close(ends, h[torch.arange(4)[:, None], pos], rtol=1e-10, atol=1e-10)


def test_length_groups_cover_every_row_once_with_its_groups_longest_length():
    from benchbox.model import GROUP_MIN_ROWS, length_groups
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 51, (300,), generator=g)
    padded = {}
    for per_octave in (1, 2):
        groups = length_groups(lengths, 50, per_octave=per_octave)
        assert groups is not None and len(groups) >= 3
        rows = torch.cat([idx for idx, _ in groups])
        assert sorted(rows.tolist()) == list(range(300))
        for idx, n in groups:
            assert len(idx) >= GROUP_MIN_ROWS and n == int(lengths[idx].max())
        assert [n for _, n in groups] == sorted(n for _, n in groups)
        padded[per_octave] = (len(groups), sum(len(idx) * n for idx, n in groups))
    # the midpoints: more groups, less padding
    assert padded[2][0] > padded[1][0] and padded[2][1] < padded[1][1]
    assert [n for _, n in length_groups(torch.arange(1, 51).repeat(20), 50, per_octave=2)] == [
        2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 50]
    # nothing to save: equal lengths, too few rows, or a batch too short to split
    assert length_groups(torch.full((300,), 50), 50) is None
    assert length_groups(lengths[:10], 50) is None
    assert length_groups(torch.tensor([1, 2, 3] * 20), 3) is None
    # a batch of fewer padded positions than the mixer's threshold runs whole
    assert length_groups(lengths, 50, min_positions=300 * 50 + 1) is None
    assert length_groups(lengths, 50, min_positions=300 * 50) is not None
    # a handful of long rows joins the group below rather than standing alone
    few_long = torch.cat([torch.full((40,), 3), torch.full((3,), 40)])
    got = length_groups(few_long, 40)
    assert got is None or all(len(idx) >= GROUP_MIN_ROWS for idx, _ in got)


@pytest.mark.parametrize("midpoints", [False, True])
@pytest.mark.parametrize("mixer", ["attention", "gru", "ttt_linear", "ttt_mlp", "mamba"])
def test_length_groups_train_as_the_whole_batch(mixer, midpoints):
    """The grouped path (rows of similar length through the encoder together) against one pass over the
    padded batch, float64: without dropout, in training mode, the same logits and gradients for the
    instance regime's last-position scores and the sequence regime's every-position logits; with dropout,
    the same in eval mode, and in training mode a seeded run repeats itself exactly."""
    from benchbox.model import length_groups
    g = torch.Generator().manual_seed(0)
    B, L = 64, 20
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    assert length_groups(lengths, L) is not None
    real = torch.arange(L)[None] < lengths[:, None]
    inputs = torch.randint(1, 100, (B, L), generator=g) * real
    cand = torch.randint(1, 100, (B, 5), generator=g)
    targets = torch.randint(1, 100, (B, L), generator=g) * real
    negatives = torch.randint(1, 100, (B, L, 4), generator=g)

    def step(m, grouped):
        m.group_lengths = grouped
        m.zero_grad()
        torch.manual_seed(5)
        last = m.score_candidates(inputs, lengths, cand)
        every = m.train_logits(inputs, lengths, targets, negatives)
        # encode / encode_last go the same grouped way (their gradients join the check)
        feats = m.encode(inputs, lengths)[real].square().mean() + m.encode_last(inputs, lengths).square().mean()
        (bce_loss(last) + bce_loss(every, targets) + feats).backward()
        return last.detach(), every.detach()[real], [p.grad.clone() for p in m.parameters() if p.grad is not None]

    def same(x, y):
        torch.testing.assert_close(y[0], x[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y[1], x[1], rtol=1e-12, atol=1e-12)
        assert len(x[2]) == len(y[2])
        for a, b in zip(x[2], y[2]):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)

    torch.manual_seed(1)
    m = Recommender(100, mixer, d_model=16, max_len=L, dropout=0.0).double().train()
    m.group_min_positions = 0  # a small batch, grouped all the same
    m.group_midpoints_min_rows = 0 if midpoints else None
    same(step(m, False), step(m, True))
    torch.manual_seed(1)
    m = Recommender(100, mixer, d_model=16, max_len=L, dropout=0.2).double()
    m.group_min_positions = 0
    m.group_midpoints_min_rows = 0 if midpoints else None
    assert len(m._groups(lengths, L)) == len(length_groups(lengths, L, per_octave=2 if midpoints else 1)) > 2
    same(step(m.eval(), False), step(m.eval(), True))
    first, again, whole = step(m.train(), True), step(m.train(), True), step(m.train(), False)
    same(first, again)
    assert not torch.allclose(first[0], whole[0])  # dropout on: each group drew its own masks


def test_dropout_mask_is_dropout_with_p_to_two_to_the_minus_16():
    """dropout_mask: values 0 or 1 / P(keep) exactly, P(keep) = 1 - p to 2^-16 (rate within 5 sd over 4M
    draws, every 16-bit lane of the 64-bit draws alike); Dropout with fast masks is x * that mask."""
    from benchbox.model import Dropout, dropout_mask
    torch.manual_seed(0)
    for p in (0.2, 0.5, 0.05):
        mask = dropout_mask((1000, 4096), p, torch.float64)
        q = 1 - round(p * 65536) / 65536
        assert abs(q - (1 - p)) <= 2 ** -17
        keep = mask != 0
        assert mask.dtype == torch.float64 and mask.shape == (1000, 4096)
        assert torch.equal(mask[keep], torch.full_like(mask[keep], 1 / q))
        sd = (q * (1 - q) / keep.numel()) ** 0.5
        assert abs(keep.double().mean().item() - q) < 5 * sd
        lanes = keep.view(-1, 4).double().mean(0)  # the four 16-bit lanes of each draw
        assert (lanes - q).abs().max().item() < 5 * sd * 2
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    d = Dropout(0.3).train()
    d.fast_masks = True
    torch.manual_seed(3)
    y = d(x)
    torch.manual_seed(3)
    mask = dropout_mask(x.shape, 0.3, torch.float64)
    torch.testing.assert_close(y, x * mask, rtol=0, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, mask, rtol=0, atol=0)
    assert torch.equal(d.eval()(x), x)


def test_dropout_mask_keeps_exactly_the_lanes_at_or_above_the_threshold():
    """dropout_mask's float clamp form keeps exactly the 16-bit lanes >= drop - 32768 (the comparison it
    replaced, so the same masks from the same draws), in every dtype: 1M lanes hit every int16 value, the
    threshold and its neighbours included; half precision must not round the lanes (float16 would)."""
    from benchbox.model import dropout_mask
    shape = (256, 4096)
    for p in (0.2, 0.5, 0.05):
        drop = round(p * 65536)
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            torch.manual_seed(11)
            got = dropout_mask(shape, p, dtype, scale=1.5)
            torch.manual_seed(11)
            bits = torch.empty(shape[0] * shape[1] // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1)
            lanes = bits.view(torch.int16).view(shape)
            assert (lanes == drop - 32768).any() and (lanes == drop - 32769).any()
            want = (lanes >= drop - 32768).to(dtype).mul_(1.5 * 65536 / (65536 - drop))
            assert got.dtype == dtype and torch.equal(got, want), (p, dtype)


def test_native_gelu_is_torchs_kernel_forward_and_backward_and_only_in_the_grouped_path(monkeypatch):
    """Where the C kernel does not apply, GELU with ``native`` on runs torch's own CPU kernel (not oneDNN's, which
    builds a primitive for every new shape) forward and backward: bit for bit what torch gives with oneDNN off,
    within float rounding of nn.GELU. The grouped path turns it on for the blocks' FFN and off after; oneDNN's switch
    is restored."""
    import torch.nn.functional as F
    import benchbox.model as M
    from benchbox.model import GELU, _NativeGELUFunction
    monkeypatch.setattr(M.kernels, "gelu_applies", lambda x: False)  # the path where no C kernel applies
    torch.manual_seed(0)
    x = (torch.randn(37, 11, 128) * 3).requires_grad_()
    g = torch.randn(37, 11, 128)
    act = GELU()
    act.native = True
    y = act(x)
    (dx,) = torch.autograd.grad(y, x, g)
    onednn = torch._C._get_mkldnn_enabled()
    with torch.backends.mkldnn.flags(enabled=False):
        want, want_dx = F.gelu(x.detach()), torch.ops.aten.gelu_backward(g, x.detach())
    assert torch._C._get_mkldnn_enabled() == onednn
    assert torch.equal(y, want) and torch.equal(dx, want_dx)
    torch.testing.assert_close(y, F.gelu(x.detach()), rtol=0, atol=1e-5)
    calls = []
    real = _NativeGELUFunction.apply
    _NativeGELUFunction.apply = lambda *a: calls.append(a[0].shape) or real(*a)
    try:
        m = Recommender(100, "attention", d_model=8, max_len=20, dropout=0.2).train()
        m.group_min_positions = 0
        lengths = torch.tensor([1, 2, 3, 20] * 16)
        inputs = torch.randint(1, 100, (64, 20)) * (torch.arange(20)[None] < lengths[:, None])
        m.encode_last(inputs, lengths).sum().backward()
        assert not calls  # 64 rows: below NATIVE_GELU_MIN_ROWS, oneDNN's cached primitives serve
        monkeypatch.setattr(M, "NATIVE_GELU_MIN_ROWS", 64)
        m.encode_last(inputs, lengths).sum().backward()
        assert len(calls) >= 2 * len(m._groups(lengths, 20))  # both blocks' FFN in every group
        assert not any(a.native for a in m.modules() if isinstance(a, GELU))
        n = len(calls)
        m.group_lengths = False
        m.encode_last(inputs, lengths)
        assert len(calls) == n
    finally:
        _NativeGELUFunction.apply = real


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gelu_kernel_is_the_erf_gelu_with_its_derivative(dtype, monkeypatch):
    """kernels.gelu: y = x Phi(x) and d = Phi(x) + x phi(x) against torch's GELU and gelu_backward in float64,
    across the erf fit's range and past its clamp (float32: |error| <= 4e-7 max(1, |x|), 3e-7 for d, about torch's
    own float32 GELU's; float64: the C library's erfc, 1e-14), on sizes that end in partial vectors; the same y
    without the derivative; NaN stays NaN. GELU (the FFNs' and the target tower's) runs it forward and backward
    where it applies, and torch's own GELU exactly where it does not."""
    import torch.nn.functional as F
    import benchbox.model as M
    from benchbox import kernels
    if not kernels.gelu_applies(torch.zeros(1, dtype=dtype)):
        pytest.skip("no C kernels here")
    torch.manual_seed(0)
    x = torch.cat([torch.linspace(-12, 12, 24_001), torch.randn(37 * 11 * 13) * 3, torch.tensor([0.0, -0.0])])
    x64 = x.double()
    want = F.gelu(x64)
    want_d = torch.ops.aten.gelu_backward(torch.ones_like(x64), x64)
    for n in (x.numel(), 37 * 11 * 13, 5, 1):  # whole blocks and partial ones, and one element
        xs = x[-n:].to(dtype)
        y, d = kernels.gelu(xs, derivative=True)
        scale = x64[-n:].abs().clamp(min=1)
        tol_y, tol_d = (4e-7, 3e-7) if dtype == torch.float32 else (1e-14, 1e-14)
        assert ((y.double() - want[-n:]).abs() / scale).max() <= tol_y, n
        assert ((d.double() - want_d[-n:]).abs() / scale).max() <= tol_d, n
        y_only, none = kernels.gelu(xs, derivative=False)
        assert none is None and torch.equal(y_only, y)
    big = torch.randn(3 * kernels.GELU_GRAIN + 5, dtype=dtype) * 3  # ranges on two threads: the same values
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.gelu(big, derivative=True)
        torch.set_num_threads(2)
        two = kernels.gelu(big, derivative=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    y, d = kernels.gelu(torch.tensor([float("nan"), 1.0], dtype=dtype), derivative=True)
    assert y[0].isnan() and d[0].isnan() and y[1] == F.gelu(torch.tensor(1.0, dtype=dtype))
    # the module: the kernel's y forward, g d backward; float64 gradcheck; torch's GELU where no kernel applies
    xm = (torch.randn(7, 9, 24, dtype=dtype) * 3).requires_grad_()
    g = torch.randn(7, 9, 24, dtype=dtype)
    ym = M.GELU()(xm)
    (dx,) = torch.autograd.grad(ym, xm, g)
    y, d = kernels.gelu(xm.detach(), derivative=True)
    assert torch.equal(ym, y) and torch.equal(dx, g * d)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(M.GELU(), (xm[:2, :3, :5].detach().clone().requires_grad_(),))
    monkeypatch.setattr(M.kernels, "gelu_applies", lambda x: False)
    ym = M.GELU()(xm)
    assert torch.equal(ym, F.gelu(xm.detach()))
    assert torch.equal(torch.autograd.grad(ym, xm, g)[0], torch.ops.aten.gelu_backward(g, xm.detach()))


def test_midpoint_groups_from_the_mixers_row_threshold():
    """Attention and Mamba split their length groups at the powers of two's midpoints from 2,048 rows a batch
    (measured to pay there, not below); GRU and TTT never do."""
    from benchbox.model import length_groups
    g = torch.Generator().manual_seed(0)
    for mixer, threshold in (("attention", 2048), ("mamba", 2048), ("gru", None), ("ttt_linear", None)):
        m = Recommender(100, mixer, d_model=8, max_len=50)
        assert m.group_midpoints_min_rows == threshold
        for rows in (204, 2048):
            lengths = torch.randint(1, 51, (rows,), generator=g)
            fine = threshold is not None and rows >= threshold
            want = length_groups(lengths, 50, m.group_min_positions, 2 if fine else 1)
            assert [n for _, n in m._groups(lengths, 50)] == [n for _, n in want]
            assert (len(want) > 6) == fine


def test_grouped_path_looks_up_the_groups_positions_only():
    """The length-grouped path gathers each group's positions (inputs[rows, :n]) and the candidates in one
    embedding call, not the padded batch: the rows looked up are the groups' positions plus the candidates."""
    from benchbox.model import length_groups
    torch.manual_seed(0)
    m = Recommender(1000, "attention", d_model=8, max_len=40, dropout=0.0).train()  # candidates < n_items:
    m.group_min_positions = 0  # they are gathered with the inputs (else from the item table)
    lengths = torch.tensor([1, 2, 3, 5, 9, 17, 40, 33] * 8)
    inputs = torch.randint(1, 100, (64, 40)) * (torch.arange(40)[None] < lengths[:, None])
    cand = torch.randint(1, 100, (64, 5))
    groups = length_groups(lengths, 40)
    assert groups is not None
    looked_up = []
    hook = m.item_emb.register_forward_hook(lambda mod, args, out: looked_up.append(args[0].numel()))
    try:
        m.score_candidates(inputs, lengths, cand).sum().backward()
        m.group_lengths = False
        m.score_candidates(inputs, lengths, cand)
    finally:
        hook.remove()
    assert looked_up == [sum(len(idx) * n for idx, n in groups) + cand.numel(), inputs.numel() + cand.numel()]
    assert looked_up[0] < looked_up[1] / 2


def test_grouped_path_draws_fast_masks_and_turns_them_off():
    """The length-grouped path's dropout uses dropout_mask (not bernoulli_), and only while it runs."""
    from benchbox.model import Dropout
    torch.manual_seed(0)
    m = Recommender(100, "gru", d_model=8, max_len=20, dropout=0.2).train()
    m.group_min_positions = 0
    lengths = torch.tensor([1, 2, 3, 20] * 16)
    inputs = torch.randint(1, 100, (64, 20)) * (torch.arange(20)[None] < lengths[:, None])
    seen = []
    real = Dropout._fast  # every Dropout call (forward, add, scaled) asks it which masks to draw
    Dropout._fast = lambda self: seen.append(self.fast_masks) or real(self)
    try:
        m.encode_last(inputs, lengths)
        m.group_lengths = False
        m.encode_last(inputs, lengths)
    finally:
        Dropout._fast = real
    assert seen and any(seen) and not seen[-1]
    assert not any(d.fast_masks for d in m.modules() if isinstance(d, Dropout))


def test_only_the_instance_regime_groups_its_rows(tmp_path):
    """The sequence regime's loader batches users of similar length already; grouping is for the instance
    regime's shuffled rows. Inside a compiled graph the groups are never formed (data-dependent shapes): a
    compiled grouped step forms them eagerly and compiles each group's encoder (train.compile_training)."""
    from conftest import write_seqs
    from benchbox.config import make_config
    from benchbox.train import build_training
    seqs = write_seqs(tmp_path / "s.txt", [[(u * 7 + i * 3) % 150 + 1 for i in range(4 + u % 30)] for u in range(60)])
    base = dict(mixer="gru", dataset=str(seqs), d_model=8, n_layers=1, threads=1)
    assert build_training(make_config(**base, regime="instances", window=20)).model.group_lengths is True
    assert build_training(make_config(**base)).model.group_lengths is False


def test_dropout_add_and_scaled_are_dropout_of_the_same_masks():
    """Dropout.add (x + dropout(y)) and Dropout.scaled (dropout(x * s)): torch's own dropout without fast
    masks (the same random draws as before they existed, bitwise), and with them the fused forms equal the
    unfused ones under the same mask draw (the random state reset between)."""
    from benchbox.model import Dropout
    d = Dropout(0.3).train()
    x, y = torch.randn(64, 7, 16, dtype=torch.float64), torch.randn(64, 7, 16, dtype=torch.float64)
    torch.manual_seed(1)
    want = x + torch.nn.functional.dropout(y, 0.3)
    torch.manual_seed(1)
    assert torch.equal(d.add(x, y), want)
    torch.manual_seed(2)
    want = torch.nn.functional.dropout(y * 8.0, 0.3)
    torch.manual_seed(2)
    assert torch.equal(d.scaled(y, 8.0), want)
    d.fast_masks = True
    torch.manual_seed(3)
    want = x + d(y)
    torch.manual_seed(3)
    got = d.add(x, y)
    assert torch.allclose(got, want, rtol=0, atol=1e-14) and not torch.equal(got - x, y)  # dropped some
    torch.manual_seed(4)
    want = d(y) * 8.0
    torch.manual_seed(4)
    assert torch.allclose(d.scaled(y, 8.0), want, rtol=1e-15, atol=0)
    yg = y.clone().requires_grad_()
    torch.manual_seed(5)
    d.add(x, yg).sum().backward()
    torch.manual_seed(5)
    assert torch.equal(yg.grad, d(torch.ones_like(y)))  # the gradient is the mask


@pytest.mark.parametrize("c_kernel", [True, False])
@pytest.mark.parametrize("d", [16, 37, 64])
def test_rmsnorm_is_torchs_with_a_hand_written_backward(c_kernel, d, monkeypatch):
    """benchbox's RMSNorm: torch's forward values (bitwise in torch's ops; to float rounding in the C kernel,
    kernels.rmsnorm_forward, whose row sums run in the machine's vector lanes), gradients equal to torch's
    composite ones in float64 (1e-12) and gradcheck-exact, the backward in the C kernel (kernels.rmsnorm_backward) or in torch's
    ops; torch's own path without grad."""
    from benchbox import kernels
    from benchbox.model import RMSNorm, _RMSNormFunction
    if not c_kernel:
        monkeypatch.setattr(kernels, "rmsnorm_backward", lambda *a: None)
        monkeypatch.setattr(kernels, "rmsnorm_forward", lambda *a: None)
    elif not kernels._rmsnorm_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        ref, ours = torch.nn.RMSNorm(d, eps=1e-6, dtype=dtype), RMSNorm(d, eps=1e-6, dtype=dtype)
        with torch.no_grad():
            ref.weight.normal_()
            ours.weight.copy_(ref.weight)
        x = (torch.randn(5, 9, d, dtype=dtype) * 3).requires_grad_()
        g = torch.randn(5, 9, d, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous
        a, b = ref(x), ours(x)
        assert b.grad_fn is not None and "RMSNormFunction" in type(b.grad_fn).__name__
        if c_kernel and kernels.rmsnorm_forward(x, ours.weight, 1e-6) is not None:
            torch.testing.assert_close(b, a, rtol=1e-14 if dtype == torch.float64 else 2e-6, atol=0)
        else:
            assert torch.equal(a, b)
        ga = torch.autograd.grad(a, (x, ref.weight), g)
        gb = torch.autograd.grad(b, (x, ours.weight), g)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for u, v in zip(ga, gb):
            assert torch.allclose(u, v, rtol=tol, atol=tol)
    x = torch.randn(3, 4, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-6), (x, w))
    with torch.no_grad():
        y = ours(x)
        assert y.grad_fn is None and torch.equal(y, ref(x))


def test_fast_dropout_draws_every_mask_from_dropout_mask():
    """Recommender.fast_dropout (run option dropout_masks="fast"): no bernoulli_ anywhere in a training step
    (the last block's (B, L, D) masks become (B, D) row masks), torch's dropout draws without it; the grouped
    path's context hands the setting back as it found it."""
    from torch.profiler import profile
    torch.manual_seed(0)
    m = Recommender(50, "attention", d_model=8, max_len=10, dropout=0.2).train()
    m.group_lengths = False
    lengths = torch.tensor([3, 10, 7, 1] * 4)
    inputs = torch.randint(1, 50, (16, 10)) * (torch.arange(10)[None] < lengths[:, None])

    def ops():
        with profile() as p:
            m.score_candidates(inputs, lengths, torch.randint(1, 50, (16, 5))).sum().backward()
        return {e.key for e in p.key_averages()}
    from benchbox import kernels
    from benchbox.model import _uniform_is_bernoulli
    seen = ops()
    if kernels._dropout_library() is None:  # otherwise torch's draws come from the C kernel: no aten op
        assert ("aten::uniform_" if _uniform_is_bernoulli() else "aten::bernoulli_") in seen
    m.fast_dropout = True
    seen = ops()
    assert not {"aten::bernoulli_", "aten::uniform_"} & seen and "aten::random_" in seen
    with m._grouped_kernels():
        pass
    assert all(d.fast_masks for d in m.modules() if isinstance(d, Dropout))
    m.fast_dropout = False
    assert not any(d.fast_masks for d in m.modules() if isinstance(d, Dropout))


@pytest.mark.parametrize("readout", ["last", "comirec_dr"])
def test_one_gather_for_inputs_and_candidates_equals_two(readout):
    """score_candidates and train_logits gather the inputs' and the candidates' embeddings in one lookup
    (one dense table gradient a step): float64, the same logits and gradients as two lookups (encode of the
    inputs, item_features of the candidates)."""
    from benchbox.readouts import candidate_dot
    torch.manual_seed(0)
    n_items, B, L = 500, 6, 9
    m = Recommender(n_items, "none" if readout != "last" else "attention", d_model=16, max_len=L, dropout=0.0,
                    readout=readout).double().train()
    m.group_lengths = False
    lengths = torch.tensor([9, 4, 1, 9, 6, 2])
    inputs = torch.randint(1, n_items + 1, (B, L)) * (torch.arange(L)[None] < lengths[:, None])
    cand = torch.randint(1, n_items + 1, (B, 5))
    targets = torch.randint(1, n_items + 1, (B, L)) * (inputs > 0)
    negatives = torch.randint(1, n_items + 1, (B, L, 4))
    assert cand.numel() <= n_items + 1 and targets.numel() * 5 <= n_items + 1  # the one-gather path

    def grads(loss):
        m.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    got = m.score_candidates(inputs, lengths, cand)
    g_got = grads(bce_loss(got))
    if readout == "last":
        ref = candidate_dot(m.item_features(cand), m.encode_last(inputs, lengths))
    else:
        ref = m.readout.scores(m.encode(inputs, lengths), lengths, m.item_features(cand))
    g_ref = grads(bce_loss(ref))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    got = m.train_logits(inputs, lengths, targets, negatives)
    g_got += grads(bce_loss(got, targets))
    ids = torch.cat([targets[..., None], negatives], -1)
    ref = m.readout.train_scores(m.encode(inputs, lengths), lengths, m.item_features(ids))
    g_ref += grads(bce_loss(ref, targets))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert len(g_got) == len(g_ref)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("c_kernel", [True, False])
def test_dropout_draws_torchs_masks_bit_for_bit(c_kernel, monkeypatch):
    """Dropout's CPU path draws torch's dropout noise with the C kernel (kernels.dropout_noise), or else as
    float64 uniform_ and a comparison where that is the same stream (``_uniform_is_bernoulli``): the same
    outputs, gradients and generator state after as F.dropout, also read at some rows only
    (Block.forward_last). Elsewhere it is F.dropout itself."""
    import torch.nn.functional as F
    from benchbox import kernels
    from benchbox.model import torch_dropout_noise
    if not c_kernel:
        monkeypatch.setattr(kernels, "dropout_noise", lambda like, keep: None)
    for shape, p, transposed in (((204, 10, 64), 0.2, False), ((3, 7), 0.5, False), ((1001,), 0.1, False),
                                 ((64, 300), 0.2, True)):  # transposed: as nn.GRU's batch_first output
        x = torch.randn(*shape).t().requires_grad_() if transposed else torch.randn(*shape, requires_grad=True)
        torch.manual_seed(5)
        y_ref = F.dropout(x, p, True)
        state_ref, next_ref = torch.get_rng_state(), torch.rand(4)
        torch.manual_seed(5)
        y = Dropout(p).train()(x)
        assert torch.equal(y, y_ref) and torch.equal(torch.get_rng_state(), state_ref)
        assert torch.equal(torch.rand(4), next_ref)
        g = torch.randn_like(y)
        assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])
    rows = (torch.arange(20), torch.randint(0, 10, (20,)))
    torch.manual_seed(3)
    ref = torch.empty(20, 10, 8).bernoulli_(0.8)[rows].div_(0.8)
    state_ref = torch.get_rng_state()
    torch.manual_seed(3)
    assert torch.equal(torch_dropout_noise(torch.empty(20, 10, 8), 0.2, rows), ref)
    assert torch.equal(torch.get_rng_state(), state_ref)


def _c_dropout_kernel():
    from benchbox import kernels
    fn = kernels._dropout_library()
    if fn is None:
        pytest.skip("no C compiler here: the dropout kernel is not built (torch's own path runs)")
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_c_dropout_kernel_is_torchs_bernoulli_from_any_point_of_the_stream(dtype):
    """kernels.dropout_noise against torch's bernoulli_(keep) / keep on the default generator: sizes from 1
    element to many regenerations of the mt19937 state, starts at every parity and at the state array's
    edges (single 32-bit draws before), transposed and permuted layouts (drawn in memory order), several
    keep probabilities; the noise bit for bit and the generator's state after, equal."""
    from benchbox import kernels
    _c_dropout_kernel()
    cases = [((1,), 0, 0.8), ((2,), 1, 0.5), ((311,), 3, 0.9), ((204, 10, 64), 0, 0.8), ((204, 10, 64), 623, 0.8),
             ((7, 5, 3), 624, 0.3), ((50_000,), 311, 0.999), ((10, 204, 64), 1, 0.8, (1, 0, 2)),
             ((64, 300), 2, 0.7, (1, 0)), ((4, 6, 8), 5, 0.6, (2, 0, 1))]
    for shape, skip, keep, *perm in cases:
        like = torch.empty(shape, dtype=dtype)
        if perm:
            like = like.permute(*perm[0])
        torch.manual_seed(11)
        torch.rand(skip)  # float32 rand: one 32-bit output each
        want = torch.empty_like(like).bernoulli_(keep).div_(keep)
        state_want = torch.get_rng_state()
        torch.manual_seed(11)
        torch.rand(skip)
        got = kernels.dropout_noise(like, keep)
        assert got is not None and got.dtype == dtype and got.stride() == want.stride()
        assert torch.equal(got, want), (shape, skip, keep)
        assert torch.equal(torch.get_rng_state(), state_want), (shape, skip, keep)


def _untemper(y: int) -> int:
    """The mt19937 state word whose tempered output is y (each tempering step inverted, last first)."""
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    x = y
    for _ in range(5):  # y ^= (y << 7) & b: recover 7 more low bits each round
        x = y ^ ((x << 7) & 0x9D2C5680)
    y = x & 0xFFFFFFFF
    x = y
    for _ in range(3):  # y ^= y >> 11
        x = y ^ (x >> 11)
    return x & 0xFFFFFFFF


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_c_dropout_kernel_decides_draws_at_the_keep_boundary_as_torch(dtype):
    """The kernel keeps an element where its 53-bit draw r (random64's low 53 bits) has r 2^-53 < keep, by comparing
    r with ceil(keep 2^53) in two 32-bit halves. Random draws almost never land next to that threshold, so here the
    generator's state is made to (mt19937's tempering inverted): draws r = thr - 2 .. thr + 1, with the high word's
    unused 11 bits set, draws at the high half's boundary, for keeps whose threshold's low half is 0 or not. Held to
    torch's own bernoulli_ from the same state, and to the exact comparison."""
    import math
    import struct
    from fractions import Fraction
    from benchbox import kernels
    _c_dropout_kernel()
    base = torch.Generator().manual_seed(5).get_state()
    for keep in (0.8, 0.5, 0.3, 0.123456789, 0.75, 1.0 - 2 ** -40):
        thr = math.ceil(Fraction(keep) * 2 ** 53)
        draws = [thr - 2, thr - 1, thr, thr + 1, thr & ~0xFFFFFFFF, (thr & ~0xFFFFFFFF) - 1, (thr | 0xFFFFFFFF) + 1,
                 0, 2 ** 53 - 1]
        draws = [r for r in draws if 0 <= r < 2 ** 53]
        words = []
        for i, r in enumerate(draws):
            words += [(r >> 32) | ((0x5A5 + i) << 21 & 0xFFE00000), r & 0xFFFFFFFF]  # unused high bits set
        state = base.clone()
        raw = bytearray(state.numpy().tobytes())
        struct.pack_into("<iiQ", raw, 8, len(words) + 1, 1, 0)  # left, seeded, next: the next draws are state[0..]
        for i, w in enumerate(words):
            struct.pack_into("<Q", raw, 24 + 8 * i, _untemper(w))
        state = torch.tensor(list(raw), dtype=torch.uint8)
        g, g_ours = torch.Generator(), torch.Generator()
        g.set_state(state)
        g_ours.set_state(state)
        want = torch.empty(len(draws), dtype=dtype).bernoulli_(keep, generator=g).div_(keep)
        got = kernels._kernel_noise(kernels._dropout_library(), torch.empty(len(draws), dtype=dtype), keep, g_ours)
        exact = [Fraction(r, 2 ** 53) < Fraction(keep) for r in draws]
        assert [bool(v) for v in (want != 0)] == exact, keep  # the crafted draws reach torch as intended
        assert torch.equal(got, want), (keep, draws)
        assert torch.equal(g_ours.get_state(), g.get_state())


def test_c_dropout_kernel_declines_what_it_does_not_draw_and_its_self_check_can_fail():
    """Tensors with gaps, other dtypes and devices go to torch's own path (None); a kernel that draws
    otherwise than torch fails the self-check that decides whether it is used at all."""
    import ctypes
    from benchbox import kernels
    fn = _c_dropout_kernel()
    assert kernels.dropout_noise(torch.empty(10, 8)[:, ::2], 0.8) is None
    assert kernels.dropout_noise(torch.empty(10, 8, dtype=torch.bfloat16), 0.8) is None
    assert kernels.dropout_noise(torch.empty(10, 8, device="meta"), 0.8) is None
    assert kernels._agrees_with_torch(fn)

    def off_by_one_keep(state, out, n, keep, kept, is_double):  # draws right, compares with another keep
        return fn(state, out, n, keep - 1e-3, kept, is_double)
    assert not kernels._agrees_with_torch(off_by_one_keep)

    def skips_the_state_write(state, out, n, keep, kept, is_double):  # the noise right, the generator not moved
        copy = (ctypes.c_ubyte * 5056)()
        ctypes.memmove(copy, state, 5056)
        return fn(ctypes.addressof(copy), out, n, keep, kept, is_double)
    assert not kernels._agrees_with_torch(skips_the_state_write)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_kernel_gives_torchs_embedding_and_index_select_gradients_bit_for_bit(dtype):
    """benchbox's Embedding and gather_rows (their backward through kernels.rows_add on CPU) against
    nn.Embedding and index_select: the same outputs and the same table gradients, bit for bit, with the
    padding id (no gradient), ids repeated many times (one row summed from many contributions, in order),
    gradients of very different magnitudes and a non-contiguous incoming gradient."""
    from benchbox import kernels
    from benchbox.readouts import Embedding, gather_rows
    if not kernels._rows_add_kernels():
        pytest.skip("no C compiler here: torch's own backward runs")
    torch.manual_seed(0)
    ours, ref = Embedding(41, 16, padding_idx=0).to(dtype), torch.nn.Embedding(41, 16, padding_idx=0).to(dtype)
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 41, (30, 70))
    ids[:, :5] = 0
    scale = torch.logspace(-5, 5, 16, dtype=dtype)
    for emb in (ours, ref):
        (emb(ids) * scale).transpose(0, 1).pow(2).sum().backward()
    assert torch.equal(ours(ids), ref(ids))
    assert torch.equal(ours.weight.grad, ref.weight.grad) and not ref.weight.grad[0].any()
    table = torch.randn(41, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(70, 30, 16, dtype=dtype).transpose(0, 1)  # non-contiguous
    got = torch.autograd.grad(gather_rows(table, ids), table, g)[0]
    want = torch.autograd.grad(table.index_select(0, ids.reshape(-1)).view(30, 70, 16), table, g)[0]
    assert torch.equal(got, want)
    with torch.no_grad():  # no graph: the plain lookups
        assert torch.equal(gather_rows(table, ids), table[ids])


def test_rows_kernel_declines_what_it_does_not_sum_and_its_self_check_can_fail():
    from benchbox import kernels
    fns = kernels._rows_add_kernels()
    if not fns:
        pytest.skip("no C compiler here: torch's own backward runs")
    src = torch.randn(6, 4)
    assert kernels.rows_add(5, torch.tensor([0, 1, 2, 3, 4, 4], dtype=torch.int32), src) is None
    assert kernels.rows_add(5, torch.tensor([0, 1, 2, 3, 4, 5]), src) is None  # out of range: torch raises
    assert kernels.rows_add(5, torch.tensor([0, 1, 2, 3, 4, 4]), src.to(torch.bfloat16)) is None
    fn = fns[torch.float32]
    assert kernels._rows_add_agrees_with_torch(fn, torch.float32)

    def no_skip(out, n_out, d, idx, n, src, skip):  # adds the padding rows too
        return fn(out, n_out, d, idx, n, src, -1)
    assert not kernels._rows_add_agrees_with_torch(no_skip, torch.float32)


@pytest.mark.parametrize("layers", [1, 2])
def test_gru_fused_gates_are_nn_gru(layers):
    """The GRU mixer's CPU path (mixers.gru._GRUSequence: one GEMM and one C gate pass per step) against nn.GRU
    itself: outputs and every gradient to 1e-12 in float64 (and gradcheck), float32 to its rounding; in float32
    its error against float64 is nn.GRU's own (L 200: both within 1.5x of each other)."""
    from benchbox import kernels
    from mixers.gru import GRUMixer, _GRUSequence
    if not kernels._gru_kernels():
        pytest.skip("no C compiler here: nn.GRU runs")
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        m = GRUMixer(32, num_layers=layers).to(dtype)
        x = torch.randn(5, 7, 32, dtype=dtype, requires_grad=True)
        assert m._fused(x)
        y, want = m(x), m.forward_reference(x)
        assert _graph_has(y, "GRUSequence") and not _graph_has(want, "GRUSequence")
        # nn.GRU's memory layout (time-major): the dropout after the mixer draws its mask in memory order
        assert y.stride() == want.stride()
        torch.testing.assert_close(y, want, rtol=0, atol=tol)
        g = torch.randn_like(y).transpose(0, 1).contiguous().transpose(0, 1)  # a strided incoming gradient
        params = [x] + list(m.parameters())
        for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(want, params, g)):
            torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))
    m = GRUMixer(16).double()
    x = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    weights = [getattr(m.gru, f"{w}_l0") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert torch.autograd.gradcheck(_GRUSequence.apply, (x, *weights))
    m64 = GRUMixer(64).double()
    m32 = GRUMixer(64)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x = torch.randn(16, 200, 64, dtype=torch.float64)
    truth = m64.forward_reference(x)
    err = [(f(x.float()).double() - truth).abs().mean().item() for f in (m32, m32.forward_reference)]
    assert err[0] < 1.5 * err[1] and err[1] < 1.5 * err[0]


def test_gru_fused_gates_decline_what_they_do_not_compute(monkeypatch):
    """nn.GRU where the fused path does not apply: bfloat16, float32 with a hidden size off the 16 lanes,
    dropout between layers while training, no kernels installed."""
    from benchbox import kernels
    from mixers import gru as gru_mixer
    from mixers.gru import GRUMixer
    if not kernels._gru_kernels():
        pytest.skip("no C compiler here: nn.GRU runs")
    assert not GRUMixer(32).bfloat16()._fused(torch.randn(2, 3, 32).bfloat16())
    assert not GRUMixer(24)._fused(torch.randn(2, 3, 24))
    assert GRUMixer(24).double()._fused(torch.randn(2, 3, 24, dtype=torch.float64))
    m = GRUMixer(32, num_layers=2, dropout=0.5)
    x = torch.randn(2, 3, 32)
    assert not m.train()._fused(x) and m.eval()._fused(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # a compiled step traces nn.GRU
    assert not m._fused(x)
    monkeypatch.undo()
    monkeypatch.setattr(gru_mixer, "_CELL_KERNELS", None)
    assert not GRUMixer(32)._fused(x)


def _graph_has(y, name: str) -> bool:
    """Whether y's autograd graph has a node whose type name contains ``name``."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if name in type(f).__name__:
            return True
        todo.extend(g for g, _ in f.next_functions)
    return False


@pytest.mark.parametrize("t", [1, 10, 64])
def test_small_attention_kernel_is_sdpa(t):
    """The attention mixer's short-sequence CPU path (mixers.attention._SmallAttention: C, read from and written
    to the projections' layouts) against SDPA with the same weights: the full causal forward and the last
    position's (lengths from 1 to T), outputs and every gradient to 1e-12 in float64 (and gradcheck), float32
    to its rounding."""
    from benchbox import kernels
    from mixers.attention import AttentionMixer, _SmallAttention
    if not kernels._attention_kernels():
        pytest.skip("no C compiler here: SDPA runs")
    torch.manual_seed(0)
    lengths = torch.tensor([t, 1, max(1, t // 2), t])
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        ours, ref = AttentionMixer(64, max_len=64).to(dtype), AttentionMixer(64, max_len=64, backend="sdpa").to(dtype)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(4, t, 64, dtype=dtype, requires_grad=True)
        assert ours._small(x) and not ref._small(x)
        for run in (lambda m: m(x), lambda m: m.forward_last(x, lengths)):
            y, want = run(ours), run(ref)
            assert _graph_has(y, "SmallAttention") and not _graph_has(want, "SmallAttention")
            torch.testing.assert_close(y, want, rtol=0, atol=tol)
            g = torch.randn_like(y)
            for a, b in zip(torch.autograd.grad(y, [x, *ours.parameters()], g, allow_unused=True),
                            torch.autograd.grad(want, [x, *ref.parameters()], g, allow_unused=True)):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))
    qkv = torch.randn(2, 5, 3 * 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: _SmallAttention.apply(z, None, None, 2), (qkv,))
    q = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _SmallAttention.apply(a, b, torch.tensor([5, 1, 3]), 2), (q, kv))


def test_small_attention_declines_what_it_does_not_compute(monkeypatch):
    """SDPA where the kernel does not apply: longer than 64 positions, attention dropout while training, a named
    backend, float32 heads off the 16 lanes, bfloat16, no kernels installed."""
    from benchbox import kernels
    from mixers import attention as attention_mixer
    from mixers.attention import AttentionMixer
    if not kernels._attention_kernels():
        pytest.skip("no C compiler here: SDPA runs")
    x = torch.randn(2, 10, 64)
    assert AttentionMixer(64)._small(x) and not AttentionMixer(64)._small(torch.randn(2, 65, 64))
    m = AttentionMixer(64, dropout=0.1)
    assert not m.train()._small(x) and m.eval()._small(x)
    assert not AttentionMixer(64, backend="sdpa")._small(x) and not AttentionMixer(64, backend="math")._small(x)
    assert not AttentionMixer(48, num_heads=2)._small(torch.randn(2, 10, 48))  # heads of 24
    assert AttentionMixer(48, num_heads=2).double()._small(torch.randn(2, 10, 48, dtype=torch.float64))
    assert not AttentionMixer(64).bfloat16()._small(x.bfloat16())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # a compiled step traces SDPA
    assert not AttentionMixer(64)._small(x)
    monkeypatch.undo()
    monkeypatch.setattr(attention_mixer, "_KERNELS", None)
    assert not AttentionMixer(64)._small(x)


@pytest.mark.parametrize("shared", [True, False])
def test_ttt_dual_kernels_are_the_scans_torch_path(shared, monkeypatch):
    """TTT-Linear's scan with one chunk of one mini-batch (the study's window of 10, mini-batches of 16) runs its
    inner layer norm, G, P G and their backward in C (mixers.ttt._LinearChunks' fast path): held to the scan's
    torch path (the chunk loop) on the output and every input's gradient, float64 to 1e-12, float32 to its
    rounding; shared weights (the layer's own) and per-row ones. Longer sequences (several mini-batches, a
    ragged tail) and float32 heads off the 16 lanes keep the torch path."""
    from benchbox import kernels
    import mixers.ttt as ttt
    if not kernels._ttt_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    B, H, D, K = 3, 2, 32, 16
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 5e-5)):
        q, k, v = (torch.randn(B, 10, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
        lr = (torch.rand(B, 10, H, dtype=dtype) * 0.1).requires_grad_()
        tok = (1.0 / torch.arange(1, K + 1, dtype=dtype)).requires_grad_()
        W1 = (torch.randn(H, D, D, dtype=dtype) * 0.1).requires_grad_()
        b1 = (torch.randn(H, 1, D, dtype=dtype) * 0.1).requires_grad_()
        gamma = (torch.rand(H, D, dtype=dtype) + 0.5).requires_grad_()
        beta = (torch.randn(H, D, dtype=dtype) * 0.1).requires_grad_()
        params = ({"W1": W1, "b1": b1} if shared else
                  {"W1": W1.unsqueeze(0).expand(B, -1, -1, -1), "b1": b1.unsqueeze(0).expand(B, -1, -1, -1)})
        inputs = [q, k, v, lr, tok, W1, b1, gamma, beta]
        got = {}
        for name, installed in (("c", kernels), ("torch", None)):
            monkeypatch.setattr(ttt, "_KERNELS", installed)
            z, _ = ttt.ttt_fast("linear", q, k, v, lr, tok, params, gamma, beta, K, 4)
            assert _graph_has(z, "LinearChunks")
            g = torch.linspace(-1, 1, z.numel(), dtype=dtype).view_as(z)
            got[name] = (z,) + torch.autograd.grad(z, inputs, g)
        for a, b in zip(got["c"], got["torch"]):
            torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))
        assert not torch.equal(got["c"][0], got["torch"][0])  # the kernels ran (another summation order)
    monkeypatch.setattr(ttt, "_KERNELS", kernels)
    seen = []
    monkeypatch.setattr(kernels, "ttt_dual_forward", lambda *a: seen.append(1) or (_ for _ in ()).throw(AssertionError))
    for L in (40, 21):  # several mini-batches; a ragged tail
        x = [torch.randn(B, L, H, D) for _ in range(3)]
        ttt.ttt_fast("linear", *x, torch.rand(B, L, H) * 0.1, 1.0 / torch.arange(1, K + 1), {"W1": W1.detach().float(),
                     "b1": b1.detach().float()}, gamma.detach().float(), beta.detach().float(), K, 4)
    assert not seen
    assert not kernels.ttt_dual_applies(torch.randn(4, 10, 24))
    assert not kernels.ttt_dual_applies(torch.randn(4, 10, 128))
    assert kernels.ttt_dual_applies(torch.randn(4, 10, 24, dtype=torch.float64))


def _nontrivial_ttt(m):
    """A TTT layer with every parameter off its initial value (token factors, inner norms, biases, learning-rate
    bias, inner weights), so that no term of a kernel is multiplied by a zero or a one."""
    named = dict(m.named_parameters())
    with torch.no_grad():
        for name, mean, sd in (("learnable_token_idx", 0, 0.1), ("ttt_norm_weight", 1, 0.1), ("ttt_norm_bias", 0, 0.1),
                               ("b1", 0, 0.1), ("b2", 0, 0.1), ("learnable_ttt_lr_bias", 0, 0.5), ("W1", 0, 0.2),
                               ("W2", 0, 0.1)):
            if name in named:
                named[name].normal_(mean, sd)
    return m


@pytest.mark.parametrize("opts,L", [(dict(mini_batch_size=10), 10), (dict(mini_batch_size=16), 10),
                                    (dict(mini_batch_size=16, use_gate=True, pre_conv=True), 7),
                                    (dict(mini_batch_size=4, use_rope=False), 4),
                                    (dict(mini_batch_size=16, num_heads=4), 16),
                                    (dict(mini_batch_size=1), 10), (dict(mini_batch_size=3), 10),
                                    (dict(mini_batch_size=2), 7), (dict(mini_batch_size=16), 27),
                                    (dict(mini_batch_size=16), 50), (dict(mini_batch_size=1), 40),
                                    (dict(mini_batch_size=4, num_heads=4), 37)])
def test_ttt_window_kernel_is_the_layers_torch_path(opts, L, monkeypatch):
    """TTT-Linear in one C pass per direction (mixers.ttt._LinearWindow: RoPE, eta, G mini-batch after mini-batch,
    P, P G, the inner LN and the residual from the projection's rows, the inner weights carried from chunk to chunk)
    over one chunk (the study's window with one mini-batch or several: mbs 1, 2, 3, a ragged last one) and several
    (L 50 in chunks of 16 with a ragged tail; L 40 in chunks of 8 one-token mini-batches; L 37 in chunks of 8)
    against the layer's torch path (_prepare + ttt_fast, and forward_last's own): the full output, the last
    positions' (rows of several lengths) and the gradients of the input and of every parameter, float64 to 1e-12,
    float32 to its rounding, with non-trivial inner weights, norms, token factors."""
    from benchbox import kernels
    import mixers.ttt as ttt
    if not kernels._ttt_window_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        m = _nontrivial_ttt(mixers.build("ttt_linear", d_model=64, max_len=L, **opts).to(dtype))
        x = torch.randn(5, L, 64, dtype=dtype, requires_grad=True)
        got = {}
        for name, installed in (("c", kernels), ("torch", None)):
            monkeypatch.setattr(ttt, "_KERNELS", installed)
            assert m._window_in_c(x) == (installed is not None)
            got[name] = ()
            for y in (m(x), m.forward_last(x, torch.tensor([L, 1, max(1, L // 2), L, 2]))):
                assert _graph_has(y, "LinearWindow") == (installed is not None)
                got[name] += (y,) + torch.autograd.grad((y * torch.cos(y)).sum(), [x, *m.parameters()])
        for a, b in zip(got["c"], got["torch"]):
            torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))
        assert not torch.equal(got["c"][0], got["torch"][0])  # the kernel ran (another summation order)


def test_ttt_window_kernel_gradcheck_and_what_it_declines(monkeypatch):
    from benchbox import kernels
    import mixers.ttt as ttt
    if not kernels._ttt_window_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    monkeypatch.setattr(ttt, "_KERNELS", kernels)
    torch.manual_seed(0)
    H, D, S = 2, 4, 5
    r = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    proj, lrb, W, b1, gam, bet = r(2, S, 3 * H * D + H), r(H), r(H, D, D), r(H, 1, D), r(H, D), r(H, D)
    cs = torch.view_as_real(ttt._rope_factors(torch.arange(S), D, 10000.0, "cpu")[:, 0]).contiguous()
    for K, chunk in ((7, 5), (2, 5), (1, 2), (2, 4)):  # one mini-batch; three (2 + 2 + 1); chunks of 2 and of 4
        tok = (torch.rand(K, dtype=torch.float64) + 0.1).requires_grad_()
        for table in (cs, None):
            assert torch.autograd.gradcheck(lambda *a: ttt._LinearWindow.apply(*a, table, 0.3, H, chunk),
                                            (proj, lrb, tok, W, b1, gam, bet))
    x = torch.randn(2, 10, 64)
    assert mixers.build("ttt_linear", 64, mini_batch_size=10)._window_in_c(x)
    assert mixers.build("ttt_linear", 64, mini_batch_size=1)._window_in_c(x)  # ten mini-batches, one chunk
    assert mixers.build("ttt_linear", 64, mini_batch_size=1)._window_in_c(torch.randn(2, 17, 64))  # 2 chunks
    long = mixers.build("ttt_linear", 64, mini_batch_size=16, scan_chunk=128)  # chunks of 128 positions
    assert long._window_chunk(300) == 128 and not long._window_in_c(torch.randn(2, 300, 64))
    assert not mixers.build("ttt_linear", 64, mini_batch_size=16, share_qk=True)._window_in_c(x)
    assert not mixers.build("ttt_linear", 64, mini_batch_size=16, backend="reference")._window_in_c(x)
    assert not mixers.build("ttt_mlp", 64, mini_batch_size=16)._window_in_c(x)
    assert not mixers.build("ttt_linear", 48, num_heads=2, mini_batch_size=16)._window_in_c(torch.randn(2, 10, 48))
    assert mixers.build("ttt_linear", 48, num_heads=2, mini_batch_size=16).double()._window_in_c(
        torch.randn(2, 10, 48, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not mixers.build("ttt_linear", 64, mini_batch_size=16)._window_in_c(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not mixers.build("ttt_linear", 64, mini_batch_size=16)._window_in_c(x)


@pytest.mark.parametrize("opts,L", [(dict(mini_batch_size=16), 40), (dict(mini_batch_size=16), 37),
                                    (dict(mini_batch_size=16, num_heads=4, use_gate=True), 50),
                                    (dict(mini_batch_size=8), 8), (dict(mini_batch_size=10), 30)])
def test_ttt_mlp_chunk_kernel_is_the_chunks_torch_path(opts, L, monkeypatch):
    """TTT-MLP's chunks of one mini-batch in C (mixers.ttt._MLPChunk with g == 1: the whole chunk per (row, head)
    block, its backward recomputing the forward) against the chunk's torch path: the layer's output and the
    gradients of the input and of every parameter through several chunks (the weights handed from chunk to chunk,
    a padded last chunk), float64 to 1e-12, float32 to its rounding."""
    from benchbox import kernels
    import mixers.ttt as ttt
    if not kernels._mlp_chunk_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    seen = []
    real = kernels.mlp_chunk_forward
    monkeypatch.setattr(kernels, "mlp_chunk_forward", lambda *a: seen.append(1) or real(*a))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        m = _nontrivial_ttt(mixers.build("ttt_mlp", d_model=64, max_len=L, **opts).to(dtype))
        x = torch.randn(5, L, 64, dtype=dtype, requires_grad=True)
        got = {}
        for name, installed in (("c", kernels), ("torch", None)):
            monkeypatch.setattr(ttt, "_KERNELS", installed)
            before = len(seen)
            y = m(x)
            assert (len(seen) > before) == (installed is not None)
            got[name] = (y,) + torch.autograd.grad((y * torch.cos(y)).sum(), [x, *m.parameters()])
        for a, b in zip(got["c"], got["torch"]):
            torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))


def test_ttt_mlp_chunk_kernel_gradcheck_and_what_it_declines(monkeypatch):
    from benchbox import kernels
    import mixers.ttt as ttt
    if not kernels._mlp_chunk_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    monkeypatch.setattr(ttt, "_KERNELS", kernels)
    torch.manual_seed(0)
    BH, S, D, F = 2, 3, 4, 8
    r = lambda *s: (torch.randn(*s, dtype=torch.float64) * 0.5).requires_grad_()  # noqa: E731
    args = (r(BH, 2 * S, D), r(BH, D, F), r(BH, 1, F), r(BH, F, D), r(BH, 1, D), r(BH, S, D),
            (torch.rand(BH, 1, D, dtype=torch.float64) + 0.5).requires_grad_(), r(BH, S, S), r(BH, S, S))
    eT = r(BH, 1, S)
    for upd in (False, True):
        def f(kq, W1, b1, W2, b2, gt, gam2, P, coef, eT):
            return ttt._MLPChunk.apply(kq, W1, b1, W2, b2, gt, gam2, P, coef, None, eT, S, 1, upd)
        assert torch.autograd.gradcheck(f, (*args, eT))
    # what keeps the torch path: several mini-batches per chunk, float32 widths off the 16 lanes
    assert kernels.mlp_chunk_applies(torch.randn(2, 6, 32), 32, 128)
    assert not kernels.mlp_chunk_applies(torch.randn(2, 6, 24), 24, 96)
    assert kernels.mlp_chunk_applies(torch.randn(2, 6, 24, dtype=torch.float64), 24, 96)
    seen = []
    monkeypatch.setattr(kernels, "mlp_chunk_forward", lambda *a: seen.append(1))
    m = mixers.build("ttt_mlp", 64, mini_batch_size=4, scan_chunk=8)  # two mini-batches per chunk
    m(torch.randn(2, 16, 64))
    assert not seen


def test_lnl2_kernels_are_the_inner_loss_gradient(monkeypatch):
    """TTT's inner loss gradient G = ln_l2_grad(z) (mixers.ttt._LNL2Grad, the last-position block's) in C against its
    torch path: G and the gradients of z, gamma^2 (one row per head) and the target term, float64 to 1e-12 and
    gradcheck, float32 to its rounding; shapes it does not take keep torch's path."""
    from benchbox import kernels
    import mixers.ttt as ttt
    if not kernels._ttt_kernels():
        pytest.skip("no C compiler here: torch's ops run")
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        z = torch.randn(2, 5, 10, 32, dtype=dtype, requires_grad=True)
        gam = (torch.rand(2, 1, 1, 32, dtype=dtype) + 0.5).requires_grad_()
        gt = torch.randn(2, 5, 10, 32, dtype=dtype, requires_grad=True)
        got = {}
        for name, installed in (("c", kernels), ("torch", None)):
            monkeypatch.setattr(ttt, "_KERNELS", installed)
            assert ttt._lnl2_in_c(z, gam * gam, gt) == (installed is not None)
            G = ttt._LNL2Grad.apply(z, gam * gam, gt)
            a = torch.linspace(-1, 1, G.numel(), dtype=dtype).view_as(G)
            got[name] = (G,) + torch.autograd.grad(G, (z, gam, gt), a)
        for x, y in zip(got["c"], got["torch"]):
            torch.testing.assert_close(x, y, rtol=0, atol=tol * max(1.0, y.abs().max().item()))
    monkeypatch.setattr(ttt, "_KERNELS", kernels)
    z = torch.randn(2, 3, 4, 16, dtype=torch.float64, requires_grad=True)
    g2 = (torch.rand(2, 1, 1, 16, dtype=torch.float64) + 0.5).requires_grad_()
    gt = torch.randn(2, 3, 4, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ttt._LNL2Grad.apply, (z, g2, gt))
    assert not ttt._lnl2_in_c(z, g2, gt[:, :1])  # a broadcast target term
    assert not ttt._lnl2_in_c(z, torch.rand(2, 3, 1, 16, dtype=torch.float64), gt)  # gamma^2 per row
    assert not ttt._lnl2_in_c(z.float()[..., :8], g2.float()[..., :8], gt.float()[..., :8])  # float32, D off 16


def test_c_kernels_off_switch_and_a_missing_compiler_leave_torchs_paths(tmp_path):
    """BENCHBOX_C_KERNELS=off, or no C compiler: rows record cpu_kernels 'torch' and nothing fails; a compiler
    that builds gives 'c' (where this machine has one)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    code = ("from benchbox import kernels, model; import torch; "
            "d = model.Dropout(0.2).train(); d(torch.randn(4, 8)); print(kernels.kernels_in_force())")
    base = {**os.environ, "BENCHBOX_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(root)}
    for extra, want in (({"BENCHBOX_C_KERNELS": "off"}, "torch"), ({"CC": "no-such-compiler"}, "torch")):
        out = subprocess.run([sys.executable, "-c", code], env={**base, **extra}, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == want, out.stderr
    from benchbox import kernels
    if kernels._library() is not None:
        out = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "c", out.stderr


# the tests that hold each float C kernel to its torch path (and the dropout kernel's vectorised keep decision)
_KERNEL_TESTS = ("rmsnorm or gelu_kernel or keep_boundary or gru_fused or small_attention or ttt_dual or ttt_window"
                 " or ttt_mlp_chunk or lnl2_kernels or sigmoid_project or pool_score or dr_score or cand_dot or dr_route"
                 " or comirec_dr_causal or causal_pool or comirec_sa_prefix or din_pair_kernels"
                 " or din_pairs_function"
                 " or fused")


@pytest.mark.parametrize("march, lanes", [("x86-64", 4), ("x86-64-v3", 8), ("x86-64-v3", 16)])
def test_kernels_hold_at_every_lane_width(march, lanes, tmp_path):
    """The float kernels step by the target's vector width (VL: 16 with AVX-512, 8 with AVX, else 4; gcc keeps a
    vector wider than the registers in memory). The other tests check the native build; here the same kernel tests
    run with the library built for another width, where this CPU runs it (16 lanes: the AVX-512 build's code built
    for AVX2, BENCHBOX_C_LANES)."""
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path
    from benchbox import kernels
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 targets")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if lanes >= 8 and " avx2" not in flags:
        pytest.skip("this CPU has no AVX2")
    if kernels.lanes() in (None, lanes):
        pytest.skip("no C library, or the native build has this width (the other tests check it)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BENCHBOX_C_MARCH": march, "BENCHBOX_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(root),
           "BENCHBOX_C_LANES": str(lanes) if lanes == 16 else ""}
    probe = subprocess.run([sys.executable, "-c", "from benchbox import kernels; print(kernels.lanes())"], env=env,
                           capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.strip() == str(lanes), probe.stderr
    tests = [str(root / "tests" / f) for f in ("test_model.py", "test_readouts.py", "test_mamba.py")]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k", _KERNEL_TESTS],
                         env=env, capture_output=True, text=True, cwd=root)
    assert out.returncode == 0 and " passed" in out.stdout and "failed" not in out.stdout, out.stdout[-3000:]
