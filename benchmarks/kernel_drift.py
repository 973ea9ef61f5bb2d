"""How far the C kernels move a training run, beside what one ulp of rounding does: float noise or not.

Trains the first ``--steps`` study-protocol steps of one model three times, each in a fresh process, from the same
seed and batches: with the C kernels (``benchbox/kernels.py``, as ``benchbox run`` trains), with torch's paths
(``BENCHBOX_C_KERNELS=off``), and with torch's paths after multiplying every item embedding by 1 +- 2^-23 (one
ulp). Prints the loss of each at a few steps and the differences from torch's. A kernel that only rounds otherwise
stays within the ulp perturbation's band; one that draws other dropout elements or computes something else does not
(a GRU whose output had another memory layout than nn.GRU's differed by 2.5e-2 at step 0).

    python benchmarks/kernel_drift.py --model GRU4Rec --dataset beauty --steps 300
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchbox.tables import MODELS  # noqa: E402  (Table 1's names: the study's six, TTT-MLP, Mamba, ComiDR+)

CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from benchbox.config import make_config
from benchbox.train import build_training, train_step
from benchbox import kernels
a = json.loads(sys.argv[2])
cfg = make_config(mixer=a["mixer"], readout=a["readout"], readout_opts=a["readout_opts"], dataset=a["dataset"],
                  protocol="study", threads=1)
torch.manual_seed(0)
tr = build_training(cfg)
if a["perturb"]:
    with torch.no_grad():
        w = tr.model.item_emb.weight
        w.mul_(1 + 2.0 ** -23 * torch.sign(torch.randn(w.shape, generator=torch.Generator().manual_seed(1))))
tr.model.train()
torch.manual_seed(1)
batches = iter(tr.loader)
losses = [train_step(tr.model, tr.opt, next(batches), tr.dev, tr.amp) for _ in range(a["steps"])]
print(json.dumps({"losses": losses, "cpu_kernels": kernels.kernels_in_force()}))
"""


def trajectory(model: str, dataset: str, steps: int, kernels_on: bool, perturb: bool) -> dict:
    mixer, readout, *opts = MODELS[model]
    env = dict(os.environ, BENCHBOX_C_KERNELS="on" if kernels_on else "off")
    args = json.dumps(dict(mixer=mixer, readout=readout, readout_opts=opts[0] if opts else {}, dataset=dataset,
                           steps=steps, perturb=perturb))
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), args], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the training child failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="GRU4Rec", choices=list(MODELS))
    p.add_argument("--dataset", default="beauty")
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args(argv)
    torch_run = trajectory(a.model, a.dataset, a.steps, False, False)
    c_run = trajectory(a.model, a.dataset, a.steps, True, False)
    ulp_run = trajectory(a.model, a.dataset, a.steps, False, True)
    if c_run["cpu_kernels"] != "c":
        print("note: the C kernels are not in force here (no compiler?): both runs took torch's paths")
    print(f"{a.model} on {a.dataset}, study protocol, seed 0: training loss by step")
    print(f"{'step':>6} {'torch paths':>13} {'C kernels - torch':>18} {'one ulp - torch':>16}")
    for s in sorted({0, 1, 10, 50, 100, a.steps // 2, a.steps - 1}):
        if s < a.steps:
            t = torch_run["losses"][s]
            print(f"{s:>6} {t:>13.7f} {c_run['losses'][s] - t:>18.2e} {ulp_run['losses'][s] - t:>16.2e}")


if __name__ == "__main__":
    from benchbox.blas import reexec_with_shim
    sys.path.insert(0, str(ROOT))
    reexec_with_shim(sys.argv)
    main()
