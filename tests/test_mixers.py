"""Shared contract of every registered mixer: shape, causality, right padding, streaming."""
import pytest
import torch

import mixers

D, L, B = 16, 23, 3


def _build(name, **kw):
    torch.manual_seed(0)
    m = mixers.build(name, d_model=D, max_len=64, **kw).double().eval()
    return m


@pytest.mark.parametrize("name", mixers.names())
def test_shape_and_causality(name):
    m = _build(name)
    x = torch.randn(B, L, D, dtype=torch.float64)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    for t in (0, 5, L - 2):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 3
        y2 = m(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=1e-9, atol=1e-9)
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])  # later positions do change


@pytest.mark.parametrize("name", mixers.names())
def test_right_padding_never_changes_real_positions(name):
    m = _build(name)
    lengths = torch.tensor([L, 9, 1])
    x = torch.randn(B, L, D, dtype=torch.float64)
    y_batch = m(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        y_alone = m(x[i:i + 1, :n], lengths[i:i + 1])
        torch.testing.assert_close(y_batch[i:i + 1, :n], y_alone, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", mixers.names())
def test_streaming_matches_full_forward(name):
    m = _build(name)
    assert m.supports_streaming, f"{name} must implement init_state/step"
    x = torch.randn(B, L, D, dtype=torch.float64)
    y = m(x)
    # one click at a time, then uneven chunks
    for cuts in ([1] * L, [4, 1, 7, 2, 9]):
        state, outs, pos = m.init_state(B, dtype=torch.float64), [], 0
        for c in cuts:
            o, state = m.step(x[:, pos:pos + c], state)
            outs.append(o)
            pos += c
        torch.testing.assert_close(torch.cat(outs, 1), y, rtol=1e-7, atol=1e-7)


def test_unknown_mixer_and_option():
    with pytest.raises(mixers.MixerError, match="unknown mixer"):
        mixers.build("transformerxl", 8)
    with pytest.raises(mixers.MixerError, match="unknown option 'heads'"):
        mixers.build("attention", 8, heads=2)
    with pytest.raises(mixers.MixerError, match="must be a int"):
        mixers.build("attention", 8, num_heads="two")


def test_attention_backends_agree():
    torch.manual_seed(0)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    ys = []
    for backend in ("sdpa", "math"):
        torch.manual_seed(1)
        ys.append(mixers.build("attention", D, 32, backend=backend).double().eval()(x))
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-10, atol=1e-10)


def test_every_backend_of_every_mixer_runs_the_whole_protocol(tmp_path):
    """A backend is only a reference if it can train and be evaluated (under no_grad) like the fast path:
    a full tiny run (training, validation, test, full ranking) with each CPU backend of each mixer."""
    import numpy as np
    import benchbox
    import mixers
    from conftest import write_seqs
    rng = np.random.default_rng(0)
    seqs = write_seqs(tmp_path / "s.txt", [list(rng.choice(np.arange(1, 41), 9, replace=False)) for _ in range(12)])
    ran = []
    for name in mixers.names():
        for backend in mixers.get_class(name).available_backends("cpu"):
            res = benchbox.run(mixer=name, dataset=str(seqs), opt=[f"backend={backend}"], epochs=1, d_model=8,
                               n_layers=1, max_len=8, eval="full", eval_neg=20, results_dir=None, log=lambda *a, **k: None)
            assert res.row["status"] == "ok" and 0 <= res.metrics["test_full_ndcg@10"] <= 1, (name, backend)
            ran.append((name, backend))
    assert ("ttt_linear", "reference") in ran and ("ttt_mlp", "reference") in ran and ("mamba", "torch") in ran


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_check.py (run by gpu_bench.sh on CUDA) runs its whole code path on CPU: every case
    agrees with the CPU fp32 reference exactly, and the token-by-token references stop at
    --reference-max-len."""
    import csv
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    out = tmp_path / "gpu_check.csv"
    assert gc.main(["--device", "cpu", "--mixers", "gru", "ttt_linear", "--lengths", "8", "12", "--dtypes", "fp32",
                    "--reference-max-len", "8", "--repeats", "1", "--warmup", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    status = {(r["mixer"], r["backend"], r["length"]): r["status"] for r in rows}
    assert status[("ttt_linear", "reference", "12")] == "skipped: reference above L 8"
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["mixer"], r["backend"]) for r in ok} == {("gru", "torch"), ("ttt_linear", "torch"),
                                                         ("ttt_linear", "reference")}
    for r in ok:
        assert float(r["fwdbwd_ms"]) > 0
        assert float(r["out_max_rel"]) < 1e-5 and float(r["grad_max_rel"]) < 1e-4, r
