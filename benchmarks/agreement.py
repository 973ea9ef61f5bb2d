"""Fast path against its plain reference, in float64, for every mixer that has both: the largest
absolute difference of the outputs and of all gradients (input and every parameter).

    python benchmarks/agreement.py            # a few seconds on CPU

TTT-Linear / TTT-MLP: dual form (backend torch) vs token-by-token reference (backend reference), for
mini_batch_size 1, 2, 5, 10, 16 and a length that is a multiple and one that is not. Mamba: chunked
scan vs sequential scan. Attention: sdpa vs math. The tests (tests/test_ttt.py, tests/test_mamba.py,
tests/test_mixers.py) hold the same pairs to 1e-5; this prints the figures themselves.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mixers  # noqa: E402

D = 16


def max_diffs(fast, ref, L, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(2, L, D, dtype=torch.float64)
    gy = torch.randn(2, L, D, dtype=torch.float64)
    out = []
    for m in (fast, ref):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        gs = torch.autograd.grad((y * gy).sum(), [xi] + list(m.parameters()), allow_unused=True)
        out.append((y.detach(), gs))
    (yf, gf), (yr, gr) = out
    g = max(((a - b).abs().max().item() for a, b in zip(gf, gr) if a is not None and b is not None), default=0.0)
    return (yf - yr).abs().max().item(), g


def pair(name, fast_kw, ref_kw, **kw):
    torch.manual_seed(0)
    fast = mixers.build(name, D, max_len=1024, **fast_kw, **kw).double()
    with torch.no_grad():  # move every parameter off its init so that no term vanishes
        for p in fast.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = mixers.build(name, D, max_len=1024, **ref_kw, **kw).double()
    ref.load_state_dict(fast.state_dict())
    return fast.eval(), ref.eval()


def main():
    print(f"{'mixer':<11} {'setting':<24} {'L':>4} {'max |dy|':>10} {'max |dgrad|':>12}")
    for name in ("ttt_linear", "ttt_mlp"):
        for mbs in (1, 2, 5, 10, 16):
            fast, ref = pair(name, {"backend": "torch"}, {"backend": "reference"}, num_heads=2, mini_batch_size=mbs)
            for L in sorted({2 * mbs, 2 * mbs + 3} if mbs > 1 else {6, 9}):
                dy, dg = max_diffs(fast, ref, L)
                print(f"{name:<11} {'mini_batch_size=' + str(mbs):<24} {L:>4} {dy:>10.1e} {dg:>12.1e}")
    for L in (50, 200, 1000):
        fast, ref = pair("mamba", {"scan": "chunked"}, {"scan": "sequential"})
        dy, dg = max_diffs(fast, ref, L)
        print(f"{'mamba':<11} {'chunked vs sequential':<24} {L:>4} {dy:>10.1e} {dg:>12.1e}")
    for L in (50, 200):
        fast, ref = pair("attention", {"backend": "sdpa"}, {"backend": "math"})
        dy, dg = max_diffs(fast, ref, L)
        print(f"{'attention':<11} {'sdpa vs math':<24} {L:>4} {dy:>10.1e} {dg:>12.1e}")


if __name__ == "__main__":
    main()
