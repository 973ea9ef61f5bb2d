"""How flash-linear-attention's TTT-Linear (``fla.ops.ttt``) relates to the official layer, in numbers.

fla's plain reference ``fla/ops/ttt/naive.py`` (``chunk_ttt_linear_ref``) is run beside the official
TTT-Linear inner scan (benchbox's ``ttt_reference``, which matches the official layer to 1e-15 in float64)
on the same q, k, v, inner weights and LN parameters. Three differences in parameterisation show:
1. eta: fla takes one learning rate per *query* token, eta_t; the official dual form uses
   eta[t, s] = token_idx[t] * lr[s], with the learnable lr gate of the *key* token s. They agree only
   when lr is the same for every token of a mini-batch.
2. output residual: fla returns f(q) + LN(f(q)); the official layer returns q + LN(f(q)).
3. fla scales q by d^-1/2 unless ``scale=1.0``; its default initial state is W = 0, b = 0.
So a ``backend=fla`` of benchbox's ``ttt_linear`` would compute another function; it is not offered.

    pip install --no-deps --target /tmp/fla_pkg fla-core      # no Triton needed: naive.py is plain torch
    python benchmarks/fla_parameterisation.py --fla-naive /tmp/fla_pkg/fla/ops/ttt/naive.py
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixers.ttt import _inner_apply, _plain_ln, ttt_reference  # noqa: E402


def official_scan(q, k, v, lr, tok, W1, b1, gamma, beta, K, residual="q"):
    """The official TTT-Linear inner scan token by token (as ttt_reference), with the output residual
    as a switch: "q" (official) or "f" (f(q), as fla)."""
    B, L, H, D = q.shape
    p = {"W1": W1.clone().requires_grad_(True), "b1": b1.clone().requires_grad_(True)}
    outs = []
    for s0 in range(0, L, K):
        grads = []
        for t in range(s0, s0 + K):
            loss = 0.5 * ((_plain_ln(_inner_apply("linear", k[:, t], p), gamma, beta) - (v[:, t] - k[:, t])) ** 2).sum()
            g = torch.autograd.grad(loss, [p["W1"], p["b1"]], create_graph=True)
            e = lr[:, t].reshape(B, H, 1, 1)
            grads.append([e * g[0], e * g[1]])
        run = [0, 0]
        for i, t in enumerate(range(s0, s0 + K)):
            run = [run[0] + grads[i][0], run[1] + grads[i][1]]
            w = {"W1": p["W1"] - tok[i] * run[0], "b1": p["b1"] - tok[i] * run[1]}
            f = _inner_apply("linear", q[:, t], w)
            outs.append((q[:, t] if residual == "q" else f) + _plain_ln(f, gamma, beta))
        p = w
    return torch.stack(outs, 1).detach()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fla-naive", required=True, help="path of fla/ops/ttt/naive.py")
    a = p.parse_args(argv)
    spec = importlib.util.spec_from_file_location("fla_ttt_naive", a.fla_naive)
    fla = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fla)
    torch.manual_seed(0)
    B, L, H, D, K = 2, 8, 2, 4, 4
    dt = torch.float64
    q, k, v = (torch.randn(B, L, H, D, dtype=dt) for _ in range(3))
    W1, b1 = torch.randn(B, H, D, D, dtype=dt) * 0.3, torch.randn(B, H, 1, D, dtype=dt) * 0.1
    gamma, beta = 1 + 0.1 * torch.randn(H, D, dtype=dt), 0.1 * torch.randn(H, D, dtype=dt)
    tok = 1.0 / torch.arange(1, K + 1, dtype=dt)
    per_token = torch.rand(B, L, H, dtype=dt) * 0.1
    ref = ttt_reference("linear", q, k, v, per_token, tok, {"W1": W1, "b1": b1}, gamma, beta, K)[0]
    print(f"the scan here vs ttt_reference: {(official_scan(q, k, v, per_token, tok, W1, b1, gamma, beta, K) - ref).abs().max():.1e}")
    for name, lr in (("lr constant over tokens", torch.full((B, L, H), 0.05, dtype=dt)), ("lr per token", per_token)):
        eta = (tok.repeat(L // K)[None, :, None] * lr)[..., None]  # fla's one eta per query token
        o, _, _ = fla.chunk_ttt_linear_ref(q.clone(), k, v, gamma, beta, eta, scale=1.0, eps=1e-6, mini_batch_size=K,
                                           initial_state=W1.float(), initial_state_bias=b1.float())
        o = o.double()  # fla's reference computes in float32
        d_q = (o - official_scan(q, k, v, lr, tok, W1, b1, gamma, beta, K, "q")).abs().max()
        d_f = (o - official_scan(q, k, v, lr, tok, W1, b1, gamma, beta, K, "f")).abs().max()
        print(f"{name}: fla vs official (residual q) {d_q:.2e}; fla vs official with residual f(q) {d_f:.2e}")


if __name__ == "__main__":
    main()
