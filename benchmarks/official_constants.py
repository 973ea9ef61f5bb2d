"""Regenerate the official-layer constants that tests/test_ttt.py::test_matches_official_numbers holds.

For each case of ``OFFICIAL`` in tests/test_ttt.py: build our layer to get its parameter names, fill
them with the test's deterministic values (``_det_fill``), copy them by name into the official modules
of ttt-lm-pytorch's ``ttt.py`` (fetched or given, see benchmarks/kernel_ratios.py), run the official
code in float64 on the test's input and print the output's last row, sum and sum of squares beside the
stored constants. Nothing is fetched at test time: the test only holds the printed numbers.

What "official" means per case: cases without ``pre_conv`` are the unmodified official ``TTTLinear`` /
``TTTMLP`` layer (``use_gate`` and ``share_qk`` are options of that layer). ``pre_conv`` lives in the
official ``Block``, whose output also adds a residual and an FFN that a mixer does not have; for that
case the constant is the composition of unmodified official modules that our mixer computes:
``layer(Block.seq_norm(x + Conv(x)))`` (``Conv`` = the official RMSNorm + depthwise conv).

    python benchmarks/official_constants.py --official-ttt /tmp/official/ttt.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
from kernel_ratios import OFFICIAL_URL, load_official  # noqa: E402
from test_ttt import D, KINDS, OFFICIAL, _det_fill  # noqa: E402

# our parameter name -> (official module, its parameter name): the Block's conv and seq_norm; the layer's own names are the same
PRE_CONV_NAMES = {"pre_conv_norm.weight": ("conv", "norm.weight"), "pre_conv.weight": ("conv", "conv.weight"),
                  "pre_conv.bias": ("conv", "conv.bias"), "seq_norm.weight": ("seq_norm", "weight")}


def official_output(official, name, kw, L):
    ours = KINDS[name](D, num_heads=2, **kw).double()
    _det_fill(ours)
    cfg = official.TTTConfig(hidden_size=D, num_attention_heads=2, ttt_layer_type=name.split("_")[1],
                             mini_batch_size=kw["mini_batch_size"], use_gate=kw.get("use_gate", False),
                             share_qk=kw.get("share_qk", False), pre_conv=kw.get("pre_conv", False),
                             max_position_embeddings=L)
    layer = (official.TTTLinear if name == "ttt_linear" else official.TTTMLP)(cfg, layer_idx=0).double()
    conv = official.Conv(cfg, 0).double() if cfg.pre_conv else None
    seq_norm = official.RMSNorm(D, eps=cfg.rms_norm_eps).double()
    owners = {"conv": conv, "seq_norm": seq_norm}
    with torch.no_grad():
        for pname, p in ours.named_parameters():
            if pname in PRE_CONV_NAMES:
                owner, oname = PRE_CONV_NAMES[pname]
                target = owners[owner].get_parameter(oname)
            else:
                target = layer.get_parameter(pname)
            target.copy_(p)
    x = torch.sin(0.11 * torch.arange(2 * L * D, dtype=torch.float64) + 0.5).view(2, L, D) * 1.5
    h = seq_norm(x + conv(x)) if conv is not None else x
    with torch.no_grad():
        return layer(h, position_ids=torch.arange(L)[None])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official-ttt", help="path of the official ttt.py (default: fetch the pinned commit)")
    p.add_argument("--official-url", default=OFFICIAL_URL)
    a = p.parse_args(argv)
    official = load_official(a.official_ttt, a.official_url)
    worst = 0.0
    for name, kw, L, last, total, sq in OFFICIAL:
        y = official_output(official, name, kw, L)
        new = [round(v, 10) for v in y[1, -1].tolist()]
        diff = max([abs(a_ - b) for a_, b in zip(new, last)] + [abs(y.sum().item() - total), abs((y ** 2).sum().item() - sq)])
        worst = max(worst, diff)
        print(f'    ("{name}", dict({", ".join(f"{k}={v}" for k, v in kw.items())}), {L},\n     {new}, '
              f'{y.sum().item():.10f}, {(y ** 2).sum().item():.10f}),   # stored constants differ by {diff:.1e}')
    print(f"largest difference to the stored constants: {worst:.1e}")


if __name__ == "__main__":
    main()
