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

``--speed`` (CUDA, fla importable with Triton): the inner scan alone, forward + backward, fla's
``chunk_ttt_linear`` and ``fused_chunk_ttt_linear`` beside benchbox's ``ttt_fast`` on the same shapes
(mini-batch / chunk 16, every input and the initial state with gradients), and fla's kernel against
its own naive reference. The two compute slightly different functions (above), so this is a speed
comparison of the same amount of work, not an agreement test between them.

    python benchmarks/fla_parameterisation.py --speed --out results/fla_ttt_cuda.csv
    python benchmarks/fla_parameterisation.py --speed --device cpu --fla-naive .../naive.py   # dry run
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixers.ttt import _inner_apply, _plain_ln, ttt_reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import Timer, autocast  # noqa: E402  (the GPU check's timer and bf16 autocast)


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


def _load_naive(path):
    spec = importlib.util.spec_from_file_location("fla_ttt_naive", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SPEED_COLUMNS = ["device", "impl", "dtype", "batch", "length", "heads", "head_dim", "fwdbwd_ms", "tok_s",
                 "peak_mem_mb", "max_abs_vs_naive", "status"]


def speed(a) -> list[dict]:
    """fla's TTT-Linear kernels and ours, forward + backward of the inner scan, median CUDA-event time."""
    import csv
    from mixers.ttt import ttt_fast
    dev = torch.device(a.device)
    if dev.type == "cuda":
        from fla.ops.ttt import chunk_ttt_linear, fused_chunk_ttt_linear
        from fla.ops.ttt.naive import chunk_ttt_linear_ref
        name = torch.cuda.get_device_name()
    else:  # dry run of this code path: fla's naive reference stands in for its kernels
        chunk_ttt_linear_ref = _load_naive(a.fla_naive).chunk_ttt_linear_ref
        chunk_ttt_linear = fused_chunk_ttt_linear = (
            lambda q, *args, chunk_size=16, **kw: chunk_ttt_linear_ref(q.clone(), *args, mini_batch_size=chunk_size,
                                                                       **kw))  # naive.py writes into q
        name = "cpu (dry run)"
    K = 16
    shapes = [(64, L, 2, 32) for L in (4000, 200)] + [(16, 4000, 8, 64)] if dev.type == "cuda" else [(2, 32, 2, 8)]
    rows = []
    writer = None
    if a.out:  # row by row: fla autotunes each new shape on first call, and a capped run keeps what it measured
        a.out.parent.mkdir(parents=True, exist_ok=True)
        fh = a.out.open("w", newline="")
        writer = csv.DictWriter(fh, fieldnames=SPEED_COLUMNS)
        writer.writeheader()

    timer = Timer(dev)  # CUDA events after synchronisation (perf_counter on the cpu dry run)

    for B, L, H, D in shapes:
        g = torch.Generator().manual_seed(L)
        mk = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(dev)  # noqa: E731
        q, k, v = mk(B, L, H, D, s=D ** -0.5), mk(B, L, H, D, s=D ** -0.5), mk(B, L, H, D)
        lr = (torch.rand(B, L, H, generator=g) * 0.1).to(dev)
        W0, b0 = mk(B, H, D, D, s=0.02), torch.zeros(B, H, 1, D, device=dev)
        gamma, beta = torch.ones(H, D, device=dev), torch.zeros(H, D, device=dev)
        tok = 1.0 / torch.arange(1, K + 1, device=dev, dtype=torch.float32)
        eta = (tok.repeat(-(-L // K))[:L][None, :, None] * lr)[..., None]  # fla: one eta per query token
        do = mk(B, L, H, D)
        for dtype in ("fp32", "bf16"):
            cast = (lambda t: t.bfloat16()) if dtype == "bf16" else (lambda t: t)  # noqa: E731
            leaves = [cast(t).detach().requires_grad_(True) for t in (q, k, v)]

            def fla_call(fn):
                qq, kk, vv = leaves
                h0, hb0 = W0.detach().requires_grad_(True), b0.detach().requires_grad_(True)
                o = fn(qq, kk, vv, gamma, beta, cast(eta), scale=1.0, chunk_size=K, initial_state=h0,
                       initial_state_bias=hb0)[0]
                o.backward(cast(do))
                return o

            def ours(per_chunk):
                def call():
                    qq, kk, vv = leaves
                    p0 = {"W1": W0.detach().requires_grad_(True), "b1": b0.detach().requires_grad_(True)}
                    with autocast(dev, dtype):
                        o = ttt_fast("linear", qq, kk, vv, lr, tok, p0, gamma, beta, K, per_chunk)[0]
                    o.backward(do.to(o.dtype))
                    return o
                return call

            impls = [("fla chunk_ttt_linear", lambda: fla_call(chunk_ttt_linear)),
                     ("benchbox ttt_fast (1 mb/chunk)", ours(1)), ("benchbox ttt_fast (4 mb/chunk)", ours(4)),
                     ("fla fused_chunk_ttt_linear", lambda: fla_call(fused_chunk_ttt_linear))]
            ref_o = None
            if dtype == "fp32" and L <= 256:  # fla's naive reference, to see the kernels compute what it does
                with torch.no_grad():
                    ref_o = chunk_ttt_linear_ref(q.clone(), k, v, gamma, beta, eta, scale=1.0, mini_batch_size=K,
                                                 initial_state=W0, initial_state_bias=b0)[0]
            for impl, fn in impls:
                row = dict(device=name, impl=impl, dtype=dtype, batch=B, length=L, heads=H, head_dim=D)
                try:
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    o = fn()
                    if ref_o is not None and impl.startswith("fla"):
                        row["max_abs_vs_naive"] = (o.detach().float() - ref_o).abs().max().item()
                    t = timer.median(fn, a.warmup, a.repeats)
                    row.update(fwdbwd_ms=t * 1e3, tok_s=B * L / t, status="ok")
                    if dev.type == "cuda":
                        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
                except Exception as e:  # noqa: BLE001 - one failing kernel must not hide the others
                    row["status"] = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                for t_ in leaves:
                    t_.grad = None
                rows.append(row)
                if writer:
                    writer.writerow({c: row.get(c, "") for c in SPEED_COLUMNS})
                    fh.flush()
                print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k, '')}"
                               for k in SPEED_COLUMNS[1:]), flush=True)
    if writer:
        fh.close()
        print(f"wrote {a.out}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fla-naive", help="path of fla/ops/ttt/naive.py (the parameterisation check, the cpu dry run)")
    p.add_argument("--speed", action="store_true", help="time fla's kernels beside ours (CUDA)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    if a.speed:
        if a.device == "cuda" and not torch.cuda.is_available():
            print("no CUDA device: nothing to time")
            return
        speed(a)
        return
    if not a.fla_naive:
        p.error("--fla-naive is required without --speed")
    fla = _load_naive(a.fla_naive)
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
